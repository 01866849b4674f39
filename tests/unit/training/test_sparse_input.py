"""--sparse-input: which stores get sparse rows, the batches that carry them, and training
on them end to end (train, embed, evaluate), with the weights of the dense path."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from bgrl_dgl.cli import main
from bgrl_dgl.loading.features import feature_density, use_sparse_rows
from bgrl_dgl.loading.sampler import NeighborBatchSampler
from bgrl_dgl.model.sparse import SparseRows
from bgrl_dgl.store.reader import GraphStore
from bgrl_dgl.training.config import TrainConfig
from bgrl_dgl.training.trainer import batch_loader, build_trainer

from helpers import write_test_store

NUM_NODES, WIDTH = 400, 512


def graph(seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    src = rng.integers(0, NUM_NODES, 3000)
    dst = rng.integers(0, NUM_NODES, 3000)
    return np.concatenate([src, dst]), np.concatenate([dst, src])


@pytest.fixture(scope="module")
def sparse_store(tmp_path_factory) -> Path:
    """400 nodes, 512-d binary float16 features with ~2% ones, 4 classes in the features."""
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, NUM_NODES)
    profile = rng.random((4, WIDTH)) < 0.03
    noise = rng.random((NUM_NODES, WIDTH)) < 0.005
    features = (profile[labels] & (rng.random((NUM_NODES, WIDTH)) < 0.6)) | noise
    src, dst = graph(1)
    out = tmp_path_factory.mktemp("sparse") / "store"
    write_test_store(out, NUM_NODES, src, dst, features.astype(np.float16),
                     feature_dtype="float16", labels=labels)
    return out


@pytest.fixture(scope="module")
def dense_store(tmp_path_factory) -> Path:
    """The same graph with dense 512-d Gaussian features."""
    src, dst = graph(1)
    features = np.random.default_rng(2).standard_normal((NUM_NODES, WIDTH)).astype(np.float32)
    out = tmp_path_factory.mktemp("dense") / "store"
    write_test_store(out, NUM_NODES, src, dst, features)
    return out


def test_auto_picks_sparse_rows_for_a_wide_sparse_store_only(sparse_store: Path,
                                                             dense_store: Path) -> None:
    sparse, dense = GraphStore.open(sparse_store).features, GraphStore.open(dense_store).features
    assert 0.005 < feature_density(sparse) < 0.05 and feature_density(dense) == 1.0
    assert feature_density(sparse) == feature_density(sparse)  # the same sample every time
    assert use_sparse_rows("auto", sparse) and not use_sparse_rows("auto", dense)
    assert not use_sparse_rows("auto", sparse[:, :64])  # too narrow to pay
    assert use_sparse_rows("on", dense) and not use_sparse_rows("off", sparse)
    with pytest.raises(ValueError, match="auto, on or off"):
        use_sparse_rows("yes", sparse)


def test_sampled_views_carry_the_non_zeros_of_the_dense_rows(sparse_store: Path) -> None:
    store = GraphStore.open(sparse_store)
    seeds = torch.arange(0, NUM_NODES, 7)
    dense = NeighborBatchSampler(store, [5, 5], True).view(seeds, 3)
    sparse = NeighborBatchSampler(store, [5, 5], True, sparse_rows=True).view(seeds, 3)
    assert isinstance(sparse.features, SparseRows) and sparse.features.unit_values
    assert torch.equal(sparse.input_nodes, dense.input_nodes)
    assert torch.equal(sparse.features.to_dense(), dense.features)
    moved = sparse.to("cpu")
    assert moved.features.dtype == torch.float32
    assert torch.equal(moved.features.to_dense(), dense.features.float())


def short_run(store: Path, run_dir: Path, sparse_input: str, steps: int, workers: int = 0):
    config = TrainConfig.defaults()
    config.sampling.sparse_input = sparse_input
    config.sampling.batch_size = 64
    config.sampling.fanouts = [5, 5]
    config.sampling.num_workers = workers
    config.model.hidden = [32, 16]
    config.model.predictor_hidden = 32
    config.optim.max_steps = steps
    config.run.threads = 1
    run_dir.mkdir()
    store_ = GraphStore.open(store)
    trainer, schedule = build_trainer(config, store_, run_dir, torch.device("cpu"))
    loader = batch_loader(config, store_, schedule, torch.device("cpu"))
    metrics = trainer.fit(loader)
    return trainer, loader, metrics


def test_a_few_sparse_steps_give_the_weights_of_the_dense_path(sparse_store: Path,
                                                               tmp_path: Path) -> None:
    dense, dense_loader, _ = short_run(sparse_store, tmp_path / "dense", "off", 4)
    sparse, sparse_loader, metrics = short_run(sparse_store, tmp_path / "sparse", "auto", 4,
                                               workers=1)
    assert not dense_loader.sparse_rows and sparse_loader.sparse_rows
    assert metrics["step"] == 4 and np.isfinite(metrics["loss"])
    initial = build_trainer_weights(sparse_store, tmp_path / "initial")
    dense_state, sparse_state = dense.model.state_dict(), sparse.model.state_dict()
    moved = [k for k in initial if initial[k].is_floating_point()
             and not torch.allclose(initial[k], dense_state[k])]
    assert moved  # training changed the weights, so equal weights mean equal steps
    # A convolution's bias followed by batch normalisation has a gradient of zero but for
    # rounding, which AdamW turns into steps of ~lr either way: those biases, and the running
    # means that carry them, follow rounding; the layer's output does not depend on them.
    free = {name for name in dense_state if name.endswith(("bias", "running_mean"))
            and (".convs." in name or ".norms." in name and "running_mean" in name)}
    assert len(free) == 8
    for name, value in dense_state.items():
        if name in free:
            continue
        if value.is_floating_point():
            torch.testing.assert_close(sparse_state[name], value, rtol=1e-4, atol=1e-5,
                                       msg=name)
        else:
            assert torch.equal(sparse_state[name], value), name


def build_trainer_weights(store: Path, run_dir: Path) -> dict[str, torch.Tensor]:
    run_dir.mkdir()
    config = TrainConfig.defaults()
    config.model.hidden = [32, 16]
    config.model.predictor_hidden = 32
    config.sampling.fanouts = [5, 5]
    trainer, _ = build_trainer(config, GraphStore.open(store), run_dir, torch.device("cpu"))
    return {k: v.clone() for k, v in trainer.model.state_dict().items()}


def test_train_embed_and_evaluate_on_a_sparse_store(sparse_store: Path, tmp_path: Path,
                                                    capsys) -> None:
    run = tmp_path / "run"
    tiny = ["--hidden", "32,16", "--predictor-hidden", "32", "--fanouts", "5,5",
            "--batch-size", "64", "--num-workers", "1", "--threads", "1", "--device", "cpu"]
    assert main(["train", "--data", str(sparse_store), "--out", str(run), *tiny,
                 "--max-steps", "30", "--lr", "0.005", "--mask-mode", "element"]) == 0
    assert (run / "config.yaml").read_text().count("sparse_input: auto") == 1
    for fanouts in ([], ["--fanouts", "5,5"]):
        out = tmp_path / f"embeddings{len(fanouts)}"
        assert main(["embed", "--run", str(run), "--out", str(out), "--device", "cpu",
                     *fanouts]) == 0
        assert any(out.iterdir())
    capsys.readouterr()
    assert main(["evaluate", "--run", str(run), "--splits", "random", "--num-splits", "2",
                 "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert 0.4 < result["test_acc_mean"] <= 1.0  # 4 classes: chance is 0.25
