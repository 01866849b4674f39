"""Training metrics as TensorBoard scalars (``train --tensorboard DIR``), for watching a long
run live with ``tensorboard --logdir DIR``.

Every numeric value of a line of ``RUN/metrics.jsonl`` (which stays the record of the run)
becomes the scalar of the same name at that line's step. Only rank 0 writes. Needs the
``tensorboard`` package: ``pip install 'bgrl-dgl[tensorboard]'``.
"""
from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from bgrl_dgl.errors import InputError

INSTALL = "pip install 'bgrl-dgl[tensorboard]'"
FLUSH_SECONDS = 10


def check_tensorboard(log_dir: str | os.PathLike | None) -> None:
    """InputError when TensorBoard logging is asked for but cannot be written."""
    if log_dir is None:
        return
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except ImportError:
        raise InputError(None, f"--tensorboard needs the tensorboard package: {INSTALL}") from None
    if os.path.exists(log_dir) and not os.path.isdir(log_dir):
        raise InputError(log_dir, "exists and is not a directory")


class TensorBoardLog:
    """Writes metric dicts as scalars into event files under ``log_dir``."""

    def __init__(self, log_dir: str | os.PathLike) -> None:
        check_tensorboard(log_dir)
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(log_dir), flush_secs=FLUSH_SECONDS)

    def write(self, metrics: dict[str, Any]) -> None:
        """One scalar per numeric value of ``metrics`` at step ``metrics["step"]``."""
        step = int(metrics["step"])
        for key, value in metrics.items():
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        self.writer.close()


@contextmanager
def tensorboard_log(log_dir: str | os.PathLike | None,
                    enabled: bool = True) -> Iterator[TensorBoardLog | None]:
    """A :class:`TensorBoardLog` into ``log_dir`` for the block, closed after it; None when
    ``log_dir`` is None or not ``enabled`` (ranks other than 0)."""
    if log_dir is None or not enabled:
        yield None
        return
    log = TensorBoardLog(log_dir)
    try:
        yield log
    finally:
        log.close()
