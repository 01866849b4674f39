"""The Planetoid citation graphs (Yang et al., 2016): Cora, CiteSeer, PubMed.

Files ``ind.NAME.<part>`` in ``--root``, Python 2 pickles read with a restricted unpickler:
``allx``/``ally`` (features [L, F] and one-hot labels [L, C] of the first L nodes, of
which the first ``len(y)`` form the training set), ``tx``/``ty`` (features and labels of
the test nodes, in the order of ``test.index``), ``y`` (training labels), ``graph`` (dict:
node -> list of neighbours) and ``test.index`` (text, one node id per line). ``x`` (the
first ``len(y)`` rows of ``allx``) is not needed.

Node order is the standard one: node i < L is row i of ``allx``; node ``test.index[j]`` is
row j of ``tx``. Ids in ``[L, max(test.index)]`` missing from ``test.index`` (CiteSeer's
isolated test nodes) get all-zero features and no label, so ids stay aligned with
``graph``. The public split: train = ``range(len(y))`` (20 per class), valid = the next
500 nodes, test = ``test.index``; unlabelled nodes are left out of every split.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Mapping

import numpy as np
import scipy.sparse as sp

from bgrl_dgl.errors import InputError
from bgrl_dgl.sources import UNDIRECTED, Source
from bgrl_dgl.sources.npz import sparse_graph_plan, write_sparse_features
from bgrl_dgl.sources.safe_pickle import checked_sparse, load_restricted
from bgrl_dgl.store.format import regular_file

if TYPE_CHECKING:
    from bgrl_dgl.store.writer import StoreWriter

NUM_VALID = 500
PICKLED_PARTS = ("allx", "ally", "tx", "ty", "y", "graph")
EDGES_PER_CHUNK = 1 << 20


@dataclass
class PlanetoidGraph:
    """A Planetoid graph in standard node order."""

    features: sp.csr_matrix            # [N, F]
    labels: np.ndarray                 # [N] int64, -1 = unlabelled
    num_classes: int
    adjacency: Mapping[int, list[int]]  # node -> neighbours (edges node -> neighbour)
    splits: dict[str, np.ndarray]      # train/valid/test -> sorted int64 node ids

    @property
    def num_nodes(self) -> int:
        return self.features.shape[0]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--root", required=True, metavar="DIR",
                        help="directory holding the ind.NAME.* files")
    parser.add_argument("--name", required=True,
                        help="dataset name as in the file names: cora, citeseer or pubmed")


def build(args: argparse.Namespace, writer: "StoreWriter") -> None:
    files = planetoid_files(args.root, args.name)
    graph = read_planetoid(files)
    graph_path = str(files["graph"])
    writer.plan(sparse_graph_plan(writer, graph.num_nodes,
                                  sum(map(len, graph.adjacency.values())), graph.features,
                                  args, files["allx"]))
    writer.write_topology(graph.num_nodes, lambda: adjacency_edge_chunks(graph.adjacency),
                          source_path=graph_path, symmetrize=args.symmetrize,
                          self_loops=args.self_loops, dedup=args.dedup)
    write_sparse_features(writer, graph.features, source_path=files["allx"])
    writer.write_labels(graph.labels, source_path=str(files["ally"]),
                        num_classes=graph.num_classes)
    for name, ids in graph.splits.items():
        writer.write_split(name, ids, source_path=str(files["test.index"]))


def planetoid_files(root: str | Path, name: str) -> dict[str, Path]:
    """part -> path of ``ind.NAME.part``; InputError naming the first missing file."""
    files = {part: Path(root) / f"ind.{name}.{part}" for part in (*PICKLED_PARTS, "test.index")}
    for path in files.values():
        regular_file(path, "Planetoid file")
    return files


def read_planetoid(files: dict[str, Path]) -> PlanetoidGraph:
    """Load the parts in ``files`` (see :func:`planetoid_files`) into standard node order."""
    parts = {part: load_restricted(files[part]) for part in PICKLED_PARTS}
    allx = _feature_matrix(files["allx"], parts["allx"])
    tx = _feature_matrix(files["tx"], parts["tx"])
    ally = _onehot_labels(files["ally"], parts["ally"], allx.shape[0])
    ty = _onehot_labels(files["ty"], parts["ty"], tx.shape[0])
    num_train = _onehot_labels(files["y"], parts["y"], None).shape[0]
    test_index = read_test_index(files["test.index"], tx.shape[0], allx.shape[0])
    if tx.shape[1] != allx.shape[1]:
        raise InputError(files["tx"],
                         f"has {tx.shape[1]} feature columns, allx has {allx.shape[1]}")
    if ty.shape[1] != ally.shape[1]:
        raise InputError(files["ty"], f"has {ty.shape[1]} classes, ally has {ally.shape[1]}")
    if test_index.size and test_index.min() < allx.shape[0]:
        raise InputError(files["test.index"], f"test node {test_index.min()} is also a row of "
                                              f"allx (which covers nodes 0..{allx.shape[0] - 1})")
    if num_train + NUM_VALID > allx.shape[0]:
        raise InputError(files["allx"], f"has {allx.shape[0]} rows, fewer than the {num_train} "
                                        f"training and {NUM_VALID} validation nodes")
    features, labels = standard_node_order(allx, ally, tx, ty, test_index)
    return PlanetoidGraph(features, labels, ally.shape[1],
                          _adjacency(files["graph"], parts["graph"]),
                          public_split(num_train, test_index, labels))


def standard_node_order(allx: sp.csr_matrix, ally: np.ndarray, tx: sp.csr_matrix,
                        ty: np.ndarray, test_index: np.ndarray
                        ) -> tuple[sp.csr_matrix, np.ndarray]:
    """Features [N, F] and labels [N] int64 (-1 = none), N = max(len(allx), max(test_index)+1).

    Node i < len(allx) is row i of allx/ally; node test_index[j] is row j of tx/ty; other ids
    get zero features and label -1.
    """
    num_known = allx.shape[0]
    num_nodes = max(num_known, int(test_index.max()) + 1 if test_index.size else 0)
    placement = sp.csr_matrix((np.ones(test_index.size, np.float32),
                               (test_index - num_known, np.arange(test_index.size))),
                              shape=(num_nodes - num_known, test_index.size))
    features = sp.vstack([allx, (placement @ tx).astype(allx.dtype)], format="csr")
    labels = np.full(num_nodes, -1, np.int64)
    labels[:num_known] = labels_from_onehot(ally)
    labels[test_index] = labels_from_onehot(ty)
    return features, labels


def public_split(num_train: int, test_index: np.ndarray,
                 labels: np.ndarray) -> dict[str, np.ndarray]:
    """The Planetoid split as sorted int64 ids, leaving out unlabelled nodes."""
    splits = {"train": np.arange(num_train),
              "valid": np.arange(num_train, num_train + NUM_VALID),
              "test": np.sort(test_index)}
    return {name: ids[labels[ids] >= 0].astype(np.int64) for name, ids in splits.items()}


def _feature_matrix(path: Path, value: object) -> sp.csr_matrix:
    return checked_sparse(value, path, "feature matrix")


def _onehot_labels(path: Path, value: object, num_rows: int | None) -> np.ndarray:
    """A [num_rows, C] one-hot label array (num_rows None: any)."""
    if not isinstance(value, np.ndarray) or value.ndim != 2 or value.dtype.kind not in "biuf":
        raise InputError(path, f"expected a 2-D numeric one-hot label array, found "
                               f"{_describe(value)}")
    if num_rows is not None and value.shape[0] != num_rows:
        raise InputError(path, f"has {value.shape[0]} rows, expected {num_rows} "
                               "(one per row of the matching features)")
    return value


def _describe(value: object) -> str:
    shape = getattr(value, "shape", None)
    dtype = getattr(value, "dtype", None)
    return (type(value).__name__ + ("" if dtype is None else f" of {dtype}")
            + ("" if shape is None else f" of shape {tuple(shape)}"))


def labels_from_onehot(onehot: np.ndarray) -> np.ndarray:
    """[R, C] one-hot rows -> [R] int64 class ids; all-zero rows -> -1."""
    return np.where(onehot.any(axis=1), onehot.argmax(axis=1), -1).astype(np.int64)


def read_test_index(path: Path, num_rows: int, num_known: int = 0) -> np.ndarray:
    """The node ids in ``test.index`` (one per line), one per row of ``tx``; [num_rows] int64.

    Ids lie in [0, num_known + 2 * num_rows): the test nodes follow the ``num_known`` rows of
    allx, with at most as many unlisted ids among them (CiteSeer's isolated nodes) as listed.
    """
    try:
        lines = path.read_text().split()
    except (OSError, UnicodeDecodeError) as err:
        raise InputError(path, f"cannot read: {err}") from None
    try:
        ids = np.array([int(line) for line in lines], dtype=np.int64)
    except (ValueError, OverflowError) as err:
        raise InputError(path, f"expected one integer node id per line: {err}") from None
    if ids.size != num_rows:
        raise InputError(path, f"has {ids.size} node ids, expected {num_rows} (one per row of tx)")
    limit = num_known + 2 * num_rows
    if ids.size and (ids.min() < 0 or ids.max() >= limit):
        bad = ids.min() if ids.min() < 0 else ids.max()
        raise InputError(path, f"node id {bad} is outside [0, {limit}) (allx has {num_known} "
                               f"rows and tx {num_rows}; ids beyond them are at most as many "
                               "as the test nodes)")
    if np.unique(ids).size != ids.size:
        raise InputError(path, "lists a node id more than once")
    return ids


def _adjacency(path: Path, value: object) -> Mapping[int, list[int]]:
    if not isinstance(value, Mapping):
        raise InputError(path, f"expected a dict of neighbour lists, found {_describe(value)}")
    for node, neighbours in value.items():
        if not _is_id(node):
            raise InputError(path, f"node {node!r} is not an integer node id")
        if not isinstance(neighbours, (list, tuple)):
            raise InputError(path, f"neighbours of node {node!r} are not a list: "
                                   f"{_describe(neighbours)}")
        bad = next((n for n in neighbours if not _is_id(n)), None)
        if bad is not None or any(isinstance(n, bool) for n in neighbours):
            raise InputError(path, f"neighbours of node {node!r} hold {bad!r}, not an "
                                   "integer node id")
    return value


def _is_id(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool) \
        and 0 <= value < 2**63


def adjacency_edge_chunks(adjacency: Mapping[int, list[int]],
                          edges_per_chunk: int = EDGES_PER_CHUNK
                          ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(src, dst) int64 chunks of about ``edges_per_chunk`` edges, node -> each neighbour."""
    sources: list[int] = []
    counts: list[int] = []
    targets: list[int] = []
    for node, neighbours in adjacency.items():
        sources.append(node)
        counts.append(len(neighbours))
        targets.extend(neighbours)
        if len(targets) >= edges_per_chunk:
            yield np.repeat(np.asarray(sources), counts), np.asarray(targets)
            sources, counts, targets = [], [], []
    if targets:
        yield np.repeat(np.asarray(sources), counts), np.asarray(targets)


SOURCE = Source(
    name="planetoid",
    help="a Planetoid citation graph (ind.NAME.* files: Cora, CiteSeer, PubMed) with its "
         "public split",
    add_arguments=add_arguments,
    build=build,
    topology=UNDIRECTED,
)
