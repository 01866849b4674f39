"""What a run reports while it trains: the metrics log, the progress bar and the collapse
watch. Each decides for itself when it has something to do."""
from __future__ import annotations

import math
import time
import warnings
from pathlib import Path
from typing import Any, Iterable, Iterator, TypeVar

from tqdm import tqdm

from bgrl_dgl.runs import append_jsonl

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

    def write(self, metrics: dict[str, Any], *, last_step: bool) -> bool:
        """Log ``metrics`` (which carry their ``step``) if due; returns whether it was."""
        due = metrics["step"] % self.every == 0 or last_step or "target_divergence" in metrics
        if due and self.enabled:
            append_jsonl(self.path, metrics)
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
