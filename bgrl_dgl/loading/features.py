"""Feature rows of sampled nodes: read from the store's memory-mapped matrix, optionally
through the machine's :class:`~bgrl_dgl.loading.feature_cache.FeatureCache` of hot rows.

Rows keep the store's dtype here (float16 stays float16 until it reaches a GPU, halving the
bytes to copy); the loader decides where they become float32, and whether the first layer
gets them as sparse rows (:func:`use_sparse_rows`).
"""
from __future__ import annotations

import mmap
from typing import Literal, Protocol

import numpy as np
import torch

SparseInput = Literal["auto", "on", "off"]
# Sparse input rows pay on features at least this wide with less than this share of
# non-zeros: the first layer's product then costs nnz x out instead of rows x F x out, and
# extracting the non-zeros costs the sampling worker one pass over the gathered rows.
SPARSE_MIN_DIM = 256
SPARSE_MAX_DENSITY = 0.1
# Rows read (evenly spaced, first and last included) to estimate the density.
DENSITY_SAMPLE_ROWS = 1024


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


def feature_density(features: np.ndarray, sample_rows: int = DENSITY_SAMPLE_ROWS) -> float:
    """The share of non-zero entries in up to ``sample_rows`` evenly spaced rows of
    ``features`` [N, F] (always the same rows for the same matrix); 1.0 when it is empty."""
    num_rows = features.shape[0]
    if num_rows == 0 or features.shape[1] == 0:
        return 1.0
    ids = np.unique(np.linspace(0, num_rows - 1, min(num_rows, sample_rows)).astype(np.int64))
    rows = read_rows(features, ids)
    return float(np.count_nonzero(rows)) / rows.size


def use_sparse_rows(mode: SparseInput, features: np.ndarray) -> bool:
    """Whether training hands the first layer sparse rows: ``on``/``off`` as said; ``auto``
    when ``features`` [N, F] is at least :data:`SPARSE_MIN_DIM` wide and its sampled
    density below :data:`SPARSE_MAX_DENSITY`."""
    if mode in ("on", "off"):
        return mode == "on"
    if mode != "auto":
        raise ValueError(f"sparse input must be auto, on or off, not {mode!r}")
    return (features.shape[1] >= SPARSE_MIN_DIM
            and feature_density(features) < SPARSE_MAX_DENSITY)
