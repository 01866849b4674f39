"""``prepare synthetic --feature-kind binary``: sparse 0/1 bag-of-words-like features."""
from __future__ import annotations

import argparse

import numpy as np
import pytest

from bgrl_dgl.cli import main
from bgrl_dgl.errors import InputError
from bgrl_dgl.sources import synthetic
from bgrl_dgl.store.reader import GraphStore

NUM_NODES, FEAT_DIM, NUM_CLASSES, DENSITY = 2000, 400, 4, 0.02
GRAPH = ["--num-nodes", NUM_NODES, "--avg-degree", 6, "--feat-dim", FEAT_DIM,
         "--num-classes", NUM_CLASSES, "--feature-kind", "binary",
         "--feature-density", DENSITY]


def build(root, name: str, *flags: object) -> GraphStore:
    out = root / name
    assert main(["prepare", "synthetic", "--out", str(out), *map(str, [*GRAPH, *flags])]) == 0
    return GraphStore.open(out, check="full")


@pytest.fixture(scope="module")
def stores(tmp_path_factory) -> dict[str, GraphStore]:
    root = tmp_path_factory.mktemp("binary")
    return {"a": build(root, "a", "--seed", 3),
            "again": build(root, "again", "--seed", 3, "--memory-budget", "64KB"),
            "half": build(root, "half", "--seed", 3, "--feature-dtype", "float16")}


def test_binary_rows_have_the_asked_density(stores) -> None:
    features = np.asarray(stores["a"].features)
    assert set(np.unique(features)) == {0.0, 1.0}
    assert features.mean() == pytest.approx(DENSITY, rel=0.05)
    ones_per_row = features.sum(1)
    assert ones_per_row.min() >= 0 and abs(np.median(ones_per_row) - DENSITY * FEAT_DIM) <= 2


def test_binary_features_repeat_per_seed_and_keep_their_dtype(stores) -> None:
    a, again, half = (np.asarray(stores[k].features) for k in ("a", "again", "half"))
    assert np.array_equal(a, again)
    assert half.dtype == np.float16 and np.array_equal(half.astype(np.float32), a)


def test_binary_features_carry_the_class_but_not_all_of_it(stores) -> None:
    store = stores["a"]
    features = np.asarray(store.features, dtype=np.float64)
    labels = np.asarray(store.labels)
    train, test = store.split("train"), store.split("test")
    means = np.stack([features[train][labels[train] == c].mean(0) for c in range(NUM_CLASSES)])
    accuracy = float(np.mean((features[test] @ means.T).argmax(1) == labels[test]))
    assert 1 / NUM_CLASSES + 0.1 < accuracy < 0.99


def test_bad_density_names_its_flag() -> None:
    values = dict(num_nodes=10, avg_degree=2.0, feat_dim=4, num_classes=2, homophily=0.8,
                  feature_noise=1.5, degree_exponent=2.5, label_fraction=1.0,
                  sources="uniform", seed=0, feature_kind="binary")
    for density in (0.0, 1.5, float("nan")):
        with pytest.raises(InputError, match="must be greater than 0") as err:
            synthetic.Options.from_args(argparse.Namespace(**values, feature_density=density))
        assert err.value.path == "--feature-density"
