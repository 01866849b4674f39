"""Graph attention convolution, as ``dgl.nn.GATConv`` with heads concatenated.

Shapes: ``(adj, x [num_src, in]) -> [num_dst, out]`` (``out`` = heads x head size).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from bgrl_dgl.model.adjacency import Adjacency, segment_softmax, weighted_sum
from bgrl_dgl.model.conv.common import Rows, check_rows, scaled_linear


class GATConv(nn.Module):
    """Graph attention with ``heads`` heads of size ``out_dim // heads``, concatenated.

    As DGL's ``GATConv``: one projection for sources and destinations, scores
    ``leaky_relu(a_l . Wx_u + a_r . Wx_v, 0.2)``, softmax over each destination's in-edges,
    then a bias. Destinations without in-edges get only the bias.
    """

    def __init__(self, in_dim: int, out_dim: int, heads: int, negative_slope: float = 0.2) -> None:
        super().__init__()
        if out_dim % heads:
            raise ValueError(f"GAT output size {out_dim} is not divisible by {heads} heads")
        self.in_dim, self.out_dim = in_dim, out_dim
        self.heads, self.head_dim = heads, out_dim // heads
        self.negative_slope = negative_slope
        self.fc = nn.Linear(in_dim, out_dim, bias=False)
        self.attn_l = nn.Parameter(torch.empty(1, heads, self.head_dim))
        self.attn_r = nn.Parameter(torch.empty(1, heads, self.head_dim))
        self.bias = nn.Parameter(torch.zeros(out_dim))
        gain = nn.init.calculate_gain("relu")
        for weight in (self.fc.weight, self.attn_l, self.attn_r):
            nn.init.xavier_normal_(weight, gain=gain)

    def forward(self, adj: Adjacency, x: Rows,
                input_scale: torch.Tensor | None = None) -> torch.Tensor:
        """x [num_src, in_dim] -> [num_dst, out_dim]; ``input_scale`` [in_dim]: the layer
        of ``x * input_scale``, folded into the projection."""
        check_rows(adj, x)
        h = scaled_linear(self.fc, x, input_scale).view(-1, self.heads, self.head_dim)
        score_src = (h * self.attn_l).sum(-1)
        score_dst = (h[: adj.num_dst] * self.attn_r).sum(-1)
        scores = F.leaky_relu(score_src[adj.indices] + score_dst[adj.dst_index],
                              self.negative_slope)
        attention = segment_softmax(scores, adj)
        heads = [weighted_sum(adj, attention[:, k], h[:, k]) for k in range(self.heads)]
        return torch.cat(heads, dim=-1) + self.bias

