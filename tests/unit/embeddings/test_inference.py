"""Layer-wise inference equals one forward pass over the whole graph, for every convolution,
batch size and storage (memmaps, float16 features), and leaves no scratch files behind."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from bgrl_dgl.embeddings.layerwise import embed_store, layerwise_embeddings
from bgrl_dgl.model.adjacency import Adjacency
from bgrl_dgl.model.encoder import Encoder, ModelConfig
from bgrl_dgl.store.reader import GraphStore
from bgrl_dgl.store.writer import StoreWriter

NUM_NODES = 53
IN_DIM = 10


def random_csc(num_nodes: int = NUM_NODES, num_edges: int = 260,
               seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A directed random graph as CSC (indptr [N+1], indices [E] int64, sources ascending per
    destination) with self loops, duplicate edges and nodes without in-edges."""
    rng = np.random.default_rng(seed)
    src = rng.integers(0, num_nodes, num_edges)
    dst = rng.integers(0, num_nodes - 5, num_edges)  # the last 5 nodes have no in-edges
    src[:4], dst[:4] = [3, 3, 8, 8], [3, 3, 8, 2]     # self loops and a duplicate edge
    order = np.lexsort((src, dst))
    indptr = np.zeros(num_nodes + 1, dtype=np.int64)
    np.cumsum(np.bincount(dst, minlength=num_nodes), out=indptr[1:])
    return indptr, src[order].astype(np.int64)


def random_encoder(conv: str, seed: int = 0) -> Encoder:
    """A 3-layer encoder with non-trivial batch-norm statistics, in training mode."""
    torch.manual_seed(seed)
    encoder = Encoder(IN_DIM, ModelConfig(conv=conv, hidden=[16, 12, 8], norm="batch", heads=4))
    for module in encoder.modules():
        if isinstance(module, torch.nn.BatchNorm1d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    return encoder


def full_graph_forward(encoder: Encoder, indptr: np.ndarray, indices: np.ndarray,
                       features: np.ndarray) -> np.ndarray:
    """The encoder over the whole graph at once, every layer on the same adjacency."""
    adj = Adjacency(torch.from_numpy(indptr), torch.from_numpy(indices), len(indptr) - 1)
    encoder.eval()
    with torch.no_grad():
        return encoder([adj] * encoder.num_layers, torch.from_numpy(features).float()).numpy()


@pytest.fixture(scope="module")
def graph() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    indptr, indices = random_csc()
    features = np.random.default_rng(1).normal(size=(NUM_NODES, IN_DIM)).astype(np.float32)
    return indptr, indices, features


@pytest.mark.parametrize("conv", ["sage", "gcn", "gat"])
@pytest.mark.parametrize("batch_size", [7, 20, 4096])
def test_layerwise_equals_full_graph_forward(graph, conv, batch_size):
    indptr, indices, features = graph
    encoder = random_encoder(conv)
    expected = full_graph_forward(encoder, indptr, indices, features)
    encoder.train()
    result = layerwise_embeddings(encoder, indptr, indices, features, batch_size=batch_size)
    assert result.shape == (NUM_NODES, 8) and result.dtype == np.float32
    np.testing.assert_allclose(result, expected, rtol=0, atol=1e-5)
    assert encoder.training  # the caller's mode is restored


def test_gcn_uses_whole_graph_degrees_given_by_the_caller(graph):
    indptr, indices, features = graph
    encoder = random_encoder("gcn")
    derived = layerwise_embeddings(encoder, indptr, indices, features, batch_size=9)
    in_deg, out_deg = np.diff(indptr), np.bincount(indices, minlength=NUM_NODES)
    given = layerwise_embeddings(encoder, indptr, indices, features, batch_size=9,
                                 in_degrees=in_deg, out_degrees=out_deg)
    np.testing.assert_array_equal(given, derived)
    doubled = layerwise_embeddings(encoder, indptr, indices, features, batch_size=9,
                                   in_degrees=in_deg, out_degrees=2 * out_deg)
    assert not np.allclose(doubled, derived, atol=1e-3)


def test_memmap_inputs_float16_features_and_memmap_output(graph, tmp_path):
    indptr, indices, features = graph
    files = {"indptr": indptr.astype(np.int32), "indices": indices.astype(np.int32),
             "features": features.astype(np.float16)}
    for name, array in files.items():
        np.save(tmp_path / f"{name}.npy", array)
    mapped = {name: np.load(tmp_path / f"{name}.npy", mmap_mode="r") for name in files}
    out = np.lib.format.open_memmap(tmp_path / "emb.npy", mode="w+", dtype=np.float32,
                                    shape=(NUM_NODES, 8))
    encoder = random_encoder("sage")
    result = layerwise_embeddings(encoder, mapped["indptr"], mapped["indices"],
                                  mapped["features"], batch_size=11, out=out)
    assert result is out
    del out, result
    expected = full_graph_forward(encoder, indptr, indices, files["features"])
    np.testing.assert_allclose(np.load(tmp_path / "emb.npy"), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("symmetrize", [False, True])
def test_embed_store_equals_full_graph_forward(graph, tmp_path, symmetrize):
    indptr, indices, features = graph
    dst = np.repeat(np.arange(NUM_NODES), np.diff(indptr))
    with StoreWriter(tmp_path / "store", feature_dtype="float16") as writer:
        writer.write_topology(NUM_NODES, lambda: [(indices, dst)], source_path="edges",
                              symmetrize=symmetrize, self_loops="keep", dedup=False)
        writer.write_feature_array(features, source_path="features")
        writer.commit()
    store = GraphStore.open(tmp_path / "store")
    assert store.symmetrized == symmetrize
    encoder = random_encoder("gcn")
    expected = full_graph_forward(encoder, np.array(store.indptr, np.int64),
                                  np.array(store.indices, np.int64), np.array(store.features))
    result = embed_store(encoder, store, batch_size=8, scratch_dir=tmp_path)
    np.testing.assert_allclose(result, expected, rtol=0, atol=1e-5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["store"]


class RecordingEncoder(torch.nn.Module):
    """Delegates to an encoder, recording the files under ``scratch`` when each layer starts,
    and optionally failing in one layer."""

    def __init__(self, encoder: Encoder, scratch: Path, fail_at_layer: int | None = None) -> None:
        super().__init__()
        self.encoder = encoder
        self.num_layers, self.out_dim = encoder.num_layers, encoder.out_dim
        self.scratch, self.fail_at_layer = scratch, fail_at_layer
        self.listings: dict[int, set[str]] = {}

    def layer_forward(self, i: int, adj: Adjacency, h: torch.Tensor) -> torch.Tensor:
        if i not in self.listings:
            self.listings[i] = {p.name for p in self.scratch.rglob("*") if p.is_file()}
        if i == self.fail_at_layer:
            raise RuntimeError("layer failed")
        return self.encoder.layer_forward(i, adj, h)


def test_intermediate_layers_live_in_scratch_dir_and_are_removed(graph, tmp_path):
    indptr, indices, features = graph
    encoder = RecordingEncoder(random_encoder("gcn"), tmp_path)
    layerwise_embeddings(encoder, indptr, indices, features, batch_size=10, scratch_dir=tmp_path)
    # Layer 1 reads layer 0's output from a file under the scratch dir; once layer 1 is
    # written, layer 0's file is deleted; the last layer writes to memory.
    assert encoder.listings == {0: set(), 1: {"layer-0.f32"}, 2: {"layer-1.f32"}}
    assert list(tmp_path.iterdir()) == []


def test_scratch_dir_is_removed_when_a_layer_fails(graph, tmp_path):
    indptr, indices, features = graph
    encoder = RecordingEncoder(random_encoder("sage"), tmp_path, fail_at_layer=2)
    with pytest.raises(RuntimeError, match="layer failed"):
        layerwise_embeddings(encoder, indptr, indices, features, batch_size=10,
                             scratch_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("change, message", [
    (lambda p, i, f: dict(graph_indptr=p + np.arange(len(p))), "indptr must run"),
    (lambda p, i, f: dict(graph_indptr=p.reshape(1, -1)), "indptr must be"),
    (lambda p, i, f: dict(features=f[:-1]), "features must be"),
    (lambda p, i, f: dict(batch_size=0), "batch_size"),
    (lambda p, i, f: dict(out=np.empty((NUM_NODES, 7), np.float32)), "out must be"),
    (lambda p, i, f: dict(in_degrees=np.diff(p)), "both"),
    (lambda p, i, f: dict(in_degrees=np.ones(3), out_degrees=np.ones(3)), r"must be \[53\]"),
])
def test_bad_inputs_raise_value_error(graph, change, message):
    indptr, indices, features = graph
    kwargs = dict(graph_indptr=indptr, graph_indices=indices, features=features)
    kwargs.update(change(indptr, indices, features))
    with pytest.raises(ValueError, match=message):
        layerwise_embeddings(random_encoder("sage"), **kwargs)
