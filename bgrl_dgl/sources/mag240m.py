"""OGB-LSC MAG240M (``mag240m_kddcup2021``), read from a local ``ogb`` download.

``prepare mag240m --root DIR [--with-authors]`` reads what ``ogb.lsc.MAG240MDataset(root=DIR)``
downloads (``ogb`` 1.3.6)::

    DIR/mag240m_kddcup2021/RELEASE_v1.txt                 release marker
        meta.pt            {"paper": P, "author": A, "institution": I, "num_classes": C}
        split_dict.pt      {"train", "valid", "test"} (or "test-whole", "test-dev",
                           "test-challenge") -> int64 numpy arrays of paper ids
        processed/paper/node_feat.npy                                [P, 768] float16
        processed/paper/node_label.npy                               [P] float, NaN = unlabelled
        processed/paper___cites___paper/edge_index.npy               [2, E] int64 (paper, paper)
        processed/author___writes___paper/edge_index.npy             [2, E] int64 (author, paper)
        processed/author___affiliated_with___institution/edge_index.npy  (author, institution)

Without ``--with-authors`` the graph is the paper citation graph. With it, one homogeneous
graph holds papers ``[0, P)``, authors ``[P, P+A)`` and institutions ``[P+A, P+A+I)`` (recorded
as node types) with all three relations; an author's features are the mean of its papers',
an institution's the mean of its authors' (zeros where there are none), and only papers have
labels. The default topology makes every relation undirected.

Safety and memory: ``MAG240MDataset.__init__`` asks on stdin when the release marker is
missing, downloads when the directory is missing, and unpickles ``meta.pt`` and
``split_dict.pt`` with an unrestricted ``torch.load``. ``split_dict.pt`` holds numpy arrays,
which ``torch.load(weights_only=True)`` rejects in torch 2.2.1. So :class:`LocalMAG240MDataset`
replaces that constructor: it checks every file it will read first (an
:class:`~bgrl_dgl.errors.InputError` names the missing one), loads both ``.pt`` files with
:func:`~bgrl_dgl.sources.safe_pickle.load_torch_file` (tensors, numpy arrays, numbers and containers
only) and splits the test set with ogb's own ``split_test``; paths, relation names and the
memory-mapped ``paper_feat``/``paper_label`` come from the package class. Edge files are
memory-mapped and read in chunks; the package's ``edge_index()`` would load each whole
(~20 GB for the citations). Author means are accumulated one block of authors at a time
within the memory budget (one binary search per block finds its edges when the author
relations are sorted by author, as released; otherwise each block scans them all);
institution sums ([I, F] float32, ~80 MB for the real data) stay in memory throughout. The
labels array ([P + A + I] int64 with authors) is built whole, as ``write_labels`` takes it.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from ogb.lsc.mag240m import MAG240MDataset
from ogb.lsc.utils import split_test

from bgrl_dgl.errors import InputError
from bgrl_dgl.sources import UNDIRECTED, EdgeChunks, Source
from bgrl_dgl.sources.ogb import EDGE_ROW_BYTES, class_ids
from bgrl_dgl.sources.safe_pickle import as_node_ids, load_torch_file

PAPER_RELATION = ("paper", "paper")
AUTHOR_RELATIONS = (("author", "paper"), ("author", "institution"))
META_KEYS = ("paper", "author", "institution", "num_classes")
WRITTEN_SPLITS = ("train", "valid", "test-dev", "test-challenge")
# The float32 sums of one block of authors are the main working set while author features
# are computed: they may take this many of the writer's row chunks.
BLOCK_CHUNK_SHARES = 4

Ranges = dict[str, tuple[int, int]]


class LocalMAG240MDataset(MAG240MDataset):
    """``MAG240MDataset`` over an existing local copy, never prompting or downloading.

    ``MAG240MDataset.__init__`` is deliberately not called (see the module docstring).
    """

    def __init__(self, root: Path, with_authors: bool) -> None:
        self.root = os.path.expanduser(os.path.normpath(root))
        self.dir = os.path.join(self.root, "mag240m_kddcup2021")
        self.check_files(with_authors)
        self.__meta__ = read_meta(self.directory / "meta.pt")
        self.__split__ = read_split_dict(self.directory / "split_dict.pt")
        split_test(self.__split__)

    @property
    def directory(self) -> Path:
        return Path(self.dir)

    @property
    def feature_path(self) -> Path:
        return self.directory / "processed" / "paper" / "node_feat.npy"

    @property
    def label_path(self) -> Path:
        return self.directory / "processed" / "paper" / "node_label.npy"

    def edge_index_path(self, src: str, dst: str) -> Path:
        """``processed/<src>___<relation>___<dst>/edge_index.npy``, named as ogb names it."""
        return (self.directory / "processed" / f"{src}___{self.__rels__[(src, dst)]}___{dst}"
                / "edge_index.npy")

    def required_files(self, with_authors: bool) -> list[Path]:
        """Every file the build reads, release marker first."""
        relations = (PAPER_RELATION, *AUTHOR_RELATIONS) if with_authors else (PAPER_RELATION,)
        return [self.directory / f"RELEASE_v{self.version}.txt",
                self.directory / "meta.pt", self.directory / "split_dict.pt",
                self.feature_path, self.label_path,
                *(self.edge_index_path(src, dst) for src, dst in relations)]

    def check_files(self, with_authors: bool) -> None:
        """InputError naming the first expected file that is missing."""
        hint = (f"download it with `python -c \"from ogb.lsc import MAG240MDataset; "
                f"MAG240MDataset(root='{self.root}')\"` on a machine with internet (~200 GB)")
        if not os.path.isdir(self.root):
            raise InputError(self.root, f"not a directory: {hint}")
        for path in self.required_files(with_authors):
            if not path.is_file():
                raise InputError(path, f"not found: {hint}")


def read_meta(path: Path) -> dict[str, int]:
    """``meta.pt`` -> {"paper", "author", "institution", "num_classes": non-negative int}."""
    meta = load_torch_file(path)
    if not isinstance(meta, dict) or not set(META_KEYS) <= set(meta):
        raise InputError(path, f"expected a dict with keys {', '.join(META_KEYS)}")
    counts = {}
    for key in META_KEYS:
        value = meta[key]
        if isinstance(value, (np.ndarray, torch.Tensor)) and value.ndim == 0:
            value = value.item()
        if not isinstance(value, (int, np.integer)) or value < 0:
            raise InputError(path, f"{key!r} must be a non-negative integer, got {value!r}")
        counts[key] = int(value)
    return counts


def read_split_dict(path: Path) -> dict[str, np.ndarray]:
    """``split_dict.pt`` -> split name -> int64 paper ids, in either release's key layout."""
    splits = load_torch_file(path)
    if not isinstance(splits, dict):
        raise InputError(path, f"expected a dict of splits, got {type(splits).__name__}")
    whole_test = {"test-whole", "test-dev", "test-challenge"}
    if not {"train", "valid"} <= set(splits) or not ("test" in splits or whole_test <= set(splits)):
        raise InputError(path, "expected splits train, valid and either test or "
                               "test-whole/test-dev/test-challenge")
    return {name: as_node_ids(ids, path, f"split {name!r}") for name, ids in splits.items()}


def load_edge_index(path: Path) -> np.ndarray:
    """Memory-map an ``edge_index.npy`` file: [2, E] integer ids (row 0 source type)."""
    try:
        edges = np.load(path, mmap_mode="r")
    except (ValueError, OSError, EOFError) as err:
        raise InputError(path, f"not a readable .npy array: {err}") from None
    if edges.ndim != 2 or edges.shape[0] != 2 or edges.dtype.kind not in "iu":
        raise InputError(path, f"expected an integer [2, E] array, got {edges.dtype} "
                               f"{list(edges.shape)}")
    return edges


def check_ids(ids: np.ndarray, count: int, path: Path, what: str) -> None:
    """InputError unless every id is in [0, count)."""
    if len(ids) and (ids.min() < 0 or ids.max() >= count):
        bad = ids[(ids < 0) | (ids >= count)][0]
        raise InputError(path, f"{what} {bad} out of range [0, {count})")


def node_ranges(dataset: LocalMAG240MDataset, with_authors: bool) -> Ranges:
    """Node type -> [start, end) of its ids in the built graph."""
    papers, authors = dataset.num_papers, dataset.num_authors
    if not with_authors:
        return {"paper": (0, papers)}
    return {"paper": (0, papers), "author": (papers, papers + authors),
            "institution": (papers + authors, papers + authors + dataset.num_institutions)}


def typed_edge_chunks(dataset: LocalMAG240MDataset, ranges: Ranges, rows: int) -> EdgeChunks:
    """(src, dst) graph ids of every relation between the node types in ``ranges``."""
    relations = [PAPER_RELATION, *(r for r in AUTHOR_RELATIONS if r[0] in ranges)]
    for src_type, dst_type in relations:
        path = dataset.edge_index_path(src_type, dst_type)
        edges = load_edge_index(path)
        (src_start, src_end), (dst_start, dst_end) = ranges[src_type], ranges[dst_type]
        for start in range(0, edges.shape[1], rows):
            src = np.asarray(edges[0, start:start + rows], dtype=np.int64)
            dst = np.asarray(edges[1, start:start + rows], dtype=np.int64)
            check_ids(src, src_end - src_start, path, f"{src_type} id")
            check_ids(dst, dst_end - dst_start, path, f"{dst_type} id")
            yield src + src_start, dst + dst_start


def paper_features(dataset: LocalMAG240MDataset) -> np.ndarray:
    """The memory-mapped [P, F] float paper features, checked against meta.pt."""
    path = dataset.feature_path
    try:
        features = dataset.paper_feat
    except (ValueError, OSError, EOFError) as err:
        raise InputError(path, f"not a readable .npy array: {err}") from None
    if features.ndim != 2 or features.shape[0] != dataset.num_papers \
            or features.dtype.kind != "f":
        raise InputError(path, f"expected float features [{dataset.num_papers}, F] (meta.pt "
                               f"paper count), got {features.dtype} {list(features.shape)}")
    return features


def row_chunks(array: np.ndarray, rows: int) -> Iterator[np.ndarray]:
    for start in range(0, len(array), rows):
        yield array[start:start + rows]


def is_sorted(values: np.ndarray, rows: int) -> bool:
    """Whether a (memory-mapped) 1-D array is non-decreasing, checked ``rows`` at a time."""
    previous = None
    for chunk in row_chunks(values, rows):
        chunk = np.asarray(chunk)
        if (previous is not None and len(chunk) and chunk[0] < previous) \
                or np.any(chunk[1:] < chunk[:-1]):
            return False
        previous = chunk[-1] if len(chunk) else previous
    return True


def edges_with_source_in(edges: np.ndarray, low: int, high: int, rows: int,
                         sources_sorted: bool) -> EdgeChunks:
    """(source - low, target) chunks of the [2, E] edges whose source is in [low, high).

    With sources sorted, the matching edges are one span found by binary search; otherwise
    every edge is scanned. Both author relations of the real release are sorted by author
    (OGB's own baselines build their sparse matrices with ``is_sorted=True``).
    """
    start, stop = (np.searchsorted(edges[0], [low, high]) if sources_sorted
                   else (0, edges.shape[1]))
    for begin in range(int(start), int(stop), rows):
        end = min(begin + rows, int(stop))
        sources = np.array(edges[0, begin:end], dtype=np.int64)
        targets = np.array(edges[1, begin:end], dtype=np.int64)
        if not sources_sorted:
            inside = (sources >= low) & (sources < high)
            sources, targets = sources[inside], targets[inside]
        yield sources - low, targets


class MeanAccumulator:
    """Per-node running sums ([n, F] float32) and counts of feature rows, for means."""

    def __init__(self, num_nodes: int, dim: int) -> None:
        self.sums = np.zeros((num_nodes, dim), dtype=np.float32)
        self.counts = np.zeros(num_nodes, dtype=np.int64)

    def add(self, nodes: np.ndarray, rows: np.ndarray) -> None:
        """Add ``rows`` [k, F] to the sums of ``nodes`` [k] int64 (repeats allowed)."""
        torch.from_numpy(self.sums).index_add_(
            0, torch.from_numpy(nodes), torch.from_numpy(rows.astype(np.float32)))
        self.counts += np.bincount(nodes, minlength=len(self.counts))

    def means(self) -> np.ndarray:
        """[n, F] float32 means; zeros for nodes that got no rows. Reuses the sums buffer."""
        has_rows = self.counts[:, None] > 0
        return np.divide(self.sums, self.counts[:, None], out=self.sums, where=has_rows)


def typed_feature_chunks(dataset: LocalMAG240MDataset, features: np.ndarray, writer,
                         ) -> Iterator[np.ndarray]:
    """Feature rows of papers, then authors (mean of their papers), then institutions (mean
    of their authors), in the paper features' dtype, within the writer's memory budget.

    Authors are processed in blocks: a block's float32 sums get ``BLOCK_CHUNK_SHARES`` row
    chunks of the budget, and its edges are gathered ``gather_rows`` at a time.
    """
    dim, dtype = features.shape[1], features.dtype
    yield from row_chunks(features, writer.rows_per_chunk(dim * dtype.itemsize))
    writes_path = dataset.edge_index_path("author", "paper")
    affiliations_path = dataset.edge_index_path("author", "institution")
    writes, affiliations = load_edge_index(writes_path), load_edge_index(affiliations_path)
    scan_rows = writer.rows_per_chunk(EDGE_ROW_BYTES)
    writes_sorted = is_sorted(writes[0], scan_rows)
    affiliations_sorted = is_sorted(affiliations[0], scan_rows)
    gather_rows = writer.rows_per_chunk(dim * (dtype.itemsize + 4))   # stored + float32 copy
    block_rows = BLOCK_CHUNK_SHARES * writer.rows_per_chunk(dim * 4)
    institutions = MeanAccumulator(dataset.num_institutions, dim)
    for low in range(0, dataset.num_authors, block_rows):
        high = min(low + block_rows, dataset.num_authors)
        authors = MeanAccumulator(high - low, dim)
        for local, papers in edges_with_source_in(writes, low, high, gather_rows,
                                                  writes_sorted):
            check_ids(papers, dataset.num_papers, writes_path, "paper id")
            authors.add(local, features[papers])
        author_means = authors.means()
        for local, targets in edges_with_source_in(affiliations, low, high, gather_rows,
                                                   affiliations_sorted):
            check_ids(targets, dataset.num_institutions, affiliations_path, "institution id")
            institutions.add(targets, author_means[local])
        yield author_means.astype(dtype)
    yield institutions.means().astype(dtype)


def paper_labels(dataset: LocalMAG240MDataset, num_nodes: int, rows: int) -> np.ndarray:
    """int64 [num_nodes] class ids: paper labels (NaN -> -1), then -1 for other nodes."""
    path = dataset.label_path
    try:
        raw = dataset.paper_label
    except (ValueError, OSError, EOFError) as err:
        raise InputError(path, f"not a readable .npy array: {err}") from None
    if raw.shape[0] != dataset.num_papers:
        raise InputError(path, f"has {raw.shape[0]} labels but meta.pt says "
                               f"{dataset.num_papers} papers")
    labels = np.full(num_nodes, -1, dtype=np.int64)
    for start in range(0, dataset.num_papers, rows):
        stop = min(start + rows, dataset.num_papers)
        labels[start:stop] = class_ids(np.asarray(raw[start:stop]), path)
    return labels


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--root", required=True, type=Path,
                        help="the root passed to ogb when downloading: the dataset is read from "
                             "ROOT/mag240m_kddcup2021 (nothing is downloaded)")
    parser.add_argument("--with-authors", action="store_true",
                        help="add authors and institutions as nodes (features: means of their "
                             "papers' / authors' features)")


def build(args: argparse.Namespace, writer) -> None:
    dataset = LocalMAG240MDataset(args.root, args.with_authors)
    features = paper_features(dataset)
    ranges = node_ranges(dataset, args.with_authors)
    num_nodes = max(end for _, end in ranges.values())
    edge_rows = writer.rows_per_chunk(EDGE_ROW_BYTES)
    topology_path = (dataset.directory / "processed" if args.with_authors
                     else dataset.edge_index_path(*PAPER_RELATION))
    writer.write_topology(num_nodes, lambda: typed_edge_chunks(dataset, ranges, edge_rows),
                          source_path=str(topology_path), symmetrize=args.symmetrize,
                          self_loops=args.self_loops, dedup=args.dedup)
    writer.set_node_types(ranges)
    chunks = (typed_feature_chunks(dataset, features, writer) if args.with_authors
              else row_chunks(features, writer.rows_per_chunk(features[0].nbytes)))
    writer.write_features(num_nodes, chunks, source_path=str(dataset.feature_path))
    writer.write_labels(paper_labels(dataset, num_nodes, writer.rows_per_chunk(16)),
                        source_path=str(dataset.label_path), num_classes=dataset.num_classes)
    split_path = dataset.directory / "split_dict.pt"
    for name in WRITTEN_SPLITS:
        if name in dataset.get_idx_split():
            ids = dataset.get_idx_split(name)
            check_ids(ids, dataset.num_papers, split_path, f"split {name!r} paper id")
            writer.write_split(name, ids, source_path=str(split_path))


SOURCE = Source(
    name="mag240m",
    help="OGB-LSC MAG240M from a local ogb download: paper citations, optionally with "
         "authors and institutions",
    add_arguments=add_arguments,
    build=build,
    topology=UNDIRECTED,
)
