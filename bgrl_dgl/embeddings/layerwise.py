"""Exact full-graph embeddings, one layer at a time, for graphs larger than memory.

Sampled mini-batches approximate a node's receptive field; here every layer aggregates each
node's full in-neighbourhood. Layer ``i`` runs for all nodes (in batches of consecutive
destination ids, whose in-edges are one contiguous slice of the CSC arrays) and writes its
output for every node to a float32 memmap in a scratch directory, which layer ``i + 1``
reads. The work is O(L * E); memory holds one batch and its sources. Given a subset of
nodes, the last layer runs for those only and each earlier layer only for the nodes that the
next one reads (its destinations and their in-neighbours).

Every batch carries whole-graph degrees, so GCN normalisation equals that of a forward pass
over the whole graph at once (a batch's own out-degrees count only edges into the batch).
"""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from bgrl_dgl.model.adjacency import Adjacency

if TYPE_CHECKING:
    from bgrl_dgl.model.encoder import Encoder
    from bgrl_dgl.store.reader import GraphStore


def layerwise_embeddings(encoder: Encoder, graph_indptr: np.ndarray, graph_indices: np.ndarray,
                         features: np.ndarray, *, batch_size: int = 4096,
                         device: torch.device | str = "cpu", scratch_dir: Path | None = None,
                         out: np.ndarray | None = None, in_degrees: np.ndarray | None = None,
                         out_degrees: np.ndarray | None = None,
                         nodes: np.ndarray | None = None) -> np.ndarray:
    """The encoder's output for every node of a CSC graph: [N, encoder.out_dim], or for the
    nodes ``nodes`` only: [M, encoder.out_dim], row k for node ``nodes[k]``.

    ``graph_indptr`` [N + 1] and ``graph_indices`` [E] (int32/int64, memmaps welcome): the
    in-neighbours of ``v`` are ``graph_indices[graph_indptr[v]:graph_indptr[v + 1]]``.
    ``features``: [N, F] float16/float32, read in batches and converted to float32.
    The encoder runs in eval mode without gradients (its mode is restored afterwards).
    ``batch_size``: destination nodes per batch. Intermediate layers go to a temporary
    directory created inside ``scratch_dir`` (default: the system's temp dir) and removed at
    the end, also on error. The last layer is written to ``out`` (any writable [N, out_dim]
    floating array, e.g. a memmap) or to a new float32 array, which is returned.
    ``in_degrees``/``out_degrees`` [N]: whole-graph degrees, given together or not at all
    (then counted from the arrays; pass them for large graphs, as :func:`embed_store` does).
    ``nodes``: [M] strictly ascending integer ids in [0, N) (default: all nodes).
    """
    num_nodes = _check_graph(graph_indptr, graph_indices, features, batch_size)
    nodes = _check_nodes(nodes, num_nodes)
    degrees = _whole_graph_degrees(graph_indptr, graph_indices, in_degrees, out_degrees)
    rows = num_nodes if nodes is None else nodes.size
    if out is None:
        out = np.empty((rows, encoder.out_dim), dtype=np.float32)
    elif out.shape != (rows, encoder.out_dim) or not np.issubdtype(out.dtype, np.floating):
        raise ValueError(f"out must be a floating [{rows}, {encoder.out_dim}] array, "
                         f"got {out.dtype} {out.shape}")
    destinations = _layer_destinations(graph_indptr, graph_indices, nodes, encoder.num_layers,
                                       batch_size)

    was_training = encoder.training
    encoder.eval()
    scratch = Path(tempfile.mkdtemp(prefix="bgrl-inference-", dir=scratch_dir))
    try:
        with torch.no_grad():
            h, previous = features, None
            for layer in range(encoder.num_layers):
                last = layer == encoder.num_layers - 1
                target = out if last else scratch / f"layer-{layer}.f32"
                h = _run_layer(encoder, layer, graph_indptr, graph_indices, h, degrees,
                               batch_size, device, target, destinations[layer], compact=last)
                if previous is not None:  # this layer's input is no longer needed
                    previous.unlink()
                previous = None if last else target
        if isinstance(out, np.memmap):
            out.flush()
        return out
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        encoder.train(was_training)


def embed_store(encoder: Encoder, store: GraphStore, **kwargs) -> np.ndarray:
    """:func:`layerwise_embeddings` of the nodes of ``store``: [N, out_dim]; ``kwargs``
    as there (batch_size, device, scratch_dir, out, nodes)."""
    return layerwise_embeddings(encoder, store.indptr, store.indices, store.features,
                                in_degrees=store.in_degrees(), out_degrees=store.out_degrees(),
                                **kwargs)


def _check_graph(indptr: np.ndarray, indices: np.ndarray, features: np.ndarray,
                 batch_size: int) -> int:
    """Number of nodes N; ValueError unless the CSC and the features [N, F] agree."""
    if batch_size < 1:
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


def _layer_destinations(indptr: np.ndarray, indices: np.ndarray, nodes: np.ndarray | None,
                        num_layers: int, batch_size: int) -> list[np.ndarray | None]:
    """The nodes each layer must compute (ascending int64 ids, None = all): ``nodes`` for the
    last layer; for an earlier one, the next layer's nodes and their in-neighbours."""
    layers = [nodes]
    while len(layers) < num_layers:
        later = layers[0]
        if later is not None:
            needed = np.zeros(indptr.shape[0] - 1, dtype=bool)
            needed[later] = True
            for start in range(0, later.size, batch_size):
                needed[_in_edges(indptr, indices, later[start:start + batch_size])[0]] = True
            later = None if needed.all() else np.flatnonzero(needed)
        layers.insert(0, later)
    return layers


def _whole_graph_degrees(indptr: np.ndarray, indices: np.ndarray, in_degrees: np.ndarray | None,
                         out_degrees: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """(in-degree, out-degree) [N] float32 of every node."""
    if (in_degrees is None) != (out_degrees is None):
        raise ValueError("give both in_degrees and out_degrees, or neither")
    num_nodes = indptr.shape[0] - 1
    if in_degrees is None:
        in_degrees = np.diff(indptr)
        out_degrees = np.bincount(indices, minlength=num_nodes)
    if in_degrees.shape != (num_nodes,) or out_degrees.shape != (num_nodes,):
        raise ValueError(f"in_degrees and out_degrees must be [{num_nodes}]")
    return in_degrees.astype(np.float32), out_degrees.astype(np.float32)


def _run_layer(encoder: Encoder, layer: int, indptr: np.ndarray, indices: np.ndarray,
               h: np.ndarray, degrees: tuple[np.ndarray, np.ndarray], batch_size: int,
               device: torch.device | str, target: np.ndarray | Path,
               destinations: np.ndarray | None, compact: bool) -> np.ndarray:
    """Layer ``layer`` for ``destinations`` (ascending ids, None = all nodes) from the inputs
    ``h`` [N, d_in] (row = node id) into ``target``: an array, or a path where a float32
    [N, d_out] memmap is created once the output width is known. The output of the k-th
    destination goes to row k of ``target`` when ``compact``, else to the row of its id."""
    num_nodes = indptr.shape[0] - 1
    count = num_nodes if destinations is None else destinations.size
    for start in range(0, count, batch_size):
        end = min(start + batch_size, count)
        dst = np.arange(start, end) if destinations is None else destinations[start:end]
        adj, sources = _batch_adjacency(indptr, indices, dst, degrees)
        x = torch.from_numpy(_float32_rows(h, dst, sources)).to(device)
        y = encoder.layer_forward(layer, adj.to(device), x).cpu().numpy()
        if isinstance(target, Path):
            target = np.memmap(target, dtype=np.float32, mode="w+", shape=(num_nodes, y.shape[1]))
        target[slice(start, end) if compact or destinations is None else dst] = y
    if isinstance(target, Path):  # no nodes, no batches
        target = np.empty((num_nodes, 0), dtype=np.float32)
    return target


def _consecutive(ids: np.ndarray) -> bool:
    """Whether the ascending distinct ids [B] (B >= 1) are ``ids[0], ids[0] + 1, ...``."""
    return int(ids[-1]) - int(ids[0]) + 1 == ids.size


def _rows(array: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """``array[ids]`` for ascending distinct ids, read as one slice when they are consecutive."""
    return array[ids[0]:ids[-1] + 1] if _consecutive(ids) else array[ids]


def _in_edges(indptr: np.ndarray, indices: np.ndarray,
              dst: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The in-neighbours of the ascending ids ``dst`` [B], concatenated: [E_b] int64, and
    their offsets per destination [B + 1] int64 (a CSC over the batch)."""
    if _consecutive(dst):  # one contiguous slice of the CSC arrays
        first = int(indptr[dst[0]])
        offsets = np.asarray(indptr[dst[0]:dst[-1] + 2], dtype=np.int64) - first
        return np.asarray(indices[first:first + offsets[-1]], dtype=np.int64), offsets
    starts = np.asarray(indptr[dst], dtype=np.int64)
    counts = np.asarray(indptr[dst + 1], dtype=np.int64) - starts
    offsets = np.zeros(dst.size + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    positions = np.repeat(starts - offsets[:-1], counts) + np.arange(offsets[-1])
    return np.asarray(indices[positions], dtype=np.int64), offsets


def _batch_adjacency(indptr: np.ndarray, indices: np.ndarray, dst: np.ndarray,
                     degrees: tuple[np.ndarray, np.ndarray]) -> tuple[Adjacency, np.ndarray]:
    """The block of the ascending destinations ``dst`` [B] with all their in-edges.

    Its sources are the destinations (local ids ``0..B-1``), then the other in-neighbours
    ``sources`` [S] int64, ascending (local ids ``B..``).
    """
    neighbours, local_indptr = _in_edges(indptr, indices, dst)
    num_dst = dst.size
    if _consecutive(dst):
        slot = neighbours - dst[0]
        inside = (slot >= 0) & (slot < num_dst)
    else:
        slot = np.minimum(np.searchsorted(dst, neighbours), num_dst - 1)
        inside = dst[slot] == neighbours
    sources = np.unique(neighbours[~inside])
    local = np.where(inside, slot, num_dst + np.searchsorted(sources, neighbours))
    in_deg, out_deg = degrees
    src_degree = np.concatenate([_rows(out_deg, dst), out_deg[sources]])
    adj = Adjacency(torch.from_numpy(local_indptr), torch.from_numpy(local), num_dst + sources.size,
                    src_degree=torch.from_numpy(src_degree),
                    dst_degree=torch.from_numpy(np.ascontiguousarray(_rows(in_deg, dst))))
    return adj, sources


def _float32_rows(h: np.ndarray, dst: np.ndarray, sources: np.ndarray) -> np.ndarray:
    """Rows ``dst`` then rows ``sources`` of ``h`` (both ascending) as one float32
    [B + S, d] array: forward gathers from a memmap."""
    rows = np.empty((dst.size + sources.size, h.shape[1]), dtype=np.float32)
    rows[:dst.size] = _rows(h, dst)
    rows[dst.size:] = h[sources]
    return rows

