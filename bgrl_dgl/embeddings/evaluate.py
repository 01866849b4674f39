"""``evaluate``: the BGRL linear-probe protocol on a store's labels, for embeddings exported
by ``embed``, computed in memory from a run's encoder, or the store's raw node features.

Both read only the labelled nodes' rows and fit the same probe (embeddings/probe.py) on the
store's train/valid/test splits (``public``) or on ``num_splits`` random stratified
10/10/80 splits (``random``).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal

import numpy as np

from bgrl_dgl.embeddings.layer_progress import embed_store_with_progress
from bgrl_dgl.embeddings.parquet import open_export, read_embeddings
from bgrl_dgl.embeddings.probe import (
    ProbeSummary,
    Scaling,
    linear_probe,
    random_split_probe,
    summarize,
)
from bgrl_dgl.errors import InputError
from bgrl_dgl.progress import progress_bar
from bgrl_dgl.runs import EncoderName, load_encoder, load_run_config
from bgrl_dgl.splits import SPLIT_NAMES
from bgrl_dgl.store.reader import GraphStore

SplitMode = Literal["public", "random"]
FEATURE_ROWS_PER_READ = 1 << 16


@dataclass(frozen=True)
class ProbeTask:
    """The labelled nodes a probe reads, and how they are split."""

    nodes: np.ndarray                          # [M] ascending store indices
    labels: np.ndarray                         # [M] (or [M, C] multi-label)
    local_splits: dict[str, np.ndarray] | None  # positions into ``nodes``; None: random splits

    @classmethod
    def of_store(cls, store: GraphStore, splits: SplitMode, num_splits: int) -> "ProbeTask":
        """The nodes of ``store`` that ``splits`` uses: the split members with a label, or
        every labelled node for random splits."""
        if store.labels is None:
            raise InputError(store.path, "has no labels to evaluate with")
        if splits not in ("public", "random"):
            raise InputError(None, f"--splits must be public or random, got {splits!r}")
        check_num_splits(num_splits)
        labels = np.asarray(store.labels)
        labelled = labels >= 0 if labels.ndim == 1 else (labels >= 0).all(axis=1)
        if splits == "random":
            nodes = np.flatnonzero(labelled)
            local = None
        else:
            split_ids = {name: np.asarray(store.split(name), dtype=np.int64)
                         for name in SPLIT_NAMES}
            split_ids = {name: ids[labelled[ids]] for name, ids in split_ids.items()}
            nodes = np.unique(np.concatenate(list(split_ids.values())))
            local = {name: np.searchsorted(nodes, ids) for name, ids in split_ids.items()}
        if nodes.size == 0:
            raise InputError(store.path, "has no labelled nodes to evaluate with")
        return cls(nodes, labels[nodes], local)

    def run(self, embeddings: np.ndarray, num_splits: int, seed: int,
            scaling: Scaling = "standardise") -> ProbeSummary:
        """Fit the probe on ``embeddings`` [M, D] (rows of ``nodes``), scaled by
        ``scaling`` (see :func:`linear_probe`)."""
        if self.local_splits is None:
            return random_split_probe(embeddings, self.labels, num_splits, seed=seed,
                                      scaling=scaling)
        return summarize([linear_probe(embeddings, self.labels, self.local_splits,
                                       scaling=scaling)])


def check_num_splits(num_splits: int) -> None:
    """InputError unless at least one split is asked for."""
    if num_splits < 1:
        raise InputError(None, f"--num-splits must be positive, got {num_splits}")


def check_export_store(out: str | os.PathLike, manifest: dict[str, Any],
                       store: GraphStore) -> None:
    """InputError unless ``store`` is the store the export was made from (or a copy of it):
    the node ids of another store name other nodes, and would be scored without an error.
    The identity is what the manifest records of it: node and edge counts and the time
    it was created."""
    recorded = manifest["data"]
    theirs = (recorded["num_nodes"], recorded["num_edges"], recorded.get("created"))
    ours = (store.num_nodes, store.num_edges, store.meta.get("created"))
    if theirs != ours:
        raise InputError(store.path, f"is not the store the export {out} was made from "
                                     f"(that one: {_describe_store(recorded['path'], *theirs)}; "
                                     f"this one: {_describe_store(None, *ours)})")


def _describe_store(path: str | None, num_nodes: int, num_edges: int, created: Any) -> str:
    where = "" if path is None else f"{path}: "
    return f"{where}{num_nodes:,} nodes, {num_edges:,} edges, created {created or 'unknown'}"


def probe_store(store: GraphStore, rows_of: Callable[[np.ndarray], np.ndarray],
                splits: SplitMode, num_splits: int, seed: int,
                scaling: Scaling = "standardise") -> tuple[ProbeSummary, int]:
    """The probe protocol on ``store``'s labels.

    Args:
        rows_of: maps ascending node ids [M] to their embeddings [M, D].
        scaling: how rows are scaled before the probe (see :func:`linear_probe`).

    Returns:
        The probe summary and the number of labelled nodes it read.
    """
    task = ProbeTask.of_store(store, splits, num_splits)
    embeddings = rows_of(task.nodes)
    try:
        return task.run(embeddings, num_splits, seed, scaling), task.nodes.size
    except ValueError as err:
        raise InputError(store.path, str(err)) from None


def evaluate_export(out: str | os.PathLike, data: str | os.PathLike | None = None, *,
                    splits: SplitMode = "public", num_splits: int = 20,
                    seed: int = 0) -> dict[str, Any]:
    """Probe the embeddings of the export ``out`` on the labels of its store (or ``data``).

    Returns:
        A JSON-ready summary (see :func:`evaluation_record`).
    """
    check_num_splits(num_splits)
    manifest = open_export(out)
    store = GraphStore.open(data if data is not None else manifest["data"]["path"])
    check_export_store(out, manifest, store)
    summary, num_labelled = probe_store(
        store, lambda nodes: read_embeddings(out, manifest, store, nodes), splits, num_splits,
        seed)
    return evaluation_record(store, splits, summary, num_labelled, encoder=manifest["encoder"],
                             step=manifest["step"], embeddings=str(Path(out).resolve()))


def evaluate_run(run: str | os.PathLike, data: str | os.PathLike | None = None, *,
                 encoder: EncoderName = "online", splits: SplitMode = "public",
                 num_splits: int = 20, seed: int = 0) -> dict[str, Any]:
    """Probe the in-memory embeddings (exact layer-wise inference of every node) of a run's
    encoder: for graphs whose [N, D] embeddings fit in memory; larger ones go through
    ``embed`` and :func:`evaluate_export`.

    Returns:
        A JSON-ready summary (see :func:`evaluation_record`).
    """
    check_num_splits(num_splits)
    _, info = load_run_config(run)
    store = GraphStore.open(data if data is not None else info.data)
    source = load_encoder(run, which=encoder)
    if store.feat_dim != source.encoder.in_dim:
        raise InputError(store.path, f"has {store.feat_dim}-d features; the encoder takes "
                                     f"{source.encoder.in_dim}-d ones")
    # Every node is embedded, as ``embed`` does, so that this probe and the probe of an
    # export of the same encoder see the same numbers (a subset differs in rounding).
    embeddings = embed_store_with_progress(source.encoder, store)
    summary, num_labelled = probe_store(store, lambda nodes: embeddings[nodes], splits,
                                        num_splits, seed)
    step = source.checkpoint["step"] if source.checkpoint else 0
    return evaluation_record(store, splits, summary, num_labelled, encoder=encoder, step=step,
                             embeddings=None)


def evaluate_raw_features(data: str | os.PathLike | None = None,
                          run: str | os.PathLike | None = None, *, splits: SplitMode = "public",
                          num_splits: int = 20, seed: int = 0) -> dict[str, Any]:
    """Probe the store's own node features (the store ``data``, or the one ``run`` trained
    on): the baseline that shows what the graph and the training add. The rows are scaled to
    unit length (not standardised as embeddings are; see :mod:`bgrl_dgl.embeddings.probe`).

    Returns:
        A JSON-ready summary (see :func:`evaluation_record`), encoder ``raw-features``.
    """
    if data is None:
        if run is None:
            raise InputError(None, "--raw-features needs --data STORE (or --run RUN)")
        data = load_run_config(run)[1].data
    store = GraphStore.open(data)
    summary, num_labelled = probe_store(store, lambda nodes: feature_rows(store, nodes),
                                        splits, num_splits, seed, scaling="unit-rows")
    return evaluation_record(store, splits, summary, num_labelled, encoder="raw-features",
                             step=0, embeddings=None)


def feature_rows(store: GraphStore, nodes: np.ndarray) -> np.ndarray:
    """The stored feature rows [M, F] of the ascending ids ``nodes``, read in slices."""
    rows = np.empty((nodes.size, store.feat_dim), dtype=store.features.dtype)
    with progress_bar(total=nodes.size, desc="read features", unit="rows", scale=True) as bar:
        for start in range(0, nodes.size, FEATURE_ROWS_PER_READ):
            chunk = nodes[start:start + FEATURE_ROWS_PER_READ]
            rows[start:start + chunk.size] = store.features[chunk]
            bar.update(chunk.size)
    return rows


def evaluation_record(store: GraphStore, splits: str, summary: ProbeSummary, num_labelled: int,
                      *, encoder: str, step: int, embeddings: str | None) -> dict[str, Any]:
    """The JSON line ``evaluate`` prints and appends to ``RUN/evaluations.jsonl``."""
    return {
        "embeddings": embeddings,
        "data": str(store.path.resolve()),
        "encoder": encoder,
        "step": step,
        "splits": splits,
        "metric": summary.results[0].metric,
        "test_acc_mean": summary.test_mean,
        "test_acc_std": summary.test_std,
        "val_acc_mean": summary.val_mean,
        "val_acc_std": summary.val_std,
        "num_splits": len(summary.results),
        "num_labelled": int(num_labelled),
    }
