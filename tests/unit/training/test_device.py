"""Which device a process runs on: ``--device auto`` falls back to the CPU when the machine
has fewer GPUs than processes; ``cuda`` is the local rank's GPU, made the current one.

GPUs are simulated by replacing torch's device queries, so these tests run anywhere."""
from __future__ import annotations

import pytest
import torch

from bgrl_dgl.errors import InputError
from bgrl_dgl.training.distributed import World, auto_device, process_device


class FakeGPUs(list):
    """The devices made current through ``torch.cuda.set_device``; ``count``: how many
    GPUs the machine seems to have."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0


@pytest.fixture
def gpus(monkeypatch) -> FakeGPUs:
    """torch's view of the GPUs, replaced by a :class:`FakeGPUs` (none until set)."""
    fake = FakeGPUs()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: fake.count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: fake.count)
    monkeypatch.setattr(torch.cuda, "set_device", fake.append)
    return fake


def local_world(local_rank: int, local_world_size: int) -> World:
    return World(rank=local_rank, world_size=local_world_size, local_rank=local_rank,
                 local_world_size=local_world_size)


def test_auto_is_the_local_ranks_gpu_when_every_process_has_one(gpus, capsys) -> None:
    gpus.count = 2
    assert process_device("auto", local_world(1, 2)) == torch.device("cuda", 1)
    assert gpus == [torch.device("cuda", 1)]  # made the current device
    assert process_device("auto", World()) == torch.device("cuda", 0)
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("count", [1, 3])
def test_auto_falls_back_to_the_cpu_with_fewer_gpus_than_processes(gpus, capsys,
                                                                   count: int) -> None:
    gpus.count = count
    devices = [process_device("auto", local_world(r, count + 1)) for r in range(count + 1)]
    assert devices == [torch.device("cpu")] * (count + 1)
    assert gpus == []  # no GPU made current
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == count + 1  # one line per process
    assert lines[0] == (f"warning: --device auto: {count + 1} processes on this machine but "
                        f"{count} GPU(s); running on the CPU")


def test_auto_without_gpus_is_the_cpu_without_a_warning(gpus, capsys) -> None:
    gpus.count = 0
    assert auto_device(local_world(0, 4)) == "cpu"
    assert process_device("auto", World()) == torch.device("cpu")
    assert capsys.readouterr().err == ""


def test_cuda_is_never_replaced_by_the_cpu(gpus) -> None:
    gpus.count = 1
    assert process_device("cuda", local_world(0, 2)) == torch.device("cuda", 0)
    with pytest.raises(InputError, match="local rank 1 has no GPU: this machine has 1"):
        process_device("cuda", local_world(1, 2))
    gpus.count = 0
    with pytest.raises(InputError, match="no CUDA device is available"):
        process_device("cuda", World())


def test_cpu_is_the_cpu_whatever_the_gpus(gpus) -> None:
    gpus.count = 8
    assert process_device("cpu", local_world(3, 8)) == torch.device("cpu")
    assert gpus == []
