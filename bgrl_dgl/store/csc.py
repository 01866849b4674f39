"""Edge stream -> CSC topology files (indptr.npy, indices.npy) in bounded memory.

The input is any number of (src, dst) chunks; nothing proportional to the edge count is
ever held in memory. Two phases:

1. Partition. Chunks are validated (in a background thread, overlapping the source's own
   reading) and regrouped into batches sized by the memory budget. Each batch, and its
   reverse when symmetrizing, is counting-sorted by destination *bucket* (2**shift
   consecutive node ids) and appended to two flat temp files as one *run* whose buckets lie
   contiguously, so any range of buckets can be read back with one slice per run.
2. Sort. Consecutive buckets are grouped into pieces of whole nodes that fit the budget.
   Each piece is read back, stripped of self-loops if asked, counting-sorted by destination
   node, sorted within each node (and deduplicated, and given self-loops, if asked) and
   appended to indices.npy, with the matching stretch of indptr.

The counting sorts and per-node sorts are scipy's compiled CSR kernels, which run in linear
time (plus a sort of each short neighbour list) instead of a comparison sort of all edges.
"""
from __future__ import annotations

import os
import queue
import threading
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Literal, TypeVar

import numpy as np

# The public sparse constructors always merge duplicate entries and copy their inputs; the
# kernels underneath group, sort and merge in place, and carry an arbitrary payload.
from scipy.sparse import _sparsetools

from bgrl_dgl.errors import InputError
from bgrl_dgl.progress import progress_bar
from bgrl_dgl.store.format import INT32_LIMIT, SCAN_CHUNK, NpyWriter

EdgeChunks = Callable[[], Iterable[tuple[np.ndarray, np.ndarray]]]
SelfLoops = Literal["keep", "remove", "add"]
T = TypeVar("T")

# At most 2**BUCKET_BITS buckets: fine enough to cut pieces of whole nodes anywhere, coarse
# enough that the per-bucket write cursors of the partition pass stay in cache.
BUCKET_BITS = 14
# Working bytes per input edge while partitioning a batch (int32 ids: the chunks being
# joined into a batch, the batch, bucket ids, grouped copies, a loop-free reverse).
PARTITION_BYTES_PER_EDGE = 48
# Working bytes per stored edge while sorting a piece (int32 ids).
SORT_BYTES_PER_ITEM = 24
MIN_BATCH_EDGES, MAX_BATCH_EDGES = 1 << 12, 1 << 27
# Pieces beyond a few million edges stop fitting in cache and sort more slowly.
MIN_PIECE_ITEMS, MAX_PIECE_ITEMS = 1 << 10, 1 << 22
SORT_THREADS = min(2, os.cpu_count() or 1)


def node_id_dtype(num_nodes: int) -> np.dtype:
    """The narrowest integer type holding every node id."""
    return np.dtype(np.int32 if num_nodes <= INT32_LIMIT else np.int64)


@dataclass(frozen=True)
class BatchSizes:
    """How many input edges to partition at once and how many edges to sort at once."""

    batch_edges: int
    piece_items: int

    @classmethod
    def for_budget(cls, memory_budget: int, id_dtype: np.dtype) -> "BatchSizes":
        """Each phase gets a quarter of the budget; the rest covers the input chunks in flight.

        The sort phase shares its quarter among the pieces in flight (one per thread, plus
        the one being written).
        """
        scale = id_dtype.itemsize // 4
        batch = memory_budget // 4 // (PARTITION_BYTES_PER_EDGE * scale)
        piece = memory_budget // 4 // (SORT_THREADS + 1) // (SORT_BYTES_PER_ITEM * scale)
        return cls(int(np.clip(batch, MIN_BATCH_EDGES, MAX_BATCH_EDGES)),
                   int(np.clip(piece, MIN_PIECE_ITEMS, MAX_PIECE_ITEMS)))


@dataclass(frozen=True)
class CscFiles:
    """What :func:`build_csc` wrote: the edge count, index dtype and meta.json array entries."""

    num_edges: int
    index_dtype: np.dtype
    arrays: dict[str, dict[str, Any]]


def checked_edges(src: Any, dst: Any, num_nodes: int, source_path: str,
                  id_dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """Validate one chunk of edges and convert both [k] arrays to ``id_dtype``."""
    src, dst = np.asarray(src), np.asarray(dst)
    for ids in (src, dst):
        if ids.dtype.kind not in "iu":
            raise InputError(source_path, f"edge ids must be integers, got {ids.dtype}")
    if src.ndim != 1 or dst.ndim != 1:
        raise InputError(source_path, f"edge id arrays must be 1-D, got shapes "
                         f"{src.shape} and {dst.shape}")
    if len(src) != len(dst):
        raise InputError(source_path, f"edge chunk has {len(src)} sources but "
                         f"{len(dst)} destinations")
    if len(src) and max(_unsigned_max(src), _unsigned_max(dst)) >= num_nodes:
        low = min(src.min(), dst.min())
        if low < 0:
            raise InputError(source_path, f"negative node id {low} in the edges")
        raise InputError(source_path, f"node id {max(src.max(), dst.max())} in the edges is "
                         f"out of range for {num_nodes} nodes")
    return src.astype(id_dtype, copy=False), dst.astype(id_dtype, copy=False)


def _unsigned_max(ids: np.ndarray) -> int:
    """max(ids) read as unsigned, so one pass also catches negative ids (they wrap high)."""
    native = ids if ids.dtype.isnative else ids.astype(ids.dtype.newbyteorder("="))
    return int(native.view(f"u{native.dtype.itemsize}").max())


def prefetched(items: Iterable[T], depth: int = 1) -> Iterator[T]:
    """Iterate ``items`` in a background thread that keeps up to ``depth`` items ready.

    Lets the source read or generate the next chunk while this thread processes the current
    one. Exceptions from ``items`` are re-raised here; leaving the loop early stops the thread.
    """
    ready: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(message: tuple[str, Any]) -> bool:
        while not stop.is_set():
            try:
                ready.put(message, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        iterator = iter(items)
        try:
            for item in iterator:
                if not put(("item", item)):
                    return
            put(("done", None))
        except BaseException as err:  # noqa: BLE001 - re-raised in the consuming thread
            put(("error", err))
        finally:
            close = getattr(iterator, "close", None)
            if close is not None:
                close()

    thread = threading.Thread(target=produce, name="edge-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            kind, value = ready.get()
            if kind == "done":
                return
            if kind == "error":
                raise value
            yield value
    finally:
        stop.set()
        thread.join()


def rebatch(chunks: Iterable[tuple[np.ndarray, np.ndarray]],
            batch_edges: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Regroup (src, dst) chunks of any sizes into batches of ``batch_edges`` (last: fewer)."""
    pending: list[tuple[np.ndarray, np.ndarray]] = []
    size = 0
    for src, dst in chunks:
        pending.append((src, dst))
        size += len(src)
        if size < batch_edges:
            continue
        src_all, dst_all = _concatenate(pending)
        full = size - size % batch_edges
        for start in range(0, full, batch_edges):
            yield src_all[start:start + batch_edges], dst_all[start:start + batch_edges]
        pending = [(src_all[full:], dst_all[full:])] if full < size else []
        size -= full
    if size:
        yield _concatenate(pending)


def _concatenate(pairs: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    if len(pairs) == 1:
        return pairs[0]
    return np.concatenate([p[0] for p in pairs]), np.concatenate([p[1] for p in pairs])


def directed_runs(src: np.ndarray, dst: np.ndarray, *, symmetrize: bool,
                  self_loops: SelfLoops) -> list[tuple[np.ndarray, np.ndarray]]:
    """The (src, dst) edge lists to store for one batch of input edges.

    With ``symmetrize`` the reversed batch follows the batch itself. A self-loop is its own
    reverse, so it is not repeated when self-loops are kept; otherwise self-loops are
    dropped later, when sorting.
    """
    if not symmetrize:
        return [(src, dst)]
    if self_loops == "keep":
        not_loop = src != dst
        if not not_loop.all():
            return [(src, dst), (dst[not_loop], src[not_loop])]
    return [(src, dst), (dst, src)]


class BucketRuns:
    """Edges spilled to two temp files in runs, each run grouped by destination bucket."""

    def __init__(self, work_dir: Path, num_nodes: int) -> None:
        self.num_nodes = num_nodes
        self.dtype = node_id_dtype(num_nodes)
        self.shift = max(0, (num_nodes - 1).bit_length() - BUCKET_BITS)
        self.num_buckets = max(1, -(-num_nodes >> self.shift))
        self.bucket_items = np.zeros(self.num_buckets, dtype=np.int64)
        self.total = 0
        self._paths = (work_dir / "edges-src.tmp", work_dir / "edges-dst.tmp")
        self._files = [open(path, "wb") for path in self._paths]
        self._run_starts: list[np.ndarray] = []  # per run: [num_buckets + 1] file positions
        self._maps: tuple[np.ndarray, np.ndarray] | None = None

    def add(self, src: np.ndarray, dst: np.ndarray) -> None:
        """Append one run: edges (src, dst), [k] each, grouped by destination bucket."""
        count = len(src)
        if count == 0:
            return
        offsets = np.empty(self.num_buckets + 1, dtype=self.dtype)
        grouped_src = np.empty(count, dtype=self.dtype)
        grouped_dst = np.empty(count, dtype=self.dtype)
        _sparsetools.coo_tocsr(self.num_buckets, self.num_nodes, count, dst >> self.shift, src,
                               dst, offsets, grouped_src, grouped_dst)
        for file, column in zip(self._files, (grouped_src, grouped_dst)):
            file.write(column)
        self._run_starts.append(self.total + offsets.astype(np.int64))
        self.bucket_items += np.diff(offsets)
        self.total += count

    def finish(self) -> None:
        """Close the files and map them for reading."""
        for file in self._files:
            file.close()
        if self.total:
            src_map, dst_map = (np.memmap(path, dtype=self.dtype, mode="r") for path in self._paths)
            self._maps = (src_map, dst_map)

    def remove(self) -> None:
        for file in self._files:
            file.close()
        self._maps = None
        for path in self._paths:
            path.unlink(missing_ok=True)

    def bucket_nodes(self, first: int, stop: int) -> tuple[int, int]:
        """The node range [lo, hi) of buckets [first, stop)."""
        return first << self.shift, min(stop << self.shift, self.num_nodes)

    def piece_bounds(self, max_items: int, extra_per_node: int) -> np.ndarray:
        """Bucket boundaries cutting all buckets into pieces of about ``max_items`` edges.

        ``extra_per_node`` counts edges added per node later (self-loops). A piece exceeds
        ``max_items`` only by part of one bucket, or when one bucket alone does.
        """
        widths = np.full(self.num_buckets, 1 << self.shift, dtype=np.int64)
        widths[-1] = self.num_nodes - ((self.num_buckets - 1) << self.shift)
        cumulative = np.cumsum(self.bucket_items + extra_per_node * widths)
        targets = np.arange(max_items, cumulative[-1], max_items)
        cuts = np.unique(np.searchsorted(cumulative, targets, side="right"))
        cuts = cuts[(cuts > 0) & (cuts < self.num_buckets)]
        return np.concatenate([[0], cuts, [self.num_buckets]])

    def read(self, first: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        """All edges (src, dst) with destinations in buckets [first, stop), [k] each."""
        if self._maps is None:
            empty = np.empty(0, dtype=self.dtype)
            return empty, empty
        parts = [(int(starts[first]), int(starts[stop])) for starts in self._run_starts]
        return tuple(np.concatenate([column[a:b] for a, b in parts]) for column in self._maps)


def sorted_piece(lo: int, hi: int, src: np.ndarray, dst: np.ndarray, *, num_nodes: int,
                 self_loops: SelfLoops, dedup: bool) -> tuple[np.ndarray, np.ndarray]:
    """CSC of the nodes [lo, hi) from their in-edges (src, dst), [k] each, dst in [lo, hi).

    Returns (counts [hi - lo], neighbours [sum(counts)]): in-degrees and the concatenated
    ascending in-neighbour lists, in the dtype of ``src``.
    """
    if self_loops != "keep":
        not_loop = src != dst
        if not not_loop.all():
            src, dst = src[not_loop], dst[not_loop]
    if len(src) + (hi - lo) >= INT32_LIMIT:  # the kernels' offsets share the ids' dtype
        src, dst = src.astype(np.int64), dst.astype(np.int64)
    dtype = src.dtype
    rows = dst - dtype.type(lo)
    if self_loops == "add":
        rows = np.concatenate([rows, np.arange(hi - lo, dtype=dtype)])
        src = np.concatenate([src, np.arange(lo, hi, dtype=dtype)])
    count = len(rows)
    offsets = np.empty(hi - lo + 1, dtype=dtype)
    neighbours = np.empty(count, dtype=dtype)
    payload = np.zeros(count, dtype=np.int8)  # the kernels move a value with every entry
    _sparsetools.coo_tocsr(hi - lo, num_nodes, count, rows, src, payload, offsets, neighbours,
                           payload.copy())
    _sparsetools.csr_sort_indices(hi - lo, offsets, neighbours, payload)
    if dedup:
        _sparsetools.csr_sum_duplicates(hi - lo, num_nodes, offsets, neighbours, payload)
    return np.diff(offsets), neighbours[:offsets[-1]]


def choose_index_dtype(num_nodes: int, num_edges: int, int32_limit: int) -> np.dtype:
    return np.dtype(np.int32 if max(num_nodes, num_edges) < int32_limit else np.int64)


def build_csc(edge_chunks: EdgeChunks, num_nodes: int, out_dir: Path, *, source_path: str,
              symmetrize: bool, self_loops: SelfLoops, dedup: bool, memory_budget: int,
              int32_limit: int = INT32_LIMIT) -> CscFiles:
    """Write ``out_dir/indptr.npy`` and ``out_dir/indices.npy`` from a stream of edges.

    ``edge_chunks()`` yields (src, dst) pairs of [k] integer arrays with ids in
    [0, num_nodes); it is read once. ``self_loops``: "keep" as given, "remove" all, or
    "add" exactly one per node (replacing any given). Neighbour lists end ascending; with
    ``dedup`` each (src, dst) pair is stored once. The index dtype is int32 when the node
    and edge counts are below ``int32_limit``, else int64.
    """
    runs = BucketRuns(out_dir, num_nodes)
    sizes = BatchSizes.for_budget(memory_budget, runs.dtype)
    try:
        partition(edge_chunks, runs, source_path=source_path, symmetrize=symmetrize,
                  self_loops=self_loops, batch_edges=sizes.batch_edges)
        most_edges = runs.total + (num_nodes if self_loops == "add" else 0)
        # The final count is known only at the end; dedup can only lower it.
        index_dtype = choose_index_dtype(num_nodes, most_edges, int32_limit)
        files = write_sorted(runs, out_dir, index_dtype, sizes.piece_items,
                             self_loops=self_loops, dedup=dedup)
    finally:
        runs.remove()
    num_edges = files["indices"]["shape"][0]
    final_dtype = choose_index_dtype(num_nodes, num_edges, int32_limit)
    if final_dtype != index_dtype:
        files = {name: recast_npy(out_dir / spec["file"], final_dtype)
                 for name, spec in files.items()}
    return CscFiles(num_edges, final_dtype, files)


def partition(edge_chunks: EdgeChunks, runs: BucketRuns, *, source_path: str, symmetrize: bool,
              self_loops: SelfLoops, batch_edges: int) -> None:
    """Phase 1: validate the edges and spill them into ``runs`` batch by batch."""
    chunks = (checked_edges(src, dst, runs.num_nodes, source_path, runs.dtype)
              for src, dst in edge_chunks())
    with progress_bar(desc="read edges", unit="edges", scale=True) as bar, \
            closing(prefetched(chunks)) as checked:
        for src, dst in rebatch(counted(checked, bar), batch_edges):
            for run in directed_runs(src, dst, symmetrize=symmetrize, self_loops=self_loops):
                runs.add(*run)
    runs.finish()


def counted(chunks: Iterable[tuple[np.ndarray, np.ndarray]],
            bar: Any) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """The (src, dst) chunks, their edges counted on the progress bar ``bar``."""
    for src, dst in chunks:
        bar.update(len(src))
        yield src, dst


def write_sorted(runs: BucketRuns, out_dir: Path, index_dtype: np.dtype, piece_items: int, *,
                 self_loops: SelfLoops, dedup: bool) -> dict[str, dict[str, Any]]:
    """Phase 2: sort the runs piece by piece into indptr.npy and indices.npy.

    Pieces are sorted by SORT_THREADS threads (the kernels release the GIL) and written in
    order.
    """
    def sort(first: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        lo, hi = runs.bucket_nodes(first, stop)
        src, dst = runs.read(first, stop)
        return sorted_piece(lo, hi, src, dst, num_nodes=runs.num_nodes, self_loops=self_loops,
                            dedup=dedup)

    indptr = NpyWriter(out_dir / "indptr.npy", index_dtype)
    indices = NpyWriter(out_dir / "indices.npy", index_dtype)
    indptr.append(np.zeros(1, dtype=index_dtype))
    written = 0
    bounds = runs.piece_bounds(piece_items, int(self_loops == "add")).tolist()
    with ThreadPoolExecutor(max_workers=SORT_THREADS) as pool, \
            progress_bar(total=runs.num_nodes, desc="sort CSC", unit="nodes", scale=True) as bar:
        for counts, neighbours in bounded_map(pool, sort, zip(bounds[:-1], bounds[1:]),
                                              ahead=SORT_THREADS):
            indices.append(neighbours)
            indptr.append(written + np.cumsum(counts, dtype=np.int64))
            written += len(neighbours)
            bar.update(len(counts))
    return {"indptr": indptr.close(), "indices": indices.close()}


def bounded_map(pool: ThreadPoolExecutor, fn: Callable[..., T], items: Iterable[tuple],
                ahead: int) -> Iterator[T]:
    """``fn(*item)`` for each item, in order, with at most ``ahead`` calls in flight."""
    pending: deque[Future] = deque()
    for item in items:
        pending.append(pool.submit(fn, *item))
        if len(pending) >= ahead:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def recast_npy(path: Path, dtype: np.dtype, chunk: int = SCAN_CHUNK) -> dict[str, Any]:
    """Rewrite the 1-D .npy file at ``path`` with elements of ``dtype``, slice by slice."""
    source = np.load(path, mmap_mode="r")
    scratch = path.with_name(path.name + ".recast")
    writer = NpyWriter(scratch, dtype)
    for start in range(0, len(source), chunk):
        writer.append(source[start:start + chunk])
    entry = writer.close()
    del source
    os.replace(scratch, path)
    return {**entry, "file": path.name}
