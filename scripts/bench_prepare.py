"""Benchmark ``bgrl-dgl prepare synthetic``: throughput, wall time, peak anonymous memory and
store size.

Runs ``python -m bgrl_dgl prepare synthetic`` in a subprocess under ``memwatch`` (peak
``RssAnon`` of the process and its children; the memory-mapped store's file pages are not
counted). By default: 10M nodes, average degree 10 (100M *input* edges, i.e. edges generated
before symmetrization, self-loop removal and dedup), 128-d float16 features. Throughput is
input edges per second of total wall time (features, labels and splits included).

The last line printed is one JSON object with ``edges_per_s``, ``wall_s``, ``peak_anon_gb``
(GiB, 2**30 bytes), ``store_gb`` (GiB) and details. ``--time-generator`` also times the
synthetic generator alone, in this process, to show how the time splits between generating
and building.
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

from memwatch import GIB, measure_command

REPO = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-nodes", type=int, default=10_000_000)
    parser.add_argument("--avg-degree", type=float, default=10.0,
                        help="input edges per node (default: 10)")
    parser.add_argument("--feat-dim", type=int, default=128)
    parser.add_argument("--num-classes", type=int, default=10)
    parser.add_argument("--feature-dtype", choices=["float16", "float32"], default="float16")
    parser.add_argument("--memory-budget", default="2GB",
                        help="--memory-budget passed to prepare (default: 2GB)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path,
                        help="store directory to write and keep (default: a temporary one)")
    parser.add_argument("--time-generator", action="store_true",
                        help="also time the synthetic generator alone (edges, then features)")
    return parser.parse_args(argv)


def prepare_args(args: argparse.Namespace, out: Path) -> list[str]:
    """The arguments of ``bgrl-dgl prepare synthetic``."""
    return ["--out", str(out), "--overwrite", "--num-nodes", str(args.num_nodes),
            "--avg-degree", str(args.avg_degree), "--feat-dim", str(args.feat_dim),
            "--num-classes", str(args.num_classes), "--feature-dtype", args.feature_dtype,
            "--memory-budget", args.memory_budget, "--seed", str(args.seed)]


def directory_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def time_generator(arguments: list[str]) -> dict[str, float]:
    """Seconds to generate all input edges, then all features, exactly as
    ``prepare synthetic ARGUMENTS`` would, without storing them."""
    from bgrl_dgl.cli import build_parser
    from bgrl_dgl.sources import synthetic

    args = build_parser().parse_args(["prepare", "synthetic", *arguments])
    opts = synthetic.Options.from_args(args)
    start = time.perf_counter()
    layout = synthetic.ClassLayout.plant(opts)
    for _ in synthetic.edge_chunks(opts, layout):
        pass
    edges_s = time.perf_counter() - start
    start = time.perf_counter()
    for _ in synthetic.feature_chunks(opts, layout.node_class, synthetic.feature_dtype(args)):
        pass
    return {"generator_edges_s": edges_s, "generator_edges_per_s": opts.num_edges / edges_s,
            "generator_features_s": time.perf_counter() - start}


OPEN_STORE = """
import json, sys, time
import dgl, torch
import bgrl_dgl
from bgrl_dgl.store.reader import GraphStore

def rss_anon():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024

before = rss_anon()
start = time.perf_counter()
store = GraphStore.open(sys.argv[1])
graph = store.graph
seconds = time.perf_counter() - start
print(json.dumps({"open_s": seconds, "open_anon_mb": (rss_anon() - before) / 2**20,
                  "graph_nodes": graph.num_nodes()}))
"""


def measure_open(out: Path) -> dict[str, float]:
    """Seconds and anonymous memory (MiB) to open the store and build its DGL graph, in a
    fresh process whose libraries are already imported."""
    result = subprocess.run([sys.executable, "-c", OPEN_STORE, str(out)], cwd=REPO, check=True,
                            stdin=subprocess.DEVNULL, capture_output=True, text=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def run(args: argparse.Namespace, out: Path) -> dict:
    command = [sys.executable, "-m", "bgrl_dgl", "prepare", "synthetic", *prepare_args(args, out)]
    print("running:", " ".join(command), flush=True)
    load_before = os.getloadavg()[0]  # other work on the machine skews the timings
    result = measure_command(command, cwd=REPO, stdin=subprocess.DEVNULL,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if result.returncode != 0:
        sys.exit(f"{result.stderr}prepare failed with exit code {result.returncode}")
    meta = json.loads((out / "meta.json").read_text())
    input_edges = round(args.num_nodes * args.avg_degree)
    report = {
        "edges_per_s": input_edges / result.wall_s,
        "wall_s": result.wall_s,
        "peak_anon_gb": result.peak_anon_gib,
        "store_gb": directory_bytes(out) / GIB,
        "num_nodes": args.num_nodes,
        "num_edges_input": input_edges,
        "num_edges_stored": meta["num_edges"],
        "feat_dim": args.feat_dim,
        "feat_dtype": meta["feat_dtype"],
        "memory_budget": args.memory_budget,
        "load_avg_before": load_before,
    }
    print(f"input edges generated: {input_edges:,} ({args.num_nodes:,} nodes x average degree "
          f"{args.avg_degree:g}, before symmetrization, self-loop removal and dedup)")
    print(f"edges stored: {meta['num_edges']:,} (CSC, after symmetrization, self-loop removal "
          f"and dedup)")
    print(f"wall time: {result.wall_s:.1f} s")
    print(f"throughput: {report['edges_per_s'] / 1e6:.2f}M input edges/s")
    print(f"peak anonymous memory: {result.peak_anon_gib:.2f} GiB (prepare and its children)")
    print(f"store size: {report['store_gb']:.2f} GiB")
    opened = measure_open(out)
    print(f"opening the store and building its DGL graph: {opened['open_s']:.3f} s, "
          f"{opened['open_anon_mb']:.1f} MiB of anonymous memory")
    report.update(open_s=opened["open_s"], open_anon_mb=opened["open_anon_mb"])
    if args.time_generator:
        timings = time_generator(prepare_args(args, out))
        print(f"generator alone: edges {timings['generator_edges_s']:.1f} s "
              f"({timings['generator_edges_per_s'] / 1e6:.2f}M edges/s), "
              f"features {timings['generator_features_s']:.1f} s")
        report.update(timings)
    return report


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.out is not None:
        report = run(args, args.out)
    else:
        with tempfile.TemporaryDirectory(prefix="bench-prepare-") as tmp:
            report = run(args, Path(tmp) / "store")
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
