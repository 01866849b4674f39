"""The parquet source: arbitrary int64 ids relabelled to 0..N-1, node arrays in node order."""
from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bgrl_dgl.cli import main
from bgrl_dgl.sources.parquet import sorted_unique_ids
from bgrl_dgl.store.reader import GraphStore

from helpers import assert_input_error

# Non-contiguous, unsorted, negative and beyond-int32 ids.
EDGES = [(10**12, -7), (-7, 5), (5, 10**12), (42, 5), (2**40 + 3, 42), (5, 5), (-7, 5)]
EDGE_IDS = np.unique(np.array(EDGES).ravel())


def features_of(ids: np.ndarray) -> np.ndarray:
    """[len(ids), 3] float32 rows that identify each original id (exact in float32)."""
    ids = np.asarray(ids, dtype=np.int64)
    return np.stack([ids % 997, ids % 991, (ids // 997) % 983], axis=1).astype(np.float32)


def labels_of(ids: np.ndarray) -> np.ndarray:
    return (np.asarray(ids, dtype=np.int64) % 3).astype(np.int64)


def write_edges(path: Path, edges: list[tuple[int, int]], row_group_size: int = 2,
                src_type: pa.DataType = pa.int64(), **columns) -> Path:
    src, dst = zip(*edges) if edges else ((), ())
    table = pa.table({"src": pa.array(src, src_type), "dst": pa.array(dst, pa.int64()),
                      **columns})
    pq.write_table(table, path, row_group_size=row_group_size)
    return path


def save(path: Path, array: np.ndarray) -> Path:
    np.save(path, array)
    return path


@pytest.fixture
def prepare(capsys):
    """``bgrl-dgl prepare parquet ARGS`` in this process, as a CompletedProcess."""
    def run(*args) -> subprocess.CompletedProcess:
        code = main(["prepare", "parquet", *map(str, args)])
        captured = capsys.readouterr()
        return subprocess.CompletedProcess(args, code, captured.out, captured.err)
    return run


def store_edges_as_orig_ids(store: GraphStore) -> set[tuple[int, int]]:
    indptr = np.asarray(store.indptr, dtype=np.int64)
    dst = np.repeat(np.arange(store.num_nodes), np.diff(indptr))
    orig = np.asarray(store.orig_ids)
    return set(zip(orig[np.asarray(store.indices)].tolist(), orig[dst].tolist()))


def assert_node_arrays_follow_orig_ids(store: GraphStore) -> None:
    orig = np.asarray(store.orig_ids)
    assert np.array_equal(np.asarray(store.features), features_of(orig))
    assert np.array_equal(np.asarray(store.labels), labels_of(orig))


def test_sorted_unique_ids_merges_parts():
    rng = np.random.default_rng(0)
    parts = [np.unique(rng.integers(-50, 10**6, rng.integers(1, 300))) for _ in range(40)]
    assert np.array_equal(sorted_unique_ids(iter(parts)), np.unique(np.concatenate(parts)))
    assert sorted_unique_ids(iter([])).size == 0


def test_ids_relabelled_in_sorted_order(prepare, tmp_path):
    edges = write_edges(tmp_path / "edges.parquet", EDGES)
    out = tmp_path / "store"
    result = prepare("--edges", edges, "--out", out,
                     "--features", save(tmp_path / "f.npy", features_of(EDGE_IDS)),
                     "--labels", save(tmp_path / "l.npy", labels_of(EDGE_IDS)))
    assert result.returncode == 0, result.stderr
    store = GraphStore.open(out)
    assert np.array_equal(np.asarray(store.orig_ids), EDGE_IDS)
    assert store_edges_as_orig_ids(store) == set(EDGES)  # directed, deduplicated, loop kept
    assert not store.symmetrized
    assert_node_arrays_follow_orig_ids(store)
    split_ids = np.concatenate([store.split(name) for name in ("train", "valid", "test")])
    assert np.array_equal(np.sort(split_ids), np.arange(EDGE_IDS.size))


def test_node_ids_give_the_order_and_keep_isolated_nodes(prepare, tmp_path):
    node_ids = np.array([42, 10**12, 777, -7, 2**40 + 3, 5])  # 777 has no edges
    edges = write_edges(tmp_path / "edges.parquet", EDGES)
    out = tmp_path / "store"
    result = prepare("--edges", edges, "--out", out,
                     "--node-ids", save(tmp_path / "ids.npy", node_ids),
                     "--features", save(tmp_path / "f.npy", features_of(node_ids)),
                     "--labels", save(tmp_path / "l.npy", labels_of(node_ids)))
    assert result.returncode == 0, result.stderr
    store = GraphStore.open(out)
    assert np.array_equal(np.asarray(store.orig_ids), node_ids)
    assert store_edges_as_orig_ids(store) == set(EDGES)
    assert store.in_degrees()[2] == 0
    assert_node_arrays_follow_orig_ids(store)


def test_directory_of_files_read_in_name_order(prepare, tmp_path):
    directory = tmp_path / "edges"
    directory.mkdir()
    more = [(3, 10**12), (2**40 + 3, -7), (8, 3)]
    write_edges(directory / "part-2.parquet", more[:2])
    write_edges(directory / "part-1.parquet", EDGES, row_group_size=3)
    write_edges(directory / "part-3.parquet", more[2:])
    (directory / "notes.txt").write_text("not an edge file")
    ids = np.unique(np.array(EDGES + more).ravel())
    out = tmp_path / "store"
    # A tiny budget means batches of a few edges: ids merge and relabel across many batches.
    result = prepare("--edges", directory, "--out", out, "--symmetrize",
                     "--memory-budget", "1KB",
                     "--features", save(tmp_path / "f.npy", features_of(ids)))
    assert result.returncode == 0, result.stderr
    store = GraphStore.open(out)
    assert np.array_equal(np.asarray(store.orig_ids), ids)
    both_ways = {(a, b) for a, b in EDGES + more} | {(b, a) for a, b in EDGES + more}
    assert store_edges_as_orig_ids(store) == both_ways
    assert store.labels is None and store.split_names == []


def bad_case(tmp_path: Path, case: str) -> tuple[list, str, str]:
    """Arguments for one bad input, the file the error must name, and the problem."""
    edges = write_edges(tmp_path / "edges.parquet", EDGES)
    features = save(tmp_path / "f.npy", features_of(EDGE_IDS))
    ok = ["--edges", edges, "--features", features]
    if case == "float column":
        bad = write_edges(tmp_path / "float.parquet", [(1.0, 2)], src_type=pa.float64())
        return ["--edges", bad, "--features", features], str(bad), \
            "column src must be integers, found double"
    if case == "missing column":
        return ok + ["--dst-column", "target"], str(edges), "no column target"
    if case == "null ids":
        bad = tmp_path / "nulls.parquet"
        pq.write_table(pa.table({"src": pa.array([1, 2], pa.int64()),
                                 "dst": pa.array([2, None], pa.int64())}), bad)
        return ["--edges", bad, "--features", features], str(bad), "column dst has 1 null values"
    if case == "not parquet":
        bad = tmp_path / "text.parquet"
        bad.write_text("src,dst\n1,2\n")
        return ["--edges", bad, "--features", features], str(bad), "not a readable Parquet file"
    if case == "empty directory":
        empty = tmp_path / "empty"
        empty.mkdir()
        return ["--edges", empty, "--features", features], str(empty), "contains no *.parquet files"
    if case == "repeated node id":
        ids = save(tmp_path / "ids.npy", np.array([5, -7, 5]))
        return ok + ["--node-ids", ids], str(ids), "node ids must be unique: 5 appears"
    if case == "unknown node id":
        known = EDGE_IDS[EDGE_IDS != 42]
        ids = save(tmp_path / "ids.npy", known)
        features = save(tmp_path / "known.npy", features_of(known))
        return ["--edges", edges, "--features", features, "--node-ids", ids], str(edges), \
            "node id 42, which is not in ids.npy"
    if case == "float node ids":
        ids = save(tmp_path / "ids.npy", EDGE_IDS.astype(np.float64))
        return ok + ["--node-ids", ids], str(ids), "expected a 1-D integer array"
    if case == "feature rows":
        bad = save(tmp_path / "short.npy", features_of(EDGE_IDS[:-1]))
        return ["--edges", edges, "--features", bad], str(bad), "has 4 rows, expected 5"
    if case == "1-D features":
        bad = save(tmp_path / "flat.npy", np.zeros(5, np.float32))
        return ["--edges", edges, "--features", bad], str(bad), "expected a 2-D numeric array"
    if case == "missing features file":
        absent = tmp_path / "absent.npy"
        return ["--edges", edges, "--features", absent], str(absent), "file not found"
    if case == "label count":
        labels = save(tmp_path / "labels.npy", np.zeros(6, np.int64))
        return ok + ["--labels", labels], str(labels), "has 6 rows, expected 5"
    if case == "no features":
        return ["--edges", edges], "--features", "is required"
    raise AssertionError(case)


@pytest.mark.parametrize("case", [
    "float column", "missing column", "null ids", "not parquet", "empty directory",
    "repeated node id", "unknown node id", "float node ids", "feature rows", "1-D features",
    "missing features file", "label count", "no features"])
def test_bad_input(prepare, tmp_path, case):
    args, name, problem = bad_case(tmp_path, case)
    out = tmp_path / "store"
    assert_input_error(prepare(*args, "--out", out), name, problem)
    assert not out.exists() and not list(tmp_path.glob(".tmp-*@store"))


def test_cli_reports_non_integer_column(cli, tmp_path):
    args, name, problem = bad_case(tmp_path, "float column")
    out = tmp_path / "store"
    assert_input_error(cli("prepare", "parquet", *args, "--out", out), name, problem)
    assert not out.exists() and not list(tmp_path.glob(".tmp-*@store"))
