"""Where the node tables of layer-wise inference live, and how a block of destinations reads
them (see :mod:`bgrl_dgl.embeddings.blockconv`).

Tables are [N, w] arrays, row = node id: memory-mapped files in a scratch directory (read
through the page cache), or, on a GPU with room for them, device tensors. A block is a range
(or an ascending array) of destination ids with all their in-edges: the column ids of its
edges are a slice of the CSC ``indices`` taken as they are (global ids, no relabelling), and
each sparse sum is one ``embedding_bag`` (a CSR-times-dense product with ones as values,
``per_sample_weights`` otherwise) against a whole table. On a GPU whose memory cannot hold
the tables, a block's source rows are gathered on the host into pinned memory and copied;
there the columns are relabelled on the GPU.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Union

import numpy as np
import torch
import torch.nn.functional as F

from bgrl_dgl.io import allocate_file
from bgrl_dgl.store.reader import count_out_degrees

Rows = Union[slice, np.ndarray]  # consecutive ids [lo, hi), or ascending int64 ids
SCRATCH_DTYPES = {"float32": torch.float32, "float16": torch.float16}


def host_tensor(array: np.ndarray) -> torch.Tensor:
    """``array`` as a CPU tensor sharing its memory (read-only memmaps included; nothing
    writes through them)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(array)


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``tensor`` on ``device``; from host memory through a pinned buffer (the caching host
    allocator reuses it once the asynchronous copy is done)."""
    if device.type != "cuda" or tensor.device == device:
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def allocate(path: Path, size: int) -> None:
    """Create the file ``path`` of ``size`` bytes with its blocks allocated (see
    :func:`bgrl_dgl.io.allocate_file`): writing through a memory map then costs no block
    allocation per page."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.ftruncate(fd, size)
        allocate_file(fd, path, size)
    finally:
        os.close(fd)


class GraphArrays:
    """The CSC arrays of a graph and the whole-graph degrees used for normalisation.

    ``in_degrees``/``out_degrees`` [N]: given ones, or None: the in-degrees are counted from
    ``indptr``, the out-degrees are equal to them when ``symmetric``, else counted once from
    ``indices`` when first needed.
    """

    def __init__(self, indptr: np.ndarray, indices: np.ndarray, in_degrees: np.ndarray | None,
                 out_degrees: np.ndarray | None, symmetric: bool) -> None:
        self.indptr, self.indices = indptr, indices
        self.num_nodes = indptr.shape[0] - 1
        self.given_in, self.given_out, self.symmetric = in_degrees, out_degrees, symmetric

    def in_edges(self, rows: Rows) -> tuple[np.ndarray, np.ndarray]:
        """(source ids of the in-edges of ``rows``, concatenated [E_b] in the dtype of
        ``indices`` (a view for a range), and the in-edge count of each row [B] int64)."""
        if isinstance(rows, slice):
            counts = np.diff(np.asarray(self.indptr[rows.start:rows.stop + 1], dtype=np.int64))
            first = int(self.indptr[rows.start])
            return self.indices[first:first + int(counts.sum())], counts
        starts = np.asarray(self.indptr[rows], dtype=np.int64)
        counts = np.asarray(self.indptr[rows + 1], dtype=np.int64) - starts
        offsets = np.zeros(rows.size + 1, dtype=np.int64)
        np.cumsum(counts, out=offsets[1:])
        positions = np.repeat(starts - offsets[:-1], counts) + np.arange(offsets[-1])
        return np.asarray(self.indices[positions]), counts

    def in_edge_counts(self, rows: Rows) -> np.ndarray:
        if isinstance(rows, slice):
            return np.diff(np.asarray(self.indptr[rows.start:rows.stop + 1], dtype=np.int64))
        return np.asarray(self.indptr[rows + 1], dtype=np.int64) - np.asarray(self.indptr[rows])

    def in_degree(self, rows: Rows) -> np.ndarray:
        """[B] float32 whole-graph in-degrees of ``rows``."""
        if self.given_in is not None:
            return np.asarray(self.given_in[rows], dtype=np.float32)
        return self.in_edge_counts(rows).astype(np.float32)

    def out_degree(self, rows: Rows) -> np.ndarray:
        """[B] float32 whole-graph out-degrees of ``rows``."""
        if self.given_out is None and not self.symmetric:
            self.given_out = count_out_degrees(self.indices, self.num_nodes).astype(np.float32)
        if self.given_out is None:
            return self.in_edge_counts(rows).astype(np.float32)
        return np.asarray(self.given_out[rows], dtype=np.float32)


class NodeTables:
    """The node tables of one layer: [N, w] tensors in ``dtype``, on ``device`` when
    ``resident``, else over memory-mapped files ``<stem>-<t>`` in ``directory``: new ones,
    or without ``create`` those another process created (ranks sharing the tables)."""

    def __init__(self, directory: Path, stem: str, num_nodes: int, widths: tuple[int, ...],
                 dtype: torch.dtype, device: torch.device, resident: bool,
                 create: bool = True) -> None:
        self.device, self.resident, self.files = device, resident, []
        self.arrays: list[torch.Tensor] = []
        numpy_dtype = np.float16 if dtype == torch.float16 else np.float32
        for t, width in enumerate(widths):
            if resident:
                self.arrays.append(torch.empty((num_nodes, width), dtype=dtype, device=device))
                continue
            path = directory / f"{stem}-{t}.{np.dtype(numpy_dtype).name}"
            self.files.append(path)
            if create:
                allocate(path, num_nodes * width * np.dtype(numpy_dtype).itemsize)
            self.arrays.append(torch.from_numpy(np.memmap(path, dtype=numpy_dtype, mode="r+",
                                                          shape=(num_nodes, width))))

    def write(self, rows: Rows, values: list[torch.Tensor]) -> None:
        """Rows ``rows`` of every table from ``values`` [B, w_t] (any device)."""
        for table, value in zip(self.arrays, values):
            value = value.to(table.device)
            if isinstance(rows, slice):
                table[rows].copy_(value)
            else:
                table.index_copy_(0, torch.from_numpy(rows).to(table.device), value.to(table.dtype))

    def delete(self, unlink: bool = True) -> None:
        """Drop the tables; ``unlink``: remove their files too (their creator does)."""
        self.arrays.clear()
        for path in self.files if unlink else ():
            path.unlink(missing_ok=True)


class Block:
    """Destinations ``rows`` with all their in-edges on ``device``, reading ``tables`` and
    the layer's kept ``inputs`` [N, in] (see :class:`bgrl_dgl.embeddings.blockconv.BlockView`)."""

    def __init__(self, graph: GraphArrays, rows: Rows, tables: NodeTables,
                 device: torch.device, inputs: np.ndarray | None = None) -> None:
        self.rows, self.tables, self.device, self.inputs = rows, tables, device, inputs
        columns, counts = graph.in_edges(rows)
        if columns.dtype not in (np.int32, np.int64):
            columns = columns.astype(np.int64)
        self.counts = torch.from_numpy(counts)
        offsets = np.zeros(counts.size, dtype=columns.dtype)
        np.cumsum(counts[:-1], out=offsets[1:])
        self.offsets = to_device(torch.from_numpy(offsets), device)
        self.columns = to_device(host_tensor(columns), device)
        self.edge_count = to_device(self.counts.float(), device)
        self.in_degree = to_device(torch.from_numpy(graph.in_degree(rows)), device)
        self.gathered: dict[int, torch.Tensor] = {}
        self.gather = device.type == "cuda" and not tables.resident
        if self.gather:  # relabel the columns to the block's distinct sources
            self.sources, self.columns = torch.unique(self.columns, return_inverse=True)
            self.sources = self.sources.cpu()
            self.offsets = self.offsets.long()

    @property
    def dst_index(self) -> torch.Tensor:
        destinations = torch.arange(self.counts.numel(), device=self.device)
        return torch.repeat_interleave(destinations, self.counts.to(self.device),
                                       output_size=int(self.columns.numel()))

    def _table(self, t: int) -> torch.Tensor:
        """Table ``t`` as the block's columns index it: whole, or its gathered rows."""
        if not self.gather:
            return self.tables.arrays[t]
        if t not in self.gathered:
            table = self.tables.arrays[t]
            rows = torch.empty((self.sources.numel(), table.shape[1]), dtype=table.dtype,
                               pin_memory=True)
            torch.index_select(table, 0, self.sources, out=rows)
            self.gathered[t] = rows.to(self.device, non_blocking=True)
        return self.gathered[t]

    def own(self, t: int) -> torch.Tensor:
        table = self.tables.arrays[t]
        if isinstance(self.rows, slice):
            rows = table[self.rows]
        else:
            rows = table.index_select(0, torch.from_numpy(self.rows).to(table.device))
        return to_device(rows, self.device).float()

    def own_input(self) -> torch.Tensor:
        if self.inputs is None:
            raise ValueError("this layer's input is not kept")
        return to_device(host_tensor(np.asarray(self.inputs[self.rows])), self.device).float()

    def neighbour_sum(self, t: int, weights: torch.Tensor | None = None) -> torch.Tensor:
        table = self._table(t)
        if self.columns.numel() == 0:  # no in-edges (and maybe no gathered rows)
            return torch.zeros((self.counts.numel(), table.shape[1]), device=self.device)
        if weights is not None:
            weights = weights.to(table.dtype)
        return F.embedding_bag(self.columns, table, self.offsets, mode="sum",
                               per_sample_weights=weights).float()

    def per_edge(self, t: int) -> torch.Tensor:
        return self._table(t).index_select(0, self.columns).float()
