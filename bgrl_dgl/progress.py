"""Progress bars of the long commands (prepare, info --full, embed, evaluate).

Bars are tqdm bars on stderr. They show when stderr is a terminal, or when asked
(``--progress``); never with ``--no-progress`` or ``--json``, and never in a process of
rank other than 0 under ``torchrun`` (``RANK``). The command line sets the choice for the
duration of a command with :func:`progress_mode`; library code asks for a bar with
:func:`progress_bar`, which returns a disabled (silent, cheap) bar when bars are off.
"""
from __future__ import annotations

import argparse
import os
import sys
import weakref
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

from tqdm import tqdm

_requested: bool | None = None  # None: on a terminal only
_drawn: weakref.WeakSet[tqdm] = weakref.WeakSet()  # bars drawing now


@contextmanager
def progress_mode(enabled: bool | None) -> Iterator[None]:
    """Within the block, bars show if ``enabled`` (None: if stderr is a terminal). Bars left
    open by an error are closed at its end, so that an error line starts a line of its own."""
    global _requested
    previous, _requested = _requested, enabled
    try:
        yield
    finally:
        _requested = previous
        for bar in list(_drawn):
            bar.close()


def bars_enabled() -> bool:
    """Whether :func:`progress_bar` draws: rank 0 only, then as requested or on a terminal."""
    if os.environ.get("RANK", "0") != "0":
        return False
    if _requested is not None:
        return _requested
    return sys.stderr.isatty()


def bars_requested() -> bool:
    """Whether bars were asked for explicitly (--progress), not just allowed by a terminal."""
    return _requested is True and bars_enabled()


def progress_bar(iterable: Iterable[Any] | None = None, *, total: float | None = None,
                 desc: str, unit: str = "it", scale: bool = False, **kwargs: Any) -> tqdm:
    """A tqdm bar on stderr, disabled unless :func:`bars_enabled`; ``scale``: show counts
    as 12.3M and rates as 4.5M edges/s."""
    bar = tqdm(iterable, total=total, desc=desc, unit=unit, unit_scale=scale, file=sys.stderr,
               disable=not bars_enabled(), dynamic_ncols=True, mininterval=0.5, **kwargs)
    if not bar.disable:
        _drawn.add(bar)
    return bar


def add_progress_argument(parser: argparse.ArgumentParser) -> None:
    """The ``--progress/--no-progress`` option of a command that shows progress bars."""
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                        help="progress bars on stderr (default: only when it is a terminal; "
                             "never with --json)")
