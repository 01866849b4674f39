"""Hostile inputs per command: each case, its exit code and message, and that nothing was left
behind or lost. In-process through ``bgrl_dgl.cli.main`` where possible; in a subprocess
where a hang (a FIFO) or an abort inside DGL (exit 134) must be observed."""
from __future__ import annotations

import errno
import os
import pickle
import shutil
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

from bgrl_dgl.cli import main

from helpers import CORA, prepare_synthetic, run_cli

FIFO_TIMEOUT = 120  # a read that blocks on a FIFO would hang; the subprocess is then killed


def poke(path: Path, index: int, value: int) -> None:
    array = np.load(path, mmap_mode="r+")
    array[index] = value
    array.flush()


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Relative path -> (size, mtime_ns) of every file under ``root``; (0, 0) for a directory
    (whose mtime changes when a temp entry comes and goes)."""
    return {str(p.relative_to(root)): (0, 0) if p.is_dir() and not p.is_symlink()
            else (p.lstat().st_size, p.lstat().st_mtime_ns) for p in sorted(root.rglob("*"))}


def bomb_npy(path: Path, count: int = 10**12) -> Path:
    """A .npy file whose header claims ``count`` int64 values and that holds eight bytes."""
    with open(path, "wb") as file:
        np.lib.format.write_array_header_1_0(
            file, {"descr": "<i8", "fortran_order": False, "shape": (count,)})
        file.write(bytes(8))
    return path


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("hostile") / "store"
    return prepare_synthetic(out, num_nodes=300, avg_degree=4, feat_dim=8,
                             num_classes=3)


@pytest.fixture(scope="module")
def run(store, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("hostile-run") / "run"
    assert main(["train", "--data", str(store), "--out", str(out), "--max-steps", "1",
                 "--hidden", "8,4", "--predictor-hidden", "8", "--num-workers", "0",
                 "--batch-size", "64", "--fanouts", "3,3"]) == 0
    return out


@dataclass
class World:
    """What a case may use: a scratch directory, a good store and a trained run."""

    tmp: Path
    store: Path
    run: Path
    cora: Path

    def store_copy(self, corrupt: Callable[[Path], None] | None = None) -> Path:
        copy = self.tmp / "copy"
        shutil.copytree(self.store, copy)
        if corrupt is not None:
            corrupt(copy)
        return copy

    def below_a_file(self) -> Path:
        (self.tmp / "plain").write_text("a file, not a directory")
        return self.tmp / "plain" / "out"

    def fifo(self, name: str = "fifo") -> Path:
        os.mkfifo(self.tmp / name)
        return self.tmp / name

    def planetoid(self, part: str, content: bytes | str) -> list[str]:
        root = self.tmp / "planetoid"
        root.mkdir()
        for other in ("x", "y", "tx", "ty", "allx", "ally", "graph", "test.index"):
            if other != part:
                (root / f"ind.cora.{other}").symlink_to(self.cora / f"ind.cora.{other}")
        target = root / f"ind.cora.{part}"
        target.write_bytes(content) if isinstance(content, bytes) else target.write_text(content)
        return ["prepare", "planetoid", "--root", str(root), "--name", "cora",
                "--out", str(self.tmp / "out")]

    def npz_bomb(self) -> Path:
        path = self.tmp / "bomb.npz"
        with zipfile.ZipFile(path, "w") as archive:
            for key in ("adj", "attr"):
                for part, value in (("data", np.ones(1)), ("indices", np.zeros(1, np.int64)),
                                    ("indptr", np.array([0, 1])), ("shape", np.array([1, 1]))):
                    with archive.open(f"{key}_{part}.npy", "w") as member:
                        np.lib.format.write_array(member, value)
            archive.write(bomb_npy(self.tmp / "labels.npy"), "labels.npy")
        return path


def synthetic(world: World, *flags: str) -> list[str]:
    sizes = {"--num-nodes": "100", "--avg-degree": "2", "--feat-dim": "4", "--num-classes": "2"}
    sizes.update(zip(flags[::2], flags[1::2]))
    return ["prepare", "synthetic", "--out", str(world.tmp / "out"),
            *[x for pair in sizes.items() for x in pair]]


def train(world: World, data: Path, *flags: str) -> list[str]:
    return ["train", "--data", str(data), "--out", str(world.tmp / "run"), "--max-steps", "1",
            "--num-workers", "0", "--hidden", "8,4", "--predictor-hidden", "8", *flags]


def embed(world: World, data: Path, out: Path | None = None, *flags: str) -> list[str]:
    return ["embed", "--run", str(world.run), "--data", str(data),
            "--out", str(out or world.tmp / "export"), "--device", "cpu", *flags]


def out_of_range(store: Path) -> None:
    poke(store / "indices.npy", 5, 10**6)


def not_monotone(store: Path) -> None:
    poke(store / "indptr.npy", 7, 10**6)


RECONSTRUCT_BOMB = (b"cnumpy.core.multiarray\n_reconstruct\n(cnumpy\nndarray\n"
                    b"(I100000000000\ntS'b'\ntR.")
LIL_BOMB = b"cscipy.sparse.lil\nlil_matrix\n((I30000000\nI1\nttR."


# name -> (argv from the world, exit code, message fragments, in a subprocess)
CASES: dict[str, tuple[Callable[[World], list[str]], int, tuple[str, ...], bool]] = {
    # prepare: sizes
    "edges beyond the disk": (lambda w: synthetic(w, "--num-nodes", "1000", "--avg-degree", "1e9"),
                              2, ("--avg-degree", "of disk"), False),
    "edges beyond int64 safety": (lambda w: synthetic(w, "--avg-degree", "1e15"), 2,
                                  ("--avg-degree", "more than"), False),
    "nodes beyond the bound": (lambda w: synthetic(w, "--num-nodes", str(2**41)), 2,
                               ("--num-nodes", "at most"), False),
    "nodes beyond the machine": (lambda w: synthetic(w, "--num-nodes", str(10**12),
                                                     "--avg-degree", "1"), 2, ("needs about",),
                                 False),
    "a feature row beyond the budget": (lambda w: synthetic(w, "--feat-dim", str(2**24),
                                                            "--memory-budget", "64MB"),
                                        2, ("one feature row", "--memory-budget"), False),
    "features beyond the bound": (lambda w: synthetic(w, "--feat-dim", str(2**25)), 2,
                                  ("--feat-dim", "at most"), False),
    "npz member claiming 8 TB": (lambda w: ["prepare", "npz", "--input", str(w.npz_bomb()),
                                            "--out", str(w.tmp / "out")], 2,
                                 ("bomb.npz", "of memory"), False),
    # prepare: planetoid pickles
    "pickle calling lil_matrix": (lambda w: w.planetoid("allx", LIL_BOMB), 2,
                                  ("ind.cora.allx", "not constructed from arguments"), False),
    "pickle reconstructing 100 GB": (lambda w: w.planetoid("ally", RECONSTRUCT_BOMB), 2,
                                     ("ind.cora.ally", "more than a pickle of this size"), False),
    "string labels": (lambda w: w.planetoid("ally", pickle.dumps(np.full((1708, 7), "a"), 2)),
                      2, ("ind.cora.ally", "numeric one-hot"), False),
    "test id of 1e11": (lambda w: w.planetoid("test.index", "100000000000\n" * 1000), 2,
                        ("ind.cora.test.index", "outside"), False),
    "nested neighbour lists": (lambda w: w.planetoid("graph", pickle.dumps({0: [[1, 2]]}, 2)),
                               2, ("ind.cora.graph", "not an integer node id"), False),
    # prepare: where the output goes
    "--out below a file": (lambda w: synthetic(w) + ["--out", str(w.below_a_file())], 2,
                           ("plain", "Not a directory"), False),
    "--out /": (lambda w: synthetic(w) + ["--out", "/", "--overwrite"], 2,
                ("not a path a store can be written to",), False),
    "FIFO as the npz input": (lambda w: ["prepare", "npz", "--input", str(w.fifo()),
                                         "--out", str(w.tmp / "out")], 2,
                              ("fifo", "not a regular file"), True),
    # info
    "FIFO for indices.npy": (lambda w: ["info", str(w.store_copy(
        lambda d: ((d / "indices.npy").unlink(), os.mkfifo(d / "indices.npy"))))], 2,
                             ("indices.npy", "not a regular file"), True),
    "FIFO for meta.json": (lambda w: ["info", str(w.store_copy(
        lambda d: ((d / "meta.json").unlink(), os.mkfifo(d / "meta.json"))))], 2,
                           ("meta.json", "not a regular file"), True),
    # train
    "train: index out of range": (lambda w: train(w, w.store_copy(out_of_range)), 2,
                                  ("indices.npy", "outside [0, 300)"), False),
    "train: indptr not monotone": (lambda w: train(w, w.store_copy(not_monotone)), 2,
                                   ("indptr.npy", "not monotone at node 7"), True),
    "train: --out below a file": (lambda w: train(w, w.store) + ["--out", str(w.below_a_file())],
                                  2, ("plain", "Not a directory"), False),
    "train: FIFO as --config": (lambda w: train(w, w.store, "--config", str(w.fifo())), 2,
                                ("fifo", "not a regular file"), True),
    "train: FIFO as --seeds": (lambda w: train(w, w.store, "--seeds", str(w.fifo())), 2,
                               ("fifo", "not a regular file"), True),
    # embed
    "embed: index out of range": (lambda w: embed(w, w.store_copy(out_of_range)), 2,
                                  ("indices.npy", "outside [0, 300)"), False),
    "embed: indptr not monotone": (lambda w: embed(w, w.store_copy(not_monotone)), 2,
                                   ("indptr.npy", "not monotone"), True),
    "embed: --out below a file": (lambda w: embed(w, w.store, w.below_a_file()), 2,
                                  ("plain", "Not a directory"), False),
    "embed: --nodes claiming 8 TB": (lambda w: embed(w, w.store, None, "--nodes",
                                                     str(bomb_npy(w.tmp / "ids.npy"))), 2,
                                     ("ids.npy", "cannot read node ids"), False),
}


@pytest.mark.parametrize("case", CASES)
def test_hostile_input(case, tmp_path, store, run, capsys):
    make_argv, code, fragments, in_subprocess = CASES[case]
    world = World(tmp_path / "work", store, run, CORA)
    world.tmp.mkdir()
    argv = make_argv(world)
    before = snapshot(tmp_path), snapshot(store), snapshot(run)
    if in_subprocess:
        result = run_cli(*argv, timeout=FIFO_TIMEOUT)
        returncode, stderr = result.returncode, result.stderr
    else:
        returncode = main(argv)
        stderr = capsys.readouterr().err
    assert returncode == code, (returncode, stderr)
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert "Traceback" not in stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    after = snapshot(tmp_path), snapshot(store), snapshot(run)
    assert after == before, "a failed command left something behind or changed an input"


# ---- faults that cannot be made for real (the tests run as root) ---------------------------
def no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("command, target", [
    ("train", "bgrl_dgl.training.checkpoint.torch.save"),
    ("embed", "pyarrow.parquet.ParquetWriter.write_table"),
])
def test_a_full_disk_is_one_line_naming_the_output(command, target, tmp_path, store, run,
                                                   capsys, monkeypatch):
    world = World(tmp_path, store, run, None)
    argv = train(world, store) if command == "train" else embed(world, store)
    out = Path(argv[argv.index("--out") + 1])
    monkeypatch.setattr(target, no_space)
    assert main(argv) == 2
    assert capsys.readouterr().err == f"error: {out}: No space left on device\n"
    assert not list(out.rglob(".tmp-*")), "a temp file was left behind"
