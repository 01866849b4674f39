"""Rows computed in order, written as consecutive files by a background thread.

The layer-wise pass hands over the rows of its last layer block by block; a thread cuts them
into the row groups of consecutive parts and writes them (Parquet encoding, compression and
the final fsync run while the next blocks are computed). At most ``depth`` blocks wait in
between. A part is committed (renamed into place) once its last row is written; on error
of the producer, the rows it handed over are still written, then the unfinished part is
discarded; parts complete before are kept. An error of the writer is raised, as it is, by
the producer's next call.
"""
from __future__ import annotations

import queue
import threading
from typing import Callable, Protocol

import numpy as np


class PartFile(Protocol):
    """One part being written: row groups in order, then commit (or abort)."""

    def write_group(self, start: int, rows: np.ndarray) -> None:
        """Rows ``[start, start + len(rows))`` of the part, as one row group."""

    def commit(self) -> None: ...

    def abort(self) -> None: ...


_DONE = object()


class StreamedParts:
    """A :class:`bgrl_dgl.embeddings.layerwise.RowSink` over parts of ``sizes`` rows, in row
    groups of ``group_rows`` from each part's start, opened by ``open_part(k)`` (k-th size)."""

    def __init__(self, sizes: list[int], group_rows: int, open_part: Callable[[int], PartFile],
                 depth: int = 2) -> None:
        self.sizes, self.group_rows, self.open_part = sizes, group_rows, open_part
        self.received = 0
        self.error: BaseException | None = None
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self.thread = threading.Thread(target=self._consume, name="part-writer", daemon=True)

    def __enter__(self) -> "StreamedParts":
        self.thread.start()
        return self

    def __exit__(self, kind: type | None, value: BaseException | None, traceback: object) -> None:
        self.queue.put(_DONE)
        self.thread.join()
        if kind is None:
            self._raise_error()
            if self.received != sum(self.sizes):
                raise RuntimeError(f"got {self.received} rows for parts of {sum(self.sizes)}")

    def write(self, start: int, rows: np.ndarray) -> None:
        """Rows ``[start, start + len(rows))``: ``start`` must follow the previous rows."""
        self._raise_error()
        if start != self.received:
            raise ValueError(f"rows must come in order: expected row {self.received}, got {start}")
        self.received += rows.shape[0]
        self.queue.put(rows)

    def _raise_error(self) -> None:
        """The writer's error, as it is (a full disk stays an OSError naming its file)."""
        if self.error is not None:
            raise self.error

    def _consume(self) -> None:
        part, offset, pending, pending_rows = None, 0, [], 0
        index = 0
        try:
            while (rows := self.queue.get()) is not _DONE:
                while rows.shape[0]:
                    if part is None:
                        part, offset = self.open_part(index), 0
                    take = min(rows.shape[0], self.sizes[index] - offset - pending_rows,
                               self.group_rows - pending_rows)
                    pending.append(rows[:take])
                    pending_rows += take
                    rows = rows[take:]
                    part_done = offset + pending_rows == self.sizes[index]
                    if pending_rows == self.group_rows or part_done:
                        part.write_group(offset, pending[0] if len(pending) == 1
                                         else np.concatenate(pending))
                        offset, pending, pending_rows = offset + pending_rows, [], 0
                    if offset == self.sizes[index]:
                        part.commit()
                        part, index = None, index + 1
        except BaseException as err:  # handed to the producer, which raises on its next write
            self.error = err
            while self.queue.get() is not _DONE:
                pass
        finally:
            if part is not None:  # unfinished
                part.abort()
