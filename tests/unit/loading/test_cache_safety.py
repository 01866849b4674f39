"""A feature cache found under the cache's (predictable) name is used only when it is this
user's own cache of the same settings; anything else planted there is refused with one line."""
from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import subprocess
import threading
from pathlib import Path

import numpy as np
import pytest

from bgrl_dgl.cli import main
from bgrl_dgl.errors import InputError
from bgrl_dgl.io import process_start_time, temp_path
from bgrl_dgl.loading.cache_files import ROWS_FILE, SLOTS_FILE, lock_path
from bgrl_dgl.loading.feature_cache import FeatureCache, cache_directory, cache_identity
from bgrl_dgl.store.reader import GraphStore

from helpers import assert_input_error, prepare_synthetic

OTHER_UID = 12345
BUDGET_ROWS = 30
needs_root = pytest.mark.skipif(os.getuid() != 0, reason="changing a file's owner needs root")


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cache_safety") / "store"
    return prepare_synthetic(out, num_nodes=300, avg_degree=5, feat_dim=8,
                             num_classes=3)


@pytest.fixture(scope="module")
def store(store_dir) -> GraphStore:
    return GraphStore.open(store_dir)


def budget_of(store: GraphStore) -> int:
    return BUDGET_ROWS * store.feat_dim * store.feat_dtype.itemsize


def plant(directory: Path, store: GraphStore, budget: int, value: float = 7.0,
          meta_changes: dict | None = None) -> np.ndarray:
    """A complete-looking cache of the first rows, all equal to ``value``, at ``directory``,
    recorded as owned by a live process (pid 1); returns the planted rows."""
    rows_count = budget // (store.feat_dim * store.feat_dtype.itemsize)
    directory.mkdir(mode=0o700)
    rows = np.full((rows_count, store.feat_dim), value, dtype=store.feat_dtype)
    np.save(directory / ROWS_FILE, rows)
    slots = np.full(store.num_nodes, -1, dtype=np.int32)
    slots[:rows_count] = np.arange(rows_count)
    np.save(directory / SLOTS_FILE, slots)
    meta = {**cache_identity(store, rows_count), "policy": "degree", "budget": budget,
            "owner": 1, "owner_started": None, **(meta_changes or {})}
    (directory / "meta.json").write_text(json.dumps(meta))
    for path in directory.iterdir():
        path.chmod(0o600)
    return rows


def chown_tree(directory: Path, uid: int) -> None:
    for path in [directory, *directory.iterdir()]:
        os.lchown(path, uid, uid)


def refused(store: GraphStore, root: Path, *fragments: str) -> InputError:
    """Building the cache fails with one line naming the planted path and the problem."""
    with pytest.raises(InputError) as caught:
        FeatureCache.build(store, budget_of(store), root=root)
    message = str(caught.value)
    assert "\n" not in message and "not a feature cache of this user" in message
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    return caught.value


# ---- what a build creates --------------------------------------------------------------------
def test_a_cache_is_private_to_its_user_whatever_the_umask(store, tmp_path) -> None:
    previous = os.umask(0)
    try:
        with FeatureCache.build(store, budget_of(store), root=tmp_path) as cache:
            assert cache.directory.name.startswith(f"bgrl-dgl-cache-{os.getuid()}-")
            info = os.lstat(cache.directory)
            assert stat.S_IMODE(info.st_mode) == 0o700 and info.st_uid == os.getuid()
            for path in cache.directory.iterdir():
                info = os.lstat(path)
                assert stat.S_ISREG(info.st_mode) and stat.S_IMODE(info.st_mode) == 0o600
            meta = json.loads((cache.directory / "meta.json").read_text())
            assert meta["owner"] == os.getpid() and isinstance(meta["owner_started"], int)
    finally:
        os.umask(previous)


@needs_root
def test_a_name_planted_where_the_temp_directory_would_go_changes_nothing(store, tmp_path) -> None:
    """The temporary directory gets a random name: another user cannot create it first."""
    directory = cache_directory(store, budget_of(store), "degree", {}, tmp_path)
    planted = temp_path(directory)
    planted.mkdir()
    os.chown(planted, OTHER_UID, OTHER_UID)
    with FeatureCache.build(store, budget_of(store), root=tmp_path) as cache:
        ids = np.arange(store.num_nodes)
        assert np.array_equal(cache.gather(store.features, ids)[0], store.features[ids])
    assert os.lstat(planted).st_uid == OTHER_UID  # not ours to remove either


@needs_root
def test_stale_temp_directories_of_other_users_are_left_alone(store, tmp_path) -> None:
    name = f"bgrl-dgl-cache-{os.getuid()}-0000000000000000"
    # Pid 999999999 is above any pid_max: a dead writer's temps.
    theirs = tmp_path / f".tmp-999999999@{socket.gethostname()}@{name}"
    mine = tmp_path / f".tmp-999999999@{socket.gethostname()}@{name}-x"
    theirs.mkdir()
    mine.mkdir()
    os.chown(theirs, OTHER_UID, OTHER_UID)
    FeatureCache.build(store, budget_of(store), root=tmp_path).close()
    assert theirs.exists() and not mine.exists()


def test_a_lock_held_on_the_store_s_files_by_anyone_else_does_not_block_the_build(
        store, tmp_path) -> None:
    """Writers lock a private file of their own user: another user's flock on the shared
    features file (which anyone who can read it may take) no longer makes a run wait."""
    holder = subprocess.Popen(
        ["python3", "-c", "import fcntl, sys, time; f = open(sys.argv[1], 'rb'); "
         "fcntl.flock(f, fcntl.LOCK_EX); print('held', flush=True); time.sleep(60)",
         str(store.array_path("features"))], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        done = threading.Event()
        worker = threading.Thread(target=lambda: (FeatureCache.build(
            store, budget_of(store), root=tmp_path).close(), done.set()), daemon=True)
        worker.start()
        worker.join(timeout=60)
        assert done.is_set()
    finally:
        holder.kill()
        holder.wait()


def test_the_owner_removes_the_lock_file_with_the_cache(store, tmp_path) -> None:
    with FeatureCache.build(store, budget_of(store), root=tmp_path) as cache:
        lock = lock_path(cache.directory)
        info = os.lstat(lock)
        assert stat.S_ISREG(info.st_mode) and stat.S_IMODE(info.st_mode) == 0o600
        with FeatureCache.build(store, budget_of(store), root=tmp_path) as second:
            assert not second.owner  # waited on the lock, then attached
    assert sorted(os.listdir(tmp_path)) == []


def test_a_symbolic_link_at_the_lock_name_is_refused(store, tmp_path) -> None:
    directory = cache_directory(store, budget_of(store), "degree", {}, tmp_path)
    target = tmp_path / "elsewhere"
    target.write_text("")
    lock_path(directory).symlink_to(target)
    refused(store, tmp_path, str(lock_path(directory)), "a symbolic link")
    assert not directory.exists() and target.read_text() == ""


@needs_root
def test_another_users_lock_file_is_refused(store, tmp_path) -> None:
    directory = cache_directory(store, budget_of(store), "degree", {}, tmp_path)
    lock = lock_path(directory)
    lock.write_text("")
    lock.chmod(0o600)
    os.chown(lock, OTHER_UID, OTHER_UID)
    refused(store, tmp_path, str(lock), f"owned by uid {OTHER_UID}")
    assert not directory.exists() and os.lstat(lock).st_uid == OTHER_UID


# ---- what a build refuses --------------------------------------------------------------------
@needs_root
def test_another_users_cache_is_refused_not_trained_on(store, tmp_path) -> None:
    directory = cache_directory(store, budget_of(store), "degree", {}, tmp_path)
    plant(directory, store, budget_of(store))
    chown_tree(directory, OTHER_UID)
    refused(store, tmp_path, str(directory), f"owned by uid {OTHER_UID}")
    with pytest.raises(InputError, match=f"owned by uid {OTHER_UID}"):
        FeatureCache.open(directory)  # as a sampling worker would
    assert os.lstat(directory).st_uid == OTHER_UID  # left as found


@needs_root
def test_another_users_file_inside_this_users_directory_is_refused(store, tmp_path) -> None:
    directory = cache_directory(store, budget_of(store), "degree", {}, tmp_path)
    plant(directory, store, budget_of(store))
    os.chown(directory / ROWS_FILE, OTHER_UID, OTHER_UID)
    refused(store, tmp_path, str(directory / ROWS_FILE), f"owned by uid {OTHER_UID}")


def test_a_symbolic_link_at_the_cache_name_is_refused(store, tmp_path) -> None:
    directory = cache_directory(store, budget_of(store), "degree", {}, tmp_path)
    target = tmp_path / "elsewhere"
    plant(target, store, budget_of(store))
    directory.symlink_to(target)
    refused(store, tmp_path, str(directory), "a symbolic link")
    directory.unlink()
    directory.symlink_to(tmp_path / "missing")  # a dangling one too
    refused(store, tmp_path, str(directory), "a symbolic link")


def test_a_symbolic_link_inside_the_cache_is_refused(store, tmp_path) -> None:
    directory = cache_directory(store, budget_of(store), "degree", {}, tmp_path)
    plant(directory, store, budget_of(store))
    elsewhere = tmp_path / "rows.npy"
    (directory / ROWS_FILE).rename(elsewhere)
    (directory / ROWS_FILE).symlink_to(elsewhere)
    refused(store, tmp_path, str(directory / ROWS_FILE), "a symbolic link")


@pytest.mark.parametrize("mode, where", [(0o777, "directory"), (0o720, "directory"),
                                         (0o666, ROWS_FILE), (0o620, "meta.json")])
def test_a_cache_that_other_users_may_write_is_refused(store, tmp_path, mode, where) -> None:
    directory = cache_directory(store, budget_of(store), "degree", {}, tmp_path)
    plant(directory, store, budget_of(store))
    path = directory if where == "directory" else directory / where
    path.chmod(mode)
    refused(store, tmp_path, str(path), f"mode {mode:o} lets other users write it")


def test_something_else_at_the_cache_name_is_refused(store, tmp_path) -> None:
    directory = cache_directory(store, budget_of(store), "degree", {}, tmp_path)
    directory.write_text("not a directory")
    refused(store, tmp_path, str(directory), "not a directory")


@pytest.mark.parametrize("meta_text, problem", [
    ("{garbage", "not JSON"),
    ("[1, 2]", "not a JSON object"),
    ("\xff\xfe", "not JSON"),
    ('{"num_nodes": "many"}', "bad sizes"),
])
def test_a_garbage_meta_json_is_refused_with_one_line(store, tmp_path, meta_text, problem) -> None:
    directory = cache_directory(store, budget_of(store), "degree", {}, tmp_path)
    plant(directory, store, budget_of(store))
    (directory / "meta.json").write_bytes(meta_text.encode("latin-1"))
    refused(store, tmp_path, str(directory / "meta.json"), problem)


@pytest.mark.parametrize("change, problem", [
    ({"num_nodes": 299}, "records num_nodes 299, expected 300"),
    ({"feat_dtype": "float16"}, "records feat_dtype 'float16', expected 'float32'"),
    ({"store": "/elsewhere"}, "records store '/elsewhere', expected '"),
    ({"rows": BUDGET_ROWS - 1}, f"records rows {BUDGET_ROWS - 1}, expected {BUDGET_ROWS}"),
    ({"policy": "sampled"}, "records policy 'sampled', expected 'degree'"),
    ({"owner": "someone"}, "no owner pid"),
])
def test_a_cache_of_other_settings_is_refused(store, tmp_path, change, problem) -> None:
    directory = cache_directory(store, budget_of(store), "degree", {}, tmp_path)
    plant(directory, store, budget_of(store), meta_changes=change)
    refused(store, tmp_path, str(directory / "meta.json"), problem)


@pytest.mark.parametrize("damage", ["truncated", "not npy", "wrong shape", "missing"])
def test_damaged_cache_files_are_refused(store, tmp_path, damage) -> None:
    directory = cache_directory(store, budget_of(store), "degree", {}, tmp_path)
    plant(directory, store, budget_of(store))
    rows = directory / ROWS_FILE
    if damage == "truncated":
        os.truncate(rows, rows.stat().st_size - 4)
    elif damage == "not npy":
        rows.write_bytes(b"hello")
    elif damage == "wrong shape":
        np.save(rows, np.zeros((BUDGET_ROWS + 1, store.feat_dim), dtype=store.feat_dtype))
    else:
        rows.unlink()
    expected = {"truncated": "shorter than its header", "not npy": "not a .npy file",
                "wrong shape": "expected", "missing": "missing"}[damage]
    refused(store, tmp_path, str(rows), expected)


def test_this_users_planted_look_alike_is_used_as_a_cache(store, tmp_path) -> None:
    """The checks decide ownership and consistency, not content: a cache of this user with the
    right description is reused (as after a run that died), not rebuilt."""
    directory = cache_directory(store, budget_of(store), "degree", {}, tmp_path)
    planted = plant(directory, store, budget_of(store))
    with FeatureCache.build(store, budget_of(store), root=tmp_path) as cache:
        assert not cache.owner  # pid 1 is alive
        assert np.array_equal(np.asarray(cache.rows), planted)
    assert directory.exists()


# ---- the command line ------------------------------------------------------------------------
TRAIN = ["--hidden", "8,8", "--predictor-hidden", "8", "--fanouts", "3,3", "--batch-size", "16",
         "--max-steps", "2", "--threads", "1", "--warmup-steps", "1", "--device", "cpu",
         "--num-workers", "0"]


@pytest.mark.parametrize("attack", ["other owner", "garbage meta"])
def test_train_refuses_a_planted_cache_with_one_line_and_writes_nothing(
        store_dir, store, tmp_path, capsys, attack) -> None:
    if attack == "other owner" and os.getuid() != 0:
        pytest.skip("changing a file's owner needs root")
    budget = budget_of(store)
    directory = cache_directory(store, budget, "degree", {})  # in /dev/shm, as train uses
    assert not os.path.lexists(directory)
    plant(directory, store, budget)
    try:
        if attack == "other owner":
            chown_tree(directory, OTHER_UID)
        else:
            (directory / "meta.json").write_text("{")
        run = tmp_path / "run"
        code = main(["train", "--data", str(store_dir), "--out", str(run), *TRAIN,
                     "--cache-bytes", str(budget)])
        captured = capsys.readouterr()
        assert_input_error(subprocess.CompletedProcess([], code, captured.out, captured.err),
                           str(directory), "not a feature cache of this user")
        assert not run.exists()
    finally:
        shutil.rmtree(directory)


def test_a_recorded_owner_whose_pid_now_names_another_process_counts_as_gone(store,
                                                                             tmp_path) -> None:
    """A pid is reused once its process has died: the owner is a (pid, start time) pair."""
    directory = cache_directory(store, budget_of(store), "degree", {}, tmp_path)
    started = process_start_time(os.getpid())
    plant(directory, store, budget_of(store), meta_changes={"owner": os.getpid(),
                                                            "owner_started": started + 1})
    with FeatureCache.build(store, budget_of(store), root=tmp_path) as cache:
        assert cache.owner  # adopted: the recorded process is not this one
        meta = json.loads((directory / "meta.json").read_text())
        assert meta["owner_started"] == started
        assert stat.S_IMODE(os.lstat(directory / "meta.json").st_mode) == 0o600
    assert not directory.exists()
    plant(directory, store, budget_of(store), meta_changes={"owner": os.getpid(),
                                                            "owner_started": started})
    with FeatureCache.build(store, budget_of(store), root=tmp_path) as cache:
        assert not cache.owner  # the recorded process is this live one
