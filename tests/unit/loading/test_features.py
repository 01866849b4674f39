"""The shared host-memory cache of hot feature rows (``bgrl_dgl.loading.feature_cache``) and
its use in sampling and training."""
from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from bgrl_dgl.cli import main
from bgrl_dgl.config import section_from_dict
from bgrl_dgl.errors import InputError
from bgrl_dgl.loading import feature_cache as features
from bgrl_dgl.loading.feature_cache import (
    FeatureCache,
    cache_directory,
    count_sampled_inputs,
    default_cache_root,
    hot_nodes,
)
from bgrl_dgl.loading.features import FeatureSource, read_rows
from bgrl_dgl.loading.loader import SamplingConfig
from bgrl_dgl.loading.sampler import NeighborBatchSampler
from bgrl_dgl.store.reader import GraphStore

from helpers import REPO, assert_input_error, prepare_synthetic, write_test_store

NUM_NODES, FEAT_DIM = 300, 8
ROW_BYTES = FEAT_DIM * 4  # float32 rows


def in_degree_of(v: int) -> int:
    """Node v gets (7 v) mod 23 in-neighbours: 0 .. 22, spread over the ids."""
    return 7 * v % 23


def write_store(out: Path, feature_dtype: str) -> GraphStore:
    rng = np.random.default_rng(0)
    src, dst = [], []
    for v in range(NUM_NODES):
        others = np.delete(np.arange(NUM_NODES), v)
        sources = rng.choice(others, size=in_degree_of(v), replace=False)
        src.append(sources)
        dst.append(np.full(len(sources), v))
    src, dst = np.concatenate(src).astype(np.int64), np.concatenate(dst).astype(np.int64)
    features = rng.normal(size=(NUM_NODES, FEAT_DIM)).astype(np.float32)
    return write_test_store(out, NUM_NODES, src, dst, features, feature_dtype=feature_dtype)


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> GraphStore:
    return write_store(tmp_path_factory.mktemp("features") / "graph", "float32")


@pytest.fixture(scope="module")
def half_store(tmp_path_factory) -> GraphStore:
    return write_store(tmp_path_factory.mktemp("features") / "graph16", "float16")


def store_rows(store: GraphStore, ids: np.ndarray) -> np.ndarray:
    return np.asarray(store.features)[ids]


# ---- lookups -------------------------------------------------------------------------------
@pytest.mark.parametrize("which", ["store", "half_store"])
def test_gather_gives_the_store_rows_in_their_dtype_and_counts_hits(request, tmp_path,
                                                                    which) -> None:
    graph = request.getfixturevalue(which)
    row_bytes = FEAT_DIM * graph.feat_dtype.itemsize
    rng = np.random.default_rng(3)
    with FeatureCache.build(graph, 60 * row_bytes, root=tmp_path) as cache:
        assert cache.rows.dtype == graph.feat_dtype
        cached = np.flatnonzero(np.asarray(cache.slot_of) >= 0)
        for size in (1, 50, 1000):
            ids = rng.integers(0, NUM_NODES, size=size)  # repeats at 1000
            rows, hits = cache.gather(graph.features, ids)
            assert rows.dtype == graph.feat_dtype and rows.shape == (size, FEAT_DIM)
            assert np.array_equal(rows, store_rows(graph, ids))
            assert hits == np.isin(ids, cached).sum()
        assert 0 < hits < 1000
        rows, hits = cache.gather(graph.features, np.array([], dtype=np.int64))
        assert rows.shape == (0, FEAT_DIM) and hits == 0


def test_read_rows_keeps_the_requested_order(store) -> None:
    ids = np.array([299, 0, 17, 17, 5, 299])
    assert np.array_equal(read_rows(store.features, ids), store_rows(store, ids))


@pytest.mark.parametrize("budget, rows", [
    (ROW_BYTES, 1),
    (10 * ROW_BYTES + ROW_BYTES - 1, 10),
    (NUM_NODES * ROW_BYTES, NUM_NODES),
    (10 * NUM_NODES * ROW_BYTES, NUM_NODES),
])
def test_the_budget_holds_floor_budget_over_row_bytes_rows(store, tmp_path, budget, rows) -> None:
    with FeatureCache.build(store, budget, root=tmp_path) as cache:
        assert cache.num_rows == rows and cache.nbytes == rows * ROW_BYTES <= budget
        assert cache.slot_of.dtype == np.int32 and cache.slot_of.shape == (NUM_NODES,)
        slots = np.asarray(cache.slot_of)
        assert np.array_equal(np.sort(slots[slots >= 0]), np.arange(rows))


def test_a_budget_below_one_row_is_an_input_error(store, tmp_path) -> None:
    with pytest.raises(InputError, match=f"holds no feature row \\({ROW_BYTES} bytes each\\)"):
        FeatureCache.build(store, ROW_BYTES - 1, root=tmp_path)
    assert not list(tmp_path.iterdir())


# ---- policies ------------------------------------------------------------------------------
def test_degree_policy_caches_the_highest_in_degree_nodes(store, tmp_path) -> None:
    degrees = store.in_degrees()
    assert np.array_equal(degrees, [in_degree_of(v) for v in range(NUM_NODES)])
    with FeatureCache.build(store, 40 * ROW_BYTES, "degree", root=tmp_path) as cache:
        slots = np.asarray(cache.slot_of)
        cached = slots >= 0
        assert cached.sum() == 40
        assert degrees[cached].min() >= degrees[~cached].max()
        assert degrees[cached].min() > np.median(degrees)
        ids = np.flatnonzero(cached)
        assert np.array_equal(np.asarray(cache.rows)[slots[ids]], store_rows(store, ids))


def test_sampled_inputs_with_all_neighbours_are_the_seed_and_its_in_neighbours(store) -> None:
    node = 5
    assert in_degree_of(node) == 12
    counts = count_sampled_inputs(store.graph, [-1], np.array([node]), batch_size=4,
                                  num_batches=7, seed=0)
    expected = np.zeros(NUM_NODES, dtype=np.int64)
    expected[node] = 7
    expected[store.indices[store.indptr[node]:store.indptr[node + 1]]] = 7
    assert np.array_equal(counts, expected)


def test_sampled_policy_caches_the_nodes_sampled_most_often(store, monkeypatch) -> None:
    monkeypatch.setattr(features, "SAMPLED_BATCHES", 20)
    seeds = np.arange(0, 100, dtype=np.int64)
    counts = count_sampled_inputs(store.graph, [3, 3], seeds, 16, 20, seed=4)
    chosen = hot_nodes(store, 50, "sampled", fanouts=[3, 3], seed_nodes=seeds, batch_size=16,
                       seed=4)
    assert len(chosen) == 50 and np.all(np.diff(chosen) > 0)
    others = np.setdiff1d(np.arange(NUM_NODES), chosen)
    assert counts[chosen].min() >= counts[others].max()
    assert not np.array_equal(chosen, hot_nodes(store, 50, "degree", fanouts=[3, 3],
                                                seed_nodes=seeds, batch_size=16, seed=4))


def test_sampler_gathers_through_the_cache_and_counts_both_views(store, tmp_path,
                                                                 monkeypatch) -> None:
    monkeypatch.setattr(features, "SAMPLED_BATCHES", 20)
    seeds = torch.arange(40, 90)
    plain = NeighborBatchSampler(store, [4, 4], graph_degrees=False)
    with FeatureCache.build(store, 100 * ROW_BYTES, "sampled", fanouts=[4, 4],
                            root=tmp_path) as cache:
        cached_ids = np.flatnonzero(np.asarray(cache.slot_of) >= 0)
        cached = NeighborBatchSampler(store, [4, 4], graph_degrees=False,
                                      features=FeatureSource(store.features, cache))
        batch = cached.sample(seeds, rng_seed=9, independent=True)
    reference = plain.sample(seeds, rng_seed=9, independent=True)
    lookups = [0, 0]
    for view, expected in zip(batch.views, reference.views):
        assert torch.equal(view.input_nodes, expected.input_nodes)
        assert torch.equal(view.features, expected.features)
        assert view.cache_hits == np.isin(view.input_nodes.numpy(), cached_ids).sum() > 0
        assert view.cache_misses == len(view.input_nodes) - view.cache_hits > 0
        lookups = [lookups[0] + view.cache_hits, lookups[1] + view.cache_misses]
    assert batch.cache_lookups == tuple(lookups)
    assert reference.cache_lookups == (0, 0)


def vm_flags(array: np.ndarray) -> set[str]:
    """The VmFlags of the mapping that holds ``array``'s data (/proc/self/smaps)."""
    address = array.ctypes.data
    inside = False
    with open("/proc/self/smaps", encoding="utf-8") as smaps:
        for line in smaps:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                start, end = (int(part, 16) for part in head.split("-"))
                inside = start <= address < end
            elif inside and head == "VmFlags:":
                return set(line.split()[1:])
    raise AssertionError("no mapping holds the array")


def test_a_sampler_with_a_cache_reads_the_feature_file_without_read_around(store, tmp_path) -> None:
    plain, cached = (GraphStore.open(store.path) for _ in range(2))
    NeighborBatchSampler(plain, [2], graph_degrees=False)
    with FeatureCache.build(store, 10 * ROW_BYTES, root=tmp_path) as cache:
        NeighborBatchSampler(cached, [2], graph_degrees=False,
                             features=FeatureSource(cached.features, cache))
    assert "rr" in vm_flags(cached.features)  # MADV_RANDOM
    assert "rr" not in vm_flags(plain.features)


# ---- sharing and cleanup -------------------------------------------------------------------
ATTACH = """
import hashlib, json, sys
import numpy as np
from bgrl_dgl.loading.feature_cache import FeatureCache
from bgrl_dgl.store.reader import GraphStore

cache = FeatureCache.open(sys.argv[1])
store = GraphStore.open(sys.argv[2])
rows, hits = cache.gather(store.features, np.arange(store.num_nodes))
maps = open("/proc/self/maps").read()
path = str(cache.rows.filename)
print(json.dumps({"rows_path": path, "mapped": path in maps,
                  "digest": hashlib.sha256(rows.tobytes()).hexdigest(), "hits": hits,
                  "owner": cache.owner}))
"""


def attach_in_subprocess(directory: Path, store: GraphStore) -> dict:
    result = subprocess.run([sys.executable, "-c", ATTACH, str(directory), str(store.path)],
                            cwd=REPO, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                            timeout=120, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_another_process_maps_the_same_shared_files(store) -> None:
    import hashlib

    with FeatureCache.build(store, 30 * ROW_BYTES, "degree") as cache:
        assert cache.directory.parent == default_cache_root() == Path("/dev/shm")
        assert cache.directory == cache_directory(store, 30 * ROW_BYTES, "degree", {})
        assert cache.owner and isinstance(cache.rows, np.memmap)
        other = attach_in_subprocess(cache.directory, store)
        rows, hits = cache.gather(store.features, np.arange(NUM_NODES))
        assert other["rows_path"] == str(cache.rows.filename) == str(cache.directory / "rows.npy")
        assert other["mapped"] and not other["owner"]
        assert other["digest"] == hashlib.sha256(rows.tobytes()).hexdigest()
        assert other["hits"] == hits == 30
    assert not cache.directory.exists()


def test_only_the_writer_removes_the_cache_and_a_second_build_reuses_it(store, tmp_path) -> None:
    first = FeatureCache.build(store, 20 * ROW_BYTES, root=tmp_path)
    second = FeatureCache.build(store, 20 * ROW_BYTES, root=tmp_path)
    reader = FeatureCache.open(first.directory)
    assert first.owner and not second.owner and not reader.owner
    assert second.directory == reader.directory == first.directory
    files = sorted(p.name for p in first.directory.iterdir())
    assert files == ["meta.json", "rows.npy", "slots.npy"]
    other_budget = FeatureCache.build(store, 21 * ROW_BYTES, root=tmp_path)
    assert other_budget.directory != first.directory
    other_budget.close()
    for cache in (second, reader):
        cache.close()
        assert first.directory.exists()
    ids = np.arange(NUM_NODES)
    assert np.array_equal(first.gather(store.features, ids)[0], store_rows(store, ids))
    first.close()
    first.close()
    assert not list(tmp_path.iterdir())


def test_a_dead_runs_cache_is_reused_and_removed_by_the_next_run(store, tmp_path) -> None:
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)
    leftover = FeatureCache.build(store, 25 * ROW_BYTES, root=tmp_path)
    meta_path = leftover.directory / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({**meta, "owner": int(dead.stdout)}))
    leftover.owner = False  # as if its process had died without closing it
    (tmp_path / f".tmp-{int(dead.stdout)}@{socket.gethostname()}@{leftover.directory.name}").mkdir()
    rows_inode = (leftover.directory / "rows.npy").stat().st_ino
    with FeatureCache.build(store, 25 * ROW_BYTES, root=tmp_path) as again:
        assert again.owner and again.directory == leftover.directory
        assert (again.directory / "rows.npy").stat().st_ino == rows_inode  # not rewritten
    assert not list(tmp_path.iterdir())


# ---- configuration and training ------------------------------------------------------------
def test_cache_bytes_accepts_sizes_and_byte_counts() -> None:
    def parsed(value: object) -> int:
        return section_from_dict(SamplingConfig, {"cache_bytes": value}, "config.yaml").cache_bytes

    assert parsed("2GB") == 2 << 30 and parsed(4096) == 4096 and parsed("4096") == 4096
    assert SamplingConfig().cache_bytes == 0 and SamplingConfig().cache_policy == "degree"
    with pytest.raises(InputError, match="cache_bytes"):
        parsed("lots")


TRAIN = ["--hidden", "16,16", "--predictor-hidden", "16", "--fanouts", "3,3", "--batch-size", "16",
         "--max-steps", "4", "--log-every", "1", "--threads", "1", "--warmup-steps", "1",
         "--device", "cpu"]


@pytest.fixture(scope="module")
def train_store(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("features") / "planted"
    return prepare_synthetic(out, num_nodes=400, avg_degree=5, feat_dim=16,
                             num_classes=4)


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_training_with_a_cache_logs_its_hit_rate_and_removes_it(train_store, tmp_path) -> None:
    """Workers attach to the cache, or the training process samples through it after the
    sampling pass of the ``sampled`` policy; either way the batches, hence the losses, are
    those of a run without it, and the cache is gone once the run ends."""
    budget = 40 * 16 * 4  # a tenth of the rows
    assert main(["train", "--data", str(train_store), "--out", str(tmp_path / "plain"), *TRAIN,
                 "--num-workers", "0"]) == 0
    plain = metrics(tmp_path / "plain")
    assert all("cache_hit_rate" not in m for m in plain)
    for workers, policy in (("1", "degree"), ("0", "sampled")):
        run = tmp_path / policy
        assert main(["train", "--data", str(train_store), "--out", str(run), *TRAIN,
                     "--num-workers", workers, "--cache-bytes", str(budget),
                     "--cache-policy", policy]) == 0
        cached = metrics(run)
        assert [m["loss"] for m in cached] == [m["loss"] for m in plain]
        # The hot tenth of the rows serves more than a tenth of the lookups.
        assert len(cached) == 4 and all(0.12 < m["cache_hit_rate"] < 1 for m in cached)
    assert caches_of(train_store) == []


def caches_of(store_dir: Path) -> list[Path]:
    """The cache directories (complete or not) of a store in shared memory."""
    found = []
    for directory in default_cache_root().glob(f"{features.CACHE_PREFIX}*"):
        meta = directory / "meta.json"
        if meta.exists() and json.loads(meta.read_text())["store"] == str(store_dir.resolve()):
            found.append(directory)
    return found


def test_a_cache_budget_below_one_row_leaves_no_run_behind(train_store, tmp_path, capsys) -> None:
    run = tmp_path / "run"
    code = main(["train", "--data", str(train_store), "--out", str(run), *TRAIN,
                 "--num-workers", "0", "--cache-bytes", "32"])
    captured = capsys.readouterr()
    assert_input_error(subprocess.CompletedProcess([], code, captured.out, captured.err),
                       "--cache-bytes 32 holds no feature row (64 bytes each)")
    assert not run.exists()
