"""The model, the BGRL step, the EMA update, checkpoints and ``embed`` on CUDA, each compared
with the same computation on the CPU.

Every test takes a ``device``: its ``cuda`` case (marked ``cuda``, selected by
``pytest -m cuda``) is skipped, with the reason, where no GPU is present; its ``cpu`` case
runs the same comparison CPU against CPU, so the test code itself runs everywhere (and there
must match exactly). Float32 results must agree within 1e-4; TF32 matrix products are
switched off for the comparison.
"""
from __future__ import annotations

import copy
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow.dataset as ds
import pytest
import torch

from bgrl_dgl import config as cfg
from bgrl_dgl.cli import main
from bgrl_dgl.loading.sampler import SampledBatch
from bgrl_dgl.model.adjacency import Adjacency
from bgrl_dgl.model.bgrl import build_model
from bgrl_dgl.model.encoder import Encoder, ModelConfig, make_conv
from bgrl_dgl.store.reader import GraphStore
from bgrl_dgl.training.checkpoint import checkpoint_path, latest_checkpoint
from bgrl_dgl.training.config import TrainConfig
from bgrl_dgl.training.distributed import World, process_device
from bgrl_dgl.training.trainer import Trainer, batch_loader, build_trainer

NO_CUDA = "no CUDA device: torch.cuda.is_available() is False"
DEVICES = [
    pytest.param("cpu", id="cpu"),
    pytest.param("cuda", id="cuda",
                 marks=[pytest.mark.cuda,
                        pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA)]),
]
TOLERANCE = {"rtol": 1e-4, "atol": 1e-4}
NUM_NODES, FEAT_DIM = 600, 16
# The first steps' learning rate (AdamW, linear warm-up): lr x (step + 1) / warm-up steps.
# Adam's first steps move every weight by about the learning rate whatever the size of its
# gradient, so a weight whose gradient is rounding noise (a bias before batch norm) moves
# by up to that much in either direction on either device; 1e-6 keeps that far below the
# tolerance. The gradients and the optimizer's moments carry the comparison instead.
STEP_LR, STEP_WARMUP = ["--lr", "1e-3"], ["--warmup-steps", "1000"]


@pytest.fixture(autouse=True)
def full_precision_matmul() -> Iterator[None]:
    """Float32 products in full precision on the GPU (no TF32), restored afterwards."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def on(device: str) -> torch.device:
    """The test's device as the package picks it (``cuda``: GPU 0, made current)."""
    return process_device(device, World())


def assert_close_on_cpu(actual: torch.Tensor, expected: torch.Tensor, name: str = "",
                        **tolerance: float) -> None:
    """``actual`` (any device) equals the CPU tensor ``expected`` within the tolerance."""
    torch.testing.assert_close(actual.detach().cpu(), expected.detach(),
                               **(tolerance or TOLERANCE), msg=lambda m: f"{name}: {m}")


# ---- layers and encoder ----------------------------------------------------------------
def random_block(num_src: int = 400, num_dst: int = 64, max_in: int = 30,
                 seed: int = 0) -> Adjacency:
    """A sampled-block-like CSC: destinations are the first sources, a few have no in-edges,
    some edges repeat; whole-graph degrees attached."""
    generator = torch.Generator().manual_seed(seed)
    counts = torch.randint(0, max_in, (num_dst,), generator=generator)
    counts[:3] = 0
    indptr = torch.zeros(num_dst + 1, dtype=torch.long)
    torch.cumsum(counts, 0, out=indptr[1:])
    indices = torch.randint(0, num_src, (int(indptr[-1]),), generator=generator)
    src_degree = torch.randint(1, 60, (num_src,), generator=generator).float()
    dst_degree = counts.float() + torch.randint(0, 5, (num_dst,), generator=generator)
    return Adjacency(indptr, indices, num_src, src_degree=src_degree, dst_degree=dst_degree)


def forward_backward(module: torch.nn.Module, adjs: list[Adjacency] | Adjacency,
                     x: torch.Tensor, scale: torch.Tensor | None, weights: torch.Tensor,
                     ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``module(adjs, x, scale)`` and the gradients of ``sum(out * weights)`` with respect to
    ``x`` (name ``"x"``) and every parameter."""
    x = x.clone().requires_grad_(True)
    module.zero_grad(set_to_none=True)
    out = module(adjs, x, scale)
    (out * weights).sum().backward()
    grads = {"x": x.grad}
    grads.update({name: param.grad for name, param in module.named_parameters()})
    return out.detach(), grads


def compare_on_device(module: torch.nn.Module, adjs: list[Adjacency] | Adjacency,
                      x: torch.Tensor, scale: torch.Tensor | None, device: str) -> None:
    """Forward and backward of ``module`` on the CPU and of a copy of it on ``device``."""
    target = on(device)
    out_rows = adjs[-1].num_dst if isinstance(adjs, list) else adjs.num_dst
    out_dim = module.out_dim
    weights = torch.randn(out_rows, out_dim, generator=torch.Generator().manual_seed(9))
    cpu_out, cpu_grads = forward_backward(module, adjs, x, scale, weights)
    moved = copy.deepcopy(module).to(target)
    moved_adjs = ([adj.to(target) for adj in adjs] if isinstance(adjs, list)
                  else adjs.to(target))
    out, grads = forward_backward(moved, moved_adjs, x.to(target),
                                  None if scale is None else scale.to(target),
                                  weights.to(target))
    assert out.device.type == target.type and out.shape == cpu_out.shape
    assert_close_on_cpu(out, cpu_out, "output")
    assert grads.keys() == cpu_grads.keys()
    for name, grad in cpu_grads.items():
        assert grad is not None and grads[name] is not None, name
        assert_close_on_cpu(grads[name], grad, f"gradient of {name}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("conv, degrees", [("gcn", True), ("gcn", False), ("sage", False),
                                           ("gat", False)])
@pytest.mark.parametrize("out_dim", [8, 48])  # narrower and wider than the input
@pytest.mark.parametrize("column_mask", [False, True])
def test_layer_forward_and_backward_match_the_cpu(device: str, conv: str, degrees: bool,
                                                  out_dim: int, column_mask: bool) -> None:
    in_dim = 24
    adj = random_block()
    if not degrees:
        adj = adj.with_degrees(None, None)
    torch.manual_seed(1)
    layer = make_conv(ModelConfig(conv=conv, hidden=[out_dim], heads=4), in_dim, out_dim)
    for param in layer.parameters():  # biases start at 0: make every term count
        torch.nn.init.uniform_(param, -0.5, 0.5)
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(adj.num_src, in_dim, generator=generator)
    scale = (torch.rand(in_dim, generator=generator) > 0.4).float() if column_mask else None
    compare_on_device(layer, adj, x, scale, device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("conv", ["gcn", "sage", "gat"])
def test_encoder_with_batch_norm_matches_the_cpu(device: str, conv: str) -> None:
    first = random_block(num_src=500, num_dst=120, seed=3)
    second = random_block(num_src=120, num_dst=32, seed=4)
    torch.manual_seed(5)
    encoder = Encoder(FEAT_DIM, ModelConfig(conv=conv, hidden=[32, 16], norm="batch"))
    generator = torch.Generator().manual_seed(6)
    x = torch.randn(first.num_src, FEAT_DIM, generator=generator)
    keep = torch.rand(FEAT_DIM, generator=generator) > 0.5
    compare_on_device(encoder, [first, second], x, keep, device)


# ---- one BGRL step -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def half_store(tmp_path_factory) -> Path:
    """A planted-class graph with float16 features (converted to float32 on the GPU)."""
    out = tmp_path_factory.mktemp("cuda") / "store"
    assert main(["prepare", "synthetic", "--out", str(out), "--num-nodes", str(NUM_NODES),
                 "--avg-degree", "6", "--feat-dim", str(FEAT_DIM), "--num-classes", "4",
                 "--feature-dtype", "float16"]) == 0
    return out


def step_config(device: str, conv: str, num_workers: int) -> TrainConfig:
    return cfg.from_sections(TrainConfig, {
        "sampling": {"fanouts": [5, 5], "batch_size": 128, "num_workers": num_workers},
        "model": {"conv": conv, "hidden": [32, 16], "predictor_hidden": 32},
        "optim": {"max_steps": 4, "lr": 1e-3, "warmup_steps": 1000},
        "run": {"seed": 0, "device": device, "threads": torch.get_num_threads()},
    }, source="test")


def optimizer_moments(trainer: Trainer) -> dict[str, torch.Tensor]:
    """AdamW's moments of every trainable parameter, by parameter name."""
    names = {id(p): n for n, p in trainer.model.named_parameters()}
    return {f"{names[id(p)]}.{key}": state[key]
            for p, state in trainer.optimizer.state.items() for key in ("exp_avg", "exp_avg_sq")}


def assert_same_batch(batch: SampledBatch, reference: SampledBatch) -> None:
    assert torch.equal(batch.seeds, reference.seeds)
    for view, ref in zip(batch.views, reference.views):
        assert torch.equal(view.features.float(), ref.features.float())
        for adj, ref_adj in zip(view.adjs, ref.adjs):
            assert torch.equal(adj.indptr, ref_adj.indptr)
            assert torch.equal(adj.indices, ref_adj.indices)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("conv", ["gcn", "sage", "gat"])
def test_bgrl_steps_match_cpu_steps_from_the_same_weights_and_batches(
        device: str, conv: str, half_store: Path, tmp_path: Path) -> None:
    """Two training steps (augmentation, two forwards, backward, AdamW, batch-norm
    statistics, EMA) on ``device`` and on the CPU. The device's batches come from a
    sampling worker (pinned float16 features on CUDA), the CPU's from this process."""
    store = GraphStore.open(half_store)
    reference_config, config = step_config("cpu", conv, 0), step_config(device, conv, 1)
    reference, reference_schedule = build_trainer(reference_config, store, tmp_path / "cpu",
                                                  on("cpu"))
    trainer, schedule = build_trainer(config, store, tmp_path / device, on(device))
    for name, tensor in reference.model.state_dict().items():
        assert torch.equal(trainer.model.state_dict()[name].cpu(), tensor), name
    steps = 2
    reference_batches = list(batch_loader(reference_config, store, reference_schedule,
                                          on("cpu")).batches(0, steps))
    batches = list(batch_loader(config, store, schedule, on(device)).batches(0, steps))
    if device == "cuda":
        assert batches[0].views[0].features.is_pinned()
        assert batches[0].views[0].features.dtype == torch.float16
    for batch, reference_batch in zip(batches, reference_batches):
        assert_same_batch(batch, reference_batch)
        metrics, expected = trainer.train_step(batch), reference.train_step(reference_batch)
        assert metrics["loss"] == pytest.approx(expected["loss"], rel=1e-4, abs=1e-5)
        assert metrics["embedding_std"] == pytest.approx(expected["embedding_std"], rel=1e-4)
        assert (metrics["lr"], metrics["tau"]) == (expected["lr"], expected["tau"])
        parameters = dict(trainer.model.named_parameters())
        trained = [(n, p) for n, p in reference.model.named_parameters() if p.requires_grad]
        assert trained and all(p.grad is not None for _, p in trained)
        for name, param in trained:
            assert_close_on_cpu(parameters[name].grad, param.grad, f"gradient of {name}",
                                rtol=1e-3, atol=1e-5)
        moments = optimizer_moments(trainer)
        assert len(moments) == 2 * len(trained)
        for name, moment in optimizer_moments(reference).items():
            assert_close_on_cpu(moments[name], moment, name, rtol=1e-3, atol=1e-8)
        state = trainer.model.state_dict()
        for name, tensor in reference.model.state_dict().items():
            assert state[name].device.type == on(device).type
            assert_close_on_cpu(state[name], tensor, name)
    # The steps changed the online weights, and the target followed.
    initial = build_model(FEAT_DIM, reference.config.model, 0).state_dict()
    for part in ("online.", "target."):
        assert any(not torch.equal(initial[n], t)
                   for n, t in reference.model.state_dict().items() if n.startswith(part))


# ---- EMA ---------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
def test_ema_update_matches_the_cpu_and_the_formula(device: str) -> None:
    model = build_model(FEAT_DIM, ModelConfig(hidden=[32, 16], predictor_hidden=32), seed=0)
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for param in model.online.parameters():
            param.add_(torch.randn(param.shape, generator=generator))
        for buf in model.online.buffers():
            if buf.is_floating_point():
                buf.uniform_(0.5, 2.0, generator=generator)
            else:
                buf.fill_(7)
    start_target = {n: t.clone().double() for n, t in model.target.state_dict().items()}
    online = {n: t.double() for n, t in model.online.state_dict().items()}
    moved = copy.deepcopy(model).to(on(device))
    taus = (0.99, 0.5)
    for tau in taus:
        model.update_target(tau)
        moved.update_target(tau)
    state = moved.target.state_dict()
    for name, tensor in model.target.state_dict().items():
        assert state[name].device.type == on(device).type
        assert_close_on_cpu(state[name], tensor, name, rtol=1e-6, atol=1e-6)
        if not tensor.is_floating_point():
            assert int(state[name]) == 7, name
            continue
        expected = start_target[name]
        for tau in taus:
            expected = tau * expected + (1 - tau) * online[name]
        assert_close_on_cpu(state[name].double(), expected, name, rtol=1e-6, atol=1e-6)


# ---- checkpoints across devices ----------------------------------------------------------
RUN_FLAGS = ["--hidden", "32,16", "--predictor-hidden", "32", "--fanouts", "5,5",
             "--batch-size", "128", "--num-workers", "0", "--max-steps", "4",
             "--checkpoint-every", "2", "--log-every", "1", *STEP_LR, *STEP_WARMUP]


def train_run(store: Path, run: Path, device: str, *flags: str) -> None:
    assert main(["train", "--data", str(store), "--out", str(run), "--device", device,
                 *RUN_FLAGS, *flags]) == 0


def read_metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def cpu_run(half_store: Path, tmp_path_factory) -> Path:
    """Four steps on the CPU, checkpoints at steps 2 and 4."""
    run = tmp_path_factory.mktemp("cpu-run") / "run"
    train_run(half_store, run, "cpu")
    return run


def resume_from_step_2(run: Path, store: Path, device: str) -> None:
    """Continue ``run`` from its step-2 checkpoint on ``device``."""
    checkpoint_path(run, 4).unlink()
    assert main(["train", "--data", str(store), "--out", str(run), "--resume",
                 "--device", device]) == 0


def assert_same_run(run: Path, reference: Path) -> None:
    """The runs' metrics and final checkpoints agree within the tolerance."""
    metrics, expected = read_metrics(run), read_metrics(reference)
    assert [m["step"] for m in metrics] == [m["step"] for m in expected] == [1, 2, 3, 4]
    for mine, theirs in zip(metrics, expected):
        assert (mine["lr"], mine["tau"]) == (theirs["lr"], theirs["tau"])
        assert mine["loss"] == pytest.approx(theirs["loss"], rel=1e-4, abs=1e-5)
    state = torch.load(latest_checkpoint(run), map_location="cpu", weights_only=True)
    ref = torch.load(latest_checkpoint(reference), map_location="cpu", weights_only=True)
    assert state["step"] == ref["step"] == 4
    for name, tensor in ref["model"].items():
        assert state["model"][name].device.type == "cpu"
        assert_close_on_cpu(state["model"][name], tensor, name)
    for index, moments in ref["optimizer"]["state"].items():
        mine = state["optimizer"]["state"][index]
        assert float(mine["step"]) == float(moments["step"]) == 4
        assert_close_on_cpu(mine["exp_avg"], moments["exp_avg"], f"exp_avg {index}",
                            rtol=1e-3, atol=1e-6)
        assert_close_on_cpu(mine["exp_avg_sq"], moments["exp_avg_sq"], f"exp_avg_sq {index}",
                            rtol=1e-3, atol=1e-10)


@pytest.mark.parametrize("device", DEVICES)
def test_a_checkpoint_written_on_the_device_resumes_on_the_cpu(
        device: str, half_store: Path, cpu_run: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    train_run(half_store, run, device)
    resume_from_step_2(run, half_store, "cpu")
    assert_same_run(run, cpu_run)


@pytest.mark.parametrize("device", DEVICES)
def test_a_checkpoint_written_on_the_cpu_resumes_on_the_device(
        device: str, half_store: Path, cpu_run: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(cpu_run, run)
    resume_from_step_2(run, half_store, device)
    assert_same_run(run, cpu_run)


# ---- embed ---------------------------------------------------------------------------------
def read_export(out: Path) -> tuple[np.ndarray, np.ndarray]:
    table = ds.dataset(out, format="parquet").to_table().sort_by("node_id")
    embedding = table.column("embedding").combine_chunks()
    return (table.column("node_id").to_numpy(),
            embedding.flatten().to_numpy().reshape(len(embedding), -1))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", [[], ["--fanouts", "3,3"]], ids=["exact", "sampled"])
def test_embed_on_the_device_equals_embed_on_the_cpu(device: str, mode: list[str],
                                                     cpu_run: Path, tmp_path: Path) -> None:
    exports = {}
    for name, where in (("reference", "cpu"), ("device", device)):
        out = tmp_path / name
        assert main(["embed", "--run", str(cpu_run), "--out", str(out), "--device", where,
                     "--batch-size", "100", *mode]) == 0
        exports[name] = read_export(out)
    ids, expected = exports["reference"]
    assert np.array_equal(ids, np.arange(NUM_NODES)) and expected.shape == (NUM_NODES, 16)
    assert np.array_equal(exports["device"][0], ids)
    np.testing.assert_allclose(exports["device"][1], expected, **TOLERANCE)
    assert np.abs(expected).max() > 0.1  # real embeddings, not zeros
