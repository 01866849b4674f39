"""Layer-wise inference equals one forward pass over the whole graph, for every convolution,
batch size, node subset and storage (memmaps, float16 features, float16 tables within a
stated tolerance), and leaves no scratch files behind."""
from __future__ import annotations

from pathlib import Path
from shutil import _ntuple_diskusage as DiskUsage

import numpy as np
import pytest
import torch

from bgrl_dgl.embeddings import blockio, scratch
from bgrl_dgl.embeddings import layerwise as inference
from bgrl_dgl.embeddings.layerwise import embed_store, layerwise_embeddings
from bgrl_dgl.errors import InputError
from bgrl_dgl.model.adjacency import Adjacency
from bgrl_dgl.model.encoder import Encoder, ModelConfig
from bgrl_dgl.store.reader import GraphStore
from bgrl_dgl.store.writer import StoreWriter

from helpers import FLOAT16_SCRATCH_ATOL

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


class RecordingOps:
    """Delegates to a layer's ops, recording the files under ``scratch`` when its first block
    starts, and optionally failing there."""

    def __init__(self, ops, layer: int, scratch: Path, listings: dict, fail_at_layer: int | None):
        self.ops, self.layer, self.scratch = ops, layer, scratch
        self.listings, self.fail_at_layer = listings, fail_at_layer
        self.widths, self.edge_bytes = ops.widths, ops.edge_bytes
        self.needs_out_degree = ops.needs_out_degree

    def tables(self, h, out_degree):
        return self.ops.tables(h, out_degree)

    def block(self, view):
        if self.layer not in self.listings:
            self.listings[self.layer] = {p.name for p in self.scratch.rglob("*") if p.is_file()}
        if self.layer == self.fail_at_layer:
            raise RuntimeError("layer failed")
        return self.ops.block(view)


def record_layers(monkeypatch, scratch: Path, fail_at_layer: int | None = None) -> dict:
    listings: dict[int, set[str]] = {}
    real = inference.layer_ops
    monkeypatch.setattr(inference, "layer_ops", lambda encoder, i: RecordingOps(
        real(encoder, i), i, scratch, listings, fail_at_layer))
    return listings


def test_tables_live_in_scratch_dir_two_layers_at_a_time(graph, tmp_path, monkeypatch):
    indptr, indices, features = graph
    listings = record_layers(monkeypatch, tmp_path)
    layerwise_embeddings(random_encoder("gcn"), indptr, indices, features, batch_size=10,
                         scratch_dir=tmp_path)
    # Layer i reads its tables (one each: GCN 10->16 keeps the scaled input, 16->12 and
    # 12->8 the projection) and writes those of layer i + 1; once it is done its own are
    # deleted; the last layer writes to memory.
    assert listings == {0: {"layer-0-0.float32", "layer-1-0.float32"},
                        1: {"layer-1-0.float32", "layer-2-0.float32"},
                        2: {"layer-2-0.float32"}}
    assert list(tmp_path.iterdir()) == []


def test_scratch_dir_is_removed_when_a_layer_fails(graph, tmp_path, monkeypatch):
    indptr, indices, features = graph
    record_layers(monkeypatch, tmp_path, fail_at_layer=2)
    with pytest.raises(RuntimeError, match="layer failed"):
        layerwise_embeddings(random_encoder("sage"), indptr, indices, features, batch_size=10,
                             scratch_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("conv", ["sage", "gcn", "gat"])
@pytest.mark.parametrize("nodes", [[0, 1, 2, 3], [2, 9, 10, 11, 30, 47, 52], [48, 49, 50, 51, 52]])
def test_node_subsets_equal_the_rows_of_the_full_graph_forward(graph, conv, nodes):
    indptr, indices, features = graph
    encoder = random_encoder(conv)
    expected = full_graph_forward(encoder, indptr, indices, features)
    result = layerwise_embeddings(encoder, indptr, indices, features, batch_size=3,
                                  nodes=np.array(nodes))
    assert result.shape == (len(nodes), 8)
    np.testing.assert_allclose(result, expected[nodes], rtol=0, atol=1e-5)


@pytest.mark.parametrize("conv", ["sage", "gcn", "gat"])
def test_blocks_cut_by_a_small_memory_budget_give_the_same_result(graph, conv):
    indptr, indices, features = graph
    encoder = random_encoder(conv)
    expected = full_graph_forward(encoder, indptr, indices, features)
    # A few kB per block: blocks of a few rows, some holding one row with more edges than
    # the budget allows.
    result = layerwise_embeddings(encoder, indptr, indices, features, memory_budget=4000)
    np.testing.assert_allclose(result, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("config", [dict(conv="gcn", gcn_self_loops=False, norm="layer"),
                                    dict(conv="gcn", norm="none", final_activation=False),
                                    dict(conv="sage", norm="layer", hidden=[4, 24]),
                                    dict(conv="gat", heads=2, hidden=[6, 4])])
def test_model_variants_equal_the_full_graph_forward(graph, config):
    indptr, indices, features = graph
    torch.manual_seed(3)
    encoder = Encoder(IN_DIM, ModelConfig(**{"hidden": [16, 12, 8], **config}))
    expected = full_graph_forward(encoder, indptr, indices, features)
    result = layerwise_embeddings(encoder, indptr, indices, features, batch_size=9)
    np.testing.assert_allclose(result, expected, rtol=0, atol=1e-5)



@pytest.mark.parametrize("conv", ["sage", "gcn", "gat"])
def test_float16_scratch_is_within_its_stated_tolerance(graph, conv):
    indptr, indices, features = graph
    encoder = random_encoder(conv)
    expected = full_graph_forward(encoder, indptr, indices, features)
    result = layerwise_embeddings(encoder, indptr, indices, features, batch_size=20,
                                  scratch_dtype="float16")
    assert result.dtype == np.float32
    np.testing.assert_allclose(result, expected, rtol=0, atol=FLOAT16_SCRATCH_ATOL)
    assert np.abs(result - expected).max() > 1e-6  # the tables were rounded


def test_too_little_scratch_space_is_refused_before_anything_is_written(graph, tmp_path,
                                                                         monkeypatch):
    indptr, indices, features = graph
    monkeypatch.setattr(scratch.shutil, "disk_usage", lambda path: DiskUsage(10**9, 10**9, 1000))
    with pytest.raises(InputError, match="scratch space") as caught:
        layerwise_embeddings(random_encoder("gcn"), indptr, indices, features,
                             scratch_dir=tmp_path)
    assert str(tmp_path) in str(caught.value) and "\n" not in str(caught.value)
    assert list(tmp_path.iterdir()) == []
    # What the tables need: two consecutive layers' widths, 53 rows of 4 bytes.
    ops = [inference.layer_ops(random_encoder("gcn"), i) for i in range(3)]
    assert inference.table_bytes(ops, NUM_NODES, torch.float32) == (10 + 12) * NUM_NODES * 4


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("conv", ["sage", "gcn", "gat"])
@pytest.mark.parametrize("resident", [True, False])
def test_cuda_equals_the_full_graph_forward(graph, conv, resident, monkeypatch):
    indptr, indices, features = graph
    if not resident:  # tables in host memory, blocks gathered into pinned buffers
        monkeypatch.setattr(inference, "DEVICE_TABLE_SHARE", 0.0)
    encoder = random_encoder(conv)
    expected = full_graph_forward(encoder, indptr, indices, features)
    result = layerwise_embeddings(encoder.cuda(), indptr, indices, features, batch_size=7,
                                  device="cuda", nodes=np.arange(2, NUM_NODES))
    np.testing.assert_allclose(result, expected[2:], rtol=0, atol=1e-5)


@pytest.mark.parametrize("change, message", [
    (lambda p, i, f: dict(graph_indptr=p + np.arange(len(p))), "indptr must run"),
    (lambda p, i, f: dict(graph_indptr=p.reshape(1, -1)), "indptr must be"),
    (lambda p, i, f: dict(features=f[:-1]), "features must be"),
    (lambda p, i, f: dict(batch_size=0), "batch_size"),
    (lambda p, i, f: dict(out=np.empty((NUM_NODES, 7), np.float32)), "out must be"),
    (lambda p, i, f: dict(in_degrees=np.diff(p)), "both"),
    (lambda p, i, f: dict(in_degrees=np.ones(3), out_degrees=np.ones(3)), r"must be \[53\]"),
    (lambda p, i, f: dict(scratch_dtype="bfloat16"), "scratch_dtype"),
])
def test_bad_inputs_raise_value_error(graph, change, message):
    indptr, indices, features = graph
    kwargs = dict(graph_indptr=indptr, graph_indices=indices, features=features)
    kwargs.update(change(indptr, indices, features))
    with pytest.raises(ValueError, match=message):
        layerwise_embeddings(random_encoder("sage"), **kwargs)


def test_row_blocks_respect_row_and_edge_limits():
    # In-edge counts per node: 1, 0, 5, 1, 1, 1, 2.
    counts = np.array([1, 0, 5, 1, 1, 1, 2])
    indptr = np.concatenate([[0], np.cumsum(counts)])
    graph = blockio.GraphArrays(indptr, np.zeros(indptr[-1], np.int64), None, None, False)
    blocks = list(inference._row_blocks(graph, None, max_rows=3, max_edges=3))
    # Node 2 has more in-edges than a block may hold: it forms a block of its own.
    assert [(start, rows.start, rows.stop) for start, rows in blocks] == [
        (0, 0, 2), (2, 2, 3), (3, 3, 6), (6, 6, 7)]
    ids = np.array([0, 2, 3, 4, 6])
    blocks = list(inference._row_blocks(graph, ids, max_rows=2, max_edges=3))
    # Blocks of consecutive ids are ranges, others arrays of ids.
    assert [(start, rows.start, rows.stop) for start, rows in blocks] == [
        (0, 0, 1), (1, 2, 3), (2, 3, 5), (4, 6, 7)]
    (_, first), (_, second) = inference._row_blocks(graph, np.array([0, 3, 5, 6]), max_rows=2)
    np.testing.assert_array_equal(first, [0, 3])
    assert (second.start, second.stop) == (5, 7)
