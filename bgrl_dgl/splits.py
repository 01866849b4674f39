"""Random train/valid/test node splits, stratified by class."""
from __future__ import annotations

import argparse
import math

import numpy as np

SPLIT_NAMES = ("train", "valid", "test")
# The BGRL paper evaluates on random 10% / 10% / 80% node splits.
DEFAULT_FRACTIONS = (0.1, 0.1, 0.8)


def parse_fractions(text: str) -> tuple[float, float, float]:
    """``"0.1/0.1/0.8"`` -> ``(0.1, 0.1, 0.8)``: three non-negative fractions summing to 1.

    Raises ``argparse.ArgumentTypeError`` otherwise, so argparse reports a bad ``--split``.
    """
    parts = text.split("/")
    if len(parts) != 3:
        raise argparse.ArgumentTypeError(
            f"expected TRAIN/VALID/TEST fractions such as 0.1/0.1/0.8, got {text!r}")
    try:
        fractions = tuple(float(part) for part in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"split fractions must be numbers, got {text!r}") from None
    if not all(math.isfinite(f) and f >= 0 for f in fractions):
        raise argparse.ArgumentTypeError(f"split fractions must be non-negative, got {text!r}")
    if abs(sum(fractions) - 1.0) > 1e-6:
        raise argparse.ArgumentTypeError(
            f"split fractions must sum to 1, got {text!r} (sum {sum(fractions):g})")
    return fractions  # type: ignore[return-value]


def stratified_split(labels: np.ndarray, fractions: tuple[float, float, float],
                     seed: int) -> dict[str, np.ndarray]:
    """Split the labelled nodes of every class by ``fractions``.

    ``labels``: [N] integer class ids, negative = unlabelled (such nodes are in no split).
    Each class's node ids are shuffled with ``numpy.random.default_rng(seed)`` (classes in
    ascending order, so the result depends only on labels, fractions and seed) and cut at
    the rounded cumulative fractions. Returns ``{"train", "valid", "test"}`` -> sorted int64
    node ids.
    """
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    cuts = np.cumsum(fractions)
    # One stable sort groups every class's node ids (ascending) without a pass per class.
    by_class = np.argsort(labels, kind="stable")
    classes, starts = np.unique(labels[by_class], return_index=True)
    ends = np.append(starts[1:], labels.size)
    parts: dict[str, list[np.ndarray]] = {name: [] for name in SPLIT_NAMES}
    for cls, start, end in zip(classes, starts, ends):
        if cls < 0:
            continue
        members = rng.permutation(by_class[start:end])
        bounds = np.rint(cuts * members.size).astype(np.int64)
        bounds[-1] = members.size
        for name, lo, hi in zip(SPLIT_NAMES, [0, *bounds[:-1]], bounds):
            parts[name].append(members[lo:hi])
    return {name: np.sort(np.concatenate(chunks)).astype(np.int64) if chunks
            else np.empty(0, np.int64)
            for name, chunks in parts.items()}
