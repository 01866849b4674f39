"""Seed batches, neighbour sampling and feature gathering (``bgrl_dgl.loading.loader``)."""
from __future__ import annotations

import multiprocessing
import os
import signal
from pathlib import Path

import numpy as np
import pytest
import torch

from bgrl_dgl.errors import InputError
from bgrl_dgl.loading.loader import (
    BatchLoader,
    SamplingConfig,
    SeedSchedule,
    epoch_permutation,
    rank_batch_positions,
    resolve_seed_nodes,
    smallest_rank_batch,
)
from bgrl_dgl.loading.sampler import NeighborBatchSampler, SampledBatch, SampledView, batch_rng_seed
from bgrl_dgl.store.reader import GraphStore

from helpers import write_test_store

NUM_NODES, FEAT_DIM = 150, 6
MAX_IN_DEGREE = 13  # node v has v % MAX_IN_DEGREE in-neighbours: 0 .. 12
TRAIN_IDS = np.arange(0, NUM_NODES, 3, dtype=np.int64)


def graph_edges(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(src, dst) [E] int64: node v gets ``v % MAX_IN_DEGREE`` distinct non-self sources."""
    rng = np.random.default_rng(seed)
    src, dst = [], []
    for v in range(NUM_NODES):
        others = np.delete(np.arange(NUM_NODES), v)
        sources = rng.choice(others, size=v % MAX_IN_DEGREE, replace=False)
        src.append(sources)
        dst.append(np.full(len(sources), v))
    return np.concatenate(src).astype(np.int64), np.concatenate(dst).astype(np.int64)


def write_store(out: Path, feature_dtype: str) -> GraphStore:
    src, dst = graph_edges()
    features = np.random.default_rng(1).normal(size=(NUM_NODES, FEAT_DIM)).astype(np.float32)
    return write_test_store(out, NUM_NODES, src, dst, features, feature_dtype=feature_dtype,
                            labels=np.arange(NUM_NODES) % 3, splits={"train": TRAIN_IDS})


@pytest.fixture(scope="session")
def store(tmp_path_factory) -> GraphStore:
    return write_store(tmp_path_factory.mktemp("sampling") / "graph", "keep")


@pytest.fixture(scope="session")
def half_store(tmp_path_factory) -> GraphStore:
    return write_store(tmp_path_factory.mktemp("sampling") / "graph16", "float16")


def make_loader(store: GraphStore, num_seeds: int, batch_size: int, *, rank: int = 0,
                world_size: int = 1, num_workers: int = 0,
                independent: bool = False) -> BatchLoader:
    config = SamplingConfig(fanouts=[4, 6], batch_size=batch_size, num_workers=num_workers)
    schedule = SeedSchedule(np.arange(num_seeds, dtype=np.int64), batch_size, seed=7, rank=rank,
                            world_size=world_size)
    return BatchLoader(store, config, schedule, independent_views=independent)


def in_neighbours(store: GraphStore, node: int) -> np.ndarray:
    return np.asarray(store.indices[store.indptr[node]:store.indptr[node + 1]])


# ---- seed order and batches ---------------------------------------------------------------
def test_epoch_permutation_is_fixed_per_seed_and_epoch_and_differs_across_epochs() -> None:
    first = epoch_permutation(500, seed=3, epoch=0)
    assert np.array_equal(first, epoch_permutation(500, seed=3, epoch=0))
    assert np.array_equal(np.sort(first), np.arange(500))
    assert not np.array_equal(first, epoch_permutation(500, seed=3, epoch=1))
    assert not np.array_equal(first, epoch_permutation(500, seed=4, epoch=0))


def test_batch_rng_seed_is_a_fixed_31_bit_seed_per_batch() -> None:
    seeds = {batch_rng_seed(7, epoch, batch) for epoch in range(3) for batch in range(50)}
    assert len(seeds) == 150
    assert all(0 <= s < 2**31 for s in seeds)
    assert batch_rng_seed(7, 2, 9) == batch_rng_seed(7, 2, 9)


@pytest.mark.parametrize("epoch", [0, 1])
def test_two_ranks_cover_every_seed_once_in_the_same_number_of_steps(store, epoch) -> None:
    ranks = [make_loader(store, 101, 8, rank=r, world_size=2) for r in range(2)]
    batches = [loader.schedule.batch_positions(epoch) for loader in ranks]
    assert ranks[0].schedule.steps_per_epoch == ranks[1].schedule.steps_per_epoch == 7
    assert len(batches[0]) == len(batches[1]) == 7
    for mine, theirs in zip(*batches):
        assert 0 < len(mine) <= 8 and 0 < len(theirs) <= 8
        assert abs(len(mine) - len(theirs)) <= 1
    seen = [np.concatenate(b) for b in batches]
    assert not set(seen[0]) & set(seen[1])
    assert np.array_equal(np.sort(np.concatenate(seen)), np.arange(101))
    assert not np.array_equal(seen[0], np.concatenate(ranks[0].schedule.batch_positions(1 - epoch)))


def test_a_short_last_batch_is_balanced_not_a_single_seed(store) -> None:
    """257 seeds in batches of 256: two batches of 129 and 128, not 256 and 1 (batch
    normalisation cannot train on one seed)."""
    sizes = [len(b) for b in make_loader(store, 257, 256).schedule.batch_positions(0)]
    assert sorted(sizes) == [128, 129]


def schedule_for(store: GraphStore, tmp_path: Path, num_seeds: int, batch_size: int,
                 world_size: int, rank: int = 0) -> SeedSchedule:
    ids = tmp_path / f"seeds-{num_seeds}.npy"
    np.save(ids, np.arange(num_seeds, dtype=np.int64))
    config = SamplingConfig(batch_size=batch_size, seeds=str(ids))
    return SeedSchedule.for_store(store, config, seed=7, rank=rank, world_size=world_size)


def test_too_few_seeds_for_the_processes_is_an_input_error(store, tmp_path) -> None:
    with pytest.raises(InputError, match="cannot feed 4 processes"):
        schedule_for(store, tmp_path, 3, 8, world_size=4)
    # Batch normalisation needs two rows: two seeds per process and step.
    with pytest.raises(InputError, match="7 seed nodes cannot feed 4 processes.*at least 8"):
        schedule_for(store, tmp_path, 7, 8, world_size=4)
    schedule = schedule_for(store, tmp_path, 8, 8, world_size=4, rank=3)
    assert [len(b) for b in schedule.batch_positions(0)] == [2]


@pytest.mark.parametrize("num_seeds, batch_size, world_size", [(3, 2, 1), (5, 2, 2), (9, 1, 1)])
def test_a_batch_size_leaving_a_process_one_seed_is_an_input_error(store, tmp_path, num_seeds,
                                                                   batch_size, world_size) -> None:
    with pytest.raises(InputError, match=f"--batch-size {batch_size} leaves a process a batch "
                                         "of 1 .*use a larger --batch-size"):
        schedule_for(store, tmp_path, num_seeds, batch_size, world_size)


def test_smallest_rank_batch_is_the_smallest_slice_of_any_step() -> None:
    for num_seeds in range(1, 40):
        for batch_size in (1, 2, 3, 5):
            for world_size in (1, 2, 3):
                if num_seeds < world_size:
                    continue
                sizes = [len(b) for r in range(world_size)
                         for b in rank_batch_positions(num_seeds, 0, 0, batch_size, r, world_size)]
                assert smallest_rank_batch(num_seeds, batch_size, world_size) == min(sizes)


# ---- seed specifications -----------------------------------------------------------------
def test_resolve_seed_nodes_all_split_and_file(store, tmp_path) -> None:
    everything = resolve_seed_nodes(store, "all")
    assert everything.dtype == np.int64 and np.array_equal(everything, np.arange(NUM_NODES))
    train = resolve_seed_nodes(store, "split:train")
    assert train.dtype == np.int64 and np.array_equal(train, TRAIN_IDS)
    ids = np.array([5, 149, 0, 5], dtype=np.int32)
    np.save(tmp_path / "seeds.npy", ids)
    loaded = resolve_seed_nodes(store, str(tmp_path / "seeds.npy"))
    assert loaded.dtype == np.int64 and np.array_equal(loaded, [0, 5, 149])  # a set of seeds


@pytest.mark.parametrize("ids, problem", [
    (np.array([3, NUM_NODES]), f"must be store indices in [0, {NUM_NODES})"),
    (np.array([-1, 3]), f"must be store indices in [0, {NUM_NODES})"),
    (np.array([1.0, 2.0]), "1-D integer array"),
    (np.array([[1, 2]]), "1-D integer array"),
    (np.array([], dtype=np.int64), "holds no seed ids"),
])
def test_bad_seed_files_are_input_errors(store, tmp_path, ids, problem) -> None:
    path = tmp_path / "seeds.npy"
    np.save(path, ids)
    with pytest.raises(InputError) as caught:
        resolve_seed_nodes(store, str(path))
    assert problem in str(caught.value)
    assert str(path) in str(caught.value)


def test_missing_split_and_missing_file_are_input_errors(store, tmp_path) -> None:
    with pytest.raises(InputError, match="no split named 'nope'.*available: train"):
        resolve_seed_nodes(store, "split:nope")
    with pytest.raises(InputError, match="cannot read seed ids"):
        resolve_seed_nodes(store, str(tmp_path / "absent.npy"))


# ---- sampled blocks ----------------------------------------------------------------------
def block_sources(view: SampledView) -> list[np.ndarray]:
    """Store ids of the source nodes of every block (block i+1's sources are block i's
    destinations, which are the first ``num_dst`` of block i's sources)."""
    ids = view.input_nodes.numpy()
    return [ids[:adj.num_src] for adj in view.adjs]


def check_blocks(store: GraphStore, view: SampledView, seeds: np.ndarray,
                 fanouts: list[int]) -> None:
    adjs = view.adjs
    assert adjs[-1].num_dst == len(seeds)
    assert [a.num_dst for a in adjs[:-1]] == [a.num_src for a in adjs[1:]]
    assert len(view.input_nodes) == adjs[0].num_src
    assert np.array_equal(view.input_nodes[:len(seeds)].numpy(), seeds)
    for adj, sources, fanout in zip(adjs, block_sources(view), fanouts):
        assert len(np.unique(sources)) == len(sources)
        for v in range(adj.num_dst):
            chosen = sources[adj.indices[adj.indptr[v]:adj.indptr[v + 1]].numpy()]
            neighbours = in_neighbours(store, int(sources[v]))
            expected = len(neighbours) if fanout == -1 else min(fanout, len(neighbours))
            assert len(chosen) == expected  # without replacement: distinct edges
            assert set(chosen) <= set(neighbours)
            if fanout == -1:
                assert np.array_equal(np.sort(chosen), neighbours)


@pytest.mark.parametrize("fanouts", [[4, 6], [-1, 3]])
def test_blocks_chain_and_respect_the_fanouts(store, fanouts) -> None:
    seeds = np.random.default_rng(0).choice(NUM_NODES, size=40, replace=False)
    sampler = NeighborBatchSampler(store, fanouts, graph_degrees=False)
    batch = sampler.sample(torch.from_numpy(seeds), rng_seed=11, independent=False)
    assert batch.views[0] is batch.views[1]
    check_blocks(store, batch.views[0], seeds, fanouts)


def test_graph_degrees_are_the_whole_graph_degrees_of_the_block_nodes(store) -> None:
    seeds = np.arange(20, 60)
    view = NeighborBatchSampler(store, [3, 3], graph_degrees=True).sample(
        torch.from_numpy(seeds), rng_seed=2, independent=False).views[0]
    in_degree = store.in_degrees()
    out_degree = np.bincount(np.asarray(store.indices), minlength=NUM_NODES)
    for adj, sources in zip(view.adjs, block_sources(view)):
        assert np.array_equal(adj.src_degree.numpy(), out_degree[sources].astype(np.float32))
        assert np.array_equal(adj.dst_degree.numpy(), in_degree[sources[:adj.num_dst]])


@pytest.mark.parametrize("which", ["store", "half_store"])
def test_features_are_the_store_rows_of_the_input_nodes_float32_on_the_device(request,
                                                                              which) -> None:
    graph = request.getfixturevalue(which)
    seeds = np.array([140, 3, 77, 12, 101, 56])
    view = NeighborBatchSampler(graph, [5, 5], graph_degrees=False).sample(
        torch.from_numpy(seeds), rng_seed=5, independent=False).views[0]
    assert view.features.numpy().dtype == graph.feat_dtype  # converted where it is computed on
    assert view.input_nodes.dtype == torch.int64
    expected = np.asarray(graph.features)[view.input_nodes.numpy()].astype(np.float32)
    moved = view.to("cpu").features
    assert moved.dtype == torch.float32 and np.array_equal(moved.numpy(), expected)
    assert graph.feat_dtype == (np.float16 if which == "half_store" else np.float32)


def test_consecutive_batches_of_one_sampler_are_valid_with_several_threads(store) -> None:
    """DGL's fused sampler, its default with several OpenMP threads, corrupts every batch
    after the first on an int32 graph; the sampler must not use it."""
    assert store.index_dtype == np.int32
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        sampler = NeighborBatchSampler(store, [3, 4], graph_degrees=False)
        for rng_seed in range(4):
            seeds = np.random.default_rng(rng_seed).choice(NUM_NODES, size=50, replace=False)
            batch = sampler.sample(torch.from_numpy(seeds), rng_seed, independent=False)
            check_blocks(store, batch.views[0], seeds, [3, 4])
    finally:
        torch.set_num_threads(previous)


def test_independent_views_sample_the_same_seeds_twice_differently(store) -> None:
    seeds = np.arange(30, 80)
    batch = NeighborBatchSampler(store, [2, 2], graph_degrees=False).sample(
        torch.from_numpy(seeds), rng_seed=3, independent=True)
    first, second = batch.views
    assert first is not second
    for view in (first, second):
        check_blocks(store, view, seeds, [2, 2])
    assert not np.array_equal(first.input_nodes.numpy(), second.input_nodes.numpy())


def test_the_same_rng_seed_samples_the_same_blocks_whatever_the_thread_count(store) -> None:
    """Several OpenMP threads would make the node order of the blocks vary from call to call."""
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        sampler = NeighborBatchSampler(store, [3, 3], graph_degrees=False)
        seeds = torch.arange(10, 50)
        first, *again = (sampler.sample(seeds, 4, independent=True) for _ in range(4))
        other = sampler.sample(seeds, 5, independent=True)
    finally:
        torch.set_num_threads(previous)
    for batch in again:
        assert_same_batch(first, batch)
    assert not np.array_equal(first.views[0].input_nodes, other.views[0].input_nodes)


# ---- the loader, with and without worker processes ---------------------------------------
def assert_same_batch(a: SampledBatch, b: SampledBatch) -> None:
    assert torch.equal(a.seeds, b.seeds)
    for view_a, view_b in zip(a.views, b.views):
        assert torch.equal(view_a.input_nodes, view_b.input_nodes)
        assert torch.equal(view_a.features, view_b.features)
        assert len(view_a.adjs) == len(view_b.adjs)
        for adj_a, adj_b in zip(view_a.adjs, view_b.adjs):
            assert adj_a.num_src == adj_b.num_src
            assert torch.equal(adj_a.indptr, adj_b.indptr)
            assert torch.equal(adj_a.indices, adj_b.indices)
            for degrees_a, degrees_b in ((adj_a.src_degree, adj_b.src_degree),
                                         (adj_a.dst_degree, adj_b.dst_degree)):
                assert (degrees_a is None) == (degrees_b is None)
                assert degrees_a is None or torch.equal(degrees_a, degrees_b)


def signal_workers(sig: signal.Signals) -> int:
    """Send ``sig`` to this process's live worker processes; returns how many got it."""
    workers = multiprocessing.active_children()
    for worker in workers:
        os.kill(worker.pid, sig)
    return len(workers)


def test_workers_give_the_batches_of_the_training_process_and_survive_ctrl_c(store) -> None:
    """Steps 2..7 (crossing epochs: 4 steps each) are the same batches sampled in the
    training process, in a worker process, and as the tail of a run from step 0. A Ctrl-C
    reaches the workers too; it is meant for the training process (which then stops
    cleanly), so a worker must keep serving batches. Starting the workers leaves torch's
    global generator alone (a resumed run would otherwise draw other dropout masks)."""
    def loader(num_workers: int) -> BatchLoader:
        return make_loader(store, 120, 32, num_workers=num_workers, independent=True)

    assert loader(0).schedule.steps_per_epoch == 4
    in_process = list(loader(0).batches(2, 8))
    from_start = list(loader(0).batches(0, 8))
    assert len(in_process) == 6
    for a, b in zip(in_process, from_start[2:]):
        assert_same_batch(a, b)
    assert not torch.equal(in_process[0].seeds, in_process[4].seeds)
    for step, batch in enumerate(in_process, start=2):
        epoch, index = divmod(step, 4)
        positions = loader(0).schedule.batch_positions(epoch)[index]
        assert np.array_equal(batch.seeds.numpy(), np.arange(120)[positions])

    global_rng = torch.get_rng_state()
    from_workers = loader(1).batches(2, 8)
    try:
        assert_same_batch(next(from_workers), in_process[0])
        assert torch.equal(torch.get_rng_state(), global_rng)  # restored by checkpoints
        assert signal_workers(signal.SIGINT) == 1
        rest = list(from_workers)
    finally:
        from_workers.close()  # shuts the worker down even when an assertion failed
    assert len(rest) == 5
    for a, b in zip(rest, in_process[1:]):
        assert_same_batch(a, b)


def test_sampling_in_the_training_process_leaves_its_thread_count_alone(store) -> None:
    """Sampling runs single-threaded, but the training step that consumes each batch does not."""
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        consumed = 0
        for _ in make_loader(store, 60, 20).batches(0, 3):
            assert torch.get_num_threads() == 2
            consumed += 1
        assert consumed == 3
    finally:
        torch.set_num_threads(previous)
