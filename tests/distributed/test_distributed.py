"""Training under torchrun on the CPU with gloo: two processes on one machine, a killed rank
restarted by torchrun, two single-process "nodes" on loopback, diverged targets caught."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bgrl_dgl.training.config import OptimConfig
from bgrl_dgl.training.distributed import World, world_from_env
from bgrl_dgl.training.host import compute_threads

from helpers import PLANTED_NODES, REPO

NUM_NODES, BATCH_SIZE, STEPS = PLANTED_NODES, 64, 12
STEPS_PER_EPOCH = -(-NUM_NODES // (2 * BATCH_SIZE))  # global batch of two processes
SETTINGS = ["--hidden", "32,16", "--predictor-hidden", "32", "--fanouts", "5,5",
            "--batch-size", str(BATCH_SIZE), "--num-workers", "0", "--threads", "1",
            "--device", "cpu",
            "--max-steps", str(STEPS), "--log-every", "1", "--checkpoint-every", "4",
            "--sync-check-every", "3", "--dropout", "0.1", "--warmup-steps", "3"]
HARNESS = REPO / "tests" / "distributed" / "torchrun_harness.py"


@pytest.fixture(scope="module")
def store_dir(planted_store) -> Path:
    return planted_store


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun(launch: list[str], store: Path, run: Path, records: Path, *flags: str,
             env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start ``torchrun LAUNCH tests/distributed/torchrun_harness.py train ...``."""
    records.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "torch.distributed.run", *launch, str(HARNESS), "train",
               "--data", str(store), "--out", str(run), *SETTINGS, *flags]
    return subprocess.Popen(command, cwd=REPO, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "BGRL_TEST_DIR": str(records), **(env or {})})


def finish(process: subprocess.Popen, timeout: float = 300) -> tuple[int, str]:
    output, _ = process.communicate(timeout=timeout)
    return process.returncode, output


def run_two_processes(store: Path, run: Path, records: Path, *flags: str,
                      launch: tuple[str, ...] = (), env: dict[str, str] | None = None) -> str:
    code, output = finish(torchrun(["--standalone", "--nproc-per-node=2", *launch], store, run,
                                   records, *flags, env=env))
    assert code == 0, output
    return output


def final_state(records: Path, rank: int) -> dict:
    return torch.load(records / f"final-rank{rank}.pt", weights_only=True)


def saved_steps(records: Path, rank: int) -> list[int]:
    path = records / f"saves-rank{rank}.txt"
    return [int(line) for line in path.read_text().split()] if path.exists() else []


def read_metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def assert_same_weights(left: dict[str, torch.Tensor], right: dict[str, torch.Tensor]) -> None:
    assert left.keys() == right.keys()
    for name in left:
        assert torch.equal(left[name], right[name]), name


@pytest.fixture(scope="module")
def reference(store_dir, tmp_path_factory) -> tuple[Path, Path]:
    """(run, records) of an uninterrupted two-process run."""
    root = tmp_path_factory.mktemp("reference")
    run_two_processes(store_dir, root / "run", root / "records")
    return root / "run", root / "records"


def test_world_comes_from_torchruns_variables() -> None:
    assert world_from_env({}) == World()
    env = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
           "TORCHELASTIC_RESTART_COUNT": "1"}
    world = world_from_env(env)
    assert (world.rank, world.world_size, world.local_rank, world.restart_count) == (3, 4, 1, 1)
    assert world.is_distributed and not world.is_main


@pytest.mark.parametrize("env, problem", [
    ({"RANK": "x", "WORLD_SIZE": "2"}, "RANK='x' is not an integer"),
    ({"RANK": "2", "WORLD_SIZE": "2"}, "outside WORLD_SIZE=2"),
    ({"LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "1"}, "outside LOCAL_WORLD_SIZE=1"),
])
def test_bad_torchrun_variables_are_input_errors(env, problem) -> None:
    from bgrl_dgl.errors import InputError

    with pytest.raises(InputError, match=problem):
        world_from_env(env)


def test_learning_rate_rule_and_thread_share() -> None:
    assert OptimConfig(lr=1e-3).peak_lr(4) == 1e-3
    assert OptimConfig(lr=1e-3, lr_scaling="linear").peak_lr(4) == pytest.approx(4e-3)
    assert OptimConfig(lr=1e-3, lr_scaling="sqrt").peak_lr(4) == pytest.approx(2e-3)
    cores = len(os.sched_getaffinity(0))
    assert compute_threads(0, 0, local_processes=1) == cores
    assert compute_threads(0, 1, local_processes=cores) == 1  # never below one thread
    assert compute_threads(3, 1, local_processes=2) == 3


def test_two_processes_split_seeds_keep_identical_targets_and_rank_0_writes(reference) -> None:
    run, records = reference
    rank0, rank1 = final_state(records, 0), final_state(records, 1)
    # Every rank ends with the same online, predictor and target weights.
    assert_same_weights(rank0["model"], rank1["model"])
    # In every epoch, the ranks' seeds are disjoint and together cover every node once.
    for epoch in range(STEPS // STEPS_PER_EPOCH):
        steps = range(epoch * STEPS_PER_EPOCH, (epoch + 1) * STEPS_PER_EPOCH)
        seeds = [sum((state["seeds"][s] for s in steps), []) for state in (rank0, rank1)]
        assert not set(seeds[0]) & set(seeds[1])
        assert sorted(seeds[0] + seeds[1]) == list(range(NUM_NODES))
    # Rank 0 alone wrote checkpoints and metrics, once per step.
    assert saved_steps(records, 0) == [4, 8, 12] and saved_steps(records, 1) == []
    metrics = read_metrics(run)
    assert [m["step"] for m in metrics] == list(range(1, STEPS + 1))
    checked = {m["step"]: m["target_divergence"] for m in metrics if "target_divergence" in m}
    assert checked == {3: 0.0, 6: 0.0, 9: 0.0, 12: 0.0}
    assert (run / "config.yaml").exists() and "world_size: 2" in (run / "run.yaml").read_text()


def test_resume_continues_every_rank_from_the_newest_checkpoint(store_dir, reference,
                                                                tmp_path) -> None:
    run, records = reference
    resumed = tmp_path / "run"
    shutil.copytree(run, resumed)
    (resumed / "checkpoints" / "step-00000012.pt").unlink()
    run_two_processes(store_dir, resumed, tmp_path / "records", "--resume")
    assert saved_steps(tmp_path / "records", 0) == [12]
    for rank in (0, 1):
        assert_same_weights(final_state(tmp_path / "records", rank)["model"],
                            final_state(records, rank)["model"])
    assert [m["loss"] for m in read_metrics(resumed)] == [m["loss"] for m in read_metrics(run)]


def test_a_killed_rank_restarts_the_group_from_the_newest_checkpoint(store_dir, reference,
                                                                     tmp_path) -> None:
    run, records = reference
    run_two_processes(store_dir, tmp_path / "run", tmp_path / "records",
                      launch=("--max-restarts=1",), env={"BGRL_TEST_KILL": "1:7"})
    # The first attempt checkpointed step 4; the restarted group resumed there.
    assert saved_steps(tmp_path / "records", 0) == [4, 8, 12]
    for rank in (0, 1):
        restarted = final_state(tmp_path / "records", rank)
        assert restarted["restart_count"] == 1
        assert_same_weights(restarted["model"], final_state(records, rank)["model"])
    losses = [m["loss"] for m in read_metrics(run)]
    assert [m["loss"] for m in read_metrics(tmp_path / "run")] == losses


def test_sigterm_to_one_rank_stops_all_after_the_same_step_with_a_checkpoint(store_dir, reference,
                                                                            tmp_path) -> None:
    run, records = reference
    output = run_two_processes(store_dir, tmp_path / "run", tmp_path / "records",
                               env={"BGRL_TEST_SIGTERM": "1:6"})
    assert "stopped at step 6" in output
    assert saved_steps(tmp_path / "records", 0) == [4, 6]
    rank0, rank1 = final_state(tmp_path / "records", 0), final_state(tmp_path / "records", 1)
    assert len(rank0["seeds"]) == len(rank1["seeds"]) == 6
    assert_same_weights(rank0["model"], rank1["model"])
    assert read_metrics(tmp_path / "run")[-1]["step"] == 6
    # Resuming finishes the run as if it had never stopped.
    run_two_processes(store_dir, tmp_path / "run", tmp_path / "resumed", "--resume")
    assert_same_weights(final_state(tmp_path / "resumed", 0)["model"],
                        final_state(records, 0)["model"])


def test_two_nodes_on_loopback_train_together(store_dir, reference, tmp_path) -> None:
    run, records = reference
    endpoint = f"127.0.0.1:{free_port()}"
    nodes = [torchrun(["--nnodes=2", f"--node-rank={node}", "--nproc-per-node=1",
                       f"--rdzv-endpoint={endpoint}"], store_dir, tmp_path / "run",
                      tmp_path / "records") for node in (0, 1)]
    for node in nodes:
        code, output = finish(node)
        assert code == 0, output
    # Two one-process nodes are the same world as two processes on one node.
    for rank in (0, 1):
        assert_same_weights(final_state(tmp_path / "records", rank)["model"],
                            final_state(records, rank)["model"])
    assert saved_steps(tmp_path / "records", 1) == []


def test_diverged_targets_stop_every_rank_with_a_clear_error(store_dir, tmp_path) -> None:
    process = torchrun(["--standalone", "--nproc-per-node=2"], store_dir, tmp_path / "run",
                       tmp_path / "records", env={"BGRL_TEST_PERTURB": "1:2"})
    code, output = finish(process)
    assert code != 0
    errors = [line for line in output.splitlines()
              if line.startswith("error: the target encoders of the ranks differ")]
    assert len(errors) == 2 and "at step 3" in errors[0], output
    assert "Traceback" not in output.split("error:")[0]
