"""The encoder's convolutions split into a row-wise part and a sparse sum, for exact
layer-wise inference over blocks of destination rows.

The row-wise part maps the input rows of nodes to rows of the layer's *node tables*; the
block part computes a block of destinations from the sums of table rows over their in-edges
(one sparse-CSR-times-dense product per table, columns being global node ids) and from the
destinations' own rows. Tables hold the narrower side of every weight product (GCN:
``D_src^-1/2 h W`` when the output is narrower, else ``D_src^-1/2 h``), so the sparse sum
reads the fewest bytes per edge, and the full-width output of a layer is never stored: the
row-wise part of layer ``i + 1`` runs on each output block of layer ``i``.

Each class reproduces its convolution in :mod:`bgrl_dgl.model` (in eval mode, without
``input_scale``) up to float rounding.
"""
from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F

from bgrl_dgl.model.conv import GATConv, GCNConv, SAGEConv
from bgrl_dgl.model.encoder import Encoder


class BlockView(Protocol):
    """A block of destinations with all their in-edges, against the tables of one layer."""

    edge_count: torch.Tensor  # [B] float32: stored in-edges of each destination
    in_degree: torch.Tensor   # [B] float32: whole-graph in-degree used for normalisation

    @property
    def dst_index(self) -> torch.Tensor:
        """[E_b] int64: the block-local destination of every in-edge."""

    def own(self, table: int) -> torch.Tensor:
        """[B, w] float32: the destinations' own rows of table ``table``."""

    def own_input(self) -> torch.Tensor:
        """[B, in] float32: the destinations' own input rows, where the layer's input is
        kept (layer 0: the features)."""

    def neighbour_sum(self, table: int, weights: torch.Tensor | None = None) -> torch.Tensor:
        """[B, w] float32: per destination, the (``weights`` [E_b]-weighted) sum of the
        table rows of its in-neighbours."""

    def per_edge(self, table: int) -> torch.Tensor:
        """[E_b, w] float32: the table row of every in-edge's source."""


class LayerOps:
    """One convolution as node tables and a block aggregation.

    ``widths``: the width of each node table; ``edge_bytes``: working memory per in-edge of
    a block, besides its column ids.
    """

    widths: tuple[int, ...]
    edge_bytes: int = 0
    needs_out_degree: bool = False

    def tables(self, h: torch.Tensor, out_degree: torch.Tensor | None) -> list[torch.Tensor]:
        """The table rows [n, widths[t]] of nodes with input rows ``h`` [n, in] float32 and
        whole-graph out-degrees ``out_degree`` [n] (given when ``needs_out_degree``)."""
        raise NotImplementedError

    def block(self, view: BlockView) -> torch.Tensor:
        """The convolution's output [B, out] for the destinations of ``view``."""
        raise NotImplementedError


class GCNOps(LayerOps):
    """:class:`GCNConv`: one table, ``D_src^-1/2 h`` projected first when narrower."""

    needs_out_degree = True

    def __init__(self, conv: GCNConv) -> None:
        self.conv = conv
        self.loops = 1.0 if conv.self_loops else 0.0
        self.project_first = conv.out_dim < conv.in_dim
        self.widths = (conv.out_dim if self.project_first else conv.in_dim,)

    def tables(self, h: torch.Tensor, out_degree: torch.Tensor | None) -> list[torch.Tensor]:
        scaled = h * (out_degree + self.loops).clamp(min=1).rsqrt().unsqueeze(-1)
        return [scaled @ self.conv.weight if self.project_first else scaled]

    def block(self, view: BlockView) -> torch.Tensor:
        h = view.neighbour_sum(0)
        if self.loops:  # the self loop of every destination
            h = h + view.own(0)
        if not self.project_first:
            h = h @ self.conv.weight
        return h * (view.in_degree + self.loops).clamp(min=1).rsqrt().unsqueeze(-1) + self.conv.bias


class SAGEOps(LayerOps):
    """:class:`SAGEConv`: the input (one table), or when the output is narrower, its two
    projections (neighbour and self, two tables; the self projection is made per block from
    the input rows where the input is kept)."""

    def __init__(self, conv: SAGEConv, input_kept: bool) -> None:
        self.conv = conv
        self.project_first = conv.in_dim > conv.out_dim
        self.self_table = self.project_first and not input_kept
        self.widths = ((conv.out_dim,) * (1 + self.self_table) if self.project_first
                       else (conv.in_dim,))

    def tables(self, h: torch.Tensor, out_degree: torch.Tensor | None) -> list[torch.Tensor]:
        if self.project_first:
            neighbour = F.linear(h, self.conv.fc_neigh.weight)
            return [neighbour, self.conv.fc_self(h)] if self.self_table else [neighbour]
        return [h]

    def block(self, view: BlockView) -> torch.Tensor:
        inverse_degree = view.edge_count.clamp(min=1).reciprocal().unsqueeze(-1)
        if self.project_first:
            own = view.own(1) if self.self_table else self.conv.fc_self(view.own_input())
            return own + view.neighbour_sum(0) * inverse_degree
        neighbours = self.conv.fc_neigh(view.neighbour_sum(0) * inverse_degree)
        return self.conv.fc_self(view.own(0)) + neighbours


class GATOps(LayerOps):
    """:class:`GATConv`: one table per head (its projection), then the source and the
    destination attention scores [n, heads]; the softmax runs per block over each
    destination's in-edges, exactly."""

    def __init__(self, conv: GATConv) -> None:
        self.conv = conv
        self.heads = conv.heads
        self.widths = (conv.head_dim,) * conv.heads + (conv.heads, conv.heads)
        self.edge_bytes = 8 + 8 * 4 * conv.heads  # dst index, and about 8 [E, heads] floats

    def tables(self, h: torch.Tensor, out_degree: torch.Tensor | None) -> list[torch.Tensor]:
        z = self.conv.fc(h).view(-1, self.heads, self.conv.head_dim)
        score_src = (z * self.conv.attn_l).sum(-1)
        score_dst = (z * self.conv.attn_r).sum(-1)
        return [z[:, k] for k in range(self.heads)] + [score_src, score_dst]

    def block(self, view: BlockView) -> torch.Tensor:
        dst = view.dst_index
        scores = F.leaky_relu(view.per_edge(self.heads) + view.own(self.heads + 1)[dst],
                              self.conv.negative_slope)
        attention = segment_softmax(scores, dst, view.in_degree.numel())
        heads = [view.neighbour_sum(k, attention[:, k].contiguous()) for k in range(self.heads)]
        return torch.cat(heads, dim=-1) + self.conv.bias


def segment_softmax(scores: torch.Tensor, dst: torch.Tensor, num_dst: int) -> torch.Tensor:
    """Softmax of edge scores [E, H] over the edges of each destination (``dst`` [E])."""
    index = dst.unsqueeze(-1).expand_as(scores)
    shift = scores.new_full((num_dst, scores.shape[1]), float("-inf"))
    shift = shift.scatter_reduce(0, index, scores, "amax")
    exp = (scores - shift[dst]).exp()
    total = scores.new_zeros((num_dst, scores.shape[1])).index_add_(0, dst, exp)
    return exp / total[dst]


def layer_ops(encoder: Encoder, layer: int) -> LayerOps:
    """The :class:`LayerOps` of the encoder's convolution ``layer`` (layer 0's input, the
    features, is kept)."""
    conv = encoder.convs[layer]
    if isinstance(conv, GCNConv):
        return GCNOps(conv)
    if isinstance(conv, SAGEConv):
        return SAGEOps(conv, input_kept=layer == 0)
    if isinstance(conv, GATConv):
        return GATOps(conv)
    raise ValueError(f"no layer-wise inference for {type(conv).__name__}")


def finish_layer(encoder: Encoder, layer: int, h: torch.Tensor) -> torch.Tensor:
    """Normalisation and activation after convolution ``layer`` (dropout is off in eval)."""
    return encoder.activations[layer](encoder.norms[layer](h))
