"""``prepare synthetic``: determinism, planted structure, labels and splits, bad options;
and the memory watcher used by the prepare benchmark."""
from __future__ import annotations

import argparse
import hashlib
import importlib.util
import subprocess
import sys

import numpy as np
import pytest

from bgrl_dgl.cli import main
from bgrl_dgl.errors import InputError
from bgrl_dgl.sources import synthetic
from bgrl_dgl.store.reader import GraphStore

from helpers import REPO, assert_input_error

NUM_NODES, AVG_DEGREE, FEAT_DIM, NUM_CLASSES = 3000, 8, 16, 4
GRAPH = ["--num-nodes", NUM_NODES, "--avg-degree", AVG_DEGREE, "--feat-dim", FEAT_DIM,
         "--num-classes", NUM_CLASSES]
STORE_ARRAYS = ["indptr", "indices", "features", "labels", "split_train", "split_valid",
                "split_test"]
# SHA-256 of STORE_ARRAYS of the "ref" store, from the generator before --sources existed.
REF_DIGEST = "d28652b2c815bf56250fdce2c2f56cd94a039ea7e0f3943a19f2df605cca456e"


def options(**overrides) -> synthetic.Options:
    values = dict(num_nodes=NUM_NODES, avg_degree=AVG_DEGREE, feat_dim=FEAT_DIM,
                  num_classes=NUM_CLASSES, homophily=0.8, feature_noise=1.5,
                  degree_exponent=2.5, label_fraction=1.0, sources="uniform", seed=0)
    return synthetic.Options.from_args(argparse.Namespace(**{**values, **overrides}))


@pytest.fixture(scope="module")
def stores(tmp_path_factory) -> dict[str, GraphStore]:
    """Six builds (in this process: each takes a fraction of a second): the reference
    (seed 1), the same with a tiny memory budget, another seed with half the labels and
    float16 features, a graph of weaker homophily, and the reference with power-law sources,
    with the default and a tiny memory budget."""
    root = tmp_path_factory.mktemp("synthetic")
    builds = {
        "ref": [*GRAPH, "--seed", 1],
        "tiny_budget": [*GRAPH, "--seed", 1, "--memory-budget", "64KB"],
        "other": [*GRAPH, "--seed", 2, "--label-fraction", 0.5, "--feature-dtype", "float16",
                  "--split", "0.2/0.3/0.5"],
        "weak": [*GRAPH, "--seed", 1, "--homophily", 0.3],
        "powerlaw": [*GRAPH, "--seed", 1, "--sources", "powerlaw"],
        "powerlaw_tiny_budget": [*GRAPH, "--seed", 1, "--sources", "powerlaw",
                                 "--memory-budget", "64KB"],
    }
    for name, flags in builds.items():
        assert main(["prepare", "synthetic", "--out", str(root / name), *map(str, flags)]) == 0
    return {name: GraphStore.open(root / name, check="full") for name in builds}


def array(store: GraphStore, name: str) -> np.ndarray:
    return np.load(store.path / store.meta["arrays"][name]["file"])


def edge_labels(store: GraphStore) -> tuple[np.ndarray, np.ndarray]:
    """Class of the destination and of the source of every stored edge."""
    dst = np.repeat(np.arange(store.num_nodes), np.diff(store.indptr))
    return store.labels[dst], store.labels[np.asarray(store.indices)]


@pytest.mark.parametrize("ref, tiny", [("ref", "tiny_budget"),
                                       ("powerlaw", "powerlaw_tiny_budget")])
def test_same_seed_same_store_regardless_of_memory_budget(stores, ref, tiny):
    for name in STORE_ARRAYS:
        a, b = array(stores[ref], name), array(stores[tiny], name)
        assert a.dtype == b.dtype and a.tobytes() == b.tobytes(), name


def test_default_sources_give_the_same_store_as_before(stores):
    ref = stores["ref"]
    digest = hashlib.sha256()
    for name in STORE_ARRAYS:
        digest.update(array(ref, name).tobytes())
    assert digest.hexdigest() == REF_DIGEST
    assert ref.meta["source"]["params"]["sources"] == "uniform"
    assert stores["powerlaw"].meta["source"]["params"]["sources"] == "powerlaw"


def test_powerlaw_sources_give_another_graph_with_the_same_features(stores):
    ref, powerlaw = stores["ref"], stores["powerlaw"]
    assert not np.array_equal(ref.indptr, powerlaw.indptr)
    for name in STORE_ARRAYS[2:]:  # node arrays do not depend on the edges
        assert array(ref, name).tobytes() == array(powerlaw, name).tobytes(), name


def test_other_seed_other_graph(stores):
    ref, other = stores["ref"], stores["other"]
    assert ref.num_edges != other.num_edges or not np.array_equal(ref.indices, other.indices)
    both = (np.asarray(ref.labels) >= 0) & (np.asarray(other.labels) >= 0)
    assert not np.array_equal(ref.labels[both], other.labels[both])


@pytest.mark.parametrize("sources", synthetic.SOURCE_MODELS)
def test_edge_stream_repeats_and_ignores_thread_count(sources):
    opts = options(num_nodes=5000, avg_degree=500, sources=sources)  # 2.5M edges: 3 blocks
    layout = synthetic.ClassLayout.plant(opts)
    first = [np.concatenate(part) for part in zip(*synthetic.edge_chunks(opts, layout))]
    blocks = synthetic.num_blocks(opts.num_edges, synthetic.EDGE_BLOCK)
    single = synthetic.ordered_map(lambda b: synthetic.edge_block(opts, layout, b), blocks,
                                   workers=1)
    again = [np.concatenate(part) for part in zip(*single)]
    assert blocks == 3 and len(first[0]) == opts.num_edges
    for a, b in zip(first, again):
        assert np.array_equal(a, b)


def test_topology_flags_and_counts(stores):
    ref = stores["ref"]
    flags = ref.meta["flags"]
    assert flags == {"symmetrized": True, "self_loops": "removed", "deduplicated": True}
    assert ref.num_nodes == NUM_NODES and ref.feat_dim == FEAT_DIM
    assert ref.num_classes == NUM_CLASSES
    # Symmetrized input edges, less duplicates (frequent between hubs) and self-loops.
    assert NUM_NODES * AVG_DEGREE < ref.num_edges < 2 * NUM_NODES * AVG_DEGREE
    assert ref.meta["source"]["name"] == "synthetic"


@pytest.mark.parametrize("name, homophily", [("ref", 0.8), ("weak", 0.3), ("powerlaw", 0.8)])
def test_fraction_of_same_class_edges_follows_homophily(stores, name, homophily):
    dst_class, src_class = edge_labels(stores[name])
    assert abs(np.mean(dst_class == src_class) - homophily) < 0.05


@pytest.mark.parametrize("sources", synthetic.SOURCE_MODELS)
def test_input_edges_follow_homophily_and_classes_are_balanced(sources):
    opts = options(num_nodes=20000, avg_degree=20, homophily=0.65, sources=sources)
    layout = synthetic.ClassLayout.plant(opts)
    labels = layout.node_class
    src, dst = synthetic.edge_block(opts, layout, 0)
    assert abs(np.mean(labels[src] == labels[dst]) - 0.65) < 0.01
    assert np.bincount(labels, minlength=opts.num_classes).ptp() <= 1


def test_every_node_is_the_source_of_about_avg_degree_edges():
    opts = options(num_nodes=1000, avg_degree=2.5)
    src, _ = synthetic.edge_block(opts, synthetic.ClassLayout.plant(opts), 0)
    out_degrees = np.bincount(src, minlength=opts.num_nodes)
    assert len(src) == 2500 and set(np.unique(out_degrees)) == {2, 3}


def top_share(counts: np.ndarray, fraction: float = 0.1) -> float:
    """Fraction of ``counts.sum()`` held by the largest ``fraction`` of the entries."""
    return np.sort(counts)[::-1][:round(fraction * len(counts))].sum() / counts.sum()


def test_powerlaw_sources_have_heavy_tailed_out_degrees():
    opts = options(num_nodes=20000, avg_degree=20)
    layout = synthetic.ClassLayout.plant(opts)
    uniform_src, _ = synthetic.edge_block(opts, layout, 0)
    powerlaw = options(num_nodes=20000, avg_degree=20, sources="powerlaw")
    src, dst = synthetic.edge_block(powerlaw, layout, 0)
    assert len(src) == len(uniform_src) == 400_000
    out_degrees = np.bincount(src, minlength=opts.num_nodes)
    assert set(np.unique(np.bincount(uniform_src, minlength=opts.num_nodes))) == {20}
    # Weights (r + 1) ** -(2 / 3): the top 10% hold a little under 0.1 ** (1 / 3) = 46% of
    # them (43% at this size); uniform sources give every node the same share.
    assert 0.4 < top_share(out_degrees) < 0.55
    assert out_degrees.max() > 50 * out_degrees.mean()
    # The same weights at both ends: out-degrees follow in-degrees.
    in_degrees = np.bincount(dst, minlength=opts.num_nodes)
    assert np.corrcoef(out_degrees, in_degrees)[0, 1] > 0.9
    assert 0.4 < top_share(in_degrees) < 0.55


def test_powerlaw_sources_concentrate_the_stored_edges_on_hubs(stores):
    uniform, powerlaw = stores["ref"].in_degrees(), stores["powerlaw"].in_degrees()
    assert top_share(powerlaw) > top_share(uniform) + 0.1


def test_degrees_are_heavy_tailed(stores):
    degrees = stores["ref"].in_degrees()
    assert degrees.max() > 8 * degrees.mean()  # a Poisson graph: about 2x
    # Most nodes sit below the mean: the mass is in the tail.
    assert np.median(degrees) < degrees.mean()
    # Every node is the source of AVG_DEGREE input edges (some lost as duplicates).
    assert degrees.min() >= AVG_DEGREE // 2


def nearest_mean_accuracy(features: np.ndarray, labels: np.ndarray, train: np.ndarray,
                          test: np.ndarray, num_classes: int) -> float:
    means = np.stack([features[train][labels[train] == c].mean(0) for c in range(num_classes)])
    distances = ((features[test][:, None, :] - means[None]) ** 2).sum(-1)
    return float(np.mean(distances.argmin(1) == labels[test]))


def test_features_are_class_correlated_and_graph_smoothing_helps(stores):
    ref = stores["ref"]
    features = np.asarray(ref.features, dtype=np.float64)
    labels = np.asarray(ref.labels)
    train, test = ref.split("train"), ref.split("test")
    raw = nearest_mean_accuracy(features, labels, train, test, NUM_CLASSES)
    dst = np.repeat(np.arange(ref.num_nodes), np.diff(ref.indptr))
    neighbour_sum = np.zeros_like(features)
    np.add.at(neighbour_sum, dst, features[np.asarray(ref.indices)])
    smoothed = (features + neighbour_sum) / (1 + ref.in_degrees())[:, None]
    smooth = nearest_mean_accuracy(smoothed, labels, train, test, NUM_CLASSES)
    chance = 1 / NUM_CLASSES
    assert chance + 0.1 < raw < 0.8
    assert smooth > raw + 0.2


def test_label_fraction_splits_and_feature_dtype(stores):
    other = stores["other"]
    labels = np.asarray(other.labels)
    labeled = np.flatnonzero(labels >= 0)
    assert len(labeled) == NUM_NODES // 2
    assert set(np.unique(labels)) == {-1, *range(NUM_CLASSES)}
    splits = {name: other.split(name) for name in ("train", "valid", "test")}
    together = np.concatenate(list(splits.values()))
    assert np.array_equal(np.sort(together), labeled)  # disjoint, covering the labeled nodes
    for name, fraction in zip(splits, (0.2, 0.3, 0.5)):
        assert abs(len(splits[name]) - fraction * len(labeled)) <= NUM_CLASSES
    assert other.feat_dtype == np.float16 and other.features.dtype == np.float16
    assert np.isfinite(np.asarray(other.features, dtype=np.float32)).all()


def test_full_labels_by_default(stores):
    ref = stores["ref"]
    assert (np.asarray(ref.labels) >= 0).all()
    assert ref.feat_dtype == np.float32
    train = ref.split("train")
    assert abs(len(train) - 0.1 * NUM_NODES) <= NUM_CLASSES


@pytest.mark.parametrize("flag, value", [
    ("num_nodes", 0), ("num_classes", 0), ("num_classes", NUM_NODES + 1), ("feat_dim", 0),
    ("avg_degree", 0.0), ("avg_degree", 1e-6), ("homophily", 1.5), ("feature_noise", -1.0),
    ("degree_exponent", 2.0), ("label_fraction", 0.0), ("sources", "zipf"), ("seed", -1),
])
def test_bad_option_names_its_flag(flag, value):
    with pytest.raises(InputError, match="must|gives no edges") as err:
        options(**{flag: value})
    assert err.value.path == "--" + flag.replace("_", "-")


def graph_flags(**changes) -> list[str]:
    flags = {**dict(zip(GRAPH[::2], GRAPH[1::2])), **changes}
    return [str(x) for pair in flags.items() for x in pair]


def test_bad_option_on_the_command_line(tmp_path, cli):
    out = tmp_path / "store"
    result = cli("prepare", "synthetic", "--out", out, *graph_flags(**{"--num-nodes": 0}),
                 timeout=60)
    assert_input_error(result, "--num-nodes", "must be at least 1")
    assert list(tmp_path.iterdir()) == []


def test_bad_sources_is_a_usage_error(tmp_path, capsys):
    out = tmp_path / "store"
    with pytest.raises(SystemExit) as caught:
        main(["prepare", "synthetic", "--out", str(out), *graph_flags(**{"--sources": "zipf"})])
    assert caught.value.code == 2
    last = capsys.readouterr().err.splitlines()[-1]
    assert "error: argument --sources: invalid choice: 'zipf'" in last
    assert "uniform" in last and "powerlaw" in last
    assert list(tmp_path.iterdir()) == []


def test_bad_option_leaves_nothing_behind(tmp_path, capsys):
    out = tmp_path / "store"
    code = main(["prepare", "synthetic", "--out", str(out), *graph_flags(**{"--num-classes": 0})])
    assert code == 2
    assert capsys.readouterr().err == ("error: --num-classes: must be between 1 and "
                                       "--num-nodes\n")
    assert list(tmp_path.iterdir()) == []


def load_memwatch():
    spec = importlib.util.spec_from_file_location("memwatch", REPO / "scripts" / "memwatch.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("memwatch", module)  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def test_memwatch_sees_anonymous_memory_of_a_child_process():
    memwatch = load_memwatch()
    # The grandchild allocates (and touches) 200 MB, holds it briefly, and exits with 3.
    grandchild = "b = b'x' * (200 << 20); import time; time.sleep(0.4)"
    child = (f"import subprocess, sys; "
             f"sys.exit(subprocess.run([sys.executable, '-c', {grandchild!r}]).returncode + 3)")
    result = memwatch.measure_command([sys.executable, "-c", child], interval=0.02,
                                      stdin=subprocess.DEVNULL)
    assert result.returncode == 3
    assert result.peak_anon_bytes >= 150 << 20
    assert result.peak_anon_gib < 1.0
    assert 0.4 <= result.wall_s < 20
