"""Random stratified splits and the --split parser."""
from __future__ import annotations

import argparse

import numpy as np
import pytest

from bgrl_dgl.splits import parse_fractions, stratified_split


def test_parse_fractions_accepts_three_fractions_summing_to_one():
    assert parse_fractions("0.1/0.1/0.8") == (0.1, 0.1, 0.8)
    assert parse_fractions("1/0/0") == (1.0, 0.0, 0.0)
    assert parse_fractions("0.3333333/0.3333333/0.3333334") == pytest.approx((1 / 3,) * 3, abs=1e-6)


@pytest.mark.parametrize("text", ["0.5/0.5", "0.1/0.1/0.7/0.1", "a/b/c", "-0.1/0.3/0.8",
                                  "0.2/0.2/0.2", "nan/0.5/0.5", "inf/0/0", ""])
def test_parse_fractions_rejects(text):
    with pytest.raises(argparse.ArgumentTypeError):
        parse_fractions(text)


def labels_with_classes(sizes: list[int], num_unlabelled: int, seed: int = 1) -> np.ndarray:
    """Shuffled labels: class c appears sizes[c] times, plus ``num_unlabelled`` -1 entries."""
    labels = np.concatenate([np.full(n, c) for c, n in enumerate(sizes)]
                            + [np.full(num_unlabelled, -1)])
    return np.random.default_rng(seed).permutation(labels)


def test_split_is_stratified_disjoint_and_covers_labelled_nodes():
    labels = labels_with_classes([10, 20, 30, 7], num_unlabelled=5)
    splits = stratified_split(labels, (0.1, 0.1, 0.8), seed=0)
    assert list(splits) == ["train", "valid", "test"]
    for ids in splits.values():
        assert ids.dtype == np.int64
        assert np.all(np.diff(ids) > 0)  # sorted, no repeats
    # Per class: round(0.1 n), round(0.2 n) - round(0.1 n), the rest.
    expected = {"train": [1, 2, 3, 1], "valid": [1, 2, 3, 0], "test": [8, 16, 24, 6]}
    for name, ids in splits.items():
        assert np.bincount(labels[ids], minlength=4).tolist() == expected[name], name
    everything = np.concatenate(list(splits.values()))
    assert np.array_equal(np.sort(everything), np.flatnonzero(labels >= 0))


def test_split_depends_only_on_seed():
    labels = labels_with_classes([50, 50, 50], num_unlabelled=0)
    first = stratified_split(labels, (0.2, 0.3, 0.5), seed=7)
    again = stratified_split(labels.copy(), (0.2, 0.3, 0.5), seed=7)
    other = stratified_split(labels, (0.2, 0.3, 0.5), seed=8)
    for name in first:
        assert np.array_equal(first[name], again[name])
    assert not np.array_equal(first["train"], other["train"])
    # Shuffled within each class, not the first ids of it.
    class0 = np.flatnonzero(labels == 0)
    assert not np.array_equal(np.intersect1d(first["train"], class0), class0[:10])


def test_split_with_an_empty_part_and_no_labels():
    labels = labels_with_classes([4, 6], num_unlabelled=3)
    splits = stratified_split(labels, (1.0, 0.0, 0.0), seed=0)
    assert np.array_equal(splits["train"], np.flatnonzero(labels >= 0))
    assert splits["valid"].size == splits["test"].size == 0
    assert splits["valid"].dtype == np.int64
    unlabelled = stratified_split(np.full(5, -1), (0.1, 0.1, 0.8), seed=0)
    assert all(ids.size == 0 and ids.dtype == np.int64 for ids in unlabelled.values())
