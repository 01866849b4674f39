"""Progress of exact layer-wise inference: one bar per encoder layer, in nodes computed.

:class:`LayerProgress` is the ``progress`` hook of :func:`~bgrl_dgl.embeddings.layerwise.
layerwise_embeddings`: it counts the destination nodes of each block on the bar of its
layer. :func:`embed_store_with_progress` is :func:`~bgrl_dgl.embeddings.layerwise.embed_store`
so counted.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from bgrl_dgl.embeddings.layerwise import embed_store
from bgrl_dgl.model.encoder import Encoder
from bgrl_dgl.progress import progress_bar
from bgrl_dgl.store.reader import GraphStore


class LayerProgress:
    """A progress bar per layer; ``totals[i]``: the nodes layer ``i`` will compute (None:
    unknown). Call as ``progress(layer, count)``; use as a context manager, which closes
    the bars."""

    def __init__(self, totals: list[int | None]) -> None:
        self._totals = totals
        self._bars: dict[int, Any] = {}

    def __enter__(self) -> "LayerProgress":
        return self

    def __exit__(self, *exc: object) -> None:
        for bar in self._bars.values():
            bar.close()

    def __call__(self, i: int, count: int) -> None:
        """``count`` more destination nodes of layer ``i`` computed."""
        if i not in self._bars:
            for bar in self._bars.values():
                bar.close()
            self._bars[i] = progress_bar(total=self._totals[i], unit="nodes", scale=True,
                                         desc=f"embed layer {i + 1}/{len(self._totals)}")
        self._bars[i].update(count)


def embed_store_with_progress(encoder: Encoder, store: GraphStore,
                              nodes: np.ndarray | None = None, **kwargs: Any) -> Any:
    """:func:`~bgrl_dgl.embeddings.layerwise.embed_store` of ``nodes`` (None: all), with a
    progress bar per layer (the earlier layers of a subset, or of ranks that share them,
    compute an unknown number)."""
    last = store.num_nodes if nodes is None else len(nodes)
    known = nodes is None and kwargs.get("share") is None
    earlier = [store.num_nodes if known else None] * (encoder.num_layers - 1)
    with LayerProgress([*earlier, last]) as progress:
        return embed_store(encoder, store, nodes=nodes, progress=progress, **kwargs)
