"""The package imports and runs its first sampling step without printing warnings."""
from __future__ import annotations

import subprocess
import sys

from helpers import REPO

FIRST_USE = """
import warnings
warnings.simplefilter("always")
import numpy as np, torch
import bgrl_dgl
from bgrl_dgl.store.writer import StoreWriter
from bgrl_dgl.store.reader import GraphStore
from bgrl_dgl.loading.sampler import NeighborBatchSampler
rng = np.random.default_rng(0)
with StoreWriter(r"{out}") as writer:
    edges = (rng.integers(0, 50, 400), rng.integers(0, 50, 400))
    writer.write_topology(50, lambda: iter([edges]), source_path="generated", symmetrize=True,
                          self_loops="remove", dedup=True)
    writer.write_feature_array(rng.random((50, 4), dtype=np.float32), source_path="generated")
    writer.commit()
sampler = NeighborBatchSampler(GraphStore.open(r"{out}"), [3, 3], graph_degrees=True)
batch = sampler.sample(torch.arange(10), rng_seed=1, independent=False)
assert batch.views[0].adjs[-1].num_dst == 10
print("ok")
"""


def test_import_and_first_use_print_nothing(tmp_path):
    result = subprocess.run(
        [sys.executable, "-c", FIRST_USE.format(out=tmp_path / "store")], cwd=REPO,
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
    assert result.stderr == "", result.stderr


def test_help_lists_every_command(cli):
    result = cli("--help")
    assert result.returncode == 0
    for command in ("prepare", "info", "train", "plan", "embed", "evaluate", "report"):
        assert command in result.stdout
