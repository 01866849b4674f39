"""Fault injection: ``prepare``, ``train`` (with and without a feature cache) and ``embed``
killed with SIGKILL at several points. After each kill no process of the command outlives it
by more than a few seconds; what it leaves behind (temp directories, the feature cache in
/dev/shm, scratch directories) is cleaned up by the next run; and the rerun, or
``train --resume``, ends equal to an uninterrupted run."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow.dataset as ds
import pytest
import torch

from bgrl_dgl.cli import main
from bgrl_dgl.loading.feature_cache import default_cache_root, user_prefix
from bgrl_dgl.training.checkpoint import list_checkpoints

from helpers import REPO

# Seconds a process may outlive the command it belongs to.
SURVIVAL_S = 10
# Seconds to wait for a command to reach a kill point.
REACH_S = 240


def session_processes(sid: int) -> list[tuple[int, str]]:
    """(pid, command line) of the live (not zombie) processes of session ``sid``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            # Fields 3 (state) and 6 (session) follow the parenthesised command name.
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            if int(fields[3]) == sid and fields[0] != "Z":
                command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
                found.append((int(entry.name), command[:160]))
        except (OSError, IndexError, ValueError):
            continue  # gone meanwhile
    return found


class Victim:
    """A ``bgrl-dgl`` command run in a session of its own, to be killed with SIGKILL; every
    process of the session is killed (by pid) when the block ends, whatever happened."""

    def __init__(self, args: list[str], log: Path) -> None:
        self.log = log
        with open(log, "wb") as output:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "bgrl_dgl", *map(str, args)], cwd=REPO,
                stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT,
                start_new_session=True)
        self.sid = self.process.pid
        self.before_kill: list[tuple[int, str]] = []

    def kill_when(self, reached: Callable[[], bool]) -> None:
        """SIGKILL the command as soon as ``reached()`` (polled every 5 ms) holds."""
        deadline = time.monotonic() + REACH_S
        while not reached():
            if self.process.poll() is not None:
                raise AssertionError(f"the command ended before the kill point "
                                     f"({self.process.returncode}): {self.log.read_text()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"kill point not reached in {REACH_S} s")
            time.sleep(0.005)
        self.before_kill = session_processes(self.sid)
        self.process.send_signal(signal.SIGKILL)
        assert self.process.wait(timeout=60) == -signal.SIGKILL

    def assert_no_survivors(self) -> None:
        """Within SURVIVAL_S seconds no process of the command is left."""
        deadline = time.monotonic() + SURVIVAL_S
        while (left := session_processes(self.sid)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert left == [], f"alive {SURVIVAL_S} s after the kill: {left}"

    def __enter__(self) -> "Victim":
        return self

    def __exit__(self, *exc_info: object) -> None:
        for pid, _ in session_processes(self.sid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=60)


def temps(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.glob(".tmp-*"))


# ---- prepare -------------------------------------------------------------------------------
def prepare_args(num_nodes: int) -> list[str]:
    """``prepare`` of a synthetic graph of ``num_nodes`` nodes, 10 edges each."""
    return ["prepare", "synthetic", "--num-nodes", str(num_nodes), "--avg-degree", "10",
            "--feat-dim", "8", "--num-classes", "3", "--memory-budget", "16MB"]


# Big enough that each stage takes a noticeable while (4M edges).
PREPARE = prepare_args(200_000)


def store_content(store: Path) -> dict:
    """Every array file's bytes, and meta.json without its time, output path and the record
    of the files' inodes and times (a validation cache)."""
    meta = json.loads((store / "meta.json").read_text())
    del meta["created"], meta["source"]["params"]["out"]
    meta.pop("validated", None)
    content = {p.name: p.read_bytes() for p in store.glob("*.npy")}
    return {**content, "meta.json": meta}


def test_prepare_killed_in_edges_csc_and_features_then_rerun_equals_one_run(tmp_path) -> None:
    reference = tmp_path / "reference" / "store"
    assert main([*PREPARE, "--out", str(reference)]) == 0
    parent = tmp_path / "killed"
    parent.mkdir()
    out = parent / "store"
    # While the edges are read, while the CSC is built, after it, while features are written.
    for marker in ("edges-src.tmp", "indices.npy", "features.npy"):
        with Victim([*PREPARE, "--out", out], tmp_path / "prepare.log") as victim:
            victim.kill_when(lambda: any(parent.glob(f".tmp-*/{marker}")))
            victim.assert_no_survivors()
        assert not out.exists()
        assert [name for name in temps(parent) if f".tmp-{victim.sid}@" in name]  # left...
    assert main([*PREPARE, "--out", str(out)]) == 0
    assert temps(parent) == []  # ...and removed by the next run
    assert store_content(out) == store_content(reference)


# ---- train ---------------------------------------------------------------------------------
STEPS, CHECKPOINT_EVERY = 30, 4
TRAIN = ["--hidden", "16,16", "--predictor-hidden", "16", "--fanouts", "3,3",
         "--batch-size", "16", "--max-steps", str(STEPS), "--log-every", "1",
         "--checkpoint-every", str(CHECKPOINT_EVERY), "--warmup-steps", "2", "--threads", "1",
         "--device", "cpu"]
CACHE_BYTES = 40 * 16 * 4  # 40 of the 600 rows of 16 float32


def logged_steps(run: Path) -> int:
    path = run / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


def final_weights(run: Path) -> dict[str, torch.Tensor]:
    step, path = list_checkpoints(run)[-1]
    assert step == STEPS
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def caches_of(store: Path) -> set[str]:
    """This user's feature caches of ``store`` in shared memory."""
    found = set()
    for directory in default_cache_root().glob(f"{user_prefix()}*"):
        try:
            if json.loads((directory / "meta.json").read_text())["store"] == str(store.resolve()):
                found.add(directory.name)
        except (OSError, ValueError, KeyError):
            continue  # another run's, going away
    return found


@pytest.fixture(scope="module")
def reference_run(planted_store, tmp_path_factory) -> Path:
    """STEPS uninterrupted steps, in the training process, without a cache."""
    run = tmp_path_factory.mktemp("faults") / "reference"
    assert main(["train", "--data", str(planted_store), "--out", str(run), *TRAIN,
                 "--num-workers", "0"]) == 0
    return run


@pytest.mark.parametrize("cache, kill_points", [(True, (5, 14)), (False, (9,))],
                         ids=["with cache", "without cache"])
def test_train_killed_then_resumed_equals_one_run(planted_store, reference_run, tmp_path, cache,
                                                  kill_points) -> None:
    """Killed once the given numbers of steps are logged (checkpoints every 4 steps)."""
    run = tmp_path / "run"
    flags = ["--num-workers", "2"] + (["--cache-bytes", str(CACHE_BYTES)] if cache else [])
    for kill_at in kill_points:
        args = ["train", "--data", planted_store, "--out", run, *TRAIN, *flags]
        if kill_at != kill_points[0]:
            args.append("--resume")
        with Victim(args, tmp_path / "train.log") as victim:
            victim.kill_when(lambda: logged_steps(run) >= kill_at)
            # The training process, the resource tracker, the forkserver and 2 workers.
            assert len(victim.before_kill) >= 5, victim.before_kill
            victim.assert_no_survivors()
        # The dead run's cache, left to the next run.
        assert len(caches_of(planted_store)) == (1 if cache else 0)
    # Resumed in this process and without workers (the batches do not depend on them).
    assert main(["train", "--data", str(planted_store), "--out", str(run), "--resume",
                 "--num-workers", "0"]) == 0
    assert caches_of(planted_store) == set()  # taken over and removed by the resumed run
    resumed, straight = final_weights(run), final_weights(reference_run)
    assert resumed.keys() == straight.keys()
    for name, tensor in straight.items():
        assert torch.equal(resumed[name], tensor), name
    losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert losses == [json.loads(line)["loss"]
                      for line in (reference_run / "metrics.jsonl").read_text().splitlines()]


# ---- embed ---------------------------------------------------------------------------------
def read_parts(paths: list[Path]):
    """The rows of these Parquet parts, by node id."""
    return ds.dataset(sorted(map(str, paths)), format="parquet").to_table().sort_by("node_id")


def parts(out: Path) -> list[Path]:
    return sorted(out.glob("part-*.parquet"))


def test_embed_killed_while_computing_and_while_writing_then_rerun_equals_one_run(
        tmp_path) -> None:
    store, run = tmp_path / "store", tmp_path / "run"
    assert main([*prepare_args(50_000), "--out", str(store)]) == 0
    assert main(["train", "--data", str(store), "--out", str(run), "--max-steps", "1",
                 "--hidden", "16,8", "--predictor-hidden", "8", "--num-workers", "0",
                 "--batch-size", "256", "--device", "cpu"]) == 0
    embed = ["embed", "--run", run, "--rows-per-part", "250", "--device", "cpu"]
    reference = tmp_path / "reference"
    assert main([*map(str, embed), "--out", str(reference)]) == 0
    out, scratch = tmp_path / "emb", tmp_path / "scratch"
    scratch.mkdir()
    args = [*embed, "--out", out, "--scratch-dir", scratch]

    with Victim(args, tmp_path / "embed.log") as first:  # while the first layer is computed
        first.kill_when(lambda: any(scratch.glob(".tmp-*/*/layer-0-*")))
        first.assert_no_survivors()
    assert [name for name in temps(scratch) if f".tmp-{first.sid}@" in name] and parts(out) == []
    with Victim(args, tmp_path / "embed.log") as second:  # once 3 of 200 parts are written
        second.kill_when(lambda: len(parts(out)) >= 3)
        second.assert_no_survivors()
    # The second run removed the first one's scratch; its own is left to the next run.
    assert [name.split("@")[0] for name in temps(scratch)] == [f".tmp-{second.sid}"]
    assert not (out / "_SUCCESS").exists()
    kept = [p.name for p in parts(out)]

    assert main([*map(str, args)]) == 0
    assert (out / "_SUCCESS").exists()
    assert temps(scratch) == [] and temps(out) == []
    assert [p.name for p in parts(out)] == [p.name for p in parts(reference)]
    for name in kept:  # written by an uninterrupted pass, as the reference's
        assert read_parts([out / name]).equals(read_parts([reference / name])), name
    resumed, straight = read_parts(parts(out)), read_parts(parts(reference))
    assert np.array_equal(resumed.column("node_id").to_numpy(),
                          straight.column("node_id").to_numpy())
    # The rerun computes the missing parts' nodes only, batched otherwise: float rounding.
    np.testing.assert_allclose(
        np.stack(resumed.column("embedding").to_numpy(zero_copy_only=False)),
        np.stack(straight.column("embedding").to_numpy(zero_copy_only=False)),
        rtol=1e-5, atol=1e-6)
