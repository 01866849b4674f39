"""Helpers shared by the convolutions: the row check of a layer's input, and a linear map
with a per-column input scale folded into its weight, for dense or sparse input rows."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from bgrl_dgl.model.adjacency import Adjacency
from bgrl_dgl.model.sparse import SparseRows, sparse_linear

# A layer's input: dense rows, or (first layer) the non-zeros of wide sparse rows.
Rows = torch.Tensor | SparseRows


def check_rows(adj: Adjacency, x: Rows) -> None:
    if x.shape[0] != adj.num_src:
        raise ValueError(f"features have {x.shape[0]} rows but the block has {adj.num_src} source "
                         f"nodes")


def scaled_linear(layer: nn.Linear, x: Rows,
                  input_scale: torch.Tensor | None) -> torch.Tensor:
    """``layer(x * input_scale)`` for x [N, in], computed with the scale folded into the
    weight [out, in] (no scaled copy of x): [N, out]. Sparse rows are multiplied over their
    non-zeros."""
    weight = layer.weight if input_scale is None else layer.weight * input_scale
    if isinstance(x, SparseRows):
        return sparse_linear(x, weight.t(), layer.bias)
    return F.linear(x, weight, layer.bias)


def matmul(x: Rows, weight: torch.Tensor) -> torch.Tensor:
    """``x @ weight`` for x [N, in] dense or sparse and weight [in, out]: [N, out]."""
    return sparse_linear(x, weight) if isinstance(x, SparseRows) else x @ weight

