"""Per-process anonymous memory of training as the graph grows: does it stay flat?

``measure_train`` runs ``bgrl-dgl train`` under ``torchrun`` with 2 ranks x 2 sampling workers
on the CPU for a few tens of steps, on synthetic stores of 1M and 10M nodes, and samples
``RssAnon`` (``/proc/<pid>/status``: heap and private memory; memory-mapped store files and
shared-memory files are not counted) of every process from outside, every ``--interval``
seconds. Ranks are the children of the torchrun process; workers are the children of the
ranks' forkserver processes. A process's figure is its peak over the steady part of the run:
from the end of the third logged step to the last one, so start-up transients (imports, the
model, the first batches) are left out. ``worker_growth_mb`` and ``rank_growth_mb`` are the
growth of the largest worker and rank figure from the small store to the large one.

Usage::

    python scripts/bench_memory.py [--only train|all] [--store-1m DIR --store-10m DIR]

Stores not given are prepared once into ``--cache-dir`` (default ``data/``) and reused. The
last line of output is one JSON object.
"""
from __future__ import annotations

import argparse
import inspect
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

from benchlib import DATA, REPO, size_label, synthetic_store
from memwatch import read_parent_pid, rss_anon_bytes

MB = 1e6
SIZES = (1_000_000, 10_000_000)
STORE_PARAMS = {"avg_degree": 4, "feat_dim": 16, "num_classes": 8, "feature_dtype": "float16"}
# Logged steps that count as start-up.
WARMUP_STEPS = 3


def cmdline(pid: int) -> str:
    """The command line of ``pid`` (empty when it is gone)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(
            errors="replace")
    except OSError:
        return ""


def process_roles(root: int) -> dict[int, str]:
    """{pid: 'rank' | 'worker'} below the torchrun process ``root``."""
    parents = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            parent = read_parent_pid(int(entry.name))
            if parent is not None:
                parents[int(entry.name)] = parent
    children: dict[int, list[int]] = {}
    for pid, parent in parents.items():
        children.setdefault(parent, []).append(pid)
    roles = {}
    for rank in children.get(root, []):
        roles[rank] = "rank"
        for child in children.get(rank, []):
            if "forkserver" in cmdline(child):
                roles.update({worker: "worker" for worker in children.get(child, [])})
    return roles


class RoleWatcher:
    """Samples RssAnon of every rank and worker of a torchrun process tree in a thread; a
    sample counts towards a process's peak only while ``steady()`` is true."""

    def __init__(self, root: int, steady: Callable[[], bool], interval: float) -> None:
        self.root, self.steady, self.interval = root, steady, interval
        self.peaks: dict[int, tuple[str, int]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            if not self.steady():
                continue
            for pid, role in process_roles(self.root).items():
                anon = rss_anon_bytes(pid)
                if anon:
                    self.peaks[pid] = (role, max(anon, self.peaks.get(pid, (role, 0))[1]))

    def __enter__(self) -> "RoleWatcher":
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()


def logged_steps(run: Path) -> int:
    """Steps in the run's metrics file so far."""
    try:
        return sum(1 for line in (run / "metrics.jsonl").read_text().splitlines() if line)
    except OSError:
        return 0


def train_command(store: Path, run: Path, args: argparse.Namespace) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            "--nproc-per-node=2", "-m", "bgrl_dgl", "train", "--data", str(store),
            "--out", str(run), "--device", "cpu", "--num-workers", "2",
            "--batch-size", str(args.batch_size), "--fanouts", "10,10",
            "--max-steps", str(args.steps), "--log-every", "1",
            "--checkpoint-every", str(10 ** 9)]


def train_memory(store: Path, args: argparse.Namespace) -> dict[str, list[float]]:
    """{'rank': [MB, ...], 'worker': [MB, ...]}: steady-part RssAnon peaks of one run."""
    with tempfile.TemporaryDirectory(prefix="bench-memory-") as tmp:
        run = Path(tmp) / "run"
        command = train_command(store, run, args)
        print("running:", " ".join(command), flush=True)
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        process = subprocess.Popen(command, cwd=REPO, env=env, stdin=subprocess.DEVNULL)

        def steady() -> bool:
            return WARMUP_STEPS <= logged_steps(run) < args.steps

        with RoleWatcher(process.pid, steady, args.interval) as watcher:
            returncode = process.wait()
        if returncode:
            sys.exit(f"failed ({returncode}): {' '.join(command)}")
    found: dict[str, list[float]] = {"rank": [], "worker": []}
    for role, peak in watcher.peaks.values():
        found[role].append(round(peak / MB, 1))
    if len(found["rank"]) != 2 or len(found["worker"]) != 4:
        sys.exit(f"expected 2 ranks and 4 workers, measured {found}")
    return {role: sorted(values) for role, values in found.items()}


def store_for(num_nodes: int, given: Path | None, cache_dir: Path) -> Path:
    if given is not None:
        return given
    return synthetic_store(cache_dir / f"bench-memory-{size_label(num_nodes)}",
                           num_nodes=num_nodes, **STORE_PARAMS)


def measure_train(store_1m: Path | None = None, store_10m: Path | None = None,
                  cache_dir: Path = DATA, steps: int = 30, batch_size: int = 256,
                  interval: float = 0.1) -> dict[str, Any]:
    """Per-rank and per-worker anonymous memory of training on the 1M- and 10M-node stores.

    Args:
        store_1m, store_10m: stores to use (None: prepared into ``cache_dir``).
        cache_dir: where missing stores are prepared and kept.
        steps: optimizer steps of each run.
        batch_size: seeds per rank and step.
        interval: seconds between samples.

    Returns:
        ``worker_growth_mb``, ``rank_growth_mb`` (largest figure on 10M minus that on 1M) and
        the raw MB figures of every process, ``train_<size>_rank_mb`` and
        ``train_<size>_worker_mb``.
    """
    options = argparse.Namespace(steps=steps, batch_size=batch_size, interval=interval)
    result: dict[str, Any] = {}
    for num_nodes, given in zip(SIZES, (store_1m, store_10m)):
        store = store_for(num_nodes, given, cache_dir)
        figures = train_memory(store, options)
        label = size_label(num_nodes)
        result[f"train_{label}_rank_mb"] = figures["rank"]
        result[f"train_{label}_worker_mb"] = figures["worker"]
    small, large = (size_label(n) for n in SIZES)
    for role in ("rank", "worker"):
        growth = max(result[f"train_{large}_{role}_mb"]) - max(result[f"train_{small}_{role}_mb"])
        result[f"{role}_growth_mb"] = round(growth, 1)
    result["train_goals_met"] = result["worker_growth_mb"] <= 50 and result["rank_growth_mb"] <= 200
    return result


def available_measures() -> dict[str, Callable[..., dict[str, Any]]]:
    """{part: measure_<part>} for the parts this script defines (``train``, ``embed``)."""
    return {part: globals()[f"measure_{part}"] for part in ("train", "embed")
            if callable(globals().get(f"measure_{part}"))}


def call_with_args(measure: Callable[..., dict[str, Any]],
                   args: argparse.Namespace) -> dict[str, Any]:
    """``measure`` called with the command-line options named like its parameters."""
    names = inspect.signature(measure).parameters
    return measure(**{name: value for name, value in vars(args).items() if name in names})


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=[*available_measures(), "all"], default="all",
                        help="which part to measure (default: all)")
    parser.add_argument("--store-1m", type=Path, help="1M-node store to reuse")
    parser.add_argument("--store-10m", type=Path, help="10M-node store to reuse")
    parser.add_argument("--cache-dir", type=Path, default=DATA,
                        help="where missing stores are prepared (default: data/)")
    parser.add_argument("--steps", type=int, default=30, help="training steps per run")
    parser.add_argument("--batch-size", type=int, default=256, help="seeds per rank and step")
    parser.add_argument("--interval", type=float, default=0.1, help="seconds between samples")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    measures = available_measures()
    parts = list(measures) if args.only == "all" else [args.only]
    result: dict[str, Any] = {}
    start = time.perf_counter()
    for part in parts:
        result.update(call_with_args(measures[part], args))
    result["wall_s"] = round(time.perf_counter() - start, 1)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
