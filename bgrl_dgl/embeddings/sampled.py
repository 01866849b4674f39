"""Sampled inference: the encoder over neighbour-sampled blocks (``embed --fanouts``),
the alternative to exact layer-wise inference for a fixed cost per node."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from bgrl_dgl.embeddings.layer_progress import embed_store_with_progress
from bgrl_dgl.embeddings.layerwise import LayerShare
from bgrl_dgl.embeddings.parquet import PartLayout
from bgrl_dgl.embeddings.rowstream import StreamedParts
from bgrl_dgl.errors import InputError
from bgrl_dgl.loading.loader import NeighborBatchSampler, batch_rng_seed
from bgrl_dgl.model.encoder import Encoder
from bgrl_dgl.progress import progress_bar
from bgrl_dgl.store.reader import GraphStore


# ---- computing and writing -----------------------------------------------------------------
@dataclass(frozen=True)
class InferenceOptions:
    """How embeddings are computed: exact layer-wise, or sampled with ``fanouts``.
    ``batch_size`` None: sized from a memory budget (exact), 4096 (sampled)."""

    batch_size: int | None = None
    device: str = "auto"
    fanouts: list[int] | None = None
    seed: int = 0
    scratch_dtype: str = "float32"


def sampled_embeddings(encoder: Encoder, sampler: NeighborBatchSampler, nodes: np.ndarray,
                       out: np.ndarray, batch_size: int, seed: int, stream: int,
                       device: torch.device) -> None:
    """The encoder over neighbour-sampled blocks of ``nodes`` [M] into ``out`` [M, D].

    Batch ``j`` is sampled with the seed of (``seed``, ``stream``, ``j``), so the result for
    a stream of nodes (a part) does not depend on what else is computed.
    """
    with torch.no_grad():
        for j, start in enumerate(range(0, nodes.size, batch_size)):
            view = sampler.view(torch.from_numpy(nodes[start:start + batch_size]),
                                batch_rng_seed(seed, stream, j)).to(device)
            out[start:start + batch_size] = encoder(view.adjs, view.features).cpu().numpy()


def compute_parts(encoder: Encoder, store: GraphStore, layout: PartLayout, parts: list[int],
                  out: np.ndarray | StreamedParts, options: InferenceOptions, scratch: Path,
                  sampling_degrees: bool, device: torch.device, share: LayerShare | None = None,
                  shared_parts: list[int] | None = None) -> None:
    """Embeddings of the rows of ``parts`` (ascending), one after another, into ``out``
    (an array, or with exact inference a sink of the rows in order). ``share``: exact
    inference whose earlier layers this rank computes with others (see ranks.py) for the
    parts ``shared_parts`` of all of them, in the directory ``scratch`` that they share."""
    encoder = encoder.to(device)
    if options.fanouts is None:
        shared = None
        if share is not None:
            shared = part_nodes(layout, parts if shared_parts is None else shared_parts)
        embed_store_with_progress(encoder, store, part_nodes(layout, parts),
                                  batch_size=options.batch_size, device=device,
                                  scratch_dir=scratch, out=out,
                                  scratch_dtype=options.scratch_dtype,
                                  check_space=False,  # checked by the export
                                  share=share, shared_nodes=shared)
        return
    sampler = NeighborBatchSampler(store, options.fanouts, sampling_degrees)
    offset = 0
    with progress_bar(total=len(out), desc="embed (sampled)", unit="nodes", scale=True) as bar:
        for part in parts:
            nodes = layout.node_ids(part)
            sampled_embeddings(encoder, sampler, nodes, out[offset:offset + nodes.size],
                               options.batch_size or 4096, options.seed, part, device)
            offset += nodes.size
            bar.update(nodes.size)


def part_nodes(layout: PartLayout, parts: list[int]) -> np.ndarray | None:
    """The store indices of the rows of ``parts`` (ascending; None: every node)."""
    if layout.nodes is None and len(parts) == layout.num_parts:
        return None
    if not parts:
        return np.zeros(0, dtype=np.int64)
    return np.concatenate([layout.node_ids(p) for p in parts])


def check_fanouts(fanouts: list[int] | None, num_layers: int) -> None:
    if fanouts is None:
        return
    if len(fanouts) != num_layers or any(f == 0 or f < -1 for f in fanouts):
        raise InputError(None, f"--fanouts needs {num_layers} positive counts (or -1 = all), "
                               f"one per encoder layer, got {','.join(map(str, fanouts))}")

