"""Host tuning of a training process: compute threads beside the sampling workers, and
glibc's allocator keeping freed activations for the next step."""
from __future__ import annotations

import ctypes
import os


def compute_threads(requested: int, num_workers: int, local_processes: int = 1) -> int:
    """Threads for compute: as requested, or this process's share of the machine's cores
    minus its sampling workers (oversubscribed cores make every parallel section wait for a
    descheduled thread)."""
    if requested:
        return requested
    return max(len(os.sched_getaffinity(0)) // local_processes - num_workers, 1)


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters


_ALLOCATOR_VARIABLES = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES")


def keep_freed_host_memory(mmap_threshold: int = 32 << 20, trim_threshold: int = 1 << 30) -> bool:
    """Let glibc's malloc keep freed blocks of up to ``mmap_threshold`` bytes (glibc's
    maximum) for reuse instead of unmapping them, and not trim its heap below
    ``trim_threshold`` free bytes. Returns whether the setting was applied.

    A CPU training step allocates and frees the same activations of a few MB every step;
    returned to the kernel, each comes back as fresh pages that fault in one by one
    (see the README's benchmark notes for what that cost). Nothing is changed
    where the user tunes the allocator through its environment variables, or where the C
    library has no ``mallopt`` (then it is not glibc's allocator).
    """
    if any(name in os.environ for name in _ALLOCATOR_VARIABLES):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, mmap_threshold)) and bool(mallopt(_M_TRIM_THRESHOLD,
                                                                             trim_threshold))

