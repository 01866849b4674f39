"""Progress of exact layer-wise inference: one bar per encoder layer, in nodes computed.

:class:`LayerProgress` stands in for an encoder wherever :func:`~bgrl_dgl.embeddings.layerwise.
layerwise_embeddings` takes one: it forwards everything to the encoder and counts the
destination nodes of each ``layer_forward`` call on the bar of that layer.
:func:`embed_store_with_progress` is :func:`~bgrl_dgl.embeddings.layerwise.embed_store` so
counted.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from bgrl_dgl.embeddings.layerwise import embed_store
from bgrl_dgl.model.adjacency import Adjacency
from bgrl_dgl.model.encoder import Encoder
from bgrl_dgl.progress import progress_bar
from bgrl_dgl.store.reader import GraphStore


class LayerProgress:
    """``encoder`` with a progress bar per layer; ``totals[i]``: the nodes layer ``i`` will
    compute (None: unknown). Use as a context manager, which closes the bars."""

    def __init__(self, encoder: Encoder, totals: list[int | None]) -> None:
        self._encoder = encoder
        self._totals = totals
        self._bars: dict[int, Any] = {}

    def __getattr__(self, name: str) -> Any:
        return getattr(self._encoder, name)

    def __enter__(self) -> "LayerProgress":
        return self

    def __exit__(self, *exc: object) -> None:
        for bar in self._bars.values():
            bar.close()

    def layer_forward(self, i: int, adj: Adjacency, h: torch.Tensor, *args: Any,
                      **kwargs: Any) -> torch.Tensor:
        """The encoder's layer ``i``, its destination nodes counted on that layer's bar."""
        if i not in self._bars:
            for bar in self._bars.values():
                bar.close()
            self._bars[i] = progress_bar(total=self._totals[i], unit="nodes", scale=True,
                                         desc=f"embed layer {i + 1}/{len(self._totals)}")
        out = self._encoder.layer_forward(i, adj, h, *args, **kwargs)
        self._bars[i].update(adj.num_dst)
        return out


def embed_store_with_progress(encoder: Encoder, store: GraphStore,
                              nodes: np.ndarray | None = None, **kwargs: Any) -> np.ndarray:
    """:func:`~bgrl_dgl.embeddings.layerwise.embed_store` of ``nodes`` (None: all), with a
    progress bar per layer (the earlier layers of a subset compute an unknown number)."""
    last = store.num_nodes if nodes is None else len(nodes)
    earlier = [store.num_nodes if nodes is None else None] * (encoder.num_layers - 1)
    with LayerProgress(encoder, [*earlier, last]) as counted:
        return embed_store(counted, store, nodes=nodes, **kwargs)
