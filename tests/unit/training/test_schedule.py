"""The run's length in steps (``--steps``, or ``--epochs`` instead), the schedules that follow
it, and the early estimate of the time per step and of the whole run."""
from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from bgrl_dgl.cli import main
from bgrl_dgl.model.bgrl import cosine_tau
from bgrl_dgl.training.config import DEFAULT_STEPS, OptimConfig, TrainConfig, lr_factor
from bgrl_dgl.training.monitor import StepTimeEstimate, format_duration

BATCH_SIZE, STEPS_PER_EPOCH = 64, 10  # the planted store's 600 nodes: ceil(600 / 64)
SMALL = ["--hidden", "16,8", "--predictor-hidden", "16", "--fanouts", "3,3",
         "--batch-size", str(BATCH_SIZE), "--num-workers", "0", "--threads", "1",
         "--device", "cpu", "--log-every", "1", "--lr", "0.01"]


def test_the_default_run_is_a_number_of_steps_whatever_the_graph() -> None:
    optim = TrainConfig.defaults().optim
    assert optim.epochs is None and optim.max_steps is None
    assert [optim.total_steps(spe) for spe in (1, 11, 86, 10_000)] == [DEFAULT_STEPS] * 4


def test_epochs_replace_steps_and_max_steps_takes_precedence() -> None:
    assert OptimConfig(steps=300, epochs=3).total_steps(7) == 21
    assert OptimConfig(steps=300, epochs=3, max_steps=5).total_steps(7) == 5
    assert OptimConfig(steps=300, max_steps=5).total_steps(7) == 5
    for bad in ({"steps": 0}, {"epochs": 0}, {"max_steps": -1}, {"warmup_steps": -1}):
        with pytest.raises(ValueError):
            OptimConfig(**bad)


def test_default_warmup_is_a_sixteenth_of_the_run() -> None:
    assert OptimConfig().warmup(DEFAULT_STEPS) == DEFAULT_STEPS // 16
    assert OptimConfig().warmup(3200) == 200
    assert OptimConfig().warmup(10) == 1
    assert OptimConfig(warmup_steps=7).warmup(3200) == 7


def read_metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_steps_set_the_length_and_the_lr_and_tau_schedules(planted_store, tmp_path,
                                                           capsys) -> None:
    steps = 32  # more than 3 epochs of this graph
    run = tmp_path / "run"
    assert main(["train", "--data", str(planted_store), "--out", str(run), *SMALL,
                 "--steps", str(steps)]) == 0
    metrics = read_metrics(run)
    assert [m["step"] for m in metrics] == list(range(1, steps + 1))
    warmup = steps // 16
    assert [m["lr"] for m in metrics] == pytest.approx(
        [0.01 * lr_factor(step, warmup, steps) for step in range(steps)], rel=1e-9)
    assert metrics[0]["lr"] == pytest.approx(0.01 / warmup)
    assert [m["tau"] for m in metrics] == pytest.approx(
        [cosine_tau(step, steps, 0.99) for step in range(1, steps + 1)])
    assert metrics[-1]["tau"] == 1.0 and metrics[-1]["epoch"] == 3
    estimates = [line for line in capsys.readouterr().err.splitlines()
                 if line.startswith("time per step")]
    assert len(estimates) == 1, estimates
    assert f"expected total for {steps} steps" in estimates[0]


def test_epochs_are_the_alternative_to_steps(planted_store, tmp_path) -> None:
    run = tmp_path / "run"
    assert main(["train", "--data", str(planted_store), "--out", str(run), *SMALL,
                 "--epochs", "2", "--steps", "5"]) == 0
    metrics = read_metrics(run)
    total = 2 * STEPS_PER_EPOCH
    assert [m["step"] for m in metrics] == list(range(1, total + 1))
    assert metrics[-1]["epoch"] == 1 and metrics[-1]["tau"] == 1.0
    assert metrics[-1]["lr"] == pytest.approx(0.01 * lr_factor(total - 1, 1, total))


class FakeClock:
    def __init__(self, step_s: float) -> None:
        self.now, self.step_s = 100.0, step_s

    def tick(self, seconds: float | None = None) -> float:
        self.now += self.step_s if seconds is None else seconds
        return self.now


def test_time_estimate_leaves_out_the_first_step_and_is_printed_once() -> None:
    stream = io.StringIO()
    estimate = StepTimeEstimate(1000, 0, enabled=True, window=5, stream=stream)
    clock = FakeClock(0.5)
    assert estimate.observe(1, clock.tick(30.0)) is None  # start-up of the workers
    lines = [estimate.observe(step, clock.tick()) for step in range(2, 20)]
    printed = [line for line in lines if line]
    assert len(printed) == 1 and lines[4] == printed[0]  # after steps 2..6
    assert printed[0] == ("time per step 0.50 s (mean of steps 2-6); expected total for 1000 "
                          "steps: 8.3 min, 8.3 min to go")
    assert stream.getvalue() == printed[0] + "\n"


def test_time_estimate_of_a_resumed_or_short_run() -> None:
    clock = FakeClock(2.0)
    resumed = StepTimeEstimate(400, 300, enabled=True, window=3, stream=io.StringIO())
    lines = [resumed.observe(step, clock.tick()) for step in range(301, 310)]
    assert lines[3] and "mean of steps 302-304" in lines[3] and "3.2 min to go" in lines[3]
    assert sum(1 for line in lines if line) == 1
    quiet = io.StringIO()
    short = StepTimeEstimate(3, 0, enabled=False, window=5, stream=quiet)
    lines = [short.observe(step, clock.tick()) for step in range(1, 4)]
    assert lines[:2] == [None, None] and "mean of steps 2-3" in lines[2]
    assert quiet.getvalue() == ""  # not rank 0: nothing printed


def test_format_duration() -> None:
    assert [format_duration(s) for s in (42.4, 750, 7200)] == ["42 s", "12.5 min", "2.0 h"]
