"""Feature gathering, and a host-memory cache of the feature rows of hot nodes shared by the
processes of one machine.

Neighbour sampling keeps returning to the same few nodes: in a power-law graph most sampled
input nodes are the high-degree ones. A :class:`FeatureCache` holds the rows of the hottest
nodes, chosen by a policy, within a byte budget, so that reads of a feature file much larger
than memory are left for the cold rows:

* ``degree``: the nodes of highest in-degree (a node is sampled about as often as it has
  out-edges, which is its in-degree on the symmetric graphs this is meant for);
* ``sampled``: the nodes that appear most often among the input nodes of a few hundred
  batches sampled with the training fanouts (ties, and nodes never seen, by in-degree).

One copy per machine and user. The cache is a directory in shared memory (``/dev/shm``)::

    bgrl-dgl-cache-<uid>-<key>/rows.npy    [C, F] the store's feature dtype: the cached rows
    bgrl-dgl-cache-<uid>-<key>/slots.npy   [N] int32: row of node v in rows.npy, -1 = not cached
    bgrl-dgl-cache-<uid>-<key>/meta.json   what was cached, for whom; the owner process

``uid`` is the user's, so that users never share (or block) one another's caches. ``key``
hashes the features file (path, mtime, size), the policy and the budget (and, for
``sampled``, the sampling settings), so a rebuilt store never meets a stale cache. One process
writes the directory under a private temporary name and renames it; every process, including
DataLoader workers that are handed only the directory's path, memory-maps the files
read-only, so the pages are shared, not copied. A directory found under the cache's name is
used only if it is this user's own and describes this very cache (see
:mod:`~bgrl_dgl.loading.cache_files`): another user who can read the store could otherwise
plant rows that every batch would train on. The budget counts the cached rows
(``floor(budget / row bytes)`` rows, at most N); the slot map costs N * 4 bytes more (400 MB
for 100M nodes), paid once per machine like the rows.

The process that wrote the directory owns it and removes it when it closes the cache (at the
end of a training run). A run that dies without closing it (SIGKILL, out of memory) leaves it
in ``/dev/shm`` until the next reboot, or until the next run with the same key finds it,
takes it over (the recorded owner, a pid and its start time, is no longer alive) and removes
it when it ends.

A sampler that reads through a cache advises the kernel that its reads of the feature file
are random (:func:`advise_random_reads`): the cache is meant for feature files larger than
memory, whose uncached rows are cold reads scattered over the file, and by default each such
page fault reads a whole read-ahead window around the row (128 KiB on most disks, 8 MiB on
some virtual ones), mostly bytes no batch asks for.

Host-to-device copies: the GPU never reads the cache itself, only the batch of rows gathered
from it, so the batch is what is pinned: when training runs on CUDA, the DataLoader's pinning
thread in the training process copies each batch's features into page-locked memory and the
copy to the GPU runs asynchronously. (Pinning in the workers would give each of them a CUDA
context; registering the whole cache would pin gigabytes that are never copied as such.)
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import dgl
import numpy as np
import torch

from bgrl_dgl.errors import InputError
from bgrl_dgl.io import remove_stale_temp_files
from bgrl_dgl.loading.cache_files import (
    META_FILE,
    ROWS_FILE,
    SLOTS_FILE,
    adopt_if_orphaned,
    not_a_cache,
    open_cache_files,
    owner_record,
    private_temp_dir,
    remove_cache,
    seal,
    writer_lock,
)
from bgrl_dgl.loading.sampler import BlockSampler
from bgrl_dgl.store.format import NpyWriter

if TYPE_CHECKING:
    from bgrl_dgl.store.reader import GraphStore

CachePolicy = Literal["degree", "sampled"]
CACHE_PREFIX = "bgrl-dgl-cache-"
# Batches sampled to count how often each node is an input node (the ``sampled`` policy).
SAMPLED_BATCHES = 256
# Bytes of feature rows copied into the cache at a time while it is written.
COPY_CHUNK_BYTES = 64 << 20


def default_cache_root() -> Path:
    """Shared memory where the system has it, else the temporary directory."""
    shm = Path("/dev/shm")
    return shm if shm.is_dir() else Path(tempfile.gettempdir())


def top_nodes(scores: np.ndarray, count: int) -> np.ndarray:
    """Ids of the ``count`` highest ``scores`` [N], ascending: [min(count, N)] int64."""
    if count >= len(scores):
        return np.arange(len(scores), dtype=np.int64)
    cut = len(scores) - count
    return np.sort(np.argpartition(scores, cut)[cut:]).astype(np.int64)


def count_sampled_inputs(graph: dgl.DGLGraph, fanouts: list[int], seed_nodes: np.ndarray | None,
                         batch_size: int, num_batches: int, seed: int) -> np.ndarray:
    """How often each node is an input node of ``num_batches`` sampled batches: [N] int64.

    Each batch's seeds are drawn from ``seed_nodes`` (None: every node) at random (repeats
    dropped), so no permutation of a possibly huge seed array is needed.
    """
    sampler = BlockSampler(graph, fanouts)
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0xCAC4E]))
    inputs = []
    num_seeds = graph.num_nodes() if seed_nodes is None else len(seed_nodes)
    for _ in range(num_batches):
        positions = rng.integers(0, num_seeds, size=batch_size)
        seeds = np.unique(positions if seed_nodes is None else seed_nodes[positions])
        input_nodes, _ = sampler.sample(torch.from_numpy(seeds), int(rng.integers(2**31)))
        inputs.append(input_nodes.numpy())
    return np.bincount(np.concatenate(inputs), minlength=graph.num_nodes())


def hot_nodes(store: "GraphStore", count: int, policy: CachePolicy, *, fanouts: list[int],
              seed_nodes: np.ndarray | None, batch_size: int, seed: int) -> np.ndarray:
    """The ``count`` nodes whose rows the cache holds under ``policy``: ascending int64 ids."""
    degrees = store.in_degrees()
    if policy == "degree":
        return top_nodes(degrees, count)
    if policy != "sampled":
        raise ValueError(f"unknown cache policy {policy!r}")
    counts = count_sampled_inputs(store.graph, fanouts, seed_nodes, batch_size,
                                  SAMPLED_BATCHES, seed)
    # By count, then by in-degree, as one int64 key: a node is counted at most once per batch.
    return top_nodes(counts * (int(degrees.max(initial=0)) + 1) + degrees, count)


def cache_key(store: "GraphStore", budget: int, policy: CachePolicy,
              extra: dict[str, Any]) -> str:
    """16 hex digits naming the cache of ``store``'s features under these settings."""
    path = store.array_path("features").resolve()
    stat = path.stat()
    identity = [str(path), stat.st_mtime_ns, stat.st_size, policy, budget, extra]
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def cache_directory(store: "GraphStore", budget: int, policy: CachePolicy,
                    extra: dict[str, Any], root: Path | None = None) -> Path:
    """Where this user's cache of these settings lives (whether or not it exists)."""
    root = default_cache_root() if root is None else Path(root)
    return root / f"{user_prefix()}{cache_key(store, budget, policy, extra)}"


def user_prefix() -> str:
    """The start of the names of this user's cache directories: ``bgrl-dgl-cache-<uid>-``."""
    return f"{CACHE_PREFIX}{os.getuid()}-"


def cached_row_count(store: "GraphStore", budget: int) -> int:
    """Rows that ``budget`` bytes hold: floor(budget / row bytes), at most N."""
    row_bytes = store.feat_dim * store.feat_dtype.itemsize
    count = min(budget // max(row_bytes, 1), store.num_nodes)
    if count == 0:
        raise InputError(None, f"--cache-bytes {budget} holds no feature row "
                               f"({row_bytes} bytes each)")
    return count


def seed_digest(seed_nodes: np.ndarray | None, num_nodes: int, chunk: int = 1 << 22) -> str:
    """16 hex digits of the int64 bytes of ``seed_nodes`` (None: 0..num_nodes-1, hashed in
    chunks of ``chunk`` ids without making the array)."""
    digest = hashlib.blake2b(digest_size=8)
    if seed_nodes is not None:
        digest.update(np.ascontiguousarray(seed_nodes, dtype=np.int64).data)
    else:
        for start in range(0, num_nodes, chunk):
            digest.update(np.arange(start, min(start + chunk, num_nodes), dtype=np.int64).data)
    return digest.hexdigest()


def cache_plan(store: "GraphStore", budget: int, policy: CachePolicy, *, fanouts: list[int],
               seed_nodes: np.ndarray | None, batch_size: int, seed: int,
               root: Path | None = None) -> tuple[Path, dict[str, Any]]:
    """Where this user's cache of these settings lives, and what its meta.json records
    (besides the owner); the arguments are those of :meth:`FeatureCache.build`."""
    extra: dict[str, Any] = {}
    if policy == "sampled":
        extra = {"fanouts": list(fanouts), "batch_size": batch_size, "seed": seed,
                 "seed_nodes": seed_digest(seed_nodes, store.num_nodes)}
    directory = cache_directory(store, budget, policy, extra, root)
    count = cached_row_count(store, budget)
    return directory, {**cache_identity(store, count), "policy": policy, "budget": budget,
                       **extra}


class FeatureCache:
    """The cached rows and the id -> row map of one cache directory, memory-mapped read-only.

    ``rows``: [C, F] in the store's feature dtype; ``slot_of``: [N] int32, -1 = not cached.
    :meth:`open` attaches to an existing directory; :meth:`build` writes one (or attaches to
    an existing one) and may own it. Closing an owning cache removes the directory. Either
    way the directory and its files are checked first (this user's own, and consistent;
    ``expected``: what its meta.json must record); InputError otherwise.
    """

    def __init__(self, directory: Path, owner: bool,
                 expected: dict[str, Any] | None = None) -> None:
        self.directory = Path(directory)
        self.owner = owner
        self.closed = False
        _, self.rows, self.slot_of = open_cache_files(self.directory, expected)

    @classmethod
    def open(cls, directory: str | os.PathLike) -> "FeatureCache":
        """Attach to the cache in ``directory`` (e.g. in a worker process); never owns it."""
        return cls(Path(directory), owner=False)

    @classmethod
    def build(cls, store: "GraphStore", budget: int, policy: CachePolicy = "degree", *,
              fanouts: list[int] | None = None, seed_nodes: np.ndarray | None = None,
              batch_size: int = 256, seed: int = 0, root: Path | None = None,
              reserve: int = 0) -> "FeatureCache":
        """The machine's cache of ``store``'s hot rows within ``budget`` bytes.

        Written by this process unless it exists already; ``fanouts``, ``seed_nodes``,
        ``batch_size`` and ``seed`` drive the sampling pass of the ``sampled`` policy
        (default: fanouts [10, 10]; ``seed_nodes`` None: every node). ``reserve``: bytes of
        the cache's file system that must stay free besides the cache (the batches in flight,
        which the workers hand over through the same shared memory). InputError when a
        directory under its name is not this user's cache of these settings, or when the
        file system cannot hold the cache and ``reserve``.
        """
        fanouts = [10, 10] if fanouts is None else list(fanouts)
        directory, expected = cache_plan(store, budget, policy, fanouts=fanouts,
                                         seed_nodes=seed_nodes, batch_size=batch_size,
                                         seed=seed, root=root)
        # One writer per cache at a time: the others wait, then attach to what it wrote.
        with writer_lock(directory):
            # A dead writer's temp directories (this user's only: others' are not ours).
            remove_stale_temp_files(directory.parent, user_prefix(), own_only=True)
            if os.path.lexists(directory):
                meta, _, _ = open_cache_files(directory, expected)
                owner = adopt_if_orphaned(directory, meta)
            else:
                ids = hot_nodes(store, expected["rows"], policy, fanouts=fanouts,
                                seed_nodes=seed_nodes, batch_size=batch_size, seed=seed)
                write_cache(directory, store, ids, expected, reserve)
                owner = True
        return cls(directory, owner, expected)

    @property
    def num_rows(self) -> int:
        return len(self.rows)

    @property
    def nbytes(self) -> int:
        """Bytes of the cached rows (the slot map adds ``4 * N``)."""
        return self.rows.nbytes

    def gather(self, features: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, int]:
        """Rows ``ids`` [n] (any integer dtype, repeats allowed) of ``features`` [N, F] as
        [n, F] in ``features``' dtype, and how many of them came from the cache.

        Cached rows are copied from shared memory, the others read from ``features``; both in
        ascending id order (forward scans of the slot map, the cached rows and the file), each
        row written straight to its place in the output.
        """
        order = np.argsort(ids, kind="stable")
        sorted_ids = ids[order]
        slots = self.slot_of[sorted_ids]
        hit = slots >= 0
        rows = np.empty((len(ids), features.shape[1]), dtype=features.dtype)
        rows[order[hit]] = self.rows[slots[hit]]
        missed = ~hit
        rows[order[missed]] = features[sorted_ids[missed]]
        return rows, int(np.count_nonzero(hit))

    def close(self) -> None:
        """Drop this process's mappings; the owner also removes the directory (processes
        that still map its files keep reading them until they unmap them)."""
        if self.closed:
            return
        del self.rows, self.slot_of
        self.closed = True
        if self.owner:
            remove_cache(self.directory)

    def __enter__(self) -> "FeatureCache":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def cache_identity(store: "GraphStore", rows: int) -> dict[str, Any]:
    """What a cache of ``rows`` rows of ``store`` records about them in its meta.json."""
    return {"store": str(store.path.resolve()), "num_nodes": store.num_nodes,
            "feat_dim": store.feat_dim, "feat_dtype": store.feat_dtype.name, "rows": rows}


def write_cache(directory: Path, store: "GraphStore", ids: np.ndarray,
                settings: dict[str, Any], reserve: int = 0) -> None:
    """Write the cache of rows ``ids`` (ascending) to ``directory`` (a private temp directory
    renamed into place); ``settings`` go to meta.json; ``reserve`` bytes of the file system
    must stay free besides the cache."""
    row_bytes = store.feat_dim * store.feat_dtype.itemsize
    needed = len(ids) * row_bytes + store.num_nodes * 4
    free = shutil.disk_usage(directory.parent).free
    if needed + reserve > free:
        kept = f" besides {reserve} bytes kept for the batches in flight" if reserve else ""
        raise InputError(directory.parent, f"the feature cache needs {needed} bytes{kept}, "
                                           f"only {free} are free")
    tmp = private_temp_dir(directory)
    try:
        # File writes, not a writable memmap: a full tmpfs then fails with ENOSPC, not SIGBUS.
        writer = NpyWriter(tmp / ROWS_FILE, store.feat_dtype, (store.feat_dim,))
        step = max(COPY_CHUNK_BYTES // max(row_bytes, 1), 1)
        for start in range(0, len(ids), step):
            writer.append(store.features[ids[start:start + step]])
        writer.close()
        slot_of = np.full(store.num_nodes, -1, dtype=np.int32)
        slot_of[ids] = np.arange(len(ids), dtype=np.int32)
        np.save(tmp / SLOTS_FILE, slot_of, allow_pickle=False)
        meta = {**cache_identity(store, len(ids)), **settings, **owner_record()}
        (tmp / META_FILE).write_text(json.dumps(meta), encoding="utf-8")
        seal(tmp)
        try:
            os.rename(tmp, directory)
        except OSError as err:  # something took the name since it was looked up
            raise not_a_cache(directory, f"appeared while the cache was written: "
                                         f"{err.strerror}") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def check_found_cache(store: "GraphStore", budget: int, policy: CachePolicy, *,
                      fanouts: list[int], seed_nodes: np.ndarray | None, batch_size: int,
                      seed: int,
                      root: Path | None = None) -> Path:
    """InputError when something that is not this user's cache of these settings (those of
    :meth:`FeatureCache.build`) sits under its name: checked before a run writes anything;
    :meth:`FeatureCache.build` checks again when it finds the directory. Returns the cache's
    directory (whether or not it exists)."""
    directory, expected = cache_plan(store, budget, policy, fanouts=fanouts,
                                     seed_nodes=seed_nodes, batch_size=batch_size, seed=seed,
                                     root=root)
    if os.path.lexists(directory):
        open_cache_files(directory, expected)
    return directory


