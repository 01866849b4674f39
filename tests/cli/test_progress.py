"""Progress bars of prepare, info --full, embed and evaluate: on stderr when asked or on a
terminal, never otherwise, never with --json, never from ranks other than 0."""
from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import struct
import subprocess
import sys
import termios
from pathlib import Path

import numpy as np
import pytest
from test_export import cli, run_dir, store_dir  # noqa: F401  (fixtures)

from bgrl_dgl.progress import bars_enabled, progress_bar, progress_mode

from helpers import REPO

PREPARE = ["prepare", "synthetic", "--num-nodes", "300", "--avg-degree", "4", "--feat-dim",
           "8", "--num-classes", "3"]


def test_prepare_shows_every_pass_with_progress(cli, tmp_path):  # noqa: F811
    result = cli(*PREPARE, "--out", tmp_path / "store", "--progress")
    assert result.returncode == 0, result.stderr
    for bar in ("read edges", "sort CSC", "write features", "validating"):
        assert bar in result.stderr, (bar, result.stderr)
    assert "edges/s" in result.stderr  # rates are shown
    assert result.stdout.startswith("wrote ") and "read edges" not in result.stdout


def test_no_bar_without_a_terminal_or_with_no_progress(cli, tmp_path):  # noqa: F811
    assert not sys.stderr.isatty()  # captured by pytest
    result = cli(*PREPARE, "--out", tmp_path / "a")
    assert result.returncode == 0 and result.stderr == ""
    result = cli(*PREPARE, "--out", tmp_path / "b", "--no-progress")
    assert result.returncode == 0 and result.stderr == ""


def test_info_full_counts_bytes_and_json_stays_one_object(cli, store_dir):  # noqa: F811
    result = cli("info", store_dir, "--full", "--progress")
    assert result.returncode == 0 and f"validating {store_dir}" in result.stderr
    assert "entries" in result.stderr
    result = cli("info", store_dir, "--full", "--json", "--progress")
    assert result.returncode == 0 and result.stderr == ""
    assert isinstance(json.loads(result.stdout), dict)
    assert len(result.stdout.strip().splitlines()) == 1


def test_embed_shows_the_nodes_of_each_layer_and_the_parts(cli, run_dir, tmp_path):  # noqa: F811
    result = cli("embed", "--run", run_dir, "--out", tmp_path / "exact", "--rows-per-part",
                 "250", "--progress")
    assert result.returncode == 0, result.stderr
    for bar in ("embed layer 1/2", "embed layer 2/2", "write parts"):
        assert bar in result.stderr, (bar, result.stderr)
    assert "600/600" in result.stderr and "3/3" in result.stderr  # nodes, then parts
    result = cli("embed", "--run", run_dir, "--out", tmp_path / "sampled", "--fanouts", "3,3",
                 "--progress")
    assert result.returncode == 0 and "embed (sampled)" in result.stderr
    result = cli("embed", "--run", run_dir, "--out", tmp_path / "quiet")
    assert result.returncode == 0 and result.stderr == ""


def test_evaluate_counts_splits_and_is_quiet_in_json(cli, run_dir, tmp_path):  # noqa: F811
    out = tmp_path / "emb"
    assert cli("embed", "--run", run_dir, "--out", out).returncode == 0
    args = ("evaluate", "--embeddings", out, "--splits", "random", "--num-splits", "2")
    result = cli(*args, "--progress")
    assert result.returncode == 0 and "probe splits" in result.stderr
    assert "2/2" in result.stderr and "read embeddings" in result.stderr
    result = cli(*args, "--progress", "--json")
    assert result.returncode == 0 and result.stderr == ""
    assert json.loads(result.stdout)["num_splits"] == 2


def test_bars_only_on_rank_zero(monkeypatch):
    with progress_mode(True):
        assert bars_enabled()
        monkeypatch.setenv("RANK", "1")
        assert not bars_enabled()
        assert progress_bar(range(3), desc="x").disable
        monkeypatch.setenv("RANK", "0")
        assert bars_enabled()
    with progress_mode(False):
        assert not bars_enabled()


def test_a_terminal_gets_bars_unasked(tmp_path):
    """``prepare`` with stderr on a pseudo-terminal draws its bars; stdout is a pipe."""
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    process = subprocess.Popen(
        [sys.executable, "-m", "bgrl_dgl", *PREPARE, "--out", str(tmp_path / "s")], cwd=REPO,
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=follower,
        env={**os.environ, "RANK": "0"})
    os.close(follower)
    terminal = b""
    while True:
        try:
            chunk = os.read(leader, 4096)
        except OSError:  # the process closed the terminal
            break
        if not chunk:
            break
        terminal += chunk
    stdout, _ = process.communicate(timeout=120)
    os.close(leader)
    assert process.returncode == 0
    assert b"read edges" in terminal and b"sort CSC" in terminal and b"100%" in terminal
    assert stdout.startswith(b"wrote ") and b"read edges" not in stdout


@pytest.mark.parametrize("json_flag", [[], ["--json"]])
def test_store_commands_print_nothing_on_stderr_in_ci(store_dir, json_flag):  # noqa: F811
    """A subprocess with stderr on a pipe (a CI log) gets no bar, even from --full."""
    result = subprocess.run(
        [sys.executable, "-m", "bgrl_dgl", "info", str(store_dir), "--full", *json_flag],
        cwd=REPO, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stderr == ""
    assert "num_nodes" in result.stdout


def test_progress_is_not_a_prepare_parameter(tmp_path):
    """--progress changes no output: it is not recorded among the store's source params."""
    from bgrl_dgl.cli import main

    assert main([*PREPARE, "--out", str(tmp_path / "s"), "--progress"]) == 0
    params = json.loads((tmp_path / "s" / "meta.json").read_text())["source"]["params"]
    assert "progress" not in params and params["num_nodes"] == 300
    assert Path(tmp_path / "s" / "indptr.npy").exists()


def test_an_error_line_starts_a_line_of_its_own(cli, tmp_path):  # noqa: F811
    """A bar interrupted by bad input is closed before the error line is written."""
    store = tmp_path / "store"
    assert cli(*PREPARE, "--out", store).returncode == 0
    labels = store / "labels.npy"
    corrupt = np.load(labels)
    corrupt[-1] = 99  # out of range: found by the full check, after the bar has started
    np.save(labels, corrupt)
    result = cli("info", store, "--full", "--progress")
    assert result.returncode == 2 and "validating" in result.stderr
    last = re.split(r"[\r\n]+", result.stderr.strip())[-1]  # what a terminal shows last
    assert last.startswith("error: ") and "labels.npy" in last and "label 99" in last
