"""Guards of the store: the record of a full validation, dense class ids, OS errors while
writing, the umask, and a terminated prepare."""
from __future__ import annotations

import argparse
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bgrl_dgl import progress
from bgrl_dgl.cli import main, os_error_line
from bgrl_dgl.errors import InputError
from bgrl_dgl.store import reader, validation, writer
from bgrl_dgl.store.reader import GraphStore
from bgrl_dgl.store.writer import StoreWriter

from helpers import REPO

SMALL = ["--num-nodes", "200", "--avg-degree", "3", "--feat-dim", "4", "--num-classes", "3"]


def prepare(out: Path, *flags: str) -> int:
    return main(["prepare", "synthetic", "--out", str(out), *SMALL, *flags])


@pytest.fixture
def store(tmp_path) -> Path:
    assert prepare(tmp_path / "store") == 0
    return tmp_path / "store"


def failing_full_validation(store: GraphStore) -> None:
    raise AssertionError("validated in full")


# ---- the record of a full validation --------------------------------------------------------
def test_a_prepared_store_is_not_validated_again(store, monkeypatch):
    assert GraphStore.open(store).is_validated()
    monkeypatch.setattr(reader, "validate_full", failing_full_validation)
    GraphStore.open(store)  # the default check trusts the record
    with pytest.raises(AssertionError, match="validated in full"):
        GraphStore.open(store, check="full")


def test_a_copied_store_is_validated_once_and_recorded(store, tmp_path, monkeypatch):
    copy = tmp_path / "copy"
    shutil.copytree(store, copy)  # new inodes: the record no longer matches
    assert not GraphStore.open(copy, check="cheap").is_validated()
    calls = []
    monkeypatch.setattr(reader, "validate_full", lambda s: calls.append(s.path))
    GraphStore.open(copy)
    GraphStore.open(copy)
    assert calls == [copy]
    assert json.loads((copy / "meta.json").read_text())["validated"]["level"] == "full"


def test_an_edited_store_is_validated_before_use(store):
    indices = np.load(store / "indices.npy", mmap_mode="r+")
    indices[3] = 10**6
    indices.flush()
    del indices
    with pytest.raises(InputError, match="entry 3 is 1000000, outside"):
        GraphStore.open(store)
    meta = json.loads((store / "meta.json").read_text())
    meta["num_classes"] = 2  # meta.json itself is part of what was validated
    (store / "meta.json").write_text(json.dumps(meta))
    assert not GraphStore.open(store, check="cheap").is_validated()


def test_the_record_is_only_written_to_ones_own_meta_json(store, tmp_path, monkeypatch):
    copy = tmp_path / "copy"
    shutil.copytree(store, copy)
    before = (copy / "meta.json").read_bytes()
    other_user = os.geteuid() + 1
    monkeypatch.setattr(validation.os, "geteuid", lambda: other_user)
    assert GraphStore.open(copy).num_nodes == 200
    assert (copy / "meta.json").read_bytes() == before
    assert sorted(p.name for p in copy.iterdir()) == sorted(p.name for p in store.iterdir())


# ---- class ids -----------------------------------------------------------------------------
def write_labels(out: Path, labels: np.ndarray, **options) -> GraphStore:
    num_nodes = len(labels)
    with StoreWriter(out) as store_writer:
        store_writer.write_topology(num_nodes, lambda: iter([(np.arange(num_nodes - 1),
                                                               np.arange(1, num_nodes))]),
                                    source_path="edges", symmetrize=True, self_loops="remove",
                                    dedup=True)
        store_writer.write_feature_array(np.ones((num_nodes, 2)), source_path="features")
        store_writer.write_labels(labels, source_path="labels", **options)
        store_writer.commit()
    return GraphStore.open(out)


def test_sparse_class_ids_are_stored_densely_with_their_mapping(tmp_path):
    store = write_labels(tmp_path / "s", np.array([10**9, -1, 3, 10**9, 3, 2**40]))
    assert store.num_classes == 3
    assert store.labels.tolist() == [1, -1, 0, 1, 0, 2]
    assert store.class_ids.tolist() == [3, 10**9, 2**40]
    dense = write_labels(tmp_path / "d", np.array([0, 2, 1, -1]))
    assert dense.num_classes == 3 and dense.class_ids is None


def test_too_many_classes_are_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(writer, "MAX_CLASSES", 2)
    with pytest.raises(InputError, match="3 distinct classes, more than the 2 supported"):
        write_labels(tmp_path / "s", np.array([0, 5, 9]))
    with pytest.raises(InputError, match="3 classes, more than the 2 supported"):
        write_labels(tmp_path / "s", np.array([0, 1, 1]), num_classes=3)
    assert list(tmp_path.iterdir()) == []


def test_a_huge_meta_json_is_refused_before_it_is_read(store):
    with open(store / "meta.json", "r+b") as handle:
        handle.truncate(1 << 30)  # sparse: a gigabyte of zeros that takes no disk
    with pytest.raises(InputError, match="more than a store's meta.json holds"):
        GraphStore.open(store, check="cheap")


def test_a_store_claiming_too_many_classes_is_refused(store):
    meta = json.loads((store / "meta.json").read_text())
    meta["num_classes"] = 2**40
    (store / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(InputError, match="num_classes is 1099511627776, more than"):
        GraphStore.open(store, check="cheap")


def test_parquet_labels_of_2_to_the_40_make_three_classes(tmp_path, capsys):
    pq.write_table(pa.table({"src": np.arange(5), "dst": np.arange(1, 6)}), tmp_path / "e.parquet")
    np.save(tmp_path / "f.npy", np.ones((6, 3), np.float32))
    np.save(tmp_path / "l.npy", np.array([0, 2**40, 7, 7, 2**40, -1]))
    assert main(["prepare", "parquet", "--edges", str(tmp_path / "e.parquet"), "--features",
                 str(tmp_path / "f.npy"), "--labels", str(tmp_path / "l.npy"),
                 "--out", str(tmp_path / "s")]) == 0
    store = GraphStore.open(tmp_path / "s")
    assert store.num_classes == 3 and store.class_ids.tolist() == [0, 7, 2**40]


# ---- OS errors while writing ---------------------------------------------------------------
def no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("target", ["bgrl_dgl.store.format.NpyWriter.append",
                                    "bgrl_dgl.store.writer.save_array",
                                    "bgrl_dgl.store.writer.write_atomic"])
def test_a_full_disk_fails_in_one_line_and_keeps_the_old_store(store, capsys, monkeypatch,
                                                               target):
    before = {p.name: p.read_bytes() for p in store.iterdir()}
    monkeypatch.setattr(target, no_space)
    assert prepare(store, "--overwrite", "--seed", "1") == 2
    err = capsys.readouterr().err
    assert err == f"error: {store}: No space left on device\n"
    assert {p.name: p.read_bytes() for p in store.iterdir()} == before
    assert sorted(p.name for p in store.parent.iterdir()) == ["store"]


def test_an_unwritable_directory_fails_in_one_line(tmp_path, capsys, monkeypatch):
    mkdir = Path.mkdir

    def denied(self, *args, **kwargs):
        if self.name.startswith(".tmp-"):  # as root, a read-only directory must be simulated
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))
        return mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", denied)
    assert prepare(tmp_path / "store") == 2
    assert capsys.readouterr().err == f"error: {tmp_path}: cannot write here: Permission denied\n"
    assert list(tmp_path.iterdir()) == []


def test_os_error_line_names_the_file_or_else_the_output():
    args = argparse.Namespace(out="run", data="store")
    assert os_error_line(OSError(errno.EROFS, "Read-only file system", "a/b"), args) == \
        "a/b: Read-only file system"
    assert os_error_line(OSError(errno.ENOSPC, "No space left on device"), args) == \
        "run: No space left on device"


def test_out_dot_inside_a_store_replaces_it(store, monkeypatch, capsys):
    old_inode = (store / "meta.json").stat().st_ino
    monkeypatch.chdir(store)
    assert prepare(Path("."), "--overwrite", "--seed", "3") == 0
    assert str(store) in capsys.readouterr().out
    monkeypatch.chdir(store.parent)
    assert (store / "meta.json").stat().st_ino != old_inode
    assert GraphStore.open(store).meta["source"]["params"]["seed"] == 3
    assert sorted(p.name for p in store.parent.iterdir()) == ["store"]


# ---- permissions and termination -----------------------------------------------------------
@pytest.mark.parametrize("umask, mode", [(0o022, 0o755), (0o077, 0o700), (0o002, 0o775)])
def test_the_store_directory_follows_the_umask(tmp_path, umask, mode):
    previous = os.umask(umask)
    try:
        assert prepare(tmp_path / "store") == 0
    finally:
        os.umask(previous)
    assert (tmp_path / "store").stat().st_mode & 0o777 == mode
    assert (tmp_path / "store" / "meta.json").stat().st_mode & 0o777 == 0o666 & ~umask


def test_a_terminated_prepare_removes_its_temp_directory(tmp_path):
    out = tmp_path / "store"
    command = [sys.executable, "-m", "bgrl_dgl", "prepare", "synthetic", "--out", str(out),
               "--num-nodes", "3000000", "--avg-degree", "20", "--feat-dim", "64",
               "--num-classes", "4"]
    process = subprocess.Popen(command, cwd=REPO, stdin=subprocess.DEVNULL,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not list(tmp_path.glob(".tmp-*@store")) and time.monotonic() < deadline:
            assert process.poll() is None, process.communicate()
            time.sleep(0.05)
        assert list(tmp_path.glob(".tmp-*@store")), "the writer never started"
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 130, stderr
    assert stderr.strip().splitlines()[-1] == "interrupted"
    assert list(tmp_path.iterdir()) == []


def test_a_big_store_shows_its_validation_progress(store, monkeypatch, capsys):
    monkeypatch.setattr(validation, "PROGRESS_ENTRIES", 100)
    monkeypatch.setattr(progress.sys.stderr, "isatty", lambda: True)
    counted = []
    update = validation._Progress.update
    monkeypatch.setattr(validation._Progress, "update",
                        lambda self, count: (counted.append(count), update(self, count)))
    opened = GraphStore.open(store, check="full")
    assert f"validating {store}" in capsys.readouterr().err
    assert sum(counted) == opened.num_nodes + opened.num_edges  # every entry, once
