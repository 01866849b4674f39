"""``bgrl-dgl embed`` on a full disk: the scratch space is checked and allocated up front, a
full disk is one line (never SIGBUS), and no scratch directory outlives its run. Exact
inference keeps its intermediate tables in scratch and streams the parts; sampled inference
keeps the embeddings in a scratch memmap."""
from __future__ import annotations

import errno
import os
import shutil
import socket
import subprocess
import sys
from collections import namedtuple
from pathlib import Path

import numpy as np
import pyarrow.dataset as ds
import pytest

from bgrl_dgl.cli import main
from bgrl_dgl.embeddings import export, parquet
from bgrl_dgl.embeddings.layerwise import scratch_requirement
from bgrl_dgl.embeddings.sampled import InferenceOptions
from bgrl_dgl.runs import load_encoder

from helpers import REPO, assert_input_error

NUM_NODES, DIM = 300, 8
PARTS = ["--rows-per-part", "100"]
# The --out of every export below, and a scratch directory beside it.
Paths = namedtuple("Paths", "out scratch")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A two-step run with 16- then 8-wide layers on a 300-node store."""
    base = tmp_path_factory.mktemp("embed_scratch")
    assert main(["prepare", "synthetic", "--out", str(base / "store"), "--num-nodes",
                 str(NUM_NODES), "--avg-degree", "5", "--feat-dim", "8",
                 "--num-classes", "3"]) == 0
    assert main(["train", "--data", str(base / "store"), "--out", str(base / "run"),
                 "--max-steps", "2", "--hidden", f"16,{DIM}", "--predictor-hidden", "8",
                 "--num-workers", "0", "--batch-size", "64", "--device", "cpu"]) == 0
    return base / "run"


@pytest.fixture
def paths(tmp_path) -> Paths:
    (tmp_path / "scratch").mkdir()
    return Paths(tmp_path / "emb", tmp_path / "scratch")


@pytest.fixture
def embed(capsys):
    """``bgrl-dgl embed ARGS --device cpu`` in this process, as a CompletedProcess."""
    def run(*args) -> subprocess.CompletedProcess:
        code = main(["embed", *map(str, args), "--device", "cpu"])
        captured = capsys.readouterr()
        return subprocess.CompletedProcess(args, code, captured.out, captured.err)
    return run


def embeddings(out: Path) -> np.ndarray:
    table = ds.dataset(out, format="parquet").to_table().sort_by("node_id")
    column = table.column("embedding").combine_chunks()
    return column.flatten().to_numpy().reshape(len(column), -1)


def entries(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def test_exact_scratch_is_two_consecutive_layers_tables(run_dir) -> None:
    encoder = load_encoder(run_dir).encoder  # sage, 8 -> 16 -> 8: tables 8 + 16 wide at most
    needed = scratch_requirement(encoder, NUM_NODES, "float32", "cpu")
    assert needed > 0 and needed % (NUM_NODES * 4) == 0
    assert scratch_requirement(encoder, NUM_NODES, "float16", "cpu") * 2 == needed


@pytest.mark.parametrize("where", ["inside out", "scratch dir"])
def test_too_little_free_space_is_refused_up_front(run_dir, paths, embed, monkeypatch,
                                                   where) -> None:
    usage = shutil.disk_usage(paths.scratch)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=1000))
    extra = ["--scratch-dir", paths.scratch] if where == "scratch dir" else []
    result = embed("--run", run_dir, "--out", paths.out, *PARTS, *extra)
    # the tables of two consecutive layers (the parts are streamed: no embeddings memmap)
    needed = scratch_requirement(load_encoder(run_dir).encoder, NUM_NODES, "float32", "cpu")
    assert_input_error(result, str(paths.scratch if extra else paths.out),
                       f"needs {needed:,} bytes of scratch space, only 1,000 are free")
    assert not paths.out.exists() and entries(paths.scratch) == []


def test_sampled_inference_needs_no_layer_scratch(run_dir, paths, embed, monkeypatch) -> None:
    usage = shutil.disk_usage(paths.scratch)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=1000))
    result = embed("--run", run_dir, "--out", paths.out, "--fanouts", "3,3")
    assert_input_error(result, f"needs {NUM_NODES * DIM * 4:,} bytes of scratch space")


@pytest.mark.parametrize("mode", ["exact", "sampled"])
def test_a_full_disk_while_allocating_is_one_line_and_the_rerun_finishes(
        run_dir, paths, embed, monkeypatch, mode) -> None:
    def no_space(fd: int, offset: int, length: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "posix_fallocate", no_space)
    extra = ["--fanouts", "3,3"] if mode == "sampled" else []
    result = embed("--run", run_dir, "--out", paths.out, *PARTS, *extra,
                   "--scratch-dir", paths.scratch)
    what = (f"embeddings: cannot allocate {NUM_NODES * DIM * 4:,} bytes" if mode == "sampled"
            else "cannot allocate")  # exact: layer 0's first table
    assert_input_error(result, str(paths.scratch), what, "No space left on device")
    assert entries(paths.scratch) == [] and entries(paths.out) == ["_inputs.json"]
    monkeypatch.undo()
    assert embed("--run", run_dir, "--out", paths.out, *PARTS, *extra).returncode == 0
    assert (paths.out / "_SUCCESS").exists()


def fail_writing(monkeypatch, mode: str, err: int, after_parts: int = 0) -> None:
    """Writing a part fails with ``err`` once ``after_parts`` parts were written: the streamed
    parts of exact inference, or the parts written from the memmap of sampled inference."""
    written = []
    if mode == "exact":
        original_group = parquet.ParquetPart.write_group

        def write_group(part, start: int, rows) -> None:
            if start == 0:
                written.append(part.path.name)
            if len(written) > after_parts:
                raise OSError(err, os.strerror(err), str(part.path))
            original_group(part, start, rows)

        monkeypatch.setattr(parquet.ParquetPart, "write_group", write_group)
        return
    original = export.write_part

    def write_part(path: Path, *args) -> None:
        if len(written) >= after_parts:
            raise OSError(err, os.strerror(err), str(path))
        written.append(path.name)
        original(path, *args)

    monkeypatch.setattr(export, "write_part", write_part)


@pytest.mark.parametrize("mode", ["exact", "sampled"])
def test_a_full_disk_while_writing_a_part_is_one_line_and_keeps_the_complete_parts(
        run_dir, paths, embed, monkeypatch, mode) -> None:
    extra = ["--fanouts", "3,3"] if mode == "sampled" else []
    reference = paths.out.with_name("reference")
    assert embed("--run", run_dir, "--out", reference, *PARTS, *extra).returncode == 0
    fail_writing(monkeypatch, mode, errno.ENOSPC, after_parts=1)
    result = embed("--run", run_dir, "--out", paths.out, *PARTS, *extra)
    assert result.returncode == 2
    assert result.stderr == f"error: {paths.out / 'part-00001.parquet'}: No space left on device\n"
    assert entries(paths.out) == ["_inputs.json", "part-00000.parquet"]  # no scratch left
    monkeypatch.undo()
    result = embed("--run", run_dir, "--out", paths.out, *PARTS, *extra)
    assert "2 parts written, 1 already complete" in result.stdout
    np.testing.assert_allclose(embeddings(paths.out), embeddings(reference), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", ["exact", "sampled"])
def test_other_disk_errors_are_not_disguised(run_dir, paths, monkeypatch, mode) -> None:
    fail_writing(monkeypatch, mode, errno.EIO)
    options = InferenceOptions(device="cpu", fanouts=[3, 3] if mode == "sampled" else None)
    with pytest.raises(OSError, match="Input/output error"):
        export.export_embeddings(paths.out, run=run_dir, options=options, rows_per_part=100)
    assert "_inputs.json" in entries(paths.out) and not any(
        name.startswith(".tmp-") for name in entries(paths.out))


def test_a_dead_runs_scratch_is_removed_before_the_space_is_measured(
        run_dir, paths, embed, monkeypatch) -> None:
    host = socket.gethostname()
    dead = paths.scratch / f".tmp-999999999@{host}@scratch-abc"  # no such pid
    alive = paths.scratch / f".tmp-{os.getppid()}@{host}@scratch-def"
    unrelated = paths.scratch / f".tmp-999999999@{host}@notes"
    for directory in (dead, alive, unrelated):
        directory.mkdir()
    (dead / "embeddings").write_bytes(b"\0" * 50_000)
    usage = shutil.disk_usage(paths.scratch)
    seen = []

    def disk_usage(path):  # 50 kB free only once the dead run's scratch is gone
        seen.append(dead.exists())
        return usage._replace(free=50_000 if not dead.exists() else 0)

    monkeypatch.setattr(shutil, "disk_usage", disk_usage)
    result = embed("--run", run_dir, "--out", paths.out, *PARTS, "--scratch-dir", paths.scratch)
    assert result.returncode == 0, result.stderr
    assert seen == [False]
    assert entries(paths.scratch) == sorted([alive.name, unrelated.name])


# ---- a real full file system ---------------------------------------------------------------
@pytest.fixture
def tiny_tmpfs(tmp_path):
    """A tmpfs of one 4 KiB page (needs root and mount); unmounted afterwards."""
    mount = tmp_path / "tiny"
    mount.mkdir()
    if os.getuid() != 0 or not shutil.which("mount"):
        pytest.skip("mounting a tmpfs needs root")
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4k,mode=0755", "tmpfs",
                           str(mount)], capture_output=True, timeout=30)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {made.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True, timeout=30)


def test_a_real_full_scratch_file_system_is_one_line_not_sigbus(run_dir, tmp_path,
                                                                 tiny_tmpfs) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "bgrl_dgl", "embed", "--run", str(run_dir), "--out",
         str(tmp_path / "emb"), "--scratch-dir", str(tiny_tmpfs), "--device", "cpu"],
        cwd=REPO, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300)
    assert_input_error(result, str(tiny_tmpfs), "bytes of scratch space")
    assert entries(tiny_tmpfs) == []


def test_a_real_full_disk_while_allocating_is_one_line(run_dir, paths, tiny_tmpfs, embed,
                                                       monkeypatch) -> None:
    """Past the up-front check (the space went to someone else meanwhile), the allocation
    itself fails with ENOSPC: one line, where a sparse memmap would have died of SIGBUS."""
    monkeypatch.setattr(export, "check_free_space", lambda *args: None)
    result = embed("--run", run_dir, "--out", paths.out, "--fanouts", "3,3",
                   "--scratch-dir", tiny_tmpfs)
    assert NUM_NODES * DIM * 4 > 4096
    assert_input_error(result, str(tiny_tmpfs), f"cannot allocate {NUM_NODES * DIM * 4:,} bytes")
    assert entries(tiny_tmpfs) == []
