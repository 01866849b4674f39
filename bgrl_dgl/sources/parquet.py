"""Bring-your-own graph: an edge list in Parquet, node arrays in ``.npy`` files.

``--edges`` is one Parquet file or a directory (every ``*.parquet`` file in it, in sorted
name order) with two integer columns, source and destination node id (``--src-column``,
``--dst-column``; edge = src -> dst). Ids are arbitrary int64 values, not necessarily
0..N-1; they are read in bounded batches and relabelled.

Node order (the rule every node array follows): store node i is
  * the i-th entry of ``--node-ids`` when given (unique ids; N = its length; edges naming
    any other id are an error; nodes without edges are kept), otherwise
  * the i-th smallest distinct id appearing in the edges (N = number of distinct ids).
Row i of ``--features`` ([N, F], required) and entry i of ``--labels`` ([N] integers,
-1 = unlabelled, optional) belong to store node i. The original ids are stored with the
graph. Labels give a random split, stratified by class, drawn with ``--seed``.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from bgrl_dgl.errors import InputError
from bgrl_dgl.sources import Source
from bgrl_dgl.splits import DEFAULT_FRACTIONS, parse_fractions, stratified_split
from bgrl_dgl.store.capacity import StorePlan
from bgrl_dgl.store.format import regular_file

if TYPE_CHECKING:
    from bgrl_dgl.store.writer import StoreWriter

# Working bytes per edge while relabelling: raw ids, local ids and search positions.
EDGE_CHUNK_BYTES = 6 * 8
# Memory per node while building: the id index (sorted ids, order, original ids) and the
# labels with their split.
RESIDENT_BYTES_PER_NODE = 3 * 8 + 48
INT64_MAX = np.iinfo(np.int64).max


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--edges", required=True, metavar="FILE_OR_DIR",
                        help="Parquet edge list, or a directory of *.parquet files "
                             "(read in sorted name order)")
    parser.add_argument("--src-column", default="src", help="source id column (default: src)")
    parser.add_argument("--dst-column", default="dst", help="destination id column (default: dst)")
    parser.add_argument("--node-ids", metavar="IDS.npy",
                        help="[N] unique int64 ids giving the node order; default: the sorted "
                             "distinct ids of the edges")
    parser.add_argument("--features", metavar="F.npy",
                        help="[N, F] node features, rows in node order (required)")
    parser.add_argument("--labels", metavar="L.npy",
                        help="[N] integer class ids in node order, -1 = unlabelled")
    parser.add_argument("--split", type=parse_fractions, default=DEFAULT_FRACTIONS,
                        metavar="TRAIN/VALID/TEST",
                        help="fractions of each class in the random split made from --labels, "
                             "drawn with --seed (default: 0.1/0.1/0.8)")


def build(args: argparse.Namespace, writer: "StoreWriter") -> None:
    if args.features is None:
        raise InputError(None, "--features is required: the store needs one feature row per node")
    edges = EdgeList.open(args.edges, args.src_column, args.dst_column,
                          batch_rows=writer.rows_per_chunk(EDGE_CHUNK_BYTES))
    if args.node_ids is not None:
        index = NodeIndex.from_node_ids(args.node_ids)
    else:
        index = NodeIndex.from_edges(edges)
    features = load_node_array(args.features, index.num_nodes, ndim=2, kinds="fiub")
    labels = None if args.labels is None else load_node_array(args.labels, index.num_nodes,
                                                              ndim=1, kinds="iu")
    writer.plan(StorePlan(index.num_nodes, edges.num_rows(), features.shape[1],
                          writer.stored_dtype(features.dtype, args.features).itemsize,
                          symmetrize=args.symmetrize, add_self_loops=args.self_loops == "add",
                          resident_bytes=RESIDENT_BYTES_PER_NODE * index.num_nodes,
                          what=args.edges))
    writer.write_topology(index.num_nodes, lambda: index.relabel(edges),
                          source_path=args.edges, symmetrize=args.symmetrize,
                          self_loops=args.self_loops, dedup=args.dedup)
    writer.write_orig_ids(index.orig_ids, source_path=args.node_ids or args.edges)
    writer.write_feature_array(features, source_path=args.features)
    if labels is not None:
        labels = writer.write_labels(np.asarray(labels, dtype=np.int64), source_path=args.labels)
        for name, ids in stratified_split(labels, args.split, args.seed).items():
            writer.write_split(name, ids, source_path=args.labels)


@dataclass(frozen=True)
class EdgeList:
    """Parquet edge files whose id columns have been checked (present, integer)."""

    paths: list[Path]
    src_column: str
    dst_column: str
    batch_rows: int

    @classmethod
    def open(cls, edges: str | Path, src_column: str, dst_column: str,
             batch_rows: int) -> "EdgeList":
        paths = parquet_paths(Path(edges))
        for path in paths:
            with _parquet_file(path) as file:
                check_id_columns(path, file.schema_arrow, (src_column, dst_column))
        return cls(paths, src_column, dst_column, batch_rows)

    def num_rows(self) -> int:
        """Edges in all files, from their footers."""
        total = 0
        for path in self.paths:
            with _parquet_file(path) as file:
                total += file.metadata.num_rows
        return total

    def chunks(self) -> Iterator[tuple[Path, np.ndarray, np.ndarray]]:
        """(file, src, dst) batches of at most ``batch_rows`` raw int64 ids, file by file."""
        columns = [self.src_column, self.dst_column]
        for path in self.paths:
            try:
                with _parquet_file(path) as file:
                    for batch in file.iter_batches(batch_size=self.batch_rows, columns=columns):
                        yield (path, *(int64_ids(path, name, batch.column(name))
                                       for name in columns))
            except (pa.ArrowException, OSError) as err:
                raise InputError(path, f"cannot read Parquet data: {err}") from None


def parquet_paths(edges: Path) -> list[Path]:
    """``edges`` itself, or the ``*.parquet`` files of the directory ``edges`` in name order."""
    if edges.is_dir():
        paths = sorted(path for path in edges.glob("*.parquet") if path.is_file())
        if not paths:
            raise InputError(edges, "directory contains no *.parquet files")
        return paths
    return [regular_file(edges, "Parquet file")]


def _parquet_file(path: Path) -> pq.ParquetFile:
    try:
        return pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as err:
        raise InputError(path, f"not a readable Parquet file: {err}") from None


def check_id_columns(path: Path, schema: pa.Schema, names: Iterable[str]) -> None:
    for name in names:
        if name not in schema.names:
            raise InputError(path, f"no column {name} (columns: {', '.join(schema.names)})")
        kind = schema.field(name).type
        if not pa.types.is_integer(kind):
            raise InputError(path, f"column {name} must be integers, found {kind}")


def int64_ids(path: Path, name: str, column: pa.Array) -> np.ndarray:
    """A batch of one id column as [rows] int64; nulls and ids above 2**63-1 are errors."""
    if column.null_count:
        raise InputError(path, f"column {name} has {column.null_count} null values")
    ids = column.to_numpy()
    if ids.dtype == np.uint64 and ids.size and ids.max() > INT64_MAX:
        raise InputError(path, f"column {name} has ids above the int64 range")
    return ids.astype(np.int64, copy=False)


@dataclass(frozen=True)
class NodeIndex:
    """Original id -> store node id.

    ``sorted_ids`` [N] int64 ascending; ``order`` [N] int64: the store node of each sorted id
    (None: the identity, when nodes are the sorted distinct edge ids). ``node_ids_path`` is the
    ``--node-ids`` file, when the ids came from one (edges must then be checked against it).
    """

    sorted_ids: np.ndarray
    order: np.ndarray | None
    node_ids_path: Path | None

    @property
    def num_nodes(self) -> int:
        return self.sorted_ids.shape[0]

    @property
    def orig_ids(self) -> np.ndarray:
        """[N] int64: the original id of every store node."""
        if self.order is None:
            return self.sorted_ids
        orig = np.empty_like(self.sorted_ids)
        orig[self.order] = self.sorted_ids
        return orig

    @classmethod
    def from_node_ids(cls, path: str | Path) -> "NodeIndex":
        ids = np.asarray(load_npy(path, ndim=1, kinds="iu"))
        if ids.size == 0:
            raise InputError(path, "has no node ids")
        if ids.dtype == np.uint64 and ids.max() > INT64_MAX:
            raise InputError(path, "has ids above the int64 range")
        order = np.argsort(ids, kind="stable")
        sorted_ids = ids[order].astype(np.int64)
        repeated = sorted_ids[1:][sorted_ids[1:] == sorted_ids[:-1]]
        if repeated.size:
            raise InputError(path, f"node ids must be unique: {repeated[0]} appears more than once")
        return cls(sorted_ids, order, Path(path))

    @classmethod
    def from_edges(cls, edges: EdgeList) -> "NodeIndex":
        ids = sorted_unique_ids(np.unique(np.concatenate([src, dst]))
                                for _, src, dst in edges.chunks())
        if ids.size == 0:
            raise InputError(edges.paths[0], "contains no edges")
        return cls(ids, None, None)

    def relabel(self, edges: EdgeList) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """The (src, dst) chunks of ``edges`` in store node ids [0, N)."""
        for path, src, dst in edges.chunks():
            yield self.local_ids(path, src), self.local_ids(path, dst)

    def local_ids(self, path: Path, ids: np.ndarray) -> np.ndarray:
        positions = np.searchsorted(self.sorted_ids, ids)
        if self.node_ids_path is not None:
            clipped = np.minimum(positions, self.num_nodes - 1)
            unknown = self.sorted_ids[clipped] != ids
            if unknown.any():
                raise InputError(path, f"edge names node id {ids[unknown][0]}, which is not in "
                                       f"{self.node_ids_path.name}")
        return positions if self.order is None else self.order[positions]


def sorted_unique_ids(parts: Iterable[np.ndarray]) -> np.ndarray:
    """Sorted distinct values of many sorted-unique int64 arrays, merged as they arrive.

    Parts are buffered until they outgrow the merged result, so each value is re-merged
    O(log(parts)) times, and memory stays within a small multiple of the result.
    """
    merged = np.empty(0, np.int64)
    pending: list[np.ndarray] = []
    pending_size = 0
    for part in parts:
        pending.append(part)
        pending_size += part.size
        if pending_size >= merged.size:
            merged = merge_unique([merged, *pending])
            pending, pending_size = [], 0
    return merge_unique([merged, *pending])


def merge_unique(parts: list[np.ndarray]) -> np.ndarray:
    """Sorted distinct values of sorted arrays (a stable sort merges the sorted runs)."""
    values = np.concatenate(parts)
    values.sort(kind="stable")
    keep = np.empty(values.size, bool)
    keep[:1] = True
    np.not_equal(values[1:], values[:-1], out=keep[1:])
    return values[keep]


def load_npy(path: str | Path, *, ndim: int, kinds: str) -> np.ndarray:
    """Memory-map the ``.npy`` array at ``path``: ``ndim`` dimensions, dtype kind in ``kinds``."""
    regular_file(path, ".npy file")
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except FileNotFoundError:
        raise InputError(path, "file not found") from None
    except (OSError, ValueError, EOFError) as err:
        raise InputError(path, f"not a readable .npy file: {err}") from None
    if not isinstance(array, np.ndarray):
        raise InputError(path, "not a .npy array (an .npz archive?)")
    if array.ndim != ndim or array.dtype.kind not in kinds:
        expected = {"iu": "integer", "fiub": "numeric"}[kinds]
        raise InputError(path, f"expected a {ndim}-D {expected} array, found {array.dtype} "
                               f"with shape {array.shape}")
    return array


def load_node_array(path: str | Path, num_nodes: int, *, ndim: int, kinds: str) -> np.ndarray:
    """:func:`load_npy`, also requiring one row per node."""
    array = load_npy(path, ndim=ndim, kinds=kinds)
    if array.shape[0] != num_nodes:
        raise InputError(path, f"has {array.shape[0]} rows, expected {num_nodes} (one per node)")
    return array


SOURCE = Source(
    name="parquet",
    help="your own graph: a Parquet edge list with arbitrary int64 node ids, plus .npy "
         "features (required), labels and node ids (optional). Node i is the i-th entry of "
         "--node-ids, or else the i-th smallest id in the edges; --features and --labels rows "
         "follow that order",
    add_arguments=add_arguments,
    build=build,
    # An edge list is taken as given: directed, self-loops kept.
    topology={"symmetrize": False, "self_loops": "keep", "dedup": True},
)
