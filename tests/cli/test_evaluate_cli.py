"""``bgrl-dgl evaluate`` (linear probe of a Parquet export, of a run's encoder or of raw
features) and ``bgrl-dgl report``."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from test_export import cli, run_dir, store_dir  # noqa: F401  (fixtures)

from bgrl_dgl.cli import main
from bgrl_dgl.embeddings.probe import linear_probe
from bgrl_dgl.store.reader import GraphStore

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
    result = cli("evaluate", "--embeddings", export_dir, "--run", run_dir)
    assert result.returncode == 0, result.stderr
    assert "test accuracy" in result.stdout
    recorded = json.loads((run_dir / "evaluations.jsonl").read_text().splitlines()[-1])
    assert recorded["step"] == 2 and recorded["embeddings"] == str(export_dir.resolve())

    png = tmp_path / "report.png"
    result = cli("report", run_dir, "--out", png)
    assert result.returncode == 0, result.stderr
    assert "2 steps" in result.stdout and "loss: final" in result.stdout
    assert re.search(r"^  trained encoder +\d+\.\d\d  \(step 2\)$", result.stdout, re.M)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_raw_features_are_probed_by_the_same_protocol(cli, store_dir, run_dir):  # noqa: F811
    result = cli("evaluate", "--raw-features", "--data", store_dir, "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["encoder"] == "raw-features" and summary["embeddings"] is None
    assert summary["num_labelled"] == 600 and summary["splits"] == "public"
    store = GraphStore.open(store_dir)
    direct = linear_probe(np.asarray(store.features), np.asarray(store.labels),
                          {name: store.split(name) for name in ("train", "valid", "test")},
                          scaling="unit-rows")
    assert summary["test_acc_mean"] == pytest.approx(direct.test_acc, abs=1e-9)
    assert summary["val_acc_mean"] == pytest.approx(direct.val_acc, abs=1e-9)

    evaluations = run_dir / "evaluations.jsonl"
    before = len(evaluations.read_text().splitlines()) if evaluations.exists() else 0
    result = cli("evaluate", "--raw-features", "--run", run_dir, "--splits", "random",
                 "--num-splits", "2")  # the store of the run
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("raw features, random splits: test accuracy")
    lines = evaluations.read_text().splitlines()
    assert len(lines) == before + 1 and json.loads(lines[-1])["encoder"] == "raw-features"


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
    assert_input_error(cli("evaluate", "--raw-features"), "--raw-features needs --data")
    assert_input_error(cli("evaluate", "--raw-features", "--data", tmp_path / "nostore"),
                       "nostore")
