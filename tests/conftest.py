"""Shared fixtures: the real Cora files, a planted store and the command-line runner."""
from __future__ import annotations

from pathlib import Path

import pytest

from helpers import CORA, PLANTED_NODES, run_cli


@pytest.fixture(scope="session")
def cora_dir() -> Path:
    """The Cora files shipped with the repository (data/cora)."""
    missing = [name for name in ("cora.npz", "ind.cora.graph") if not (CORA / name).is_file()]
    assert not missing, f"{CORA} lacks {missing}: the checkout is incomplete"
    return CORA


@pytest.fixture(scope="session")
def planted_store(tmp_path_factory) -> Path:
    """A power-law graph of PLANTED_NODES nodes in 4 planted homophilous classes, 16-d features."""
    from bgrl_dgl.cli import main

    out = tmp_path_factory.mktemp("planted") / "store"
    assert main(["prepare", "synthetic", "--out", str(out), "--num-nodes", str(PLANTED_NODES),
                 "--avg-degree", "6", "--feat-dim", "16", "--num-classes", "4"]) == 0
    return out


@pytest.fixture
def cli():
    return run_cli
