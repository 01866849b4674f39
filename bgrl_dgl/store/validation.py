"""Full validation of a store, streamed in bounded slices, and the record that it was done.

:func:`validate_full` reads every index, label and split id. It is what ``info --full``
runs, what ``prepare`` runs before committing, and what any command that samples from a
store runs first unless meta.json holds a matching record of an earlier full validation.

The record (meta.json key ``validated``) is a fingerprint: a digest of the rest of meta.json
and, per array file, its size, mtime, ctime and inode. Editing, replacing or copying a file
changes it, so such a store is validated again before use.
"""
from __future__ import annotations

import hashlib
import json
import os
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np

from bgrl_dgl.errors import InputError
from bgrl_dgl.io import remove_stale_temp_files, temp_prefix
from bgrl_dgl.progress import bars_requested, progress_bar
from bgrl_dgl.store.format import SCAN_CHUNK

if TYPE_CHECKING:
    from bgrl_dgl.store.reader import GraphStore

VALIDATED_KEY = "validated"
# Stores with more entries than this show a progress bar while they are validated.
PROGRESS_ENTRIES = 1 << 26


def scan(length: int, chunk: int = SCAN_CHUNK) -> Iterator[tuple[int, int]]:
    """[start, stop) slices covering range(length) in pieces of ``chunk``."""
    for start in range(0, length, chunk):
        yield start, min(start + chunk, length)


# ---- the record ------------------------------------------------------------------------
def meta_digest(meta: dict[str, Any]) -> str:
    """sha256 of meta.json's content without the validation record."""
    body = {key: value for key, value in meta.items() if key != VALIDATED_KEY}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode("utf-8")).hexdigest()


def file_stamp(path: Path) -> list[int]:
    """[size, mtime_ns, ctime_ns, inode]: changes whenever the file is written or replaced."""
    info = os.stat(path)
    return [info.st_size, info.st_mtime_ns, info.st_ctime_ns, info.st_ino]


def fingerprint(path: Path, meta: dict[str, Any]) -> dict[str, Any]:
    """The validation record of the store at ``path`` described by ``meta``."""
    files = sorted(spec["file"] for spec in meta["arrays"].values())
    return {"level": "full", "meta_sha256": meta_digest(meta),
            "files": {name: file_stamp(path / name) for name in files}}


def stamps_or_none(path: Path, meta: dict[str, Any]) -> dict[str, Any] | None:
    """:func:`fingerprint`, or None when a file cannot be stamped or meta is malformed."""
    try:
        return fingerprint(path, meta)
    except (OSError, KeyError, TypeError, AttributeError):
        return None


def is_validated(path: Path, meta: dict[str, Any]) -> bool:
    """Whether ``meta`` records a full validation of exactly the files now at ``path``."""
    record = meta.get(VALIDATED_KEY)
    return isinstance(record, dict) and record == stamps_or_none(path, meta)


def meta_text(meta: dict[str, Any]) -> str:
    return json.dumps(meta, indent=1) + "\n"


def record_validation(path: Path, meta: dict[str, Any], meta_stamp: list[int],
                      record: dict[str, Any]) -> bool:
    """Add ``record`` (the fingerprint of the files just validated) to ``path/meta.json``;
    True if it was written.

    Best effort: only a meta.json this user owns and that is still the one read
    (``meta_stamp``) is replaced, atomically and with its permissions; a read-only store is
    simply validated again next time.
    """
    meta_path = path / "meta.json"
    scratch = path / f"{temp_prefix()}{uuid.uuid4().hex[:8]}-meta.json"
    try:
        info = os.stat(meta_path)
        if info.st_uid != os.geteuid() or file_stamp(meta_path) != meta_stamp:
            return False
        remove_stale_temp_files(path)  # such a scratch file of a killed process
        with open(scratch, "x", encoding="utf-8") as handle:
            handle.write(meta_text({**meta, VALIDATED_KEY: record}))
        os.chmod(scratch, info.st_mode & 0o777)
        if file_stamp(meta_path) != meta_stamp:
            return False
        os.replace(scratch, meta_path)
        return True
    except OSError:
        return False
    finally:
        try:
            scratch.unlink()
        except OSError:
            pass


# ---- the checks --------------------------------------------------------------------------
class _Progress:
    """A progress bar over the entries scanned (:mod:`bgrl_dgl.progress`: on a terminal or
    with --progress), for big stores, or any store when --progress asks for bars."""

    def __init__(self, store: "GraphStore") -> None:
        total = store.num_nodes + store.num_edges
        self.bar = None
        if total >= PROGRESS_ENTRIES or bars_requested():
            self.bar = progress_bar(total=total, desc=f"validating {store.path}",
                                    unit=" entries", scale=True, leave=False)

    def update(self, count: int) -> None:
        if self.bar is not None:
            self.bar.update(count)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def validate_full(store: "GraphStore") -> None:
    """Stream through the arrays: indptr is non-decreasing, indices lie in [0, N) and ascend
    within each node (strictly when deduplicated), labels lie in [-1, num_classes), split
    ids in [0, N). InputError naming the file at the first violation."""
    progress = _Progress(store)
    try:
        check_indptr_monotone(store, progress)
        check_indices(store, progress)
        check_labels(store)
        for name in store.split_names:
            check_node_ids(store, name)
    finally:
        progress.close()


def check_indptr_monotone(store: "GraphStore", progress: _Progress) -> None:
    for start, stop in scan(store.num_nodes):
        steps = np.diff(store.indptr[start:stop + 1])
        bad = np.flatnonzero(steps < 0)
        if bad.size:
            raise InputError(store.array_path("indptr"), f"not monotone at node {start + bad[0]}")
        progress.update(stop - start)


def check_indices(store: "GraphStore", progress: _Progress) -> None:
    """indices in [0, N), ascending within each node, no repeats when deduplicated."""
    file, num_nodes = store.array_path("indices"), store.num_nodes
    for v0, v1 in store.node_slices():
        offsets = np.asarray(store.indptr[v0:v1 + 1], dtype=np.int64)
        base = offsets[0]
        part = np.asarray(store.indices[base:offsets[-1]])
        if part.size == 0:
            continue
        if part.min() < 0 or part.max() >= num_nodes:
            position = base + np.flatnonzero((part < 0) | (part >= num_nodes))[0]
            raise InputError(file, f"entry {position} is {store.indices[position]}, "
                             f"outside [0, {num_nodes})")
        starts = offsets[:-1] - base
        same_node = np.ones(part.size, dtype=bool)
        same_node[starts[starts < part.size]] = False  # first edge of each node
        steps = np.diff(part)
        bad = (steps <= 0) if store.deduplicated else (steps < 0)
        bad &= same_node[1:]
        if bad.any():
            position = base + 1 + int(np.flatnonzero(bad)[0])
            node = int(np.searchsorted(offsets, position, side="right")) - 1 + v0
            repeated = store.deduplicated and steps[position - base - 1] == 0
            problem = "repeated" if repeated else "not sorted"
            raise InputError(file, f"in-neighbours of node {node} are {problem} "
                             f"(entry {position})")
        progress.update(part.size)


def check_labels(store: "GraphStore") -> None:
    if store.labels is None:
        return
    for start, stop in scan(store.num_nodes):
        part = store.labels[start:stop]
        bad = np.flatnonzero((part < -1) | (part >= store.num_classes))
        if bad.size:
            raise InputError(store.array_path("labels"),
                             f"label {part[bad[0]]} of node {start + bad[0]} is outside "
                             f"[-1, {store.num_classes})")


def check_node_ids(store: "GraphStore", split: str) -> None:
    ids = store.split(split)
    for start, stop in scan(len(ids)):
        part = ids[start:stop]
        bad = np.flatnonzero((part < 0) | (part >= store.num_nodes))
        if bad.size:
            raise InputError(store.array_path(f"split_{split}"), f"entry {start + bad[0]} is "
                             f"node id {part[bad[0]]}, outside [0, {store.num_nodes})")
