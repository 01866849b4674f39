"""Scratch space of an export: the memmaps of the layers, checked and allocated up front.

A memmap is written through page faults, and a page that the file system cannot allocate
kills the process with SIGBUS: no message, no cleanup, the scratch directory left behind. So
the space needed is checked before anything is written (:func:`check_free_space`: the
intermediate tables of exact inference, see layerwise.py, or the memmap of sampled
embeddings), every memmap is allocated on disk (``posix_fallocate``) before it is mapped,
and stale scratch directories of dead processes are removed before the space is measured.
"""
from __future__ import annotations

import contextlib
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import numpy as np

from bgrl_dgl.errors import InputError
from bgrl_dgl.io import allocate_file, remove_stale_temp_files, temp_prefix

SCRATCH_NAME = "scratch-"


def existing_ancestor(path: Path) -> Path:
    """``path`` or its nearest ancestor that exists (where a new ``path`` would be made)."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_free_space(directory: Path, needed: int, what: str) -> None:
    """InputError unless the file system of ``directory`` has ``needed`` bytes free."""
    free = shutil.disk_usage(existing_ancestor(directory)).free
    if needed > free:
        raise InputError(directory, f"{what} needs {needed:,} bytes of scratch space, only "
                                    f"{free:,} are free: free some space, or pass --scratch-dir "
                                    "on a larger file system (with exact inference: or "
                                    "--scratch-dtype float16)")


def remove_stale_scratch(root: Path) -> None:
    """Delete the scratch directories that dead processes of this user left in ``root``."""
    remove_stale_temp_files(existing_ancestor(root), SCRATCH_NAME, own_only=True)


@contextlib.contextmanager
def scratch_directory(root: Path) -> Iterator[Path]:
    """A new private scratch directory in ``root``, named so that a later run removes it if
    this process dies first (see bgrl_dgl.io); removed when the block ends."""
    scratch = Path(tempfile.mkdtemp(prefix=temp_prefix() + SCRATCH_NAME, dir=root))
    try:
        yield scratch
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def allocate_array(path: Path, dtype: np.dtype | str, shape: tuple[int, ...]) -> np.memmap:
    """A new zero-filled writable memmap at ``path`` whose blocks are allocated on disk first,
    so that writing it cannot fail with SIGBUS; InputError when the disk is full."""
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    with open(path, "wb") as handle:
        if nbytes:
            allocate_file(handle.fileno(), path, nbytes)
    if not nbytes:
        return np.zeros(shape, dtype=dtype)  # mmap cannot map an empty file
    return np.memmap(path, dtype=dtype, mode="r+", shape=shape)
