"""Shared fixtures: the real Cora files and a runner for the command line."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_CORA = REPO.parent / "shared" / "data" / "cora"


@pytest.fixture(scope="session")
def cora_dir() -> Path:
    if not (SHARED_CORA / "cora.npz").exists():
        pytest.skip(f"shared Cora data not found at {SHARED_CORA}")
    return SHARED_CORA


def run_cli(*args: str, timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run ``python -m bgrl_dgl ARGS`` in a fresh process, stdin closed."""
    return subprocess.run(
        [sys.executable, "-m", "bgrl_dgl", *map(str, args)],
        cwd=REPO, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout,
        env={**os.environ, **(env or {})},
    )


@pytest.fixture
def cli():
    return run_cli


def assert_input_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    """The CLI failed with exit 2 and one line naming the file and the problem."""
    assert result.returncode == 2, (result.returncode, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
