"""Compare the memory plan with what a training run uses: the per-process and per-worker
figures of ``bgrl-dgl plan`` against the peak anonymous memory (``RssAnon`` of
``/proc/<pid>/status``) of the ``train`` process and of each of its sampling workers, the
plan's /dev/shm figure (shared arrays and batches in flight; no feature cache) against the
peak of /dev/shm's used bytes over the run (less those used before it started; other users
of /dev/shm on the machine blur it), and the planned batch against the mean of batches
sampled with the run's settings.

The store is the float16 synthetic one of ``bench_train.py`` (``data/bench-train-<nodes>``,
prepared once and reused). ``train`` runs on the CPU with ``--num-workers`` workers (default
2) and the other settings given after ``--`` (default: the trainer's); the process tree is
sampled every ``--interval`` seconds. Last line printed: one JSON object.

    .venv/bin/python scripts/bench_memory_plan.py [--num-nodes 1000000] [--steps 40] \\
        [-- --batch-size 1024 --fanouts 10,10]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

from bgrl_dgl import config as cfg
from bgrl_dgl.loading.sampler import NeighborBatchSampler
from bgrl_dgl.store.reader import GraphStore
from bgrl_dgl.training.config import TrainConfig
from bgrl_dgl.training.memory_plan import GraphSizes, plan_memory

from benchlib import DATA, REPO, size_label, synthetic_store
from memwatch import ProcessTree, read_parent_pid, rss_anon_bytes

MIB = 2**20


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-nodes", type=int, default=1_000_000)
    parser.add_argument("--avg-degree", type=float, default=10.0)
    parser.add_argument("--feat-dim", type=int, default=128)
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--interval", type=float, default=0.05)
    parser.add_argument("--data", type=Path, help="store (default: data/bench-train-<nodes>)")
    parser.add_argument("train_flags", nargs="*", help="more train flags, after --")
    return parser.parse_args(argv)


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as file:
            return file.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def shm_used() -> int:
    stat = os.statvfs("/dev/shm")
    return (stat.f_blocks - stat.f_bfree) * stat.f_frsize


class Sampler:
    """Peak RssAnon of the training process and of each worker, and peak /dev/shm use."""

    def __init__(self, root: int, interval: float) -> None:
        self.root, self.interval = root, interval
        self.tree = ProcessTree(root)
        self.train_peak = 0
        self.worker_peaks: dict[int, int] = {}
        self.shm_base = shm_used()
        self.shm_peak = 0
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def sample(self) -> None:
        self.train_peak = max(self.train_peak, rss_anon_bytes(self.root))
        pids = self.tree.pids()
        # The workers are the children of the forkserver (itself a child of the training
        # process, with the same command line as its children); the resource tracker and
        # the forkserver are left out.
        servers = {pid for pid in pids
                   if read_parent_pid(pid) == self.root and "forkserver" in cmdline(pid)}
        for pid in pids:
            if read_parent_pid(pid) in servers:
                self.worker_peaks[pid] = max(self.worker_peaks.get(pid, 0), rss_anon_bytes(pid))
        self.shm_peak = max(self.shm_peak, shm_used() - self.shm_base)

    def run(self) -> None:
        while not self.stopped.wait(self.interval):
            self.sample()


def sampled_batch_bytes(store: GraphStore, config: TrainConfig, batches: int = 8) -> float:
    """Mean bytes of ``batches`` batches as CPU workers ship them (float32 features), seeds
    drawn at random."""
    sampler = NeighborBatchSampler(store, config.sampling.fanouts, config.sampling.graph_degrees)
    rng = np.random.default_rng(0)
    total = 0
    for index in range(batches):
        seeds = torch.from_numpy(rng.choice(store.num_nodes, config.sampling.batch_size,
                                            replace=False))
        batch = sampler.sample(seeds, index, config.augment.independent_views)
        views = batch.views[:1] if batch.views[0] is batch.views[1] else batch.views
        tensors = [batch.seeds]
        for view in views:
            tensors += [view.features.float(), view.input_nodes]
            for adj in view.adjs:
                tensors += [t for t in (adj.indptr, adj.indices, adj.src_degree,
                                        adj.dst_degree) if t is not None]
        total += sum(t.numel() * t.element_size() for t in tensors)
    return total / batches


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    store = args.data or synthetic_store(
        DATA / f"bench-train-{size_label(args.num_nodes)}", num_nodes=args.num_nodes,
        avg_degree=args.avg_degree, feat_dim=args.feat_dim, num_classes=10,
        feature_dtype="float16", seed=0)
    flags = ["--device", "cpu", "--num-workers", str(args.num_workers), "--max-steps",
             str(args.steps), "--checkpoint-every", str(10 * args.steps), *args.train_flags]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    plan = subprocess.run([sys.executable, "-m", "bgrl_dgl", "plan", "--data", str(store),
                           *flags], cwd=REPO, capture_output=True, text=True, env=env)
    print(plan.stdout, end="", flush=True)
    parser = argparse.ArgumentParser()
    cfg.add_section_arguments(parser, TrainConfig)
    config = cfg.from_sections(TrainConfig, {}, parser.parse_args(flags))
    planned = plan_memory(GraphSizes.of_store(GraphStore.open(store)), config, 1, False)
    batch_bytes = sampled_batch_bytes(GraphStore.open(store), config)
    with tempfile.TemporaryDirectory() as tmp:
        command = [sys.executable, "-m", "bgrl_dgl", "train", "--data", str(store), "--out",
                   str(Path(tmp) / "run"), *flags]
        print("running:", " ".join(command), flush=True)
        start = time.perf_counter()
        process = subprocess.Popen(command, cwd=REPO, stdin=subprocess.DEVNULL, env=env)
        sampler = Sampler(process.pid, args.interval)
        sampler.thread.start()
        process.wait()
        sampler.stopped.set()
        sampler.thread.join()
        wall = time.perf_counter() - start
    if process.returncode:
        sys.exit(f"train failed with status {process.returncode}")
    workers = sorted(sampler.worker_peaks.values(), reverse=True)[:args.num_workers]
    result = {
        "num_nodes": args.num_nodes, "num_workers": args.num_workers, "steps": args.steps,
        "flags": flags, "wall_s": round(wall, 1),
        "batch_planned_mib": round(planned.batch.bytes / MIB, 1),
        "batch_measured_mib": round(batch_bytes / MIB, 1),
        "process_planned_mib": round(planned.process / MIB, 1),
        "process_measured_mib": round(sampler.train_peak / MIB, 1),
        "worker_planned_mib": round(planned.worker / MIB, 1),
        "worker_measured_mib": [round(peak / MIB, 1) for peak in workers],
        "in_flight_planned_mib": round(planned.in_flight / MIB, 1),
        "shm_planned_mib": round(planned.shm_needed / MIB, 1),
        "shm_peak_measured_mib": round(sampler.shm_peak / MIB, 1),
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
