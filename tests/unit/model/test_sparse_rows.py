"""Sparse input rows: extraction of the non-zeros, the first layer over them (equal to the
dense layer, forward and gradients), masks and dropout on the non-zeros."""
from __future__ import annotations

import pytest
import torch

from bgrl_dgl.model.adjacency import Adjacency
from bgrl_dgl.model.augment import augment_view, feature_keep, mask_features
from bgrl_dgl.model.conv import GATConv, GCNConv, SAGEConv
from bgrl_dgl.model.encoder import Encoder, ModelConfig
from bgrl_dgl.model.sparse import SparseRows, dropout_values, sparse_linear

NUM_SRC, NUM_DST, NUM_EDGES, WIDTH, OUT = 60, 24, 150, 300, 16


def sparse_matrix(seed: int, binary: bool, rows: int = NUM_SRC,
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[rows, WIDTH] with ~4% non-zeros (ones, or values in (0.5, 1.5)) and two empty rows."""
    generator = torch.Generator().manual_seed(seed)
    present = torch.rand(rows, WIDTH, generator=generator) < 0.04
    values = torch.ones(rows, WIDTH) if binary else torch.rand(rows, WIDTH,
                                                               generator=generator) + 0.5
    x = torch.where(present, values, torch.zeros(()))
    x[[3, rows - 1]] = 0
    return x.to(dtype)


def random_block(seed: int) -> Adjacency:
    generator = torch.Generator().manual_seed(seed)
    counts = torch.multinomial(torch.ones(NUM_DST), NUM_EDGES, replacement=True,
                               generator=generator).bincount(minlength=NUM_DST)
    indptr = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])
    indices = torch.randint(0, NUM_SRC, (NUM_EDGES,), generator=generator)
    return Adjacency(indptr, indices, NUM_SRC,
                     src_degree=torch.randint(1, 9, (NUM_SRC,), generator=generator).float(),
                     dst_degree=torch.randint(1, 9, (NUM_DST,), generator=generator).float())


def check_transpose(rows: SparseRows) -> None:
    """The column-ordered copy holds exactly the CSR entries, sorted by column."""
    row_of = torch.repeat_interleave(torch.arange(rows.shape[0]), rows.indptr.diff())
    assert torch.equal(rows.col_rows, row_of[rows.col_order])
    col_of = torch.repeat_interleave(torch.arange(rows.num_cols), rows.col_indptr.diff())
    assert torch.equal(rows.cols[rows.col_order], col_of)
    assert int(rows.col_indptr[-1]) == rows.nnz == int(rows.indptr[-1])


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("binary", [True, False])
def test_from_dense_holds_exactly_the_non_zeros(dtype: torch.dtype, binary: bool) -> None:
    x = sparse_matrix(0, binary, dtype=dtype)
    rows = SparseRows.from_dense(x)
    assert rows.shape == x.shape and rows.dtype == dtype and rows.nnz == int((x != 0).sum())
    assert rows.unit_values == binary
    assert torch.equal(rows.to_dense(), x)
    assert int(rows.indptr[4] - rows.indptr[3]) == 0  # an empty row
    check_transpose(rows)
    assert torch.equal(rows.float().to_dense(), x.float())


def test_an_all_zero_matrix_gives_bias_only_rows() -> None:
    rows = SparseRows.from_dense(torch.zeros(5, WIDTH))
    assert rows.nnz == 0
    weight, bias = torch.randn(WIDTH, OUT, requires_grad=True), torch.randn(OUT)
    out = sparse_linear(rows, weight, bias)
    assert torch.equal(out, bias.expand(5, OUT))
    out.sum().backward()
    assert torch.equal(weight.grad, torch.zeros(WIDTH, OUT))


def make_conv(kind: str) -> torch.nn.Module:
    torch.manual_seed(1)
    if kind == "gcn":
        return GCNConv(WIDTH, OUT)
    if kind == "sage":
        return SAGEConv(WIDTH, OUT)
    return GATConv(WIDTH, OUT, heads=4)


def forward_and_grads(conv: torch.nn.Module, adj: Adjacency, x, scale, upstream: torch.Tensor):
    conv.zero_grad(set_to_none=True)
    out = conv(adj, x, scale)
    (out * upstream).sum().backward()
    return out.detach(), {name: p.grad.clone() for name, p in conv.named_parameters()}


@pytest.mark.parametrize("kind", ["gcn", "sage", "gat"])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("binary", [True, False])
def test_the_sparse_first_layer_equals_the_dense_one(kind: str, masked: bool,
                                                     binary: bool) -> None:
    x = sparse_matrix(2, binary)
    adj = random_block(3)
    scale = (torch.rand(WIDTH, generator=torch.Generator().manual_seed(4)) >= 0.5).float()
    scale = scale if masked else None
    conv = make_conv(kind)
    upstream = torch.randn(NUM_DST, OUT, generator=torch.Generator().manual_seed(5))
    dense_out, dense_grads = forward_and_grads(conv, adj, x, scale, upstream)
    sparse_out, sparse_grads = forward_and_grads(conv, adj, SparseRows.from_dense(x), scale,
                                                 upstream)
    torch.testing.assert_close(sparse_out, dense_out, rtol=0, atol=1e-5)
    assert dense_grads.keys() == sparse_grads.keys()
    for name, grad in dense_grads.items():
        assert grad.abs().max() > 0, name  # the comparison tests something
        torch.testing.assert_close(sparse_grads[name], grad, rtol=0, atol=1e-4, msg=name)


@pytest.mark.parametrize("conv", ["gcn", "sage", "gat"])
def test_the_encoder_over_sparse_rows_with_a_column_mask_equals_the_dense_encoder(
        conv: str) -> None:
    torch.manual_seed(6)
    encoder = Encoder(WIDTH, ModelConfig(conv=conv, hidden=[16, 8], heads=2))
    first = random_block(7)
    second = Adjacency(torch.arange(0, 26, 2), torch.arange(NUM_DST).flip(0), NUM_DST)
    adjs = [first, second]
    x = sparse_matrix(8, binary=True)
    keep = torch.rand(WIDTH, generator=torch.Generator().manual_seed(9)) >= 0.5
    dense = encoder(adjs, x, keep)
    sparse = encoder(adjs, SparseRows.from_dense(x), keep)
    dropped = encoder(adjs, SparseRows.from_dense(x).keep_columns(keep))
    torch.testing.assert_close(sparse, dense, rtol=0, atol=1e-5)
    torch.testing.assert_close(dropped, dense, rtol=0, atol=1e-5)
    assert not torch.allclose(encoder(adjs, x), dense, atol=1e-3)  # the mask matters


def test_keep_entries_and_keep_columns_zero_exactly_the_dropped_entries() -> None:
    x = sparse_matrix(10, binary=False)
    rows = SparseRows.from_dense(x)
    keep = torch.rand(rows.nnz, generator=torch.Generator().manual_seed(11)) >= 0.3
    kept = rows.keep_entries(keep)
    assert kept.nnz == int(keep.sum()) and not kept.unit_values
    check_transpose(kept)
    expected = x.clone()
    expected[torch.repeat_interleave(torch.arange(NUM_SRC), rows.indptr.diff())[~keep],
             rows.cols[~keep]] = 0
    assert torch.equal(kept.to_dense(), expected)
    columns = torch.rand(WIDTH, generator=torch.Generator().manual_seed(12)) >= 0.5
    by_column = rows.keep_columns(columns)
    check_transpose(by_column)
    assert torch.equal(by_column.to_dense(), x * columns)


def test_element_masks_of_sparse_rows_drop_only_non_zeros() -> None:
    x = sparse_matrix(13, binary=True)
    rows = SparseRows.from_dense(x)
    generator = torch.Generator().manual_seed(14)
    keep = feature_keep(rows, 0.5, "element", generator)
    assert keep.shape == (rows.nnz,) and 0 < int(keep.sum()) < rows.nnz
    masked = mask_features(rows, keep).to_dense()
    # Nothing appears where x was zero, every kept non-zero keeps its value, and exactly the
    # masked non-zeros are gone.
    assert torch.equal(masked[x == 0], torch.zeros(int((x == 0).sum())))
    assert int((masked != 0).sum()) == int(keep.sum())
    assert torch.equal(masked[masked != 0], x[masked != 0])
    _, view_x, column_keep = augment_view([random_block(15)], rows, 0.0, 0.5, "element",
                                          torch.Generator().manual_seed(16))
    assert column_keep is None and 0 < view_x.nnz < rows.nnz


def test_a_column_masked_sparse_view_drops_the_masked_columns() -> None:
    x = sparse_matrix(17, binary=True)
    adjs = [random_block(18)]
    dense_adjs, dense_x, keep = augment_view(adjs, x, 0.3, 0.5, "column",
                                             torch.Generator().manual_seed(19))
    sparse_adjs, sparse_x, sparse_keep = augment_view(adjs, SparseRows.from_dense(x), 0.3, 0.5,
                                                      "column",
                                                      torch.Generator().manual_seed(19))
    assert sparse_keep is None and keep is not None
    assert torch.equal(sparse_x.to_dense(), dense_x * keep)
    assert torch.equal(sparse_adjs[0].indices, dense_adjs[0].indices)  # the same draws


def test_dropout_on_sparse_rows_touches_only_non_zeros() -> None:
    rows = SparseRows.from_dense(sparse_matrix(20, binary=True))
    dropout = torch.nn.Dropout(0.5)
    torch.manual_seed(21)
    dropped = dropout_values(rows, dropout)
    assert not dropped.unit_values
    assert set(dropped.values.unique().tolist()) == {0.0, 2.0}
    assert torch.equal(dropped.cols, rows.cols)
    assert dropout_values(rows, dropout.eval()) is rows
