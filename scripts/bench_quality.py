"""Embedding quality of mini-batch BGRL with the default config, on Cora and other graphs.

Cora (data/cora, Planetoid files) is prepared once; every ``--store`` is used as
it is. On each graph, for each training seed, BGRL trains with the default configuration
(no flags), every node is embedded with the online encoder (exact layer-wise inference), and
a linear probe is fitted on the store's own split (Cora's public 140/500/1000) and on random
stratified 10/10/80 splits. The untrained encoder of each seed is the baseline. Per graph:
accuracies of the trained and the untrained encoder, training time and time per run.
Last line: one JSON object, graph name -> figures.

    .venv/bin/python scripts/bench_quality.py [--seeds 0,1,2] [--random-splits 5] \
        [--store data/syn22k ...] [--cora '']
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import bgrl_dgl  # noqa: F401  (sets the DGL backend)
from bgrl_dgl.cli import main as cli_main
from bgrl_dgl.embeddings.evaluate import evaluate_run
from bgrl_dgl.training.config import TrainConfig
from bgrl_dgl.training.trainer import train

REPO = Path(__file__).resolve().parents[1]
CORA = REPO / "data" / "cora"


def probe(run_dir: Path, encoder: str, num_random: int, seed: int) -> tuple[float, float]:
    """(public-split test accuracy, mean test accuracy over random 10/10/80 splits) of a
    run's encoder, by the protocol of ``bgrl-dgl evaluate --run``."""
    public = evaluate_run(run_dir, encoder=encoder, splits="public")
    random = evaluate_run(run_dir, encoder=encoder, splits="random", num_splits=num_random,
                          seed=100 * seed)
    return public["test_acc_mean"], random["test_acc_mean"]


def run_graph(name: str, store_dir: Path, tmp: Path, seeds: list[int], num_random: int,
              ) -> dict[str, object]:
    """Train with the default settings for each seed, probe the trained and the untrained
    encoder; print a line per seed; returns the graph's figures (accuracies in %)."""
    public, random, baseline, trains, walls = [], [], [], [], []
    for seed in seeds:
        config = TrainConfig.defaults()
        config.run.seed = seed
        run_dir = tmp / f"run-{name}-{seed}"
        start = time.perf_counter()
        train(store_dir, run_dir, config)
        trains.append(time.perf_counter() - start)
        public_acc, random_acc = probe(run_dir, "online", num_random, seed)
        walls.append(time.perf_counter() - start)
        base_acc, _ = probe(run_dir, "random", 1, seed)
        public.append(100 * public_acc)
        random.append(100 * random_acc)
        baseline.append(100 * base_acc)
        print(f"{name} seed {seed}: public {public[-1]:.2f}  random-splits {random[-1]:.2f}  "
              f"untrained {baseline[-1]:.2f}  train {trains[-1]:.0f} s, train+embed+probe "
              f"{walls[-1]:.0f} s, load {os.getloadavg()[0]:.1f}", flush=True)
    return {
        "public_test_acc_mean": round(float(np.mean(public)), 2),
        "public_test_acc_std": round(float(np.std(public)), 2),
        "random_split_test_acc_mean": round(float(np.mean(random)), 2),
        "random_split_test_acc_std": round(float(np.std(random)), 2),
        "untrained_acc": round(float(np.mean(baseline)), 2),
        "train_s": round(float(np.mean(trains)), 1),
        "wall_s": round(float(np.mean(walls)), 1),
        "max_wall_s": round(float(np.max(walls)), 1),
        "seeds": seeds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2", help="training seeds")
    parser.add_argument("--random-splits", type=int, default=5, help="random splits per seed")
    parser.add_argument("--cora", default=str(CORA),
                        help="directory of the Planetoid Cora files ('' to leave Cora out)")
    parser.add_argument("--store", action="append", default=[],
                        help="another prepared store to run on (repeatable); its own splits "
                             "are the 'public' ones")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]

    results: dict[str, dict[str, object]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-quality-") as tmp:
        graphs = [(Path(store).name, Path(store)) for store in args.store]
        if args.cora:
            store_dir = Path(tmp) / "cora"
            status = cli_main(["prepare", "planetoid", "--root", args.cora, "--name", "cora",
                               "--out", str(store_dir)])
            if status:
                sys.exit(status)
            graphs.insert(0, ("cora", store_dir))
        for name, store_dir in graphs:
            results[name] = run_graph(name, store_dir, Path(tmp), seeds, args.random_splits)
            r = results[name]
            print(f"{name}: public split {r['public_test_acc_mean']:.2f} ± "
                  f"{r['public_test_acc_std']:.2f} (untrained {r['untrained_acc']:.2f}); random "
                  f"10/10/80 splits {r['random_split_test_acc_mean']:.2f} ± "
                  f"{r['random_split_test_acc_std']:.2f}; training {r['train_s']:.0f} s, "
                  f"{r['wall_s']:.0f} s per run with embedding and probe", flush=True)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
