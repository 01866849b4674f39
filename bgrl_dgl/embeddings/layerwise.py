"""Exact full-graph embeddings, one layer at a time, for graphs larger than memory.

Sampled mini-batches approximate a node's receptive field; here every layer aggregates each
node's full in-neighbourhood. Each convolution is split (:mod:`bgrl_dgl.embeddings.blockconv`) into
row-wise *node tables* (the narrower side of its weight products) and a sparse sum over
in-edges. Layer 0's tables are computed from the features in one streaming pass. Then, for
each layer, blocks of consecutive destinations (whose in-edges are one contiguous slice of
the CSC arrays) sum table rows over their in-edges, one CSR-times-dense product per table
with global column ids (:mod:`bgrl_dgl.embeddings.blockio`), finish the layer (norm,
PReLU) and compute their rows of the next layer's tables, or, at the last layer, hand their
rows to ``out`` in order. Tables are memmaps in a scratch directory (float32, or float16
when asked), or device tensors on a GPU with room for them; a layer's tables are deleted
once the next layer's are written. The work is O(L * (N d^2 + E d)); blocks are sized from
a memory budget.

Given a subset of nodes, the last layer runs for those only and each earlier layer only for
the nodes that the next one reads (its destinations and their in-neighbours). GCN
normalisation uses whole-graph degrees, so the result equals a forward pass over the whole
graph at once.

Several processes (the ranks of an export) can share the layers before the last
(:class:`LayerShare`): the blocks of each such layer are the same for any number of ranks
(at least :data:`LAYER_BLOCKS` of them), rank ``r`` of ``W`` computes every ``W``-th into
tables that rank 0 creates in a directory they all see, and the ranks wait for each other
before a layer reads them. Each rank then computes the last layer for its own nodes.
"""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, Protocol, Union

import numpy as np
import torch

from bgrl_dgl.embeddings.blockconv import LayerOps, finish_layer, layer_ops
from bgrl_dgl.embeddings.blockio import (
    SCRATCH_DTYPES,
    Block,
    GraphArrays,
    NodeTables,
    Rows,
    host_tensor,
    to_device,
)
from bgrl_dgl.embeddings.scratch import check_free_space

if TYPE_CHECKING:
    from bgrl_dgl.model.encoder import Encoder
    from bgrl_dgl.store.reader import GraphStore

BLOCK_MEMORY = 512 << 20  # bytes of working memory per block
DEVICE_TABLE_SHARE = 0.7  # tables stay on a GPU if they fit in this share of its free memory
LAYER_BLOCKS = 64  # a layer before the last has at least this many blocks to share ...
MIN_BLOCK_ROWS = 1024  # ... unless its blocks would have fewer rows than this


class RowSink(Protocol):
    """Receives the rows of the last layer in order: ``rows`` [n, D] float32 are rows
    ``[start, start + n)`` of the result."""

    def write(self, start: int, rows: np.ndarray) -> None: ...


class LayerShare(Protocol):
    """The ranks that compute the layers before the last together (see ranks.py): rank
    ``rank`` of ``world_size`` computes every ``world_size``-th block of each such layer into
    tables that rank 0 creates in a directory they share; ``barrier`` waits for the others."""

    rank: int
    world_size: int

    def barrier(self, what: str) -> None: ...


Output = Union[np.ndarray, RowSink]
Progress = Callable[[int, int], None]


def layerwise_embeddings(encoder: Encoder, graph_indptr: np.ndarray, graph_indices: np.ndarray,
                         features: np.ndarray, *, batch_size: int | None = None,
                         device: torch.device | str = "cpu", scratch_dir: Path | None = None,
                         out: Output | None = None, in_degrees: np.ndarray | None = None,
                         out_degrees: np.ndarray | None = None, nodes: np.ndarray | None = None,
                         symmetric: bool = False, scratch_dtype: str = "float32",
                         memory_budget: int = BLOCK_MEMORY,
                         progress: Progress | None = None, check_space: bool = True,
                         share: LayerShare | None = None,
                         shared_nodes: np.ndarray | None = None) -> Output:
    """The encoder's output for every node of a CSC graph: [N, encoder.out_dim], or for the
    nodes ``nodes`` only: [M, encoder.out_dim], row k for node ``nodes[k]``.

    Args:
        graph_indptr, graph_indices: [N + 1] and [E] (int32/int64, memmaps welcome): the
            in-neighbours of ``v`` are ``graph_indices[graph_indptr[v]:graph_indptr[v + 1]]``.
        features: [N, F] float16/float32, read in chunks.
        batch_size: at most this many destinations per block (default: from ``memory_budget``).
        device: where the products run.
        scratch_dir: where a temporary directory for the tables is made (default: the
            system's temp dir); it is removed at the end, also on error.
        out: a writable floating [rows, out_dim] array, or a :class:`RowSink`
            (default: a new float32 array).
        in_degrees, out_degrees: [N] whole-graph degrees for GCN normalisation, both or
            neither (then counted from the arrays).
        nodes: [M] strictly ascending ids in [0, N) (default: all nodes).
        symmetric: the graph is symmetric, so out-degrees need not be counted.
        scratch_dtype: float32 or float16, the precision of the stored tables.
        memory_budget: bytes of working memory per block.
        progress: called as ``progress(layer, count)`` after each block of ``count``
            destinations of layer ``layer`` (0-based) is computed.
        check_space: check the free space for the tables in ``scratch_dir`` first (False:
            the caller did, as the export does once for all its ranks).
        share: compute the layers before the last together with other ranks: the tables
            are files directly in ``scratch_dir`` (which all ranks see; it is not removed),
            this rank computes its share of every earlier layer and the last layer for
            ``nodes`` only.
        shared_nodes: with ``share``, the nodes of all the ranks' last layers (default:
            all), whose inputs the earlier layers compute.

    Returns:
        ``out``. The encoder runs in eval mode without gradients (its mode is restored).
    """
    num_nodes = _check_graph(graph_indptr, graph_indices, features, batch_size)
    nodes = _check_nodes(nodes, num_nodes)
    graph = GraphArrays(graph_indptr, graph_indices,
                        *_check_degrees(num_nodes, in_degrees, out_degrees), symmetric)
    if scratch_dtype not in SCRATCH_DTYPES:
        raise ValueError(f"scratch_dtype must be float32 or float16, got {scratch_dtype!r}")
    rows = num_nodes if nodes is None else nodes.size
    if out is None:
        out = np.empty((rows, encoder.out_dim), dtype=np.float32)
    elif not hasattr(out, "write") and (out.shape != (rows, encoder.out_dim)
                                        or not np.issubdtype(out.dtype, np.floating)):
        raise ValueError(f"out must be a floating [{rows}, {encoder.out_dim}] array, "
                         f"got {out.dtype} {out.shape}")
    if rows == 0 and share is None:
        return out
    device = torch.device(device)
    ops = [layer_ops(encoder, i) for i in range(encoder.num_layers)]
    dtype = SCRATCH_DTYPES[scratch_dtype]
    resident = share is None and _tables_fit_on_device(ops, num_nodes, dtype, device,
                                                       memory_budget)
    parent = Path(tempfile.gettempdir() if scratch_dir is None else scratch_dir)
    if not resident and check_space:
        check_free_space(parent, table_bytes(ops, num_nodes, dtype), "exact inference")
    if share is None:
        destinations = _layer_destinations(graph, nodes, encoder.num_layers + 1)
    else:
        destinations = _layer_destinations(graph, _check_nodes(shared_nodes, num_nodes),
                                           encoder.num_layers + 1)
        destinations[-1] = nodes
    was_training = encoder.training
    encoder.eval()
    scratch = (parent if share is not None
               else Path(tempfile.mkdtemp(prefix="bgrl-inference-", dir=parent)))
    try:
        with torch.no_grad():
            run = _Pass(encoder, ops, graph, scratch, dtype, device, resident, progress, share)
            run.layers(features, destinations, out if hasattr(out, "write") else _ArraySink(out),
                       memory_budget, batch_size)
        if isinstance(out, np.memmap):
            out.flush()
        return out
    finally:
        if share is None:
            shutil.rmtree(scratch, ignore_errors=True)
        encoder.train(was_training)


def embed_store(encoder: Encoder, store: GraphStore, **kwargs) -> Output:
    """:func:`layerwise_embeddings` of the nodes of ``store``: [N, out_dim]; ``kwargs``
    as there (batch_size, device, scratch_dir, out, nodes, scratch_dtype, memory_budget)."""
    return layerwise_embeddings(encoder, store.indptr, store.indices, store.features,
                                symmetric=store.symmetrized, **kwargs)


def table_bytes(ops: list[LayerOps], num_nodes: int, dtype: torch.dtype) -> int:
    """Bytes of the tables alive at once: those of two consecutive layers, at most."""
    widths = [sum(layer.widths) for layer in ops] + [0]
    itemsize = torch.finfo(dtype).bits // 8
    return max(a + b for a, b in zip(widths[:-1], widths[1:])) * num_nodes * itemsize


def scratch_requirement(encoder: Encoder, num_nodes: int, scratch_dtype: str,
                        device: torch.device | str, memory_budget: int = BLOCK_MEMORY,
                        shared: bool = False) -> int:
    """Bytes of scratch space :func:`layerwise_embeddings` needs for a graph of
    ``num_nodes`` nodes (0 when its tables stay on the GPU; ``shared``: tables that ranks
    share, which are always files)."""
    ops = [layer_ops(encoder, i) for i in range(encoder.num_layers)]
    dtype = SCRATCH_DTYPES[scratch_dtype]
    if not shared and _tables_fit_on_device(ops, num_nodes, dtype, torch.device(device),
                                            memory_budget):
        return 0
    return table_bytes(ops, num_nodes, dtype)


def _tables_fit_on_device(ops: list[LayerOps], num_nodes: int, dtype: torch.dtype,
                          device: torch.device, memory_budget: int) -> bool:
    if device.type != "cuda":
        return False
    free, _ = torch.cuda.mem_get_info(device)
    return table_bytes(ops, num_nodes, dtype) + 2 * memory_budget <= DEVICE_TABLE_SHARE * free


class _ArraySink:
    def __init__(self, array: np.ndarray) -> None:
        self.array = array

    def write(self, start: int, rows: np.ndarray) -> None:
        self.array[start:start + rows.shape[0]] = rows


class _Pass:
    """The layers of one inference run, block by block (with ``share``: this rank's blocks
    of the layers before the last, see :class:`LayerShare`)."""

    def __init__(self, encoder: Encoder, ops: list[LayerOps], graph: GraphArrays, scratch: Path,
                 dtype: torch.dtype, device: torch.device, resident: bool,
                 progress: Progress | None = None, share: LayerShare | None = None) -> None:
        self.encoder, self.ops, self.graph = encoder, ops, graph
        self.scratch, self.dtype, self.device, self.resident = scratch, dtype, device, resident
        self.progress, self.share = progress, share
        self.owner = share is None or share.rank == 0

    def tables(self, layer: int) -> NodeTables:
        """Layer ``layer``'s tables: new ones, or with ``share`` those that rank 0 creates."""
        def make(create: bool) -> NodeTables:
            return NodeTables(self.scratch, f"layer-{layer}", self.graph.num_nodes,
                              self.ops[layer].widths, self.dtype, self.device, self.resident,
                              create=create)
        if self.share is None:
            return make(True)
        tables = make(True) if self.owner else None
        self.share.barrier(f"rank 0 to allocate the tables of layer {layer + 1}")
        return tables if tables is not None else make(False)

    def mine(self, block: int, layer: int) -> bool:
        """Whether this rank computes block ``block`` of the rows of ``layer``'s tables
        (``layer`` = number of layers: the output, which each rank computes for its nodes)."""
        return (self.share is None or layer == len(self.ops)
                or block % self.share.world_size == self.share.rank)

    def table_rows(self, layer: int, rows: Rows, h: torch.Tensor) -> list[torch.Tensor]:
        """Layer ``layer``'s table rows of the nodes ``rows`` with input rows ``h``."""
        ops = self.ops[layer]
        degree = None
        if ops.needs_out_degree:
            degree = to_device(torch.from_numpy(self.graph.out_degree(rows)), self.device)
        return ops.tables(h, degree)

    def layers(self, features: np.ndarray, destinations: list[np.ndarray | None], sink: RowSink,
               budget: int, batch_size: int | None) -> None:
        """Every layer; ``destinations``: the nodes layer 0 reads, then those each layer
        computes (None: all)."""
        tables = self.tables(0)
        itemsize = 2 if self.dtype == torch.float16 else 4
        row_bytes = features.shape[1] * 12 + 8 * sum(self.ops[0].widths)
        max_rows = _shared_rows(max(1, budget // row_bytes), destinations[0],
                                self.graph.num_nodes)
        for k, (_, rows) in enumerate(_row_blocks(self.graph, destinations[0], max_rows)):
            if self.mine(k, 0):
                h = to_device(host_tensor(np.asarray(features[rows])), self.device).float()
                tables.write(rows, self.table_rows(0, rows, h))
        done: NodeTables | None = None  # tables that no rank reads once this layer's are written
        for layer, ops in enumerate(self.ops):
            last = layer == len(self.ops) - 1
            if self.share is not None:
                self.share.barrier(f"every rank's rows of the tables of layer {layer + 1}")
                if done is not None:
                    done.delete(unlink=self.owner)
            following = None if last else self.tables(layer + 1)
            conv = self.encoder.convs[layer]
            later = 0 if last else sum(self.ops[layer + 1].widths)
            row_bytes = 4 * (2 * sum(ops.widths) + 4 * max(conv.in_dim, conv.out_dim) + 2 * later)
            edge_bytes = 8 + ops.edge_bytes
            if self.device.type == "cuda" and not self.resident:
                edge_bytes += 16 + 2 * itemsize * sum(ops.widths)  # relabelling, gathered rows
            max_rows = max(1, budget // 2 // row_bytes)
            if batch_size is not None:
                max_rows = min(max_rows, batch_size)
            if not last:
                max_rows = _shared_rows(max_rows, destinations[layer + 1], self.graph.num_nodes)
            blocks = _row_blocks(self.graph, destinations[layer + 1], max_rows,
                                 max(1, budget // 2 // edge_bytes))
            for k, (start, rows) in enumerate(blocks):
                if not self.mine(k, layer + 1):
                    continue
                block = Block(self.graph, rows, tables, self.device,
                              features if layer == 0 else None)
                h = finish_layer(self.encoder, layer, ops.block(block))
                if last:
                    sink.write(start, h.cpu().numpy())
                else:
                    following.write(rows, self.table_rows(layer + 1, rows, h))
                if self.progress is not None:
                    self.progress(layer, h.shape[0])
            if self.share is None or last:  # a peer still reading keeps the file's blocks
                tables.delete(unlink=self.owner)
            else:
                done = tables
            tables = following


def _shared_rows(max_rows: int, ids: np.ndarray | None, num_nodes: int) -> int:
    """``max_rows`` lowered so that a layer of the rows ``ids`` (None: all) has at least
    :data:`LAYER_BLOCKS` blocks (of at least :data:`MIN_BLOCK_ROWS` rows), which ranks
    can share; the same for any number of ranks, so the blocks are those of one process."""
    count = num_nodes if ids is None else ids.size
    return min(max_rows, max(MIN_BLOCK_ROWS, -(-count // LAYER_BLOCKS)))


def _row_blocks(graph: GraphArrays, ids: np.ndarray | None, max_rows: int,
                max_edges: int | None = None) -> Iterator[tuple[int, Rows]]:
    """(position in ``ids``, rows) of consecutive blocks of ``ids`` (None: all nodes) of at
    most ``max_rows`` rows and, unless one row has more, ``max_edges`` in-edges."""
    count = graph.num_nodes if ids is None else ids.size
    edges = None
    if max_edges is not None:  # in-edges before each position
        if ids is None:
            edges = graph.indptr
        else:
            edges = np.zeros(ids.size + 1, dtype=np.int64)
            np.cumsum(graph.in_edge_counts(ids), out=edges[1:])
    start = 0
    while start < count:
        end = min(start + max_rows, count)
        if edges is not None:
            limit = int(np.searchsorted(edges, int(edges[start]) + max_edges, side="right")) - 1
            end = max(start + 1, min(end, limit))
        if ids is None:
            yield start, slice(start, end)
        else:
            chunk = ids[start:end]
            consecutive = int(chunk[-1]) - int(chunk[0]) + 1 == chunk.size
            yield start, slice(int(chunk[0]), int(chunk[-1]) + 1) if consecutive else chunk
        start = end


def _check_graph(indptr: np.ndarray, indices: np.ndarray, features: np.ndarray,
                 batch_size: int | None) -> int:
    """Number of nodes N; ValueError unless the CSC and the features [N, F] agree."""
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if indptr.ndim != 1 or indptr.shape[0] < 1 or indices.ndim != 1:
        raise ValueError("graph indptr must be [N + 1] and indices [E]")
    num_nodes = indptr.shape[0] - 1
    if int(indptr[0]) != 0 or int(indptr[-1]) != indices.shape[0]:
        raise ValueError(f"indptr must run from 0 to the number of edges {indices.shape[0]}")
    if features.ndim != 2 or features.shape[0] != num_nodes:
        raise ValueError(f"features must be [{num_nodes}, F], got {features.shape}")
    return num_nodes


def _check_nodes(nodes: np.ndarray | None, num_nodes: int) -> np.ndarray | None:
    """``nodes`` as int64, or None when it is None or every node; ValueError unless it is
    1-D, integer, strictly ascending and within [0, num_nodes)."""
    if nodes is None:
        return None
    nodes = np.asarray(nodes)
    if nodes.ndim != 1 or not np.issubdtype(nodes.dtype, np.integer):
        raise ValueError(f"nodes must be a 1-D integer array, got {nodes.dtype} {nodes.shape}")
    nodes = nodes.astype(np.int64, copy=False)
    if nodes.size and (nodes[0] < 0 or nodes[-1] >= num_nodes or (np.diff(nodes) <= 0).any()):
        raise ValueError(f"nodes must be strictly ascending ids in [0, {num_nodes})")
    return None if nodes.size == num_nodes else nodes


def _check_degrees(num_nodes: int, in_degrees: np.ndarray | None,
                   out_degrees: np.ndarray | None) -> tuple[np.ndarray | None, np.ndarray | None]:
    """The given whole-graph degrees; ValueError unless both or neither are given, [N]."""
    if (in_degrees is None) != (out_degrees is None):
        raise ValueError("give both in_degrees and out_degrees, or neither")
    if in_degrees is not None and (in_degrees.shape != (num_nodes,)
                                   or out_degrees.shape != (num_nodes,)):
        raise ValueError(f"in_degrees and out_degrees must be [{num_nodes}]")
    return in_degrees, out_degrees


def _layer_destinations(graph: GraphArrays, nodes: np.ndarray | None, levels: int,
                        chunk: int = 1 << 16) -> list[np.ndarray | None]:
    """The nodes each of ``levels`` layers must compute (ascending int64 ids, None = all):
    ``nodes`` for the last; for an earlier one, the next one's nodes and their in-neighbours."""
    layers = [nodes]
    while len(layers) < levels:
        later = layers[0]
        if later is not None:
            needed = np.zeros(graph.num_nodes, dtype=bool)
            needed[later] = True
            for start in range(0, later.size, chunk):
                needed[graph.in_edges(later[start:start + chunk])[0]] = True
            later = None if needed.all() else np.flatnonzero(needed)
        layers.insert(0, later)
    return layers
