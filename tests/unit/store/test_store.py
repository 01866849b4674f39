"""The on-disk store: writing, opening, validation, corruption, the info command, crash safety."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from bgrl_dgl.errors import InputError
from bgrl_dgl.store.format import NpyWriter
from bgrl_dgl.store.reader import GraphStore
from bgrl_dgl.store.writer import StoreWriter

from helpers import REPO, assert_input_error

NUM_NODES = 60
NUM_CLASSES = 4


class Graph:
    """A small random graph with features, labels, splits and original ids, as numpy arrays."""

    def __init__(self, num_nodes: int = NUM_NODES, num_edges: int = 400, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.num_nodes = num_nodes
        self.src = rng.integers(0, num_nodes, num_edges)
        self.dst = rng.integers(0, num_nodes, num_edges)
        self.features = rng.standard_normal((num_nodes, 5))
        self.labels = rng.integers(-1, NUM_CLASSES, num_nodes)
        ids = rng.permutation(num_nodes)
        self.splits = {"train": np.sort(ids[:30]), "valid": np.sort(ids[30:40]),
                       "test": np.sort(ids[40:])}
        self.orig_ids = rng.permutation(10 * num_nodes)[:num_nodes]

    def write(self, writer: StoreWriter, **topology) -> None:
        options = {"symmetrize": True, "self_loops": "remove", "dedup": True, **topology}
        writer.write_topology(self.num_nodes, lambda: iter([(self.src, self.dst)]),
                              source_path="edges.bin", **options)
        writer.write_feature_array(self.features, source_path="features.bin")
        writer.write_labels(self.labels, source_path="labels.bin", num_classes=NUM_CLASSES)
        for name, ids in self.splits.items():
            writer.write_split(name, ids, source_path="splits.bin")
        writer.write_orig_ids(self.orig_ids, source_path="ids.bin")


def write_store(out: Path, graph: Graph | None = None, **writer_options) -> Path:
    with StoreWriter(out, source={"name": "test", "params": {"seed": 0}},
                     **writer_options) as writer:
        (graph or Graph()).write(writer)
        return writer.commit()


@pytest.fixture
def store_dir(tmp_path) -> Path:
    return write_store(tmp_path / "store")


def expected_topology(graph: Graph) -> tuple[np.ndarray, np.ndarray]:
    """Symmetrized, loop-free, deduplicated CSC of ``graph`` by brute force."""
    adjacency = np.zeros((graph.num_nodes, graph.num_nodes), dtype=bool)
    adjacency[graph.dst, graph.src] = True
    adjacency |= adjacency.T
    np.fill_diagonal(adjacency, False)
    rows, cols = np.nonzero(adjacency)
    return np.concatenate([[0], np.cumsum(adjacency.sum(axis=1))]), cols


# ---- writing and opening ---------------------------------------------------------------------
def test_round_trip(store_dir):
    graph = Graph()
    store = GraphStore.open(store_dir, check="full")
    indptr, indices = expected_topology(graph)
    np.testing.assert_array_equal(store.indptr, indptr)
    np.testing.assert_array_equal(store.indices, indices)
    assert store.indptr.dtype == store.indices.dtype == np.int32
    assert store.features.dtype == np.float32 and store.feat_dtype == np.float32
    np.testing.assert_array_equal(store.features, graph.features.astype(np.float32))
    np.testing.assert_array_equal(store.labels, graph.labels)
    np.testing.assert_array_equal(store.orig_ids, graph.orig_ids)
    for name, ids in graph.splits.items():
        np.testing.assert_array_equal(store.split(name), ids)
        assert store.split(name).dtype == np.int64
    assert store.split_names == ["train", "valid", "test"]
    assert (store.num_nodes, store.num_edges, store.feat_dim, store.num_classes) == (
        NUM_NODES, len(indices), 5, NUM_CLASSES)
    assert store.symmetrized and store.node_types == {}
    for array in (store.indptr, store.indices, store.features, store.labels, store.split("train")):
        assert isinstance(array, np.memmap) and not array.flags.writeable
    np.testing.assert_array_equal(store.in_degrees(), np.diff(indptr))
    assert sorted(p.name for p in store_dir.parent.iterdir()) == ["store"], "no temp dirs left"


def test_meta_json_describes_every_array(store_dir):
    meta = json.loads((store_dir / "meta.json").read_text())
    assert meta["format_version"] == 1
    assert meta["flags"] == {"symmetrized": True, "self_loops": "removed", "deduplicated": True}
    assert meta["splits"] == ["train", "valid", "test"]
    assert meta["source"] == {"name": "test", "params": {"seed": 0}}
    assert set(meta["arrays"]) == {"indptr", "indices", "features", "labels", "orig_ids",
                                   "split_train", "split_valid", "split_test"}
    for name, spec in meta["arrays"].items():
        array = np.load(store_dir / spec["file"], mmap_mode="r")
        assert list(array.shape) == spec["shape"] and array.dtype.name == spec["dtype"], name
        assert (store_dir / spec["file"]).stat().st_size == spec["bytes"], name
    assert {p.name for p in store_dir.iterdir()} == {
        "meta.json", *(spec["file"] for spec in meta["arrays"].values())}


def test_summary(store_dir):
    graph = Graph()
    indptr, indices = expected_topology(graph)
    summary = GraphStore.open(store_dir).summary()
    degrees = np.diff(indptr)
    assert summary["path"] == str(store_dir)
    assert summary["num_nodes"] == NUM_NODES and summary["num_edges"] == len(indices)
    assert summary["feat_dim"] == 5 and summary["feat_dtype"] == "float32"
    assert summary["num_classes"] == NUM_CLASSES and summary["has_labels"] is True
    assert summary["splits"] == {"train": 30, "valid": 10, "test": 20}
    assert (summary["symmetrized"], summary["self_loops"], summary["deduplicated"]) == (
        True, "removed", True)
    assert summary["index_dtype"] == "int32"
    assert summary["in_degree"] == {"min": degrees.min(), "mean": degrees.mean(),
                                    "max": degrees.max()}
    assert summary["store_bytes"] == sum(p.stat().st_size for p in store_dir.iterdir())
    assert "node_types" not in summary
    json.dumps(summary)


def test_graph_is_zero_copy_csc_and_samples(store_dir):
    import dgl

    store = GraphStore.open(store_dir)
    graph = store.graph
    assert graph is store.graph
    assert graph.num_nodes() == NUM_NODES and graph.num_edges() == store.num_edges
    assert graph.formats()["created"] == ["csc"]
    indptr, indices, _ = graph.adj_tensors("csc")
    assert indptr.data_ptr() == store.indptr.ctypes.data
    assert indices.data_ptr() == store.indices.ctypes.data
    np.testing.assert_array_equal(graph.in_degrees().numpy(), store.in_degrees())
    seeds = torch.tensor([0, 5, 7], dtype=graph.idtype)
    sampled = dgl.sampling.sample_neighbors(graph, seeds, 3)
    sampled_src, sampled_dst = (t.numpy() for t in sampled.edges())
    assert set(sampled_dst) <= {0, 5, 7} and len(sampled_src) > 0
    for u, v in zip(sampled_src, sampled_dst):
        assert u in store.indices[store.indptr[v]:store.indptr[v + 1]]
    assert graph.formats()["created"] == ["csc"], "sampling materialised another format"


def test_int64_store_opens_as_int64_graph(tmp_path):
    graph = Graph()
    with StoreWriter(tmp_path / "wide") as writer:
        writer.write_topology(graph.num_nodes, lambda: iter([(graph.src, graph.dst)]),
                              source_path="edges.bin", symmetrize=False, self_loops="keep",
                              dedup=False, int32_limit=10)
        writer.write_feature_array(graph.features, source_path="features.bin")
        writer.commit()
    store = GraphStore.open(tmp_path / "wide", check="full")
    assert store.indptr.dtype == store.indices.dtype == np.int64
    assert store.graph.idtype == torch.int64 and store.num_edges == len(graph.src)
    assert store.labels is None and store.num_classes == 0 and store.split_names == []


def test_opening_a_large_store_is_cheap(tmp_path):
    import dgl  # noqa: F401 - imported up front so that only the opening is measured

    num_nodes = 10_000_000
    with StoreWriter(tmp_path / "big") as writer:
        writer.write_topology(num_nodes, lambda: iter([]), source_path="none",
                              symmetrize=False, self_loops="keep", dedup=True)
        writer.write_feature_array(np.zeros((num_nodes, 1), np.float16), source_path="zeros")
        writer.commit()
    before = anonymous_memory()
    start = time.perf_counter()
    store = GraphStore.open(tmp_path / "big")
    assert store.graph.num_nodes() == num_nodes
    assert time.perf_counter() - start < 1.0
    assert anonymous_memory() - before < 100 << 20


def anonymous_memory() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    pytest.skip("no RssAnon in /proc/self/status")


def test_node_types_recorded(tmp_path):
    graph = Graph()
    with StoreWriter(tmp_path / "typed") as writer:
        graph.write(writer)
        writer.set_node_types({"paper": (0, 40), "author": (40, 60)})
        writer.commit()
    store = GraphStore.open(tmp_path / "typed")
    assert store.node_types == {"paper": (0, 40), "author": (40, 60)}
    assert store.summary()["node_types"] == {"paper": [0, 40], "author": [40, 60]}


def test_missing_split_is_an_input_error(store_dir):
    with pytest.raises(InputError, match="no split named 'extra' .available: train, valid, test"):
        GraphStore.open(store_dir).split("extra")


# ---- features, labels, splits --------------------------------------------------------------
@pytest.mark.parametrize("given, requested, stored", [
    (np.float64, "keep", np.float32), (np.float16, "keep", np.float16),
    (np.float32, "float16", np.float16), (np.int64, "keep", np.float32),
    (np.bool_, "keep", np.float32), (np.float16, "float32", np.float32),
])
def test_feature_dtypes(tmp_path, given, requested, stored):
    graph = Graph()
    graph.features = (graph.features > 0).astype(given)
    store = GraphStore.open(write_store(tmp_path / "s", graph, feature_dtype=requested))
    assert store.features.dtype == stored and store.feat_dtype == stored
    np.testing.assert_array_equal(store.features, graph.features.astype(stored))


def test_features_stream_in_row_chunks(tmp_path):
    graph = Graph()
    with StoreWriter(tmp_path / "s", memory_budget=1 << 10) as writer:
        assert writer.rows_per_chunk(5 * 8) < NUM_NODES // 2
        graph.write(writer)
        writer.commit()
    np.testing.assert_array_equal(GraphStore.open(tmp_path / "s").features,
                                  graph.features.astype(np.float32))


def write_with(tmp_path: Path, change) -> None:
    graph = Graph()
    with StoreWriter(tmp_path / "out") as writer:
        change(graph, writer)
        graph.write(writer)
        writer.commit()


@pytest.mark.parametrize("change, path, problem", [
    (lambda g, w: g.features.__setitem__((17, 2), np.nan), "features.bin",
     "non-finite feature value in row 17"),
    (lambda g, w: g.features.__setitem__((3, 0), np.inf), "features.bin",
     "non-finite feature value in row 3"),
    (lambda g, w: setattr(g, "features", g.features[:-1]), "features.bin",
     "59 feature rows given for a graph of 60 nodes"),
    (lambda g, w: setattr(g, "features", g.features.astype(complex)), "features.bin",
     "features must be numeric"),
    (lambda g, w: g.labels.__setitem__(5, NUM_CLASSES), "labels.bin",
     "label 4 is out of range for 4 classes"),
    (lambda g, w: g.labels.__setitem__(5, -2), "labels.bin", "label -2 is below -1"),
    (lambda g, w: setattr(g, "labels", g.labels.astype(float)), "labels.bin",
     "labels must be integers, got float64"),
    (lambda g, w: g.splits["train"].__setitem__(0, NUM_NODES), "splits.bin",
     "split 'train' holds node id 60, outside [0, 60)"),
    (lambda g, w: setattr(g, "orig_ids", g.orig_ids[:10]), "ids.bin",
     "10 original node ids given for a graph of 60 nodes"),
])
def test_bad_node_arrays(tmp_path, change, path, problem):
    with pytest.raises(InputError) as caught:
        write_with(tmp_path, change)
    assert caught.value.path == path and problem in caught.value.problem
    assert list(tmp_path.iterdir()) == [], "the temp dir is removed after a failure"


def test_float16_overflow_is_rejected(tmp_path):
    graph = Graph()
    graph.features[9, 1] = 1e6
    with pytest.raises(InputError,
                       match="features.bin: feature value too large for float16 in row 9"):
        write_store(tmp_path / "s", graph, feature_dtype="float16")


def test_features_are_required(tmp_path):
    graph = Graph()
    with pytest.raises(InputError, match="the source wrote no node features"):
        with StoreWriter(tmp_path / "s") as writer:
            writer.write_topology(graph.num_nodes, lambda: iter([(graph.src, graph.dst)]),
                                  source_path="edges.bin", symmetrize=False, self_loops="keep",
                                  dedup=True)
            writer.commit()
    assert list(tmp_path.iterdir()) == []


# ---- corruption ----------------------------------------------------------------------------
def edit_meta(store_dir: Path, edit) -> None:
    meta = json.loads((store_dir / "meta.json").read_text())
    edit(meta)
    (store_dir / "meta.json").write_text(json.dumps(meta))


def truncate(path: Path, size: int) -> None:
    with open(path, "r+b") as handle:
        handle.truncate(size)


def poke(path: Path, index: int, value: int) -> None:
    array = np.load(path, mmap_mode="r+")
    array[index] = value
    array.flush()


def unsort_first_long_list(store_dir: Path) -> None:
    store = GraphStore.open(store_dir)
    node = int(np.flatnonzero(store.in_degrees() >= 2)[0])
    first = int(store.indptr[node])
    pair = store.indices[first:first + 2][::-1].copy()
    del store
    indices = np.load(store_dir / "indices.npy", mmap_mode="r+")
    indices[first:first + 2] = pair
    indices.flush()


CHEAP_CORRUPTIONS = {
    "unknown version": (lambda d: edit_meta(d, lambda m: m.update(format_version=7)),
                        "meta.json", "unknown format version 7"),
    "bad json": (lambda d: (d / "meta.json").write_text("{"), "meta.json", "not valid JSON"),
    "no meta": (lambda d: (d / "meta.json").unlink(), "meta.json", "not a graph store"),
    "missing key": (lambda d: edit_meta(d, lambda m: m.pop("num_edges")), "meta.json",
                    "missing key 'num_edges'"),
    "bad dtype": (lambda d: edit_meta(d, lambda m: m.update(feat_dtype="float64")), "meta.json",
                  "'feat_dtype' must be one of float16, float32"),
    "missing file": (lambda d: (d / "indices.npy").unlink(), "indices.npy", "missing"),
    "truncated features": (lambda d: truncate(d / "features.npy", 1000), "features.npy",
                           "truncated (expected 1328 bytes, found 1000)"),
    "not npy": (lambda d: (d / "labels.npy").write_bytes(b"x" * 608), "labels.npy",
                "not a valid .npy file"),
    "wrong shape": (lambda d: np.save(d / "orig_ids.npy", np.zeros(NUM_NODES - 12, np.int64)),
                    "orig_ids.npy", "holds int64 [48], but meta.json says int64 [60]"),
    "indptr end": (lambda d: poke(d / "indptr.npy", -1, 3), "indptr.npy",
                   "ends at 3, expected num_edges"),
    "indptr start": (lambda d: poke(d / "indptr.npy", 0, 1), "indptr.npy", "starts at 1"),
    "unlisted split": (lambda d: edit_meta(d, lambda m: m["splits"].append("extra")),
                       "meta.json", "arrays table lacks 'split_extra'"),
}


def truncated_with_matching_meta(store_dir: Path) -> None:
    truncate(store_dir / "indices.npy", 200)
    edit_meta(store_dir, lambda m: m["arrays"]["indices"].update(bytes=200))


CHEAP_CORRUPTIONS["truncated, meta agrees"] = (truncated_with_matching_meta, "indices.npy",
                                               "truncated (expected")

FULL_CORRUPTIONS = {
    "indptr order": (lambda d: poke(d / "indptr.npy", 17, 10**6), "indptr.npy",
                     "not monotone at node 17"),
    "index range": (lambda d: poke(d / "indices.npy", 11, NUM_NODES), "indices.npy",
                    "entry 11 is 60, outside [0, 60)"),
    "unsorted": (unsort_first_long_list, "indices.npy", "are not sorted"),
    "label range": (lambda d: poke(d / "labels.npy", 8, 9), "labels.npy",
                    "label 9 of node 8 is outside [-1, 4)"),
    "split range": (lambda d: poke(d / "split_test.npy", 2, -1), "split_test.npy",
                    "entry 2 is node id -1, outside [0, 60)"),
}


@pytest.mark.parametrize("corruption", CHEAP_CORRUPTIONS)
def test_cheap_check_names_the_bad_file(store_dir, corruption):
    corrupt, file, problem = CHEAP_CORRUPTIONS[corruption]
    corrupt(store_dir)
    with pytest.raises(InputError) as caught:
        GraphStore.open(store_dir)
    assert caught.value.path == str(store_dir / file)
    assert problem in caught.value.problem


@pytest.mark.parametrize("corruption", FULL_CORRUPTIONS)
def test_full_check_names_the_bad_file(store_dir, corruption):
    corrupt, file, problem = FULL_CORRUPTIONS[corruption]
    corrupt(store_dir)
    GraphStore.open(store_dir, check="cheap")
    with pytest.raises(InputError) as caught:
        GraphStore.open(store_dir, check="full")
    assert caught.value.path == str(store_dir / file)
    assert problem in caught.value.problem


def test_repeated_neighbour_breaks_a_deduplicated_store(store_dir):
    store = GraphStore.open(store_dir)
    node = int(np.flatnonzero(store.in_degrees() >= 2)[0])
    first = int(store.indptr[node])
    poke(store_dir / "indices.npy", first + 1, int(store.indices[first]))
    with pytest.raises(InputError, match=f"in-neighbours of node {node} are repeated"):
        GraphStore.open(store_dir, check="full")


def test_npy_writer_fills_in_the_header_last(tmp_path):
    writer = NpyWriter(tmp_path / "rows.npy", np.float32, (3,))
    for start in range(0, 12, 5):
        writer.append(np.arange(start * 3, min(start + 5, 12) * 3).reshape(-1, 3))
    entry = writer.close()
    loaded = np.load(tmp_path / "rows.npy", mmap_mode="r")
    np.testing.assert_array_equal(loaded, np.arange(36, dtype=np.float32).reshape(12, 3))
    assert entry == {"file": "rows.npy", "shape": [12, 3], "dtype": "float32",
                     "bytes": (tmp_path / "rows.npy").stat().st_size}


# ---- the info command ----------------------------------------------------------------------
def test_info_json(cli, store_dir):
    result = cli("info", store_dir, "--json", timeout=120)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary == json.loads(json.dumps(GraphStore.open(store_dir).summary()))


def test_info_full_reports_corruption(cli, store_dir):
    poke(store_dir / "indptr.npy", 17, 10**6)
    assert_input_error(cli("info", store_dir, "--full", timeout=120),
                       str(store_dir / "indptr.npy"), "not monotone at node 17")


# ---- crash safety and overwriting ----------------------------------------------------------
SLOW_WRITER = textwrap.dedent("""
    import sys, time
    import numpy as np
    from bgrl_dgl.store.writer import StoreWriter

    def chunks():
        yield np.array([0, 1]), np.array([1, 2])
        print("writing", flush=True)
        time.sleep(60)
        yield np.array([2]), np.array([0])

    with StoreWriter(sys.argv[1]) as writer:
        writer.write_topology(3, chunks, source_path="slow", symmetrize=False,
                              self_loops="keep", dedup=True)
        writer.write_feature_array(np.ones((3, 2)), source_path="ones")
        writer.commit()
""")


def test_killed_writer_leaves_no_store_and_does_not_block_a_rerun(tmp_path):
    out = tmp_path / "store"
    script = tmp_path / "slow_writer.py"
    script.write_text(SLOW_WRITER)
    process = subprocess.Popen([sys.executable, str(script), str(out)], cwd=REPO,
                               stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout.readline().strip() == "writing"
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        process.kill()
        process.stdout.close()
    leftovers = list(tmp_path.glob(".tmp-*@store"))
    assert not out.exists() and len(leftovers) == 1
    assert not (leftovers[0] / "meta.json").exists()
    with pytest.raises(InputError):
        GraphStore.open(leftovers[0])

    write_store(out)
    GraphStore.open(out, check="full")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["slow_writer.py", "store"]


def test_temp_dir_of_a_live_writer_is_left_alone(tmp_path):
    other = tmp_path / f".tmp-{os.getppid()}@{socket.gethostname()}@store"
    other.mkdir()
    write_store(tmp_path / "store")
    assert other.exists()


def test_existing_store_is_refused_before_any_work(store_dir):
    before = (store_dir / "meta.json").read_text()

    def never_read():
        raise AssertionError("the edges were read")

    with pytest.raises(InputError) as caught:
        with StoreWriter(store_dir) as writer:
            writer.write_topology(3, never_read, source_path="x", symmetrize=False,
                                  self_loops="keep", dedup=True)
    assert caught.value.path == str(store_dir)
    assert caught.value.problem == "already exists; pass --overwrite to replace it"
    assert (store_dir / "meta.json").read_text() == before
    assert sorted(p.name for p in store_dir.parent.iterdir()) == ["store"]


def test_overwrite_replaces_only_at_commit(store_dir):
    smaller = Graph(num_edges=50, seed=7)
    with pytest.raises(RuntimeError, match="source broke"):
        with StoreWriter(store_dir, overwrite=True) as writer:
            smaller.write(writer)
            raise RuntimeError("source broke")
    old = GraphStore.open(store_dir, check="full")
    np.testing.assert_array_equal(old.indices, expected_topology(Graph())[1])

    write_store(store_dir, smaller, overwrite=True)
    new = GraphStore.open(store_dir, check="full")
    np.testing.assert_array_equal(new.indices, expected_topology(smaller)[1])
    assert sorted(p.name for p in store_dir.parent.iterdir()) == ["store"]


def test_overwrite_never_replaces_a_non_store(tmp_path):
    precious = tmp_path / "home"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    with pytest.raises(InputError, match="exists and is not a graph store"):
        StoreWriter(precious, overwrite=True)
    assert (precious / "notes.txt").read_text() == "keep me"
