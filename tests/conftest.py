"""Shared fixtures: the real Cora files, a planted store and the command-line runner."""
from __future__ import annotations

from pathlib import Path

import pytest

from helpers import CORA, PLANTED_NODES, prepare_synthetic, run_cli


@pytest.fixture(scope="session")
def cora_dir() -> Path:
    """The Cora files shipped with the repository (data/cora)."""
    missing = [name for name in ("cora.npz", "ind.cora.graph") if not (CORA / name).is_file()]
    assert not missing, f"{CORA} lacks {missing}: the checkout is incomplete"
    return CORA


@pytest.fixture(scope="session")
def planted_store(tmp_path_factory) -> Path:
    """A power-law graph of PLANTED_NODES nodes in 4 planted homophilous classes, 16-d features."""
    out = tmp_path_factory.mktemp("planted") / "store"
    return prepare_synthetic(out, num_nodes=PLANTED_NODES, avg_degree=6, feat_dim=16,
                             num_classes=4)


@pytest.fixture
def cli():
    return run_cli
