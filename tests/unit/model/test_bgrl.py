"""BGRL model: target copy and EMA, gradient isolation, loss values, tau schedule, training."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from bgrl_dgl.model.adjacency import Adjacency
from bgrl_dgl.model.augment import augment_view, mask_features
from bgrl_dgl.model.bgrl import BGRL, bootstrap_loss, cosine_tau, embedding_std
from bgrl_dgl.model.encoder import Encoder, ModelConfig, Predictor


class MeanEncoder(nn.Module):
    """Small encoder with batch norm: mean over in-neighbours and self, then an MLP."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_dim, 16), nn.BatchNorm1d(16), nn.ReLU(),
                                 nn.Linear(16, out_dim))
        self.out_dim = out_dim

    def forward(self, adjs: list[Adjacency], x: torch.Tensor,
                column_keep: torch.Tensor | None = None) -> torch.Tensor:
        x = mask_features(x, column_keep)
        for adj in adjs:
            total = x[: adj.num_dst].clone().index_add_(0, adj.dst_index, x[adj.indices])
            x = total / (1 + adj.indptr.diff()).unsqueeze(1)
        return self.mlp(x)


def ring_adjacency(num_nodes: int) -> Adjacency:
    """Full graph as one block: every node's in-neighbours are its two ring neighbours."""
    nodes = torch.arange(num_nodes)
    sources = torch.stack([(nodes - 1) % num_nodes, (nodes + 1) % num_nodes],
                          dim=1).sort(dim=1).values
    indptr = torch.arange(0, 2 * num_nodes + 1, 2)
    return Adjacency(indptr=indptr, indices=sources.reshape(-1), num_src=num_nodes)


def small_model(seed: int = 0, in_dim: int = 8, out_dim: int = 6) -> BGRL:
    torch.manual_seed(seed)
    return BGRL(MeanEncoder(in_dim, out_dim), nn.Sequential(nn.Linear(out_dim, 12), nn.PReLU(),
                                                            nn.Linear(12, out_dim)))


def two_views(num_nodes: int = 32, in_dim: int = 8, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    adjs = [ring_adjacency(num_nodes)]
    x = torch.randn(num_nodes, in_dim, generator=gen)
    return (augment_view(adjs, x, 0.3, 0.3, "column", gen),
            augment_view(adjs, x, 0.2, 0.4, "column", gen))


def test_target_starts_as_exact_copy_without_grad() -> None:
    torch.manual_seed(0)
    online = MeanEncoder(8, 6)
    online(*two_views()[0]).sum().backward()  # online holds gradients before wrapping
    model = BGRL(online, nn.Linear(6, 6))
    online_state, target_state = model.online.state_dict(), model.target.state_dict()
    assert online_state.keys() == target_state.keys()
    for name, tensor in online_state.items():
        assert torch.equal(target_state[name], tensor), name
        assert target_state[name].data_ptr() != tensor.data_ptr(), name
    assert all(not p.requires_grad and p.grad is None for p in model.target.parameters())


def test_target_matches_online_in_train_mode_with_batch_norm() -> None:
    model = small_model()
    view1, _ = two_views()
    model.train()
    assert all(m.training for m in model.target.modules())
    assert torch.equal(model.online(*view1), model.target(*view1))  # both use batch statistics
    model.eval()
    assert not any(m.training for m in model.modules())


def test_backward_reaches_online_and_predictor_only() -> None:
    model = small_model()
    loss, h1 = model.loss(*two_views())
    loss.backward()
    assert all(p.grad is None for p in model.target.parameters())
    assert all(p.grad is not None for p in model.trainable_parameters())
    assert not h1.requires_grad and h1.shape == (32, 6)


def test_trainable_parameters_are_online_and_predictor() -> None:
    model = small_model()
    trainable = {id(p) for p in model.trainable_parameters()}
    expected = {id(p) for p in [*model.online.parameters(), *model.predictor.parameters()]}
    assert trainable == expected
    assert trainable.isdisjoint(id(p) for p in model.target.parameters())


def test_predictor_sees_only_online_outputs() -> None:
    model = small_model()
    online_outputs, predictor_inputs, target_calls = [], [], []
    model.online.register_forward_hook(lambda _m, _i, out: online_outputs.append(out))
    model.predictor.register_forward_hook(lambda _m, inputs, _o: predictor_inputs.append(inputs[0]))
    model.target.register_forward_hook(lambda _m, _i, out: target_calls.append(out))
    model.loss(*two_views())
    assert len(online_outputs) == 2 and len(target_calls) == 2
    assert len(predictor_inputs) == 2
    assert all(any(inp is out for out in online_outputs) for inp in predictor_inputs)
    assert not any(out.requires_grad for out in target_calls)


def test_loss_is_symmetrised_bootstrap() -> None:
    model = small_model()
    view1, view2 = two_views()
    loss, _ = model.loss(view1, view2)
    with torch.no_grad():
        q1 = model.predictor(model.online(*view1))
        q2 = model.predictor(model.online(*view2))
        z1, z2 = model.target(*view1), model.target(*view2)
    expected = bootstrap_loss(q1, z2) + bootstrap_loss(q2, z1)
    torch.testing.assert_close(loss.detach(), expected)


def shift_online(model: BGRL, seed: int) -> None:
    """Give the online encoder parameters and running statistics different from the target's."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in [*model.online.parameters(), *model.online.buffers()]:
            if tensor.is_floating_point():
                tensor.add_(torch.randn(tensor.shape, generator=gen))
            else:
                tensor.add_(5)


@pytest.mark.parametrize("tau", [0.0, 0.3, 0.99, 1.0])
def test_update_target_is_exact_ema(tau: float) -> None:
    model = small_model()
    shift_online(model, seed=1)
    before = {k: v.clone() for k, v in model.target.state_dict().items()}
    model.update_target(tau)
    online, target = model.online.state_dict(), model.target.state_dict()
    assert "mlp.1.running_mean" in target and "mlp.1.num_batches_tracked" in target
    for name, old in before.items():
        if old.is_floating_point():
            expected = tau * old + (1 - tau) * online[name]
            torch.testing.assert_close(target[name], expected, rtol=1e-6, atol=1e-7, msg=name)
        else:  # integer buffers are copied
            assert torch.equal(target[name], online[name]), name
    if tau == 1.0:
        assert all(torch.equal(before[k],
                               target[k]) for k in before if before[k].is_floating_point())
    if tau == 0.0:
        assert all(torch.equal(online[k], target[k]) for k in online)
    assert all(not p.requires_grad for p in model.target.parameters())


def test_cosine_tau_schedule() -> None:
    assert cosine_tau(0, 1000, 0.99) == pytest.approx(0.99)
    assert cosine_tau(1000, 1000, 0.99) == pytest.approx(1.0)
    assert cosine_tau(500, 1000, 0.99) == pytest.approx(0.995)
    values = [cosine_tau(step, 1000, 0.9) for step in range(0, 1001, 10)]
    assert all(b > a for a, b in zip(values, values[1:]))
    assert cosine_tau(2000, 1000, 0.9) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        cosine_tau(0, 0, 0.99)


def test_bootstrap_loss_values_and_stop_gradient() -> None:
    q = torch.randn(10, 4, requires_grad=True)
    z = (3 * q.detach()).requires_grad_()
    assert bootstrap_loss(q, z).item() == pytest.approx(0.0, abs=1e-6)
    assert bootstrap_loss(q, -z).item() == pytest.approx(4.0, abs=1e-6)
    orthogonal = bootstrap_loss(torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 2.0]]))
    assert orthogonal.item() == pytest.approx(2.0)
    bootstrap_loss(q, torch.randn(10, 4).requires_grad_()).backward()
    assert q.grad is not None and z.grad is None


def test_embedding_std() -> None:
    assert embedding_std(torch.ones(50, 8) * torch.arange(1.0, 51.0)[:,
                                                                     None]) == pytest.approx(0.0,
                                                                                             abs=1e-6)
    healthy = embedding_std(torch.randn(20_000, 64, generator=torch.Generator().manual_seed(0)))
    assert healthy == pytest.approx(1 / math.sqrt(64), rel=0.05)
    assert math.isnan(embedding_std(torch.randn(1, 8)))


def test_loss_decreases_with_real_encoder() -> None:
    torch.manual_seed(0)
    num_nodes, in_dim = 64, 16
    config = ModelConfig(hidden=[32, 16], predictor_hidden=32)
    encoder = Encoder(in_dim, config)
    model = BGRL(encoder, Predictor(encoder.out_dim, config.predictor_hidden))
    model.train()
    optimizer = torch.optim.Adam(model.trainable_parameters(), lr=5e-3)
    adjs = [ring_adjacency(num_nodes) for _ in range(len(config.hidden))]
    x = torch.randn(num_nodes, in_dim, generator=torch.Generator().manual_seed(1))
    gen = torch.Generator().manual_seed(2)
    losses = []
    for step in range(50):
        view1 = augment_view(adjs, x, 0.3, 0.3, "column", gen)
        view2 = augment_view(adjs, x, 0.2, 0.4, "column", gen)
        loss, _ = model.loss(view1, view2)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        model.update_target(cosine_tau(step + 1, 50, 0.99))
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5, losses
