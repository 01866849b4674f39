"""The block adjacency, its aggregation primitives and the encoder, checked against dgl.nn."""
from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch

# bgrl_dgl first: it selects DGL's PyTorch backend and stops ogb/dgl asking PyPI for updates.
from bgrl_dgl.model.adjacency import (
    Adjacency,
    gathered_weighted_sum,
    segment_softmax,
    segment_sum,
    weighted_sum,
)
from bgrl_dgl.model.augment import mask_features
from bgrl_dgl.model.conv.gat import GATConv
from bgrl_dgl.model.conv.gcn import GCNConv
from bgrl_dgl.model.conv.sage import SAGEConv
from bgrl_dgl.model.encoder import Encoder, ModelConfig, Predictor

import dgl  # noqa: E402  (isort: skip)
from dgl import nn as dglnn  # noqa: E402

IN_DIM = 12


def random_graph(num_nodes: int = 120, num_edges: int = 700, seed: int = 0) -> dgl.DGLGraph:
    """A symmetric random graph without self loops, a few nodes isolated."""
    torch.manual_seed(seed)
    g = dgl.rand_graph(num_nodes, num_edges)
    g = dgl.to_bidirected(dgl.remove_self_loop(g))
    return g


def sampled_blocks(g: dgl.DGLGraph, full: bool, seeds: int = 16) -> list[dgl.DGLGraph]:
    sampler = (dgl.dataloading.MultiLayerFullNeighborSampler(2) if full
               else dgl.dataloading.NeighborSampler([4, 3]))
    dgl.seed(1)
    _, _, blocks = sampler.sample_blocks(g, torch.arange(seeds, dtype=g.idtype))
    return blocks


def block_edge_sets(adj: Adjacency) -> list[list[int]]:
    """Sorted source ids of every destination (order within a segment is not part of CSC)."""
    ptr = adj.indptr.tolist()
    return [sorted(adj.indices[ptr[v]:ptr[v + 1]].tolist()) for v in range(adj.num_dst)]


def with_self_loops_dgl(block: dgl.DGLGraph) -> dgl.DGLGraph:
    src, dst = block.edges()
    loops = torch.arange(block.num_dst_nodes())
    return dgl.create_block((torch.cat([src, loops]), torch.cat([dst, loops])),
                            num_src_nodes=block.num_src_nodes(),
                            num_dst_nodes=block.num_dst_nodes())


@pytest.fixture(scope="module")
def graph() -> dgl.DGLGraph:
    return random_graph()


# --- Adjacency -------------------------------------------------------------------------------

@pytest.mark.parametrize("full", [False, True])
def test_from_block_matches_block_edges(graph, full):
    for block in sampled_blocks(graph, full):
        adj = Adjacency.from_block(block)
        assert (adj.num_src, adj.num_dst) == (block.num_src_nodes(), block.num_dst_nodes())
        assert adj.indptr.dtype == adj.indices.dtype == torch.int64
        src, dst = block.edges()
        expected = [sorted(src[dst == v].tolist()) for v in range(block.num_dst_nodes())]
        assert block_edge_sets(adj) == expected
        assert torch.equal(adj.dst_index, torch.sort(dst).values)


def test_from_block_accepts_int32_graphs(graph):
    block = sampled_blocks(graph.int(), full=False)[0]
    adj = Adjacency.from_block(block)
    assert adj.indptr.dtype == adj.indices.dtype == torch.int64
    assert adj.num_edges == block.num_edges()


def small_adjacency() -> Adjacency:
    # dst 0 <- {1, 2}, dst 1 <- {}, dst 2 <- {0, 3, 4}; 5 sources
    return Adjacency.from_csc(torch.tensor([0, 2, 2, 5]), torch.tensor([1, 2, 0, 3, 4]), 5)


def test_with_self_loops_puts_one_loop_per_destination_first():
    looped = small_adjacency().with_self_loops()
    assert looped.indptr.tolist() == [0, 3, 4, 8]
    assert looped.indices.tolist() == [0, 1, 2, 1, 2, 0, 3, 4]
    assert looped.num_src == 5


def test_with_self_loops_adds_one_to_whole_graph_degrees():
    adj = small_adjacency().with_degrees(torch.arange(5.0), torch.tensor([7.0, 0.0, 3.0]))
    looped = adj.with_self_loops()
    assert looped.src_degree.tolist() == [1.0, 2.0, 3.0, 4.0, 5.0]
    assert looped.dst_degree.tolist() == [8.0, 1.0, 4.0]
    assert looped.normalising_degrees[1].tolist() == [8.0, 1.0, 4.0]


def test_block_degrees():
    adj = small_adjacency()
    assert adj.in_degrees().tolist() == [2.0, 0.0, 3.0]
    assert adj.out_degrees().tolist() == [1.0, 1.0, 1.0, 1.0, 1.0]
    src, dst = adj.with_self_loops().normalising_degrees
    assert src.tolist() == [2.0, 2.0, 2.0, 1.0, 1.0]
    assert dst.tolist() == [3.0, 1.0, 4.0]


def test_keep_edges_keeps_masked_edges_in_order():
    adj = small_adjacency().with_degrees(torch.ones(5), torch.ones(3))
    kept = adj.keep_edges(torch.tensor([True, False, False, True, True]))
    assert kept.indptr.tolist() == [0, 1, 1, 3]
    assert kept.indices.tolist() == [1, 3, 4]
    assert kept.dst_index.tolist() == [0, 2, 2]
    assert kept.src_degree is adj.src_degree
    none = adj.keep_edges(torch.zeros(5, dtype=torch.bool))
    assert none.indptr.tolist() == [0, 0, 0, 0] and none.num_edges == 0
    with pytest.raises(ValueError, match="edge mask"):
        adj.keep_edges(torch.ones(4, dtype=torch.bool))


def test_keep_edges_on_sampled_block_matches_reference(graph):
    adj = Adjacency.from_block(sampled_blocks(graph, full=True)[0])
    torch.manual_seed(3)
    mask = torch.rand(adj.num_edges) < 0.6
    kept = adj.keep_edges(mask)
    ptr = adj.indptr.tolist()
    expected = [adj.indices[ptr[v]:ptr[v + 1]][mask[ptr[v]:ptr[v + 1]]].tolist()
                for v in range(adj.num_dst)]
    kptr = kept.indptr.tolist()
    assert [kept.indices[kptr[v]:kptr[v + 1]].tolist() for v in range(kept.num_dst)] == expected


def test_transpose_csr_lists_destinations_of_each_source():
    indptr, destinations, permutation = small_adjacency().transpose_csr
    assert indptr.tolist() == [0, 1, 2, 3, 4, 5]
    assert destinations.tolist() == [2, 0, 0, 2, 2]
    assert permutation.tolist() == [2, 0, 1, 3, 4]


def test_to_and_degree_shapes_are_checked():
    adj = small_adjacency().with_degrees(torch.ones(5), torch.ones(3))
    moved = adj.to("cpu")
    assert torch.equal(moved.indices, adj.indices) and moved.src_degree is not None
    with pytest.raises(ValueError, match="src_degree"):
        adj.with_degrees(torch.ones(4), None)
    with pytest.raises(ValueError, match="dst_degree"):
        adj.with_degrees(None, torch.ones(5))


# --- aggregation primitives -----------------------------------------------------------------

def dense_matrix(adj: Adjacency, weight: torch.Tensor) -> torch.Tensor:
    matrix = torch.zeros(adj.num_dst, adj.num_src, dtype=weight.dtype)
    return matrix.index_put_((adj.dst_index, adj.indices), weight, accumulate=True)


def test_weighted_sum_paths_match_dense_product(graph):
    adj = Adjacency.from_block(sampled_blocks(graph, full=False)[0])
    torch.manual_seed(0)
    x = torch.randn(adj.num_src, 7)
    weight = torch.rand(adj.num_edges)
    expected = dense_matrix(adj, weight) @ x
    torch.testing.assert_close(weighted_sum(adj, weight, x), expected)
    torch.testing.assert_close(gathered_weighted_sum(adj, weight, x), expected)
    unweighted = dense_matrix(adj, torch.ones(adj.num_edges)) @ x
    torch.testing.assert_close(weighted_sum(adj, None, x), unweighted)
    three_d = x.view(adj.num_src, 7, 1).expand(-1, -1, 2)
    torch.testing.assert_close(weighted_sum(adj, None, three_d),
                               unweighted[..., None].expand(-1, -1, 2))


def test_weighted_sum_gradients_pass_gradcheck():
    adj = Adjacency.from_csc(torch.tensor([0, 2, 2, 6]), torch.tensor([1, 3, 0, 2, 3, 3]), 4)
    torch.manual_seed(0)
    weight = torch.rand(adj.num_edges, dtype=torch.float64, requires_grad=True)
    x = torch.randn(adj.num_src, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda w, h: weighted_sum(adj, w, h), (weight, x))
    assert torch.autograd.gradcheck(lambda h: weighted_sum(adj, None, h), (x,))


def test_segment_sum_and_softmax():
    adj = small_adjacency()
    values = torch.tensor([[1.0], [2.0], [3.0], [4.0], [5.0]])
    assert segment_sum(values, adj).tolist() == [[3.0], [0.0], [12.0]]
    scores = torch.tensor([[1000.0, 0.0], [1000.0, 1.0], [-5.0, 2.0], [-5.0, 2.0], [-1e4, 2.0]])
    attention = segment_softmax(scores, adj)
    assert torch.isfinite(attention).all()
    torch.testing.assert_close(segment_sum(attention, adj)[[0, 2]], torch.ones(2, 2))
    torch.testing.assert_close(attention[:2, 0], torch.tensor([0.5, 0.5]))
    torch.testing.assert_close(attention[:2, 1], torch.softmax(torch.tensor([0.0, 1.0]), 0))
    torch.testing.assert_close(attention[2:, 0], torch.tensor([0.5, 0.5, 0.0]))


def test_segment_softmax_passes_gradcheck():
    adj = small_adjacency()
    scores = torch.randn(adj.num_edges, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda s: segment_softmax(s, adj), (scores,))


# --- layers against dgl.nn ------------------------------------------------------------------

def copy_sage(ours: SAGEConv, theirs: dglnn.SAGEConv) -> None:
    ours.fc_self.load_state_dict(theirs.fc_self.state_dict())
    ours.fc_neigh.load_state_dict(theirs.fc_neigh.state_dict())


def copy_gcn(ours: GCNConv, theirs: dglnn.GraphConv) -> None:
    ours.load_state_dict({"weight": theirs.weight.detach(), "bias": theirs.bias.detach()})


def copy_gat(ours: GATConv, theirs: dglnn.GATConv) -> None:
    ours.load_state_dict({"fc.weight": theirs.fc.weight.detach(), "attn_l": theirs.attn_l.detach(),
                          "attn_r": theirs.attn_r.detach(), "bias": theirs.bias.detach()})


def randomise_biases(*modules: torch.nn.Module) -> None:
    """dgl initialises biases to zero, which would hide a bias added in the wrong place."""
    with torch.no_grad():
        for module in modules:
            for name, parameter in module.named_parameters():
                if name.endswith("bias"):
                    parameter.normal_()


LAYER_CASES = {
    # name: (ours, theirs, weight copy, dgl graph the reference runs on)
    "sage": (lambda i, o: SAGEConv(i, o), lambda i, o: dglnn.SAGEConv(i, o, "mean"), copy_sage,
             lambda b: b),
    "gcn": (lambda i, o: GCNConv(i, o, self_loops=False),
            lambda i, o: dglnn.GraphConv(i, o, norm="both", allow_zero_in_degree=True), copy_gcn,
            lambda b: b),
    # With self loops our layer equals GraphConv on the block with a loop added per destination.
    "gcn_self_loops": (lambda i, o: GCNConv(i, o, self_loops=True),
                       lambda i, o: dglnn.GraphConv(i, o, norm="both"), copy_gcn,
                       with_self_loops_dgl),
    "gat": (lambda i, o: GATConv(i, o, heads=3),
            lambda i, o: dglnn.GATConv(i, o // 3, num_heads=3, allow_zero_in_degree=True), copy_gat,
            lambda b: b),
}


@pytest.mark.parametrize("full", [False, True], ids=["sampled", "full"])
@pytest.mark.parametrize("out_dim", [6, 24], ids=["narrowing", "widening"])
@pytest.mark.parametrize("case", sorted(LAYER_CASES))
def test_layer_equals_dgl_counterpart(graph, case, out_dim, full):
    make_ours, make_theirs, copy, reference_graph = LAYER_CASES[case]
    torch.manual_seed(0)
    theirs = make_theirs(IN_DIM, out_dim)
    randomise_biases(theirs)
    ours = make_ours(IN_DIM, out_dim)
    copy(ours, theirs)
    for block in sampled_blocks(graph, full):
        x = torch.randn(block.num_src_nodes(), IN_DIM)
        expected = theirs(reference_graph(block), x).reshape(block.num_dst_nodes(), -1)
        actual = ours(Adjacency.from_block(block), x)
        torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)


def test_sage_gives_zero_neighbour_mean_without_in_edges():
    conv = SAGEConv(4, 3)
    adj = small_adjacency()
    x = torch.randn(5, 4)
    torch.testing.assert_close(conv(adj, x)[1], conv.fc_self(x[1]))


def test_gcn_with_graph_degrees_equals_full_graph_gcn(graph):
    """A full-neighbourhood block normalised by whole-graph degrees reproduces full-graph GCN."""
    torch.manual_seed(0)
    theirs = dglnn.GraphConv(IN_DIM, 8, norm="both")
    randomise_biases(theirs)
    ours = GCNConv(IN_DIM, 8, self_loops=True)
    copy_gcn(ours, theirs)
    x = torch.randn(graph.num_nodes(), IN_DIM)
    expected = theirs(dgl.add_self_loop(graph), x)
    block = sampled_blocks(graph, full=True)[-1]
    src_ids, dst_ids = block.srcdata[dgl.NID], block.dstdata[dgl.NID]
    degree = graph.in_degrees().float()
    adj = Adjacency.from_block(block).with_degrees(degree[src_ids], degree[dst_ids])
    torch.testing.assert_close(ours(adj, x[src_ids]), expected[dst_ids], atol=1e-5, rtol=1e-5)
    # The block's own degrees differ from the graph's for the sources outside the seeds.
    assert not torch.allclose(ours(Adjacency.from_block(block), x[src_ids]), expected[dst_ids])


# --- config, encoder, predictor -------------------------------------------------------------

@pytest.mark.parametrize("kwargs, message", [
    ({"hidden": []}, "at least one"),
    ({"hidden": [8, 0]}, "positive"),
    ({"conv": "gat", "hidden": [8, 6], "heads": 4}, "divisible"),
    ({"heads": 0}, "heads"),
    ({"conv": "gin"}, "conv"),
    ({"norm": "group"}, "norm"),
    ({"dropout": 1.0}, "dropout"),
    ({"predictor_hidden": 0}, "predictor_hidden"),
])
def test_model_config_rejects_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig(**kwargs)


def test_model_config_defaults_and_help():
    import dataclasses
    config = ModelConfig()
    assert (config.conv, config.hidden, config.norm, config.heads) == ("gcn", [512, 512], "batch",
                                                                       4)
    assert config.hidden is not ModelConfig().hidden
    assert all(f.metadata.get("help") for f in dataclasses.fields(ModelConfig))


@pytest.mark.parametrize("conv", ["gcn", "sage", "gat"])
@pytest.mark.parametrize("norm", ["batch", "layer", "none"])
def test_encoder_maps_input_nodes_to_seed_embeddings(graph, conv, norm):
    torch.manual_seed(0)
    encoder = Encoder(IN_DIM, ModelConfig(conv=conv, hidden=[16, 8], norm=norm, heads=2))
    blocks = sampled_blocks(graph, full=False)
    adjs = [Adjacency.from_block(b) for b in blocks]
    x = torch.randn(adjs[0].num_src, IN_DIM, requires_grad=True)
    out = encoder(adjs, x)
    assert (encoder.num_layers, encoder.out_dim) == (2, 8)
    assert out.shape == (blocks[-1].num_dst_nodes(), 8)
    first = encoder.layer_forward(0, adjs[0], x)
    torch.testing.assert_close(out, encoder.layer_forward(1, adjs[1], first))
    out.square().sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in encoder.parameters())
    assert x.grad.abs().sum() > 0


@pytest.mark.parametrize("hidden", [[4, 8], [24, 8]], ids=["narrowing", "widening"])
@pytest.mark.parametrize("conv", ["gcn", "sage", "gat"])
def test_column_keep_equals_zeroed_feature_columns(graph, conv, hidden):
    """A view's column mask folded into the first layer's weights gives the forward and the
    weight gradients of the encoder on the features with those columns zeroed."""
    torch.manual_seed(0)
    folded = Encoder(IN_DIM, ModelConfig(conv=conv, hidden=hidden, heads=2))
    zeroed = copy.deepcopy(folded)
    adjs = [Adjacency.from_block(b) for b in sampled_blocks(graph, full=False)]
    x = torch.randn(adjs[0].num_src, IN_DIM)
    keep = torch.rand(IN_DIM, generator=torch.Generator().manual_seed(1)) >= 0.5
    assert 0 < int(keep.sum()) < IN_DIM
    out = folded(adjs, x, keep)
    expected = zeroed(adjs, mask_features(x, keep))
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(out, zeroed(adjs, x), atol=1e-3)  # the mask does change the output
    out.square().sum().backward()
    expected.square().sum().backward()
    for (name, p), q in zip(folded.named_parameters(), zeroed.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_encoder_final_activation_switch(graph):
    adjs = [Adjacency.from_block(b) for b in sampled_blocks(graph, full=False)]
    x = torch.randn(adjs[0].num_src, IN_DIM)
    bare = Encoder(IN_DIM, ModelConfig(hidden=[16, 8], final_activation=False))
    bare_last = bare.convs[1](adjs[1], bare.layer_forward(0, adjs[0], x))
    torch.testing.assert_close(bare(adjs, x), bare_last)
    activated = Encoder(IN_DIM, ModelConfig(hidden=[16, 8]))
    activated.load_state_dict(bare.state_dict(), strict=False)
    last = activated.convs[1](adjs[1], activated.layer_forward(0, adjs[0], x))
    torch.testing.assert_close(activated(adjs, x),
                               activated.activations[1](activated.norms[1](last)))
    assert isinstance(activated.norms[1], torch.nn.BatchNorm1d)


def test_encoder_checks_number_of_blocks_and_rows(graph):
    adjs = [Adjacency.from_block(b) for b in sampled_blocks(graph, full=False)]
    encoder = Encoder(IN_DIM, ModelConfig(hidden=[8, 8]))
    with pytest.raises(ValueError, match="2 layers"):
        encoder(adjs[:1], torch.randn(adjs[0].num_src, IN_DIM))
    with pytest.raises(ValueError, match="source nodes"):
        encoder(adjs, torch.randn(adjs[0].num_src + 1, IN_DIM))


def test_encoder_runs_on_a_whole_graph(graph):
    adj = Adjacency.from_block(graph)
    encoder = Encoder(IN_DIM, ModelConfig(conv="sage", hidden=[8, 4]))
    assert encoder([adj, adj], torch.randn(graph.num_nodes(),
                                           IN_DIM)).shape == (graph.num_nodes(), 4)


def test_predictor_keeps_shape_and_is_an_mlp():
    predictor = Predictor(8, 32)
    layers = [type(m) for m in predictor.net]
    assert layers == [torch.nn.Linear, torch.nn.PReLU, torch.nn.Linear]
    assert predictor(torch.randn(10, 8)).shape == (10, 8)


# --- no DGL kernel in the forward pass ------------------------------------------------------

def meta_adjacencies(graph) -> list[Adjacency]:
    adjs = [Adjacency.from_block(b) for b in sampled_blocks(graph, full=False)]
    return [a.with_degrees(torch.rand(a.num_src), torch.rand(a.num_dst)).to("meta") for a in adjs]


@pytest.mark.parametrize("conv", ["gcn", "sage", "gat"])
def test_forward_and_backward_run_on_meta_device(graph, conv):
    """DGL cannot run on the meta device, so this proves the model uses torch ops only."""
    adjs = meta_adjacencies(graph)
    with torch.device("meta"):
        encoder = Encoder(IN_DIM, ModelConfig(conv=conv, hidden=[16, 8], heads=2))
        predictor = Predictor(8, 16)
        x = torch.randn(adjs[0].num_src, IN_DIM)
    loss = predictor(encoder(adjs, x)).sum()
    assert loss.device.type == "meta"
    loss.backward()
    assert all(p.grad is not None and p.grad.device.type == "meta" for p in encoder.parameters())


@pytest.mark.parametrize("conv", ["gcn", "sage", "gat"])
def test_cpu_forward_and_backward_call_no_dgl_code(graph, conv):
    adjs = [Adjacency.from_block(b) for b in sampled_blocks(graph, full=False)]
    encoder = Encoder(IN_DIM, ModelConfig(conv=conv, hidden=[16, 8], heads=2))
    x = torch.randn(adjs[0].num_src, IN_DIM)
    dgl_dir = str(Path(dgl.__file__).parent)
    dgl_calls = []

    def profile(frame, event, arg):
        if event == "call" and frame.f_code.co_filename.startswith(dgl_dir):
            dgl_calls.append(frame.f_code.co_name)

    sys.setprofile(profile)
    try:
        encoder(adjs, x).sum().backward()
    finally:
        sys.setprofile(None)
    assert dgl_calls == []
    # The probe does see DGL when it is called.
    sys.setprofile(profile)
    try:
        graph.in_degrees()
    finally:
        sys.setprofile(None)
    assert dgl_calls


def test_model_config_loads_through_config_sections():
    import argparse

    from bgrl_dgl.config import add_arguments, section_from_dict
    from bgrl_dgl.errors import InputError

    config = section_from_dict(ModelConfig, {"conv": "gat", "hidden": [8, 4], "heads": 2},
                               "run.yaml")
    assert (config.conv, config.hidden, config.heads) == ("gat", [8, 4], 2)
    with pytest.raises(InputError, match="divisible"):
        section_from_dict(ModelConfig, {"conv": "gat", "hidden": [6], "heads": 4}, "run.yaml")
    parser = argparse.ArgumentParser()
    add_arguments(parser, ModelConfig)
    args = parser.parse_args(["--hidden", "32,16", "--final-activation", "false"])
    assert args.hidden == [32, 16] and args.final_activation is False
