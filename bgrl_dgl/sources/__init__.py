"""Graph sources for ``bgrl-dgl prepare SOURCE``.

Each module in this package defines ``SOURCE``, a :class:`Source`: its command-line options
and a ``build`` function that streams the graph into a :class:`~bgrl_dgl.store.writer.StoreWriter`
(topology, features, labels, splits, original ids). The writer validates and commits; a
source only reads its input and raises :class:`~bgrl_dgl.errors.InputError` on bad input.
"""
from __future__ import annotations

import argparse
import importlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterator

import numpy as np

if TYPE_CHECKING:
    from bgrl_dgl.store.writer import StoreWriter


@dataclass(frozen=True)
class Source:
    """One input format.

    ``add_arguments(parser)`` adds the format's own flags; ``build(args, writer)`` writes the
    graph. ``topology`` gives this format's defaults for the shared topology flags
    (``symmetrize``, ``self_loops``, ``dedup``), which the user may override.
    """

    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    build: Callable[[argparse.Namespace, "StoreWriter"], None]
    topology: dict[str, Any] = field(default_factory=dict)


# Topology defaults for citation-style graphs, which GNNs treat as undirected.
# (src, dst) id arrays, chunk after chunk: how sources hand edges to the store writer.
EdgeChunks = Iterator[tuple[np.ndarray, np.ndarray]]

UNDIRECTED = {"symmetrize": True, "self_loops": "remove", "dedup": True}


# Each named module defines SOURCE; importing one only when it is used keeps the command line
# quick (several formats need torch, pandas or ogb).
SOURCE_NAMES = ("synthetic", "npz", "planetoid", "parquet", "ogb", "mag240m")


def load_source(name: str) -> Source:
    """The Source of module ``name`` (one of :data:`SOURCE_NAMES`)."""
    return importlib.import_module(f"{__name__}.{name}").SOURCE


def available_sources(names: tuple[str, ...] = SOURCE_NAMES) -> dict[str, Source]:
    """Name -> Source for ``names`` (default: every format)."""
    return {name: load_source(name) for name in names}
