"""Checkpoints: atomic save, pruning, safe loading, and RNG capture/restore."""
from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from bgrl_dgl.errors import InputError
from bgrl_dgl.training.checkpoint import (
    capture_rng,
    latest_checkpoint,
    load_checkpoint,
    restore_rng,
    save_checkpoint,
)


class NotPlainData:
    """An arbitrary object: pickled by torch.save, refused by a weights-only load."""

    def __init__(self) -> None:
        self.payload = 42


def draws() -> tuple[float, float, torch.Tensor]:
    return random.random(), float(np.random.rand()), torch.rand(4)


def trained_model_and_optimizer(seed: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    model(torch.randn(8, 5)).square().sum().backward()
    optimizer.step()
    return model, optimizer


def files_in(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_round_trip_restores_model_optimizer_and_rng(tmp_path: Path) -> None:
    model, optimizer = trained_model_and_optimizer(seed=0)
    rng = capture_rng()
    expected_draws = draws()
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "rng": rng,
             "step": 7, "config": {"lr": 1e-2, "hidden": [4]}}
    path = save_checkpoint(tmp_path, state, step=7)
    assert path == tmp_path / "checkpoints" / "step-00000007.pt"

    draws()  # advance every generator past the captured point
    loaded = load_checkpoint(path)
    restore_rng(loaded["rng"])
    after_restore = draws()
    assert after_restore[:2] == expected_draws[:2]
    assert torch.equal(after_restore[2], expected_draws[2])

    other_model, other_optimizer = trained_model_and_optimizer(seed=1)
    other_model.load_state_dict(loaded["model"])
    other_optimizer.load_state_dict(loaded["optimizer"])
    for name, tensor in model.state_dict().items():
        assert torch.equal(other_model.state_dict()[name], tensor), name
    restored_state = other_optimizer.state_dict()["state"]
    for index, slots in optimizer.state_dict()["state"].items():
        for slot, value in slots.items():
            assert torch.equal(restored_state[index][slot], value), (index, slot)
    assert loaded["step"] == 7 and loaded["config"] == {"lr": 1e-2, "hidden": [4]}


def test_rng_state_is_plain_data() -> None:
    rng = capture_rng()

    def check(value: object) -> None:
        if isinstance(value, (list, tuple)):
            for item in value:
                check(item)
        elif isinstance(value, dict):
            for item in value.values():
                check(item)
        else:
            assert value is None or isinstance(value, (torch.Tensor, int, float, str)), type(value)

    check(rng)
    assert {"python", "numpy", "torch"} <= set(rng)


def test_save_leaves_no_temp_files(tmp_path: Path) -> None:
    save_checkpoint(tmp_path, {"w": torch.ones(3)}, step=1)
    assert files_in(tmp_path / "checkpoints") == ["step-00000001.pt"]


def test_failed_save_leaves_nothing_behind(tmp_path: Path) -> None:
    with pytest.raises(Exception):
        save_checkpoint(tmp_path, {"unpicklable": lambda: None}, step=3)
    assert files_in(tmp_path / "checkpoints") == []
    assert latest_checkpoint(tmp_path) is None


def test_pruning_keeps_newest(tmp_path: Path) -> None:
    for step in (10, 2, 30, 4, 50):
        save_checkpoint(tmp_path, {"step": step}, step=step, keep=3)
    assert files_in(tmp_path / "checkpoints") == [
        "step-00000010.pt", "step-00000030.pt", "step-00000050.pt"]
    latest = latest_checkpoint(tmp_path)
    assert latest == tmp_path / "checkpoints" / "step-00000050.pt"
    assert load_checkpoint(latest)["step"] == 50


def test_latest_ignores_foreign_files_and_orders_by_step(tmp_path: Path) -> None:
    assert latest_checkpoint(tmp_path) is None
    save_checkpoint(tmp_path, {}, step=99_999_999, keep=5)
    save_checkpoint(tmp_path, {}, step=100_000_000, keep=5)
    (tmp_path / "checkpoints" / "step-99999999.pt.bak").write_bytes(b"")
    (tmp_path / "checkpoints" / "notes.txt").write_text("x")
    assert latest_checkpoint(tmp_path).name == "step-100000000.pt"


def test_keep_must_be_positive(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        save_checkpoint(tmp_path, {}, step=1, keep=0)


def test_truncated_checkpoint_is_input_error(tmp_path: Path) -> None:
    path = save_checkpoint(tmp_path, {"w": torch.randn(1000)}, step=1)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError) as caught:
        load_checkpoint(path)
    assert caught.value.path == str(path)
    assert "corrupt" in caught.value.problem


def test_garbage_file_is_input_error(tmp_path: Path) -> None:
    path = tmp_path / "step-00000001.pt"
    path.write_bytes(b"this is not a checkpoint at all")
    with pytest.raises(InputError, match="corrupt"):
        load_checkpoint(path)


def test_missing_checkpoint_is_input_error(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="not found"):
        load_checkpoint(tmp_path / "nope.pt")


def test_arbitrary_object_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "evil.pt"
    torch.save({"model": {"w": torch.ones(2)}, "extra": NotPlainData()}, path)
    with pytest.raises(InputError) as caught:
        load_checkpoint(path)
    assert caught.value.path == str(path)
    assert "refusing" in caught.value.problem


def test_non_mapping_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "list.pt"
    torch.save([torch.ones(2)], path)
    with pytest.raises(InputError, match="expected a mapping"):
        load_checkpoint(path)
