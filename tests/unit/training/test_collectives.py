"""The collectives of bgrl_dgl.training.distributed in a one-process gloo group: objects
travel as tensors, and the tensors of the latest collectives stay referenced until the
group is destroyed (a gloo worker thread must never free a tensor made in Python while the
group is being destroyed: it would wait for the interpreter lock that the destroying thread
holds)."""
from __future__ import annotations

import socket
import weakref
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from bgrl_dgl.training import distributed
from bgrl_dgl.training.distributed import (
    KEPT_COLLECTIVES,
    broadcast_object,
    destroy_process_group,
    gather_objects,
    sum_across_ranks,
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def group():
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0,
                            world_size=1)
    try:
        yield
    finally:
        if dist.is_initialized():
            destroy_process_group()


def test_objects_with_tensors_travel_through_the_group(group) -> None:
    value = {"step": 3, "rng": torch.arange(5), "name": "x", "nested": [1.5, None, (2, "y")]}
    gathered = gather_objects(value)
    assert len(gathered) == 1
    assert gathered[0]["step"] == 3 and torch.equal(gathered[0]["rng"], torch.arange(5))
    assert gathered[0]["nested"] == [1.5, None, (2, "y")]
    assert broadcast_object(value) is value  # the source keeps its own object


def test_only_plain_data_and_tensors_are_read_back(group) -> None:
    with pytest.raises(Exception, match="Weights only load failed"):
        gather_objects(Path("picklable/but/not/plain"))


def test_collective_tensors_live_until_the_group_is_destroyed(group) -> None:
    sum_across_ranks([1.0, 2.0], torch.device("cpu"))
    gather_objects({"a": 1})
    kept = [weakref.ref(t) for entry in distributed._COLLECTIVE_TENSORS for t in entry]
    assert len(kept) == 1 + 4  # the sum; the gather's size, sizes, padded and gathered
    assert all(ref() is not None for ref in kept)
    destroy_process_group()
    assert not dist.is_initialized()
    assert all(ref() is None for ref in kept)


def test_only_the_latest_collectives_are_kept(group) -> None:
    for _ in range(KEPT_COLLECTIVES + 10):
        sum_across_ranks([1.0], torch.device("cpu"))
    assert len(distributed._COLLECTIVE_TENSORS) == KEPT_COLLECTIVES


def test_without_a_group_values_pass_through() -> None:
    assert not dist.is_initialized()
    value = object()
    assert broadcast_object(value) is value and gather_objects(value) == [value]
    assert sum_across_ranks([1, 2], torch.device("cpu")) == [1.0, 2.0]
