"""BGRL's GNN encoder and predictor over sampled blocks, in plain torch ops.

Every convolution maps ``(adj, x [num_src, in]) -> [num_dst, out]`` with the semantics of its
``dgl.nn`` counterpart (``SAGEConv('mean')``, ``GraphConv(norm='both')``, ``GATConv``) but
aggregates with :mod:`bgrl_dgl.model.adjacency`, so the same model runs on CPU and CUDA although
the installed DGL has no CUDA kernels.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from bgrl_dgl.config import check_finite, field
from bgrl_dgl.model.adjacency import Adjacency
from bgrl_dgl.model.conv import GATConv, GCNConv, SAGEConv
from bgrl_dgl.model.sparse import SparseRows, dropout_values


@dataclass
class ModelConfig:
    conv: Literal["gcn", "sage", "gat"] = field("gcn", "graph convolution of every encoder layer")
    hidden: list[int] = field([512, 512], "output size of each encoder layer; the last is the "
                                          "embedding size")
    norm: Literal["batch", "layer", "none"] = field("batch", "normalisation after each convolution")
    final_activation: bool = field(True, "normalise and apply PReLU after the last layer too, as "
                                         "BGRL's encoder does")
    heads: int = field(4, "attention heads of GAT layers; each layer's size is split across its "
                          "heads")
    gcn_self_loops: bool = field(True, "GCN layers add a self loop to every destination node")
    dropout: float = field(0.0, "dropout on the input of every layer")
    predictor_hidden: int = field(512, "hidden size of the predictor MLP")

    def __post_init__(self) -> None:
        check_finite(self)
        if self.conv not in ("gcn", "sage", "gat"):
            raise ValueError(f"conv must be one of gcn, sage, gat, not {self.conv!r}")
        if self.norm not in ("batch", "layer", "none"):
            raise ValueError(f"norm must be one of batch, layer, none, not {self.norm!r}")
        if not self.hidden:
            raise ValueError("hidden needs at least one layer size")
        if any(size <= 0 for size in self.hidden):
            raise ValueError(f"hidden sizes must be positive, got {self.hidden}")
        if self.heads <= 0:
            raise ValueError(f"heads must be positive, got {self.heads}")
        if self.conv == "gat" and any(size % self.heads for size in self.hidden):
            raise ValueError(f"with conv gat every hidden size must be divisible by "
                             f"heads={self.heads}, "
                             f"got {self.hidden}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.predictor_hidden <= 0:
            raise ValueError(f"predictor_hidden must be positive, got {self.predictor_hidden}")


def make_conv(config: ModelConfig, in_dim: int, out_dim: int) -> nn.Module:
    if config.conv == "sage":
        return SAGEConv(in_dim, out_dim)
    if config.conv == "gat":
        return GATConv(in_dim, out_dim, config.heads)
    return GCNConv(in_dim, out_dim, self_loops=config.gcn_self_loops)


def make_norm(kind: str, dim: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm1d(dim)
    if kind == "layer":
        return nn.LayerNorm(dim)
    return nn.Identity()


class Encoder(nn.Module):
    """Stack of graph convolutions, each followed by normalisation and PReLU.

    Layer ``i`` maps the sources of ``adjs[i]`` to its destinations; batch normalisation is
    over the destination nodes of the batch. With ``final_activation`` off, the last layer is
    the bare convolution.
    """

    def __init__(self, in_dim: int, config: ModelConfig) -> None:
        super().__init__()
        if in_dim <= 0:
            raise ValueError(f"input size must be positive, got {in_dim}")
        self.in_dim = in_dim
        self.config = config
        sizes = [in_dim, *config.hidden]
        self.num_layers = len(config.hidden)
        self.out_dim = sizes[-1]
        self.dropout = nn.Dropout(config.dropout)
        self.convs = nn.ModuleList(make_conv(config, a, b) for a, b in zip(sizes[:-1], sizes[1:]))
        self.norms = nn.ModuleList()
        self.activations = nn.ModuleList()
        for i, size in enumerate(config.hidden):
            activated = i < self.num_layers - 1 or config.final_activation
            self.norms.append(make_norm(config.norm if activated else "none", size))
            self.activations.append(nn.PReLU() if activated else nn.Identity())

    def layer_forward(self, i: int, adj: Adjacency, h: torch.Tensor | SparseRows,
                      input_scale: torch.Tensor | None = None) -> torch.Tensor:
        """Layer ``i``: h [adj.num_src, in] -> [adj.num_dst, out] (convolution, norm, PReLU);
        ``input_scale`` [in] scales the columns of ``h`` inside the convolution's weights.
        Sparse rows (a first layer's wide sparse input) get dropout on their non-zeros."""
        h = dropout_values(h, self.dropout) if isinstance(h, SparseRows) else self.dropout(h)
        h = self.convs[i](adj, h, input_scale)
        return self.activations[i](self.norms[i](h))

    def forward(self, adjs: list[Adjacency], x: torch.Tensor | SparseRows,
                column_keep: torch.Tensor | None = None) -> torch.Tensor:
        """x [adjs[0].num_src, in_dim] float, dense or sparse rows -> [adjs[-1].num_dst,
        out_dim].

        ``column_keep`` [in_dim] bool: a view's feature-column mask; the result equals the
        forward of ``x`` with the other columns zeroed, as the mask is folded into the first
        layer's weights instead of copying ``x``.
        """
        if len(adjs) != self.num_layers:
            raise ValueError(f"the encoder has {self.num_layers} layers but got {len(adjs)} blocks")
        scale = None if column_keep is None else column_keep.to(x.dtype)
        h = x
        for i, adj in enumerate(adjs):
            h = self.layer_forward(i, adj, h, scale if i == 0 else None)
        return h


class Predictor(nn.Module):
    """BGRL's predictor MLP: Linear -> PReLU -> Linear, [n, dim] -> [n, dim].

    As in the BGRL reference implementation, without normalisation: on Cora's public split a
    batch-normalised hidden layer gave a weaker linear probe (79.6% against 81.4%, one seed).
    """

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.PReLU(), nn.Linear(hidden, dim))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.net(h)
