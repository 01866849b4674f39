"""File safety shared by every writer: temp names, atomic writes, stale-temp cleanup.

Every file or directory a command publishes is first written under a temporary name in the
same directory and renamed into place when complete, so a reader never sees a half-written
one. Temp names carry the writer's pid and host (``.tmp-<pid>@<host>@<name>``), so a later
run can remove those of dead processes.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import socket
from pathlib import Path
from typing import Any, Iterator

from bgrl_dgl.errors import InputError


def process_alive(pid: int) -> bool:
    """Whether a process with this id exists on this machine."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def process_start_time(pid: int) -> int | None:
    """When process ``pid`` started, in clock ticks since boot (Linux ``/proc``), or None when
    there is no such process or no ``/proc``. With the pid it names one process: a pid may be
    reused once its process has died, a (pid, start time) pair is not."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text(encoding="ascii", errors="replace")
        # Field 22; the command name (field 2) is in parentheses and may hold spaces.
        return int(stat.rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def same_process_alive(pid: int, start_time: int | None) -> bool:
    """Whether the process ``pid`` that started at ``start_time`` (see
    :func:`process_start_time`; None = unknown, the pid alone decides) still runs."""
    if not process_alive(pid):
        return False
    return start_time is None or process_start_time(pid) in (None, start_time)


# Temporary files and scratch directories in OUT: ".tmp-<pid>@<host>@<name>", removed by a
# later run once <pid> on this host is gone.
TEMP_NAME = re.compile(r"\.tmp-(\d+)@([^@]+)@(.*)")


def file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    """The hex SHA-256 of a file's bytes, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def temp_prefix() -> str:
    """The prefix of this process's temp names: ``.tmp-<pid>@<host>@``."""
    return f".tmp-{os.getpid()}@{socket.gethostname()}@"


def temp_path(path: Path) -> Path:
    """This process's temp name for ``path``, in the same directory (same file system, so
    the final rename is atomic)."""
    return path.with_name(temp_prefix() + path.name)


def remove_stale_temp_files(directory: Path, name_prefix: str = "", own_only: bool = False) -> None:
    """Delete the temp files and directories that dead processes of this host left in
    ``directory`` (live writers' and other hosts' temps are kept).

    Args:
        directory: where to look.
        name_prefix: only temps of names starting with it (after the temp prefix).
        own_only: only temps owned by this user (for directories other users share, such
            as ``/dev/shm`` or a common scratch directory).
    """
    host = socket.gethostname()
    try:
        entries = list(directory.iterdir())
    except FileNotFoundError:
        return
    for entry in entries:
        match = TEMP_NAME.fullmatch(entry.name)
        if not (match and match.group(2) == host and match.group(3).startswith(name_prefix)):
            continue
        if own_only and not owned_by_me(entry):
            continue
        if not process_alive(int(match.group(1))):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)


def owned_by_me(path: Path) -> bool:
    """Whether ``path`` itself (not what a symlink points to) belongs to this user."""
    try:
        return os.lstat(path).st_uid == os.getuid()
    except FileNotFoundError:
        return False


def fsync_path(path: Path) -> None:
    """Flush a file's (or a directory's entries') data to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temp path beside ``path`` to write; when the block ends without error the
    file is flushed to disk and renamed to ``path``, otherwise it is removed."""
    tmp = temp_path(path)
    try:
        yield tmp
        fsync_path(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_atomic(path: Path, data: str | bytes) -> None:
    """Write ``data`` (text as UTF-8) to ``path`` through :func:`atomic_path`."""
    with atomic_path(path) as tmp:
        if isinstance(data, str):
            tmp.write_text(data, encoding="utf-8")
        else:
            tmp.write_bytes(data)


def read_json(path: Path) -> Any:
    """The JSON value in ``path``; InputError when missing or unreadable."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(path, "not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InputError(path, f"unreadable ({err})") from None


def allocate_file(fd: int, path: Path, size: int) -> None:
    """Allocate the first ``size`` bytes of the open file ``fd`` (at ``path``) on disk, so that
    writing them through a memory map cannot die of SIGBUS on a full disk: a full disk shows
    here, as an InputError. Where the file system cannot allocate ahead, the file is only
    extended to ``size`` (sparse)."""
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as err:
        if err.errno in (errno.ENOSPC, errno.EDQUOT):
            raise InputError(path, f"cannot allocate {size:,} bytes: "
                                   f"{os.strerror(err.errno)}") from None
        if err.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
            raise
        if os.fstat(fd).st_size < size:
            os.ftruncate(fd, size)
