"""Training throughput with 1, 2, ... processes under torchrun (DDP), on CPUs or GPUs.

For each process count P, ``torchrun --standalone --nproc-per-node=P -m bgrl_dgl train`` runs
``--warmup + --steps`` steps of BGRL on a synthetic store (by default 200k nodes / ~4M stored
edges / 128-d float16 features, prepared once into ``data/bench-scaling-<nodes>``), every
process with the same per-process batch, so the global batch grows with P. Throughput is
read from rank 0's metrics.jsonl: the seeds of the global batches of the counted steps over
the wall time between the end of the last warm-up step and the end of the last step.

On CPUs every process gets ``cores / P`` cores (its sampling workers included); on GPUs, one
GPU each (``--device cuda``; process counts default to 1, 2, 4, ... up to the GPUs present).
Last line printed: one JSON object.

    .venv/bin/python scripts/bench_scaling.py [--procs 1,2] [--device cpu|cuda] [--steps 40]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchlib import DATA, REPO, benchmark_store


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-nodes", type=int, default=200_000)
    parser.add_argument("--avg-degree", type=float, default=10.0)
    parser.add_argument("--feat-dim", type=int, default=128)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--procs", help="process counts, e.g. 1,2 (default: 1,2 on cpu; "
                                        "1,2,4,... up to the GPU count on cuda)")
    parser.add_argument("--batch-size", type=int, default=1024, help="seeds per process and step")
    parser.add_argument("--fanouts", default="10,10")
    parser.add_argument("--hidden", default="256,256")
    parser.add_argument("--conv", default="sage")
    parser.add_argument("--num-workers", type=int, default=1, help="sampling workers per process")
    parser.add_argument("--warmup", type=int, default=10, help="uncounted steps")
    parser.add_argument("--steps", type=int, default=40, help="counted steps")
    args = parser.parse_args(argv)
    if args.procs is None:
        top = torch.cuda.device_count() if args.device == "cuda" else 2
        args.procs = ",".join(str(2 ** k) for k in range(top.bit_length()))
    args.procs = [int(p) for p in args.procs.split(",")]
    if args.device == "cuda" and max(args.procs) > torch.cuda.device_count():
        parser.error(f"--procs {max(args.procs)} exceeds the {torch.cuda.device_count()} GPUs")
    return args


def train_command(args: argparse.Namespace, store: Path, run: Path, procs: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc-per-node={procs}", "-m", "bgrl_dgl", "train", "--data", str(store),
            "--out", str(run), "--device", args.device, "--conv", args.conv,
            "--hidden", args.hidden, "--fanouts", args.fanouts,
            "--batch-size", str(args.batch_size), "--num-workers", str(args.num_workers),
            "--max-steps", str(args.warmup + args.steps), "--log-every", "1",
            "--checkpoint-every", str(10 ** 9)]


def throughput(metrics: list[dict], warmup: int) -> dict[str, float]:
    """Global seeds/s of the steps after ``warmup``, and rank 0's mean time split (ms)."""
    counted = [m for m in metrics if m["step"] > warmup]
    start = next(m["elapsed_s"] for m in metrics if m["step"] == warmup)
    seconds = counted[-1]["elapsed_s"] - start
    mean_ms = {key: round(1000 * sum(m[key] for m in counted) / len(counted), 1)
               for key in ("wait_s", "compute_s", "sample_s", "features_s")}
    return {"seeds_per_s": sum(m["seeds"] for m in counted) / seconds, **mean_ms}


def measure(args: argparse.Namespace, store: Path, procs: int, tmp: Path) -> dict[str, float]:
    run = tmp / f"run-{procs}"
    command = train_command(args, store, run, procs)
    print("running:", " ".join(command), flush=True)
    start = time.perf_counter()
    result = subprocess.run(command, cwd=REPO, stdin=subprocess.DEVNULL,
                            capture_output=True, text=True, timeout=3600)
    if result.returncode:
        sys.exit(f"failed ({result.returncode}):\n{result.stderr[-3000:]}")
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    figures = throughput(metrics, args.warmup)
    figures["wall_s"] = round(time.perf_counter() - start, 1)
    print(f"{procs} process(es): {figures['seeds_per_s']:,.0f} seeds/s  {figures}", flush=True)
    return figures


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    store = benchmark_store("scaling", args, num_classes=10)
    with tempfile.TemporaryDirectory(prefix="bench-scaling-", dir=DATA) as tmp:
        runs = {procs: measure(args, store, procs, Path(tmp)) for procs in args.procs}
    base = runs[args.procs[0]]["seeds_per_s"] / args.procs[0]
    cores = f"{os.cpu_count()} CPU cores"
    device = torch.cuda.get_device_name() if args.device == "cuda" else cores
    result = {
        "device": device,
        "procs": args.procs,
        "seeds_per_s": [round(runs[p]["seeds_per_s"], 1) for p in args.procs],
        "speedup": [round(runs[p]["seeds_per_s"] / runs[args.procs[0]]["seeds_per_s"], 3)
                    for p in args.procs],
        "efficiency": [round(runs[p]["seeds_per_s"] / (base * p), 3) for p in args.procs],
        "per_process_batch": args.batch_size,
        "runs": {str(p): runs[p] for p in args.procs},
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
