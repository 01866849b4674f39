"""Sparse input rows: a wide, mostly-zero feature block as its non-zeros, and the linear map
that multiplies only those.

A first layer fed ``[N, F]`` binary bag-of-words rows with ~1% non-zeros spends almost all of
its time multiplying zeros. :class:`SparseRows` holds the rows in CSR form (plus the same
entries ordered by column, for the weight gradient), and :func:`sparse_linear` computes
``x @ W`` with ``embedding_bag`` (a sum of the weight rows of each row's non-zeros, weighted by
their values) in the forward and ``x^T @ grad`` the same way in the backward: both cost
``nnz x out`` multiply-adds instead of ``N x F x out``.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


class SparseRows:
    """Rows ``[num_rows, num_cols]`` of a sparse matrix by their non-zeros.

    ``indptr`` [num_rows + 1] int64, ``cols`` [nnz] int64 and ``values`` [nnz] float: the
    non-zeros of row ``r`` sit at ``indptr[r]:indptr[r + 1]``. The transpose, for the weight
    gradient: ``col_indptr`` [num_cols + 1] int64 and ``col_order`` [nnz] int64 (the positions
    of the non-zeros sorted by column, row order kept within a column) with ``col_rows`` [nnz]
    int64 (the row of each of them). ``unit_values``: every value is 1 (binary features),
    so products skip the multiplication by the values. Instances are immutable.
    """

    def __init__(self, indptr: torch.Tensor, cols: torch.Tensor, values: torch.Tensor,
                 num_cols: int, col_indptr: torch.Tensor, col_order: torch.Tensor,
                 col_rows: torch.Tensor, unit_values: bool = False) -> None:
        self.indptr, self.cols, self.values = indptr, cols, values
        self.num_cols = int(num_cols)
        self.col_indptr, self.col_order, self.col_rows = col_indptr, col_order, col_rows
        self.unit_values = unit_values

    @classmethod
    def from_dense(cls, x: torch.Tensor) -> "SparseRows":
        """The non-zeros of the CPU matrix ``x`` [N, F] (float16 or float32), values in its
        dtype. Zero is tested on the bit pattern, so a stored ``-0.0`` counts as an entry
        (of value zero, which changes no product)."""
        if x.dim() != 2:
            raise ValueError(f"sparse rows need a 2-D matrix, got shape {list(x.shape)}")
        dense = np.ascontiguousarray(x.numpy())
        num_rows, num_cols = dense.shape
        bits = dense.view(np.uint16 if dense.itemsize == 2 else np.uint32)
        present = bits != 0
        flat = np.flatnonzero(present)
        rows, cols = np.divmod(flat, max(num_cols, 1))
        values = dense.reshape(-1)[flat]
        indptr = np.zeros(num_rows + 1, dtype=np.int64)
        np.cumsum(np.bincount(rows, minlength=num_rows), out=indptr[1:])
        # A stable sort by column keeps each column's rows ascending; a 16-bit key sorts by
        # radix in linear time.
        key = cols.astype(np.uint16) if num_cols <= 1 << 16 else cols
        col_order = np.argsort(key, kind="stable")
        col_indptr = np.zeros(num_cols + 1, dtype=np.int64)
        np.cumsum(np.bincount(cols, minlength=num_cols), out=col_indptr[1:])
        return cls(torch.from_numpy(indptr), torch.from_numpy(cols), torch.from_numpy(values),
                   num_cols, torch.from_numpy(col_indptr), torch.from_numpy(col_order),
                   torch.from_numpy(rows[col_order]), bool(np.all(values == 1)))

    def __repr__(self) -> str:
        return (f"SparseRows(shape={list(self.shape)}, nnz={self.nnz}, dtype={self.dtype}, "
                f"device={self.device})")

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.indptr.numel() - 1, self.num_cols))

    @property
    def nnz(self) -> int:
        return self.cols.numel()

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    @property
    def device(self) -> torch.device:
        return self.values.device

    def _map(self, convert) -> "SparseRows":
        return SparseRows(*(convert(t) for t in (self.indptr, self.cols, self.values)),
                          self.num_cols,
                          *(convert(t) for t in (self.col_indptr, self.col_order, self.col_rows)),
                          self.unit_values)

    def with_values(self, values: torch.Tensor) -> "SparseRows":
        """The same non-zero pattern with ``values`` [nnz] (not assumed to be ones)."""
        if values.shape != self.values.shape:
            raise ValueError(f"values must have shape [{self.nnz}], got {list(values.shape)}")
        return SparseRows(self.indptr, self.cols, values, self.num_cols, self.col_indptr,
                          self.col_order, self.col_rows)

    def float(self) -> "SparseRows":
        """The rows with float32 values (itself when they already are)."""
        if self.dtype == torch.float32:
            return self
        return SparseRows(self.indptr, self.cols, self.values.float(), self.num_cols,
                          self.col_indptr, self.col_order, self.col_rows, self.unit_values)

    def keep_entries(self, keep: torch.Tensor) -> "SparseRows":
        """The rows without the non-zeros where ``keep`` [nnz] bool is False (as if they were
        zero): a product then skips them instead of multiplying by zero."""
        if keep.shape != (self.nnz,):
            raise ValueError(f"keep must have shape [{self.nnz}], got {list(keep.shape)}")
        # Exclusive prefix counts of the kept entries: the new position of every kept entry,
        # and, read at the old row (column) boundaries, the new boundaries.
        before = torch.zeros(self.nnz + 1, dtype=torch.int64, device=keep.device)
        torch.cumsum(keep, 0, out=before[1:])
        kept = keep.nonzero().squeeze(1)
        keep_by_col = keep.index_select(0, self.col_order)
        by_col_before = torch.zeros_like(before)
        torch.cumsum(keep_by_col, 0, out=by_col_before[1:])
        kept_by_col = keep_by_col.nonzero().squeeze(1)
        return SparseRows(before.index_select(0, self.indptr), self.cols.index_select(0, kept),
                          self.values.index_select(0, kept), self.num_cols,
                          by_col_before.index_select(0, self.col_indptr),
                          before.index_select(0, self.col_order.index_select(0, kept_by_col)),
                          self.col_rows.index_select(0, kept_by_col), self.unit_values)

    def keep_columns(self, column_keep: torch.Tensor) -> "SparseRows":
        """The rows with the columns where ``column_keep`` [num_cols] bool is False zeroed
        (their non-zeros dropped)."""
        if column_keep.shape != (self.num_cols,):
            raise ValueError(f"column_keep must have shape [{self.num_cols}], got "
                             f"{list(column_keep.shape)}")
        return self.keep_entries(column_keep.index_select(0, self.cols))

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "SparseRows":
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> "SparseRows":
        return self._map(lambda t: t.pin_memory())

    def to_dense(self) -> torch.Tensor:
        """The rows as a dense [num_rows, num_cols] tensor of the values' dtype."""
        num_rows = self.shape[0]
        row_of = torch.repeat_interleave(torch.arange(num_rows, device=self.device),
                                         self.indptr.diff())
        dense = torch.zeros(num_rows, self.num_cols, dtype=self.dtype, device=self.device)
        dense[row_of, self.cols] = self.values
        return dense


class _SparseProject(torch.autograd.Function):
    """``x @ weight`` for sparse rows ``x`` and weight [F, out]; gradient to ``weight`` only."""

    @staticmethod
    def forward(ctx, weight: torch.Tensor, x: SparseRows) -> torch.Tensor:
        ctx.x = x
        values = None if x.unit_values else x.values.to(weight.dtype)
        return F.embedding_bag(x.cols, weight, x.indptr, mode="sum", per_sample_weights=values,
                               include_last_offset=True)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x: SparseRows = ctx.x
        # x^T @ grad: for every column, the grad rows of its non-zeros, weighted by value.
        values = (None if x.unit_values
                  else x.values.to(grad_out.dtype).index_select(0, x.col_order))
        grad = F.embedding_bag(x.col_rows, grad_out.contiguous(), x.col_indptr, mode="sum",
                               per_sample_weights=values, include_last_offset=True)
        return grad, None


def sparse_linear(x: SparseRows, weight: torch.Tensor,
                  bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ weight + bias`` for sparse rows x [N, F] and weight [F, out]: [N, out].

    Rows without non-zeros get the bias alone. Gradients flow to ``weight`` and ``bias``,
    not to the values of ``x``.
    """
    if weight.shape[0] != x.num_cols:
        raise ValueError(f"weight has {weight.shape[0]} input rows but the sparse rows have "
                         f"{x.num_cols} columns")
    out = _SparseProject.apply(weight, x)
    return out if bias is None else out + bias


def dropout_values(x: SparseRows, dropout: torch.nn.Module) -> SparseRows:
    """``x`` with ``dropout`` (a ``torch.nn.Dropout``) applied to its non-zeros: the zeros a
    dense dropout would draw change nothing."""
    if not dropout.training or dropout.p == 0.0:
        return x
    return x.with_values(dropout(x.values))
