"""``train`` against bad settings, a bad ``--out`` and a second writer: each is refused with
one line before anything is written, and whatever was already there is left as it was.
A run that diverges stops with an error at the first non-finite loss, keeping its last good
checkpoint."""
from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from bgrl_dgl import config as cfg
from bgrl_dgl.cli import main
from bgrl_dgl.model.bgrl import BGRL
from bgrl_dgl.runs import LOCK_FILE, RunLock
from bgrl_dgl.training.checkpoint import list_checkpoints
from bgrl_dgl.training.config import TrainConfig

from helpers import REPO, assert_input_error

# Two layers with the default fanouts (10,10), which settings files may change.
TINY = ["--hidden", "16,8", "--predictor-hidden", "16", "--batch-size", "64", "--num-workers", "0",
        "--threads", "1", "--device", "cpu", "--warmup-steps", "0"]


def train_argv(store: Path, run: Path, *flags: str) -> list[str]:
    return ["train", "--data", str(store), "--out", str(run), *TINY, *flags]


def cli_result(capsys, argv: list[str]) -> subprocess.CompletedProcess:
    """The command line run in this process, reported as a finished process would be."""
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return subprocess.CompletedProcess(argv, code, captured.out, captured.err)


def snapshot(path: Path) -> dict[str, bytes] | None:
    """Every file under ``path`` (or ``path`` itself) with its bytes; None when absent."""
    if not path.exists():
        return None
    if path.is_file():
        return {"": path.read_bytes()}
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*"))
            if p.is_file()}


@pytest.fixture(scope="module")
def finished_run(planted_store, tmp_path_factory) -> Path:
    """A two-step run, checkpoint at the end."""
    run = tmp_path_factory.mktemp("hostile") / "run"
    assert main(train_argv(planted_store, run, "--max-steps", "2")) == 0
    return run


# ---- settings: refused before the run directory exists ------------------------------------
NOT_UTF8 = b"optim:\n  lr: caf\xe9\n"
SETTINGS_CASES = {
    # id: (flags, YAML text or bytes or None, fragments of the message)
    "more fanouts than layers": (["--fanouts", "5,5,5"], None,
                                 ["command line", "fanouts gives 3 layer(s)", "has 2"]),
    "fanouts=-1 for two layers": (["--fanouts=-1"], None, ["fanouts gives 1 layer(s) (-1)"]),
    "fanouts of the yaml file": ([], "sampling: {fanouts: [4, 4, 4]}\n",
                                 ["settings.yaml", "fanouts gives 3 layer(s)"]),
    "lr nan": (["--lr", "nan"], None, ["lr must be a finite number, got nan"]),
    "lr inf": (["--lr", "inf"], None, ["lr must be a finite number, got inf"]),
    "lr overflowing float32 updates": (["--lr", "1e38"], None, ["lr must be at most"]),
    "weight decay nan": (["--weight-decay", "nan"], None, ["weight_decay must be a finite"]),
    "collapse ratio inf": (["--collapse-ratio", "inf"], None, ["collapse_ratio must be a finite"]),
    "edge drop nan": (["--edge-drop", "nan,0.2"], None, ["edge_drop must be a finite"]),
    "negative seed": (["--seed", "-1"], None, ["seed must lie in [0, 2**63 - 1], got -1"]),
    "seed of 1e23": (["--seed", str(10**23)], None, ["seed must lie in"]),
    "threads beyond any machine": (["--threads", "100000"], None, ["threads must lie in"]),
    "yaml nan": ([], "optim: {lr: .nan}\n", ["settings.yaml", "lr must be a finite number"]),
    "yaml negative seed": ([], "run: {seed: -5}\n", ["settings.yaml", "seed must lie in"]),
    "yaml float seed": ([], "run: {seed: 1.0e+23}\n", ["run.seed must be of type int"]),
    "yaml word for a float": ([], "optim: {lr: fast}\n", ["optim.lr must be a number, got 'fast'"]),
    "yaml section as a list": ([], "optim: [1, 2]\n",
                               ["settings.yaml", "section optim must be a mapping", "list"]),
    "yaml section as a number": ([], "model: 3\n", ["section model must be a mapping"]),
    "yaml list at the top": ([], "- optim\n", ["settings.yaml", "mapping"]),
    "yaml not utf-8": ([], NOT_UTF8, ["settings.yaml", "not UTF-8"]),
    "yaml unknown numeric key": ([], "optim: {1: 2, lr: 0.1}\n", ["unknown setting optim.1"]),
}


@pytest.mark.parametrize("case", list(SETTINGS_CASES))
def test_bad_settings_are_refused_before_anything_is_written(planted_store, tmp_path, capsys,
                                                             case) -> None:
    flags, text, fragments = SETTINGS_CASES[case]
    if text is not None:
        settings = tmp_path / "settings.yaml"
        settings.write_bytes(text if isinstance(text, bytes) else text.encode())
        flags = [*flags, "--config", str(settings)]
    run = tmp_path / "run"
    result = cli_result(capsys, train_argv(planted_store, run, "--max-steps", "1", *flags))
    assert_input_error(result, *fragments)
    assert not run.exists()


def test_a_directory_as_config_file_is_refused(planted_store, tmp_path, capsys) -> None:
    result = cli_result(capsys, train_argv(planted_store, tmp_path / "run", "--config",
                                           str(tmp_path)))
    assert_input_error(result, str(tmp_path), "is a directory")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("flags,fragments", [
    (["--fanouts", "3,3,3"], ["fanouts gives 3 layer(s)"]),
    (["--lr", "nan"], ["lr must be a finite number"]),
    (["--seed", "-3"], ["seed must lie in"]),
], ids=["fanouts", "lr", "seed"])
def test_bad_settings_on_resume_leave_the_run_unchanged(planted_store, finished_run, capsys,
                                                        flags, fragments) -> None:
    before = snapshot(finished_run)
    result = cli_result(capsys, train_argv(planted_store, finished_run, "--resume", *flags))
    assert_input_error(result, *fragments)
    assert snapshot(finished_run) == before


def test_a_saved_config_with_a_list_section_is_named_on_resume(planted_store, finished_run,
                                                               tmp_path, capsys) -> None:
    run = tmp_path / "run"
    run.mkdir()
    for name, data in snapshot(finished_run).items():
        (run / name).parent.mkdir(parents=True, exist_ok=True)
        (run / name).write_bytes(data)
    (run / "config.yaml").write_text("sampling: [1, 2]\n")
    before = snapshot(run)
    result = cli_result(capsys, ["train", "--data", str(planted_store), "--out", str(run),
                                 "--resume"])
    assert_input_error(result, str(run / "config.yaml"), "section sampling must be a mapping")
    assert snapshot(run) == before


def test_yaml_numbers_written_as_text_are_floats() -> None:
    """YAML 1.1 reads 1e-3 (no dot) as a string; a float setting accepts it."""
    data = yaml.safe_load("optim: {lr: 1e-3, weight_decay: 5e-4}\n"
                          "augment: {edge_drop: [2e-1, 1e-1]}\n")
    assert data["optim"]["lr"] == "1e-3"
    config = cfg.from_sections(TrainConfig, data)
    assert config.optim.lr == 0.001 and config.optim.weight_decay == 0.0005
    assert config.augment.edge_drop == [0.2, 0.1]


def test_a_resumed_run_takes_a_config_file_over_its_saved_settings(planted_store, tmp_path,
                                                                   capsys) -> None:
    run = tmp_path / "run"
    assert main(train_argv(planted_store, run, "--max-steps", "1")) == 0
    settings = tmp_path / "more.yaml"
    settings.write_text("optim: {max_steps: 2}\n")
    result = cli_result(capsys, ["train", "--data", str(planted_store), "--out", str(run),
                                 "--resume", "--config", str(settings)])
    assert result.returncode == 0, result.stderr
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["optim"]["max_steps"] == 2 and saved["model"]["hidden"] == [16, 8]
    assert [step for step, _ in list_checkpoints(run)] == [1, 2]


# ---- --out: only a new, empty or run directory ---------------------------------------------
def make_target(kind: str, tmp_path: Path, store: Path) -> tuple[Path, list[str]]:
    """An --out of ``kind`` and the fragments of the refusal it gets."""
    target = tmp_path / "out"
    if kind == "a file":
        target.write_text("my notes\n")
        return target, ["exists and is not a directory"]
    if kind == "a graph store":
        return store, [str(store), "is a graph store, not a run directory"]
    if kind == "a file's child":
        target.write_text("my notes\n")
        return target / "run", ["cannot create it"]
    target.mkdir()
    (target / "checkpoints").mkdir()
    (target / "notes.txt").write_text("keep me\n")
    return target, ["is not a run directory", "checkpoints and 1 more", "refusing to write"]


@pytest.mark.parametrize("kind", ["a file", "a graph store", "a file's child",
                                  "another directory"])
def test_an_out_that_is_not_a_run_directory_is_refused(planted_store, tmp_path, capsys,
                                                       kind) -> None:
    target, fragments = make_target(kind, tmp_path, planted_store)
    before = snapshot(target if target.exists() else target.parent)
    result = cli_result(capsys, train_argv(planted_store, target, "--max-steps", "1"))
    assert_input_error(result, *fragments)
    assert snapshot(target if target.exists() else target.parent) == before
    result = cli_result(capsys, train_argv(planted_store, target, "--max-steps", "1",
                                           "--resume"))
    assert_input_error(result, *fragments)


def test_an_empty_directory_or_one_left_with_a_lock_becomes_a_run(planted_store, tmp_path,
                                                                  capsys) -> None:
    for name in ("empty", "locked-before"):
        run = tmp_path / name
        run.mkdir()
        if name == "locked-before":
            (run / LOCK_FILE).write_text("1@elsewhere\n")  # left by a process that died
        result = cli_result(capsys, train_argv(planted_store, run, "--max-steps", "1"))
        assert result.returncode == 0, result.stderr
        assert (run / "config.yaml").is_file() and list_checkpoints(run)


# ---- a second writer -----------------------------------------------------------------------
def test_a_second_writer_is_refused_while_the_lock_is_held(planted_store, finished_run,
                                                           capsys) -> None:
    before = snapshot(finished_run)
    with RunLock(finished_run) as lock:
        lock.acquire()
        for flags in ([], ["--resume"]):
            result = cli_result(capsys, train_argv(planted_store, finished_run, *flags))
            assert_input_error(result, str(finished_run),
                               f"is in use by another train process (pid {os.getpid()})")
    after = snapshot(finished_run)
    assert after.pop(LOCK_FILE) == f"{os.getpid()}@{socket.gethostname()}\n".encode()
    before.pop(LOCK_FILE, None)
    assert after == before
    # Released: the run can be continued.
    result = cli_result(capsys, train_argv(planted_store, finished_run, "--resume",
                                           "--max-steps", "3"))
    assert result.returncode == 0, result.stderr


def wait_for(condition, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            raise AssertionError(f"training exited early: {process.communicate(timeout=10)}")
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met after {timeout} s")
        time.sleep(0.01)


def test_two_trainings_on_one_run_directory(planted_store, tmp_path, capsys) -> None:
    """The second is refused while the first runs (config, checkpoints and metrics stay the
    first's); the lock dies with its holder, even when killed, and the run then resumes with
    every step logged once."""
    run = tmp_path / "run"
    argv = train_argv(planted_store, run, "--max-steps", "100000", "--log-every", "1",
                      "--checkpoint-every", "3")
    first = subprocess.Popen([sys.executable, "-m", "bgrl_dgl", *argv], cwd=REPO,
                             stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: list_checkpoints(run), first)
        config = (run / "config.yaml").read_text()
        second = cli_result(capsys, train_argv(planted_store, run, "--max-steps", "5",
                                               "--seed", "7"))
        assert_input_error(second, str(run), f"in use by another train process (pid {first.pid})")
        assert (run / "config.yaml").read_text() == config
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=60)
    finally:
        first.kill()
        first.communicate(timeout=60)
    last_checkpoint = list_checkpoints(run)[-1][0]
    resumed = cli_result(capsys, ["train", "--data", str(planted_store), "--out", str(run),
                                  "--resume", "--max-steps", str(last_checkpoint + 2)])
    assert resumed.returncode == 0, resumed.stderr
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, last_checkpoint + 3))


# ---- divergence ----------------------------------------------------------------------------
def test_a_nan_loss_stops_the_run_before_it_changes_the_weights(planted_store, tmp_path,
                                                                capsys, monkeypatch) -> None:
    """The loss of step 4 is NaN: exit 1 naming the step; the checkpoint of step 3 stays the
    newest and the metrics end at step 3."""
    original = BGRL.loss
    calls = []

    def loss_nan_at_step_4(self, *args, **kwargs):
        loss, h = original(self, *args, **kwargs)
        calls.append(1)
        return (loss * math.nan if len(calls) == 4 else loss), h

    monkeypatch.setattr(BGRL, "loss", loss_nan_at_step_4)
    run = tmp_path / "run"
    result = cli_result(capsys, train_argv(planted_store, run, "--max-steps", "8",
                                           "--checkpoint-every", "3", "--log-every", "1"))
    assert result.returncode == 1, result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert result.stderr.startswith("error: step 4: the loss is nan: training diverged")
    assert [step for step, _ in list_checkpoints(run)] == [3]
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3]
    monkeypatch.setattr(BGRL, "loss", original)
    result = cli_result(capsys, ["train", "--data", str(planted_store), "--out", str(run),
                                 "--resume"])
    assert result.returncode == 0, result.stderr
    assert list_checkpoints(run)[-1][0] == 8


def test_non_finite_weights_are_never_checkpointed(planted_store, tmp_path, capsys,
                                                   monkeypatch) -> None:
    original = BGRL.update_target
    calls = []

    def poison_after_step_2(self, tau):
        original(self, tau)
        calls.append(1)
        if len(calls) == 2:
            with torch.no_grad():
                next(self.online.parameters()).fill_(math.inf)

    monkeypatch.setattr(BGRL, "update_target", poison_after_step_2)
    run = tmp_path / "run"
    result = cli_result(capsys, train_argv(planted_store, run, "--max-steps", "6",
                                           "--checkpoint-every", "1"))
    assert result.returncode == 1, result.stderr
    assert result.stderr.startswith("error: step 2: online.") and "NaN or infinite" in result.stderr
    assert [step for step, _ in list_checkpoints(run)] == [1]


def test_a_diverging_learning_rate_ends_with_an_error_and_finite_checkpoints(
        planted_store, tmp_path, capsys) -> None:
    run = tmp_path / "run"
    result = cli_result(capsys, train_argv(planted_store, run, "--lr", "1e6", "--max-steps", "30",
                                           "--checkpoint-every", "2", "--log-every", "1"))
    assert result.returncode == 1, result.stderr
    assert "training diverged" in result.stderr and "Traceback" not in result.stderr
    for _, path in list_checkpoints(run):
        weights = torch.load(path, map_location="cpu", weights_only=True)["model"]
        assert all(torch.isfinite(t).all() for t in weights.values() if t.is_floating_point())
    losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(loss) for loss in losses)
