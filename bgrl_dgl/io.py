"""File safety shared by every writer: temp names, atomic writes, stale-temp cleanup.

Every file or directory a command publishes is first written under a temporary name in the
same directory and renamed into place when complete, so a reader never sees a half-written
one. Temp names carry the writer's pid and host (``.tmp-<pid>@<host>@<name>``), so a later
run can remove those of dead processes.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
from pathlib import Path
from typing import Any

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


# Temporary files and scratch directories in OUT: ".tmp-<pid>@<host>@<name>", removed by a
# later run once <pid> on this host is gone.
TEMP_NAME = re.compile(r"\.tmp-(\d+)@([^@]+)@.*")


def file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


# ---- the output directory ------------------------------------------------------------------
def temp_prefix() -> str:
    return f".tmp-{os.getpid()}@{socket.gethostname()}@"


def remove_stale_temp_files(out: Path) -> None:
    """Delete temp files and scratch directories left in ``out`` by dead processes of this host."""
    host = socket.gethostname()
    for entry in out.iterdir():
        match = TEMP_NAME.fullmatch(entry.name)
        if match and match.group(2) == host and not process_alive(int(match.group(1))):
            if entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)


def write_atomic(path: Path, text: str) -> None:
    """``text`` to ``path`` via a temp file in the same directory, flushed and renamed."""
    tmp = path.with_name(temp_prefix() + path.name)
    try:
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(path, "not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InputError(path, f"unreadable ({err})") from None

