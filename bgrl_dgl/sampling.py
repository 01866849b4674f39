"""Seed batches, neighbour sampling and feature gathering for mini-batch training.

A :class:`BatchLoader` yields :class:`SampledBatch` objects: for each batch of seed nodes, one
(or, with independent views, two) stacks of DGL neighbour-sampled blocks converted to
:class:`~bgrl_dgl.adjacency.Adjacency` tensors, plus the input features gathered from the
memory-mapped store. Sampling and gathering run in DataLoader worker processes (started with
``forkserver``: forking a process that already runs OpenMP and prefetch threads can deadlock),
so they overlap with compute. Every batch is sampled from its own seed, derived from
(run seed, epoch, batch index), so the batches do not depend on the number of workers and a
resumed run sees exactly the batches an uninterrupted one would.
"""
from __future__ import annotations

import argparse
import contextlib
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import dgl
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .adjacency import Adjacency
from .config import field, parse_size
from .errors import InputError
from .features import CachePolicy, FeatureCache, advise_random_reads, read_rows
from .store import GraphStore, read_node_ids


@dataclass
class SamplingConfig:
    fanouts: list[int] = field([10, 10], "neighbours sampled per layer, input layer first; -1 = all")
    batch_size: int = field(256, "seed nodes per batch (per process)")
    num_workers: int = field(1, "sampling worker processes (0 = sample in the training process)")
    seeds: str = field("all", "seed nodes: 'all', 'split:NAME' (e.g. split:train) or a .npy file of ids")
    graph_degrees: bool = field(True, "normalise GCN layers by whole-graph degrees, not sampled ones")
    cache_bytes: str = field("0", "host memory for the feature rows of hot nodes, shared by the "
                                  "machine's processes (e.g. 2GB; 0 = no cache)")
    cache_policy: CachePolicy = field("degree", "which nodes the cache holds: 'degree' (highest "
                                                "in-degree) or 'sampled' (most often sampled)")

    def __post_init__(self) -> None:
        self.cache_bytes = str(self.cache_bytes)
        try:
            parse_size(self.cache_bytes)
        except argparse.ArgumentTypeError as err:
            raise ValueError(f"cache_bytes: {err}") from None
        if not self.fanouts or any(f == 0 or f < -1 for f in self.fanouts):
            raise ValueError("fanouts must be positive integers or -1 (all neighbours)")
        if self.batch_size <= 0:
            raise ValueError("batch_size must be positive")
        if self.num_workers < 0:
            raise ValueError("num_workers must be >= 0")

    @property
    def cache_size(self) -> int:
        """``cache_bytes`` in bytes."""
        return parse_size(self.cache_bytes)


@dataclass
class SampledView:
    """One sampled computation graph: ``adjs[0]`` consumes ``features``.

    ``input_nodes``: [adjs[0].num_src] int64 store ids; ``features``: [adjs[0].num_src, F]
    in the store's dtype (float16 or float32), float32 once moved by :meth:`to`; ``adjs[-1].num_dst`` equals the number of seed nodes. ``cache_hits`` and
    ``cache_misses`` count the feature rows found in and missing from the feature cache (both 0
    without one).
    """

    adjs: list[Adjacency]
    input_nodes: torch.Tensor
    features: torch.Tensor
    cache_hits: int = 0
    cache_misses: int = 0

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "SampledView":
        return SampledView([a.to(device) for a in self.adjs], self.input_nodes,
                           self.features.to(device, non_blocking=non_blocking).float(),
                           self.cache_hits, self.cache_misses)

    def pin_memory(self) -> "SampledView":
        """The view with its features in page-locked memory (for asynchronous copies to a
        GPU; the DataLoader's pinning thread calls this)."""
        return SampledView(self.adjs, self.input_nodes, self.features.pin_memory(),
                           self.cache_hits, self.cache_misses)


@dataclass
class SampledBatch:
    """Seed nodes [B] int64 and their two views (the same object twice unless independent)."""

    seeds: torch.Tensor
    views: tuple[SampledView, SampledView]
    sample_s: float
    gather_s: float

    @property
    def cache_lookups(self) -> tuple[int, int]:
        """(hits, misses) of the feature cache over the batch's distinct views."""
        views = self.views[:1] if self.views[0] is self.views[1] else self.views
        return sum(v.cache_hits for v in views), sum(v.cache_misses for v in views)

    def _map_views(self, convert: Callable[[SampledView], SampledView]) -> "SampledBatch":
        """The batch with ``convert`` applied once to each distinct view."""
        first = convert(self.views[0])
        second = first if self.views[1] is self.views[0] else convert(self.views[1])
        return SampledBatch(self.seeds, (first, second), self.sample_s, self.gather_s)

    def pin_memory(self) -> "SampledBatch":
        return self._map_views(SampledView.pin_memory)

    def with_float32_features(self) -> "SampledBatch":
        return self._map_views(lambda view: SampledView(
            view.adjs, view.input_nodes, view.features.float(), view.cache_hits,
            view.cache_misses))

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "SampledBatch":
        """The views on ``device`` with float32 features (a view shared by both is moved once)."""
        return self._map_views(lambda view: view.to(device, non_blocking=non_blocking))


def batch_rng_seed(seed: int, epoch: int, batch: int, rank: int = 0) -> int:
    """A 31-bit seed (what ``dgl.seed`` accepts) for rank ``rank``'s share of one batch,
    whichever process samples it."""
    # Rank 0 samples what a single-process run samples.
    entropy = [seed, epoch, batch] + ([rank] if rank else [])
    state = np.random.SeedSequence(entropy).generate_state(1, dtype=np.uint32)
    return int(state[0]) >> 1


def epoch_permutation(num_seeds: int, seed: int, epoch: int) -> np.ndarray:
    """The shuffled order of seed positions in ``epoch``: [num_seeds] int64."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, epoch, 0x5EED]))
    return rng.permutation(num_seeds)


def rank_batch_positions(num_seeds: int, seed: int, epoch: int, batch_size: int,
                         rank: int, world_size: int) -> list[np.ndarray]:
    """Rank ``rank``'s positions into the seed array for every step of ``epoch``.

    The epoch's permutation is cut into ``ceil(num_seeds / (batch_size * world_size))``
    global batches whose sizes differ by at most one, and each global batch into
    ``world_size`` near-equal slices. Equal sizes keep a short last batch from holding a
    single seed, which batch normalisation cannot train on. Returns int64 arrays of at most
    ``batch_size`` positions each.
    """
    steps = -(-num_seeds // (batch_size * world_size))
    perm = epoch_permutation(num_seeds, seed, epoch)
    return [np.array_split(chunk, world_size)[rank] for chunk in np.array_split(perm, steps)]


def smallest_rank_batch(num_seeds: int, batch_size: int, world_size: int) -> int:
    """The fewest seeds any rank gets in a step (see :func:`rank_batch_positions`)."""
    steps = -(-num_seeds // (batch_size * world_size))
    return num_seeds // steps // world_size


def check_batch_sizes(num_seeds: int, batch_size: int, world_size: int, path: Path) -> None:
    """InputError unless every rank gets at least 2 seeds in every step: batch normalisation
    cannot train on one row."""
    if num_seeds < 2 * world_size:
        raise InputError(path, f"{num_seeds} seed nodes cannot feed {world_size} processes: "
                               f"each needs at least 2 seeds per step (batch normalisation), "
                               f"so at least {2 * world_size} seeds")
    smallest = smallest_rank_batch(num_seeds, batch_size, world_size)
    if smallest < 2:
        raise InputError(path, f"--batch-size {batch_size} leaves a process a batch of {smallest} "
                               f"of the {num_seeds} seed nodes ({world_size} processes); batch "
                               "normalisation needs at least 2 seeds per batch: use a larger "
                               "--batch-size")


def resolve_seed_nodes(store: GraphStore, spec: str) -> np.ndarray:
    """The training seed node ids [S] int64 named by ``spec`` ('all', 'split:NAME', file.npy
    of store indices, duplicates ignored)."""
    if spec == "all":
        return np.arange(store.num_nodes, dtype=np.int64)
    if not spec.startswith("split:"):
        return read_node_ids(spec, store.num_nodes, what="seed ids")
    ids = np.asarray(store.split(spec.removeprefix("split:")), dtype=np.int64)
    if ids.size == 0:
        raise InputError(store.path, f"no seed nodes in {spec!r}")
    return ids


@contextlib.contextmanager
def one_omp_thread() -> Iterator[None]:
    """Run DGL's sampling single-threaded: with several OpenMP threads the node order of its
    blocks depends on thread scheduling (batches would not be reproducible), and the pool
    contends with compute threads."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


class NeighborBatchSampler:
    """Samples the blocks of one seed batch from the store's graph and gathers features."""

    def __init__(self, store: GraphStore, fanouts: list[int], graph_degrees: bool,
                 cache: FeatureCache | None = None) -> None:
        self.store = store
        self.cache = cache
        if cache is not None:
            advise_random_reads(store.features)  # the misses are scattered cold reads
        self.graph = store.graph
        # DGL 2.1.0's fused sampler (its default whenever OpenMP has several threads) keeps an
        # int64 node mapping between calls that its int32 kernel misreads: from the second
        # batch on, blocks of an int32 graph get edges from the wrong sources.
        self.sampler = dgl.dataloading.NeighborSampler(list(fanouts), fused=False)
        self.degrees = _graph_degrees(store) if graph_degrees else None

    def sample_view(self, seeds: torch.Tensor) -> tuple[SampledView, float, float]:
        start = time.perf_counter()
        input_nodes, _, blocks = self.sampler.sample_blocks(self.graph, seeds.to(self.graph.idtype))
        adjs = [self._adjacency(block) for block in blocks]
        sampled = time.perf_counter()
        features, hits, misses = self._gather(input_nodes)
        view = SampledView(adjs, input_nodes.long(), features, hits, misses)
        return view, sampled - start, time.perf_counter() - sampled

    def _gather(self, nodes: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        """Features of ``nodes`` ([len(nodes), F], store dtype), cache hits and cache misses."""
        if self.cache is None:
            return gather_features(self.store.features, nodes), 0, 0
        rows, hits = self.cache.gather(self.store.features, nodes.numpy())
        return torch.from_numpy(rows), hits, len(rows) - hits

    def _adjacency(self, block: dgl.DGLGraph) -> Adjacency:
        adj = Adjacency.from_block(block)
        if self.degrees is None:
            return adj
        src_ids = block.srcdata[dgl.NID].long()
        dst_ids = block.dstdata[dgl.NID].long()
        out_deg, in_deg = self.degrees
        return adj.with_degrees(src_degree=out_deg[src_ids], dst_degree=in_deg[dst_ids])

    def sample(self, seeds: torch.Tensor, rng_seed: int, independent: bool) -> SampledBatch:
        """The batch of ``seeds`` [B] int64; the same ``rng_seed`` gives the same blocks."""
        with one_omp_thread():
            dgl.seed(rng_seed)
            first, sample_s, gather_s = self.sample_view(seeds)
            second = first
            if independent:
                second, more_sample, more_gather = self.sample_view(seeds)
                sample_s, gather_s = sample_s + more_sample, gather_s + more_gather
        return SampledBatch(seeds, (first, second), sample_s, gather_s)


def _graph_degrees(store: GraphStore) -> tuple[torch.Tensor, torch.Tensor]:
    """(out-degree, in-degree) of every node: [N] float32 each."""
    return (torch.from_numpy(store.out_degrees().astype(np.float32)),
            torch.from_numpy(store.in_degrees().astype(np.float32)))


def gather_features(features: np.ndarray, nodes: torch.Tensor) -> torch.Tensor:
    """Rows ``nodes`` of the (memory-mapped) feature matrix, in its dtype: [len(nodes), F]
    (see :func:`~bgrl_dgl.features.read_rows`)."""
    return torch.from_numpy(read_rows(features, nodes.numpy()))


class _RunBatches(Dataset):
    """Item ``k`` is the batch of global step ``first_step + k``, sampled where it is asked for."""

    def __init__(self, loader: "BatchLoader", first_step: int, last_step: int) -> None:
        self.store_path = loader.store.path
        self.config = loader.config
        self.seed_nodes = loader.seed_nodes
        self.seed = loader.seed
        self.independent = loader.independent
        self.rank = loader.rank
        self.world_size = loader.world_size
        self.steps_per_epoch = loader.steps_per_epoch
        self.cache_dir = loader.cache_dir
        self.float32_features = loader.device_type != "cuda"
        self.first_step = first_step
        self.last_step = last_step
        self._sampler: NeighborBatchSampler | None = None
        self._epoch_order: tuple[int, list[np.ndarray]] | None = None

    def __len__(self) -> int:
        return self.last_step - self.first_step

    def __getitem__(self, index: int) -> SampledBatch:
        epoch, batch = divmod(self.first_step + index, self.steps_per_epoch)
        if self._epoch_order is None or self._epoch_order[0] != epoch:
            self._epoch_order = (epoch, rank_batch_positions(
                len(self.seed_nodes), self.seed, epoch, self.config.batch_size, self.rank,
                self.world_size))
        if self._sampler is None:
            store = GraphStore.open(self.store_path, check="none")
            cache = None if self.cache_dir is None else FeatureCache.open(self.cache_dir)
            self._sampler = NeighborBatchSampler(store, self.config.fanouts,
                                                 self.config.graph_degrees, cache)
        seeds = torch.from_numpy(self.seed_nodes[self._epoch_order[1][batch]])
        sampled = self._sampler.sample(seeds, batch_rng_seed(self.seed, epoch, batch, self.rank),
                                       self.independent)
        return sampled.with_float32_features() if self.float32_features else sampled

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_sampler": None, "_epoch_order": None}


class BatchLoader:
    """The batches of one process of ``world_size``, step after step across epochs.

    Each epoch, the seed nodes are shuffled with the same seeded permutation on every rank and
    cut into global batches of at most ``world_size * batch_size`` seeds (see
    :func:`rank_batch_positions`); rank ``r`` takes slice ``r`` of every global batch, so all
    ranks run the same number of steps and together cover each seed once per epoch.
    ``cache_dir``, when set, is the directory of the machine's
    :class:`~bgrl_dgl.features.FeatureCache`, which every sampler attaches to.
    ``device_type`` is where the batches are consumed: for ``cuda``, features keep the
    store's dtype (half the bytes to copy; converted on the GPU) and batches from workers
    arrive in page-locked memory; otherwise the workers convert them to float32, overlapping
    the conversion with compute.
    """

    def __init__(self, store: GraphStore, config: SamplingConfig, seed_nodes: np.ndarray, *,
                 seed: int, independent_views: bool, rank: int = 0, world_size: int = 1) -> None:
        check_batch_sizes(len(seed_nodes), config.batch_size, world_size, store.path)
        self.store = store
        self.config = config
        self.seed_nodes = seed_nodes
        self.seed = seed
        self.independent = independent_views
        self.rank = rank
        self.world_size = world_size
        self.cache_dir: Path | None = None
        self.device_type = "cpu"

    @property
    def steps_per_epoch(self) -> int:
        global_batch = self.config.batch_size * self.world_size
        return -(-len(self.seed_nodes) // global_batch)

    def batch_positions(self, epoch: int) -> list[np.ndarray]:
        """This rank's positions into ``seed_nodes`` for every step of ``epoch``."""
        return rank_batch_positions(len(self.seed_nodes), self.seed, epoch,
                                    self.config.batch_size, self.rank, self.world_size)

    def batches(self, first_step: int, last_step: int) -> Iterator[SampledBatch]:
        """The batches of global steps ``first_step .. last_step - 1``, in order."""
        dataset = _RunBatches(self, first_step, last_step)
        if self.config.num_workers == 0:
            yield from (dataset[index] for index in range(len(dataset)))
            return
        # A generator of its own: the loader draws its workers' base seed from it instead of
        # from torch's global generator, whose state a checkpoint restores (dropout draws).
        yield from DataLoader(
            dataset, batch_size=None, shuffle=False, num_workers=self.config.num_workers,
            multiprocessing_context="forkserver", prefetch_factor=2, worker_init_fn=_worker_init,
            generator=torch.Generator(), pin_memory=self.device_type == "cuda",
        )


def _worker_init(_: int) -> None:
    # A Ctrl-C reaches the whole process group. The training process turns it into a
    # checkpoint and a clean stop, then shuts the workers down; a worker killed by it first
    # would make the next batch fail with a traceback instead. (SIGTERM keeps its default:
    # multiprocessing terminates leftover workers with it at exit.)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(1)
