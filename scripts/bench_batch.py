"""Cost of a BGRL step against batch size: input rows per seed and time per seed.

For each store and batch size, BGRL trains a few steps with the default settings (only the
batch size changes) in one process, sampling in that process (``--num-workers 0``), so the
time of every part is measured. Per arm: the mean number of sampled input rows (the sources
of the first block, whose features are read and multiplied) and of first-layer destinations
per seed, the time per step split into sampling + feature gathering (which a sampling
worker overlaps with compute in a real run) and compute, and the time per seed. The arms of
one store run in one process, one after the other, so compare them within a run; the load
average is printed with every arm. ``--sparse-input off,on`` measures every batch size with
dense and with sparse input rows (the extraction of the non-zeros counts as feature
gathering). Last line: one JSON object.

    .venv/bin/python scripts/bench_batch.py --store data/cora --store data/syn22k \\
        [--batch-sizes 256,512,1024,2048] [--steps 6] [--warmup 2] [--threads 1] \\
        [--sparse-input auto|on|off|off,on]
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import bgrl_dgl  # noqa: F401  (sets the DGL backend)
from bgrl_dgl.store.reader import GraphStore
from bgrl_dgl.training.config import TrainConfig
from bgrl_dgl.training.trainer import batch_loader, build_trainer

CPU = torch.device("cpu")


def measure(store: GraphStore, batch_size: int, steps: int, warmup: int,
            threads: int, compute: bool = True, sparse_input: str = "auto") -> dict[str, float]:
    """Mean figures of ``steps`` BGRL steps after ``warmup`` uncounted ones (without
    ``compute``: of the sampled batches only, with no training step)."""
    config = TrainConfig.defaults()
    config.sampling.batch_size = batch_size
    config.sampling.sparse_input = sparse_input
    config.sampling.num_workers = 0
    config.run.threads = threads
    config.optim.max_steps = warmup + steps
    with tempfile.TemporaryDirectory(prefix="bench-batch-") as tmp:
        trainer, schedule = build_trainer(config, store, Path(tmp), CPU)
        loader = batch_loader(config, store, schedule, CPU)
        rows: list[dict[str, float]] = []
        for batch in loader.batches(0, warmup + steps):
            first = batch.views[0].adjs[0]
            metrics = (trainer.train_step(batch) if compute else
                       {"sample_s": batch.sample_s, "features_s": batch.gather_s,
                        "compute_s": 0.0})
            rows.append({"seeds": len(batch.seeds), "inputs": first.num_src,
                         "layer1": first.num_dst,
                         "sample_s": metrics["sample_s"] + metrics["features_s"],
                         "compute_s": metrics["compute_s"]})
    counted = rows[warmup:]
    seeds = sum(r["seeds"] for r in counted)
    total = {key: sum(r[key] for r in counted) for key in counted[0]}
    step_s = (total["sample_s"] + total["compute_s"]) / len(counted)
    return {
        "batch_size": batch_size,
        "sparse_input": sparse_input,
        "sparse_rows": loader.sparse_rows,
        "seeds_per_step": seeds / len(counted),
        "input_rows_per_seed": total["inputs"] / seeds,
        "input_share_of_graph": total["inputs"] / len(counted) / store.num_nodes,
        "layer1_rows_per_seed": total["layer1"] / seeds,
        "sample_s_per_step": total["sample_s"] / len(counted),
        "compute_s_per_step": total["compute_s"] / len(counted),
        "step_s": step_s,
        "ms_per_seed": 1000 * step_s * len(counted) / seeds,
        "load": os.getloadavg()[0],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", action="append", required=True, help="a store (repeatable)")
    parser.add_argument("--batch-sizes", default="256,512,1024,2048")
    parser.add_argument("--steps", type=int, default=6, help="counted steps per arm")
    parser.add_argument("--warmup", type=int, default=2, help="uncounted steps per arm")
    parser.add_argument("--threads", type=int, default=1,
                        help="compute threads (default 1: what a default run on 2 cores "
                             "leaves next to its sampling worker)")
    parser.add_argument("--sparse-input", default="auto",
                        help="comma-separated settings of --sparse-input to measure (auto, on, "
                             "off), each an arm of every batch size")
    parser.add_argument("--sample-only", action="store_true",
                        help="measure the sampled batches only (input rows), no training step")
    args = parser.parse_args()
    sizes = [int(s) for s in args.batch_sizes.split(",")]
    results = []
    for path in args.store:
        store = GraphStore.open(path)
        print(f"{path}: {store.num_nodes:,} nodes, {store.num_edges:,} edges, "
              f"{store.feat_dim}-d {np.dtype(store.features.dtype).name}", flush=True)
        for size, sparse in itertools.product(sizes, args.sparse_input.split(",")):
            start = time.perf_counter()
            row = {"store": str(path), "num_nodes": store.num_nodes, "feat_dim": store.feat_dim,
                   **measure(store, size, args.steps, args.warmup, args.threads,
                              not args.sample_only, sparse)}
            results.append(row)
            rows = "sparse" if row["sparse_rows"] else "dense"
            print(f"  batch {size:5d}, {rows:6s}: "
                  f"{row['input_rows_per_seed']:6.1f} input rows/seed "
                  f"({100 * row['input_share_of_graph']:.0f}% of the graph), "
                  f"{row['layer1_rows_per_seed']:5.2f} layer-1 rows/seed, step "
                  f"{row['step_s']:.2f} s (sampling+features {row['sample_s_per_step']:.2f}, "
                  f"compute {row['compute_s_per_step']:.2f}), {row['ms_per_seed']:.2f} ms/seed, "
                  f"load {row['load']:.1f} [{time.perf_counter() - start:.0f} s]", flush=True)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
