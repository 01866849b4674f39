"""Exact full-graph embeddings, one layer at a time, for graphs larger than memory.

Sampled mini-batches approximate a node's receptive field; here every layer aggregates each
node's full in-neighbourhood. Layer ``i`` runs for all nodes (in batches of consecutive
destination ids, whose in-edges are one contiguous slice of the CSC arrays) and writes its
output for every node to a float32 memmap in a scratch directory, which layer ``i + 1``
reads. The work is O(L * E); memory holds one batch and its sources.

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

from .adjacency import Adjacency

if TYPE_CHECKING:
    from .model import Encoder
    from .store import GraphStore


def layerwise_embeddings(encoder: Encoder, graph_indptr: np.ndarray, graph_indices: np.ndarray,
                         features: np.ndarray, *, batch_size: int = 4096,
                         device: torch.device | str = "cpu", scratch_dir: Path | None = None,
                         out: np.ndarray | None = None, in_degrees: np.ndarray | None = None,
                         out_degrees: np.ndarray | None = None) -> np.ndarray:
    """The encoder's output for every node of a CSC graph: [N, encoder.out_dim].

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
    """
    num_nodes = _check_graph(graph_indptr, graph_indices, features, batch_size)
    degrees = _whole_graph_degrees(graph_indptr, graph_indices, in_degrees, out_degrees)
    if out is None:
        out = np.empty((num_nodes, encoder.out_dim), dtype=np.float32)
    elif out.shape != (num_nodes, encoder.out_dim) or not np.issubdtype(out.dtype, np.floating):
        raise ValueError(f"out must be a floating [{num_nodes}, {encoder.out_dim}] array, "
                         f"got {out.dtype} {out.shape}")

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
                               batch_size, device, target)
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
    """:func:`layerwise_embeddings` of every node of ``store``: [N, out_dim]; ``kwargs``
    as there (batch_size, device, scratch_dir, out)."""
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
               device: torch.device | str, target: np.ndarray | Path) -> np.ndarray:
    """Layer ``layer`` for all nodes from their inputs ``h`` [N, d_in] into ``target`` (an
    array, or a path where a float32 memmap is created once the output width is known)."""
    num_nodes = indptr.shape[0] - 1
    for start in range(0, num_nodes, batch_size):
        end = min(start + batch_size, num_nodes)
        adj, sources = _batch_adjacency(indptr, indices, start, end, degrees)
        x = torch.from_numpy(_float32_rows(h, start, end, sources)).to(device)
        y = encoder.layer_forward(layer, adj.to(device), x).cpu().numpy()
        if isinstance(target, Path):
            target = np.memmap(target, dtype=np.float32, mode="w+", shape=(num_nodes, y.shape[1]))
        target[start:end] = y
    if isinstance(target, Path):  # no nodes, no batches
        target = np.empty((num_nodes, 0), dtype=np.float32)
    return target


def _batch_adjacency(indptr: np.ndarray, indices: np.ndarray, start: int, end: int,
                     degrees: tuple[np.ndarray, np.ndarray]) -> tuple[Adjacency, np.ndarray]:
    """The block of destinations ``start..end-1`` with all their in-edges.

    Its sources are the destinations (local ids ``0..end-start-1``), then the other
    in-neighbours ``sources`` [S] int64, ascending (local ids ``end-start..``).
    """
    first, stop = int(indptr[start]), int(indptr[end])
    neighbours = np.asarray(indices[first:stop], dtype=np.int64)
    local_indptr = np.asarray(indptr[start:end + 1], dtype=np.int64) - first
    inside = (neighbours >= start) & (neighbours < end)
    sources = np.unique(neighbours[~inside])
    num_dst = end - start
    local = np.where(inside, neighbours - start, num_dst + np.searchsorted(sources, neighbours))
    in_deg, out_deg = degrees
    src_degree = np.concatenate([out_deg[start:end], out_deg[sources]])
    adj = Adjacency(torch.from_numpy(local_indptr), torch.from_numpy(local), num_dst + sources.size,
                    src_degree=torch.from_numpy(src_degree),
                    dst_degree=torch.from_numpy(in_deg[start:end]))
    return adj, sources


def _float32_rows(h: np.ndarray, start: int, end: int, sources: np.ndarray) -> np.ndarray:
    """Rows ``start..end-1`` then rows ``sources`` of ``h`` as one float32 [B + S, d] array
    (a contiguous read and an ascending gather from a memmap)."""
    rows = np.empty((end - start + sources.size, h.shape[1]), dtype=np.float32)
    rows[:end - start] = h[start:end]
    rows[end - start:] = h[sources]
    return rows

