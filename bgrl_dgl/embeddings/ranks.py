"""The ranks of an exact export working as one: a shared scratch directory and barriers.

Exact inference computes each layer before the last for the nodes that the next layer reads,
which, with several ranks, are nearly the same for all of them. So the ranks share that work:
every layer's tables are ONE set of memmaps in a scratch directory that rank 0 creates in the
scratch root (a directory all ranks see: on one machine any directory, on several a shared
file system), each rank computes a share of each layer's rows into them, and the ranks wait
for each other between layers (:meth:`RankSession.gather`).

Two transports, chosen by how the processes were started:

- under ``torchrun`` (``MASTER_ADDR`` set, or a process group already joined): a gloo
  process group whose collectives time out after the barrier timeout;
- processes started by hand with ``RANK``/``WORLD_SIZE``: files in the shared scratch
  directory. Rank 0 names it ``.tmp-<pid>@<host>@scratch-<key>`` (``key``: a digest of the
  export's inputs and world size), and the other ranks find it there.

A rank that dies makes the others fail with one line (a RunError) once the barrier timeout
(:data:`BARRIER_TIMEOUT_ENV`, seconds) has passed, or at once where the death can be seen (a
closed gloo connection; a dead process on the same machine; the directory removed by a rank
0 that failed). Rank 0 removes the directory when it ends; a rank 0 that is killed leaves it
to the stale-scratch cleanup of a later run, which only removes directories of dead
processes (so never a live peer's).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import socket
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch.distributed as dist

from bgrl_dgl.errors import RunError
from bgrl_dgl.io import (
    process_alive,
    process_start_time,
    same_process_alive,
    temp_prefix,
    write_atomic,
)
from bgrl_dgl.training.distributed import World, destroy_process_group, gather_objects

BARRIER_TIMEOUT_ENV = "BGRL_EMBED_BARRIER_TIMEOUT"
DEFAULT_BARRIER_TIMEOUT = 1800.0  # seconds a rank waits for the others at a barrier
SESSION_FILE = "session.json"
SHARED_SCRATCH = "scratch-"  # the name of the shared directory after its temp prefix


def barrier_timeout(environ: dict[str, str] | None = None) -> float:
    """Seconds a rank waits at a barrier (``BGRL_EMBED_BARRIER_TIMEOUT``, default 1800)."""
    value = (os.environ if environ is None else environ).get(BARRIER_TIMEOUT_ENV)
    if value is None:
        return DEFAULT_BARRIER_TIMEOUT
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise RunError(f"{BARRIER_TIMEOUT_ENV}={value!r} is not a positive number of seconds")
    return seconds


class RankSession:
    """The shared scratch directory of the ranks of one export, and their barriers.

    Use as a context manager: entering creates (rank 0) or finds (the others) the directory;
    leaving, rank 0 waits until every other rank has left, then removes it.
    """

    def __init__(self, world: World, root: Path, key: str, timeout: float) -> None:
        self.rank, self.world_size = world.rank, world.world_size
        self.root, self.key, self.timeout = Path(root), key, timeout
        self.directory: Path | None = None
        self.group: Any = None
        self.owns_group = False
        self.step = 0

    # ---- setup and teardown ---------------------------------------------------------------
    def __enter__(self) -> "RankSession":
        if dist.is_initialized() or "MASTER_ADDR" in os.environ:
            self._join_group()
        if self.rank == 0:
            self.directory = self.root / f"{temp_prefix()}{SHARED_SCRATCH}{self.key}"
            shutil.rmtree(self.directory, ignore_errors=True)  # a dead process with our pid
            self.directory.mkdir()
            write_atomic(self.directory / SESSION_FILE, json.dumps(self._me()))
            if self.group is not None:
                self._all_gather(self.directory.name, "the scratch directory")
        elif self.group is not None:
            self.directory = self.root / self._all_gather(None, "the scratch directory")[0]
        else:
            self.directory = self._find_directory()
        return self

    def __exit__(self, kind: Any, *exc: object) -> None:
        try:
            if kind is None:
                self._leave()
        finally:
            if self.rank == 0 and self.directory is not None:
                shutil.rmtree(self.directory, ignore_errors=True)
            self.group = None
            if self.owns_group:
                # Freed now, while the peers are still connected (freed later, its threads
                # would wait for peers long gone).
                destroy_process_group()

    def _join_group(self) -> None:
        timeout = timedelta(seconds=self.timeout)
        if not dist.is_initialized():
            try:
                dist.init_process_group("gloo", rank=self.rank, world_size=self.world_size,
                                        timeout=timeout)
            except (RuntimeError, ValueError) as err:
                raise RunError(f"rank {self.rank}: cannot join the process group of the "
                               f"export ranks: {one_line(err)}") from None
            self.owns_group, self.group = True, dist.group.WORLD
        else:  # a group of its own: gloo, with this timeout, whatever the caller's backend
            self.group = dist.new_group(backend="gloo", timeout=timeout)

    def _me(self) -> dict[str, Any]:
        return {"rank": self.rank, "pid": os.getpid(), "host": socket.gethostname(),
                "start": process_start_time(os.getpid()), "time": time.time()}

    def _find_directory(self) -> Path:
        """Rank 0's directory of this export, as soon as it is there."""
        name = re.compile(r"\.tmp-(\d+)@([^@]+)@" + re.escape(SHARED_SCRATCH + self.key))
        host = socket.gethostname()

        def live() -> Path | None:
            found: list[tuple[float, Path]] = []
            try:
                entries = list(self.root.iterdir())
            except FileNotFoundError:  # OUT, which rank 0 has yet to create
                return None
            for entry in entries:
                match = name.fullmatch(entry.name)
                if match is None or (match.group(2) == host
                                     and not process_alive(int(match.group(1)))):
                    continue
                try:
                    found.append((json.loads((entry / SESSION_FILE).read_text())["time"], entry))
                except (OSError, ValueError, KeyError):
                    continue  # not ready yet, or being removed
            return max(found)[1] if found else None

        return self._wait(live, "rank 0's shared scratch directory to appear")

    def _leave(self) -> None:
        """Rank 0 waits until every other rank is done with the directory."""
        if self.group is not None:
            self._all_gather(None, "the other ranks to finish")
            return
        self.step += 1
        what = "the other ranks to finish"
        self._post(self.step, None, what)
        if self.rank == 0:
            self._wait(lambda: self._read_all(self.step, what), what)

    # ---- barriers -------------------------------------------------------------------------
    def gather(self, value: Any, what: str) -> list[Any]:
        """Every rank's ``value`` (JSON), in rank order, once every rank has given its own:
        a barrier; ``what`` names it in the error of a rank that waited in vain."""
        if self.group is not None:
            return self._all_gather(value, what)
        self.step += 1
        self._post(self.step, value, what)
        return self._wait(lambda: self._read_all(self.step, what), what)

    def barrier(self, what: str) -> None:
        """Wait until every rank has arrived here (see :meth:`gather`)."""
        self.gather(None, what)

    def _all_gather(self, value: Any, what: str) -> list[Any]:
        """Every rank's JSON ``value`` through the group."""
        try:
            return gather_objects(value, self.group)
        except RuntimeError as err:
            raise RunError(self._failure(what, one_line(err))) from None

    def _post(self, step: int, value: Any, what: str) -> None:
        assert self.directory is not None
        try:
            write_atomic(self.directory / f"{step}-{self.rank}.json",
                         json.dumps({**self._me(), "value": value}))
        except FileNotFoundError:
            raise RunError(self._failure(what, "rank 0 removed the shared scratch "
                                         "directory: it stopped")) from None

    def _read_all(self, step: int, what: str) -> list[Any] | None:
        assert self.directory is not None
        if not self.directory.is_dir():
            raise RunError(self._failure(what, "rank 0 removed the shared scratch "
                                         "directory: it stopped"))
        values = []
        for rank in range(self.world_size):
            try:
                record = json.loads((self.directory / f"{step}-{rank}.json").read_text())
            except FileNotFoundError:
                self._check_alive(rank, step, what)
                return None
            values.append(record["value"])
        return values

    def _check_alive(self, rank: int, step: int, what: str) -> None:
        """RunError when ``rank`` posted before and has died since on this machine."""
        assert self.directory is not None
        try:
            record = json.loads((self.directory / f"{step - 1}-{rank}.json").read_text()
                                if step > 1 else (self.directory / SESSION_FILE).read_text())
        except (OSError, ValueError):
            return
        if record.get("rank", rank) != rank or record["host"] != socket.gethostname():
            return
        if not same_process_alive(record["pid"], record["start"]) or zombie(record["pid"]):
            raise RunError(self._failure(what, f"rank {rank} (pid {record['pid']}) "
                                                        "has died"))

    def _wait(self, ready: Any, what: str) -> Any:
        deadline = time.monotonic() + self.timeout
        pause = 0.01
        while True:
            result = ready()
            if result is not None:
                return result
            if time.monotonic() > deadline:
                raise RunError(self._failure(what, f"no answer within {self.timeout:g} s"))
            time.sleep(pause)
            pause = min(0.5, pause * 1.5)

    def _failure(self, what: str, why: str) -> str:
        return (f"rank {self.rank} of {self.world_size}: gave up waiting for {what} ({why}); "
                "another rank stopped or is stuck. Complete parts are kept: rerun all ranks "
                "to finish the export")


def zombie(pid: int) -> bool:
    """Whether process ``pid`` has ended but its parent has not yet collected it."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text(encoding="ascii", errors="replace")
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[:1] == ["Z"]


def one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return text[:300] or type(err).__name__

