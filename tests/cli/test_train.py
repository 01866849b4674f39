"""The ``train`` command and the training loop: loss, schedules, metrics, configuration,
checkpoints, exact resumption after SIGINT/SIGTERM, bad input, encoders and the probe."""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from bgrl_dgl import config as cfg
from bgrl_dgl.cli import main
from bgrl_dgl.model.bgrl import build_model, cosine_tau
from bgrl_dgl.runs import load_encoder
from bgrl_dgl.training.checkpoint import list_checkpoints
from bgrl_dgl.training.config import TrainConfig, lr_factor

from helpers import PLANTED_NODES, REPO, assert_input_error

NUM_NODES, BATCH_SIZE = PLANTED_NODES, 64
STEPS_PER_EPOCH = 10  # ceil(600 / 64)
STEPS, CHECKPOINT_EVERY, WARMUP, LR = 40, 15, 5, 0.005
TINY = ["--hidden", "32,16", "--predictor-hidden", "32", "--fanouts", "5,5",
        "--batch-size", str(BATCH_SIZE), "--num-workers", "0", "--lr", str(LR),
        "--warmup-steps", str(WARMUP), "--threads", "1", "--device", "cpu"]
# Dropout draws from torch's global generator, which a resumed run must restore.
REFERENCE = [*TINY, "--max-steps", str(STEPS), "--log-every", "1",
             "--checkpoint-every", str(CHECKPOINT_EVERY), "--dropout", "0.1"]
METRIC_KEYS = {"step", "epoch", "loss", "lr", "tau", "seeds", "seeds_per_s", "elapsed_s",
               "embedding_std",
               "sample_s", "features_s", "compute_s"}


@pytest.fixture(scope="session")
def store_dir(planted_store) -> Path:
    return planted_store


def train_args(store: Path, run: Path, *flags: str) -> list[str]:
    return ["train", "--data", str(store), "--out", str(run), *flags]


@pytest.fixture(scope="session")
def reference_run(store_dir, tmp_path_factory) -> Path:
    """STEPS uninterrupted steps (4 epochs), every step logged."""
    run = tmp_path_factory.mktemp("train") / "reference"
    assert main(train_args(store_dir, run, *REFERENCE)) == 0
    return run


def read_metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def logged_steps(run: Path) -> int:
    path = run / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


def checkpoint_steps(run: Path) -> list[int]:
    return [step for step, _ in list_checkpoints(run)]


def load_weights_only(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def cli_result(capsys, argv: list[str]) -> subprocess.CompletedProcess:
    """Run the command line in this process, as a finished process would report it."""
    code = main(argv)
    captured = capsys.readouterr()
    return subprocess.CompletedProcess(argv, code, captured.out, captured.err)


# ---- what one run writes ------------------------------------------------------------------
def test_loss_decreases_on_planted_classes(reference_run) -> None:
    losses = [m["loss"] for m in read_metrics(reference_run)]
    first, last = np.mean(losses[:5]), np.mean(losses[-5:])
    assert all(math.isfinite(loss) for loss in losses)
    assert last < first - 0.2, (first, last)


def test_metrics_have_every_field_for_every_logged_step(reference_run) -> None:
    lines = read_metrics(reference_run)
    assert [m["step"] for m in lines] == list(range(1, STEPS + 1))
    for m in lines:
        assert METRIC_KEYS <= set(m), METRIC_KEYS - set(m)
        assert m["epoch"] == (m["step"] - 1) // STEPS_PER_EPOCH
        assert m["seeds_per_s"] > 0 and m["compute_s"] > 0
        assert m["sample_s"] >= 0 and m["features_s"] >= 0
        assert 0 < m["embedding_std"] < 1


def test_lr_factor_warms_up_linearly_then_decays_by_cosine() -> None:
    warmup, total = 4, 20
    assert [lr_factor(s, warmup, total) for s in range(warmup)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_factor(warmup, warmup, total) == 1.0
    assert lr_factor(12, warmup, total) == pytest.approx(0.5)  # half-way through the decay
    assert lr_factor(total, warmup, total) == pytest.approx(0.0, abs=1e-12)
    decay = [lr_factor(s, warmup, total) for s in range(warmup, total + 1)]
    assert all(a > b for a, b in zip(decay, decay[1:]))
    assert lr_factor(0, 0, total) == 1.0


def test_logged_lr_follows_the_schedule(reference_run) -> None:
    lrs = [m["lr"] for m in read_metrics(reference_run)]
    expected = [LR * lr_factor(step, WARMUP, STEPS) for step in range(STEPS)]
    assert lrs == pytest.approx(expected, rel=1e-9)
    assert lrs[:WARMUP] == pytest.approx([LR * (k + 1) / WARMUP for k in range(WARMUP)])
    assert max(lrs) == pytest.approx(LR) and lrs[-1] < 0.01 * LR


def test_tau_rises_from_tau_base_to_one(reference_run) -> None:
    taus = [m["tau"] for m in read_metrics(reference_run)]
    assert taus == pytest.approx([cosine_tau(step, STEPS, 0.99) for step in range(1, STEPS + 1)])
    assert 0.99 <= taus[0] < 0.9901
    assert all(a <= b for a, b in zip(taus, taus[1:]))
    assert taus[-1] == 1.0


def test_checkpoints_every_n_steps_and_at_the_end_load_weights_only(reference_run) -> None:
    # every CHECKPOINT_EVERY steps (15, 30) and the last step; older ones would be pruned
    assert checkpoint_steps(reference_run) == [CHECKPOINT_EVERY, 2 * CHECKPOINT_EVERY, STEPS]
    _, last = list_checkpoints(reference_run)[-1]
    state = load_weights_only(last)
    assert state["step"] == STEPS and state["epoch"] == STEPS // STEPS_PER_EPOCH
    assert {"model", "optimizer", "scheduler", "rng", "config", "feat_dim"} <= set(state)
    assert state["config"] == yaml.safe_load((reference_run / "config.yaml").read_text())
    assert state["scheduler"]["last_epoch"] == STEPS
    middle = load_weights_only(list_checkpoints(reference_run)[0][1])
    assert middle["step"] == CHECKPOINT_EVERY
    assert any(not torch.equal(middle["model"][k], state["model"][k]) for k in state["model"])


def test_config_yaml_holds_flags_over_config_file_over_defaults(store_dir, tmp_path) -> None:
    settings = tmp_path / "settings.yaml"
    settings.write_text(yaml.safe_dump({
        "sampling": {"batch_size": 32, "fanouts": [3, 4]},
        "optim": {"lr": 0.002, "tau_base": 0.95},
        "model": {"hidden": [32, 16], "predictor_hidden": 32},
    }))
    run = tmp_path / "run"
    argv = train_args(store_dir, run, "--config", str(settings), "--batch-size", "48",
                      "--tau-base", "0.9", "--max-steps", "2", "--num-workers", "0",
                      "--threads", "1", "--device", "cpu")
    assert main(argv) == 0
    expected = cfg.to_dict(TrainConfig.defaults())
    expected["sampling"].update(batch_size=48, fanouts=[3, 4], num_workers=0)
    expected["optim"].update(lr=0.002, tau_base=0.9, max_steps=2)
    expected["model"].update(hidden=[32, 16], predictor_hidden=32)
    expected["run"].update(threads=1, device="cpu")
    assert yaml.safe_load((run / "config.yaml").read_text()) == expected
    run_info = yaml.safe_load((run / "run.yaml").read_text())
    assert run_info["num_nodes"] == NUM_NODES and Path(run_info["data"]) == store_dir.resolve()
    assert read_metrics(run)[-1]["tau"] == 1.0 and checkpoint_steps(run) == [2]


# ---- encoders and the probe ----------------------------------------------------------------
def encoder_weights(run: Path, which: str) -> dict[str, torch.Tensor]:
    return load_encoder(run, which=which).encoder.state_dict()


def test_online_target_and_random_encoders(reference_run) -> None:
    online, target, random = (encoder_weights(reference_run, w) for w in ("online", "target",
                                                                          "random"))
    assert online.keys() == target.keys() == random.keys()
    assert any(not torch.equal(online[k], target[k]) for k in online)
    assert any(not torch.equal(online[k], random[k]) for k in online)
    config = TrainConfig.from_plain(yaml.safe_load((reference_run / "config.yaml").read_text()))
    initial = build_model(16, config.model, config.run.seed).online.state_dict()
    assert all(torch.equal(random[k], initial[k]) for k in initial)
    assert not load_encoder(reference_run, which="online").encoder.training


def test_evaluate_run_prints_one_json_object(reference_run, capsys) -> None:
    assert main(["evaluate", "--run", str(reference_run), "--json"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1
    result = json.loads(lines[0])
    assert result["encoder"] == "online" and result["num_splits"] == 1
    assert 0.25 < result["test_acc_mean"] <= 1.0


def test_evaluate_run_of_the_random_encoder_ignores_training(store_dir, reference_run, tmp_path,
                                                      capsys) -> None:
    """The random encoder is the initial one: a run of one step probes exactly the same."""
    short = tmp_path / "short"
    assert main(train_args(store_dir, short, *TINY, "--max-steps", "1")) == 0
    capsys.readouterr()
    results = []
    for run in (reference_run, short):
        assert main(["evaluate", "--run", str(run), "--json", "--encoder", "random"]) == 0
        results.append(json.loads(capsys.readouterr().out))
    assert results[0] == results[1]
    assert results[0]["encoder"] == "random" and 0.0 <= results[0]["test_acc_mean"] <= 1.0


# ---- stopping and resuming -----------------------------------------------------------------
def wait_for_lines(run: Path, count: int, process: subprocess.Popen | None = None,
                   timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while logged_steps(run) < count:
        if process is not None and process.poll() is not None:
            raise AssertionError(f"training exited early: {process.communicate()}")
        if time.monotonic() > deadline:
            raise AssertionError(f"no {count} metric lines after {timeout} s")
        time.sleep(0.005)


def stop_in_subprocess_with_sigint(store: Path, run: Path,
                                   after_lines: int) -> subprocess.CompletedProcess:
    process = subprocess.Popen(
        [sys.executable, "-m", "bgrl_dgl", *train_args(store, run, *REFERENCE)],
        cwd=REPO, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True)
    try:
        wait_for_lines(run, after_lines, process)
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=120)
    finally:
        process.kill()
    return subprocess.CompletedProcess(process.args, process.returncode, out, err)


def resume_in_process_stopped_by_sigterm(store: Path, run: Path, after_lines: int) -> int:
    """Resume; a watcher thread sends this process SIGTERM once ``after_lines`` are logged.
    A no-op handler stands in for the default one around the run, so a signal that came
    only after training ended cannot kill the test session (the assertions then fail)."""
    def watch() -> None:
        wait_for_lines(run, after_lines)
        os.kill(os.getpid(), signal.SIGTERM)

    previous = signal.signal(signal.SIGTERM, lambda *_: None)
    watcher = threading.Thread(target=watch, daemon=True)
    try:
        watcher.start()
        code = main(train_args(store, run, "--resume"))
        watcher.join(timeout=120)
    finally:
        signal.signal(signal.SIGTERM, previous)
    return code


def test_resume_after_sigint_and_sigterm_reproduces_the_uninterrupted_run(
        store_dir, reference_run, tmp_path) -> None:
    run = tmp_path / "interrupted"
    first = stop_in_subprocess_with_sigint(store_dir, run, after_lines=3)
    assert first.returncode == 0, first.stderr
    assert "checkpoint written, resume with --resume" in first.stderr
    (stop1,) = checkpoint_steps(run)
    assert 3 <= stop1 < STEPS - 5
    assert logged_steps(run) == stop1

    assert resume_in_process_stopped_by_sigterm(store_dir, run, after_lines=stop1 + 3) == 0
    stop2 = checkpoint_steps(run)[-1]
    assert stop1 < stop2 < STEPS
    assert logged_steps(run) == stop2

    assert main(train_args(store_dir, run, "--resume")) == 0
    assert checkpoint_steps(run)[-1] == STEPS
    resumed, straight = read_metrics(run), read_metrics(reference_run)
    for key in ("step", "epoch", "loss", "lr", "tau", "embedding_std"):
        assert [m[key] for m in resumed] == [m[key] for m in straight], key
    resumed_state = load_weights_only(list_checkpoints(run)[-1][1])
    straight_state = load_weights_only(list_checkpoints(reference_run)[-1][1])
    for name, tensor in straight_state["model"].items():
        assert torch.equal(resumed_state["model"][name], tensor), name
    assert (run / "config.yaml").read_text() == (reference_run / "config.yaml").read_text()


def test_resume_of_a_finished_run_trains_no_further(store_dir, reference_run, tmp_path) -> None:
    run = tmp_path / "finished"
    assert main(train_args(store_dir, run, *TINY, "--max-steps", "2", "--log-every", "1")) == 0
    before = (run / "metrics.jsonl").read_text()
    assert main(train_args(store_dir, run, "--resume")) == 0
    assert (run / "metrics.jsonl").read_text() == before
    assert checkpoint_steps(run) == [2]


# ---- host allocator ------------------------------------------------------------------------
FAULTS_PER_STEP = """
import resource
import torch
from bgrl_dgl.training.host import keep_freed_host_memory
print(keep_freed_host_memory())
def step():  # activations of several sizes alive together, then freed, as in a training step
    held = [torch.ones(rows, 1024) for rows in (3000, 1000, 2500, 500, 2000)]
    held.append(torch.cat(held[:2]))
for _ in range(3):
    step()
faults = []
for _ in range(20):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    step()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(sorted(faults)[len(faults) // 2])  # the median step: robust to a stray kernel sweep
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_training_reuses_freed_host_memory_without_page_faults() -> None:
    """Steps that touch ~13,000 pages fault none in once the allocator keeps freed memory
    (glibc's default unmaps and faults in again ~200 pages per step here). The median step is
    compared: the kernel may now and then reclaim or compact pages under one step."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "GLIBC_TUNABLES"))}
    out = subprocess.run([sys.executable, "-c", FAULTS_PER_STEP], env=env, check=True,
                         capture_output=True, text=True).stdout.split()
    assert out[0] == "True" and float(out[1]) < 20, out
    out = subprocess.run([sys.executable, "-c", FAULTS_PER_STEP], check=True, capture_output=True,
                         text=True, env={**env, "MALLOC_TRIM_THRESHOLD_": "131072"}).stdout.split()
    assert out[0] == "False", "a user's own allocator setting is left alone"


# ---- refusals ------------------------------------------------------------------------------
def test_a_run_directory_with_a_checkpoint_needs_resume(store_dir, reference_run, capsys) -> None:
    before = {p: p.stat().st_mtime_ns for p in reference_run.rglob("*")}
    result = cli_result(capsys, train_args(store_dir, reference_run, *REFERENCE))
    assert_input_error(result, str(reference_run), "--resume")
    assert {p: p.stat().st_mtime_ns for p in reference_run.rglob("*")} == before


@pytest.mark.parametrize("case", ["missing store", "unknown yaml key", "zero fanout",
                                  "missing split", "seed ids out of range"])
def test_bad_input_is_one_line_and_leaves_no_run_directory(store_dir, tmp_path, capsys,
                                                           case) -> None:
    run = tmp_path / "run"
    settings = tmp_path / "settings.yaml"
    settings.write_text("model: {bogus: 1}\n")
    seeds = tmp_path / "seeds.npy"
    np.save(seeds, np.array([0, NUM_NODES]))
    data, flags, fragments = {
        "missing store": (tmp_path / "absent", [], [str(tmp_path / "absent"), "no such store"]),
        "unknown yaml key": (store_dir, ["--config", str(settings)],
                             [str(settings), "unknown setting model.bogus"]),
        "zero fanout": (store_dir, ["--fanouts", "0"], ["fanouts must be positive"]),
        "missing split": (store_dir, ["--seeds", "split:nope"], ["no split named 'nope'"]),
        "seed ids out of range": (store_dir, ["--seeds", str(seeds)],
                                  [str(seeds), f"[0, {NUM_NODES})"]),
    }[case]
    result = cli_result(capsys, train_args(data, run, *TINY, "--max-steps", "1", *flags))
    assert_input_error(result, *fragments)
    assert not run.exists()


def test_a_bad_flag_value_is_a_usage_error(store_dir, tmp_path, capsys) -> None:
    with pytest.raises(SystemExit) as caught:
        main(train_args(store_dir, tmp_path / "run", "--conv", "bogus"))
    assert caught.value.code == 2
    assert "conv must be one of gcn, sage, gat" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_resuming_with_a_different_model_is_an_input_error(store_dir, tmp_path, capsys) -> None:
    run = tmp_path / "run"
    assert main(train_args(store_dir, run, *TINY, "--max-steps", "1")) == 0
    capsys.readouterr()
    saved = (run / "config.yaml").read_text()
    result = cli_result(capsys, train_args(store_dir, run, "--resume", "--hidden", "32,8"))
    assert_input_error(result, str(run / "checkpoints"), "do not fit", "size mismatch")
    assert (run / "config.yaml").read_text() == saved
