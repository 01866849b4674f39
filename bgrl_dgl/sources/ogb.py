"""Open Graph Benchmark node-property datasets, read from a local ``ogb`` download.

``prepare ogb --name ogbn-arxiv|ogbn-products|ogbn-papers100M --root DIR`` reads the directory
that ``ogb.nodeproppred.NodePropPredDataset(name, root=DIR)`` downloads (``ogb`` 1.3.6)::

    DIR/ogbn_arxiv/RELEASE_v1.txt                   release marker
    DIR/ogbn_arxiv/raw/edge.csv.gz                  E lines "src,dst"
                       num-node-list.csv.gz         one line: N
                       num-edge-list.csv.gz         one line: E
                       node-feat.csv.gz             N lines of F floats
                       node-label.csv.gz            N lines: class id
    DIR/ogbn_papers100M/raw/data.npz                binary datasets: edge_index [2, E] int64,
                                                    num_nodes_list, num_edges_list, node_feat [N, F]
                        raw/node-label.npz          node_label [N, 1] float, NaN = unlabelled
    DIR/<dataset>/split/<split>/{train,valid,test}.csv.gz   one node id per line
                               or split_dict.pt     {"train", "valid", "test": int64 ids}

The package's dataset class is not used: it asks on stdin when the release marker is missing,
downloads when raw files are missing, loads every file whole, unpickles
``processed/data_processed`` with an unrestricted ``torch.load`` and writes that pickle into
the dataset directory. Instead every expected file is checked first (a missing one is an
:class:`~bgrl_dgl.errors.InputError` naming it), the raw files are read in row chunks following
``ogb.io.read_graph_raw`` (``.npz`` members are decompressed as streams), the per-dataset
metadata comes from the package's ``master.csv``, and ``split_dict.pt`` is read by
:func:`load_torch_file`, whose unpickler builds only tensors, numpy arrays and containers.
"""
from __future__ import annotations

import argparse
import csv
import gzip
import importlib.util
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pandas as pd

from bgrl_dgl.errors import InputError
from bgrl_dgl.sources import UNDIRECTED, EdgeChunks, Source
from bgrl_dgl.sources.npz_members import NpzMember
from bgrl_dgl.sources.safe_pickle import (
    _TORCH_FILE_PICKLE,
    TorchFileUnpickler,
    _restricted_load,
    as_node_ids,
    load_torch_file,
)
from bgrl_dgl.splits import SPLIT_NAMES

OGBN_NAMES = ("ogbn-arxiv", "ogbn-products", "ogbn-papers100M")

CSV_GRAPH_FILES = ("edge.csv.gz", "num-node-list.csv.gz", "num-edge-list.csv.gz",
                   "node-feat.csv.gz", "node-label.csv.gz")
BINARY_GRAPH_FILES = ("data.npz", "node-label.npz")
# Working bytes per edge while a chunk is parsed and handed over: src and dst int64 plus the
# parser's own copy.
EDGE_ROW_BYTES = 32
# Working bytes per feature value while a CSV chunk is parsed (text and float64 buffers).
CSV_FEATURE_VALUE_BYTES = 24



# --- torch files ------------------------------------------------------------------------------


_TORCH_FILE_PICKLE.Unpickler = TorchFileUnpickler  # type: ignore[attr-defined]
_TORCH_FILE_PICKLE.load = _restricted_load  # type: ignore[attr-defined]


# --- labels ------------------------------------------------------------------------------------

def class_ids(values: np.ndarray, path: Path) -> np.ndarray:
    """Labels as OGB stores them ([n] or [n, 1], integers, or floats with NaN = unlabelled) ->
    int64 [n] class ids with -1 for unlabelled nodes (-1 in the input means that too)."""
    if values.ndim == 2 and values.shape[1] == 1:
        values = values[:, 0]
    if values.ndim != 1:
        raise InputError(path, f"labels must have shape [N] or [N, 1], got {values.shape}")
    if values.dtype.kind == "f":
        values = np.where(np.isnan(values), -1, values)
        bad = ~np.isfinite(values) | (values != np.floor(values)) | (values < -1)
    elif values.dtype.kind in "iu":
        bad = values < -1
    else:
        raise InputError(path, f"labels must be numbers, got dtype {values.dtype}")
    if bad.any():
        raise InputError(path, f"label {values[np.argmax(bad)]} is not a class id (a "
                               f"non-negative integer; NaN or -1 for unlabelled)")
    return values.astype(np.int64)


# --- npz members read as streams ---------------------------------------------------------------


# --- dataset metadata and files ----------------------------------------------------------------

@dataclass(frozen=True)
class OgbnDataset:
    """Where an OGB node-property dataset lives under ``root`` and its ``master.csv`` entry."""

    name: str
    root: Path
    version: str
    num_classes: int
    add_inverse_edge: bool
    binary: bool
    split: str

    @property
    def directory(self) -> Path:
        return self.root / self.name.replace("-", "_")

    @property
    def raw(self) -> Path:
        return self.directory / "raw"

    @property
    def split_dir(self) -> Path:
        return self.directory / "split" / self.split

    @property
    def release_marker(self) -> Path:
        return self.directory / f"RELEASE_v{self.version}.txt"

    def download_hint(self) -> str:
        return (f"download it with `python -c \"from ogb.nodeproppred import NodePropPredDataset; "
                f"NodePropPredDataset('{self.name}', root='{self.root}')\"` on a machine with "
                f"internet")


def master_csv() -> Path:
    """The ``master.csv`` of the installed ``ogb.nodeproppred`` (found without importing it)."""
    spec = importlib.util.find_spec("ogb.nodeproppred")
    assert spec is not None and spec.submodule_search_locations
    return Path(list(spec.submodule_search_locations)[0]) / "master.csv"


def ogbn_dataset(name: str, root: Path) -> OgbnDataset:
    """The dataset ``name`` (one of ``OGBN_NAMES``) under ``root``, described by master.csv."""
    with open(master_csv(), newline="") as file:
        rows = list(csv.reader(file))
    column = rows[0].index(name)
    meta = {row[0]: row[column] for row in rows[1:]}
    return OgbnDataset(name=name, root=root, version=meta["version"],
                       num_classes=int(meta["num classes"]),
                       add_inverse_edge=meta["add_inverse_edge"] == "True",
                       binary=meta["binary"] == "True", split=meta["split"])


def split_dict_path(dataset: OgbnDataset) -> Path:
    """ogb reads ``split_dict.pt`` in preference to the CSV files when it exists."""
    return dataset.split_dir / "split_dict.pt"


def required_files(dataset: OgbnDataset) -> list[Path]:
    """Every file the build reads, release marker first."""
    graph_files = BINARY_GRAPH_FILES if dataset.binary else CSV_GRAPH_FILES
    split_files = ([split_dict_path(dataset)] if split_dict_path(dataset).is_file()
                   else [dataset.split_dir / f"{name}.csv.gz" for name in SPLIT_NAMES])
    return [dataset.release_marker, *(dataset.raw / name for name in graph_files), *split_files]


def check_files(dataset: OgbnDataset) -> None:
    """InputError naming the first expected file that is missing."""
    if not dataset.root.is_dir():
        raise InputError(dataset.root, f"not a directory: {dataset.download_hint()}")
    for path in required_files(dataset):
        if not path.is_file():
            raise InputError(path, f"not found: {dataset.download_hint()}")


# --- CSV files ---------------------------------------------------------------------------------

def csv_chunks(path: Path, rows: int, dtype: type | None = None) -> Iterator[np.ndarray]:
    """Rows of a headerless gzip CSV file -> [<=rows, columns] arrays."""
    try:
        with pd.read_csv(path, compression="gzip", header=None, dtype=dtype,
                         chunksize=rows) as reader:
            for frame in reader:
                yield frame.to_numpy()
    except (ValueError, EOFError, OSError, zlib.error) as err:
        # ValueError covers pandas' ParserError and unparsable numbers.
        raise InputError(path, f"unreadable CSV: {err}") from None


def read_csv_array(path: Path, dtype: type | None = None) -> np.ndarray:
    """A whole (small) headerless gzip CSV file -> [rows, columns] array."""
    chunks = list(csv_chunks(path, 1 << 20, dtype))
    if not chunks:
        raise InputError(path, "is empty")
    return np.concatenate(chunks)


def csv_column_count(path: Path) -> int:
    """Number of comma-separated values on the first line of a gzip CSV file."""
    try:
        with gzip.open(path, "rt") as file:
            return len(file.readline().split(","))
    except (OSError, EOFError, UnicodeDecodeError) as err:
        raise InputError(path, f"unreadable CSV: {err}") from None


def single_count(path: Path) -> int:
    """``num-node-list.csv.gz`` / ``num-edge-list.csv.gz`` of a one-graph dataset -> count."""
    values = read_csv_array(path, np.int64)
    if values.shape != (1, 1):
        raise InputError(path, f"expected one count (a single graph), got {values.size} values")
    return int(values[0, 0])


def csv_edge_chunks(path: Path, rows: int, num_edges: int) -> EdgeChunks:
    """``edge.csv.gz`` -> (src, dst) int64 chunks; InputError unless it has ``num_edges`` lines."""
    seen = 0
    for chunk in csv_chunks(path, rows, np.int64):
        if chunk.shape[1] != 2:
            raise InputError(path, f"expected 2 columns (src,dst), got {chunk.shape[1]}")
        seen += len(chunk)
        yield chunk[:, 0], chunk[:, 1]
    if seen != num_edges:
        raise InputError(path, f"has {seen} edges but num-edge-list.csv.gz says {num_edges}")


# --- graphs ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RawGraph:
    """What a raw OGB graph provides, each large part as a chunk stream."""

    num_nodes: int
    edge_path: Path
    edge_chunks: Callable[[int], EdgeChunks]             # rows per chunk -> (src, dst) chunks
    feature_path: Path
    feature_row_bytes: int                               # working bytes per feature row
    feature_chunks: Callable[[int], Iterator[np.ndarray]]  # rows -> [r, F] chunks
    label_path: Path
    read_labels: Callable[[], np.ndarray]                # -> raw label array


def csv_graph(raw: Path) -> RawGraph:
    """A ``read_csv_graph_raw`` directory (edge.csv.gz, node-feat.csv.gz, ...)."""
    num_nodes = single_count(raw / "num-node-list.csv.gz")
    num_edges = single_count(raw / "num-edge-list.csv.gz")
    edges, features = raw / "edge.csv.gz", raw / "node-feat.csv.gz"
    labels = raw / "node-label.csv.gz"
    return RawGraph(
        num_nodes=num_nodes,
        edge_path=edges,
        edge_chunks=lambda rows: csv_edge_chunks(edges, rows, num_edges),
        feature_path=features,
        feature_row_bytes=csv_column_count(features) * CSV_FEATURE_VALUE_BYTES,
        feature_chunks=lambda rows: csv_chunks(features, rows, np.float32),
        label_path=labels,
        read_labels=lambda: read_csv_array(labels),
    )


def binary_graph(raw: Path) -> RawGraph:
    """A ``read_binary_graph_raw`` directory (data.npz, node-label.npz)."""
    data = raw / "data.npz"
    num_nodes = _single_npz_count(data, "num_nodes_list")
    num_edges = _single_npz_count(data, "num_edges_list")
    edge_index = NpzMember.open(data, "edge_index")
    if edge_index.dtype.kind not in "iu" or edge_index.shape != (2, num_edges):
        raise InputError(data, f"edge_index must be an integer [2, {num_edges}] array, got "
                               f"{edge_index.dtype} {list(edge_index.shape)}")
    features = NpzMember.open(data, "node_feat")
    if len(features.shape) != 2:
        raise InputError(data, f"node_feat must be [N, F], got {list(features.shape)}")
    labels = raw / "node-label.npz"
    return RawGraph(
        num_nodes=num_nodes,
        edge_path=data,
        edge_chunks=edge_index.pair_chunks,
        feature_path=data,
        feature_row_bytes=features.shape[1] * features.dtype.itemsize,
        feature_chunks=features.row_chunks,
        label_path=labels,
        read_labels=lambda: _load_npz_array(labels, "node_label"),
    )


def _load_npz_array(path: Path, key: str) -> np.ndarray:
    try:
        with np.load(path, allow_pickle=False) as archive:
            return archive[key]
    except KeyError:
        raise InputError(path, f"has no array {key!r}") from None
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error) as err:
        raise InputError(path, f"unreadable .npz archive: {err}") from None


def _single_npz_count(path: Path, key: str) -> int:
    values = _load_npz_array(path, key)
    if values.shape != (1,) or values.dtype.kind not in "iu":
        raise InputError(path, f"{key} must hold one integer (a single graph), got {values}")
    return int(values[0])


def read_splits(dataset: OgbnDataset) -> Iterator[tuple[str, np.ndarray, Path]]:
    """(name, int64 node ids, file) for train/valid/test from ``split/<split>/``."""
    path = split_dict_path(dataset)
    if path.is_file():
        splits = load_torch_file(path)
        if not isinstance(splits, dict) or not set(SPLIT_NAMES) <= set(splits):
            raise InputError(path, f"expected a dict with keys {', '.join(SPLIT_NAMES)}")
        for name in SPLIT_NAMES:
            yield name, as_node_ids(splits[name], path, f"split {name!r}"), path
        return
    for name in SPLIT_NAMES:
        path = dataset.split_dir / f"{name}.csv.gz"
        values = read_csv_array(path, np.int64)
        if values.shape[1] != 1:
            raise InputError(path, f"expected one node id per line, got {values.shape[1]} columns")
        yield name, values[:, 0], path


# --- source ------------------------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--name", required=True, choices=OGBN_NAMES, help="OGB dataset name")
    parser.add_argument("--root", required=True, type=Path,
                        help="the root passed to ogb when downloading: the dataset is read from "
                             "ROOT/<name with '_' for '-'> (nothing is downloaded)")


def build(args: argparse.Namespace, writer) -> None:
    dataset = ogbn_dataset(args.name, args.root)
    check_files(dataset)
    graph = binary_graph(dataset.raw) if dataset.binary else csv_graph(dataset.raw)
    edge_rows = writer.rows_per_chunk(EDGE_ROW_BYTES)
    # ogb adds the reverse edges itself for datasets stored one direction per pair (products).
    writer.write_topology(graph.num_nodes, lambda: graph.edge_chunks(edge_rows),
                          source_path=str(graph.edge_path),
                          symmetrize=args.symmetrize or dataset.add_inverse_edge,
                          self_loops=args.self_loops, dedup=args.dedup)
    writer.write_features(graph.num_nodes,
                          graph.feature_chunks(writer.rows_per_chunk(graph.feature_row_bytes)),
                          source_path=str(graph.feature_path))
    writer.write_labels(class_ids(graph.read_labels(), graph.label_path),
                        source_path=str(graph.label_path), num_classes=dataset.num_classes)
    for name, ids, path in read_splits(dataset):
        writer.write_split(name, ids, source_path=str(path))


SOURCE = Source(
    name="ogb",
    help="OGB node-property dataset (ogbn-arxiv, ogbn-products, ogbn-papers100M) from a "
         "local ogb download",
    add_arguments=add_arguments,
    build=build,
    topology=UNDIRECTED,
)
