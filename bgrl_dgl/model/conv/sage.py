"""GraphSAGE convolution (mean aggregator), as ``dgl.nn.SAGEConv(aggregator_type='mean')``.

Shapes: ``(adj, x [num_src, in]) -> [num_dst, out]``.
"""
from __future__ import annotations

import torch
from torch import nn

from bgrl_dgl.model.adjacency import Adjacency, weighted_sum
from bgrl_dgl.model.conv.common import Rows, check_rows, scaled_linear
from bgrl_dgl.model.sparse import SparseRows


class SAGEConv(nn.Module):
    """GraphSAGE with the mean aggregator: ``fc_self(x_v) + fc_neigh(mean of x_u, u -> v)``.

    Destinations without in-edges get a neighbour mean of zero.
    """

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.in_dim, self.out_dim = in_dim, out_dim
        self.fc_self = nn.Linear(in_dim, out_dim, bias=True)
        self.fc_neigh = nn.Linear(in_dim, out_dim, bias=False)
        gain = nn.init.calculate_gain("relu")
        nn.init.xavier_uniform_(self.fc_self.weight, gain=gain)
        nn.init.xavier_uniform_(self.fc_neigh.weight, gain=gain)

    def forward(self, adj: Adjacency, x: Rows,
                input_scale: torch.Tensor | None = None) -> torch.Tensor:
        """x [num_src, in_dim] -> [num_dst, out_dim]; ``input_scale`` [in_dim]: the layer
        of ``x * input_scale``, folded into the weights. Sparse rows are always projected
        first (over their non-zeros), then aggregated."""
        check_rows(adj, x)
        inverse_degree = adj.in_degrees().clamp(min=1).reciprocal().to(x.dtype).unsqueeze(-1)
        sparse = isinstance(x, SparseRows)
        if sparse or self.in_dim > self.out_dim:  # project first: aggregate narrower rows
            neighbours = weighted_sum(adj, None, scaled_linear(self.fc_neigh, x,
                                                               input_scale)) * inverse_degree
        else:
            neighbours = scaled_linear(self.fc_neigh, weighted_sum(adj, None, x) * inverse_degree,
                                       input_scale)
        if sparse:  # the destinations are the first rows; the others cost only their nnz
            return scaled_linear(self.fc_self, x, input_scale)[: adj.num_dst] + neighbours
        return scaled_linear(self.fc_self, x[: adj.num_dst], input_scale) + neighbours

