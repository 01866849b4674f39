"""What a run reports while it trains: the metrics log, the progress bar and the collapse
watch. Each decides for itself when it has something to do."""
from __future__ import annotations

import math
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Iterable, Iterator, TextIO, TypeVar

from tqdm import tqdm

from bgrl_dgl.runs import append_jsonl
from bgrl_dgl.training.tensorboard import TensorBoardLog

T = TypeVar("T")


def timed(items: Iterable[T]) -> Iterator[tuple[T, float]]:
    """Each item with the seconds spent waiting for it (e.g. for a loader's next batch)."""
    iterator = iter(items)
    while True:
        start = time.perf_counter()
        try:
            item = next(iterator)
        except StopIteration:
            return
        yield item, time.perf_counter() - start


class MetricsLog:
    """Appends a step's metrics to ``metrics.jsonl`` every ``every`` steps, at the last step,
    and whenever they hold a check of the targets across ranks (rank 0 only).

    Args:
        path: the run's metrics file.
        every: steps between lines.
        enabled: whether this process writes (rank 0).
    """

    def __init__(self, path: Path, every: int, enabled: bool) -> None:
        self.path = path
        self.every = every
        self.enabled = enabled
        self.board: TensorBoardLog | None = None  # also writes there while set

    def write(self, metrics: dict[str, Any], *, last_step: bool) -> bool:
        """Log ``metrics`` (which carry their ``step``) if due; returns whether it was."""
        due = metrics["step"] % self.every == 0 or last_step or "target_divergence" in metrics
        if due and self.enabled:
            append_jsonl(self.path, metrics)
            if self.board is not None:
                self.board.write(metrics)
        return due


class ProgressBar:
    """The training progress bar (rank 0, on a terminal): loss, lr, tau and seeds/s."""

    def __init__(self, total: int, initial: int, enabled: bool) -> None:
        self._bar = tqdm(total=total, initial=initial, disable=None if enabled else True,
                         dynamic_ncols=True, desc="train")

    def update(self, metrics: dict[str, Any]) -> None:
        self._bar.update(1)
        self._bar.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{metrics['lr']:.2e}",
                              tau=f"{metrics['tau']:.4f}",
                              seeds_s=f"{metrics['seeds_per_s']:.0f}")

    def __enter__(self) -> "ProgressBar":
        return self

    def __exit__(self, *exc: Any) -> None:
        self._bar.close()


class CollapseWatch:
    """Warns once when the embedding std falls below ``ratio / sqrt(dim)``: the
    representation may be collapsing to a constant (BGRL's failure mode)."""

    def __init__(self, ratio: float, dim: int) -> None:
        self.threshold = ratio / math.sqrt(dim)
        self.warned = False

    def observe(self, std: float, step: int) -> None:
        if std < self.threshold and not self.warned:
            warnings.warn(f"embedding std {std:.2e} fell below {self.threshold:.2e} at step "
                          f"{step}: the representation may be collapsing", stacklevel=2)
            self.warned = True


def format_duration(seconds: float) -> str:
    """``seconds`` as ``42 s``, ``12.5 min`` or ``3.2 h``."""
    if seconds < 100:
        return f"{seconds:.0f} s"
    if seconds < 6000:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


class StepTimeEstimate:
    """Prints once, early in a run, the measured time per step and the expected duration of
    the run, so that a run too long for its graph can be stopped (and ``--steps`` or
    ``--batch-size`` changed) before it has cost much (rank 0 only).

    The first step of a run (or resumed run) is left out, as it includes the sampling
    workers' start-up; the estimate is the mean of the next ``window`` steps, printed after
    the last of them (or at the run's last step, if it comes first).

    Args:
        total_steps: the run's number of steps.
        first_step: the step the run starts from (0, or the checkpoint's step on resume).
        enabled: whether this process prints (rank 0).
        window: steps measured after the first.
        stream: where the line goes (standard error by default).
    """

    def __init__(self, total_steps: int, first_step: int, enabled: bool, window: int = 5,
                 stream: TextIO | None = None) -> None:
        self.total_steps = total_steps
        self.first_step = first_step
        self.enabled = enabled
        self.window = window
        self.stream = stream
        self._start: float | None = None
        self.printed = False

    def observe(self, step: int, now: float | None = None) -> str | None:
        """Record that ``step`` (1-based, the number of steps done) ended at ``now``; returns
        the line when it is printed."""
        now = time.perf_counter() if now is None else now
        if self.printed or step <= self.first_step:
            return None
        if self._start is None:  # the end of the first step starts the clock
            self._start = now
            return None
        measured = step - self.first_step - 1
        if measured < self.window and step < self.total_steps:
            return None
        per_step = (now - self._start) / measured
        line = (f"time per step {per_step:.2f} s (mean of steps {step - measured + 1}-{step}); "
                f"expected total for {self.total_steps} steps: "
                f"{format_duration(per_step * self.total_steps)}, "
                f"{format_duration(per_step * (self.total_steps - step))} to go")
        self.printed = True
        if self.enabled:
            tqdm.write(line, file=self.stream or sys.stderr)
        return line
