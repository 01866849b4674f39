"""Helpers shared by the convolutions: the row check of a layer's input, and a linear map
with a per-column input scale folded into its weight."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from bgrl_dgl.model.adjacency import Adjacency


def check_rows(adj: Adjacency, x: torch.Tensor) -> None:
    if x.shape[0] != adj.num_src:
        raise ValueError(f"features have {x.shape[0]} rows but the block has {adj.num_src} source "
                         f"nodes")


def scaled_linear(layer: nn.Linear, x: torch.Tensor,
                  input_scale: torch.Tensor | None) -> torch.Tensor:
    """``layer(x * input_scale)`` for x [N, in], computed with the scale folded into the
    weight [out, in] (no scaled copy of x): [N, out]."""
    weight = layer.weight if input_scale is None else layer.weight * input_scale
    return F.linear(x, weight, layer.bias)

