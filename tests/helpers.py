"""Helpers shared by the tests: paths, a runner for the command line, stores to test on."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


CORA = REPO / "data" / "cora"  # shipped with the repository


PLANTED_NODES = 600
# float16 scratch tables round every stored row to 11 significant bits (relative error
# <= 2**-11); through three layers and their norms the embeddings stay within this absolute
# tolerance.
FLOAT16_SCRATCH_ATOL = 1e-2


def run_cli(*args: str, timeout: float = 300,
            env: dict | None = None) -> subprocess.CompletedProcess:
    """Run ``python -m bgrl_dgl ARGS`` in a fresh process, stdin closed."""
    return subprocess.run(
        [sys.executable, "-m", "bgrl_dgl", *map(str, args)],
        cwd=REPO, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def assert_input_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    """The CLI failed with exit 2 and one line naming the file and the problem."""
    assert result.returncode == 2, (result.returncode, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def write_test_store(out: Path, num_nodes: int, src: np.ndarray, dst: np.ndarray,
                     features: np.ndarray, *, feature_dtype: str = "keep",
                     labels: np.ndarray | None = None,
                     splits: dict[str, np.ndarray] | None = None):
    """A committed store of the directed edges ``src -> dst`` (self loops removed, deduplicated)
    with ``features`` [num_nodes, F] and optional labels and splits; returns it opened."""
    from bgrl_dgl.store.reader import GraphStore
    from bgrl_dgl.store.writer import StoreWriter

    with StoreWriter(out, feature_dtype=feature_dtype) as writer:
        writer.write_topology(num_nodes, lambda: iter([(src, dst)]), source_path="edges",
                              symmetrize=False, self_loops="remove", dedup=True)
        writer.write_feature_array(features, source_path="features")
        if labels is not None:
            writer.write_labels(labels, source_path="labels")
        for name, ids in (splits or {}).items():
            writer.write_split(name, ids, source_path="splits")
        writer.commit()
    return GraphStore.open(out)


def prepare_synthetic(out: Path, *, num_nodes: int, avg_degree: float, feat_dim: int,
                      num_classes: int) -> Path:
    """A small ``prepare synthetic`` store at ``out`` (built in-process); returns ``out``."""
    from bgrl_dgl.cli import main

    assert main(["prepare", "synthetic", "--out", str(out), "--num-nodes", str(num_nodes),
                 "--avg-degree", str(avg_degree), "--feat-dim", str(feat_dim),
                 "--num-classes", str(num_classes)]) == 0
    return out
