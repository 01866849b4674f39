"""Linear evaluation: accuracy on easy and hopeless data, model selection on validation,
determinism, unlabelled nodes, multi-label micro-F1 and input checks."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from bgrl_dgl.embeddings.probe import (
    DEFAULT_WEIGHT_DECAYS,
    ProbeResult,
    linear_probe,
    random_split_probe,
    summarize,
)
from bgrl_dgl.splits import stratified_split

FRACTIONS = (0.2, 0.2, 0.6)


@pytest.fixture(autouse=True)
def one_thread():
    """These problems are tiny: extra OpenMP threads only add synchronisation, which costs
    seconds when the cores are busy with other work."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def blobs(num_nodes: int, dim: int, num_classes: int, separation: float,
          seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian clusters: embeddings [N, dim] float32 and labels [N] int64."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, num_classes, num_nodes)
    centres = rng.normal(size=(num_classes, dim)) * separation
    embeddings = centres[labels] + rng.normal(size=(num_nodes, dim))
    return embeddings.astype(np.float32), labels.astype(np.int64)


def test_separated_blobs_are_classified_almost_perfectly():
    embeddings, labels = blobs(600, 16, 4, separation=3.0)
    result = linear_probe(embeddings, labels, stratified_split(labels, FRACTIONS, 0))
    assert result.metric == "accuracy"
    assert result.test_acc > 0.95 and result.val_acc > 0.95 and result.train_acc > 0.95


def test_noise_scores_about_chance():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 4, 2000)
    embeddings = rng.normal(size=(2000, 32)).astype(np.float32)
    result = linear_probe(embeddings, labels, stratified_split(labels, FRACTIONS, 0))
    assert abs(result.test_acc - 0.25) < 0.05


def test_same_inputs_give_identical_results():
    embeddings, labels = blobs(400, 24, 3, separation=0.4)
    splits = stratified_split(labels, FRACTIONS, 3)
    first = linear_probe(embeddings, labels, splits)
    second = linear_probe(torch.from_numpy(embeddings), labels, splits)
    assert first == second
    assert 0.4 < first.test_acc < 1.0  # a non-trivial problem, so equality means something


def imbalanced_two_class(seed: int = 0) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """70% class 0 / 30% class 1 separated along dimension 0; valid = 60 class-1 nodes."""
    rng = np.random.default_rng(seed)
    labels = (rng.random(600) < 0.3).astype(np.int64)
    embeddings = rng.normal(size=(600, 8))
    embeddings[:, 0] += np.where(labels == 1, 2.0, -2.0)
    ids = np.arange(600)
    ones = ids[labels == 1]
    splits = {"valid": ones[:60], "test": ids[300:], "train": np.setdiff1d(ids[:300], ones[:60])}
    return embeddings.astype(np.float32), labels, splits


def test_weight_decay_is_chosen_by_validation_score():
    embeddings, labels, splits = imbalanced_two_class()
    honest = linear_probe(embeddings, labels, splits)
    # Strong decay shrinks the weights until only the bias (the majority class) decides, which
    # is wrong on these class-1 validation nodes; weak decays classify them correctly.
    assert honest.weight_decay < max(DEFAULT_WEIGHT_DECAYS)
    assert honest.val_by_decay[max(DEFAULT_WEIGHT_DECAYS)] == 0.0
    assert honest.val_acc == max(honest.val_by_decay.values()) > 0.9

    # Relabel the validation nodes as the majority class: now only the strongest decay fits.
    relabelled = labels.copy()
    relabelled[splits["valid"]] = 0
    misled = linear_probe(embeddings, relabelled, splits)
    assert misled.weight_decay == max(DEFAULT_WEIGHT_DECAYS)
    assert misled.val_acc == max(misled.val_by_decay.values()) == 1.0
    assert misled.test_acc < honest.test_acc


def test_unlabelled_nodes_are_never_read():
    embeddings, labels = blobs(500, 12, 3, separation=0.5, seed=4)
    splits = stratified_split(labels, FRACTIONS, 0)
    expected = linear_probe(embeddings, labels, splits)

    unlabelled = np.arange(500, 700)
    poisoned = np.concatenate([embeddings, np.full((200, 12), np.nan, np.float32)])
    with_unlabelled = np.concatenate([labels, np.full(200, -1)])
    padded_splits = {name: np.sort(np.concatenate([ids, unlabelled[i::3]]))
                     for i, (name, ids) in enumerate(splits.items())}
    assert linear_probe(poisoned, with_unlabelled, padded_splits) == expected


def test_grid_of_one_decay_reports_that_decay():
    embeddings, labels = blobs(300, 8, 3, separation=1.0)
    result = linear_probe(embeddings, labels, stratified_split(labels, FRACTIONS, 0),
                          weight_decays=[0.5])
    assert result.weight_decay == 0.5 and list(result.val_by_decay) == [0.5]


def test_multilabel_uses_micro_f1():
    rng = np.random.default_rng(5)
    labels = (rng.random((500, 5)) < 0.4).astype(np.int64)
    embeddings = (labels * 4.0 + rng.normal(size=(500, 5))).astype(np.float32)
    labels[:50] = -1  # unlabelled rows
    embeddings[:50] = np.nan
    ids = np.arange(500)
    splits = {"train": ids[:250], "valid": ids[250:350], "test": ids[350:]}
    result = linear_probe(embeddings, labels, splits)
    assert result.metric == "micro_f1"
    assert result.test_acc > 0.95

    noise = rng.normal(size=(500, 5)).astype(np.float32)
    chance = linear_probe(noise, labels, splits)
    assert chance.test_acc < 0.75


def test_random_split_probe_summarises_one_probe_per_seeded_split():
    embeddings, labels = blobs(300, 8, 3, separation=0.6, seed=6)
    grid = (0.01, 1.0)
    summary = random_split_probe(embeddings, labels, num_splits=3, fractions=FRACTIONS, seed=10,
                                 weight_decays=grid)
    assert len(summary.results) == 3
    for i, result in enumerate(summary.results):
        assert result == linear_probe(embeddings, labels, stratified_split(labels, FRACTIONS,
                                                                           10 + i),
                                      weight_decays=grid)
    tests = [r.test_acc for r in summary.results]
    assert summary.test_mean == pytest.approx(np.mean(tests))
    assert summary.test_std == pytest.approx(np.std(tests))
    assert len(set(tests)) > 1  # different splits really were drawn
    assert str(summary).startswith(f"test accuracy {100 * np.mean(tests):.2f} ± ")


def test_summarize_formats_mean_and_std():
    results = [ProbeResult(test_acc=t, val_acc=0.5, train_acc=1.0, weight_decay=1.0,
                           val_by_decay={1.0: 0.5}, metric="accuracy") for t in (0.8, 0.9)]
    summary = summarize(results)
    assert (summary.test_mean, summary.test_std) == pytest.approx((0.85, 0.05))
    assert str(summary) == "test accuracy 85.00 ± 5.00 (valid 50.00 ± 0.00, 2 splits)"
    with pytest.raises(ValueError):
        summarize([])


@pytest.mark.parametrize("change, message", [
    (lambda e, y, s: (e[:, 0], y, s), "embeddings must be"),
    (lambda e, y, s: (e.astype(np.int64), y, s), "floating point"),
    (lambda e, y, s: (e, y[:-1], s), "labels must be"),
    (lambda e, y, s: (e, y.astype(np.float32), s), "labels must be integers"),
    (lambda e, y, s: (e, np.stack([y, 2 * y], 1), s), "must be 0 or 1"),
    (lambda e, y, s: (e, y, {"train": s["train"], "test": s["test"]}), "lack"),
    (lambda e, y, s: (e, y, {**s, "test": np.array([0, 10_000])}), "outside"),
    (lambda e, y, s: (e, y, {**s, "valid": s["valid"].reshape(-1, 1)}), "1-D integer"),
    (lambda e, y, s: (e, y, {**s, "valid": np.array([], np.int64)}), "no labelled nodes"),
    (lambda e, y, s: (e, np.where(np.isin(np.arange(len(y)), s["train"]), -1, y), s),
     "no labelled"),
])
def test_bad_inputs_raise_value_error(change, message):
    embeddings, labels = blobs(100, 4, 2, separation=1.0)
    splits = stratified_split(labels, FRACTIONS, 0)
    with pytest.raises(ValueError, match=message):
        linear_probe(*change(embeddings, labels, splits))


def test_unit_rows_ignore_each_row_s_length_and_standardising_each_column_s_scale():
    embeddings, labels = blobs(400, 12, 3, separation=0.6)
    splits = stratified_split(labels, FRACTIONS, 2)
    lengths = np.random.default_rng(5).uniform(0.1, 10.0, size=(400, 1)).astype(np.float32)
    scales = np.random.default_rng(6).uniform(0.1, 10.0, size=(1, 12)).astype(np.float32)
    unit, unit_scaled = (linear_probe(x, labels, splits, scaling="unit-rows")
                         for x in (embeddings, embeddings * lengths))
    standard, standard_scaled = (linear_probe(x, labels, splits)
                                 for x in (embeddings, embeddings * scales))
    assert unit.test_acc == pytest.approx(unit_scaled.test_acc, abs=1e-3)
    assert standard.test_acc == pytest.approx(standard_scaled.test_acc, abs=1e-3)
    # Scaled rows do change what standardising sees: the two scalings are different maps.
    assert linear_probe(embeddings * lengths, labels, splits).val_by_decay != unit.val_by_decay


def test_unit_rows_keep_rare_sparse_columns_from_dominating():
    """Bag-of-words rows: a column set in one train row gets a tiny train std, which
    standardising turns into a huge weight for the test rows that also have it."""
    rng = np.random.default_rng(0)
    num_nodes, topic_words, rare_words = 1200, 40, 400
    labels = rng.integers(0, 2, num_nodes)
    topic = rng.random((num_nodes, topic_words)) < 0.05
    topic[:, : topic_words // 2] &= (labels == 0)[:, None]
    topic[:, topic_words // 2:] &= (labels == 1)[:, None]
    rare = rng.random((num_nodes, rare_words)) < 0.02
    features = np.concatenate([topic, rare], axis=1).astype(np.float32)
    splits = stratified_split(labels, (0.03, 0.2, 0.77), 0)
    unit = linear_probe(features, labels, splits, scaling="unit-rows")
    standard = linear_probe(features, labels, splits)
    assert unit.test_acc > standard.test_acc


@pytest.mark.parametrize("kwargs", [{"weight_decays": []}, {"weight_decays": [-1.0]},
                                    {"weight_decays": [float("nan")]}, {"max_iter": 0},
                                    {"scaling": "whiten"}])
def test_bad_options_raise_value_error(kwargs):
    embeddings, labels = blobs(100, 4, 2, separation=1.0)
    with pytest.raises(ValueError):
        linear_probe(embeddings, labels, stratified_split(labels, FRACTIONS, 0), **kwargs)


def test_non_finite_embeddings_of_split_nodes_raise_value_error():
    embeddings, labels = blobs(100, 4, 2, separation=1.0)
    splits = stratified_split(labels, FRACTIONS, 0)
    embeddings[splits["test"][0], 1] = np.inf
    with pytest.raises(ValueError, match="NaN or infinity"):
        linear_probe(embeddings, labels, splits)
