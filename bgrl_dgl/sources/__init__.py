"""Graph sources for ``bgrl-dgl prepare SOURCE``.

Each module in this package defines ``SOURCE``, a :class:`Source`: its command-line options
and a ``build`` function that streams the graph into a :class:`~bgrl_dgl.builder.StoreWriter`
(topology, features, labels, splits, original ids). The writer validates and commits; a
source only reads its input and raises :class:`~bgrl_dgl.errors.InputError` on bad input.
"""
from __future__ import annotations

import argparse
import importlib
import pkgutil
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    from ..builder import StoreWriter


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
UNDIRECTED = {"symmetrize": True, "self_loops": "remove", "dedup": True}


def available_sources() -> dict[str, Source]:
    """Name -> Source for every module of this package that defines ``SOURCE``."""
    found = {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{__name__}.{info.name}")
        source = getattr(module, "SOURCE", None)
        if isinstance(source, Source):
            found[source.name] = source
    return found
