"""A trainer is freed as soon as its last reference goes.

Under torchrun the trainer's DDP branch holds the process group; a trainer kept alive by a
reference cycle would free the group only at interpreter shutdown, where gloo's threads abort
the process ("terminate called without an active exception") after a successful run.
"""
from __future__ import annotations

import gc
import weakref
from pathlib import Path

import pytest
import torch

from bgrl_dgl.store.reader import GraphStore
from bgrl_dgl.training.config import TrainConfig
from bgrl_dgl.training.trainer import batch_loader, build_trainer


@pytest.fixture
def without_cycle_collector():
    enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def test_a_trained_trainer_is_freed_by_reference_counting(planted_store: Path, tmp_path: Path,
                                                          without_cycle_collector) -> None:
    config = TrainConfig.defaults()
    config.optim.max_steps = 2
    config.sampling.num_workers = 0
    config.sampling.batch_size = 32
    store = GraphStore.open(planted_store)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    trainer, schedule = build_trainer(config, store, run_dir, torch.device("cpu"))
    metrics = trainer.fit(batch_loader(config, store, schedule, torch.device("cpu")))
    assert trainer.step == 2 and metrics
    alive = [weakref.ref(trainer), weakref.ref(trainer.model), weakref.ref(trainer.scheduler)]
    del trainer
    assert [ref() is None for ref in alive] == [True, True, True]
