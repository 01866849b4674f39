"""Whole-graph arrays of a training run, held once per machine and memory-mapped by every
process of the run.

Besides the store, a training process used to hold arrays as long as the graph, and so did
each of its sampling workers: the seed ids, each epoch's shuffled order of them, and the
whole-graph degrees of GCN normalisation. For a graph of 122M nodes that is about 3 GB per
process, paid by every rank and every worker. Now:

* seed ids are not copied: ``seeds: all`` needs no array (the position of a seed is its id),
  ``split:NAME`` maps the store's split file, and the ids of a ``.npy`` file, once read and
  checked by each rank, are written once per machine and mapped in place of each rank's copy;
* each epoch's order of the seed positions, numpy's
  ``default_rng(SeedSequence([seed, epoch, 0x5EED])).permutation(num_seeds)``, is written
  once per machine into a file that the ranks map; the ranks cut their steps' seeds out of
  it and hand each sampling worker just the seeds of the step it samples;
* the in- and out-degrees are written once per machine, as float32, and every sampler maps
  them (in a symmetrised store the in-degree file serves both).

The files live in a directory in shared memory (``/dev/shm``, else the temporary directory)::

    bgrl-dgl-shared-<uid>-<key>/meta.json                      the owner (pid, start time)
    bgrl-dgl-shared-<uid>-<key>/perm-<S>-<seed>-<epoch>.npy    [S] int64: an epoch's order
    bgrl-dgl-shared-<uid>-<key>/in_degree.npy                  [N] float32
    bgrl-dgl-shared-<uid>-<key>/out_degree.npy                 [N] float32 (not symmetrised)
    bgrl-dgl-shared-<uid>-<key>/seeds-<S>-<digest>.npy         [S] int64: ids from a file

``uid`` is the user's; ``key`` hashes the run directory and the store's topology files (path,
size, mtime), so the ranks of one run on one machine meet in one directory and no two runs
do. The directory is made as safely as the feature cache's (see
:mod:`~bgrl_dgl.loading.cache_files`): created under a private temporary name (mode 0700) and
renamed into place, trusted only when it and its files are this user's and writable by no
one else, files opened without following links. Each file is written under a temporary name
(:func:`bgrl_dgl.io.atomic_path`) by one process while the others wait on a lock of the
directory (``flock``), then mapped read-only by all of them.

An epoch's order is written without an in-memory copy: the file is allocated first
(``posix_fallocate``: a full tmpfs fails there with ENOSPC, not later with SIGBUS), mapped,
filled with 0..S-1 in chunks and shuffled in place by the same generator call that
``Generator.permutation`` makes on its own array, so the order is the same. A rank keeps
the file of its current epoch mapped; writing the order of epoch ``e`` removes those of
epochs before ``e - 1`` (a rank may still read the previous one for a step or two).

The process that created the directory owns it and removes it when the run ends. One killed
before that (SIGKILL, out of memory) leaves it behind; the next run of the same user on the
machine removes every such directory whose owner is gone, and the temporary files of dead
writers.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import mmap
import os
import re
import shutil
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

import numpy as np
import torch

from bgrl_dgl.errors import InputError
from bgrl_dgl.io import (
    allocate_file,
    atomic_path,
    remove_stale_temp_files,
    same_process_alive,
)
from bgrl_dgl.loading.cache_files import (
    META_FILE,
    check_directory,
    check_private,
    lock_if_current,
    map_array,
    owner_record,
    private_temp_dir,
    read_meta,
)
from bgrl_dgl.loading.feature_cache import default_cache_root
from bgrl_dgl.store.format import NpyWriter, npy_header

if TYPE_CHECKING:
    from bgrl_dgl.store.reader import GraphStore

SHARED_PREFIX = "bgrl-dgl-shared-"
IN_DEGREE_FILE, OUT_DEGREE_FILE = "in_degree.npy", "out_degree.npy"
PERMUTATION_FILE = re.compile(r"perm-(\d+)-(\d+)-(\d+)\.npy")
# Positions written at a time when an order is filled.
FILL_CHUNK = 1 << 22


def not_shared_arrays(path: Path, why: str) -> InputError:
    """The error for a path that must not be used as this user's shared arrays."""
    return InputError(path, f"not a directory of shared training arrays of this user ({why}); "
                            "remove it")


def user_prefix() -> str:
    """The start of the names of this user's directories: ``bgrl-dgl-shared-<uid>-``."""
    return f"{SHARED_PREFIX}{os.getuid()}-"


def run_key(store: "GraphStore", run_dir: Path) -> str:
    """16 hex digits naming the shared arrays of a run on ``store`` writing to ``run_dir``."""
    identity: list[object] = [str(Path(run_dir).resolve())]
    for name in ("indptr", "indices"):
        path = store.array_path(name).resolve()
        info = path.stat()
        identity += [str(path), info.st_size, info.st_mtime_ns]
    return hashlib.sha256(json.dumps(identity).encode()).hexdigest()[:16]


def write_permutation(path: Path, num_seeds: int, seed: int, epoch: int) -> None:
    """Write epoch ``epoch``'s order of ``num_seeds`` seed positions (see
    :func:`bgrl_dgl.loading.loader.epoch_permutation`) to the new .npy file ``path``."""
    header = npy_header(np.dtype(np.int64), (num_seeds,))
    size = len(header) + 8 * num_seeds
    with open(path, "x+b") as handle:  # read and write: a shared map needs both
        handle.write(header)
        handle.flush()
        allocate_file(handle.fileno(), path, size)
        if num_seeds == 0:
            return
        with mmap.mmap(handle.fileno(), size) as mapped:
            # A plain ndarray over the map: Generator.shuffle's fast path, as in permutation().
            order = np.frombuffer(mapped, dtype=np.int64, count=num_seeds, offset=len(header))
            for start in range(0, num_seeds, FILL_CHUNK):
                stop = min(start + FILL_CHUNK, num_seeds)
                order[start:stop] = np.arange(start, stop, dtype=np.int64)
            np.random.default_rng(np.random.SeedSequence([seed, epoch, 0x5EED])).shuffle(order)
            del order  # the map cannot close while an array exports its buffer


def write_array(path: Path, array: np.ndarray) -> None:
    """Write the 1-D ``array`` to the new .npy file ``path``."""
    writer = NpyWriter(path, array.dtype)
    for start in range(0, len(array), FILL_CHUNK):
        writer.append(array[start:start + FILL_CHUNK])
    writer.close()


def write_in_degrees(path: Path, store: "GraphStore") -> None:
    """Write the in-degree of every node, [N] float32, to ``path``, in slices of indptr."""
    writer = NpyWriter(path, np.float32)
    for start in range(0, store.num_nodes, FILL_CHUNK):
        stop = min(start + FILL_CHUNK, store.num_nodes)
        writer.append(np.diff(store.indptr[start:stop + 1]))
    writer.close()


def write_out_degrees(path: Path, store: "GraphStore") -> None:
    """Write the out-degree of every node, [N] float32, to ``path``, counted over indices in
    chunks."""
    writer = NpyWriter(path, np.float32)
    writer.append(store.out_degrees())
    writer.close()


def map_degrees(paths: tuple[Path, Path], num_nodes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(out-degree, in-degree) [N] float32 tensors over the files ``paths`` (out, in) written
    by :meth:`SharedArrays.degree_files`, mapped read-only."""
    arrays = [map_array(path, np.dtype(np.float32), (num_nodes,), not_shared_arrays)
              for path in paths]
    with warnings.catch_warnings():
        # Read-only maps: the samplers only index them.
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(arrays[0]), torch.from_numpy(arrays[1])


def remove_stale(root: Path) -> None:
    """Remove this user's directories under ``root`` whose owner is gone (runs that were
    killed), and the temporary directories of dead writers."""
    remove_stale_temp_files(root, user_prefix(), own_only=True)
    try:
        entries = [entry for entry in root.iterdir() if entry.name.startswith(user_prefix())]
    except FileNotFoundError:
        return
    for entry in entries:
        try:
            judged = os.lstat(entry)
            check_private(entry, judged, "directory", not_shared_arrays)
            meta = read_meta(entry, not_shared_arrays)
        except (OSError, InputError):
            continue  # not ours to judge (or just removed by its owner)
        owner, started = meta.get("owner"), meta.get("owner_started")
        if not isinstance(owner, int) or same_process_alive(
                owner, started if isinstance(started, int) else None):
            continue
        with contextlib.suppress(OSError):
            # Only the directory judged: another process may have removed it and made a
            # new one under the name meanwhile.
            if os.lstat(entry).st_ino == judged.st_ino:
                shutil.rmtree(entry, ignore_errors=True)


def create_directory(directory: Path) -> bool:
    """Make ``directory`` (with this process as owner in its meta.json) unless it exists;
    whether this process made it. InputError when what is there is not this user's."""
    if not os.path.lexists(directory):
        tmp = private_temp_dir(directory)
        try:
            with open(tmp / META_FILE, "x", encoding="utf-8") as handle:
                json.dump(owner_record(), handle)
            os.chmod(tmp / META_FILE, 0o600)
            os.rename(tmp, directory)
            return True
        except OSError:  # made by another process meanwhile (a non-empty directory)
            shutil.rmtree(tmp, ignore_errors=True)
    check_directory(directory, not_shared_arrays)
    return False


def shared_directory(store: "GraphStore", run_dir: Path, root: Path | None = None) -> Path:
    """Where the shared arrays of a run on ``store`` writing to ``run_dir`` live."""
    root = default_cache_root() if root is None else Path(root)
    return root / f"{user_prefix()}{run_key(store, run_dir)}"


def check_found_directory(store: "GraphStore", run_dir: Path, root: Path | None = None) -> None:
    """InputError when something other than this user's private directory sits under the
    name of the run's shared arrays: checked before a run writes anything."""
    directory = shared_directory(store, run_dir, root)
    if os.path.lexists(directory):
        check_directory(directory, not_shared_arrays)


class SharedArrays:
    """This machine's directory of a run's whole-graph arrays (see the module's description).

    Args:
        directory: the directory (made by :meth:`open`).
        owner: whether this process made it, and removes it in :meth:`close`.
    """

    def __init__(self, directory: Path, owner: bool) -> None:
        self.directory = Path(directory)
        self.owner = owner

    @classmethod
    def open(cls, key: str, root: Path | None = None) -> "SharedArrays":
        """The directory of ``key`` under ``root`` (default: shared memory), made unless
        another process of the run made it; stale directories of this user are removed
        first. InputError when something else sits under its name."""
        root = default_cache_root() if root is None else Path(root)
        remove_stale(root)
        directory = root / f"{user_prefix()}{key}"
        return cls(directory, create_directory(directory))

    @classmethod
    def for_run(cls, store: "GraphStore", run_dir: Path,
                root: Path | None = None) -> "SharedArrays":
        """The shared arrays of a training run on ``store`` writing to ``run_dir``."""
        directory = shared_directory(store, run_dir, root)
        return cls.open(directory.name.removeprefix(user_prefix()), directory.parent)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Hold the directory's lock in the block (made again, by this process, if its owner
        removed it meanwhile)."""
        while True:
            try:
                fd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
            except FileNotFoundError:
                self.owner = create_directory(self.directory) or self.owner
                continue
            except OSError as err:  # ELOOP, ENOTDIR: a link or a file
                raise not_shared_arrays(self.directory, err.strerror or str(err)) from None
            try:
                check_private(self.directory, os.fstat(fd), "directory", not_shared_arrays)
                if lock_if_current(fd, self.directory):
                    yield
                    return
            finally:
                os.close(fd)

    def _ensure(self, name: str, write: Callable[[Path], None],
                after: Callable[[], None] | None = None) -> Path:
        """The path of file ``name``, written by ``write(temp path)`` under the lock unless
        it exists (``after`` then runs under the same lock)."""
        path = self.directory / name
        if os.path.lexists(path):
            return path
        with self._locked():
            if not os.path.lexists(path):
                remove_stale_temp_files(self.directory)
                with atomic_path(path) as tmp:
                    write(tmp)
                    os.chmod(tmp, 0o600)
                if after is not None:
                    after()
        return path

    def permutation(self, num_seeds: int, seed: int, epoch: int) -> np.ndarray:
        """Epoch ``epoch``'s order of ``num_seeds`` seed positions: [num_seeds] int64, a
        read-only map of the machine's file (written first if no process has)."""
        path = self._ensure(f"perm-{num_seeds}-{seed}-{epoch}.npy",
                            lambda tmp: write_permutation(tmp, num_seeds, seed, epoch),
                            lambda: self._drop_orders_before(num_seeds, seed, epoch - 1))
        return map_array(path, np.dtype(np.int64), (num_seeds,), not_shared_arrays)

    def _drop_orders_before(self, num_seeds: int, seed: int, epoch: int) -> None:
        """Remove the order files of ``num_seeds`` and ``seed`` of epochs before ``epoch``."""
        for entry in self.directory.iterdir():
            match = PERMUTATION_FILE.fullmatch(entry.name)
            if (match and int(match.group(1)) == num_seeds and int(match.group(2)) == seed
                    and int(match.group(3)) < epoch):
                entry.unlink(missing_ok=True)

    def seed_ids(self, ids: np.ndarray) -> np.ndarray:
        """``ids`` [S] int64 as a read-only map of the machine's copy (written first if no
        process has), so that the array each rank read can be freed."""
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        digest = hashlib.blake2b(ids.data, digest_size=8).hexdigest()
        path = self._ensure(f"seeds-{len(ids)}-{digest}.npy",
                            lambda tmp: write_array(tmp, ids))
        return map_array(path, np.dtype(np.int64), ids.shape, not_shared_arrays)

    def degree_files(self, store: "GraphStore") -> tuple[Path, Path]:
        """(out-degree, in-degree) files of ``store``, [N] float32 each (see
        :func:`map_degrees`), written first if no process has."""
        in_path = self._ensure(IN_DEGREE_FILE, lambda tmp: write_in_degrees(tmp, store))
        if store.symmetrized:
            return in_path, in_path
        return self._ensure(OUT_DEGREE_FILE, lambda tmp: write_out_degrees(tmp, store)), in_path

    def close(self) -> None:
        """The owner removes the directory (processes that map its files keep reading them
        until they unmap them); others leave it."""
        if not self.owner:
            return
        self.owner = False
        with contextlib.suppress(InputError), self._locked_if_present():
            shutil.rmtree(self.directory, ignore_errors=True)

    @contextlib.contextmanager
    def _locked_if_present(self) -> Iterator[None]:
        """The lock of the directory, when it still exists (nothing is made again)."""
        if not os.path.isdir(self.directory) or os.path.islink(self.directory):
            yield
            return
        with self._locked():
            yield

    def __enter__(self) -> "SharedArrays":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
