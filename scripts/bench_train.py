"""Benchmark a BGRL training step against a plain supervised GraphSAGE step on the same batches.

Both arms are fed by the same :class:`~bgrl_dgl.loading.loader.BatchLoader` (as ``train``
builds it), over the same batches (global steps ``0 .. warmup + steps - 1``), and are timed
end to end: each step's wait for the loader plus its compute. The first ``--warmup`` steps of
each arm (worker start-up, cold page cache, allocator growth) are not counted.

* BGRL: ``Trainer.train_step`` - two augmented views, online encoder + predictor forward and
  backward, target forward, optimizer step, EMA update.
* supervised: ``dgl.nn.SAGEConv(..., 'mean')`` layers of the same sizes as the encoder (ReLU
  after each) and a linear classifier, cross-entropy on the seeds' labels, Adam. DGL blocks
  are built from the batch's Adjacency tensors with ``dgl.create_block`` (counted as compute).

The arms run back to back, ``--rounds`` times (default: 2 rounds of 15 counted steps per arm),
alternating which goes first, so that a drift in background load does not favour one arm.
The ratio is supervised seeds/s over BGRL seeds/s; dense FLOPs per step of each arm
(``torch.utils.flop_counter``, matrix products only; sparse aggregation is not counted) give
the ratio the arithmetic alone would predict.

Threads: the loader worker samples with one thread, so this process computes with the
remaining cores (``--threads``, default: usable cores minus ``--num-workers``). On the 2-core
machine this was written for that is 1 thread next to 1 worker: with 2 compute threads the
3 busy threads oversubscribe the 2 cores, every OpenMP parallel region waits for its
descheduled thread, and both arms ran about 2x slower.

With ``--device cuda`` the BGRL arm runs on the GPU and the supervised arm is left out
(``dgl.nn`` layers need DGL's CUDA kernels, which the installed DGL lacks; the ratio is then
null). The report adds the share of a BGRL step spent waiting for the loader, the number of
sampling workers that would keep the GPU busy (a worker's time per batch over the compute
time per step, rounded up) and the peak GPU memory of a step
(``torch.cuda.max_memory_allocated``).

The synthetic store is prepared once (``bgrl-dgl prepare synthetic ... --feature-dtype
float16``) into ``--data`` (default ``data/bench-train-<nodes>``, e.g. ``data/bench-train-1m``)
and reused when its parameters match. Last line printed: one JSON object.

    .venv/bin/python scripts/bench_train.py [--num-nodes 50000 --steps 5] [--profile-steps 3]
    .venv/bin/python scripts/bench_train.py --device cuda --num-workers 4
"""
from __future__ import annotations

import argparse
import cProfile
import json
import math
import os
import pstats
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import dgl
import torch
import torch.nn.functional as F
from torch import nn
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode, flop_registry

import bgrl_dgl  # noqa: F401  (sets the DGL backend)
from bgrl_dgl import config as cfg
from bgrl_dgl.loading.loader import BatchLoader
from bgrl_dgl.loading.sampler import SampledBatch
from bgrl_dgl.model.adjacency import Adjacency
from bgrl_dgl.store.reader import GraphStore
from bgrl_dgl.training.config import TrainConfig
from bgrl_dgl.training.distributed import World, process_device
from bgrl_dgl.training.trainer import Trainer, batch_loader, build_trainer

from benchlib import DATA, size_label, synthetic_store

# Generator parameters of the store, checked before an existing store is reused.
STORE_PARAMS = ("num_nodes", "avg_degree", "feat_dim", "num_classes", "feature_dtype", "seed")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    data = parser.add_argument_group("synthetic graph")
    data.add_argument("--data", type=Path,
                      help="store to use, prepared there if absent "
                           "(default: data/bench-train-<nodes>)")
    data.add_argument("--num-nodes", type=int, default=1_000_000)
    data.add_argument("--avg-degree", type=float, default=10.0,
                      help="input edges per node before symmetrization (default: 10, ~20 stored)")
    data.add_argument("--feat-dim", type=int, default=128)
    data.add_argument("--num-classes", type=int, default=10)
    data.add_argument("--feature-dtype", choices=["float16", "float32"], default="float16")
    data.add_argument("--seed", type=int, default=0, help="graph, weights and batches seed")
    train = parser.add_argument_group("training")
    train.add_argument("--fanouts", default="10,10", help="neighbours per layer, input layer first")
    train.add_argument("--batch-size", type=int, default=1024)
    train.add_argument("--conv", choices=["sage"], default="sage",
                       help="encoder convolution (the supervised arm is GraphSAGE)")
    train.add_argument("--hidden", default="256,256", help="layer sizes of both models")
    train.add_argument("--num-workers", type=int, default=1, help="loader worker processes")
    train.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                       help="where the BGRL arm runs (cuda: without the supervised arm)")
    train.add_argument("--threads", type=int,
                       help="torch threads of this process (default: usable cores minus "
                            "--num-workers, at least 1)")
    bench = parser.add_argument_group("measurement")
    bench.add_argument("--warmup", type=int, default=5, help="uncounted steps per arm and round")
    bench.add_argument("--steps", type=int, default=15, help="counted steps per arm and round")
    bench.add_argument("--rounds", type=int, default=2,
                       help="times the pair of arms is run, alternating which goes first")
    bench.add_argument("--profile-steps", type=int, default=0,
                       help="afterwards, profile this many BGRL steps on one loaded batch "
                            "(torch.profiler by operator and shape, then cProfile by function)")
    args = parser.parse_args(argv)
    if args.steps <= 0 or args.rounds <= 0 or (args.threads is not None and args.threads <= 0):
        parser.error("--steps, --rounds and --threads must be positive")
    if args.warmup < 0 or args.profile_steps < 0:
        parser.error("--warmup and --profile-steps must be >= 0")
    if args.threads is None:
        args.threads = max(1, len(os.sched_getaffinity(0)) - args.num_workers)
    if args.data is None:
        args.data = DATA / f"bench-train-{size_label(args.num_nodes)}"
    return args


def int_list(text: str) -> list[int]:
    return [int(part) for part in text.split(",")]


# ---- the store ---------------------------------------------------------------------------
def ensure_store(args: argparse.Namespace) -> GraphStore:
    """The store at ``args.data``, prepared first unless it holds this benchmark's graph."""
    synthetic_store(args.data, **{name: getattr(args, name) for name in STORE_PARAMS})
    return GraphStore.open(args.data)


# ---- the two arms --------------------------------------------------------------------------
def train_config(args: argparse.Namespace, total_steps: int) -> TrainConfig:
    return cfg.from_sections(TrainConfig, {
        "sampling": {"fanouts": int_list(args.fanouts), "batch_size": args.batch_size,
                     "num_workers": args.num_workers, "seeds": "all"},
        "model": {"conv": args.conv, "hidden": int_list(args.hidden)},
        "optim": {"max_steps": total_steps},
        "run": {"seed": args.seed, "device": args.device},
    }, source="bench_train")


class SupervisedSAGE(nn.Module):
    """``dgl.nn.SAGEConv('mean')`` layers (ReLU after each) and a linear classifier."""

    def __init__(self, in_dim: int, hidden: list[int], num_classes: int) -> None:
        super().__init__()
        sizes = [in_dim, *hidden]
        self.convs = nn.ModuleList(dgl.nn.SAGEConv(a, b, "mean")
                                   for a, b in zip(sizes[:-1], sizes[1:]))
        self.classifier = nn.Linear(sizes[-1], num_classes)

    def forward(self, blocks: list[dgl.DGLGraph], x: torch.Tensor) -> torch.Tensor:
        """x [blocks[0] sources, in_dim] -> logits [blocks[-1] destinations, num_classes]."""
        h = x
        for conv, block in zip(self.convs, blocks):
            h = F.relu(conv(block, h))
        return self.classifier(h)


def to_block(adj: Adjacency) -> dgl.DGLGraph:
    """The DGL block of an Adjacency (no edge ids; the CSC is used as is)."""
    no_edge_ids = torch.empty(0, dtype=adj.indices.dtype)
    return dgl.create_block(("csc", (adj.indptr, adj.indices, no_edge_ids)),
                            num_src_nodes=adj.num_src, num_dst_nodes=adj.num_dst)


class SupervisedStep:
    """One Adam step of :class:`SupervisedSAGE` on the first view of a batch."""

    def __init__(self, store: GraphStore, hidden: list[int], seed: int) -> None:
        torch.manual_seed(seed)
        self.labels = store.labels
        self.model = SupervisedSAGE(store.feat_dim, hidden, store.num_classes)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=1e-3)

    def __call__(self, batch: SampledBatch) -> dict[str, float]:
        start = time.perf_counter()
        view = batch.views[0]
        blocks = [to_block(adj) for adj in view.adjs]
        blocks_s = time.perf_counter() - start
        labels = torch.from_numpy(self.labels[batch.seeds.numpy()])
        loss = F.cross_entropy(self.model(blocks, view.features.float()), labels, ignore_index=-1)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return {"sample_s": batch.sample_s, "features_s": batch.gather_s, "blocks_s": blocks_s,
                "compute_s": time.perf_counter() - start}


Step = Callable[[SampledBatch], dict[str, float]]


@dataclass
class ArmResult:
    """Counted steps of one arm: seeds, wall time, and per-step timings (seconds)."""

    seeds: int = 0
    wall_s: float = 0.0
    steps: list[dict[str, float]] = field(default_factory=list)

    @property
    def seeds_per_s(self) -> float:
        return self.seeds / self.wall_s

    def mean_ms(self) -> dict[str, float]:
        """Mean per-step milliseconds of every timing (``wait``, ``compute``, ``sample``, ...)."""
        return {name.removesuffix("_s"): 1e3 * statistics.fmean(step[name] for step in self.steps)
                for name in self.steps[0]}


def run_arm(loader: BatchLoader, step: Step, warmup: int, steps: int, result: ArmResult) -> None:
    """Feed ``warmup + steps`` batches to ``step``; add the last ``steps`` to ``result``.

    Wall time runs from the start of the first counted wait to the end of the last step.
    """
    batches = loader.batches(0, warmup + steps)
    for _ in range(warmup):
        step(next(batches))
    start = waited = time.perf_counter()
    for batch in batches:
        wait_s = time.perf_counter() - waited
        timings = step(batch)
        result.steps.append({"wait_s": wait_s, **timings})
        result.seeds += len(batch.seeds)
        waited = time.perf_counter()
    result.wall_s += waited - start


class BGRLStep:
    """``trainer.train_step`` reduced to its timings; on CUDA, ``peaks`` collects the peak
    GPU memory (bytes allocated) of every step."""

    def __init__(self, trainer: Trainer) -> None:
        self.trainer = trainer
        self.cuda = trainer.device.type == "cuda"
        self.peaks: list[int] = []

    def __call__(self, batch: SampledBatch) -> dict[str, float]:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.trainer.device)
        metrics = self.trainer.train_step(batch)
        if self.cuda:
            self.peaks.append(torch.cuda.max_memory_allocated(self.trainer.device))
        return {name: metrics[name] for name in ("sample_s", "features_s", "compute_s")}


def loader_figures(bgrl: ArmResult, num_workers: int) -> dict[str, float | int]:
    """The share of a BGRL step spent waiting for the loader, and how many sampling workers
    would keep up with compute: a worker needs ``sample + features`` per batch, compute
    consumes a batch per ``compute``."""
    ms = bgrl.mean_ms()
    per_batch = ms["sample"] + ms["features"]
    return {"loader_wait_share": ms["wait"] / (ms["wait"] + ms["compute"]),
            "workers_needed": max(1, math.ceil(per_batch / ms["compute"])),
            "num_workers": num_workers}


def dense_only(formula: Callable[..., int]) -> Callable[..., int]:
    """A flop formula that counts nothing when an operand is sparse (torch would count a
    sparse CSR product as dense)."""
    def count(*args, **kwargs) -> int:
        if any(isinstance(a, torch.Tensor) and a.layout != torch.strided for a in args):
            return 0
        return formula(*args, **kwargs)
    count._get_raw = True  # FlopCounterMode passes tensors, not shapes
    return count


def dense_gflops(step: Step, batch: SampledBatch) -> float:
    """Dense (matrix product) GFLOPs of one step on ``batch``; the step really runs."""
    mapping = {op: dense_only(formula) for op, formula in flop_registry.items()}
    with FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        step(batch)
    return counter.get_total_flops() / 1e9


# ---- profiling -----------------------------------------------------------------------------
def profile_bgrl(trainer: Trainer, batch: SampledBatch, steps: int) -> None:
    """Print where ``steps`` BGRL steps on one loaded ``batch`` (no loader running) spend
    their time: operators by self time and input shapes (torch.profiler), then the slowest
    bgrl_dgl functions by cumulative time and all functions by own time (cProfile)."""
    trainer.train_step(batch)
    activities = [ProfilerActivity.CPU]
    if trainer.device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities, record_shapes=True) as prof:
        for _ in range(steps):
            trainer.train_step(batch)
    print(prof.key_averages(group_by_input_shape=True).table(
        sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=40,
        max_shapes_column_width=70))
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(steps):
        trainer.train_step(batch)
    profiler.disable()
    stats = pstats.Stats(profiler, stream=sys.stdout)
    stats.sort_stats("cumulative").print_stats("bgrl_dgl", 20)
    stats.sort_stats("tottime").print_stats(15)


# ---- report --------------------------------------------------------------------------------
def batch_shape(batch: SampledBatch) -> dict[str, list[int]]:
    view = batch.views[0]
    return {"num_src": [a.num_src for a in view.adjs], "num_dst": [a.num_dst for a in view.adjs],
            "num_edges": [a.num_edges for a in view.adjs]}


def print_report(bgrl: ArmResult, supervised: ArmResult | None, flops: dict[str, float],
                 loader: dict[str, float | int]) -> None:
    b = bgrl.mean_ms()
    print(f"BGRL:       {bgrl.seeds_per_s:8.0f} seeds/s  "
          f"{1e3 * bgrl.wall_s / len(bgrl.steps):7.1f} ms/step"
          f"  (wait {b['wait']:.1f} + compute {b['compute']:.1f} ms)")
    print(f"loader wait: {100 * loader['loader_wait_share']:.1f}% of a BGRL step with "
          f"{loader['num_workers']} worker(s); workers to keep up: {loader['workers_needed']}")
    if supervised is None:
        print(f"loader worker per batch (overlaps compute): sample {b['sample']:.1f} ms, "
              f"features {b['features']:.1f} ms")
        print(f"dense GFLOP/step: BGRL {flops['bgrl']:.2f}")
        return
    ratio = supervised.seeds_per_s / bgrl.seeds_per_s
    s = supervised.mean_ms()
    print(f"supervised: {supervised.seeds_per_s:8.0f} seeds/s  "
          f"{1e3 * supervised.wall_s / len(supervised.steps):7.1f} ms/step"
          f"  (wait {s['wait']:.1f} + compute {s['compute']:.1f} ms, "
          f"of which blocks {s['blocks']:.1f})")
    print(f"loader worker per batch (overlaps compute): sample {b['sample']:.1f} ms, "
          f"features {b['features']:.1f} ms")
    print(f"dense GFLOP/step: BGRL {flops['bgrl']:.2f}, supervised {flops['supervised']:.2f} "
          f"(ratio {flops['bgrl'] / flops['supervised']:.2f})")
    print(f"ratio supervised/BGRL seeds/s: {ratio:.2f} (goal <= 3.0)")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    store = ensure_store(args)
    device = process_device(args.device, World())
    # Schedules (lr, EMA tau) span every step taken: the arms, one FLOP count, the profile.
    total_steps = args.rounds * (args.warmup + args.steps) + 2 + 2 * args.profile_steps
    with tempfile.TemporaryDirectory(prefix="bench-train-") as run_dir:
        config = train_config(args, total_steps)
        trainer, schedule = build_trainer(config, store, Path(run_dir), device)
        loader = batch_loader(config, store, schedule, device)
        bgrl_step = BGRLStep(trainer)
        bgrl = ArmResult()
        arms: list[tuple[Step, ArmResult]] = [(bgrl_step, bgrl)]
        supervised: ArmResult | None = None
        if device.type == "cpu":
            supervised_step = SupervisedStep(store, int_list(args.hidden), args.seed)
            supervised = ArmResult()
            arms.append((supervised_step, supervised))
        for index in range(args.rounds):
            for step, result in arms[::-1] if index % 2 else arms:
                run_arm(loader, step, args.warmup, args.steps, result)
        batch, = loader.batches(0, 1)
        flops = {"bgrl": dense_gflops(bgrl_step, batch)}
        if supervised is not None:
            flops["supervised"] = dense_gflops(supervised_step, batch)
        loader_stats = loader_figures(bgrl, args.num_workers)
        print_report(bgrl, supervised, flops, loader_stats)
        if bgrl_step.peaks:
            print(f"peak GPU memory of a BGRL step: {max(bgrl_step.peaks) / 2**30:.2f} GiB")
        if args.profile_steps:
            profile_bgrl(trainer, batch, args.profile_steps)
    print(json.dumps({
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        "bgrl_seeds_per_s": bgrl.seeds_per_s,
        "supervised_seeds_per_s": None if supervised is None else supervised.seeds_per_s,
        "ratio": None if supervised is None else supervised.seeds_per_s / bgrl.seeds_per_s,
        "loader_wait_share": loader_stats["loader_wait_share"],
        "workers_needed": loader_stats["workers_needed"],
        "peak_gpu_mem_gb": max(bgrl_step.peaks) / 2**30 if bgrl_step.peaks else None,
        "bgrl_ms": bgrl.mean_ms(),
        "supervised_ms": None if supervised is None else supervised.mean_ms(),
        "dense_gflop_per_step": flops,
        "first_batch": batch_shape(batch),
        "config": {**{name: getattr(args, name) for name in STORE_PARAMS},
                   "num_edges": store.num_edges, "fanouts": int_list(args.fanouts),
                   "batch_size": args.batch_size, "conv": args.conv,
                   "hidden": int_list(args.hidden),
                   "device": args.device, "num_workers": args.num_workers,
                   "threads": args.threads,
                   "warmup": args.warmup, "steps": args.steps, "rounds": args.rounds},
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
