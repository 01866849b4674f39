"""``bgrl-dgl evaluate`` (linear probe of a Parquet export) and ``bgrl-dgl report``."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from test_export import cli, run_dir, store_dir  # noqa: F401  (fixtures)

from bgrl_dgl.cli import main

from helpers import assert_input_error

PROBE_KEYS = {"test_acc_mean", "test_acc_std", "val_acc_mean", "num_splits"}


@pytest.fixture(scope="module")
def export_dir(run_dir, tmp_path_factory) -> Path:  # noqa: F811
    out = tmp_path_factory.mktemp("export") / "emb"
    assert main(["embed", "--run", str(run_dir), "--out", str(out), "--dtype", "float16",
                 "--rows-per-part", "200", "--device", "cpu"]) == 0
    return out


def test_public_splits_probe_well_above_chance(cli, export_dir):  # noqa: F811
    result = cli("evaluate", "--embeddings", export_dir, "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert PROBE_KEYS <= set(summary)
    assert summary["num_splits"] == 1 and summary["splits"] == "public"
    assert summary["encoder"] == "online" and summary["step"] == 2
    assert summary["num_labelled"] == 600
    assert summary["test_acc_mean"] > 0.6  # 4 planted classes: chance is about 0.25


def test_random_splits_average_several_probes(cli, export_dir):  # noqa: F811
    result = cli("evaluate", "--embeddings", export_dir, "--splits", "random",
                 "--num-splits", "3", "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["num_splits"] == 3 and summary["splits"] == "random"
    assert summary["test_acc_std"] > 0 and summary["test_acc_mean"] > 0.6


def test_evaluation_is_recorded_and_reported(cli, export_dir, run_dir, tmp_path):  # noqa: F811
    pytest.importorskip("matplotlib")
    result = cli("evaluate", "--embeddings", export_dir, "--run", run_dir)
    assert result.returncode == 0, result.stderr
    assert "test accuracy" in result.stdout
    recorded = json.loads((run_dir / "evaluations.jsonl").read_text().splitlines()[-1])
    assert recorded["step"] == 2 and recorded["embeddings"] == str(export_dir.resolve())

    png = tmp_path / "report.png"
    result = cli("report", run_dir, "--out", png)
    assert result.returncode == 0, result.stderr
    assert "2 steps" in result.stdout and "probe at step 2" in result.stdout
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_without_matplotlib_prints_the_summary_and_how_to_install(cli, run_dir, tmp_path,  # noqa: F811
                                                                        monkeypatch):
    for name in ["matplotlib", *(n for n in sys.modules if n.startswith("matplotlib."))]:
        monkeypatch.setitem(sys.modules, name, None)
    result = cli("report", run_dir, "--out", tmp_path / "report.png")
    assert_input_error(result, "pip install 'bgrl-dgl[plot]'")
    assert "loss: final" in result.stdout
    assert not any(tmp_path.iterdir())


def test_bad_input_is_one_line(cli, export_dir, run_dir, tmp_path):  # noqa: F811
    assert_input_error(cli("evaluate", "--embeddings", tmp_path / "nowhere"), "nowhere",
                       "no such embedding export")
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    for name in ("_inputs.json", "part-00000.parquet"):
        (unfinished / name).write_bytes((export_dir / name).read_bytes())
    assert_input_error(cli("evaluate", "--embeddings", unfinished), "_SUCCESS")
    assert_input_error(cli("evaluate", "--embeddings", export_dir, "--run", tmp_path / "norun"),
                       "norun")
    assert_input_error(cli("report", tmp_path / "norun"), "norun")
