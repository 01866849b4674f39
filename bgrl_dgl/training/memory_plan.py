"""The expected memory of a training run on one machine, from the store's sizes and the settings.

A machine runs ``processes`` training processes (torchrun's ``--nproc-per-node``), each with
``num_workers`` sampling workers. What they need, and where it lives:

* page cache: the topology (``indptr`` + ``indices``), read everywhere by sampling. Evictable,
  so only advised: when it does not fit, sampling reads the disk.
* /dev/shm, once per machine: the feature cache (its rows and a 4-byte slot per node), the
  run's shared arrays (:mod:`~bgrl_dgl.loading.shared_arrays`: two epochs' orders of the
  seeds, 8 bytes per seed each; the float32 whole-graph degrees with ``graph_degrees``, one
  array, or two when the store is not symmetrised; the seed ids of a ``.npy`` file), and the
  batches in flight: a worker hands each batch to its training process through shared
  memory, and the DataLoader keeps ``PREFETCH_FACTOR`` batches per worker outstanding while
  the training process holds the one it trains on, so ``processes x (workers x
  PREFETCH_FACTOR + 1)`` batches sit in /dev/shm at once (:func:`batches_in_flight`).
* anonymous memory of each training process: the interpreter with torch and DGL, and on the
  CPU the model (online, target, predictor), its gradients and AdamW state and the
  activations of a step (on CUDA these live on the GPU, and the process holds the CUDA
  context instead); without workers, the batch it samples.
* anonymous memory of each worker: the interpreter and the batch it is building, twice
  (``WORKER_BATCH_COPIES``).
* pinned memory (CUDA only): the DataLoader copies the features of each view of a batch into
  a page-locked buffer, rounded up to a power of two by torch's caching host allocator, for
  every batch in flight.

The input rows of a batch are estimated layer by layer from the seeds: a destination node
samples ``min(fanout, d)`` neighbours, ``d`` the store's average in-degree (``d`` for fanout
-1), and no two samples are assumed to coincide; by Jensen's inequality (``min`` is concave)
this bounds the expected count from above on any degree distribution. Counts are capped by the
number of nodes. Everything that cannot be paged out (feature cache, shared arrays, batches
in flight, processes, workers, pinned buffers) must fit in the machine's available memory,
and /dev/shm must hold the cache, the shared arrays and the batches; :meth:`MemoryPlan.problem`
says when not.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from bgrl_dgl.errors import InputError
from bgrl_dgl.loading.loader import PREFETCH_FACTOR, SamplingConfig
from bgrl_dgl.model.encoder import Encoder, ModelConfig, Predictor
from bgrl_dgl.store.format import INT32_LIMIT
from bgrl_dgl.training.config import TrainConfig

# Anonymous memory of an idle process with torch, DGL and bgrl_dgl imported (measured
# RssAnon: 263 MiB for a training process, rounded up).
PROCESS_BYTES = 300 << 20
# Host memory a CUDA context and its libraries' private state add to a training process: an
# allowance, not a measurement.
CUDA_HOST_BYTES = 1 << 30
# Shared arrays: the epoch orders kept at once (the current and the previous epoch's),
# int64 per seed each; a whole-graph degree array, float32 per node.
EPOCH_ORDERS_KEPT = 2
DEGREE_BYTES_PER_NODE = 4
# Batches a worker holds while it builds one: the rows it gathers and their copy moved into
# shared memory when it sends them (as measured by scripts/bench_memory_plan.py).
WORKER_BATCH_COPIES = 2
# Feature cache: the int32 slot of every node.
SLOT_BYTES_PER_NODE = 4
# Float32 values kept per destination row of an encoder layer of a view, per output column
# (convolution, normalisation and activation outputs and their gradients), besides one per
# input column (the aggregated neighbours); checked by scripts/bench_memory_plan.py.
ACTIVATION_VALUES_PER_OUTPUT = 8
GIB = 2**30


@dataclass(frozen=True)
class GraphSizes:
    """What the plan needs of a store: counts, the bytes of one feature value and of one
    ``indptr``/``indices`` entry, the number of seed nodes (default: every node) and whether
    the store is symmetrised (then one degree array serves as in- and out-degrees)."""

    num_nodes: int
    num_edges: int
    feat_dim: int
    feat_bytes: int
    index_bytes: int
    num_seeds: int
    symmetrized: bool = True

    @classmethod
    def of(cls, num_nodes: int, num_edges: int, feat_dim: int, feature_dtype: str,
           num_seeds: int | None = None, symmetrized: bool = True) -> "GraphSizes":
        """The sizes of a store that ``prepare`` would write: int32 indices unless N or E
        reaches 2**31 (as the store writer chooses)."""
        index_bytes = 8 if max(num_nodes, num_edges) >= INT32_LIMIT else 4
        return cls(num_nodes, num_edges, feat_dim, np.dtype(feature_dtype).itemsize, index_bytes,
                   num_nodes if num_seeds is None else num_seeds, symmetrized)

    @classmethod
    def of_store(cls, store, num_seeds: int | None = None) -> "GraphSizes":
        """The sizes of an opened :class:`~bgrl_dgl.store.reader.GraphStore`."""
        return cls(store.num_nodes, store.num_edges, store.feat_dim, store.feat_dtype.itemsize,
                   store.index_dtype.itemsize,
                   store.num_nodes if num_seeds is None else num_seeds, store.symmetrized)

    @property
    def avg_degree(self) -> float:
        return self.num_edges / max(self.num_nodes, 1)


@dataclass(frozen=True)
class MachineMemory:
    """A machine's memory: RAM total and available now, /dev/shm's size and free bytes."""

    ram_total: int
    ram_available: int
    shm_total: int
    shm_free: int
    shm_path: Path


@dataclass(frozen=True)
class BatchEstimate:
    """The estimated size of one rank's batch (see the module docstring).

    ``nodes``: nodes per block boundary, input rows first, seeds last; ``edges``: sampled
    edges per layer, input layer first; ``feature_bytes``: the features of the batch as the
    workers ship them (store dtype on CUDA, float32 otherwise), every distinct view;
    ``bytes``: the whole batch as shipped (features, node ids, blocks, degrees).
    """

    nodes: list[int]
    edges: list[int]
    views: int
    feature_bytes: int
    bytes: int


def estimate_batch(sizes: GraphSizes, sampling: SamplingConfig, independent_views: bool,
                   cuda: bool) -> BatchEstimate:
    """The :class:`BatchEstimate` of ``sampling``'s batches on a graph of ``sizes``."""
    dst = min(sampling.batch_size, sizes.num_seeds)
    nodes, edges = [dst], []
    for fanout in reversed(sampling.fanouts):
        per_node = sizes.avg_degree if fanout == -1 else min(fanout, sizes.avg_degree)
        sampled = math.ceil(dst * per_node)
        edges.insert(0, sampled)
        dst = min(dst + sampled, sizes.num_nodes)
        nodes.insert(0, dst)
    views = 2 if independent_views else 1
    value_bytes = sizes.feat_bytes if cuda else 4
    feature_bytes = views * nodes[0] * sizes.feat_dim * value_bytes
    blocks = sum((dst + 1) * 8 + count * 8 for dst, count in zip(nodes[1:], edges))
    if sampling.graph_degrees:
        blocks += sum(4 * (src + dst) for src, dst in zip(nodes[:-1], nodes[1:]))
    total = feature_bytes + views * (nodes[0] * 8 + blocks) + nodes[-1] * 8
    return BatchEstimate(nodes, edges, views, feature_bytes, total)


def parameter_counts(feat_dim: int, model: ModelConfig) -> tuple[int, int]:
    """(every parameter of the model: online and target encoders and predictor, the trainable
    ones: online encoder and predictor), counted on modules built without storage."""
    with torch.device("meta"):
        encoder = Encoder(feat_dim, model)
        predictor = Predictor(encoder.out_dim, model.predictor_hidden)
    online = sum(p.numel() for p in encoder.parameters())
    trainable = online + sum(p.numel() for p in predictor.parameters())
    return trainable + online, trainable


def activation_bytes(batch: BatchEstimate, feat_dim: int, model: ModelConfig) -> int:
    """Host bytes of a CPU step's activations and their gradients: per view (BGRL always runs
    two augmented views), per encoder layer, float32 values per destination row of one per
    input column and ``ACTIVATION_VALUES_PER_OUTPUT`` per output column, plus the views'
    float32 input features."""
    sizes = [feat_dim, *model.hidden]
    per_view = sum(dst * (inp + ACTIVATION_VALUES_PER_OUTPUT * out)
                   for dst, inp, out in zip(batch.nodes[1:], sizes[:-1], sizes[1:]))
    seeds = batch.nodes[-1]
    predictor = seeds * (model.predictor_hidden + sizes[-1]) * ACTIVATION_VALUES_PER_OUTPUT
    return 4 * 2 * (per_view + predictor + batch.nodes[0] * feat_dim)


def pinned_bytes(size: int) -> int:
    """A pinned buffer of ``size`` bytes as torch's caching host allocator reserves it (the
    next power of two)."""
    return 1 << max(size - 1, 0).bit_length() if size else 0


@dataclass(frozen=True)
class MemoryPlan:
    """The expected memory of one machine of a run (bytes; see the module docstring)."""

    processes: int
    workers: int
    cuda: bool
    batch: BatchEstimate
    topology: int
    cache_rows: int
    cache_slots: int
    shared: int
    in_flight: int
    process: int
    process_parts: dict[str, int]
    worker: int
    pinned: int
    gpu: int

    @property
    def cache(self) -> int:
        return self.cache_rows + self.cache_slots

    @property
    def shm_needed(self) -> int:
        """/dev/shm: the feature cache, the shared arrays and the batches in flight."""
        return self.cache + self.shared + self.in_flight

    @property
    def resident(self) -> int:
        """RAM that cannot be paged out: /dev/shm's share, processes, workers, pinned."""
        return (self.shm_needed + self.processes * (self.process + self.pinned)
                + self.processes * self.workers * self.worker)

    def problem(self, machine: MachineMemory, existing_cache: int = 0) -> InputError | None:
        """The InputError of a machine that cannot hold the plan (None when it can);
        ``existing_cache``: bytes of the run's feature cache already in /dev/shm (counted
        as used by the machine, but needed no more)."""
        batches = (f"{self.processes} process(es) x ({self.workers} worker(s) x "
                   f"{PREFETCH_FACTOR} + 1) batches of {gib(self.batch.bytes)}")
        shm_free = machine.shm_free + existing_cache
        if self.shm_needed > shm_free:
            return InputError(machine.shm_path, (
                f"the feature cache ({gib(self.cache)}), the shared arrays "
                f"({gib(self.shared)}) and the batches in flight ({gib(self.in_flight)}: "
                f"{batches}) need {gib(self.shm_needed)} of shared "
                f"memory, only {gib(shm_free)} is free: lower --cache-bytes, --num-workers or "
                "--batch-size (or enlarge /dev/shm)"))
        available = machine.ram_available + existing_cache
        if self.resident > available:
            return InputError(Path("/proc/meminfo"), (
                f"the run needs {gib(self.resident)} of memory that cannot be paged out "
                f"(feature cache {gib(self.cache)}, shared arrays {gib(self.shared)}, "
                f"batches in flight {gib(self.in_flight)}, "
                f"{self.processes} process(es) of {gib(self.process + self.pinned)}, "
                f"{self.processes * self.workers} worker(s) of {gib(self.worker)}), only "
                f"{gib(available)} is available: lower --cache-bytes, --num-workers or "
                "--batch-size, or start fewer processes per machine"))
        return None

    def page_cache_warning(self, machine: MachineMemory, existing_cache: int = 0) -> str | None:
        """A warning when the topology does not fit in the page cache next to the rest."""
        left = machine.ram_available + existing_cache - self.resident
        if self.topology <= left:
            return None
        return (f"warning: the topology ({gib(self.topology)}) does not fit in the "
                f"{gib(max(left, 0))} of page cache the plan leaves: sampling will read the disk")

    def lines(self, machine: MachineMemory) -> list[str]:
        """The plan as aligned lines (figures in GiB)."""
        batch = self.batch
        rows = (f"{batch.nodes[0]:,} input rows x {batch.views} view(s), {batch.nodes[-1]:,} "
                f"seeds: {gib(batch.bytes)} ({gib(batch.feature_bytes)} of features)")
        parts = ", ".join(f"{name} {gib(value)}" for name, value in self.process_parts.items())
        buffer = pinned_bytes(batch.feature_bytes // batch.views)
        pinned = (f"{self.processes} x {batches_in_flight(self.workers) * batch.views} x "
                  f"{gib(buffer)} = "
                  f"{gib(self.processes * self.pinned)}" if self.cuda else "none (CPU)")
        entries = [
            ("batch", rows),
            ("topology", f"{gib(self.topology)} of page cache wanted (indptr + indices)"),
            ("feature cache", f"{gib(self.cache_rows)} rows + {gib(self.cache_slots)} slots "
                              f"(/dev/shm)"),
            ("shared arrays", f"{gib(self.shared)} (epoch orders, degrees; /dev/shm)"),
            ("in flight", f"{self.processes} x ({self.workers} x {PREFETCH_FACTOR} + 1) "
                          f"batches = {gib(self.in_flight)} (/dev/shm)"),
            ("per process", f"{gib(self.process)} x {self.processes} ({parts})"),
            ("per worker", f"{gib(self.worker)} x {self.processes * self.workers}"),
            ("pinned", pinned),
            ("RAM", f"{gib(self.resident)} resident + {gib(self.topology)} page cache; "
                    f"{gib(machine.ram_available)} available of {gib(machine.ram_total)}"),
            ("/dev/shm", f"{gib(self.shm_needed)} of {gib(machine.shm_free)} free "
                         f"({machine.shm_path})"),
        ]
        if self.cuda:
            entries.insert(-2, ("GPU per process", f"{gib(self.gpu)} (model, optimizer, "
                                                   f"activations)"))
        width = max(len(name) for name, _ in entries)
        head = (f"memory plan: {self.processes} process(es) x {self.workers} worker(s) on "
                f"{'cuda' if self.cuda else 'cpu'}")
        return [head] + [f"  {name:<{width}}  {text}" for name, text in entries]


def batches_in_flight(workers: int) -> int:
    """Batches of one training process that exist at once beyond its workers: the
    DataLoader's prefetched ones and the one in use (none without workers)."""
    return workers * PREFETCH_FACTOR + 1 if workers else 0


def gib(size: float) -> str:
    return f"{size / GIB:.2f} GiB"


def plan_memory(sizes: GraphSizes, config: TrainConfig, processes: int,
                cuda: bool) -> MemoryPlan:
    """The :class:`MemoryPlan` of ``processes`` training processes per machine with
    ``config`` on a graph of ``sizes`` (``cuda``: the model runs on GPUs)."""
    sampling = config.sampling
    batch = estimate_batch(sizes, sampling, config.augment.independent_views, cuda)
    workers = sampling.num_workers
    row_bytes = sizes.feat_dim * sizes.feat_bytes
    cached = min(sampling.cache_bytes // max(row_bytes, 1), sizes.num_nodes)
    all_params, trainable = parameter_counts(sizes.feat_dim, config.model)
    model_state = 4 * (all_params + 3 * trainable)  # weights, gradients, AdamW's two moments
    activations = activation_bytes(batch, sizes.feat_dim, config.model)
    degree_arrays = (1 if sizes.symmetrized else 2) if sampling.graph_degrees else 0
    seed_file = sampling.seeds != "all" and not sampling.seeds.startswith("split:")
    shared = (8 * sizes.num_seeds * (EPOCH_ORDERS_KEPT + seed_file)
              + DEGREE_BYTES_PER_NODE * sizes.num_nodes * degree_arrays)
    parts = {"base": PROCESS_BYTES}
    if cuda:
        parts["CUDA context"] = CUDA_HOST_BYTES
    else:
        parts.update({"model and optimizer": model_state, "activations": activations})
    if workers == 0:
        parts["batch"] = batch.bytes
    return MemoryPlan(
        processes=processes, workers=workers, cuda=cuda, batch=batch,
        topology=(sizes.num_nodes + 1 + sizes.num_edges) * sizes.index_bytes,
        cache_rows=cached * row_bytes,
        cache_slots=SLOT_BYTES_PER_NODE * sizes.num_nodes if cached else 0, shared=shared,
        in_flight=processes * batches_in_flight(workers) * batch.bytes,
        process=sum(parts.values()), process_parts=parts,
        worker=PROCESS_BYTES + WORKER_BATCH_COPIES * batch.bytes if workers else 0,
        pinned=(batches_in_flight(workers) * batch.views
                * pinned_bytes(batch.feature_bytes // batch.views) if cuda else 0),
        gpu=model_state + activations if cuda else 0)
