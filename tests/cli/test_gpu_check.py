"""scripts/gpu_check.sh on a machine without a GPU (the cuda tests skipped, the GPU stages
skipped, one JSON line at the end) and scripts/ddp_check.py on the CPU with gloo."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import REPO

GPU_STAGES = ("ddp_nccl", "train_w1", "train_w4", "train_w8", "export", "cpu_tests")


def test_gpu_check_without_a_gpu_skips_its_gpu_stages_and_ends_with_one_json_line(
        tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPU_CHECK_")}
    env.update(CUDA_VISIBLE_DEVICES="", PYTHON=sys.executable, OUT=str(tmp_path))
    result = subprocess.run(["bash", "scripts/gpu_check.sh"], cwd=REPO, env=env,
                            stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=400,
                            check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["status"] == "no cuda device" and report["gpus"] == 0
    assert report["torch"] and report["cuda"] is not None
    assert report["stages"]["cuda_tests"]["status"] == "passed"
    # Every cuda test was selected and skipped, none ran.
    tests = report["tests"]
    assert tests["passed"] == tests["failed"] == tests["errors"] == 0 and tests["skipped"] >= 20
    for stage in GPU_STAGES:
        assert report["stages"][stage] == {"status": "skipped", "reason": "no cuda device"}
    assert report["train_seeds_per_s"] is None and report["export_nodes_per_s"] is None
    logs = tmp_path / "gpu-check"
    assert "SKIPPED" in (logs / "cuda_tests.log").read_text()
    assert "no CUDA device: torch.cuda.is_available() is False" in result.stdout
    assert json.loads((logs / "result.json").read_text()) == report


@pytest.mark.parametrize("processes", [1, 2])
def test_ddp_check_keeps_the_targets_of_every_rank_identical(planted_store: Path, tmp_path: Path,
                                                             processes: int) -> None:
    """On the CPU with gloo; a world of one process wraps its online branch in DDP itself."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={processes}", "scripts/ddp_check.py", "--data",
               str(planted_store), "--out", str(tmp_path / "run"), "--device", "cpu",
               "--backend", "gloo", "--steps", "4", "--batch-size", "128"]
    result = subprocess.run(command, cwd=REPO, stdin=subprocess.DEVNULL, capture_output=True,
                            text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1  # rank 0 alone reports
    report = json.loads(lines[0])
    assert report["backend"] == "gloo" and report["world_size"] == processes
    assert report["steps"] == 4 and report["target_divergence"] == 0.0
    assert report["targets_identical"] and report["ddp_wrapped_by_trainer"] == (processes > 1)
    # Several processes check their targets every 2 steps in the training loop as well.
    assert report["logged_target_divergence"] == ([0.0, 0.0] if processes > 1 else [])
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 4
