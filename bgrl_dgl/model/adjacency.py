"""Sampled blocks as plain tensors, and the message-passing primitives the GNN layers use.

DGL 2.1.0 has no CUDA kernels, so DGL only samples; the layers aggregate with torch ops over
an :class:`Adjacency` (a block in CSC form over local ids) and run unchanged on CPU, CUDA and
the ``meta`` device. No primitive here loops over nodes in Python or synchronises with the
device.
"""
from __future__ import annotations

import warnings
from functools import cached_property

import torch

# Sparse CSR matrix products are the fast aggregation path; torch flags the layout as beta.
warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")


class Adjacency:
    """One block (or a whole graph) as CSC over local node ids.

    ``indptr`` [num_dst + 1] int64 and ``indices`` [E] int64 in ``[0, num_src)``: the sources
    of destination ``v`` are ``indices[indptr[v]:indptr[v + 1]]``. As in DGL blocks, the first
    ``num_dst`` source nodes are the destination nodes themselves.

    ``src_degree`` [num_src] and ``dst_degree`` [num_dst] float32 are optional degrees of the
    whole graph the block was sampled from (out-degrees of the sources, in-degrees of the
    destinations); when given, GCN normalisation uses them instead of the block's own
    degrees. Instances are immutable; derived tensors are computed once and cached.
    """

    def __init__(self, indptr: torch.Tensor, indices: torch.Tensor, num_src: int, *,
                 src_degree: torch.Tensor | None = None,
                 dst_degree: torch.Tensor | None = None) -> None:
        if indptr.dim() != 1 or indptr.numel() < 1 or indices.dim() != 1:
            raise ValueError("indptr and indices must be 1-D and indptr must not be empty")
        self.indptr = indptr.long()
        self.indices = indices.long()
        self.num_src = int(num_src)
        self.num_dst = indptr.numel() - 1
        if src_degree is not None and src_degree.shape != (self.num_src,):
            raise ValueError(f"src_degree must have shape [{self.num_src}], got "
                             f"{list(src_degree.shape)}")
        if dst_degree is not None and dst_degree.shape != (self.num_dst,):
            raise ValueError(f"dst_degree must have shape [{self.num_dst}], got "
                             f"{list(dst_degree.shape)}")
        self.src_degree = None if src_degree is None else src_degree.float()
        self.dst_degree = None if dst_degree is None else dst_degree.float()

    @classmethod
    def from_csc(cls, indptr: torch.Tensor, indices: torch.Tensor, num_src: int) -> "Adjacency":
        return cls(indptr, indices, num_src)

    @classmethod
    def from_block(cls, block) -> "Adjacency":
        """The CSC of a DGL block (or of a homogeneous graph, where num_src == num_dst)."""
        indptr, indices, _ = block.adj_tensors("csc")
        return cls(indptr, indices, block.num_src_nodes())

    def __repr__(self) -> str:
        return (f"Adjacency(num_src={self.num_src}, num_dst={self.num_dst}, "
                f"num_edges={self.num_edges}, device={self.device})")

    @property
    def num_edges(self) -> int:
        return self.indices.numel()

    @property
    def device(self) -> torch.device:
        return self.indptr.device

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "Adjacency":
        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device, non_blocking=non_blocking)

        return Adjacency(move(self.indptr), move(self.indices), self.num_src,
                         src_degree=move(self.src_degree), dst_degree=move(self.dst_degree))

    def with_degrees(self, src_degree: torch.Tensor | None,
                     dst_degree: torch.Tensor | None) -> "Adjacency":
        """The same edges with whole-graph degrees attached (``None`` detaches them)."""
        return Adjacency(self.indptr, self.indices, self.num_src,
                         src_degree=src_degree, dst_degree=dst_degree)

    @cached_property
    def dst_index(self) -> torch.Tensor:
        """[E] int64: the destination of every edge."""
        counts = self.indptr[1:] - self.indptr[:-1]
        destinations = torch.arange(self.num_dst, device=self.device)
        return torch.repeat_interleave(destinations, counts, output_size=self.num_edges)

    def in_degrees(self) -> torch.Tensor:
        """[num_dst] float32: in-degree of every destination within this block."""
        return (self.indptr[1:] - self.indptr[:-1]).float()

    def out_degrees(self) -> torch.Tensor:
        """[num_src] float32: out-degree of every source within this block."""
        ones = torch.ones(self.num_edges, device=self.device)
        return torch.zeros(self.num_src, device=self.device).index_add_(0, self.indices, ones)

    @cached_property
    def normalising_degrees(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(source [num_src], destination [num_dst]) float32 degrees for GCN normalisation:
        the attached whole-graph degrees where given, else the block's own."""
        src = self.out_degrees() if self.src_degree is None else self.src_degree
        dst = self.in_degrees() if self.dst_degree is None else self.dst_degree
        return src, dst

    @cached_property
    def self_looped(self) -> "Adjacency":
        """:meth:`with_self_loops`, computed once per instance."""
        return self.with_self_loops()

    def with_self_loops(self) -> "Adjacency":
        """A new Adjacency with an extra edge ``v -> v`` first in every destination's segment.

        Existing self loops are kept (as ``dgl.add_self_loop`` does). Attached whole-graph
        degrees grow by one, since in the whole graph every node gains a self loop.
        """
        if self.num_src < self.num_dst:
            raise ValueError("a block needs its destination nodes among its sources to add self "
                             "loops")
        destinations = torch.arange(self.num_dst + 1, device=self.device)
        indptr = self.indptr + destinations
        # Edge e of destination v moves right by v + 1 slots: v earlier self loops plus its own.
        positions = torch.arange(self.num_edges, device=self.device) + self.dst_index + 1
        indices = torch.empty(self.num_edges + self.num_dst, dtype=torch.long, device=self.device)
        indices[indptr[:-1]] = destinations[:-1]
        indices[positions] = self.indices
        return Adjacency(indptr, indices, self.num_src,
                         src_degree=None if self.src_degree is None else self.src_degree + 1,
                         dst_degree=None if self.dst_degree is None else self.dst_degree + 1)

    def keep_edges(self, mask: torch.Tensor) -> "Adjacency":
        """A new Adjacency with only the edges where ``mask`` [E] bool is true, order kept.

        Attached whole-graph degrees are kept unchanged.
        """
        if mask.shape != (self.num_edges,):
            raise ValueError(f"edge mask must have shape [{self.num_edges}], "
                             f"got {list(mask.shape)}")
        kept_before = torch.zeros(self.num_edges + 1, dtype=torch.long, device=self.device)
        torch.cumsum(mask, 0, out=kept_before[1:])
        return Adjacency(kept_before[self.indptr], self.indices[mask], self.num_src,
                         src_degree=self.src_degree, dst_degree=self.dst_degree)

    @cached_property
    def transpose_csr(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """CSR of the transposed matrix: (indptr [num_src + 1], destination ids [E], and the
        permutation [E] taking this adjacency's edge order to the transposed order)."""
        permutation = torch.argsort(self.indices, stable=True)
        counts = torch.zeros(self.num_src, dtype=torch.long, device=self.device)
        counts.index_add_(0, self.indices, torch.ones_like(self.indices))
        indptr = torch.zeros(self.num_src + 1, dtype=torch.long, device=self.device)
        torch.cumsum(counts, 0, out=indptr[1:])
        return indptr, self.dst_index[permutation], permutation


def _per_edge(index: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``index`` [E] viewed and expanded to the shape of ``like`` [E, ...]."""
    return index.view(-1, *([1] * (like.dim() - 1))).expand_as(like)


def segment_sum(values: torch.Tensor, adj: Adjacency) -> torch.Tensor:
    """Sum edge values [E, ...] into their destinations: [num_dst, ...]."""
    out = values.new_zeros((adj.num_dst, *values.shape[1:]))
    return out.index_add_(0, adj.dst_index, values)


def segment_softmax(scores: torch.Tensor, adj: Adjacency) -> torch.Tensor:
    """Softmax of edge scores [E] or [E, H] over the in-edges of each destination."""
    dst = adj.dst_index
    # The shift by the per-destination maximum leaves the softmax and its gradient unchanged.
    shift = scores.new_full((adj.num_dst, *scores.shape[1:]), float("-inf"))
    shift = shift.scatter_reduce(0, _per_edge(dst, scores), scores.detach(), "amax")
    exp = (scores - shift[dst]).exp()
    return exp / segment_sum(exp, adj)[dst]


def weighted_sum(adj: Adjacency, edge_weight: torch.Tensor | None,
                 x_src: torch.Tensor) -> torch.Tensor:
    """``out[v] = sum over edges (u -> v) of w_e * x_src[u]``: [num_dst, ...].

    ``edge_weight`` [E] (``None``: all ones) and ``x_src`` [num_src, ...]. On CPU and CUDA this
    is a sparse CSR matrix product (memory O(E + num_dst * F); only the gradient of edge weights
    that require one costs O(E * F)); elsewhere (``meta``, or half precision on CPU) it
    gathers one message per edge (memory O(E * F)).
    """
    if x_src.shape[0] != adj.num_src:
        raise ValueError(f"expected {adj.num_src} source rows, got {x_src.shape[0]}")
    if _has_sparse_kernel(x_src):
        out = _CsrWeightedSum.apply(adj, edge_weight, x_src.reshape(adj.num_src, -1))
        return out.view(adj.num_dst, *x_src.shape[1:])
    return gathered_weighted_sum(adj, edge_weight, x_src)


def gathered_weighted_sum(adj: Adjacency, edge_weight: torch.Tensor | None,
                          x_src: torch.Tensor) -> torch.Tensor:
    """:func:`weighted_sum` by gathering a message per edge and adding it into its target."""
    messages = x_src[adj.indices]
    if edge_weight is not None:
        messages = messages * edge_weight.unsqueeze(-1)
    return segment_sum(messages, adj)


def _has_sparse_kernel(x: torch.Tensor) -> bool:
    if x.device.type == "cuda":
        return True
    return x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64)


def _csr_matmul(indptr: torch.Tensor, indices: torch.Tensor, values: torch.Tensor,
                num_cols: int, dense: torch.Tensor) -> torch.Tensor:
    """(CSR matrix [len(indptr) - 1, num_cols]) @ dense [num_cols, F]."""
    matrix = torch.sparse_csr_tensor(indptr, indices, values,
                                     size=(indptr.numel() - 1, num_cols))
    return matrix @ dense


class _CsrWeightedSum(torch.autograd.Function):
    """weighted_sum as A @ x with A the [num_dst, num_src] CSR of weights.

    The backward pass uses a CSR of A's transpose (cached on the Adjacency) so that only
    CSR @ dense products run on the device: grad_x = A^T @ grad_out, and
    grad_w[e] = <grad_out[dst_e], x[src_e]>.
    """

    @staticmethod
    def forward(ctx, adj: Adjacency, edge_weight: torch.Tensor | None,
                x_src: torch.Tensor) -> torch.Tensor:
        x_src = x_src.contiguous()
        values = _edge_values(adj, edge_weight, x_src)
        ctx.adj = adj
        ctx.save_for_backward(values, x_src)
        return _csr_matmul(adj.indptr, adj.indices, values, adj.num_src, x_src)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        adj: Adjacency = ctx.adj
        values, x_src = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        grad_weight = grad_x = None
        if ctx.needs_input_grad[1]:
            grad_weight = (grad_out[adj.dst_index] * x_src[adj.indices]).sum(-1)
        if ctx.needs_input_grad[2]:
            indptr_t, indices_t, permutation = adj.transpose_csr
            grad_x = _csr_matmul(indptr_t, indices_t, values[permutation], adj.num_dst, grad_out)
        return None, grad_weight, grad_x


def _edge_values(adj: Adjacency, edge_weight: torch.Tensor | None,
                 like: torch.Tensor) -> torch.Tensor:
    if edge_weight is None:
        return torch.ones(adj.num_edges, dtype=like.dtype, device=like.device)
    if edge_weight.shape != (adj.num_edges,):
        raise ValueError(f"edge weights must have shape [{adj.num_edges}], got "
                         f"{list(edge_weight.shape)}")
    return edge_weight.to(like.dtype).contiguous()
