"""Arrays of ``.npz`` archives read as streams, front to back, without loading them whole
(OGB's compressed ``data.npz`` members can be tens of GB)."""
from __future__ import annotations

import contextlib
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Iterator

import numpy as np

from bgrl_dgl.errors import InputError
from bgrl_dgl.sources import EdgeChunks
from bgrl_dgl.store.format import parse_npy_header


@dataclass(frozen=True)
class NpzMember:
    """One array of an ``.npz`` archive, read front to back without loading it whole.

    ``np.load`` decompresses a member entirely on access; OGB writes ``data.npz`` with
    ``np.savez_compressed``, and papers100M's ``node_feat`` alone is ~57 GB.
    """

    path: Path
    key: str
    shape: tuple[int, ...]
    dtype: np.dtype
    fortran_order: bool

    @classmethod
    def open(cls, path: Path, key: str) -> "NpzMember":
        """Read the ``.npy`` header of member ``key``; InputError if absent or unreadable."""
        with _member_stream(path, key) as stream:
            shape, fortran_order, dtype = _read_npy_header(stream, path, key)
        return cls(path, key, shape, dtype, fortran_order)

    def row_chunks(self, rows: int) -> Iterator[np.ndarray]:
        """C-ordered [n, ...] array -> consecutive [<=rows, ...] chunks (read-only)."""
        if self.fortran_order and len(self.shape) > 1:
            raise InputError(self.path, f"array {self.key!r} is Fortran-ordered; "
                                        f"re-save it in C order to read it row by row")
        row_values = int(np.prod(self.shape[1:], dtype=np.int64))
        with _member_stream(self.path, self.key) as stream:
            _read_npy_header(stream, self.path, self.key)
            for start in range(0, self.shape[0], rows):
                count = min(rows, self.shape[0] - start)
                values = self._read(stream, count * row_values)
                yield values.reshape((count, *self.shape[1:]))

    def pair_chunks(self, rows: int) -> EdgeChunks:
        """[2, E] array -> (row 0, row 1) chunks of <= rows columns each."""
        if len(self.shape) != 2 or self.shape[0] != 2:
            raise InputError(self.path, f"array {self.key!r} must have shape [2, E], "
                                        f"got {list(self.shape)}")
        num_pairs = self.shape[1]
        with _member_stream(self.path, self.key) as first, \
                _member_stream(self.path, self.key) as second:
            _read_npy_header(first, self.path, self.key)
            _read_npy_header(second, self.path, self.key)
            if not self.fortran_order:
                second.seek(second.tell() + num_pairs * self.dtype.itemsize)
            for start in range(0, num_pairs, rows):
                count = min(rows, num_pairs - start)
                if self.fortran_order:  # column-major [2, E]: pairs are interleaved
                    pairs = self._read(first, 2 * count).reshape(count, 2)
                    yield pairs[:, 0], pairs[:, 1]
                else:
                    yield self._read(first, count), self._read(second, count)

    def _read(self, stream: IO[bytes], count: int) -> np.ndarray:
        nbytes = count * self.dtype.itemsize
        data = _read_or_fail(stream, nbytes, self.path, self.key)
        if len(data) != nbytes:
            raise InputError(self.path, f"array {self.key!r} is truncated")
        values = np.frombuffer(data, dtype=self.dtype)
        return values.astype(self.dtype.newbyteorder("="), copy=False)


@contextlib.contextmanager
def _member_stream(path: Path, key: str) -> Iterator[IO[bytes]]:
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as err:
        raise InputError(path, f"not a readable .npz archive: {err}") from None
    with archive:
        try:
            stream = archive.open(f"{key}.npy")
        except KeyError:
            names = ", ".join(name.removesuffix(".npy") for name in archive.namelist())
            raise InputError(path, f"has no array {key!r} (arrays: {names})") from None
        with stream:
            yield stream


def _read_npy_header(stream: IO[bytes], path: Path, key: str
                     ) -> tuple[tuple[int, ...], bool, np.dtype]:
    try:
        shape, dtype, fortran_order = parse_npy_header(stream)
    except (ValueError, EOFError, zipfile.BadZipFile, zlib.error) as err:
        raise InputError(path, f"array {key!r} has no readable .npy header: {err}") from None
    if dtype.hasobject:
        raise InputError(path, f"array {key!r} holds Python objects, which are not loaded")
    return tuple(shape), fortran_order, dtype


def _read_or_fail(stream: IO[bytes], nbytes: int, path: Path, key: str) -> bytes:
    try:
        return stream.read(nbytes)
    except (zipfile.BadZipFile, zlib.error, EOFError) as err:
        raise InputError(path, f"array {key!r} is corrupt: {err}") from None

