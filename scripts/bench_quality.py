"""Embedding quality of mini-batch BGRL with the default config on real Cora.

Cora (../shared/data/cora, Planetoid files) is prepared once; for each training seed, BGRL
trains with the default configuration, every node is embedded with the online encoder
(exact layer-wise inference), and a linear probe is fitted on the public split (140/500/1000)
and on random stratified 10/10/80 splits. The untrained encoder of each seed is the baseline.
Last line: one JSON object.

    .venv/bin/python scripts/bench_quality.py [--seeds 0,1,2] [--random-splits 5]
"""
from __future__ import annotations

import argparse
import json
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
CORA = REPO.parent / "shared" / "data" / "cora"


def probe(run_dir: Path, encoder: str, num_random: int, seed: int) -> tuple[float, float]:
    """(public-split test accuracy, mean test accuracy over random 10/10/80 splits) of a
    run's encoder, by the protocol of ``bgrl-dgl evaluate --run``."""
    public = evaluate_run(run_dir, encoder=encoder, splits="public")
    random = evaluate_run(run_dir, encoder=encoder, splits="random", num_splits=num_random,
                          seed=100 * seed)
    return public["test_acc_mean"], random["test_acc_mean"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2", help="training seeds")
    parser.add_argument("--random-splits", type=int, default=5, help="random splits per seed")
    parser.add_argument("--cora", default=str(CORA), help="directory of the Planetoid Cora files")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]

    with tempfile.TemporaryDirectory(prefix="bench-quality-") as tmp:
        store_dir = Path(tmp) / "cora"
        status = cli_main(["prepare", "planetoid", "--root", args.cora, "--name", "cora",
                           "--out", str(store_dir)])
        if status:
            sys.exit(status)
        public, random, baseline, walls = [], [], [], []
        for seed in seeds:
            config = TrainConfig.defaults()
            config.run.seed = seed
            run_dir = Path(tmp) / f"run-{seed}"
            start = time.perf_counter()
            train(store_dir, run_dir, config)
            public_acc, random_acc = probe(run_dir, "online", args.random_splits, seed)
            walls.append(time.perf_counter() - start)
            base_acc, _ = probe(run_dir, "random", 1, seed)
            public.append(public_acc)
            random.append(random_acc)
            baseline.append(base_acc)
            print(f"seed {seed}: public {100 * public_acc:.2f}  random-splits {100 * random_acc:.2f}  "
                  f"random-init {100 * base_acc:.2f}  train+embed+probe {walls[-1]:.0f} s", flush=True)

    result = {
        "public_test_acc_mean": round(100 * float(np.mean(public)), 2),
        "public_test_acc_std": round(100 * float(np.std(public)), 2),
        "random_split_test_acc_mean": round(100 * float(np.mean(random)), 2),
        "random_split_test_acc_std": round(100 * float(np.std(random)), 2),
        "random_init_acc": round(100 * float(np.mean(baseline)), 2),
        "wall_s": round(float(np.mean(walls)), 1),
        "max_wall_s": round(float(np.max(walls)), 1),
        "seeds": seeds,
    }
    print(f"public split: {result['public_test_acc_mean']:.2f} ± {result['public_test_acc_std']:.2f} "
          f"(random init {result['random_init_acc']:.2f}); random 10/10/80 splits: "
          f"{result['random_split_test_acc_mean']:.2f} ± {result['random_split_test_acc_std']:.2f}; "
          f"{result['wall_s']:.0f} s per run")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
