"""The store's file format: layout constants, ``.npy`` headers, and the array writers.

See reader.py for the layout of a store directory. Arrays are plain ``.npy`` files, written
as streams (:class:`NpyWriter`: a fixed-size header, then rows appended) so that arrays
larger than memory never need to be held whole.
"""
from __future__ import annotations

import json
import os
import re
import stat
import struct
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from bgrl_dgl.errors import InputError

FORMAT_VERSION = 1


META_FILE = "meta.json"


INT32_LIMIT = 2**31


INDEX_DTYPES = ("int32", "int64")


FEATURE_DTYPES = ("float16", "float32")


SELF_LOOP_FLAGS = ("removed", "added", "kept")


SPLIT_NAME = re.compile(r"[A-Za-z0-9_\-]+")


REQUIRED_ARRAYS = ("indptr", "indices", "features")


OPTIONAL_ARRAYS = ("labels", "orig_ids", "class_ids")


# meta.json describes a few dozen arrays; anything far bigger is not one.
MAX_META_BYTES = 1 << 24


# At most this many classes: a probe's weights and one-hot targets are [.., num_classes].
MAX_CLASSES = 1 << 20


# Elements per slice when a check or statistic streams through a whole array.
SCAN_CHUNK = 1 << 22


# Bytes reserved for the header of a .npy file written before its length is known.
NPY_HEADER_BYTES = 128


def split_array_name(name: str) -> str:
    return f"split_{name}"


def regular_file(path: str | os.PathLike, what: str = "file") -> Path:
    """``path`` if it names a regular file (after symlinks); InputError otherwise.

    Checked before opening, so a FIFO or a device in place of a file is refused instead of
    blocking the reader or streaming forever.
    """
    path = Path(path)
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise InputError(path, "file not found") from None
    except OSError as err:
        raise InputError(path, f"cannot read: {err.strerror or err}") from None
    if stat.S_ISDIR(mode):
        raise InputError(path, f"is a directory, expected a {what}")
    if not stat.S_ISREG(mode):
        raise InputError(path, f"is not a regular file (expected a {what})")
    return path


def npy_header(dtype: np.dtype, shape: tuple[int, ...]) -> bytes:
    """A version 1.0 .npy header of exactly NPY_HEADER_BYTES bytes for a C-order array."""
    text = repr({"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)),
                 "fortran_order": False, "shape": tuple(int(n) for n in shape)})
    body = NPY_HEADER_BYTES - 10
    if len(text) + 1 > body:
        raise ValueError(f"shape {shape} does not fit a {NPY_HEADER_BYTES}-byte header")
    return (np.lib.format.MAGIC_PREFIX + bytes([1, 0]) + struct.pack("<H", body)
            + (text.ljust(body - 1) + "\n").encode("latin1"))


class NpyWriter:
    """Streams rows into a .npy file whose length is known only when it is closed.

    The header slot is reserved up front and filled in by :meth:`close`, so rows go to disk
    in order without ever holding the whole array.
    """

    def __init__(self, path: Path, dtype: np.dtype | str, row_shape: tuple[int, ...] = ()) -> None:
        self.path = Path(path)
        self.dtype = np.dtype(dtype)
        self.row_shape = tuple(row_shape)
        self.rows = 0
        self._file = open(self.path, "wb")
        self._file.write(b"\0" * NPY_HEADER_BYTES)

    def append(self, rows: np.ndarray) -> None:
        """Append ``rows``: [r, *row_shape], converted to the file's dtype."""
        block = np.ascontiguousarray(rows, dtype=self.dtype)
        if block.shape[1:] != self.row_shape:
            raise ValueError(f"rows of shape {block.shape[1:]} appended to {self.path}, "
                             f"expected {self.row_shape}")
        self._file.write(memoryview(block.reshape(-1)).cast("B"))
        self.rows += block.shape[0]

    def close(self) -> dict[str, Any]:
        """Write the header; return the file's entry for the ``arrays`` table of meta.json."""
        shape = (self.rows, *self.row_shape)
        self._file.seek(0)
        self._file.write(npy_header(self.dtype, shape))
        self._file.close()
        return array_entry(self.path, shape, self.dtype)


def array_entry(path: Path, shape: tuple[int, ...], dtype: np.dtype) -> dict[str, Any]:
    """The meta.json description of the .npy file at ``path``."""
    return {"file": Path(path).name, "shape": [int(n) for n in shape],
            "dtype": np.dtype(dtype).name, "bytes": os.path.getsize(path)}


def save_array(directory: Path, name: str, array: np.ndarray) -> dict[str, Any]:
    """np.save ``array`` as ``<name>.npy`` in ``directory``; return its meta.json entry."""
    path = Path(directory) / f"{name}.npy"
    np.save(path, np.ascontiguousarray(array), allow_pickle=False)
    return array_entry(path, array.shape, array.dtype)


def parse_npy_header(stream: BinaryIO) -> tuple[tuple[int, ...], np.dtype, bool]:
    """(shape, dtype, fortran_order) of the .npy header at the stream's position (versions
    1.0 and 2.0), leaving the stream at the data. Raises ValueError/EOFError when there is
    no valid header."""
    version = np.lib.format.read_magic(stream)
    readers = {(1, 0): np.lib.format.read_array_header_1_0,
               (2, 0): np.lib.format.read_array_header_2_0}
    if version not in readers:
        raise ValueError(f"unsupported .npy version {version}")
    shape, fortran, dtype = readers[version](stream)
    return tuple(shape), dtype, fortran


def read_npy_header(file: Path) -> tuple[tuple[int, ...], np.dtype, bool, int]:
    """(shape, dtype, fortran_order, data offset) from the header of a .npy file."""
    if not (os.path.exists(file) or os.path.islink(file)):
        raise InputError(file, "missing")
    regular_file(file, ".npy file")
    try:
        with open(file, "rb") as handle:
            shape, dtype, fortran = parse_npy_header(handle)
            return shape, dtype, fortran, handle.tell()
    except FileNotFoundError:
        raise InputError(file, "missing") from None
    except (ValueError, OSError, EOFError) as err:
        raise InputError(file, f"not a valid .npy file ({err})") from None


def read_meta(path: Path) -> dict[str, Any]:
    """Parse ``path/meta.json`` and check its format version."""
    meta_path = path / META_FILE
    if not path.is_dir():
        raise InputError(path, "no such store directory")
    if not (meta_path.exists() or meta_path.is_symlink()):
        raise InputError(meta_path, "not found (not a graph store)")
    size = regular_file(meta_path, "meta.json file").stat().st_size
    if size > MAX_META_BYTES:
        raise InputError(meta_path, f"has {size:,} bytes, more than a store's meta.json holds "
                         f"(at most {MAX_META_BYTES:,})")
    try:
        text = meta_path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(meta_path, "not found (not a graph store)") from None
    except (OSError, UnicodeDecodeError) as err:
        raise InputError(meta_path, f"unreadable ({err})") from None
    try:
        meta = json.loads(text)
    except json.JSONDecodeError as err:
        raise InputError(meta_path, f"not valid JSON ({err})") from None
    if not isinstance(meta, dict):
        raise InputError(meta_path, "expected a JSON object")
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise InputError(meta_path, f"unknown format version {version}")
    return meta


def _meta_value(meta: dict, key: str, kind: type | tuple[type, ...], where: Path) -> Any:
    if key not in meta:
        raise InputError(where, f"missing key {key!r}")
    value = meta[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise InputError(where, f"{key!r} has the wrong type ({type(value).__name__})")
    return value


def _meta_count(meta: dict, key: str, where: Path) -> int:
    value = _meta_value(meta, key, int, where)
    if value < 0:
        raise InputError(where, f"{key!r} is negative")
    return value


def _meta_choice(meta: dict, key: str, choices: tuple[str, ...], where: Path) -> str:
    value = _meta_value(meta, key, str, where)
    if value not in choices:
        raise InputError(where, f"{key!r} must be one of {', '.join(choices)}, got {value!r}")
    return value

