"""The files of a feature cache directory, made so that no other user can plant or change them.

The cache lives in a directory that every user can write into (``/dev/shm``), under a name
anyone can compute. So a directory found under that name is trusted only when it is this
user's own: not a symbolic link, owned by this uid, writable by nobody else, and so are the
files in it (opened without following links); its ``meta.json`` must also describe exactly
the cache asked for. Anything else is refused with an :class:`~bgrl_dgl.errors.InputError`
naming the path, never read as cached rows. New directories are written under a temporary
name that no one else can create first (``mkdtemp``: a random suffix, mode 0700) and renamed
into place when complete.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import stat
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator

import numpy as np

from bgrl_dgl.errors import InputError
from bgrl_dgl.io import atomic_path, process_start_time, same_process_alive, temp_prefix
from bgrl_dgl.store.format import parse_npy_header

ROWS_FILE, SLOTS_FILE, META_FILE = "rows.npy", "slots.npy", "meta.json"
CACHE_FILES = (ROWS_FILE, SLOTS_FILE, META_FILE)
# No cache's meta.json comes near this; a larger one is not read.
MAX_META_BYTES = 1 << 16


# Makes the error for a path that is refused (see :func:`not_a_cache`).
Refusal = Callable[[Path, str], InputError]


def not_a_cache(path: Path, why: str) -> InputError:
    """The error for a path that must not be used as this user's cache."""
    return InputError(path, f"not a feature cache of this user ({why}); remove it, or train "
                            "without a feature cache (--cache-bytes 0)")


def check_private(path: Path, info: os.stat_result, kind: str,
                  refuse: Refusal = not_a_cache) -> None:
    """InputError (made by ``refuse``) unless ``info`` (an lstat/fstat of ``path``) is a
    ``kind`` ('directory' or 'file') owned by this user that no other user may write."""
    is_kind = stat.S_ISDIR if kind == "directory" else stat.S_ISREG
    if stat.S_ISLNK(info.st_mode):
        raise refuse(path, "a symbolic link")
    if not is_kind(info.st_mode):
        raise refuse(path, f"not a regular {kind}" if kind == "file" else "not a directory")
    if info.st_uid != os.getuid():
        raise refuse(path, f"owned by uid {info.st_uid}, not by this user (uid {os.getuid()})")
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise refuse(path, f"mode {stat.S_IMODE(info.st_mode):o} lets other users write it")


def check_directory(directory: Path, refuse: Refusal = not_a_cache) -> None:
    """InputError unless ``directory`` is this user's private directory (not a link)."""
    try:
        info = os.lstat(directory)
    except FileNotFoundError:  # e.g. removed by its owner meanwhile
        raise InputError(directory, "no such feature cache directory") from None
    check_private(directory, info, "directory", refuse)


def open_private(path: Path, refuse: Refusal = not_a_cache) -> BinaryIO:
    """``path`` opened for reading without following a symbolic link; InputError unless it is
    a regular file of this user that no other user may write."""
    try:
        handle = open(path, "rb", opener=lambda name, flags: os.open(name, flags | os.O_NOFOLLOW))
    except FileNotFoundError:
        raise refuse(path, "missing") from None
    except OSError as err:  # ELOOP: a symbolic link
        raise refuse(path, "a symbolic link" if os.path.islink(path) else str(err)) from None
    try:
        check_private(path, os.fstat(handle.fileno()), "file", refuse)
    except BaseException:
        handle.close()
        raise
    return handle


def map_array(path: Path, dtype: np.dtype, shape: tuple[int, ...],
              refuse: Refusal = not_a_cache) -> np.memmap:
    """The .npy file ``path`` memory-mapped read-only; InputError unless it is a private file
    (see :func:`open_private`) holding a C-order ``dtype`` array of ``shape``."""
    with open_private(path, refuse) as handle:
        try:
            found_shape, found_dtype, fortran = parse_npy_header(handle)
        except (ValueError, EOFError, SyntaxError) as err:
            raise refuse(path, f"not a .npy file: {err}") from None
        if found_dtype != dtype or found_shape != shape or fortran:
            raise refuse(path, f"holds {found_dtype} {list(found_shape)}, expected "
                                    f"{np.dtype(dtype)} {list(shape)}")
        offset = handle.tell()
        if os.fstat(handle.fileno()).st_size < offset + int(np.prod(shape)) * dtype.itemsize:
            raise refuse(path, "shorter than its header says")
        return np.memmap(handle, dtype=dtype, mode="r", offset=offset, shape=shape)


def read_meta(directory: Path, refuse: Refusal = not_a_cache) -> dict[str, Any]:
    """The JSON object in ``directory/meta.json`` (a private file); InputError when it is
    anything else."""
    path = directory / META_FILE
    with open_private(path, refuse) as handle:
        data = handle.read(MAX_META_BYTES + 1)
    if len(data) > MAX_META_BYTES:
        raise refuse(path, f"over {MAX_META_BYTES} bytes")
    try:
        meta = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise refuse(path, f"not JSON: {err}") from None
    if not isinstance(meta, dict):
        raise refuse(path, "not a JSON object")
    return meta


def check_meta(directory: Path, meta: dict[str, Any], expected: dict[str, Any]) -> None:
    """InputError unless ``meta`` records every value of ``expected`` and an owner pid."""
    for key, value in expected.items():
        if meta.get(key) != value:
            raise not_a_cache(directory / META_FILE,
                              f"it records {key} {meta.get(key)!r}, expected {value!r}")
    if not isinstance(meta.get("owner"), int) or isinstance(meta.get("owner"), bool):
        raise not_a_cache(directory / META_FILE, "no owner pid")


def open_cache_files(directory: Path,
                     expected: dict[str, Any] | None = None) -> tuple[dict[str, Any], np.memmap,
                                                                      np.memmap]:
    """(meta, rows [C, F], slots [N] int32) of the cache ``directory``, after checking that
    the directory and its files are this user's and agree with its meta.json, and that this
    records ``expected`` (when given)."""
    check_directory(directory)
    meta = read_meta(directory)
    shape = {key: meta.get(key) for key in ("num_nodes", "feat_dim", "rows")}
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in shape.values()):
        raise not_a_cache(directory / META_FILE, f"bad sizes {shape}")
    try:
        dtype = np.dtype(str(meta.get("feat_dtype")))
    except (TypeError, ValueError):
        raise not_a_cache(directory / META_FILE, f"bad dtype {meta.get('feat_dtype')!r}") from None
    check_meta(directory, meta, expected or {})
    rows = map_array(directory / ROWS_FILE, dtype, (shape["rows"], shape["feat_dim"]))
    slots = map_array(directory / SLOTS_FILE, np.dtype(np.int32), (shape["num_nodes"],))
    return meta, rows, slots


def lock_if_current(fd: int, path: Path) -> bool:
    """Take an exclusive ``flock`` on ``fd`` (opened from ``path``), waiting for it; whether
    ``path`` still names the locked file (not when its owner removed or replaced it while
    this process waited: lock the new one instead)."""
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        return os.lstat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False


def lock_path(directory: Path) -> Path:
    """The lock file of the writers of the cache ``directory``, beside it."""
    return directory.with_name(directory.name + ".lock")


@contextlib.contextmanager
def writer_lock(directory: Path) -> Iterator[None]:
    """Hold the lock of the writers of the cache ``directory`` for the block.

    The lock is a private file of this user beside the directory (created mode 0600, opened
    without following links): another user can neither hold it (which would make this
    user's runs wait forever) nor plant it (refused like any planted cache file). Its owner
    deletes it with the cache (:func:`remove_cache`), so a process that waited on a lock file
    deleted meanwhile takes the new one instead.
    """
    path = lock_path(directory)
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        except OSError as err:  # ELOOP: a symbolic link
            raise not_a_cache(path, "a symbolic link" if os.path.islink(path)
                              else err.strerror or str(err)) from None
        try:
            check_private(path, os.fstat(fd), "file")
            current = lock_if_current(fd, path)
        except BaseException:
            os.close(fd)
            raise
        if current:
            break
        os.close(fd)
    try:
        yield
    finally:
        os.close(fd)


def remove_cache(directory: Path) -> None:
    """Delete the cache ``directory`` and its lock file (by its owner, under the lock)."""
    with writer_lock(directory):
        shutil.rmtree(directory, ignore_errors=True)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(lock_path(directory))


def private_temp_dir(directory: Path) -> Path:
    """A new empty directory beside ``directory`` for its files: mode 0700, under a temp name
    (see bgrl_dgl.io) with a random suffix, so that no other user can create it first."""
    return Path(tempfile.mkdtemp(prefix=f"{temp_prefix()}{directory.name}-",
                                 dir=directory.parent))


def seal(tmp: Path) -> None:
    """Make the files written in ``tmp`` readable and writable by this user only (whatever
    the umask), as :func:`check_private` expects them."""
    for name in CACHE_FILES:
        os.chmod(tmp / name, 0o600)


def owner_record() -> dict[str, Any]:
    """This process as a cache's owner: its pid and start time (a pid alone may be reused)."""
    return {"owner": os.getpid(), "owner_started": process_start_time(os.getpid())}


def adopt_if_orphaned(directory: Path, meta: dict[str, Any]) -> bool:
    """Whether this process owns the existing cache ``directory`` (with ``meta``, already
    checked): it does when the recorded owner is gone (a run that died), and then records
    itself as the owner."""
    started = meta.get("owner_started")
    if same_process_alive(meta["owner"], started if isinstance(started, int) else None):
        return False
    with atomic_path(directory / META_FILE) as tmp:
        tmp.write_text(json.dumps({**meta, **owner_record()}), encoding="utf-8")
        os.chmod(tmp, 0o600)
    return True
