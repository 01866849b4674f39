"""Graphs in the gnn-benchmark ``.npz`` format (Shchur et al., 2018), such as ``cora.npz``.

The archive holds two scipy CSR matrices as their parts, ``<prefix>_data``,
``<prefix>_indices``, ``<prefix>_indptr`` and ``<prefix>_shape``: the adjacency (prefix
``adj``, [N, N], row = source node, column = destination node; entries with value 0 are not
edges) and the node features (prefix ``attr``, [N, F], usually binary bag-of-words), plus
``labels`` ([N] integer class ids). The graph has no standard split: one is drawn at
random, stratified by class, with ``--seed``.
"""
from __future__ import annotations

import argparse
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import numpy as np
import scipy.sparse as sp

from bgrl_dgl.errors import InputError
from bgrl_dgl.sources import UNDIRECTED, Source
from bgrl_dgl.splits import DEFAULT_FRACTIONS, parse_fractions, stratified_split
from bgrl_dgl.store.capacity import StorePlan, check_memory
from bgrl_dgl.store.format import regular_file

if TYPE_CHECKING:
    from bgrl_dgl.store.writer import StoreWriter

CSR_PARTS = ("data", "indices", "indptr", "shape")
REQUIRED_KEYS = (*(f"adj_{part}" for part in CSR_PARTS),
                 *(f"attr_{part}" for part in CSR_PARTS), "labels")
# Working bytes per edge while streaming: its CSR position, source and destination ids.
EDGE_CHUNK_BYTES = 3 * 8
# Memory per node while the split is drawn and the labels are stored (sorts and copies).
SPLIT_BYTES_PER_NODE = 48


@dataclass
class NpzGraph:
    """The parts of a gnn-benchmark archive, checked for consistency."""

    adjacency: sp.csr_matrix  # [N, N], explicit zeros removed
    features: sp.csr_matrix   # [N, F]
    labels: np.ndarray        # [N] int64

    @property
    def num_nodes(self) -> int:
        return self.adjacency.shape[0]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input", required=True, metavar="FILE", help="the .npz archive")
    parser.add_argument("--split", type=parse_fractions, default=DEFAULT_FRACTIONS,
                        metavar="TRAIN/VALID/TEST",
                        help="fractions of each class in the random train/valid/test split, "
                             "drawn with --seed (default: 0.1/0.1/0.8, as in the BGRL paper)")


def build(args: argparse.Namespace, writer: "StoreWriter") -> None:
    graph = read_npz(args.input)
    writer.plan(sparse_graph_plan(writer, graph.num_nodes, graph.adjacency.nnz, graph.features,
                                  args, args.input))
    chunk = writer.rows_per_chunk(EDGE_CHUNK_BYTES)
    writer.write_topology(
        graph.num_nodes,
        lambda: csr_edge_chunks(graph.adjacency.indptr, graph.adjacency.indices, chunk),
        source_path=args.input, symmetrize=args.symmetrize, self_loops=args.self_loops,
        dedup=args.dedup)
    write_sparse_features(writer, graph.features, source_path=args.input)
    labels = writer.write_labels(graph.labels, source_path=args.input)
    for name, ids in stratified_split(labels, args.split, args.seed).items():
        writer.write_split(name, ids, source_path=args.input)


def sparse_graph_plan(writer: "StoreWriter", num_nodes: int, num_edges: int,
                      features: sp.spmatrix, args: argparse.Namespace,
                      what: str | Path) -> StorePlan:
    """The store of a graph held in memory with sparse features, densified as it is written."""
    stored = writer.stored_dtype(features.dtype, str(what))
    return StorePlan(num_nodes, num_edges, features.shape[1], stored.itemsize,
                     symmetrize=args.symmetrize, add_self_loops=args.self_loops == "add",
                     resident_bytes=SPLIT_BYTES_PER_NODE * num_nodes, what=str(what))


def read_npz(path: str | Path) -> NpzGraph:
    """Load and check a gnn-benchmark archive; any problem is an :class:`InputError`."""
    arrays = _load_arrays(path, REQUIRED_KEYS)
    adjacency = csr_from_parts(path, arrays, "adj")
    adjacency.eliminate_zeros()
    features = csr_from_parts(path, arrays, "attr")
    num_nodes = adjacency.shape[0]
    if adjacency.shape[1] != num_nodes:
        raise InputError(path, f"adjacency is not square: shape {adjacency.shape}")
    if features.shape[0] != num_nodes:
        raise InputError(path, f"attr_shape has {features.shape[0]} rows, expected {num_nodes} "
                               "(one per node of the adjacency)")
    labels = arrays["labels"]
    if labels.ndim != 1 or labels.dtype.kind not in "iu":
        raise InputError(path, f"labels must be a 1-D integer array, found {labels.dtype} "
                               f"with shape {labels.shape}")
    if labels.shape[0] != num_nodes:
        raise InputError(path, f"labels has {labels.shape[0]} entries, expected {num_nodes} "
                               "(one per node)")
    return NpzGraph(adjacency, features, labels.astype(np.int64))


def _load_arrays(path: str | Path, keys: tuple[str, ...]) -> dict[str, np.ndarray]:
    """Read ``keys`` from the archive at ``path`` (never unpickling anything), once their
    headers show that they fit in memory (a compressed member can claim any size)."""
    regular_file(path, ".npz archive")
    try:
        archive = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise InputError(path, "file not found") from None
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        raise InputError(path, f"not a readable .npz archive: {err}") from None
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise InputError(path, "not an .npz archive (a single .npy array)")
    with archive:
        missing = [key for key in keys if key not in archive.files]
        if missing:
            raise InputError(path, f"missing keys: {', '.join(missing)}")
        declared = sum(member_bytes(path, archive, key) for key in keys)
        check_memory(declared, path, "loading its arrays (as their headers declare)")
        return {key: _read_member(path, archive, key) for key in keys}


def member_bytes(path: str | Path, archive: np.lib.npyio.NpzFile, key: str) -> int:
    """The bytes member ``key`` of an .npz archive declares in its .npy header."""
    try:
        with archive.zip.open(f"{key}.npy") as member:
            version = np.lib.format.read_magic(member)
            shape, _, dtype = (np.lib.format.read_array_header_1_0(member) if version == (1, 0)
                               else np.lib.format.read_array_header_2_0(member))
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, zlib.error) as err:
        raise InputError(path, f"cannot read {key}: {err}") from None
    if dtype.hasobject:
        raise InputError(path, f"{key} holds Python objects, which are never loaded")
    return int(np.prod(shape, dtype=object)) * dtype.itemsize


def _read_member(path: str | Path, archive: np.lib.npyio.NpzFile, key: str) -> np.ndarray:
    try:
        return archive[key]
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as err:
        raise InputError(path, f"cannot read {key}: {err}") from None


def csr_from_parts(path: str | Path, arrays: dict[str, np.ndarray], prefix: str) -> sp.csr_matrix:
    """The CSR matrix stored as ``<prefix>_{data,indices,indptr,shape}``, fully checked."""
    shape = arrays[f"{prefix}_shape"]
    if shape.shape != (2,) or shape.dtype.kind not in "iu" or (shape < 0).any():
        raise InputError(path, f"{prefix}_shape must be two non-negative integers, "
                               f"found {shape.tolist()}")
    try:
        matrix = sp.csr_matrix((arrays[f"{prefix}_data"], arrays[f"{prefix}_indices"],
                                arrays[f"{prefix}_indptr"]), shape=tuple(int(s) for s in shape))
        matrix.check_format(full_check=True)
    except (ValueError, TypeError) as err:
        raise InputError(path, f"{prefix}_* is not a valid CSR matrix: {err}") from None
    return matrix


def csr_edge_chunks(indptr: np.ndarray, indices: np.ndarray,
                    edges_per_chunk: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(src, dst) chunks of at most ``edges_per_chunk`` edges of a CSR adjacency.

    ``indptr`` [N+1], ``indices`` [E]: row = source, column = destination. ``src`` is int64,
    ``dst`` a view of ``indices``.
    """
    for start in range(0, indices.shape[0], edges_per_chunk):
        stop = min(start + edges_per_chunk, indices.shape[0])
        src = np.searchsorted(indptr, np.arange(start, stop), side="right") - 1
        yield src, indices[start:stop]


def write_sparse_features(writer: "StoreWriter", features: sp.csr_matrix, *,
                          source_path: str | Path) -> None:
    """Densify ``features`` [N, F] in row chunks sized by the writer's memory budget."""
    rows = writer.rows_per_chunk(max(features.shape[1], 1) * features.dtype.itemsize)
    chunks = (features[start:start + rows].toarray()
              for start in range(0, features.shape[0], rows))
    writer.write_features(features.shape[0], chunks, source_path=str(source_path))


SOURCE = Source(
    name="npz",
    help="a gnn-benchmark .npz archive (adjacency, attribute and label arrays), "
         "e.g. cora.npz; random stratified split",
    add_arguments=add_arguments,
    build=build,
    topology=UNDIRECTED,
)
