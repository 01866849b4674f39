"""The npz and planetoid sources, on the real Cora files, and the restricted unpickler."""
from __future__ import annotations

import collections
import os
import pickle
import subprocess
import zipfile
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp

from bgrl_dgl.cli import main
from bgrl_dgl.embeddings.evaluate import evaluate_raw_features
from bgrl_dgl.errors import InputError
from bgrl_dgl.sources.npz import read_npz
from bgrl_dgl.sources.planetoid import planetoid_files, read_planetoid
from bgrl_dgl.sources.safe_pickle import load_restricted
from bgrl_dgl.store.reader import GraphStore

from helpers import assert_input_error

CORA_NODES = 2708
CORA_UNDIRECTED_EDGES = 10556  # both directions, no self-loops
PLANETOID_PARTS = ("x", "tx", "allx", "y", "ty", "ally", "graph", "test.index")


@pytest.fixture(scope="module")
def stores(cora_dir, tmp_path_factory) -> dict[str, GraphStore]:
    out = tmp_path_factory.mktemp("stores")
    assert main(["prepare", "npz", "--input", str(cora_dir / "cora.npz"),
                 "--out", str(out / "npz"), "--seed", "3"]) == 0
    assert main(["prepare", "planetoid", "--root", str(cora_dir), "--name", "cora",
                 "--out", str(out / "planetoid")]) == 0
    return {name: GraphStore.open(out / name) for name in ("npz", "planetoid")}


def edge_set(store: GraphStore) -> set[tuple[int, int]]:
    """(src, dst) pairs of the store's CSC topology."""
    indptr = np.asarray(store.indptr, dtype=np.int64)
    dst = np.repeat(np.arange(store.num_nodes), np.diff(indptr))
    return set(zip(np.asarray(store.indices).tolist(), dst.tolist()))


def refined_colours(store: GraphStore, palette: dict) -> np.ndarray:
    """Per-node colours: the feature row, refined by the neighbours' colours (WL-style).

    ``palette`` is shared between graphs, so equal colours mean equal (feature,
    neighbourhood) structure. Labels are left out: the two Cora files number classes
    differently.
    """
    def paint(keys):
        return np.array([palette.setdefault(key, len(palette)) for key in keys])

    features = np.asarray(store.features)
    colours = paint(row.tobytes() for row in features)
    indptr, indices = np.asarray(store.indptr), np.asarray(store.indices)
    for _ in range(3):
        colours = paint((colours[v], tuple(sorted(colours[indices[indptr[v]:indptr[v + 1]]])))
                        for v in range(store.num_nodes))
    return colours


def test_both_cora_formats_give_the_same_graph(stores):
    npz, planetoid = stores["npz"], stores["planetoid"]
    for store in (npz, planetoid):
        assert store.num_nodes == CORA_NODES
        assert store.num_edges == CORA_UNDIRECTED_EDGES
        assert store.feat_dim == 1433 and store.num_classes == 7
        assert store.symmetrized
    palette: dict = {}
    colours_p, colours_n = refined_colours(planetoid, palette), refined_colours(npz, palette)
    order_p, order_n = np.argsort(colours_p, kind="stable"), np.argsort(colours_n, kind="stable")
    assert np.array_equal(colours_p[order_p], colours_n[order_n])
    to_npz = np.empty(CORA_NODES, np.int64)
    to_npz[order_p] = order_n  # planetoid node -> npz node (ties: interchangeable twins)
    assert np.array_equal(np.asarray(planetoid.features), np.asarray(npz.features)[to_npz])
    assert {(int(to_npz[u]), int(to_npz[v])) for u, v in edge_set(planetoid)} == edge_set(npz)
    # The class numbering differs, but consistently: a bijection of the 7 classes.
    pairs = set(zip(np.asarray(planetoid.labels).tolist(),
                    np.asarray(npz.labels)[to_npz].tolist()))
    assert len(pairs) == 7 and len({a for a, _ in pairs}) == len({b for _, b in pairs}) == 7


def test_planetoid_public_split_and_node_order(stores, cora_dir):
    store = stores["planetoid"]
    labels = np.asarray(store.labels)
    train, valid, test = (store.split(name) for name in ("train", "valid", "test"))
    assert (train.size, valid.size, test.size) == (140, 500, 1000)
    assert np.array_equal(train, np.arange(140))
    assert np.array_equal(valid, np.arange(140, 640))
    test_index = np.loadtxt(cora_dir / "ind.cora.test.index", dtype=np.int64)
    assert np.array_equal(test, np.sort(test_index))
    assert np.bincount(labels[train], minlength=7).tolist() == [20] * 7
    # Row j of tx / ty is node test_index[j].
    tx = load_restricted(cora_dir / "ind.cora.tx").toarray()
    ty = load_restricted(cora_dir / "ind.cora.ty")
    assert np.array_equal(np.asarray(store.features)[test_index], tx)
    assert np.array_equal(labels[test_index], ty.argmax(axis=1))


def test_npz_random_split_is_stratified_10_10_80(stores):
    store = stores["npz"]
    labels = np.asarray(store.labels)
    splits = {name: store.split(name) for name in ("train", "valid", "test")}
    assert sum(ids.size for ids in splits.values()) == CORA_NODES
    assert np.unique(np.concatenate(list(splits.values()))).size == CORA_NODES
    class_sizes = np.bincount(labels)
    for name, fraction in (("train", 0.1), ("valid", 0.1), ("test", 0.8)):
        per_class = np.bincount(labels[splits[name]], minlength=7)
        assert np.all(np.abs(per_class - fraction * class_sizes) <= 1), (name, per_class)
    assert store.meta["source"]["params"]["seed"] == 3


# --- restricted unpickler -------------------------------------------------------------------

class RunsShellCommand:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_restricted_unpickler_refuses_code_and_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pkl"
    # Hidden inside data of the expected shape: a dict of neighbour lists.
    path.write_bytes(pickle.dumps({0: [1, RunsShellCommand(marker)]}, protocol=2))
    with pytest.raises(InputError) as caught:
        load_restricted(path)
    assert caught.value.path == str(path)
    assert caught.value.problem == (f"refusing to unpickle {os.system.__module__}.system: "
                                    "not an allowed type")
    assert not marker.exists()
    path.write_bytes(pickle.dumps((eval, ("1 + 1",)), protocol=2))
    with pytest.raises(InputError, match="refusing to unpickle .*eval"):
        load_restricted(path)


def test_restricted_unpickler_loads_arrays_matrices_and_neighbour_lists(tmp_path):
    graph = collections.defaultdict(list, {0: [1, 2], 2: [0]})
    value = {"dense": np.arange(6, dtype=np.int32).reshape(2, 3),
             "csr": sp.random(4, 5, density=0.5, format="csr", random_state=0),
             "lil": sp.eye(3, format="lil"), "graph": graph}
    path = tmp_path / "ok.pkl"
    path.write_bytes(pickle.dumps(value, protocol=2))
    loaded = load_restricted(path)
    assert np.array_equal(loaded["dense"], value["dense"])
    assert (loaded["csr"] != value["csr"]).nnz == 0 and loaded["csr"].format == "csr"
    assert loaded["lil"].format == "lil" and (loaded["lil"] != value["lil"]).nnz == 0
    assert loaded["graph"] == graph and loaded["graph"].default_factory is list
    path.write_bytes(b"not a pickle")
    with pytest.raises(InputError, match="not a valid pickle"):
        load_restricted(path)


# --- planetoid format details ----------------------------------------------------------------

def write_planetoid(root: Path, name: str, parts: dict[str, object]) -> None:
    for part, value in parts.items():
        path = root / f"ind.{name}.{part}"
        if part == "test.index":
            path.write_text("".join(f"{i}\n" for i in value))
        else:
            path.write_bytes(pickle.dumps(value, protocol=2))


def onehot(classes: np.ndarray, num_classes: int) -> np.ndarray:
    """[R] class ids (-1: none) -> [R, C] int32 one-hot rows (all zero for -1)."""
    rows = np.zeros((classes.size, num_classes), np.int32)
    rows[classes >= 0, classes[classes >= 0]] = 1
    return rows


def test_planetoid_test_index_gaps_keep_ids_aligned(tmp_path):
    """CiteSeer-style: test ids not listed in test.index become unlabelled zero rows."""
    rng = np.random.default_rng(0)
    num_known, num_train = 520, 12
    test_index = np.array([523, 520, 521, 525])  # 522 and 524 are missing
    allx = sp.random(num_known, 6, density=0.3, format="csr", random_state=1, dtype=np.float32)
    tx = sp.csr_matrix(np.arange(1, 25, dtype=np.float32).reshape(4, 6))
    all_classes = rng.integers(0, 3, num_known)
    all_classes[300] = -1
    ty_classes = np.array([2, 0, 1, 1])
    graph = collections.defaultdict(list, {v: [(v + 1) % 526] for v in range(526)})
    write_planetoid(tmp_path, "toy", {
        "x": allx[:num_train], "y": onehot(all_classes[:num_train], 3), "allx": allx,
        "ally": onehot(all_classes, 3), "tx": tx, "ty": onehot(ty_classes, 3),
        "graph": graph, "test.index": test_index})
    loaded = read_planetoid(planetoid_files(tmp_path, "toy"))
    assert loaded.num_nodes == 526 and loaded.num_classes == 3
    features = loaded.features.toarray()
    assert np.array_equal(features[:num_known], allx.toarray())
    assert np.array_equal(features[test_index], tx.toarray())
    assert not features[[522, 524]].any()
    assert np.array_equal(loaded.labels[test_index], ty_classes)
    assert loaded.labels[[522, 524, 300]].tolist() == [-1, -1, -1]
    assert np.array_equal(loaded.splits["train"], np.arange(num_train))
    assert np.array_equal(loaded.splits["valid"], np.setdiff1d(np.arange(12, 512), [300]))
    assert np.array_equal(loaded.splits["test"], np.sort(test_index))


def linked_cora(cora_dir: Path, root: Path, skip: tuple[str, ...] = ()) -> Path:
    """``root`` with links to the Cora Planetoid files except ``skip``."""
    root.mkdir()
    for part in PLANETOID_PARTS:
        if part not in skip:
            (root / f"ind.cora.{part}").symlink_to(cora_dir / f"ind.cora.{part}")
    return root


def test_planetoid_bad_inputs(cora_dir, tmp_path):
    root = linked_cora(cora_dir, tmp_path / "no_ty", skip=("ty",))
    with pytest.raises(InputError, match="file not found") as caught:
        planetoid_files(root, "cora")
    assert caught.value.path == str(root / "ind.cora.ty")
    root = linked_cora(cora_dir, tmp_path / "bad_index", skip=("test.index",))
    (root / "ind.cora.test.index").write_text("1708\nseventeen\n")
    with pytest.raises(InputError, match="one integer node id per line"):
        read_planetoid(planetoid_files(root, "cora"))
    (root / "ind.cora.test.index").write_text("1708\n")
    with pytest.raises(InputError, match="has 1 node ids, expected 1000"):
        read_planetoid(planetoid_files(root, "cora"))


# --- npz format errors -----------------------------------------------------------------------

def cora_arrays(cora_dir: Path) -> dict[str, np.ndarray]:
    with np.load(cora_dir / "cora.npz") as archive:
        return {key: archive[key] for key in archive.files}


@pytest.mark.parametrize("change, problem", [
    (lambda a: a.pop("labels"), "missing keys: labels"),
    (lambda a: a.pop("adj_indptr"), "missing keys: adj_indptr"),
    (lambda a: a.update(labels=a["labels"][:-1]), "labels has 2707 entries, expected 2708"),
    (lambda a: a.update(labels=a["labels"].astype(np.float32)), "labels must be a 1-D integer"),
    (lambda a: a.update(adj_shape=np.array([2708, 2709])), "adjacency is not square"),
    (lambda a: a.update(attr_indices=a["attr_indices"] + 5000), "attr_* is not a valid CSR"),
    (lambda a: a.update(adj_indptr=a["adj_indptr"][:-1]), "adj_* is not a valid CSR"),
])
def test_npz_inconsistent_arrays(cora_dir, tmp_path, change, problem):
    arrays = cora_arrays(cora_dir)
    change(arrays)
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(InputError) as caught:
        read_npz(path)
    assert caught.value.path == str(path)
    assert problem in caught.value.problem


def test_npz_unreadable_files(cora_dir, tmp_path):
    (tmp_path / "text.npz").write_bytes(b"hello")
    np.save(tmp_path / "array.npy", np.zeros(3))
    (tmp_path / "array.npy").rename(tmp_path / "array.npz")
    data = bytearray((cora_dir / "cora.npz").read_bytes())
    with zipfile.ZipFile(cora_dir / "cora.npz") as archive:
        member = archive.getinfo("attr_indices.npy")
    start = member.header_offset + 300  # past the zip and .npy headers, inside the data
    data[start:start + 64] = bytes(64)
    (tmp_path / "crc.npz").write_bytes(bytes(data))
    problems = {"text.npz": "not a readable .npz archive", "array.npz": "not an .npz archive",
                "crc.npz": "cannot read attr_indices"}
    for name, problem in problems.items():
        with pytest.raises(InputError, match=problem) as caught:
            read_npz(tmp_path / name)
        assert caught.value.path == str(tmp_path / name)
    with pytest.raises(InputError, match="file not found"):
        read_npz(tmp_path / "absent.npz")


# --- end to end through the command line -------------------------------------------------------

def assert_no_output(out: Path) -> None:
    assert not out.exists()
    assert not list(out.parent.glob(".tmp-*@" + out.name))


def test_prepare_truncated_npz(capsys, cora_dir, tmp_path):
    path = tmp_path / "cora.npz"
    data = (cora_dir / "cora.npz").read_bytes()
    path.write_bytes(data[:len(data) // 2])
    out = tmp_path / "out"
    args = ["prepare", "npz", "--input", str(path), "--out", str(out)]
    code = main(args)
    result = subprocess.CompletedProcess(args, code, *capsys.readouterr())
    assert_input_error(result, str(path), "not a readable .npz archive")
    assert_no_output(out)


def test_cli_planetoid_refuses_malicious_graph(cli, cora_dir, tmp_path):
    root = linked_cora(cora_dir, tmp_path / "cora", skip=("graph",))
    marker = tmp_path / "pwned"
    (root / "ind.cora.graph").write_bytes(pickle.dumps(RunsShellCommand(marker), protocol=2))
    out = tmp_path / "out"
    result = cli("prepare", "planetoid", "--root", root, "--name", "cora", "--out", out)
    assert_input_error(result, "ind.cora.graph", "refusing to unpickle")
    assert not marker.exists()
    assert_no_output(out)


def test_raw_features_of_the_public_split_score_as_published(stores):
    """Logistic regression on Cora's raw bag-of-words rows scores about 60 on the public
    split; standardised columns lose ~7 points to rare words (see embeddings.probe)."""
    record = evaluate_raw_features(stores["planetoid"].path)
    assert 0.58 <= record["test_acc_mean"] <= 0.63
