"""Graph convolution with symmetric normalisation, as ``dgl.nn.GraphConv(norm='both')``.

Shapes: ``(adj, x [num_src, in]) -> [num_dst, out]``.
"""
from __future__ import annotations

import torch
from torch import nn

from bgrl_dgl.model.adjacency import Adjacency, weighted_sum
from bgrl_dgl.model.conv.common import Rows, check_rows, matmul
from bgrl_dgl.model.sparse import SparseRows


class GCNConv(nn.Module):
    """GCN: ``D_dst^-1/2 A D_src^-1/2 x W + b`` with degrees clamped to at least 1.

    Degrees are the block's own (out-degrees of sources, in-degrees of destinations, as DGL's
    ``GraphConv(norm='both')``) unless the Adjacency carries whole-graph degrees. With
    ``self_loops`` a self loop is added to every destination first, so the layer equals
    ``GraphConv`` on the block with those self loops added.
    """

    def __init__(self, in_dim: int, out_dim: int, self_loops: bool = True) -> None:
        super().__init__()
        self.in_dim, self.out_dim = in_dim, out_dim
        self.self_loops = self_loops
        self.weight = nn.Parameter(torch.empty(in_dim, out_dim))
        self.bias = nn.Parameter(torch.zeros(out_dim))
        nn.init.xavier_uniform_(self.weight)

    def forward(self, adj: Adjacency, x: Rows,
                input_scale: torch.Tensor | None = None) -> torch.Tensor:
        """x [num_src, in_dim] -> [num_dst, out_dim]; ``input_scale`` [in_dim]: the layer
        of ``x * input_scale``, folded into the weight. Sparse rows are always projected
        first (over their non-zeros), then aggregated."""
        check_rows(adj, x)
        weight = self.weight if input_scale is None else self.weight * input_scale.unsqueeze(-1)
        if self.self_loops:
            adj = adj.self_looped
        src_degree, dst_degree = adj.normalising_degrees
        src_scale = src_degree.clamp(min=1).rsqrt().to(x.dtype)
        # The source normalisation never scales a copy of x (the step's largest tensor on a
        # wide input): it scales the projected rows, or weights the edges.
        if isinstance(x, SparseRows):  # the narrow projection first, scaled on the edges
            h = weighted_sum(adj, src_scale[adj.indices], matmul(x, weight))
        elif self._project_first(adj):
            h = weighted_sum(adj, None, (x @ weight) * src_scale.unsqueeze(-1))
        else:
            h = weighted_sum(adj, src_scale[adj.indices], x) @ weight
        return h * dst_degree.clamp(min=1).rsqrt().to(h.dtype).unsqueeze(-1) + self.bias


    def _project_first(self, adj: Adjacency) -> bool:
        """Whether multiplying by W before aggregating costs fewer multiply-adds: the
        projection runs on every source row, the aggregation-first product only on the
        destinations (sampled blocks have several sources per destination)."""
        project = adj.num_src * self.in_dim * self.out_dim + adj.num_edges * self.out_dim
        aggregate = adj.num_edges * self.in_dim + adj.num_dst * self.in_dim * self.out_dim
        return project < aggregate

