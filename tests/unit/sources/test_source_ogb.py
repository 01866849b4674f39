"""The ogb source on tiny ogbn-arxiv/products/papers100M-layout directories (no network)."""
from __future__ import annotations

import builtins
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from bgrl_dgl.cli import main
from bgrl_dgl.errors import InputError
from bgrl_dgl.sources.npz_members import NpzMember
from bgrl_dgl.sources.ogb import ogbn_dataset, read_splits
from bgrl_dgl.sources.safe_pickle import load_torch_file
from bgrl_dgl.store.reader import GraphStore

from helpers import assert_input_error
from ogb_fixtures import (
    OGBN_SPLIT_TYPE,
    ogbn_binary_dataset,
    ogbn_csv_dataset,
    tiny_graph,
    undirected_csc,
)


@pytest.fixture(autouse=True)
def no_prompt(monkeypatch):
    """ogb asks on stdin in some states; the source must never let it get there."""
    def refuse(*args):
        raise AssertionError("input() was called")
    monkeypatch.setattr(builtins, "input", refuse)


def prepare(root: Path, out: Path, name: str, *flags: str) -> GraphStore:
    assert main(["prepare", "ogb", "--name", name, "--root", str(root), "--out", str(out),
                 *flags]) == 0
    return GraphStore.open(out)


def assert_undirected_topology(store: GraphStore, graph) -> None:
    indptr, indices = undirected_csc(graph.num_nodes, graph.src, graph.dst)
    assert np.array_equal(np.asarray(store.indptr, dtype=np.int64), indptr)
    assert np.array_equal(np.asarray(store.indices, dtype=np.int64), indices)


def assert_splits(store: GraphStore, graph) -> None:
    assert sorted(store.split_names) == ["test", "train", "valid"]
    for name, ids in graph.splits.items():
        assert np.array_equal(store.split(name), ids)


def test_arxiv_csv_files_round_trip(tmp_path):
    graph = tiny_graph()
    directory = ogbn_csv_dataset(tmp_path / "ogb", graph, "ogbn-arxiv")
    # ogb's own cache is a pickle; it must be neither loaded nor needed.
    (directory / "processed").mkdir()
    (directory / "processed" / "data_processed").write_bytes(b"not a pickle")
    store = prepare(tmp_path / "ogb", tmp_path / "out", "ogbn-arxiv")
    assert store.num_nodes == graph.num_nodes
    assert store.symmetrized and store.num_classes == 40   # from ogb's master.csv
    assert_undirected_topology(store, graph)
    assert store.feat_dtype == np.float32
    assert np.array_equal(np.asarray(store.features), graph.features)
    assert np.array_equal(np.asarray(store.labels), graph.labels)
    assert_splits(store, graph)


def test_papers100m_npz_with_unlabelled_nodes(tmp_path):
    graph = tiny_graph(unlabelled=4, seed=1)
    ogbn_binary_dataset(tmp_path / "ogb", graph, "ogbn-papers100M")
    store = prepare(tmp_path / "ogb", tmp_path / "out", "ogbn-papers100M",
                    "--feature-dtype", "float16")
    assert store.num_classes == 172
    assert_undirected_topology(store, graph)
    assert store.feat_dtype == np.float16
    assert np.array_equal(np.asarray(store.features), graph.features.astype(np.float16))
    labels = np.asarray(store.labels)
    assert labels.dtype == np.int64 and (labels == -1).sum() == 4
    assert np.array_equal(labels, graph.labels)
    assert_splits(store, graph)


def test_products_keeps_ogbs_inverse_edges_without_symmetrize(tmp_path):
    """ogbn-products stores one direction per pair and ogb adds the reverse (add_inverse_edge)."""
    graph = tiny_graph(seed=2)
    ogbn_csv_dataset(tmp_path / "ogb", graph, "ogbn-products")
    store = prepare(tmp_path / "ogb", tmp_path / "out", "ogbn-products", "--no-symmetrize")
    assert store.symmetrized and store.num_classes == 47
    assert_undirected_topology(store, graph)


def test_npz_members_stream_in_chunks_in_either_order(tmp_path):
    rng = np.random.default_rng(0)
    edges = rng.integers(0, 100, (2, 11))
    features = rng.normal(size=(7, 3)).astype(np.float32)
    path = tmp_path / "data.npz"
    np.savez_compressed(path, c_edges=edges, f_edges=np.asfortranarray(edges),
                        features=features, f_features=np.asfortranarray(features))
    for key in ("c_edges", "f_edges"):
        member = NpzMember.open(path, key)
        assert member.fortran_order == (key == "f_edges")
        chunks = list(member.pair_chunks(4))
        assert [len(src) for src, _ in chunks] == [4, 4, 3]
        assert np.array_equal(np.concatenate([src for src, _ in chunks]), edges[0])
        assert np.array_equal(np.concatenate([dst for _, dst in chunks]), edges[1])
    rows = list(NpzMember.open(path, "features").row_chunks(3))
    assert [len(chunk) for chunk in rows] == [3, 3, 1]
    assert np.array_equal(np.concatenate(rows), features)
    with pytest.raises(InputError, match="Fortran-ordered"):
        list(NpzMember.open(path, "f_features").row_chunks(3))
    with pytest.raises(InputError, match="has no array 'node_feat'"):
        NpzMember.open(path, "node_feat")


def test_split_dict_pt_replaces_the_csv_splits(tmp_path):
    graph = tiny_graph()
    directory = ogbn_csv_dataset(tmp_path, graph, "ogbn-arxiv")
    split_dir = directory / "split" / OGBN_SPLIT_TYPE["ogbn-arxiv"]
    for name in graph.splits:
        (split_dir / f"{name}.csv.gz").unlink()
    torch.save({name: ids.astype(np.int64) for name, ids in graph.splits.items()},
               split_dir / "split_dict.pt")   # numpy arrays, as ogb's DatasetSaver writes
    found = {name: ids for name, ids, _ in read_splits(ogbn_dataset("ogbn-arxiv", tmp_path))}
    assert found.keys() == graph.splits.keys()
    for name, ids in graph.splits.items():
        assert np.array_equal(found[name], ids)


class RunsCode:
    def __reduce__(self):
        return (os.system, ("echo unpickled",))


def test_torch_files_with_code_are_refused(tmp_path):
    path = tmp_path / "split_dict.pt"
    torch.save({"train": np.arange(3), "hook": RunsCode()}, path)
    with pytest.raises(InputError, match=r"refusing to unpickle \w+\.system"):
        load_torch_file(path)


def test_missing_release_marker_fails_without_prompting(cli, tmp_path):
    directory = ogbn_csv_dataset(tmp_path / "ogb", tiny_graph(), "ogbn-arxiv")
    (directory / "RELEASE_v1.txt").unlink()
    result = cli("prepare", "ogb", "--name", "ogbn-arxiv", "--root", tmp_path / "ogb",
                 "--out", tmp_path / "out", timeout=120)
    assert_input_error(result, str(directory / "RELEASE_v1.txt"), "not found",
                       "NodePropPredDataset")
    assert "y/N" not in result.stdout + result.stderr
    assert not list(tmp_path.glob("out*"))   # no store, no temp directory left


@pytest.mark.parametrize("missing", ["raw/node-feat.csv.gz", "split/time/valid.csv.gz"])
def test_missing_files_are_named(tmp_path, capsys, missing):
    directory = ogbn_csv_dataset(tmp_path / "ogb", tiny_graph(), "ogbn-arxiv")
    (directory / missing).unlink()
    assert main(["prepare", "ogb", "--name", "ogbn-arxiv", "--root", str(tmp_path / "ogb"),
                 "--out", str(tmp_path / "out")]) == 2
    assert f"{directory / missing}: not found" in capsys.readouterr().err


def test_edge_ids_out_of_range_are_rejected(tmp_path, capsys):
    graph = tiny_graph()
    graph.dst[5] = graph.num_nodes
    directory = ogbn_csv_dataset(tmp_path / "ogb", graph, "ogbn-arxiv")
    assert main(["prepare", "ogb", "--name", "ogbn-arxiv", "--root", str(tmp_path / "ogb"),
                 "--out", str(tmp_path / "out")]) == 2
    assert str(directory / "raw" / "edge.csv.gz") in capsys.readouterr().err
    assert not list(tmp_path.glob("out*"))   # no store, no temp directory left


def test_edge_count_must_match_num_edge_list(tmp_path, capsys):
    graph = tiny_graph()
    directory = ogbn_csv_dataset(tmp_path / "ogb", graph, "ogbn-arxiv")
    np.savetxt(directory / "raw" / "num-edge-list.csv.gz", [[len(graph.src) + 1]], fmt="%d")
    assert main(["prepare", "ogb", "--name", "ogbn-arxiv", "--root", str(tmp_path / "ogb"),
                 "--out", str(tmp_path / "out")]) == 2
    assert f"has {len(graph.src)} edges but num-edge-list.csv.gz says" in capsys.readouterr().err
