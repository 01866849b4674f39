"""Seed batches, neighbour sampling and feature gathering for mini-batch training.

A :class:`BatchLoader` yields :class:`SampledBatch` objects: for each batch of seed nodes, one
(or, with independent views, two) stacks of DGL neighbour-sampled blocks converted to
:class:`~bgrl_dgl.model.adjacency.Adjacency` tensors, plus the input features gathered from the
memory-mapped store. Sampling and gathering run in DataLoader worker processes (started with
``forkserver``: forking a process that already runs OpenMP and prefetch threads can deadlock),
so they overlap with compute. Every batch is sampled from its own seed, derived from
(run seed, epoch, batch index), so the batches do not depend on the number of workers and a
resumed run sees exactly the batches an uninterrupted one would.

Workers hold nothing as long as the graph: the training process cuts each step's seeds out of
the epoch's order and hands a worker just those, with the step's sampling seed; the order
itself, and the whole-graph degrees the samplers read, are files of the machine that every
process maps (see :mod:`~bgrl_dgl.loading.shared_arrays`).
"""
from __future__ import annotations

import contextlib
import os
import select
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, get_worker_info

from bgrl_dgl.config import check_finite, field, parse_size
from bgrl_dgl.errors import InputError
from bgrl_dgl.io import process_alive, process_start_time, same_process_alive
from bgrl_dgl.loading.feature_cache import CachePolicy, FeatureCache, check_found_cache
from bgrl_dgl.loading.features import SPARSE_MAX_DENSITY, SPARSE_MIN_DIM, FeatureSource, SparseInput
from bgrl_dgl.loading.sampler import NeighborBatchSampler, SampledBatch, batch_rng_seed
from bgrl_dgl.loading.shared_arrays import SharedArrays, map_degrees
from bgrl_dgl.store.reader import GraphStore, read_node_ids

# Batches each worker keeps outstanding (the DataLoader's prefetch_factor); they travel
# through shared memory, which the memory plan reserves for them.
PREFETCH_FACTOR = 2


@dataclass
class SamplingConfig:
    fanouts: list[int] = field([10, 10],
                               "neighbours sampled per layer, input layer first; -1 = all")
    batch_size: int = field(256, "seed nodes per batch (per process)")
    num_workers: int = field(1, "sampling worker processes (0 = sample in the training process)")
    seeds: str = field("all", "seed nodes: 'all', 'split:NAME' (e.g. split:train) or a .npy file "
                              "of ids")
    graph_degrees: bool = field(True, "normalise GCN layers by whole-graph degrees, not sampled "
                                      "ones")
    cache_bytes: int = field(0, "host memory for the feature rows of hot nodes, shared by the "
                                "machine's processes (e.g. 2GB; 0 = no cache)", parse=parse_size)
    cache_policy: CachePolicy = field("degree", "which nodes the cache holds: 'degree' (highest "
                                                "in-degree) or 'sampled' (most often sampled)")
    sparse_input: SparseInput = field(
        "auto", "hand the first layer the non-zeros of the feature rows and multiply only "
                "those: on, off, or auto (on when the features are at least "
                f"{SPARSE_MIN_DIM} wide and under {SPARSE_MAX_DENSITY:.0%} non-zero, judged "
                "once per run on a fixed sample of rows)")

    def __post_init__(self) -> None:
        check_finite(self)
        if self.cache_bytes < 0:
            raise ValueError("cache_bytes must be >= 0")
        if not self.fanouts or any(f == 0 or f < -1 for f in self.fanouts):
            raise ValueError("fanouts must be positive integers or -1 (all neighbours)")
        if self.batch_size <= 0:
            raise ValueError("batch_size must be positive")
        if self.num_workers < 0:
            raise ValueError("num_workers must be >= 0")
        if self.sparse_input not in ("auto", "on", "off"):
            raise ValueError(f"sparse_input must be auto, on or off, not {self.sparse_input!r}")


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


def split_bounds(length: int, parts: int, index: int) -> tuple[int, int]:
    """[start, stop) of part ``index`` when ``length`` items are cut into ``parts`` parts whose
    sizes differ by at most one, the larger first (as ``np.array_split`` cuts them)."""
    size, extra = divmod(length, parts)
    start = index * size + min(index, extra)
    return start, start + size + (index < extra)


def rank_batch_bounds(num_seeds: int, batch_size: int, rank: int, world_size: int,
                      batch: int) -> tuple[int, int]:
    """[start, stop) of rank ``rank``'s positions of step ``batch`` in the epoch's
    permutation: the slice :func:`rank_batch_positions` takes, computed without it."""
    steps = -(-num_seeds // (batch_size * world_size))
    start, stop = split_bounds(num_seeds, steps, batch)
    low, high = split_bounds(stop - start, world_size, rank)
    return start + low, start + high


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
    of store indices, duplicates ignored); a split stays a read-only map of the store's file."""
    if spec == "all":
        return np.arange(store.num_nodes, dtype=np.int64)
    if not spec.startswith("split:"):
        return read_node_ids(spec, store.num_nodes, what="seed ids")
    ids = store.split(spec.removeprefix("split:"))  # int64, checked when the store is opened
    if ids.size == 0:
        raise InputError(store.path, f"no seed nodes in {spec!r}")
    return ids


class SeedSchedule:
    """The seeds of every training step of one process of ``world_size``.

    Each epoch, the seed nodes are shuffled with the same seeded permutation on every rank and
    cut into global batches of at most ``world_size * batch_size`` seeds (see
    :func:`rank_batch_positions`); rank ``r`` takes slice ``r`` of every global batch, so all
    ranks run the same number of steps and together cover each seed once per epoch.

    Args:
        seed_nodes: the seed ids [S] int64 (a store's split may stay memory-mapped), or the
            number of nodes N when every node is a seed (no array: position = id).
        batch_size: seeds per process and step.
        seed: the run's seed.
        rank, world_size: this process's place in the run.
        shared: where the epochs' permutations are mapped from (None: computed here).
    """

    def __init__(self, seed_nodes: np.ndarray | int, batch_size: int, seed: int, rank: int = 0,
                 world_size: int = 1, shared: SharedArrays | None = None) -> None:
        self.seed_nodes = None if isinstance(seed_nodes, int) else seed_nodes
        self.num_seeds = seed_nodes if isinstance(seed_nodes, int) else len(seed_nodes)
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.shared = shared
        self._epoch_order: tuple[int, np.ndarray] | None = None

    @classmethod
    def for_store(cls, store: GraphStore, config: "SamplingConfig", seed: int, rank: int = 0,
                  world_size: int = 1) -> "SeedSchedule":
        """The schedule of ``config.seeds`` on ``store``; InputError when some process would
        get fewer than 2 seeds in a step."""
        seed_nodes: np.ndarray | int = store.num_nodes
        if config.seeds != "all":
            seed_nodes = resolve_seed_nodes(store, config.seeds)
        schedule = cls(seed_nodes, config.batch_size, seed, rank, world_size)
        check_batch_sizes(schedule.num_seeds, config.batch_size, world_size, store.path)
        return schedule

    @property
    def steps_per_epoch(self) -> int:
        global_batch = self.batch_size * self.world_size
        return -(-self.num_seeds // global_batch)

    def batch_positions(self, epoch: int) -> list[np.ndarray]:
        """This rank's positions into ``seed_nodes`` for every step of ``epoch``."""
        return rank_batch_positions(self.num_seeds, self.seed, epoch, self.batch_size,
                                    self.rank, self.world_size)

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The permutation of seed positions of ``epoch`` [S] int64 (mapped when shared)."""
        if self._epoch_order is None or self._epoch_order[0] != epoch:
            self._epoch_order = None  # unmapped before the next one is made
            order = (epoch_permutation(self.num_seeds, self.seed, epoch) if self.shared is None
                     else self.shared.permutation(self.num_seeds, self.seed, epoch))
            self._epoch_order = (epoch, order)
        return self._epoch_order[1]

    def step(self, step: int) -> tuple[np.ndarray, int]:
        """(this rank's seed ids [<= batch_size] int64, the batch's sampling seed) of a step."""
        epoch, batch = divmod(step, self.steps_per_epoch)
        start, stop = rank_batch_bounds(self.num_seeds, self.batch_size, self.rank,
                                        self.world_size, batch)
        positions = np.array(self.epoch_order(epoch)[start:stop], dtype=np.int64)
        seeds = positions if self.seed_nodes is None else np.asarray(self.seed_nodes[positions],
                                                                     dtype=np.int64)
        return seeds, batch_rng_seed(self.seed, epoch, batch, self.rank)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_epoch_order": None}


@dataclass(frozen=True)
class StepSeeds:
    """What a sampling worker gets for one step: the seed ids [B] int64 and the sampling
    seed of the batch."""

    step: int
    seeds: np.ndarray
    rng_seed: int


class _StepOrder(Sampler):
    """The items of steps ``first_step .. last_step - 1``, made in the training process from
    its schedule (which stays there: workers see only their steps' seeds)."""

    def __init__(self, schedule: SeedSchedule, first_step: int, last_step: int) -> None:
        self.schedule = schedule
        self.first_step = first_step
        self.last_step = last_step

    def __len__(self) -> int:
        return self.last_step - self.first_step

    def __iter__(self) -> Iterator[StepSeeds]:
        for step in range(self.first_step, self.last_step):
            yield StepSeeds(step, *self.schedule.step(step))


class _StepBatches(Dataset):
    """Samples the batch of a :class:`StepSeeds` item where it is asked for (in the training
    process or a worker; the sampler is opened there, once). Holds nothing as long as the
    graph: it is pickled into every worker."""

    def __init__(self, loader: "BatchLoader") -> None:
        self.store_path = loader.store.path
        self.config = loader.config
        self.degree_files = loader.degree_files
        self.independent = loader.independent
        self.cache_dir = loader.cache_dir
        self.float32_features = loader.float32_in_workers
        self.sparse_rows = loader.sparse_rows
        # The training process, which the workers must not outlive.
        self.trainer = (os.getpid(), process_start_time(os.getpid()))
        self._sampler: NeighborBatchSampler | None = None

    def _open_sampler(self) -> NeighborBatchSampler:
        store = GraphStore.open(self.store_path, check="none")
        cache = None if self.cache_dir is None else FeatureCache.open(self.cache_dir)
        degrees = None
        if self.config.graph_degrees and self.degree_files is not None:
            degrees = map_degrees(self.degree_files, store.num_nodes)
        return NeighborBatchSampler(store, self.config.fanouts, self.config.graph_degrees,
                                    FeatureSource(store.features, cache), degrees=degrees,
                                    sparse_rows=self.sparse_rows)

    def __getitem__(self, item: StepSeeds) -> SampledBatch:
        if self._sampler is None:
            self._sampler = self._open_sampler()
        sampled = self._sampler.sample(torch.from_numpy(item.seeds), item.rng_seed,
                                       self.independent)
        return sampled.with_float32_features() if self.float32_features else sampled

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_sampler": None}


class BatchLoader:
    """The batches of one training process, step after step across epochs.

    Args:
        store: the graph store (workers reopen it by its path).
        config: the sampling settings.
        schedule: which seeds each step trains on (this process's share).
        independent_views: sample a separate neighbourhood for each of the two views.
        device: where the batches are consumed. For ``cuda``, features keep the store's
            dtype (half the bytes to copy; converted on the GPU) and batches from workers
            arrive in page-locked memory; otherwise the workers convert them to float32,
            overlapping the conversion with compute.
        cache_dir: the directory of the machine's feature cache, which every sampler
            attaches to (None: no cache).
        shared: the machine's shared arrays of the run: the schedule maps its epochs'
            permutations from there (and its seed ids, when they were read from a file), and
            the samplers the degrees (None: each process computes its own).
        sparse_rows: batches carry the feature rows' non-zeros (extracted by the workers)
            instead of the dense rows.
    """

    def __init__(self, store: GraphStore, config: "SamplingConfig", schedule: SeedSchedule, *,
                 independent_views: bool, device: torch.device = torch.device("cpu"),
                 cache_dir: Path | None = None, shared: SharedArrays | None = None,
                 sparse_rows: bool = False) -> None:
        self.store = store
        self.config = config
        self.schedule = schedule
        if shared is not None:
            schedule.shared = shared
            if schedule.seed_nodes is not None and not isinstance(schedule.seed_nodes, np.memmap):
                schedule.seed_nodes = shared.seed_ids(schedule.seed_nodes)
        self.degree_files = (shared.degree_files(store)
                             if shared is not None and config.graph_degrees else None)
        self.independent = independent_views
        self.cache_dir = cache_dir
        self.pin_memory = device.type == "cuda"
        self.float32_in_workers = device.type != "cuda"
        self.sparse_rows = sparse_rows

    def batches(self, first_step: int, last_step: int) -> Iterator[SampledBatch]:
        """The batches of global steps ``first_step .. last_step - 1``, in order."""
        dataset = _StepBatches(self)
        steps = _StepOrder(self.schedule, first_step, last_step)
        if self.config.num_workers == 0:
            yield from (dataset[item] for item in steps)
            return
        # A generator of its own: the loader draws its workers' base seed from it instead of
        # from torch's global generator, whose state a checkpoint restores (dropout draws).
        yield from DataLoader(
            dataset, batch_size=None, sampler=steps, num_workers=self.config.num_workers,
            multiprocessing_context="forkserver", prefetch_factor=PREFETCH_FACTOR,
            worker_init_fn=_worker_init,
            generator=torch.Generator(), pin_memory=self.pin_memory,
        )


def _worker_init(_: int) -> None:
    # A Ctrl-C reaches the whole process group. The training process turns it into a
    # checkpoint and a clean stop, then shuts the workers down; a worker killed by it first
    # would make the next batch fail with a traceback instead. (SIGTERM keeps its default:
    # multiprocessing terminates leftover workers with it at exit.)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(1)
    info = get_worker_info()
    if info is not None and isinstance(info.dataset, _StepBatches):
        exit_with(*info.dataset.trainer)


# The exit status of a worker whose training process has gone.
ORPHAN_EXIT = 70
# Seconds between checks of the training process where the kernel offers no pidfd.
ORPHAN_POLL_S = 1.0


def exit_with(pid: int, start_time: int | None) -> None:
    """End this process as soon as the process ``pid`` (started at ``start_time``, see
    bgrl_dgl.io.process_start_time) ends, however it ends (SIGKILL included).

    A worker's parent is the forkserver, not the training process, so neither the parent
    death signal (``PR_SET_PDEATHSIG``) nor torch's check of the parent pid notices a killed
    training process; and the forkserver, and multiprocessing's resource tracker, live as
    long as a worker holds their pipes. Left alone, a killed run's workers would keep their
    memory and their mappings of the feature cache forever. Here a daemon thread waits on a
    pidfd of the training process (or polls it where there is none) and exits the process.
    """
    try:
        handle: int | None = os.pidfd_open(pid)
    except ProcessLookupError:
        os._exit(ORPHAN_EXIT)
    except (AttributeError, OSError):  # no pidfd_open (Python or kernel): poll instead
        handle = None
    # The pid might already name another process, if the training process died before this.
    if not same_process_alive(pid, start_time):
        os._exit(ORPHAN_EXIT)
    threading.Thread(target=_exit_when_gone, args=(pid, handle), name="exit-with-trainer",
                     daemon=True).start()


def _exit_when_gone(pid: int, handle: int | None) -> None:
    """Block until process ``pid`` (or its pidfd ``handle``) has ended, then exit at once."""
    if handle is not None:
        select.select([handle], [], [])  # a pidfd turns readable when its process ends
    else:
        while process_alive(pid):
            time.sleep(ORPHAN_POLL_S)
    os._exit(ORPHAN_EXIT)


def check_training_cache(store: GraphStore, config: SamplingConfig,
                         seed_nodes: np.ndarray | None, seed: int) -> Path | None:
    """InputError when ``config.cache_bytes`` holds no feature row, or when something other
    than this user's cache of the run's settings sits under the name of the training run's
    feature cache (no check when ``config.cache_bytes`` is 0); called before the run writes
    anything. Returns the cache's directory (None without a cache)."""
    if not config.cache_bytes:
        return None
    return check_found_cache(store, config.cache_bytes, config.cache_policy,
                             fanouts=config.fanouts, seed_nodes=seed_nodes,
                             batch_size=config.batch_size, seed=seed)


@contextlib.contextmanager
def training_cache(store: "GraphStore", config: "SamplingConfig", seed_nodes: np.ndarray | None,
                   seed: int, reserve: int = 0) -> Iterator[FeatureCache | None]:
    """The feature cache of a training run (None when ``config.cache_bytes`` is 0), closed
    (and removed, if this process wrote it) when the run ends; ``seed_nodes``: the seed
    ids, None for every node; ``reserve``: bytes of shared memory to leave free for the
    batches in flight."""
    budget = config.cache_bytes
    if budget == 0:
        yield None
        return
    with FeatureCache.build(store, budget, config.cache_policy, fanouts=config.fanouts,
                            seed_nodes=seed_nodes, batch_size=config.batch_size,
                            seed=seed, reserve=reserve) as cache:
        yield cache
