"""``train`` checks the memory plan before it writes anything; ``plan`` prints it, with or
without a store."""
from __future__ import annotations

import subprocess

import pytest

from bgrl_dgl.cli import main
from bgrl_dgl.training.memory_check import RAM_ENV, SHM_ENV

from helpers import assert_input_error

TINY = ["--hidden", "32,16", "--predictor-hidden", "32", "--fanouts", "5,5", "--batch-size",
        "64", "--threads", "1", "--device", "cpu", "--max-steps", "1"]
MAG240M = ["--nodes", "121751666", "--edges", "2593241212", "--feat-dim", "768",
           "--feature-dtype", "float16", "--config", "configs/mag240m.yaml",
           "--nproc-per-node", "8", "--device", "cuda"]


def cli_result(capsys, argv: list[str]) -> subprocess.CompletedProcess:
    code = main(argv)
    captured = capsys.readouterr()
    return subprocess.CompletedProcess(argv, code, captured.out, captured.err)


@pytest.mark.parametrize("variable, fragments", [
    (SHM_ENV, ["/dev/shm", "batches in flight", "1 process(es) x (1 worker(s) x 2 + 1) batches"]),
    (RAM_ENV, ["/proc/meminfo", "cannot be paged out", "1 worker(s) of"]),
])
def test_train_refuses_a_plan_the_machine_cannot_hold(planted_store, tmp_path, capsys,
                                                      monkeypatch, variable, fragments) -> None:
    monkeypatch.setenv(variable, "1000")
    run = tmp_path / "run"
    result = cli_result(capsys, ["train", "--data", str(planted_store), "--out", str(run),
                                 *TINY, "--num-workers", "1", "--cache-bytes", "1KB"])
    assert_input_error(result, *fragments)
    assert result.stdout == ""
    assert not run.exists()


def test_train_announces_its_plan(planted_store, tmp_path, capsys) -> None:
    run = tmp_path / "run"
    result = cli_result(capsys, ["train", "--data", str(planted_store), "--out", str(run),
                                 *TINY, "--num-workers", "0"])
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "memory plan: 1 process(es) x 0 worker(s) on cpu"
    assert any(line.split()[:2] == ["per", "process"] for line in lines)
    assert lines[-1].startswith("trained to step 1")
    assert "memory plan" not in result.stderr


def test_plan_prints_the_runbook_machine(capsys) -> None:
    result = cli_result(capsys, ["plan", *MAG240M, "--cache-bytes", "200GB", "--ram", "512GB",
                                 "--shm", "256GB"])
    assert result.returncode == 0 and result.stderr == ""
    lines = result.stdout.splitlines()
    assert lines[0] == "memory plan: 8 process(es) x 4 worker(s) on cuda"
    text = dict(line.strip().split("  ", 1) for line in lines[1:])
    # fanouts 20,10 under an average degree of 21.3: 1024 x 11 x 21 input rows, float16.
    assert text["batch"].lstrip().startswith("236,544 input rows")
    # The whole feature file (174.17 GiB) is less than the budget: the cache stops at N rows.
    assert text["feature cache"].strip().startswith("174.17 GiB rows + 0.45 GiB slots")
    assert text["pinned"].strip() == "8 x 9 x 0.50 GiB = 36.00 GiB"
    assert "of 256.00 GiB free" in text["/dev/shm"]


def test_plan_refuses_as_train_would(capsys) -> None:
    result = cli_result(capsys, ["plan", *MAG240M, "--cache-bytes", "48GB", "--ram", "128GB",
                                 "--shm", "64GB"])
    assert result.returncode == 2
    assert result.stdout.startswith("memory plan: 8 process(es) x 4 worker(s) on cuda")
    warning, error = result.stderr.splitlines()
    assert warning.startswith("warning: the topology (20.23 GiB) does not fit")
    assert error.startswith("error: /dev/shm: the feature cache (48.45 GiB), the shared arrays "
                            "(2.27 GiB) and the batches in flight (24.69 GiB")


def test_plan_of_a_store_and_bad_sizes(planted_store, capsys) -> None:
    result = cli_result(capsys, ["plan", "--data", str(planted_store), *TINY,
                                 "--num-workers", "2", "--seeds", "split:train"])
    assert result.returncode == 0, result.stderr
    assert "1 x (2 x 2 + 1) batches" in result.stdout
    assert_input_error(cli_result(capsys, ["plan", "--nodes", "10", "--feat-dim", "4"]),
                       "give --data STORE, or --nodes, --edges and --feat-dim")
