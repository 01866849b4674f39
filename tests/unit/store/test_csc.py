"""The streaming CSC builder against scipy on random graphs, and its input checks."""
from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp

from bgrl_dgl.errors import InputError
from bgrl_dgl.store.csc import BatchSizes, build_csc, prefetched, rebatch

SOURCE = "edges.csv"


def random_edges(num_nodes: int, num_edges: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Random (src, dst) int64 edges with plenty of duplicates and self-loops."""
    rng = np.random.default_rng(seed)
    src = rng.integers(0, num_nodes, num_edges)
    dst = rng.integers(0, num_nodes, num_edges)
    loops = rng.random(num_edges) < 0.05
    src[loops] = dst[loops]
    repeat = rng.integers(0, num_edges, num_edges // 10)
    src[: len(repeat)], dst[: len(repeat)] = src[repeat], dst[repeat]
    return src, dst


def reference_csc(num_nodes: int, src: np.ndarray, dst: np.ndarray, *, symmetrize: bool,
                  self_loops: str, dedup: bool) -> tuple[np.ndarray, np.ndarray]:
    """(indptr, indices) via scipy: a count matrix with rows = destinations."""
    shape = (num_nodes, num_nodes)
    counts = sp.csr_matrix((np.ones(len(src), np.int64), (dst, src)), shape=shape)
    if symmetrize:
        off = src != dst  # a self-loop is its own reverse
        counts = counts + sp.csr_matrix((np.ones(off.sum(), np.int64), (src[off], dst[off])),
                                        shape=shape)
    counts = counts.tolil()
    if self_loops != "keep":
        counts.setdiag(0)
    counts = counts.tocsr()
    counts.eliminate_zeros()
    if dedup:
        counts.data[:] = 1
    if self_loops == "add":
        counts = counts.tolil()
        counts.setdiag(1)
        counts = counts.tocsr()
    counts.sort_indices()
    degrees = np.asarray(counts.sum(axis=1)).ravel()
    return (np.concatenate([[0], np.cumsum(degrees)]),
            np.repeat(counts.indices, counts.data.astype(np.int64)))


def uneven_chunks(src: np.ndarray, dst: np.ndarray, seed: int = 0):
    """A callable yielding (src, dst) in chunks of random sizes, including empty ones."""
    cuts = np.sort(np.random.default_rng(seed).integers(0, len(src), 12))
    bounds = [0, *cuts.tolist(), len(src)]

    def chunks():
        for start, stop in zip(bounds[:-1], bounds[1:]):
            yield src[start:stop], dst[start:stop]
    return chunks


def build(tmp_path: Path, num_nodes: int, chunks, *, symmetrize: bool = False,
          self_loops: str = "keep", dedup: bool = True, memory_budget: int = 1 << 30,
          **kwargs):
    files = build_csc(chunks, num_nodes, tmp_path, source_path=SOURCE, symmetrize=symmetrize,
                      self_loops=self_loops, dedup=dedup, memory_budget=memory_budget, **kwargs)
    indptr = np.load(tmp_path / "indptr.npy")
    indices = np.load(tmp_path / "indices.npy")
    return files, indptr, indices


@pytest.mark.parametrize("symmetrize", [False, True])
@pytest.mark.parametrize("self_loops", ["keep", "remove", "add"])
@pytest.mark.parametrize("dedup", [False, True])
@pytest.mark.parametrize("memory_budget", [1, 1 << 30], ids=["tiny-budget", "1GB"])
def test_matches_scipy(tmp_path, symmetrize, self_loops, dedup, memory_budget):
    num_nodes = 3000
    src, dst = random_edges(num_nodes, 40_000, seed=1)
    options = dict(symmetrize=symmetrize, self_loops=self_loops, dedup=dedup)
    files, indptr, indices = build(tmp_path, num_nodes, uneven_chunks(src, dst),
                                   memory_budget=memory_budget, **options)
    want_indptr, want_indices = reference_csc(num_nodes, src, dst, **options)
    np.testing.assert_array_equal(indptr, want_indptr)
    np.testing.assert_array_equal(indices, want_indices)
    assert files.num_edges == len(want_indices)
    assert indptr.dtype == indices.dtype == files.index_dtype == np.int32
    assert sorted(tmp_path.iterdir()) == [tmp_path / "indices.npy", tmp_path / "indptr.npy"]


def test_tiny_budget_forces_many_batches_and_pieces():
    sizes = BatchSizes.for_budget(1, np.dtype(np.int32))
    # test_matches_scipy streams 40k edges: about ten batches and dozens of sort pieces.
    assert 40_000 >= 8 * sizes.batch_edges and 40_000 >= 30 * sizes.piece_items
    assert BatchSizes.for_budget(4 << 30, np.dtype(np.int32)).piece_items > sizes.piece_items


@pytest.mark.parametrize("dtype", [np.uint16, np.int32, np.uint64])
def test_accepts_any_integer_dtype(tmp_path, dtype):
    src, dst = random_edges(500, 2000, seed=2)
    files, indptr, indices = build(tmp_path, 500, lambda: iter([(src.astype(dtype),
                                                                 dst.astype(dtype))]))
    want_indptr, want_indices = reference_csc(500, src, dst, symmetrize=False,
                                              self_loops="keep", dedup=True)
    np.testing.assert_array_equal(indptr, want_indptr)
    np.testing.assert_array_equal(indices, want_indices)


def test_index_dtype_follows_the_final_edge_count(tmp_path):
    # 4000 input edges over 40 nodes collapse to at most 40 * 40 distinct pairs.
    src, dst = random_edges(40, 4000, seed=3)
    want_indptr, want_indices = reference_csc(40, src, dst, symmetrize=False,
                                              self_loops="keep", dedup=True)
    cases = {"default": (2**31, np.int32),
             "recast after dedup": (len(want_indices) + 1, np.int32),
             "edges reach the limit": (len(want_indices), np.int64),
             "nodes reach the limit": (40, np.int64)}
    for name, (limit, dtype) in cases.items():
        out = tmp_path / name.replace(" ", "-")
        out.mkdir()
        files, indptr, indices = build(out, 40, lambda: iter([(src, dst)]), int32_limit=limit)
        assert files.index_dtype == indptr.dtype == indices.dtype == dtype, name
        assert files.arrays["indices"]["dtype"] == np.dtype(dtype).name
        assert files.arrays["indices"]["bytes"] == (out / "indices.npy").stat().st_size
        np.testing.assert_array_equal(indptr, want_indptr)
        np.testing.assert_array_equal(indices, want_indices)
        assert sorted(p.name for p in out.iterdir()) == ["indices.npy", "indptr.npy"]


def test_graph_without_edges(tmp_path):
    files, indptr, indices = build(tmp_path, 5, lambda: iter([]))
    assert files.num_edges == 0 and indices.shape == (0,)
    np.testing.assert_array_equal(indptr, np.zeros(6))


def test_add_self_loops_without_edges(tmp_path):
    empty = np.empty(0, np.int64)
    _, indptr, indices = build(tmp_path, 4, lambda: iter([(empty, empty)]), self_loops="add")
    np.testing.assert_array_equal(indptr, np.arange(5))
    np.testing.assert_array_equal(indices, np.arange(4))


@pytest.mark.parametrize("src, dst, problem", [
    (np.array([0.0, 1.0]), np.array([1, 2]), "edge ids must be integers, got float64"),
    (np.array([0, 1]), np.array([True, False]), "edge ids must be integers, got bool"),
    (np.array([0, 1, 2]), np.array([1, 2]), "edge chunk has 3 sources but 2 destinations"),
    (np.array([[0, 1]]), np.array([[1, 2]]), "edge id arrays must be 1-D"),
    (np.array([0, -3]), np.array([1, 2]), "negative node id -3"),
    (np.array([0, 1]), np.array([1, 10]), "node id 10 in the edges is out of range for 10 nodes"),
    (np.array([0, 1], np.uint64), np.array([2**63 + 5, 2], np.uint64), "out of range"),
])
def test_bad_edge_chunks(tmp_path, src, dst, problem):
    good = (np.array([0, 1]), np.array([1, 2]))
    with pytest.raises(InputError) as caught:
        build(tmp_path, 10, lambda: iter([good, (src, dst)]))
    assert caught.value.path == SOURCE
    assert problem in caught.value.problem
    assert not any(tmp_path.iterdir()), "temp run files are removed after a failure"


def test_source_errors_pass_through_the_prefetch_thread(tmp_path):
    def chunks():
        yield np.array([0, 1]), np.array([1, 2])
        raise InputError("input.bin", "unexpected end of file")

    with pytest.raises(InputError, match="input.bin: unexpected end of file"):
        build(tmp_path, 10, chunks)


def test_rebatch_regroups_without_losing_edges():
    sizes = [3, 0, 10, 1, 1, 25, 2]
    chunks = []
    start = 0
    for size in sizes:
        ids = np.arange(start, start + size)
        chunks.append((ids, -ids))
        start += size
    batches = list(rebatch(iter(chunks), batch_edges=7))
    assert [len(src) for src, _ in batches] == [7] * 6
    np.testing.assert_array_equal(np.concatenate([src for src, _ in batches]), np.arange(42))
    np.testing.assert_array_equal(np.concatenate([dst for _, dst in batches]), -np.arange(42))


def test_prefetched_yields_everything_in_order():
    assert list(prefetched(iter(range(100)), depth=3)) == list(range(100))


def test_prefetched_stops_its_thread_when_abandoned():
    closed = threading.Event()

    def endless():
        try:
            n = 0
            while True:
                yield n
                n += 1
        finally:
            closed.set()

    before = threading.active_count()
    stream = prefetched(endless())
    assert next(stream) == 0
    stream.close()
    assert closed.wait(5)
    assert threading.active_count() == before
