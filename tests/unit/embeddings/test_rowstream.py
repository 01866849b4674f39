"""Rows streamed into consecutive parts by a writer thread: row groups aligned to each part's
start, parts committed in order, errors handed back, unfinished parts discarded."""
from __future__ import annotations

import numpy as np
import pytest

from bgrl_dgl.embeddings.rowstream import StreamedParts


class FakePart:
    def __init__(self, index: int, log: list, fail_on_group: int | None = None) -> None:
        self.index, self.log, self.fail_on_group = index, log, fail_on_group
        self.groups: list[tuple[int, list[float]]] = []

    def write_group(self, start: int, rows: np.ndarray) -> None:
        if len(self.groups) == self.fail_on_group:
            raise OSError("disk full")
        self.groups.append((start, rows[:, 0].tolist()))

    def commit(self) -> None:
        self.log.append(("commit", self.index, self.groups))

    def abort(self) -> None:
        self.log.append(("abort", self.index, self.groups))


def rows(start: int, end: int) -> np.ndarray:
    return np.arange(start, end, dtype=np.float32)[:, None].repeat(3, axis=1)


def test_rows_are_cut_into_row_groups_of_consecutive_parts():
    log: list = []
    with StreamedParts([5, 3], 2, lambda k: FakePart(k, log), depth=1) as parts:
        for start, end in [(0, 3), (3, 4), (4, 8)]:
            parts.write(start, rows(start, end))
    assert log == [
        ("commit", 0, [(0, [0, 1]), (2, [2, 3]), (4, [4])]),
        ("commit", 1, [(0, [5, 6]), (2, [7])]),
    ]


def test_rows_must_come_in_order_and_complete():
    log: list = []
    with pytest.raises(ValueError, match="in order"):
        with StreamedParts([4], 4, lambda k: FakePart(k, log)) as parts:
            parts.write(0, rows(0, 2))
            parts.write(3, rows(3, 4))
    assert log == [("abort", 0, [])]
    with pytest.raises(RuntimeError, match="got 2 rows"):
        with StreamedParts([4], 4, lambda k: FakePart(k, [])) as parts:
            parts.write(0, rows(0, 2))


def test_a_failing_write_reaches_the_producer_and_keeps_committed_parts():
    log: list = []
    opened = {0: FakePart(0, log), 1: FakePart(1, log, fail_on_group=1)}
    with pytest.raises(OSError):  # the writer's own error
        with StreamedParts([2, 4], 2, opened.__getitem__) as parts:
            for start in range(0, 6):
                parts.write(start, rows(start, start + 1))
    assert log == [("commit", 0, [(0, [0, 1])]), ("abort", 1, [(0, [2, 3])])]


def test_an_error_of_the_producer_discards_the_unfinished_part():
    log: list = []
    with pytest.raises(KeyError):
        with StreamedParts([2, 2], 2, lambda k: FakePart(k, log)) as parts:
            parts.write(0, rows(0, 3))
            raise KeyError("layer failed")
    # The rows handed over before the failure complete part 0; part 1 is discarded.
    assert log == [("commit", 0, [(0, [0, 1])]), ("abort", 1, [])]
