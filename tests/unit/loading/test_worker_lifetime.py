"""Sampling workers end with their training process, which is not their parent (the
forkserver is), however the training process ends."""
from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest

from bgrl_dgl.io import process_start_time
from bgrl_dgl.loading.loader import ORPHAN_EXIT

from helpers import REPO

WATCHER = """
import os, sys, time
if sys.argv[3] == "poll":
    del os.pidfd_open  # as on a Python or kernel without pidfds
from bgrl_dgl.loading import loader
loader.ORPHAN_POLL_S = 0.1
started = None if sys.argv[2] == "None" else int(sys.argv[2])
loader.exit_with(int(sys.argv[1]), started)
print("watching", flush=True)
time.sleep(120)
"""


def start_watcher(pid: int, started: int | None, how: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", WATCHER, str(pid), str(started), how],
                            cwd=REPO, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            text=True)


def wait_exit(process: subprocess.Popen, timeout: float) -> int | None:
    try:
        return process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        return None


@pytest.mark.parametrize("how", ["pidfd", "poll"])
def test_a_watcher_exits_soon_after_the_training_process_is_killed(how) -> None:
    trainer = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"],
                               stdin=subprocess.DEVNULL)
    watcher = start_watcher(trainer.pid, process_start_time(trainer.pid), how)
    try:
        assert watcher.stdout.readline().strip() == "watching"
        time.sleep(0.5)
        assert watcher.poll() is None  # alive while the training process is
        trainer.send_signal(signal.SIGKILL)
        trainer.wait(timeout=30)
        assert wait_exit(watcher, timeout=10) == ORPHAN_EXIT
    finally:
        for process in (trainer, watcher):
            process.kill()
            process.wait(timeout=30)
        watcher.stdout.close()


def test_a_watcher_of_a_process_already_gone_exits_at_once() -> None:
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)
    watcher = start_watcher(int(gone.stdout), None, "pidfd")
    try:
        assert wait_exit(watcher, timeout=60) == ORPHAN_EXIT
        assert watcher.stdout.read() == ""
    finally:
        watcher.kill()
        watcher.wait(timeout=30)
        watcher.stdout.close()


def test_a_reused_pid_is_not_mistaken_for_the_training_process() -> None:
    """The pid names a live process, but not the one that started at the recorded time."""
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"],
                             stdin=subprocess.DEVNULL)
    watcher = start_watcher(other.pid, process_start_time(other.pid) - 1, "pidfd")
    try:
        assert wait_exit(watcher, timeout=60) == ORPHAN_EXIT
    finally:
        for process in (other, watcher):
            process.kill()
            process.wait(timeout=30)
        watcher.stdout.close()
