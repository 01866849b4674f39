"""Augmentations: rates match their probabilities, masks have the right shape, inputs survive."""
from __future__ import annotations

import math

import pytest
import torch

from bgrl_dgl.model.adjacency import Adjacency
from bgrl_dgl.model.augment import (
    AugmentConfig,
    augment_view,
    drop_edges,
    feature_keep,
    mask_features,
)


def random_adjacency(num_src: int, num_dst: int, num_edges: int, seed: int = 0) -> Adjacency:
    """CSC adjacency with ``num_edges`` random edges, sources sorted within each destination."""
    gen = torch.Generator().manual_seed(seed)
    dst = torch.randint(num_dst, (num_edges,), generator=gen)
    src = torch.randint(num_src, (num_edges,), generator=gen)
    order = torch.argsort(dst * num_src + src)
    counts = torch.bincount(dst, minlength=num_dst)
    indptr = torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)])
    return Adjacency(indptr=indptr, indices=src[order], num_src=num_src)


def edge_pairs(adj: Adjacency) -> set[tuple[int, int]]:
    dst = torch.repeat_interleave(torch.arange(adj.num_dst), adj.indptr.diff())
    return set(zip(dst.tolist(), adj.indices.tolist()))


def assert_rate(observed: int, trials: int, p: float) -> None:
    """``observed`` successes out of ``trials`` lie within 4 sigma of a Binomial(trials, p)."""
    sigma = math.sqrt(trials * p * (1 - p))
    assert abs(observed - trials * p) < 4 * sigma, (observed, trials * p, sigma)


def test_config_defaults_and_rates() -> None:
    config = AugmentConfig()
    assert config.edge_drop == [0.4, 0.4] and config.feature_mask == [0.5, 0.6]
    assert config.mask_mode == "column" and config.independent_views is False
    assert config.view_rates(0) == (0.4, 0.5) and config.view_rates(1) == (0.4, 0.6)


@pytest.mark.parametrize("kwargs", [
    {"edge_drop": [0.3]},
    {"feature_mask": [0.1, 0.2, 0.3]},
    {"edge_drop": [1.0, 0.2]},
    {"feature_mask": [0.1, -0.1]},
    {"mask_mode": "row"},
])
def test_config_rejects_bad_values(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        AugmentConfig(**kwargs)


@pytest.mark.parametrize("p", [0.2, 0.5])
def test_drop_edges_rate_and_subset(p: float) -> None:
    adj = random_adjacency(num_src=3000, num_dst=1000, num_edges=100_000)
    dropped = drop_edges(adj, p, torch.Generator().manual_seed(1))
    assert (dropped.num_src, dropped.num_dst) == (adj.num_src, adj.num_dst)
    assert_rate(adj.indices.numel() - dropped.indices.numel(), adj.indices.numel(), p)
    assert edge_pairs(dropped) <= edge_pairs(adj)


def test_drop_edges_zero_is_identity_and_seed_reproducible() -> None:
    adj = random_adjacency(num_src=50, num_dst=20, num_edges=300)
    assert drop_edges(adj, 0.0, torch.Generator().manual_seed(0)) is adj
    first = drop_edges(adj, 0.4, torch.Generator().manual_seed(7))
    again = drop_edges(adj, 0.4, torch.Generator().manual_seed(7))
    other = drop_edges(adj, 0.4, torch.Generator().manual_seed(8))
    assert torch.equal(first.indptr, again.indptr) and torch.equal(first.indices, again.indices)
    assert edge_pairs(first) != edge_pairs(other)


def masked(x: torch.Tensor, p: float, mode: str, seed: int = 0) -> torch.Tensor:
    return mask_features(x, feature_keep(x, p, mode, torch.Generator().manual_seed(seed)))


def test_column_mask_zeroes_whole_columns_at_rate() -> None:
    x = torch.rand(5, 100_000) + 0.5  # no zero entries before masking
    out = masked(x, 0.3, "column")
    zero_columns = (out == 0).all(dim=0)
    assert torch.equal((out == 0).any(dim=0), zero_columns)  # a column is zero in all rows or none
    assert torch.equal(out[:, ~zero_columns], x[:, ~zero_columns])
    assert_rate(int(zero_columns.sum()), x.shape[1], 0.3)


def test_element_mask_is_independent_per_entry() -> None:
    x = torch.rand(100, 1000) + 0.5
    out = masked(x, 0.4, "element")
    zeros = out == 0
    assert_rate(int(zeros.sum()), x.numel(), 0.4)
    assert not torch.equal(zeros[0], zeros[1])  # rows get different masks
    assert torch.equal(out[~zeros], x[~zeros])


@pytest.mark.parametrize("mode", ["column", "element"])
def test_mask_leaves_input_untouched_and_keeps_dtype(mode: str) -> None:
    x = torch.rand(20, 30, dtype=torch.float16) + 0.5
    before = x.clone()
    out = masked(x, 0.5, mode)
    assert torch.equal(x, before)
    assert out.dtype == torch.float16 and out.shape == x.shape
    assert (out == 0).any()
    assert feature_keep(x, 0.0, mode, torch.Generator()) is None
    assert mask_features(x, None) is x
    with pytest.raises(ValueError, match="mask mode"):
        feature_keep(x, 0.5, "row", torch.Generator())


def test_augment_view_drops_in_every_block_and_masks_features() -> None:
    adjs = [random_adjacency(400, 100, 4000, seed=1), random_adjacency(100, 10, 1000, seed=2)]
    x = torch.rand(400, 64) + 0.5
    out_adjs, out_x, column_keep = augment_view(adjs, x, 0.5, 0.5, "column",
                                                torch.Generator().manual_seed(3))
    assert len(out_adjs) == 2
    for before, after in zip(adjs, out_adjs):
        assert (after.num_src, after.num_dst) == (before.num_src, before.num_dst)
        assert 0 < after.indices.numel() < before.indices.numel()
    # A column mask is handed to the encoder, not applied to a copy of the features.
    assert out_x is x and column_keep.shape == (64,) and column_keep.dtype == torch.bool
    assert 0 < int(column_keep.sum()) < 64

    _, element_x, no_keep = augment_view(adjs, x, 0.5, 0.5, "element",
                                         torch.Generator().manual_seed(3))
    assert no_keep is None and (element_x == 0).any() and element_x.shape == x.shape

    same_adjs, same_x, same_keep = augment_view(adjs, x, 0.0, 0.0, "column", torch.Generator())
    assert all(a is b for a, b in zip(same_adjs, adjs)) and same_x is x and same_keep is None


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cpu_generator_gives_same_augmentation_on_cuda() -> None:
    adj = random_adjacency(200, 50, 2000)
    x = torch.rand(200, 32)
    cpu_adjs, cpu_x, _ = augment_view([adj], x, 0.3, 0.3, "element",
                                      torch.Generator().manual_seed(5))
    gpu_adjs, gpu_x, _ = augment_view([adj.to("cuda")], x.cuda(), 0.3, 0.3, "element",
                                   torch.Generator().manual_seed(5))
    assert gpu_x.is_cuda and gpu_adjs[0].indices.is_cuda
    assert torch.equal(gpu_x.cpu(), cpu_x)
    assert torch.equal(gpu_adjs[0].indices.cpu(), cpu_adjs[0].indices)
