"""Whole-graph arrays once per machine (``bgrl_dgl.loading.shared_arrays``): workers get only
their steps' seeds, ranks and workers map one copy of the epochs' orders and the degrees, the
batches are those of the schedule computed in every process, and no file outlives a run."""
from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from bgrl_dgl.cli import main
from bgrl_dgl.errors import InputError
from bgrl_dgl.loading import loader as loader_module
from bgrl_dgl.loading import shared_arrays
from bgrl_dgl.loading.loader import BatchLoader, SamplingConfig, SeedSchedule
from bgrl_dgl.loading.sampler import NeighborBatchSampler, batch_rng_seed
from bgrl_dgl.loading.shared_arrays import SharedArrays, map_degrees, user_prefix
from bgrl_dgl.store.reader import GraphStore

from helpers import write_test_store

REPO = Path(__file__).resolve().parents[3]


def random_store(out: Path, num_nodes: int, seed: int = 0) -> GraphStore:
    rng = np.random.default_rng(seed)
    src = rng.integers(0, num_nodes, size=4 * num_nodes)
    dst = rng.integers(0, num_nodes, size=4 * num_nodes)
    features = rng.normal(size=(num_nodes, 4)).astype(np.float32)
    return write_test_store(out, num_nodes, src, dst, features,
                            splits={"train": np.arange(1, num_nodes, 3, dtype=np.int64)})


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> GraphStore:
    return random_store(tmp_path_factory.mktemp("shared") / "graph", 300)


def old_steps(seed_nodes: np.ndarray, batch_size: int, seed: int, rank: int, world_size: int,
              epoch: int) -> list[tuple[np.ndarray, int]]:
    """An epoch's (seeds, sampling seed) of a rank, computed as every process used to: the
    whole permutation, cut with np.array_split."""
    num_seeds = len(seed_nodes)
    perm = np.random.default_rng(np.random.SeedSequence([seed, epoch, 0x5EED])).permutation(
        num_seeds)
    steps = -(-num_seeds // (batch_size * world_size))
    return [(seed_nodes[np.array_split(chunk, world_size)[rank]],
             batch_rng_seed(seed, epoch, batch, rank))
            for batch, chunk in enumerate(np.array_split(perm, steps))]


@pytest.mark.parametrize("num_seeds,batch_size,world_size", [(101, 8, 2), (257, 256, 1),
                                                             (1000, 60, 3), (7, 2, 2)])
@pytest.mark.parametrize("ids", ["all", "subset"])
def test_steps_are_those_of_the_old_schedule_with_and_without_shared_files(
        tmp_path, num_seeds, batch_size, world_size, ids) -> None:
    seed_nodes = np.arange(num_seeds, dtype=np.int64)
    if ids == "subset":
        seed_nodes = np.sort(np.random.default_rng(5).choice(10 * num_seeds, num_seeds,
                                                             replace=False))
    with SharedArrays.open("test", root=tmp_path) as shared:
        for rank in range(world_size):
            given: np.ndarray | int = num_seeds if ids == "all" else seed_nodes
            local = SeedSchedule(given, batch_size, seed=11, rank=rank, world_size=world_size)
            mapped = SeedSchedule(given, batch_size, seed=11, rank=rank, world_size=world_size,
                                  shared=shared)
            for epoch in range(3):
                expected = old_steps(seed_nodes, batch_size, 11, rank, world_size, epoch)
                assert local.steps_per_epoch == len(expected)
                for batch, (seeds, rng_seed) in enumerate(expected):
                    step = epoch * len(expected) + batch
                    for schedule in (local, mapped):
                        got, got_seed = schedule.step(step)
                        assert got.dtype == np.int64 and np.array_equal(got, seeds)
                        assert got_seed == rng_seed


def test_the_shared_order_is_numpy_s_permutation_and_old_epochs_are_dropped(tmp_path) -> None:
    with SharedArrays.open("test", root=tmp_path) as shared:
        for epoch in range(4):
            order = shared.permutation(100_003, 9, epoch)
            expected = np.random.default_rng(np.random.SeedSequence([9, epoch, 0x5EED]))
            assert np.array_equal(order, expected.permutation(100_003))
            assert not order.flags.writeable
        names = sorted(p.name for p in shared.directory.glob("perm-*"))
        assert names == ["perm-100003-9-2.npy", "perm-100003-9-3.npy"]


def dataset_bytes(store: GraphStore, num_workers: int = 2) -> int:
    """Bytes of the dataset a training loader pickles into each of its workers."""
    config = SamplingConfig(fanouts=[3, 3], batch_size=16, num_workers=num_workers)
    schedule = SeedSchedule.for_store(store, config, seed=1)
    loader = BatchLoader(store, config, schedule, independent_views=False)
    return len(pickle.dumps(loader_module._StepBatches(loader)))


def test_a_worker_s_dataset_does_not_grow_with_the_graph(tmp_path) -> None:
    small = random_store(tmp_path / "small", 1_000)
    large = random_store(tmp_path / "large", 100_000)
    # Only the store's path differs ("small" / "large"): not 800 kB of seed ids.
    assert abs(dataset_bytes(large) - dataset_bytes(small)) < 64


def test_a_worker_item_holds_only_its_step_s_seeds(store) -> None:
    config = SamplingConfig(fanouts=[3], batch_size=16)
    schedule = SeedSchedule.for_store(store, config, seed=1)
    item = next(iter(loader_module._StepOrder(schedule, 5, 6)))
    assert item.step == 5 and len(item.seeds) == 16
    assert np.array_equal(item.seeds, schedule.step(5)[0])
    assert len(pickle.dumps(item)) < 1024


def test_mapped_degrees_are_the_store_s_degrees(tmp_path, store) -> None:
    with SharedArrays.open("test", root=tmp_path) as shared:
        files = shared.degree_files(store)
        out_degree, in_degree = map_degrees(files, store.num_nodes)
        assert in_degree.dtype == torch.float32
        assert np.array_equal(in_degree.numpy(), store.in_degrees())
        assert np.array_equal(out_degree.numpy(), store.out_degrees())
        counted = NeighborBatchSampler(store, [3, 3], graph_degrees=True)
        mapped = NeighborBatchSampler(store, [3, 3], graph_degrees=True,
                                      degrees=(out_degree, in_degree))
        seeds = torch.arange(0, 60, dtype=torch.int64)
        for a, b in zip(counted.view(seeds, 4).adjs, mapped.view(seeds, 4).adjs):
            assert torch.equal(a.src_degree, b.src_degree)
            assert torch.equal(a.dst_degree, b.dst_degree)


def mapped_by(pid: int | str, directory: Path) -> list[str]:
    """The lines of /proc/PID/maps that map files of ``directory``."""
    try:
        lines = Path(f"/proc/{pid}/maps").read_text().splitlines()
    except OSError:
        return []
    return [line for line in lines if str(directory) + "/" in line]


def test_workers_map_the_shared_files_read_only_and_the_owner_removes_them(tmp_path,
                                                                            store) -> None:
    config = SamplingConfig(fanouts=[3, 3], batch_size=16, num_workers=1)
    schedule = SeedSchedule.for_store(store, config, seed=1)
    shared = SharedArrays.open("run", root=tmp_path)
    directory = shared.directory
    loader = BatchLoader(store, config, schedule, independent_views=False, shared=shared)
    batches = loader.batches(0, 4)
    next(batches)
    names = sorted(p.name for p in directory.iterdir())
    assert names == ["in_degree.npy", "meta.json", "out_degree.npy", "perm-300-1-0.npy"]
    assert all(p.stat().st_mode & 0o777 == 0o600 for p in directory.iterdir())
    assert directory.stat().st_mode & 0o777 == 0o700
    # The training process maps the order; the worker (another process) the degrees.
    assert any("perm-300-1-0.npy" in line for line in mapped_by("self", directory))
    workers = [pid for pid in map(int, filter(str.isdigit, os.listdir("/proc")))
               if pid != os.getpid() and mapped_by(pid, directory)]
    assert workers
    worker_maps = mapped_by(workers[0], directory)
    assert any("in_degree.npy" in line for line in worker_maps)
    assert not any("perm-" in line for line in worker_maps)
    assert all(line.split()[1][1] == "-" for line in worker_maps)  # no write permission
    assert len(list(batches)) == 3
    shared.close()
    assert not directory.exists()


def test_a_non_owner_leaves_the_directory_to_its_owner(tmp_path) -> None:
    owner = SharedArrays.open("run", root=tmp_path)
    other = SharedArrays.open("run", root=tmp_path)
    assert owner.owner and not other.owner and other.directory == owner.directory
    other.permutation(50, 1, 0)
    other.close()
    assert owner.directory.exists()
    owner.close()
    assert not owner.directory.exists()


KILLED = """
import os, signal, sys
from pathlib import Path
from bgrl_dgl.loading.shared_arrays import SharedArrays
shared = SharedArrays.open("killed", root=Path(sys.argv[1]))
shared.permutation(1000, 1, 0)
(shared.directory / ".tmp-{pid}@{host}@perm-1000-1-1.npy".format(
    pid=os.getpid(), host=os.uname().nodename)).write_bytes(b"half")
print(shared.directory, flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_the_files_of_a_killed_run_are_removed_by_the_next_run(tmp_path) -> None:
    done = subprocess.run([sys.executable, "-c", KILLED, str(tmp_path)], cwd=REPO,
                          capture_output=True, text=True, env={**os.environ,
                                                               "PYTHONPATH": str(REPO)})
    assert done.returncode == -signal.SIGKILL, done.stderr
    left = Path(done.stdout.strip())
    assert (left / "perm-1000-1-0.npy").exists()
    with SharedArrays.open("next", root=tmp_path) as shared:
        assert not left.exists()
        assert shared.directory.exists()
    assert not any(p.name.startswith(user_prefix()) for p in tmp_path.iterdir())


def test_a_link_or_a_shared_directory_under_the_name_is_refused(tmp_path) -> None:
    target = tmp_path / "elsewhere"
    target.mkdir()
    (tmp_path / f"{user_prefix()}linked").symlink_to(target)
    with pytest.raises(InputError, match="symbolic link"):
        SharedArrays.open("linked", root=tmp_path)
    open_to_all = tmp_path / f"{user_prefix()}open"
    open_to_all.mkdir(mode=0o777)
    os.chmod(open_to_all, 0o777)
    with pytest.raises(InputError, match="lets other users write"):
        SharedArrays.open("open", root=tmp_path)


def test_training_leaves_no_shared_files_behind(tmp_path, monkeypatch, store) -> None:
    monkeypatch.setattr(shared_arrays, "default_cache_root", lambda: tmp_path / "shm")
    (tmp_path / "shm").mkdir()
    seen: list[list[str]] = []
    permutation = SharedArrays.permutation

    def watched(self, *args, **kwargs):
        seen.append(sorted(p.name for p in self.directory.iterdir()))
        return permutation(self, *args, **kwargs)

    monkeypatch.setattr(SharedArrays, "permutation", watched)
    assert main(["train", "--data", str(store.path), "--out", str(tmp_path / "run"),
                 "--hidden", "8,8", "--fanouts", "3,3", "--batch-size", "32", "--steps", "12",
                 "--num-workers", "1", "--device", "cpu"]) == 0
    assert seen and "in_degree.npy" in seen[0]
    assert list((tmp_path / "shm").iterdir()) == []


def test_seed_ids_from_a_file_are_mapped_from_one_copy_and_splits_from_the_store(
        tmp_path, store) -> None:
    ids_file = tmp_path / "seeds.npy"
    np.save(ids_file, np.arange(0, 300, 2, dtype=np.int64)[::-1])
    (tmp_path / "shm").mkdir()
    with SharedArrays.open("run", root=tmp_path / "shm") as shared:
        for spec, mapped_from in ((str(ids_file), shared.directory),
                                  ("split:train", store.path)):
            config = SamplingConfig(fanouts=[3], batch_size=16, seeds=spec)
            schedule = SeedSchedule.for_store(store, config, seed=3)
            expected = [schedule.step(step)[0] for step in range(12)]
            loader = BatchLoader(store, config, schedule, independent_views=False, shared=shared)
            assert isinstance(loader.schedule.seed_nodes, np.memmap)
            assert Path(loader.schedule.seed_nodes.filename).parent == mapped_from.resolve()
            assert all(np.array_equal(schedule.step(step)[0], seeds)
                       for step, seeds in enumerate(expected))


def test_train_refuses_a_planted_link_before_writing_anything(tmp_path, monkeypatch, store,
                                                              capsys) -> None:
    monkeypatch.setattr(shared_arrays, "default_cache_root", lambda: tmp_path)
    run = tmp_path / "run"
    planted = shared_arrays.shared_directory(store, run)
    (tmp_path / "elsewhere").mkdir()
    planted.symlink_to(tmp_path / "elsewhere")
    assert main(["train", "--data", str(store.path), "--out", str(run), "--steps", "2",
                 "--num-workers", "0", "--device", "cpu"]) == 2
    assert f"error: {planted}: " in capsys.readouterr().err
    assert not run.exists()
    assert planted.is_symlink() and list((tmp_path / "elsewhere").iterdir()) == []
