"""``train --tensorboard DIR``: the metrics of metrics.jsonl as TensorBoard scalars."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from bgrl_dgl.cli import main
from bgrl_dgl.errors import InputError
from bgrl_dgl.training.tensorboard import check_tensorboard, tensorboard_log

from helpers import assert_input_error

TINY = ["--hidden", "16,8", "--predictor-hidden", "16", "--fanouts", "3,3", "--batch-size",
        "128", "--num-workers", "0", "--threads", "1", "--max-steps", "4", "--log-every", "2"]


def scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    events = EventAccumulator(str(log_dir))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)]
            for tag in events.Tags()["scalars"]}


def test_every_logged_metric_becomes_a_scalar(planted_store, tmp_path):
    run, board = tmp_path / "run", tmp_path / "board"
    assert main(["train", "--data", str(planted_store), "--out", str(run), *TINY,
                 "--tensorboard", str(board)]) == 0
    assert list(board.glob("events.out.tfevents.*"))
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in logged] == [2, 4]
    found = scalars(board)
    for key in ("loss", "lr", "tau", "seeds_per_s", "embedding_std", "compute_s"):
        assert [step for step, _ in found[key]] == [2, 4], key
        for (_, value), record in zip(found[key], logged):
            assert value == pytest.approx(record[key], rel=1e-6), key
    assert "step" not in found
    # The setting is part of the run's configuration (a resumed run keeps writing there).
    assert f"tensorboard: {board}" in (run / "config.yaml").read_text()


def test_no_writer_unless_asked_or_on_other_ranks(tmp_path):
    with tensorboard_log(None) as log:
        assert log is None
    with tensorboard_log(tmp_path / "rank1", enabled=False) as log:
        assert log is None
    assert not (tmp_path / "rank1").exists()


def test_missing_package_is_an_input_error(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(InputError, match=r"bgrl-dgl\[tensorboard\]"):
        check_tensorboard(tmp_path / "board")
    check_tensorboard(None)  # not asked for: nothing to check


def test_a_file_in_the_way_stops_training_before_the_run_starts(capsys, planted_store, tmp_path):
    (tmp_path / "board").write_text("not a directory")
    run = tmp_path / "run"
    code = main(["train", "--data", str(planted_store), "--out", str(run), *TINY,
                 "--tensorboard", str(tmp_path / "board")])
    assert_input_error(subprocess.CompletedProcess([], code, *capsys.readouterr()), "board",
                       "not a directory")
    assert not run.exists()
