"""A 2-D map of a run's node embeddings, coloured by class, for ``bgrl-dgl report``.

The nodes: the store's labelled nodes, or a seeded sample of MAX_MAP_NODES of them. Their
embeddings come from the newest export recorded in ``RUN/evaluations.jsonl`` (by ``evaluate
--run``) that is still complete and holds them, else from the run's online encoder (newest
checkpoint) through exact layer-wise inference of those nodes only. The projection is t-SNE
(openTSNE, or scikit-learn's when openTSNE is missing) after PCA to PCA_DIMS dimensions;
PCA alone when neither is installed or the sample is too small for t-SNE.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bgrl_dgl.errors import InputError

MAX_MAP_NODES = 10_000
PCA_DIMS = 50
MIN_TSNE_NODES = 50
TRAINED_ENCODERS = ("online", "target")


@dataclass(frozen=True)
class EmbeddingMap:
    """Points [n, 2] of ``labels`` [n]; ``method``: t-SNE or PCA; ``source``: where the
    embeddings came from, in words."""

    points: np.ndarray
    labels: np.ndarray
    method: str
    source: str


def sample_labelled(labels: np.ndarray, limit: int = MAX_MAP_NODES, seed: int = 0,
                    chunk: int = 1 << 22) -> np.ndarray:
    """Ascending ids of the labelled nodes (label >= 0), at most ``limit`` of them (a seeded
    uniform sample), found slice by slice."""
    found = [start + np.flatnonzero(np.asarray(labels[start:start + chunk]) >= 0)
             for start in range(0, len(labels), chunk)]
    ids = np.concatenate(found) if found else np.zeros(0, dtype=np.int64)
    if ids.size > limit:
        ids = np.sort(np.random.default_rng(seed).choice(ids, limit, replace=False))
    return ids.astype(np.int64)


def project(embeddings: np.ndarray, seed: int = 0) -> tuple[np.ndarray, str]:
    """Embeddings [n, D] -> (points [n, 2], how): t-SNE by openTSNE, else by scikit-learn,
    after PCA to PCA_DIMS dimensions of the standardised embeddings; PCA alone when neither
    library is installed or there are fewer than MIN_TSNE_NODES points."""
    x = np.asarray(embeddings, dtype=np.float64)
    x = (x - x.mean(axis=0)) / np.maximum(x.std(axis=0), 1e-12)
    reduced = pca(x, min(PCA_DIMS, *x.shape))
    if x.shape[0] >= MIN_TSNE_NODES:
        perplexity = min(30.0, (x.shape[0] - 1) / 3)
        try:
            from openTSNE import TSNE
        except ImportError:
            pass
        else:
            tsne = TSNE(n_components=2, perplexity=perplexity, random_state=seed)
            return np.asarray(tsne.fit(reduced), dtype=np.float32), "t-SNE"
        try:
            from sklearn.manifold import TSNE as SklearnTSNE
        except ImportError:
            pass
        else:
            tsne = SklearnTSNE(n_components=2, perplexity=perplexity, init="pca",
                               learning_rate="auto", random_state=seed)
            return tsne.fit_transform(reduced).astype(np.float32), "t-SNE"
    points = reduced[:, :2] if reduced.shape[1] >= 2 else np.pad(reduced, ((0, 0), (0, 1)))
    return points.astype(np.float32), "PCA"


def pca(x: np.ndarray, dims: int) -> np.ndarray:
    """The centred rows of ``x`` [n, D] on their ``dims`` principal axes: [n, dims]."""
    centred = x - x.mean(axis=0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    return centred @ vt[:dims].T


def recorded_embeddings(evaluations: list[dict[str, Any]], store: Any,
                        nodes: np.ndarray) -> tuple[np.ndarray, str] | None:
    """The rows of ``nodes`` from the newest recorded export of a trained encoder that is
    complete and holds them, with a description; None if there is none."""
    from bgrl_dgl.embeddings.parquet import open_export, read_embeddings

    for record in reversed(evaluations):
        out = record.get("embeddings")
        if record.get("encoder") not in TRAINED_ENCODERS or not out:
            continue
        try:
            manifest = open_export(out)
            rows = read_embeddings(out, manifest, store, nodes)
        except InputError:
            continue
        where = Path(out).name
        return rows, f"{manifest['encoder']} encoder, step {manifest['step']}, from {where}"
    return None


def computed_embeddings(run_dir: Path, store: Any, nodes: np.ndarray) -> tuple[np.ndarray, str]:
    """The rows of ``nodes`` by the run's online encoder (exact inference of those nodes)."""
    from bgrl_dgl.embeddings.layerwise import embed_store
    from bgrl_dgl.runs import load_encoder

    source = load_encoder(run_dir, which="online")
    if source.encoder.in_dim != store.feat_dim:
        raise InputError(store.path, f"has {store.feat_dim}-d features but the run's encoder "
                                     f"takes {source.encoder.in_dim}-d ones")
    rows = embed_store(source.encoder, store, nodes=nodes)
    return rows, f"online encoder, step {source.checkpoint['step']}"


def embedding_map(run_dir: str | os.PathLike, data: str | os.PathLike,
                  evaluations: list[dict[str, Any]], limit: int = MAX_MAP_NODES) -> EmbeddingMap:
    """The 2-D map of (a sample of) the labelled nodes of the store ``data`` embedded by the
    run; InputError when the store is missing or has no labels, or nothing can embed."""
    from bgrl_dgl.store.reader import GraphStore

    store = GraphStore.open(data)
    if store.labels is None:
        raise InputError(store.path, "has no labels to colour the map by")
    nodes = sample_labelled(store.labels, limit)
    if nodes.size == 0:
        raise InputError(store.path, "has no labelled nodes")
    found = recorded_embeddings(evaluations, store, nodes)
    rows, source = found if found is not None else computed_embeddings(Path(run_dir), store, nodes)
    points, method = project(rows)
    return EmbeddingMap(points, np.asarray(store.labels[nodes]), method, source)
