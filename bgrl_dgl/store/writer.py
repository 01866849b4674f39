"""Writing a graph store: :class:`StoreWriter` collects a source's arrays and commits them.

Everything is written into a temp directory ``.tmp-<pid>@<host>@OUT`` next to ``OUT`` (same
file system; see io.py) and renamed to ``OUT`` only by :meth:`StoreWriter.commit`, after full
validation. A failure or a kill at any point leaves at most such a temp directory, which a
later writer deletes once that process is gone.
"""
from __future__ import annotations

import json
import os
import shutil
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Literal

import numpy as np

from bgrl_dgl.errors import InputError
from bgrl_dgl.io import remove_stale_temp_files, temp_path, write_atomic
from bgrl_dgl.progress import progress_bar
from bgrl_dgl.store.capacity import (
    ROW_CHUNK_SHARE,
    StorePlan,
    check_capacity,
    format_bytes,
    free_disk,
)
from bgrl_dgl.store.csc import EdgeChunks, build_csc
from bgrl_dgl.store.format import (
    FORMAT_VERSION,
    INT32_LIMIT,
    MAX_CLASSES,
    META_FILE,
    SPLIT_NAME,
    NpyWriter,
    save_array,
    split_array_name,
)
from bgrl_dgl.store.reader import GraphStore
from bgrl_dgl.store.validation import VALIDATED_KEY, fingerprint, meta_text

FEATURE_DTYPE_CHOICES = {"keep": None, "float16": np.dtype(np.float16),
                         "float32": np.dtype(np.float32)}
SELF_LOOP_FLAG = {"keep": "kept", "remove": "removed", "add": "added"}


def output_path(out: str | os.PathLike) -> Path:
    """``out`` made absolute (``.`` and ``..`` resolved, symlinks kept), so that its name and
    parent are real; InputError for a path without a name such as ``/``."""
    path = Path(os.path.abspath(out))
    if not path.name:
        raise InputError(out, "is not a path a store can be written to")
    return path


def check_target(out: Path, overwrite: bool) -> None:
    """Refuse an existing ``out`` unless ``overwrite``, and never replace a non-store."""
    if not (out.exists() or out.is_symlink()):
        return
    if not overwrite:
        raise InputError(out, "already exists; pass --overwrite to replace it")
    if not out.is_dir() or out.is_symlink() or not ((out / META_FILE).is_file()
                                                    or not any(out.iterdir())):
        raise InputError(out, "exists and is not a graph store; refusing to replace it")


def stored_feature_dtype(given: np.dtype, requested: np.dtype | None, source_path: str) -> np.dtype:
    """float16 and float32 are kept unless another dtype is requested; others become float32."""
    if given.kind not in "fiub":
        raise InputError(source_path, f"features must be numeric, got {given}")
    if requested is not None:
        return requested
    return given if given in (np.float16, np.float32) else np.dtype(np.float32)


def converted_features(block: np.ndarray, dtype: np.dtype, first_row: int,
                       source_path: str) -> np.ndarray:
    """``block`` [r, F] as ``dtype``; InputError for NaN, inf, or overflow of float16."""
    if block.dtype.kind == "f":
        _check_finite(block, first_row, source_path, "non-finite feature value")
    with np.errstate(over="ignore"):  # overflow to inf is reported just below
        out = block.astype(dtype, copy=False)
    if dtype == np.float16 and block.dtype != np.float16 and block.dtype.kind != "b":
        _check_finite(out, first_row, source_path, "feature value too large for float16")
    return out


def _finite_mask(block: np.ndarray) -> np.ndarray:
    """Elementwise finiteness; for float16 from the exponent bits (np.isfinite on float16
    converts every value and is several times slower than the feature copy itself)."""
    if block.dtype == np.float16:
        return (block.view(np.uint16) & 0x7C00) != 0x7C00
    return np.isfinite(block)


def _check_finite(block: np.ndarray, first_row: int, source_path: str, problem: str) -> None:
    finite = _finite_mask(block)
    if not finite.all():
        row = first_row + int(np.flatnonzero(~finite.all(axis=1))[0])
        raise InputError(source_path, f"{problem} in row {row}")


def dense_labels(labels: np.ndarray, source_path: str) -> tuple[np.ndarray, np.ndarray]:
    """(labels with class ids 0..C-1, [C] the given id of each class), -1 kept as -1."""
    labelled = labels >= 0
    class_ids = np.unique(labels[labelled])
    if len(class_ids) > MAX_CLASSES:
        raise InputError(source_path, f"{len(class_ids):,} distinct classes, more than the "
                         f"{MAX_CLASSES:,} supported")
    if np.array_equal(class_ids, np.arange(len(class_ids))):
        return labels, class_ids
    dense = np.full_like(labels, -1)
    dense[labelled] = np.searchsorted(class_ids, labels[labelled])
    return dense, class_ids


def integer_ids(ids: Any, what: str, source_path: str) -> np.ndarray:
    """``ids`` as a 1-D integer array; InputError naming ``source_path`` otherwise."""
    ids = np.asarray(ids)
    if ids.dtype.kind not in "iu":
        raise InputError(source_path, f"{what} must be integers, got {ids.dtype}")
    if ids.ndim != 1:
        raise InputError(source_path, f"{what} must be 1-D, got shape {ids.shape}")
    return ids


class StoreWriter:
    """Builds a store at ``out``: use as a context manager, write the arrays, then commit.

    An exception inside ``with`` (or leaving it without :meth:`commit`) deletes the temp
    directory. An existing ``out`` is refused up front unless ``overwrite``; with
    ``overwrite`` it is replaced only by a successful commit.
    """

    def __init__(self, out: str | os.PathLike, *, overwrite: bool = False,
                 memory_budget: int = 4 << 30, feature_dtype: str = "keep",
                 source: dict | None = None) -> None:
        if feature_dtype not in FEATURE_DTYPE_CHOICES:
            choices = ", ".join(FEATURE_DTYPE_CHOICES)
            raise InputError(None, f"feature dtype must be one of {choices}, got {feature_dtype!r}")
        if memory_budget <= 0:
            raise InputError(None, f"memory budget must be positive, got {memory_budget}")
        self.out = output_path(out)
        self.overwrite = overwrite
        self.memory_budget = int(memory_budget)
        self.feature_dtype = FEATURE_DTYPE_CHOICES[feature_dtype]
        self.source = source or {"name": None, "params": {}}
        check_target(self.out, overwrite)
        blocker = next((p for p in self.out.parents if p.exists() or p.is_symlink()), None)
        if blocker is not None and not blocker.is_dir():
            raise InputError(blocker, "Not a directory (the store would go below it)")
        try:
            self.out.parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise InputError(err.filename or self.out.parent,
                             f"cannot create the store's directory: {err.strerror}") from None
        remove_stale_temp_files(self.out.parent)
        self.tmp = temp_path(self.out)
        shutil.rmtree(self.tmp, ignore_errors=True)  # an earlier attempt of this process
        try:
            self.tmp.mkdir()  # (mkdir applies the umask, as the final directory should)
        except OSError as err:
            raise InputError(self.out.parent, f"cannot write here: {err.strerror}") from None
        self._arrays: dict[str, dict[str, Any]] = {}
        self._num_nodes: int | None = None
        self._topology: dict[str, Any] | None = None
        self._num_classes = 0
        self._splits: list[str] = []
        self._node_types: dict[str, list[int]] = {}
        self._committed = False

    def __enter__(self) -> "StoreWriter":
        return self

    def __exit__(self, exc_type, exc, traceback) -> Literal[False]:
        self.abort()
        return False

    def abort(self) -> None:
        """Delete the temp directory unless committed."""
        if not self._committed:
            shutil.rmtree(self.tmp, ignore_errors=True)

    # ---- sizes -----------------------------------------------------------------------
    def stored_dtype(self, given: np.dtype, source_path: str) -> np.dtype:
        """The dtype features given as ``given`` are stored in."""
        return stored_feature_dtype(np.dtype(given), self.feature_dtype, source_path)

    def plan(self, plan: StorePlan) -> None:
        """Refuse (InputError) a store that the output's disk or the free memory cannot
        hold; sources call this before reading or generating the graph."""
        check_capacity(plan, self.tmp.parent, self.memory_budget)

    def rows_per_chunk(self, row_bytes: int) -> int:
        """Rows of ``row_bytes`` bytes each that one input chunk may hold within the budget."""
        return max(1, self.memory_budget // ROW_CHUNK_SHARE // max(1, int(row_bytes)))

    def _set_num_nodes(self, count: int, what: str, source_path: str) -> None:
        if self._num_nodes is None:
            self._num_nodes = count
        elif count != self._num_nodes:
            raise InputError(source_path, f"{count} {what} given for a graph of "
                             f"{self._num_nodes} nodes")

    # ---- topology --------------------------------------------------------------------
    def write_topology(self, num_nodes: int, edge_chunks: EdgeChunks, *, source_path: str,
                       symmetrize: bool, self_loops: Literal["keep", "remove", "add"],
                       dedup: bool, int32_limit: int = INT32_LIMIT) -> None:
        """Build indptr.npy and indices.npy (CSC) from a stream of (src, dst) id chunks.

        ``edge_chunks()`` returns a fresh iterator of pairs of [k] integer arrays with ids
        in [0, num_nodes). ``int32_limit`` (normally 2**31) is the count from which the
        index dtype becomes int64.
        """
        if self._topology is not None:
            raise RuntimeError("the topology was already written")
        if self_loops not in SELF_LOOP_FLAG:
            raise InputError(None, f"self-loops must be keep, remove or add, got {self_loops!r}")
        if not isinstance(num_nodes, (int, np.integer)) or isinstance(num_nodes, bool) \
                or num_nodes < 0:
            raise InputError(source_path, f"bad node count {num_nodes!r}")
        self._set_num_nodes(int(num_nodes), "nodes", source_path)
        # Whatever the source planned: the node-sized part alone must fit.
        check_capacity(StorePlan(int(num_nodes), 0, 0, 0, what=source_path), self.tmp.parent,
                       self.memory_budget)
        built = build_csc(edge_chunks, int(num_nodes), self.tmp, source_path=source_path,
                          symmetrize=symmetrize, self_loops=self_loops, dedup=dedup,
                          memory_budget=self.memory_budget, int32_limit=int32_limit)
        self._arrays.update(built.arrays)
        self._topology = {
            "num_edges": built.num_edges,
            "index_dtype": built.index_dtype.name,
            "flags": {"symmetrized": bool(symmetrize), "self_loops": SELF_LOOP_FLAG[self_loops],
                      "deduplicated": bool(dedup)},
        }

    # ---- node arrays -----------------------------------------------------------------
    def write_features(self, num_rows: int, chunks: Iterable[np.ndarray], *,
                       source_path: str) -> None:
        """Stream feature rows into features.npy: row chunks in order, each [r, F].

        Floats, ints and bools are accepted; stored as float16 or float32 (see
        ``feature_dtype``). NaN, inf and a wrong total row count are InputErrors.
        """
        if "features" in self._arrays:
            raise RuntimeError("the features were already written")
        self._set_num_nodes(num_rows, "feature rows", source_path)
        writer: NpyWriter | None = None
        with progress_bar(total=num_rows, desc="write features", unit="rows",
                          scale=True) as bar:
            for chunk in chunks:
                block = np.asarray(chunk)
                if block.ndim != 2:
                    raise InputError(source_path, f"feature rows must form a 2-D array, got shape "
                                     f"{block.shape}")
                if writer is None:
                    writer = self._feature_writer(block, source_path)
                elif block.shape[1] != writer.row_shape[0]:
                    raise InputError(source_path, f"feature rows have {block.shape[1]} columns "
                                     f"after {writer.row_shape[0]} before")
                if writer.rows + len(block) > num_rows:
                    raise InputError(source_path, f"more than {num_rows} feature rows")
                writer.append(converted_features(block, writer.dtype, writer.rows, source_path))
                bar.update(len(block))
        if writer is None:
            raise InputError(source_path, "no feature rows were given")
        if writer.rows != num_rows:
            raise InputError(source_path, f"{writer.rows} feature rows, expected {num_rows}")
        self._arrays["features"] = writer.close()

    def _feature_writer(self, first: np.ndarray, source_path: str) -> NpyWriter:
        if first.shape[1] == 0:
            raise InputError(source_path, "feature rows have no columns")
        dtype = stored_feature_dtype(first.dtype, self.feature_dtype, source_path)
        needed = int(self._num_nodes or 0) * first.shape[1] * dtype.itemsize
        free = free_disk(self.tmp)
        if needed > free:
            raise InputError(source_path, f"the features need {format_bytes(needed)} of disk, "
                             f"but {self.out.parent} has {format_bytes(free)} free")
        return NpyWriter(self.tmp / "features.npy", dtype, (first.shape[1],))

    def write_feature_array(self, array: np.ndarray, *, source_path: str) -> None:
        """:meth:`write_features` for a whole [N, F] array (e.g. a memmap), in row chunks."""
        if np.ndim(array) != 2:
            raise InputError(source_path,
                             f"features must be a 2-D array, got shape {np.shape(array)}")
        row_bytes = array.shape[1] * max(array.dtype.itemsize, 4)
        rows = self.rows_per_chunk(row_bytes)
        self.write_features(len(array), (array[start:start + rows]
                                         for start in range(0, len(array), rows)),
                            source_path=source_path)

    def write_labels(self, labels: np.ndarray, *, source_path: str,
                     num_classes: int | None = None) -> np.ndarray:
        """[N] integer class ids, -1 for unlabeled; returns the labels as stored.

        With ``num_classes`` the ids must lie in [0, num_classes). Without it, ids that are
        not exactly 0..C-1 (a sparse set such as {3, 10**9}) are relabelled 0..C-1 in
        ascending order, and the source's id of each class is kept in class_ids.npy.
        """
        labels = integer_ids(labels, "labels", source_path)
        self._set_num_nodes(len(labels), "labels", source_path)
        low = int(labels.min()) if len(labels) else -1
        high = int(labels.max()) if len(labels) else -1
        if low < -1:
            raise InputError(source_path, f"label {low} is below -1 (the mark for unlabeled nodes)")
        labels = labels.astype(np.int64)
        if num_classes is None:
            labels, class_ids = dense_labels(labels, source_path)
            num_classes = len(class_ids)
            if not np.array_equal(class_ids, np.arange(num_classes)):
                self._arrays["class_ids"] = save_array(self.tmp, "class_ids", class_ids)
        elif high >= num_classes:
            raise InputError(source_path, f"label {high} is out of range for {num_classes} classes")
        if num_classes > MAX_CLASSES:
            raise InputError(source_path, f"{num_classes:,} classes, more than the "
                             f"{MAX_CLASSES:,} supported")
        self._num_classes = int(num_classes)
        self._arrays["labels"] = save_array(self.tmp, "labels", labels)
        return labels

    def write_split(self, name: str, ids: np.ndarray, *, source_path: str) -> None:
        """[k] node ids of split ``name`` (train, valid, test, ...)."""
        if not SPLIT_NAME.fullmatch(name):
            raise InputError(source_path,
                             f"bad split name {name!r} (letters, digits, _ and - only)")
        if name in self._splits:
            raise InputError(source_path, f"split {name!r} given twice")
        ids = integer_ids(ids, f"split {name!r} ids", source_path)
        if len(ids):
            low, high = int(ids.min()), int(ids.max())
            limit = self._num_nodes
            if low < 0 or (limit is not None and high >= limit):
                bad = low if low < 0 else high
                raise InputError(source_path, f"split {name!r} holds node id {bad}, outside "
                                 f"[0, {limit if limit is not None else 'num_nodes'})")
        self._arrays[split_array_name(name)] = save_array(self.tmp, split_array_name(name),
                                                          ids.astype(np.int64))
        self._splits.append(name)

    def write_orig_ids(self, ids: np.ndarray, *, source_path: str) -> None:
        """[N] each node's id in the source's own numbering."""
        ids = integer_ids(ids, "original node ids", source_path)
        self._set_num_nodes(len(ids), "original node ids", source_path)
        self._arrays["orig_ids"] = save_array(self.tmp, "orig_ids", ids.astype(np.int64))

    def set_node_types(self, ranges: dict[str, tuple[int, int]]) -> None:
        """Node type name -> [start, end) id range (checked at commit)."""
        self._node_types = {str(name): [int(start), int(end)]
                            for name, (start, end) in ranges.items()}

    # ---- commit ----------------------------------------------------------------------
    def meta(self) -> dict[str, Any]:
        """meta.json for what has been written so far."""
        if self._topology is None:
            raise InputError(self.out, "the source wrote no edges")
        if "features" not in self._arrays:
            raise InputError(self.out, "the source wrote no node features")
        features = self._arrays["features"]
        meta: dict[str, Any] = {
            "format_version": FORMAT_VERSION,
            "num_nodes": self._num_nodes,
            "num_edges": self._topology["num_edges"],
            "index_dtype": self._topology["index_dtype"],
            "feat_dim": features["shape"][1],
            "feat_dtype": features["dtype"],
            "num_classes": self._num_classes,
            "flags": self._topology["flags"],
            "splits": list(self._splits),
        }
        if self._node_types:
            meta["node_types"] = self._node_types
        meta["source"] = json.loads(json.dumps(self.source, default=str))
        meta["created"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        meta["arrays"] = self._arrays
        return meta

    def commit(self) -> Path:
        """Validate everything written, then atomically move it to ``out``; returns ``out``."""
        if self._committed:
            raise RuntimeError("already committed")
        meta = self.meta()
        meta_path = self.tmp / META_FILE
        meta_path.write_text(meta_text(meta), encoding="utf-8")
        try:
            GraphStore.open(self.tmp, check="full")
        except InputError as err:
            # Name the file as it would have been in the output, not in the doomed temp dir.
            path = None if err.path is None else err.path.replace(str(self.tmp), str(self.out), 1)
            raise InputError(path, err.problem) from None
        # Record the full validation, so that commands sampling from the store skip it.
        meta[VALIDATED_KEY] = fingerprint(self.tmp, meta)
        write_atomic(meta_path, meta_text(meta))
        self._install()
        self._committed = True
        return self.out

    def _install(self) -> None:
        """Rename the temp dir to ``out``, replacing an old store only once the new one is in."""
        check_target(self.out, self.overwrite)
        if not self.out.exists():
            os.rename(self.tmp, self.out)
            return
        aside = self.tmp.with_name(self.tmp.name + "-old")
        os.rename(self.out, aside)
        try:
            os.rename(self.tmp, self.out)
        except BaseException:
            os.rename(aside, self.out)
            raise
        shutil.rmtree(aside, ignore_errors=True)
