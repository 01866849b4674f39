"""Linear evaluation of frozen node embeddings (the BGRL protocol).

An L2-regularised logistic regression is trained on the embeddings of the train split, once
per weight decay of a log-spaced grid; the weight decay with the best validation score is
chosen and its test score reported. Single-label tasks (labels [N] int, -1 = unlabelled) use a
softmax classifier scored by accuracy; multi-label tasks (labels [N, C] 0/1, rows holding a
negative entry = unlabelled) use one sigmoid per class scored by micro-F1.

Embeddings are standardised per dimension with the train split's mean and standard deviation
(standardising keeps every dimension on the same scale, so one weight-decay grid suits
embeddings of any scale or width). Raw input features are scaled to unit-length rows instead,
as BGRL's reference code does: standardising sparse bag-of-words columns with the statistics of
a small train split blows rare words up (Cora's public split: 52.9 standardised, 60.3 with
unit rows).

Each problem is convex and solved from the same start, full batch, by L-BFGS with a
strong-Wolfe line search, so results depend only on the inputs. The grid is solved from the
strongest decay to the weakest, each solution warm-starting the next (a regularisation path):
the weakly regularised problems, the slowest to solve from zero, start near their optimum.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Literal, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from bgrl_dgl.progress import progress_bar
from bgrl_dgl.splits import DEFAULT_FRACTIONS, SPLIT_NAMES, stratified_split

Scaling = Literal["standardise", "unit-rows"]

# Per-sample loss + weight_decay / 2 * ||W||^2; 2^-15 (almost unregularised) .. 2^3 (close to
# the majority-class predictor on standardised embeddings).
DEFAULT_WEIGHT_DECAYS: tuple[float, ...] = tuple(2.0 ** k for k in range(-15, 4, 2))


@dataclass(frozen=True)
class ProbeResult:
    """Scores of the probe chosen on validation: accuracy, or micro-F1 when multi-label.

    ``val_by_decay`` maps every weight decay of the grid to its validation score.
    """

    test_acc: float
    val_acc: float
    train_acc: float
    weight_decay: float
    val_by_decay: dict[float, float]
    metric: str


@dataclass(frozen=True)
class ProbeSummary:
    """Mean and standard deviation (ddof=0) of the probes of several random splits."""

    results: tuple[ProbeResult, ...]
    test_mean: float
    test_std: float
    val_mean: float
    val_std: float

    def __str__(self) -> str:
        metric = self.results[0].metric
        return (f"test {metric} {100 * self.test_mean:.2f} ± {100 * self.test_std:.2f} "
                f"(valid {100 * self.val_mean:.2f} ± {100 * self.val_std:.2f}, "
                f"{len(self.results)} splits)")


@dataclass(frozen=True)
class _Task:
    """Loss on logits [n, C] and targets, and the score reported for predictions."""

    metric: str
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    score: Callable[[torch.Tensor, torch.Tensor], float]


def _accuracy(logits: torch.Tensor, targets: torch.Tensor) -> float:
    return (logits.argmax(dim=1) == targets).double().mean().item()


def _multilabel_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy summed over classes, averaged over samples."""
    return F.binary_cross_entropy_with_logits(logits, targets, reduction="sum") / logits.shape[0]


def _micro_f1(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """``2 TP / (predicted positives + true positives)`` over all (sample, class) pairs; 0
    when there are neither."""
    predicted = logits > 0
    true_positives = (predicted & (targets > 0.5)).sum().item()
    denominator = predicted.sum().item() + targets.sum().item()
    return 2.0 * true_positives / denominator if denominator else 0.0


_SINGLE_LABEL = _Task("accuracy", F.cross_entropy, _accuracy)
_MULTI_LABEL = _Task("micro_f1", _multilabel_loss, _micro_f1)


def linear_probe(embeddings: np.ndarray | torch.Tensor, labels: np.ndarray,
                 splits: dict[str, np.ndarray], *,
                 weight_decays: Sequence[float] = DEFAULT_WEIGHT_DECAYS, max_iter: int = 200,
                 device: torch.device | str = "cpu",
                 scaling: Scaling = "standardise") -> ProbeResult:
    """Fit the probe on ``splits["train"]`` per weight decay, choose on ``splits["valid"]``,
    report on ``splits["test"]``.

    ``embeddings``: [N, D] floating point (array, memmap or tensor; only rows of the splits
    are read). ``labels``: [N] integer class ids (-1 = unlabelled) or [N, C] 0/1 multi-label
    (a row with a negative entry = unlabelled). ``splits``: node ids [n] per split;
    unlabelled nodes in a split are dropped. ``max_iter``: L-BFGS iterations per weight
    decay. ``device``: where the probe is trained. ``scaling``: ``standardise`` (each
    dimension with train statistics) or ``unit-rows`` (each row to unit L2 norm). On equal
    validation scores the stronger weight decay wins.

    Raises ValueError on inconsistent shapes, ids out of range, a split without labelled
    nodes, non-finite embeddings of split nodes or a bad grid.
    """
    decays = _check_weight_decays(weight_decays)
    if max_iter < 1:
        raise ValueError(f"max_iter must be positive, got {max_iter}")
    num_nodes = _check_embeddings(embeddings)
    labels, labelled = _check_labels(labels, num_nodes)
    ids = _labelled_split_ids(splits, labelled)
    task = _MULTI_LABEL if labels.ndim == 2 else _SINGLE_LABEL
    if scaling == "unit-rows":
        x = _unit_rows(embeddings, ids, device)
    elif scaling == "standardise":
        x = _standardised_rows(embeddings, ids, device)
    else:
        raise ValueError(f"unknown scaling {scaling!r}")
    y = {name: _targets(labels, rows, device) for name, rows in ids.items()}
    num_classes = labels.shape[1] if labels.ndim == 2 else 1 + max(int(t.max()) for t in y.values())

    path = _regularisation_path(x["train"], y["train"], task, decays, num_classes, max_iter)
    val_by_decay = {decay: task.score(x["valid"] @ weight + bias, y["valid"])
                    for decay, (weight, bias) in path.items()}
    best = max(decays, key=lambda decay: (val_by_decay[decay], decay))
    weight, bias = path[best]
    train, test = (task.score(x[name] @ weight + bias, y[name]) for name in ("train", "test"))
    return ProbeResult(test_acc=test, val_acc=val_by_decay[best], train_acc=train,
                       weight_decay=best, val_by_decay=val_by_decay, metric=task.metric)


def random_split_probe(embeddings: np.ndarray | torch.Tensor, labels: np.ndarray,
                       num_splits: int, fractions: tuple[float, float, float] = DEFAULT_FRACTIONS,
                       seed: int = 0, **probe_kwargs) -> ProbeSummary:
    """:func:`linear_probe` on ``num_splits`` random splits of the labelled nodes.

    Split ``i`` is ``stratified_split(labels, fractions, seed + i)`` (for multi-label
    labels, a uniform random split of the labelled rows). ``probe_kwargs`` go to
    :func:`linear_probe`. Returns the mean and standard deviation over the splits.
    """
    if num_splits < 1:
        raise ValueError(f"num_splits must be positive, got {num_splits}")
    num_nodes = _check_embeddings(embeddings)
    labels, labelled = _check_labels(labels, num_nodes)
    strata = labels if labels.ndim == 1 else np.where(labelled, 0, -1)
    results = [linear_probe(embeddings, labels, stratified_split(strata, fractions, seed + i),
                            **probe_kwargs)
               for i in progress_bar(range(num_splits), desc="probe splits", unit="splits")]
    return summarize(results)


def summarize(results: Sequence[ProbeResult]) -> ProbeSummary:
    """Mean and standard deviation (ddof=0) of test and validation scores of ``results``."""
    if not results:
        raise ValueError("no probe results to summarise")
    test = np.array([r.test_acc for r in results])
    val = np.array([r.val_acc for r in results])
    return ProbeSummary(results=tuple(results), test_mean=float(test.mean()),
                        test_std=float(test.std()), val_mean=float(val.mean()),
                        val_std=float(val.std()))


def _check_weight_decays(weight_decays: Sequence[float]) -> list[float]:
    """Distinct decays, strongest first; each must be finite and non-negative."""
    decays = sorted({float(d) for d in weight_decays}, reverse=True)
    if not decays:
        raise ValueError("weight_decays is empty")
    if not all(math.isfinite(d) and d >= 0 for d in decays):
        raise ValueError("weight decays must be finite and non-negative, "
                         f"got {list(weight_decays)}")
    return decays


def _check_embeddings(embeddings: np.ndarray | torch.Tensor) -> int:
    """Number of rows of a floating-point [N, D] matrix with D >= 1."""
    if embeddings.ndim != 2 or embeddings.shape[1] == 0:
        raise ValueError(f"embeddings must be [N, D] with D >= 1, got shape "
                         f"{tuple(embeddings.shape)}")
    floating = (embeddings.is_floating_point() if isinstance(embeddings, torch.Tensor)
                else np.issubdtype(embeddings.dtype, np.floating))
    if not floating:
        raise ValueError(f"embeddings must be floating point, got {embeddings.dtype}")
    return int(embeddings.shape[0])


def _check_labels(labels: np.ndarray, num_nodes: int) -> tuple[np.ndarray, np.ndarray]:
    """(labels, labelled mask [N] bool) for [N] class ids or [N, C] 0/1 multi-labels."""
    labels = np.asarray(labels)
    if labels.ndim not in (1, 2) or labels.shape[0] != num_nodes:
        raise ValueError(f"labels must be [{num_nodes}] or [{num_nodes}, C], got shape "
                         f"{labels.shape}")
    if not (np.issubdtype(labels.dtype,
                          np.integer) or (labels.ndim == 2 and labels.dtype == np.bool_)):
        raise ValueError(f"labels must be integers, got {labels.dtype}")
    if labels.ndim == 1:
        return labels, labels >= 0
    labelled = (labels >= 0).all(axis=1)
    if (labels[labelled] > 1).any():
        raise ValueError("multi-label labels must be 0 or 1 (a negative entry marks an unlabelled "
                         "row)")
    return labels, labelled


def _labelled_split_ids(splits: dict[str, np.ndarray], labelled: np.ndarray) -> dict[str,
                                                                                     np.ndarray]:
    """The labelled node ids [n] int64 of each of train/valid/test."""
    missing = [name for name in SPLIT_NAMES if name not in splits]
    if missing:
        raise ValueError(f"splits lack {missing}; need {list(SPLIT_NAMES)}")
    ids = {}
    for name in SPLIT_NAMES:
        nodes = np.asarray(splits[name])
        if nodes.ndim != 1 or not np.issubdtype(nodes.dtype, np.integer):
            raise ValueError(f"split {name!r} must be a 1-D integer array, got {nodes.dtype} "
                             f"{nodes.shape}")
        if nodes.size and (nodes.min() < 0 or nodes.max() >= labelled.size):
            raise ValueError(f"split {name!r} has node ids outside [0, {labelled.size})")
        nodes = nodes[labelled[nodes]].astype(np.int64)
        if nodes.size == 0:
            raise ValueError(f"split {name!r} has no labelled nodes")
        ids[name] = nodes
    return ids


def _finite_rows(embeddings: np.ndarray | torch.Tensor, ids: dict[str, np.ndarray],
                 device: torch.device | str) -> dict[str, torch.Tensor]:
    """Rows of each split [n, D] float32 on ``device``; ValueError on NaN or infinity."""
    rows = {name: _float_rows(embeddings, nodes).to(device) for name, nodes in ids.items()}
    for name, x in rows.items():
        if not torch.isfinite(x).all():
            raise ValueError(f"embeddings of split {name!r} contain NaN or infinity")
    return rows


def _unit_rows(embeddings: np.ndarray | torch.Tensor, ids: dict[str, np.ndarray],
               device: torch.device | str) -> dict[str, torch.Tensor]:
    """Rows of each split [n, D] float32 on ``device``, scaled to unit L2 norm (zero rows
    stay zero)."""
    return {name: F.normalize(x, dim=1)
            for name, x in _finite_rows(embeddings, ids, device).items()}


def _standardised_rows(embeddings: np.ndarray | torch.Tensor, ids: dict[str, np.ndarray],
                       device: torch.device | str) -> dict[str, torch.Tensor]:
    """Rows of each split [n, D] float32 on ``device``, standardised with train statistics
    (dimensions constant over the train split are only centred)."""
    rows = _finite_rows(embeddings, ids, device)
    mean = rows["train"].mean(dim=0)
    std = rows["train"].std(dim=0, unbiased=False)
    std = torch.where(std > 0, std, torch.ones_like(std))
    return {name: (x - mean) / std for name, x in rows.items()}


def _float_rows(embeddings: np.ndarray | torch.Tensor, nodes: np.ndarray) -> torch.Tensor:
    if isinstance(embeddings, torch.Tensor):
        return embeddings[torch.from_numpy(nodes).to(embeddings.device)].float()
    return torch.from_numpy(np.asarray(embeddings[nodes], dtype=np.float32))


def _targets(labels: np.ndarray, nodes: np.ndarray, device: torch.device | str) -> torch.Tensor:
    """Class ids [n] int64, or 0/1 targets [n, C] float32 when multi-label."""
    rows = torch.from_numpy(np.asarray(labels[nodes]))
    return (rows.float() if labels.ndim == 2 else rows.long()).to(device)


def _regularisation_path(x: torch.Tensor, y: torch.Tensor, task: _Task, decays: list[float],
                         num_classes: int, max_iter: int) -> dict[float, tuple[torch.Tensor,
                                                                               torch.Tensor]]:
    """Weight [D, C] and bias [C] minimising ``task.loss + decay / 2 * ||weight||^2`` for each
    decay of ``decays`` (strongest first), each solve starting from the previous solution."""
    weight = x.new_zeros(x.shape[1], num_classes)
    bias = x.new_zeros(num_classes)
    path = {}
    for decay in decays:
        weight, bias = _minimise(x, y, task, decay, weight, bias, max_iter)
        path[decay] = (weight, bias)
    return path


def _minimise(x: torch.Tensor, y: torch.Tensor, task: _Task, decay: float, weight: torch.Tensor,
              bias: torch.Tensor, max_iter: int) -> tuple[torch.Tensor, torch.Tensor]:
    weight = weight.clone().requires_grad_(True)
    bias = bias.clone().requires_grad_(True)
    # Tolerances suit float32: the loss is an average of O(1) terms.
    optimizer = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=max_iter,
                                  tolerance_grad=1e-5, tolerance_change=1e-9,
                                  history_size=10, line_search_fn="strong_wolfe")

    def objective() -> torch.Tensor:
        optimizer.zero_grad()
        loss = task.loss(x @ weight + bias, y) + 0.5 * decay * weight.square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(objective)
    return weight.detach(), bias.detach()
