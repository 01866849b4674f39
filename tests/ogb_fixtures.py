"""Tiny directories laid out like real OGB downloads: same file names, formats and dtypes.

``ogbn_csv_dataset`` mimics ogbn-arxiv/ogbn-products (gzip CSV files under ``raw/``),
``ogbn_binary_dataset`` ogbn-papers100M (``raw/data.npz``, ``raw/node-label.npz``) and
``mag240m_dataset`` the OGB-LSC ``mag240m_kddcup2021`` directory.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch

# The "split" entry of ogb's nodeproppred/master.csv.
OGBN_SPLIT_TYPE = {"ogbn-arxiv": "time", "ogbn-products": "sales_ranking",
                   "ogbn-papers100M": "time"}


@dataclass
class TinyGraph:
    """A random directed graph with duplicate edges and a self-loop, features and labels."""

    num_nodes: int
    src: np.ndarray              # [E] int64
    dst: np.ndarray              # [E] int64
    features: np.ndarray         # [N, F] float32
    labels: np.ndarray           # [N] int64, -1 = unlabelled
    splits: dict[str, np.ndarray] = field(default_factory=dict)


def tiny_graph(num_nodes: int = 15, num_edges: int = 40, feat_dim: int = 6,
               num_classes: int = 4, unlabelled: int = 0, seed: int = 0) -> TinyGraph:
    rng = np.random.default_rng(seed)
    src = rng.integers(0, num_nodes, num_edges)
    dst = rng.integers(0, num_nodes, num_edges)
    src[:3], dst[:3] = [1, 1, 2], [2, 2, 2]      # a duplicate pair and a self-loop
    features = rng.normal(size=(num_nodes, feat_dim)).astype(np.float32)
    labels = rng.integers(0, num_classes, num_nodes)
    labels[rng.choice(num_nodes, unlabelled, replace=False)] = -1
    order = rng.permutation(num_nodes)
    splits = {"train": np.sort(order[:6]), "valid": np.sort(order[6:9]),
              "test": np.sort(order[9:])}
    return TinyGraph(num_nodes, src.astype(np.int64), dst.astype(np.int64), features,
                     labels.astype(np.int64), splits)


def _write_csv(path: Path, values: np.ndarray, fmt: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savetxt(path, values, fmt=fmt, delimiter=",")   # a .gz name makes numpy gzip it


def _write_release(directory: Path, version: int = 1) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"RELEASE_v{version}.txt").write_text(f"release v{version}\n")


def _write_csv_splits(directory: Path, name: str, splits: dict[str, np.ndarray]) -> None:
    for split, ids in splits.items():
        _write_csv(directory / "split" / OGBN_SPLIT_TYPE[name] / f"{split}.csv.gz",
                   ids[:, None], "%d")


def ogbn_csv_dataset(root: Path, graph: TinyGraph, name: str = "ogbn-arxiv") -> Path:
    """``root/<name>/`` as ``read_csv_graph_raw`` reads it; returns the dataset directory."""
    directory = root / name.replace("-", "_")
    raw = directory / "raw"
    _write_release(directory)
    _write_csv(raw / "edge.csv.gz", np.stack([graph.src, graph.dst], axis=1), "%d")
    _write_csv(raw / "num-node-list.csv.gz", np.array([[graph.num_nodes]]), "%d")
    _write_csv(raw / "num-edge-list.csv.gz", np.array([[len(graph.src)]]), "%d")
    _write_csv(raw / "node-feat.csv.gz", graph.features, "%.9g")   # exact for float32
    _write_csv(raw / "node-label.csv.gz", graph.labels[:, None], "%d")
    _write_csv(raw / "node_year.csv.gz", np.full((graph.num_nodes, 1), 2020), "%d")
    _write_csv_splits(directory, name, graph.splits)
    return directory


def ogbn_binary_dataset(root: Path, graph: TinyGraph, name: str = "ogbn-papers100M") -> Path:
    """``root/<name>/`` as ``read_binary_graph_raw`` reads it (labels NaN where -1)."""
    directory = root / name.replace("-", "_")
    raw = directory / "raw"
    raw.mkdir(parents=True)
    _write_release(directory)
    np.savez_compressed(raw / "data.npz", edge_index=np.stack([graph.src, graph.dst]),
                        num_nodes_list=np.array([graph.num_nodes]),
                        num_edges_list=np.array([len(graph.src)]),
                        node_feat=graph.features,
                        node_year=np.full((graph.num_nodes, 1), 2020))
    labels = np.where(graph.labels < 0, np.nan, graph.labels).astype(np.float32)[:, None]
    np.savez_compressed(raw / "node-label.npz", node_label=labels)
    _write_csv_splits(directory, name, graph.splits)
    return directory


@dataclass
class TinyMag:
    """The arrays written into a tiny MAG240M directory."""

    directory: Path
    num_papers: int
    num_authors: int
    num_institutions: int
    num_classes: int
    cites: np.ndarray            # [2, E] int64 (paper, paper)
    writes: np.ndarray           # [2, E] int64 (author, paper)
    affiliations: np.ndarray     # [2, E] int64 (author, institution)
    paper_features: np.ndarray   # [P, F] float16
    paper_labels: np.ndarray     # [P] float32, NaN = unlabelled
    splits: dict[str, np.ndarray]

    def edge_file(self, relation: str) -> Path:
        return self.directory / "processed" / relation / "edge_index.npy"


MAG_RELATIONS = {"cites": "paper___cites___paper", "writes": "author___writes___paper",
                 "affiliations": "author___affiliated_with___institution"}


def mag240m_dataset(root: Path, num_papers: int = 20, num_authors: int = 9,
                    num_institutions: int = 3, feat_dim: int = 8, sorted_writes: bool = True,
                    whole_test_layout: bool = False, seed: int = 0) -> TinyMag:
    """``root/mag240m_kddcup2021/`` as ``ogb.lsc.MAG240MDataset`` reads it.

    Author ``num_authors - 1`` writes no paper (its features must be zeros) but is affiliated
    with institution 1, and institution 0 gets no author (zeros too). ``split_dict.pt`` holds
    numpy arrays like the real one: train/valid/test, or test-whole/test-dev/test-challenge
    with ``whole_test_layout``.
    """
    rng = np.random.default_rng(seed)
    directory = root / "mag240m_kddcup2021"
    _write_release(directory)
    num_classes = 5
    torch.save({"paper": num_papers, "author": num_authors, "institution": num_institutions,
                "num_classes": num_classes}, directory / "meta.pt")
    cites = rng.integers(0, num_papers, (2, 50))
    cites[:, :3] = [[4, 4, 5], [5, 5, 5]]        # a duplicate pair and a self-loop
    writers = num_authors - 1
    writes = np.stack([rng.integers(0, writers, 30), rng.integers(0, num_papers, 30)])
    writes[0, :writers] = np.arange(writers)     # every other author writes a paper
    if sorted_writes:
        writes = writes[:, np.argsort(writes[0], kind="stable")]
    # Institution 1 also counts the paperless last author (a zero row in its mean).
    affiliations = np.stack([np.arange(num_authors),
                             1 + np.arange(num_authors) % (num_institutions - 1)])
    affiliations[1, -1] = 1
    features = rng.normal(size=(num_papers, feat_dim)).astype(np.float16)
    labels = rng.integers(0, num_classes, num_papers).astype(np.float32)
    labels[num_papers // 2:] = np.nan             # test papers are unlabelled in the release
    order = rng.permutation(num_papers)
    splits = {"train": np.sort(order[:6]), "valid": np.sort(order[6:9]),
              "test": np.sort(order[9:19])}
    stored_splits = dict(splits)
    if whole_test_layout:
        test = stored_splits.pop("test")
        stored_splits.update({"test-whole": test, "test-dev": test[:6],
                              "test-challenge": test[6:]})
    torch.save(stored_splits, directory / "split_dict.pt")
    mag = TinyMag(directory, num_papers, num_authors, num_institutions, num_classes,
                  cites.astype(np.int64), writes.astype(np.int64),
                  affiliations.astype(np.int64), features, labels, splits)
    paper_dir = directory / "processed" / "paper"
    paper_dir.mkdir(parents=True)
    np.save(paper_dir / "node_feat.npy", features)
    np.save(paper_dir / "node_label.npy", labels)
    np.save(paper_dir / "node_year.npy", np.full(num_papers, 2019, dtype=np.int64))
    for attribute, relation in MAG_RELATIONS.items():
        mag.edge_file(relation).parent.mkdir(parents=True)
        np.save(mag.edge_file(relation), getattr(mag, attribute))
    return mag


def undirected_csc(num_nodes: int, src: np.ndarray, dst: np.ndarray
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Reference (indptr, indices) of the graph symmetrised, deduplicated, without self-loops:
    in-neighbours of each node, sorted, as a store holds them."""
    keep = src != dst
    src, dst = src[keep], dst[keep]
    matrix = sp.coo_matrix((np.ones(len(src)), (dst, src)), shape=(num_nodes, num_nodes)).tocsr()
    matrix = (matrix + matrix.T).tocsr()
    matrix.sort_indices()
    return matrix.indptr.astype(np.int64), matrix.indices.astype(np.int64)
