"""Feature rows of sampled nodes: read from the store's memory-mapped matrix, optionally
through the machine's :class:`~bgrl_dgl.loading.feature_cache.FeatureCache` of hot rows.

Rows keep the store's dtype here (float16 stays float16 until it reaches a GPU, halving the
bytes to copy); the loader decides where they become float32.
"""
from __future__ import annotations

import mmap
from typing import Protocol

import numpy as np
import torch


class RowCache(Protocol):
    """What a feature source needs of a cache (see feature_cache.FeatureCache)."""

    def gather(self, features: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, int]: ...


def read_rows(features: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Rows ``ids`` [n] of the (memory-mapped) feature matrix [N, F]: [n, F] in its dtype.

    Rows are read in ascending id order, which turns random reads of the mmap into a forward
    scan, then put back in the requested order.
    """
    order = np.argsort(ids, kind="stable")
    rows = np.empty((len(ids), features.shape[1]), dtype=features.dtype)
    rows[order] = features[ids[order]]
    return rows


def advise_random_reads(features: np.ndarray) -> None:
    """Make page faults on the memory-mapped ``features`` read only the page they need
    (``MADV_RANDOM``: no read-around); arrays that are not memory maps are left alone."""
    if isinstance(features.base, mmap.mmap):
        features.base.madvise(mmap.MADV_RANDOM)


class FeatureSource:
    """The feature rows of a store, read directly or through a cache of hot rows.

    Args:
        features: [N, F] feature matrix (usually the store's memmap).
        cache: the machine's cache of hot rows, or None.
    """

    def __init__(self, features: np.ndarray, cache: RowCache | None = None) -> None:
        self.features = features
        self.cache = cache
        if cache is not None:
            # The cache is meant for feature files larger than memory, whose uncached rows
            # are cold reads scattered over the file: read-around would fetch a whole window
            # (128 KiB to 8 MiB) around each, mostly bytes no batch asks for.
            advise_random_reads(features)

    def gather(self, nodes: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        """Rows of ``nodes`` [n] int: ([n, F] in the store's dtype, cache hits, cache misses)."""
        ids = nodes.numpy()
        if self.cache is None:
            return torch.from_numpy(read_rows(self.features, ids)), 0, 0
        rows, hits = self.cache.gather(self.features, ids)
        return torch.from_numpy(rows), hits, len(rows) - hits
