"""The memory plan: batch estimate, per-machine figures for a known configuration, and the
refusals when /dev/shm or RAM cannot hold what the settings ask for."""
from __future__ import annotations

from pathlib import Path

import pytest

from bgrl_dgl.errors import InputError
from bgrl_dgl.loading.feature_cache import FeatureCache
from bgrl_dgl.model.bgrl import build_model
from bgrl_dgl.store.reader import GraphStore
from bgrl_dgl.training.config import TrainConfig
from bgrl_dgl.training.memory_check import RAM_ENV, SHM_ENV, measure_machine
from bgrl_dgl.training.memory_plan import (
    CUDA_HOST_BYTES,
    PROCESS_BYTES,
    WORKER_BATCH_COPIES,
    GraphSizes,
    MachineMemory,
    estimate_batch,
    parameter_counts,
    pinned_bytes,
    plan_memory,
)

from helpers import prepare_synthetic

GIB = 2**30
# 1000 nodes of average in-degree 5, 16-d float16 features, int32 indices.
SIZES = GraphSizes.of(1000, 5000, 16, "float16")


def config(**sampling) -> TrainConfig:
    settings = {"batch_size": 10, "fanouts": [3, 10], "num_workers": 2, **sampling}
    return TrainConfig.from_plain({"sampling": settings,
                                   "model": {"hidden": [32, 8], "predictor_hidden": 24}})


def machine(ram: int = 64 * GIB, shm: int = 32 * GIB) -> MachineMemory:
    return MachineMemory(ram, ram, shm, shm, Path("/dev/shm"))


def test_a_batch_grows_by_min_fanout_degree_per_layer_from_the_seeds() -> None:
    batch = estimate_batch(SIZES, config().sampling, independent_views=False, cuda=False)
    # 10 seeds; the last layer samples min(10, 5) = 5 each (50), the first min(3, 5) = 3 of
    # each of the 60 nodes (180).
    assert batch.nodes == [240, 60, 10] and batch.edges == [180, 50]
    features = 240 * 16 * 4  # float32 from CPU workers
    blocks = (61 + 180) * 8 + (11 + 50) * 8  # int64 indptr + indices per layer
    degrees = 4 * (240 + 60) + 4 * (60 + 10)  # float32 whole-graph degrees
    assert batch.feature_bytes == features
    assert batch.bytes == features + 240 * 8 + blocks + degrees + 10 * 8
    on_gpu = estimate_batch(SIZES, config().sampling, independent_views=True, cuda=True)
    assert on_gpu.views == 2 and on_gpu.feature_bytes == 2 * 240 * 16 * 2  # store dtype


def test_all_neighbours_take_the_average_degree_and_counts_stop_at_the_graph() -> None:
    batch = estimate_batch(SIZES, config(fanouts=[-1, -1]).sampling, False, False)
    assert batch.nodes == [360, 60, 10]
    huge = estimate_batch(SIZES, config(batch_size=500, fanouts=[20, 20]).sampling, False, False)
    assert huge.nodes == [1000, 1000, 500]


def test_parameters_are_those_of_the_built_model() -> None:
    model_config = config().model
    model = build_model(16, model_config, seed=0)
    total, trainable = parameter_counts(16, model_config)
    assert total == sum(p.numel() for p in model.parameters())
    assert trainable == sum(p.numel() for p in model.trainable_parameters())


def test_the_plan_of_a_known_configuration() -> None:
    settings = config(cache_bytes=320)  # 10 rows of 32 bytes
    plan = plan_memory(SIZES, settings, processes=4, cuda=False)
    batch = estimate_batch(SIZES, settings.sampling, False, False)
    assert plan.topology == (1001 + 5000) * 4
    assert (plan.cache_rows, plan.cache_slots) == (320, 4000)
    assert plan.in_flight == 4 * (2 * 2 + 1) * batch.bytes
    # Shared once per machine: two epochs' orders of the 1000 seeds, one float32 degree array.
    assert plan.shared == 2 * 8 * 1000 + 4 * 1000
    assert plan.worker == PROCESS_BYTES + WORKER_BATCH_COPIES * batch.bytes
    total, trainable = parameter_counts(16, settings.model)
    parts = plan.process_parts
    assert parts["model and optimizer"] == 4 * (total + 3 * trainable)
    assert plan.process == sum(parts.values()) == PROCESS_BYTES + sum(
        parts[name] for name in ("model and optimizer", "activations"))
    assert plan.pinned == 0 and plan.gpu == 0
    assert plan.shm_needed == 4320 + plan.shared + plan.in_flight
    assert plan.resident == plan.shm_needed + 4 * plan.process + 8 * plan.worker
    on_gpu = plan_memory(SIZES, settings, processes=4, cuda=True)
    gpu_batch = estimate_batch(SIZES, settings.sampling, False, True)
    assert on_gpu.pinned == (2 * 2 + 1) * pinned_bytes(gpu_batch.feature_bytes)
    assert on_gpu.process == PROCESS_BYTES + CUDA_HOST_BYTES
    assert on_gpu.gpu == 4 * (total + 3 * trainable) + parts["activations"]
    two_views = TrainConfig.from_plain({"sampling": {"batch_size": 10, "fanouts": [3, 10]},
                                        "augment": {"independent_views": True},
                                        "model": {"hidden": [32, 8]}})
    per_view = estimate_batch(SIZES, two_views.sampling, False, True).feature_bytes
    assert plan_memory(SIZES, two_views, 1, True).pinned == (1 * 2 + 1) * 2 * pinned_bytes(per_view)


def test_pinned_buffers_round_up_to_a_power_of_two() -> None:
    assert [pinned_bytes(n) for n in (0, 1, 4096, 4097, 3 * 2**20)] == [0, 1, 4096, 8192,
                                                                         4 * 2**20]


def test_no_workers_sample_in_the_training_process() -> None:
    plan = plan_memory(SIZES, config(num_workers=0), processes=1, cuda=True)
    assert plan.in_flight == 0 and plan.pinned == 0 and plan.worker == 0
    assert plan.process_parts["batch"] == plan.batch.bytes


def test_shared_arrays_follow_the_seeds_and_the_degrees() -> None:
    directed = GraphSizes.of(1000, 5000, 16, "float16", num_seeds=100, symmetrized=False)
    assert plan_memory(directed, config(), 1, False).shared == 2 * 8 * 100 + 2 * 4 * 1000
    from_file = config(seeds="ids.npy", graph_degrees=False)
    assert plan_memory(directed, from_file, 1, False).shared == 3 * 8 * 100
    split = config(seeds="split:train", graph_degrees=False)
    assert plan_memory(directed, split, 1, False).shared == 2 * 8 * 100


def test_shared_memory_must_hold_the_cache_and_the_batches_in_flight() -> None:
    plan = plan_memory(SIZES, config(cache_bytes=320), processes=4, cuda=False)
    needed = plan.cache + plan.shared + plan.in_flight
    assert plan.problem(machine(shm=needed)) is None
    problem = plan.problem(machine(shm=needed - 1))
    assert isinstance(problem, InputError) and problem.path == "/dev/shm"
    assert "batches in flight" in problem.problem
    assert "4 process(es) x (2 worker(s) x 2 + 1) batches" in problem.problem
    # A cache that is already there needs no more room.
    assert plan.problem(machine(shm=needed - plan.cache), existing_cache=plan.cache) is None


def test_ram_must_hold_what_cannot_be_paged_out() -> None:
    plan = plan_memory(SIZES, config(), processes=2, cuda=True)
    assert plan.problem(machine(ram=plan.resident)) is None
    problem = plan.problem(machine(ram=plan.resident - 1))
    assert isinstance(problem, InputError) and problem.path == "/proc/meminfo"
    assert "cannot be paged out" in problem.problem
    # The topology is page cache: only warned about.
    assert plan.page_cache_warning(machine(ram=plan.resident)) is not None
    assert plan.page_cache_warning(machine(ram=plan.resident + plan.topology)) is None


def test_the_plan_lines_show_every_part() -> None:
    plan = plan_memory(SIZES, config(cache_bytes=320), processes=4, cuda=True)
    lines = plan.lines(machine())
    assert lines[0] == "memory plan: 4 process(es) x 2 worker(s) on cuda"
    labels = [line.split("  ")[1] for line in lines[1:]]
    for label in ("batch", "topology", "feature cache", "shared arrays", "in flight",
                  "per process",
                  "per worker", "pinned", "GPU per process", "RAM", "/dev/shm"):
        assert label in labels, (label, labels)
    # Aligned: every text starts in the column after the longest label.
    column = 2 + max(map(len, labels)) + 2
    assert all(line[column - 2:column] == "  " and line[column] != " " for line in lines[1:])


def test_measured_figures_can_be_replaced(tmp_path) -> None:
    measured = measure_machine(tmp_path, environ={})
    assert measured.ram_total > 0 and 0 < measured.ram_available <= measured.ram_total
    assert 0 <= measured.shm_free <= measured.shm_total
    replaced = measure_machine(tmp_path, environ={RAM_ENV: "123", SHM_ENV: "45"})
    assert (replaced.ram_available, replaced.shm_free) == (123, 45)
    with pytest.raises(InputError, match=SHM_ENV):
        measure_machine(tmp_path, environ={SHM_ENV: "lots"})


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> GraphStore:
    out = tmp_path_factory.mktemp("memory_plan") / "store"
    return GraphStore.open(prepare_synthetic(out, num_nodes=300, avg_degree=5, feat_dim=8,
                                             num_classes=3))


def test_the_feature_cache_leaves_the_batches_room(store, tmp_path) -> None:
    free = measure_machine(tmp_path, environ={}).shm_free
    with pytest.raises(InputError, match="kept for the batches in flight"):
        FeatureCache.build(store, 1000, root=tmp_path, reserve=free)
    assert [path for path in tmp_path.iterdir() if path.is_dir()] == []  # no cache written
    with FeatureCache.build(store, 1000, root=tmp_path, reserve=1 << 20) as cache:
        assert cache.num_rows > 0
