"""Peak anonymous memory and wall time of a command, or of a running process, and their
descendants.

Anonymous memory (``RssAnon`` in ``/proc/<pid>/status``: heap, stacks, private mappings) is
what a process really needs; file-backed pages, such as those of memory-mapped arrays, are
reclaimable and not counted. A thread samples the sum over the whole process tree every
``interval`` seconds, so allocations shorter than that may be missed.

Usage::

    python scripts/memwatch.py [--interval 0.05] [--json] COMMAND [ARG ...]
    python scripts/memwatch.py --pid PID

or from Python: ``measure_command(["python", "-c", "..."]) -> Measurement``.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from typing import Sequence

GIB = 2**30
DEFAULT_INTERVAL = 0.05


def rss_anon_bytes(pid: int) -> int:
    """Resident anonymous memory of one process; 0 if it is gone (or a zombie)."""
    try:
        with open(f"/proc/{pid}/status", "rb") as status:
            for line in status:
                if line.startswith(b"RssAnon:"):
                    return int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        pass
    return 0


def read_parent_pid(pid: int) -> int | None:
    """Parent of ``pid``, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            # "pid (comm) state ppid ...": comm may hold spaces and parentheses.
            return int(stat.read().rsplit(b")", 1)[1].split()[1])
    except (FileNotFoundError, ProcessLookupError, PermissionError, IndexError):
        return None


class ProcessTree:
    """The live descendants of a root process, rescanned on each call of :meth:`pids`.

    Parent pids are cached (a process keeps its parent until that parent exits, and then
    it is no longer in the tree anyway), so a rescan reads /proc/<pid>/stat only for
    processes started since the previous one.
    """

    def __init__(self, root: int) -> None:
        self.root = root
        self._parents: dict[int, int | None] = {}

    def pids(self) -> list[int]:
        live = {int(entry.name) for entry in os.scandir("/proc") if entry.name.isdigit()}
        self._parents = {pid: self._parents[pid] if pid in self._parents else read_parent_pid(pid)
                         for pid in live}
        children: dict[int, list[int]] = {}
        for pid, parent in self._parents.items():
            children.setdefault(parent, []).append(pid)
        tree, frontier = [self.root], [self.root]
        while frontier:
            frontier = [child for pid in frontier for child in children.get(pid, ())]
            tree.extend(frontier)
        return tree

    def anon_bytes(self) -> int:
        """Resident anonymous memory summed over the tree."""
        return sum(rss_anon_bytes(pid) for pid in self.pids())


@dataclass
class Measurement:
    peak_anon_bytes: int
    wall_s: float
    returncode: int | None = None
    stdout: str | bytes | None = None  # captured output, when the command's was piped
    stderr: str | bytes | None = None

    @property
    def peak_anon_gib(self) -> float:
        return self.peak_anon_bytes / GIB

    def describe(self) -> str:
        return f"peak anonymous memory {self.peak_anon_gib:.3f} GiB, wall time {self.wall_s:.2f} s"


class MemWatcher:
    """Samples the anonymous memory of a process tree in a thread until :meth:`stop`.

    ``peak_bytes`` is the largest sum seen so far; use as a context manager or call
    :meth:`start` and :meth:`stop`.
    """

    def __init__(self, pid: int, interval: float = DEFAULT_INTERVAL) -> None:
        self.tree = ProcessTree(pid)
        self.interval = interval
        self.peak_bytes = 0
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._sample_until_stopped,
                                        name="memwatch", daemon=True)

    def _sample(self) -> None:
        self.peak_bytes = max(self.peak_bytes, self.tree.anon_bytes())

    def _sample_until_stopped(self) -> None:
        while not self._stopped.wait(self.interval):
            self._sample()

    def start(self) -> "MemWatcher":
        self._sample()
        self._thread.start()
        return self

    def stop(self) -> int:
        """Stop sampling; returns the peak in bytes."""
        self._stopped.set()
        self._thread.join()
        return self.peak_bytes

    def __enter__(self) -> "MemWatcher":
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def measure_command(command: Sequence[str], interval: float = DEFAULT_INTERVAL,
                    **popen_kwargs) -> Measurement:
    """Run ``command`` (``subprocess.Popen`` arguments in ``popen_kwargs``) to completion
    and measure it; output sent to ``subprocess.PIPE`` comes back in the measurement."""
    start = time.perf_counter()
    process = subprocess.Popen(list(command), **popen_kwargs)
    try:
        with MemWatcher(process.pid, interval) as watcher:
            stdout, stderr = process.communicate()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    return Measurement(watcher.peak_bytes, time.perf_counter() - start, process.returncode,
                       stdout, stderr)


def measure_pid(pid: int, interval: float = DEFAULT_INTERVAL) -> Measurement:
    """Watch a running process (not a child of this one) until it exits."""
    if not os.path.exists(f"/proc/{pid}"):
        raise ProcessLookupError(f"no process {pid}")
    start = time.perf_counter()
    with MemWatcher(pid, interval) as watcher:
        while os.path.exists(f"/proc/{pid}"):
            time.sleep(interval)
    return Measurement(watcher.peak_bytes, time.perf_counter() - start)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Run a command (or watch a pid) and report the peak anonymous memory "
                    "(RssAnon) summed over it and its descendants, and the wall time.")
    parser.add_argument("--interval", type=float, default=DEFAULT_INTERVAL,
                        help=f"sampling period in seconds (default: {DEFAULT_INTERVAL})")
    parser.add_argument("--json", action="store_true",
                        help="print the result as one JSON object on stdout")
    parser.add_argument("--pid", type=int, help="watch this running process instead")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="command to run")
    args = parser.parse_args(argv)
    if (args.pid is None) == (not args.command):
        parser.error("give either --pid PID or a command")
    if args.pid is not None:
        try:
            result = measure_pid(args.pid, args.interval)
        except ProcessLookupError as err:
            parser.error(str(err))
    else:
        command = args.command[1:] if args.command[0] == "--" else args.command
        try:
            result = measure_command(command, args.interval)
        except OSError as err:
            parser.error(f"cannot run {command[0]}: {err.strerror}")
    if args.json:
        print(json.dumps({"peak_anon_gb": result.peak_anon_gib, "wall_s": result.wall_s,
                          "returncode": result.returncode}))
    else:
        print(f"memwatch: {result.describe()}", file=sys.stderr)
    returncode = result.returncode or 0
    return returncode if returncode >= 0 else 128 - returncode  # killed by signal -returncode


if __name__ == "__main__":
    sys.exit(main())
