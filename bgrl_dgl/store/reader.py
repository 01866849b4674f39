"""The on-disk graph store: a directory of plain ``.npy`` files described by ``meta.json``.

Layout (format version 1)::

    meta.json          counts, dtypes, flags, split names, node types, source, array table
    indptr.npy         [N + 1] int32/int64   CSC offsets: in-neighbours of node v are
    indices.npy        [E]     int32/int64   indices[indptr[v]:indptr[v + 1]], ascending
    features.npy       [N, F]  float16/float32, row-major
    labels.npy         [N]     int64, -1 = unlabeled               (optional)
    split_<name>.npy   [k]     int64 node ids                      (one per split)
    orig_ids.npy       [N]     int64 ids in the source's numbering (optional)
    class_ids.npy      [C]     int64 the source's id of each class (optional: written when
                               the source's class ids were not 0..C-1 and were relabelled)

indptr and indices share one index dtype: int32 unless N or E reaches 2**31. Every array is
opened with ``mmap_mode='r'``, so opening a store costs a few page reads whatever its size,
unless it must first be validated in full (see :mod:`bgrl_dgl.store.validation`).
"""
from __future__ import annotations

import os
import warnings
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Literal

import numpy as np

from bgrl_dgl.errors import InputError
from bgrl_dgl.store.format import (
    FEATURE_DTYPES,
    INDEX_DTYPES,
    INT32_LIMIT,
    MAX_CLASSES,
    META_FILE,
    REQUIRED_ARRAYS,
    SCAN_CHUNK,
    SELF_LOOP_FLAGS,
    SPLIT_NAME,
    _meta_choice,
    _meta_count,
    _meta_value,
    read_meta,
    read_npy_header,
    regular_file,
    split_array_name,
)
from bgrl_dgl.store.validation import (
    VALIDATED_KEY,
    file_stamp,
    is_validated,
    record_validation,
    scan,
    stamps_or_none,
    validate_full,
)

if TYPE_CHECKING:
    import dgl


CHECK_LEVELS = ("none", "cheap", "once", "full")


def _stamp_or_none(path: Path) -> list[int] | None:
    try:
        return file_stamp(path)
    except OSError:
        return None


class GraphStore:
    """A graph store opened over memory maps (see the module docstring for the layout)."""

    def __init__(self, path: Path, meta: dict[str, Any]) -> None:
        self.path = path
        self.meta = meta
        self.meta_path = path / META_FILE
        self._read_counts()
        self._arrays = {name: self._open_array(name, spec) for name, spec in self._specs().items()}
        self.indptr: np.ndarray = self._arrays["indptr"]
        self.indices: np.ndarray = self._arrays["indices"]
        self.features: np.ndarray = self._arrays["features"]
        self.labels: np.ndarray | None = self._arrays.get("labels")
        self.orig_ids: np.ndarray | None = self._arrays.get("orig_ids")
        self.class_ids: np.ndarray | None = self._arrays.get("class_ids")

    @classmethod
    def open(cls, path: str | os.PathLike,
             check: Literal["none", "cheap", "once", "full"] = "once") -> "GraphStore":
        """Open the store at ``path``; ``check`` picks how much of it to validate.

        "cheap" reads headers and a few elements (milliseconds at any size); "full" also
        streams through every index and label (see :meth:`validate`); "once" (for anything
        that samples from the store) is "cheap" when meta.json records a full validation of
        the files as they are now, else "full", and then records it when it may.
        """
        if check not in CHECK_LEVELS:
            raise ValueError(f"unknown check level {check!r}")
        path = Path(path)
        # Stamped before it is read: a meta.json replaced in between is then left alone.
        meta_stamp = _stamp_or_none(path / META_FILE)
        meta = read_meta(path)
        # The files are stamped before and after they are mapped: only files that stayed the
        # same meanwhile can be trusted on a record, or recorded.
        before = stamps_or_none(path, meta)
        store = cls(path, meta)
        if check == "none":
            return store
        stable = before is not None and before == stamps_or_none(path, meta)
        trusted = stable and meta.get(VALIDATED_KEY) == before
        full = check == "full" or (check == "once" and not trusted)
        store.validate(full=full)
        if full and check == "once" and stable and meta_stamp is not None:
            record_validation(path, meta, meta_stamp, before)
        return store

    def is_validated(self) -> bool:
        """Whether meta.json records a full validation of the files as they are now."""
        return is_validated(self.path, self.meta)

    # ---- meta.json --------------------------------------------------------------------
    def _read_counts(self) -> None:
        meta, where = self.meta, self.meta_path
        self.num_nodes: int = _meta_count(meta, "num_nodes", where)
        self.num_edges: int = _meta_count(meta, "num_edges", where)
        self.feat_dim: int = _meta_count(meta, "feat_dim", where)
        self.num_classes: int = _meta_count(meta, "num_classes", where)
        self.index_dtype = np.dtype(_meta_choice(meta, "index_dtype", INDEX_DTYPES, where))
        self.feat_dtype = np.dtype(_meta_choice(meta, "feat_dtype", FEATURE_DTYPES, where))
        flags = _meta_value(meta, "flags", dict, where)
        self.symmetrized: bool = _meta_value(flags, "symmetrized", bool, where)
        self.self_loops: str = _meta_choice(flags, "self_loops", SELF_LOOP_FLAGS, where)
        self.deduplicated: bool = _meta_value(flags, "deduplicated", bool, where)
        names = _meta_value(meta, "splits", list, where)
        if not all(isinstance(n, str) and SPLIT_NAME.fullmatch(n) for n in names):
            raise InputError(where, f"bad split names {names}")
        self._split_names: list[str] = list(names)
        types = _meta_value(meta, "node_types", dict, where) if "node_types" in meta else {}
        self.node_types: dict[str, tuple[int, int]] = self._read_node_types(types)

    def _read_node_types(self, types: dict) -> dict[str, tuple[int, int]]:
        ranges = {}
        for name, bounds in types.items():
            if (not isinstance(bounds, list) or len(bounds) != 2
                    or not all(isinstance(b, int) and not isinstance(b, bool) for b in bounds)
                    or not 0 <= bounds[0] <= bounds[1] <= self.num_nodes):
                raise InputError(self.meta_path, f"node type {name!r} has a bad range {bounds}; "
                                 f"expected [start, end] within [0, {self.num_nodes}]")
            ranges[name] = (bounds[0], bounds[1])
        ordered = sorted(ranges.values())
        for (_, end), (start, _) in zip(ordered, ordered[1:]):
            if start < end:
                raise InputError(self.meta_path, "node type ranges overlap")
        return ranges

    def _expected_arrays(self) -> dict[str, tuple[tuple[int, ...] | None, np.dtype]]:
        """Array name -> (shape, dtype) implied by the counts; shape None = any 1-D length."""
        n, index = self.num_nodes, self.index_dtype
        expected: dict[str, tuple[tuple[int, ...] | None, np.dtype]] = {
            "indptr": ((n + 1,), index),
            "indices": ((self.num_edges,), index),
            "features": ((n, self.feat_dim), self.feat_dtype),
            "labels": ((n,), np.dtype(np.int64)),
            "orig_ids": ((n,), np.dtype(np.int64)),
            "class_ids": ((self.num_classes,), np.dtype(np.int64)),
        }
        for name in self._split_names:
            expected[split_array_name(name)] = (None, np.dtype(np.int64))
        return expected

    def _specs(self) -> dict[str, dict[str, Any]]:
        """The ``arrays`` table of meta.json, checked against the counts."""
        arrays = _meta_value(self.meta, "arrays", dict, self.meta_path)
        expected = self._expected_arrays()
        required = [*REQUIRED_ARRAYS, *map(split_array_name, self._split_names)]
        for name in required:
            if name not in arrays:
                raise InputError(self.meta_path, f"arrays table lacks {name!r}")
        for name, spec in arrays.items():
            if name not in expected:
                raise InputError(self.meta_path, f"unknown array {name!r}")
            self._check_spec(name, spec, *expected[name])
        return arrays

    def _check_spec(self, name: str, spec: Any, shape: tuple[int, ...] | None,
                    dtype: np.dtype) -> None:
        where = self.meta_path
        if not isinstance(spec, dict):
            raise InputError(where, f"arrays.{name} must be an object")
        file = _meta_value(spec, "file", str, where)
        if Path(file).name != file or not file.endswith(".npy"):
            raise InputError(where, f"arrays.{name}.file must be a .npy file name, got {file!r}")
        spec_shape = tuple(_meta_value(spec, "shape", list, where))
        _meta_count(spec, "bytes", where)
        if _meta_value(spec, "dtype", str, where) != dtype.name:
            raise InputError(where, f"arrays.{name} has dtype {spec['dtype']}, "
                             f"expected {dtype.name}")
        if shape is None and len(spec_shape) != 1 or shape is not None and spec_shape != shape:
            wanted = "a 1-D shape" if shape is None else list(shape)
            raise InputError(where, f"arrays.{name} has shape {list(spec_shape)}, "
                             f"expected {wanted}")

    # ---- arrays ----------------------------------------------------------------------
    def _open_array(self, name: str, spec: dict[str, Any]) -> np.ndarray:
        """Memory-map one array after checking its file against its meta.json entry."""
        file = self.path / spec["file"]
        shape, dtype, fortran, offset = read_npy_header(file)
        if dtype.name != spec["dtype"] or list(shape) != spec["shape"] or fortran:
            order = " in Fortran order" if fortran else ""
            raise InputError(file, f"holds {dtype.name} {list(shape)}{order}, but meta.json "
                             f"says {spec['dtype']} {spec['shape']}")
        found = os.path.getsize(file)
        needed = offset + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        for expected in (spec["bytes"], needed):
            if found < expected:
                raise InputError(file, f"truncated (expected {expected} bytes, found {found})")
            if found != expected:
                raise InputError(file, f"has {found} bytes, expected {expected}")
        try:
            return np.load(file, mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError, EOFError) as err:
            raise InputError(file, f"not a valid .npy file ({err})") from None

    def array_path(self, name: str) -> Path:
        return self.path / self.meta["arrays"][name]["file"]

    @property
    def split_names(self) -> list[str]:
        return list(self._split_names)

    def split(self, name: str) -> np.ndarray:
        """[k] int64 node ids of split ``name`` (a read-only memmap)."""
        if name not in self._split_names:
            available = ", ".join(self._split_names) or "none"
            raise InputError(self.path, f"no split named {name!r} (available: {available})")
        return self._arrays[split_array_name(name)]

    @cached_property
    def graph(self) -> "dgl.DGLGraph":
        """The topology as a DGL graph over the memory maps: CSC only, nothing copied."""
        import dgl
        import torch

        with warnings.catch_warnings():
            # The maps are read-only; DGL and the samplers never write through them.
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            indptr = torch.from_numpy(self.indptr)
            indices = torch.from_numpy(self.indices)
        return dgl.graph(("csc", (indptr, indices, [])), num_nodes=self.num_nodes)

    def in_degrees(self) -> np.ndarray:
        """[N] int64 in-degree of every node."""
        return np.diff(self.indptr).astype(np.int64, copy=False)

    def out_degrees(self, chunk_edges: int = 1 << 26) -> np.ndarray:
        """[N] int64 out-degree of every node: the in-degrees when the store is symmetrised,
        else counted over ``indices`` in chunks of ``chunk_edges``."""
        if self.symmetrized:
            return self.in_degrees()
        return count_out_degrees(self.indices, self.num_nodes, chunk_edges)

    # ---- validation ------------------------------------------------------------------
    def validate(self, full: bool) -> None:
        """Raise InputError naming the offending file on any inconsistency.

        Always: counts, dtypes and shapes agree between meta.json and the file headers,
        file sizes match, indptr[0] == 0 and indptr[-1] == num_edges. With ``full``, also
        streams through the arrays in bounded slices: indptr is non-decreasing, indices lie
        in [0, N) and ascend within each node (strictly when deduplicated), labels lie in
        [-1, num_classes), split ids in [0, N).
        """
        self._check_cheap()
        if full:
            validate_full(self)

    def _check_cheap(self) -> None:
        if self.index_dtype == np.int32 and max(self.num_nodes, self.num_edges) >= INT32_LIMIT:
            raise InputError(self.meta_path, "int32 indices cannot address "
                             f"{self.num_nodes} nodes and {self.num_edges} edges")
        if self.labels is None and self.num_classes:
            raise InputError(self.meta_path,
                             f"num_classes is {self.num_classes} but there are no labels")
        if self.num_classes > MAX_CLASSES:
            raise InputError(self.meta_path, f"num_classes is {self.num_classes}, more than "
                             f"the {MAX_CLASSES:,} supported")
        first, last = int(self.indptr[0]), int(self.indptr[-1])
        if first != 0:
            raise InputError(self.array_path("indptr"), f"starts at {first}, expected 0")
        if last != self.num_edges:
            raise InputError(self.array_path("indptr"),
                             f"ends at {last}, expected num_edges = {self.num_edges}")

    def node_slices(self, max_edges: int = SCAN_CHUNK) -> Iterator[tuple[int, int]]:
        """[v0, v1) node ranges whose in-edges number about ``max_edges`` (at least one node)."""
        v0 = 0
        while v0 < self.num_nodes:
            target = int(self.indptr[v0]) + max_edges
            v1 = int(np.searchsorted(self.indptr, target, side="right")) - 1
            v1 = min(max(v1, v0 + 1), self.num_nodes)
            yield v0, v1
            v0 = v1

    # ---- description -----------------------------------------------------------------
    def in_degree_stats(self) -> dict[str, float]:
        """{min, mean, max} in-degree, streamed through indptr in slices."""
        if self.num_nodes == 0:
            return {"min": 0, "mean": 0.0, "max": 0}
        low, high = None, None
        for start, stop in scan(self.num_nodes):
            steps = np.diff(self.indptr[start:stop + 1])
            low = steps.min() if low is None else min(low, steps.min())
            high = steps.max() if high is None else max(high, steps.max())
        return {"min": int(low), "mean": self.num_edges / self.num_nodes, "max": int(high)}

    def store_bytes(self) -> int:
        """Bytes on disk: every array file plus meta.json."""
        return self.meta_path.stat().st_size + sum(
            spec["bytes"] for spec in self.meta["arrays"].values())

    def summary(self) -> dict[str, Any]:
        """A JSON-ready description of the store (what ``bgrl-dgl info`` prints)."""
        summary: dict[str, Any] = {
            "path": str(self.path),
            "num_nodes": self.num_nodes,
            "num_edges": self.num_edges,
            "feat_dim": self.feat_dim,
            "feat_dtype": self.feat_dtype.name,
            "num_classes": self.num_classes,
            "has_labels": self.labels is not None,
            "splits": {name: len(self.split(name)) for name in self._split_names},
            "symmetrized": self.symmetrized,
            "self_loops": self.self_loops,
            "deduplicated": self.deduplicated,
            "index_dtype": self.index_dtype.name,
            "in_degree": self.in_degree_stats(),
            "store_bytes": self.store_bytes(),
            "validated": self.is_validated(),
        }
        if self.node_types:
            summary["node_types"] = {name: list(r) for name, r in self.node_types.items()}
        source = self.meta.get("source")
        if isinstance(source, dict) and source.get("name"):
            summary["source"] = source["name"]
        if "created" in self.meta:
            summary["created"] = self.meta["created"]
        return summary


def read_node_ids(path: str | os.PathLike, num_nodes: int, what: str = "node ids") -> np.ndarray:
    """Distinct store indices [M] int64, ascending, from a .npy file of integer ids.

    ``what`` names the ids in errors; an unreadable file, a non-integer or non-1-D array, no
    ids or an id outside [0, num_nodes) is an InputError naming the file.
    """
    path = Path(path)
    try:
        regular_file(path, f"{what} file")
    except InputError as err:
        raise InputError(path, f"cannot read {what} ({err.problem})") from None
    try:
        # Mapped, not read: the header's shape is checked against the file's size first.
        ids = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError) as err:
        raise InputError(path, f"cannot read {what} ({err})") from None
    if not isinstance(ids, np.ndarray):
        raise InputError(path, f"{what} must be a .npy array")
    if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
        raise InputError(path, f"{what} must be a 1-D integer array, got {ids.dtype} {ids.shape}")
    ids = np.unique(ids.astype(np.int64))
    if ids.size == 0:
        raise InputError(path, f"holds no {what}")
    if ids[0] < 0 or ids[-1] >= num_nodes:
        raise InputError(path, f"{what} must be store indices in [0, {num_nodes})")
    return ids


def count_out_degrees(indices: np.ndarray, num_nodes: int,
                      chunk_edges: int = 1 << 26) -> np.ndarray:
    """[num_nodes] int64: how often each node is a source in the CSC ``indices`` [E] (a
    memmap is read in chunks of ``chunk_edges``)."""
    counts = np.zeros(num_nodes, dtype=np.int64)
    for start in range(0, len(indices), chunk_edges):
        counts += np.bincount(indices[start:start + chunk_edges], minlength=num_nodes)
    return counts
