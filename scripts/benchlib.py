"""What the benchmark scripts share: store names, running the command line, synthetic stores."""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "data"


def size_label(num_nodes: int) -> str:
    """``10_000_000 -> '10m'``, ``200_000 -> '200k'``, ``1234 -> '1234'``."""
    for unit, suffix in ((1_000_000, "m"), (1_000, "k")):
        if num_nodes % unit == 0:
            return f"{num_nodes // unit}{suffix}"
    return str(num_nodes)


def run_module(*args: str, timeout: float = 3600) -> None:
    """``python -m bgrl_dgl ARGS`` from the repository, stdin closed; exits the benchmark
    when it fails."""
    command = [sys.executable, "-m", "bgrl_dgl", *map(str, args)]
    print("running:", " ".join(command), flush=True)
    if subprocess.run(command, cwd=REPO, stdin=subprocess.DEVNULL, timeout=timeout).returncode:
        sys.exit(f"failed: {' '.join(command)}")


def synthetic_store(out: Path, **params: object) -> Path:
    """The store ``prepare synthetic`` writes to ``out`` with ``params`` (flag names with
    underscores: ``num_nodes=10**6, avg_degree=10, ...``), prepared unless ``out`` holds one
    prepared with the same parameters; exits when it holds another."""
    meta = out / "meta.json"
    if meta.exists():
        found = json.loads(meta.read_text()).get("source", {}).get("params", {})
        differing = {k: (found.get(k), v) for k, v in params.items() if found.get(k) != v}
        if differing:
            sys.exit(f"{out} was prepared with other settings (found, wanted): {differing}; "
                     "pass another store directory or remove it")
        print(f"reusing {out}", flush=True)
        return out
    start = time.perf_counter()
    flags = [item for key, value in params.items()
             for item in (f"--{key.replace('_', '-')}", str(value))]
    run_module("prepare", "synthetic", "--out", str(out), *flags)
    print(f"prepared in {time.perf_counter() - start:.0f} s", flush=True)
    return out


def benchmark_store(name: str, args: argparse.Namespace, num_classes: int) -> Path:
    """``data/bench-<name>-<size>``: the float16 synthetic store of ``args.num_nodes``,
    ``args.avg_degree`` and ``args.feat_dim`` (see :func:`synthetic_store`)."""
    return synthetic_store(DATA / f"bench-{name}-{size_label(args.num_nodes)}",
                           num_nodes=args.num_nodes, avg_degree=args.avg_degree,
                           feat_dim=args.feat_dim, num_classes=num_classes,
                           feature_dtype="float16")
