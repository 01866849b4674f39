"""Per-process memory of training as the graph grows (does it stay flat?), and the CPU time
and scratch space of ``embed`` split across ranks.

``measure_train`` runs ``bgrl-dgl train`` under ``torchrun`` with 2 ranks x 2 sampling workers
on the CPU for a few tens of steps, on synthetic stores of 1M and 10M nodes, and samples
``RssAnon`` (``/proc/<pid>/status``: heap and private memory; memory-mapped store files and
shared-memory files are not counted) of every process from outside, every ``--interval``
seconds. Ranks are the children of the torchrun process; workers are the children of the
ranks' forkserver processes. A process's figure is its peak over the steady part of the run:
from the end of the third logged step to the last one, so start-up transients (imports, the
model, the first batches) are left out. ``worker_growth_mb`` and ``rank_growth_mb`` are the
growth of the largest worker and rank figure from the small store to the large one.

``measure_embed``: exact ``embed`` of every node of a 1M-node store (``--store-1m``, else
one prepared as bench_export.py does: average input degree 10, 128-d float16 features) with
the encoder of a one-step run next to the store (a GCN ``--hidden``), by one process, then
by ``--ranks`` ranks under torchrun (``python -m torch.distributed.run --standalone
--nproc-per-node 2 -m bgrl_dgl embed ...``), each with its own ``--scratch-dir``. Measured
for each: the CPU time (user + sys of the command and all its processes, from
``getrusage(RUSAGE_CHILDREN)``), the wall time and the peak bytes of the files under the
scratch directory (polled every 20 ms); the two exports are compared row by row.
``embed_cpu_ratio`` (ranks over one process; goal <= 1.2), ``embed_scratch_ratio`` (goal
<= 1.1), ``embed_wall_ratio``, ``embed_equal`` (bit-identical exports),
``embed_max_abs_diff`` and the raw figures.

Usage::

    python scripts/bench_memory.py [--only train|embed|all] [--store-1m DIR --store-10m DIR]

Stores not given are prepared once into ``--cache-dir`` (default ``data/``) and reused. The
last line of output is one JSON object.
"""
from __future__ import annotations

import argparse
import inspect
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
from bench_export import one_step_run, read_export

from benchlib import DATA, REPO, benchmark_store, size_label, synthetic_store
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


class ScratchWatch:
    """The peak total size of the files under ``directory``, polled in a thread."""

    def __init__(self, directory: Path, every: float = 0.02) -> None:
        self.directory, self.every, self.peak = directory, every, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _size(self) -> int:
        total = 0
        for root, _, files in os.walk(self.directory):
            for name in files:
                try:
                    total += os.stat(os.path.join(root, name)).st_size
                except FileNotFoundError:
                    pass
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._size())
            self._stop.wait(self.every)

    def __enter__(self) -> "ScratchWatch":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def timed_embed(command: list[str], scratch: Path) -> dict:
    """Run ``command``; its CPU seconds (all its processes), wall seconds, peak scratch."""
    cpu, start = children_cpu_s(), time.perf_counter()
    print("running:", " ".join(command), flush=True)
    with ScratchWatch(scratch) as watch:
        result = subprocess.run(command, cwd=REPO, stdin=subprocess.DEVNULL)
    if result.returncode:
        sys.exit(f"failed: {' '.join(command)}")
    return {"cpu_s": children_cpu_s() - cpu, "wall_s": time.perf_counter() - start,
            "scratch_bytes": watch.peak}


def measure_embed(store_1m: Path | None = None, hidden: str = "256,128",
                  ranks: int = 2) -> dict[str, Any]:
    """Exact ``embed`` by one process and by ``ranks`` ranks under torchrun.

    Args:
        store_1m: the store to embed (None: data/bench-export-1m, prepared once).
        hidden: the encoder layer sizes of the one-step run made next to the store.
        ranks: processes of the torchrun launch.

    Returns:
        The ratios (ranks over one process) and raw figures of the module docstring.
    """
    store = store_1m
    if store is None:
        store = benchmark_store("export", argparse.Namespace(
            num_nodes=1_000_000, avg_degree=10.0, feat_dim=128), num_classes=16)
    run = one_step_run(store, hidden)
    checkpoint = sorted((run / "checkpoints").glob("step-*.pt"))[-1]
    work = Path(tempfile.mkdtemp(prefix="bench-memory-", dir=DATA))
    try:
        figures, exports = {}, {}
        for label, launch in (("1", [sys.executable, "-m", "bgrl_dgl"]),
                              (str(ranks), [sys.executable, "-m", "torch.distributed.run",
                                            "--standalone", f"--nproc-per-node={ranks}",
                                            "-m", "bgrl_dgl"])):
            out, scratch = work / f"emb-{label}", work / f"scratch-{label}"
            scratch.mkdir()
            figures[label] = timed_embed(
                [*launch, "embed", "--checkpoint", str(checkpoint), "--data", str(store),
                 "--out", str(out), "--scratch-dir", str(scratch), "--device", "cpu",
                 "--no-progress"], scratch)
            exports[label] = read_export(out)
            shutil.rmtree(out)
        one, many = figures["1"], figures[str(ranks)]
        diff = float(np.abs(exports["1"] - exports[str(ranks)]).max())
        result = {"embed_nodes": int(exports["1"].shape[0]), "embed_ranks": ranks,
                  "embed_cpu_ratio": round(many["cpu_s"] / one["cpu_s"], 3),
                  "embed_scratch_ratio": round(many["scratch_bytes"] / one["scratch_bytes"], 3),
                  "embed_wall_ratio": round(many["wall_s"] / one["wall_s"], 3),
                  "embed_equal": bool(np.array_equal(exports["1"], exports[str(ranks)])),
                  "embed_max_abs_diff": diff}
        for label, values in figures.items():
            result.update({f"embed_{key}_{label}": round(value, 2) if key != "scratch_bytes"
                           else value for key, value in values.items()})
        return result
    finally:
        shutil.rmtree(work, ignore_errors=True)


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
    parser.add_argument("--hidden", default="256,128",
                        help="embed: encoder layer sizes of the one-step run (default: 256,128)")
    parser.add_argument("--ranks", type=int, default=2,
                        help="embed: ranks compared with one process (default: 2)")
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
