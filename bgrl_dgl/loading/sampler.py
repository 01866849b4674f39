"""Neighbour sampling: the one DGL recipe of the project, and the batches it produces.

The recipe (:class:`BlockSampler`): ``dgl.dataloading.NeighborSampler(fanouts,
fused=False)``, run with one OpenMP thread, seeded by ``dgl.seed`` for each batch. Training
batches, sampled inference, the feature cache's ``sampled`` policy and the benchmarks all
sample through it, because DGL 2.1.0 has two traps:

* its fused sampler (the default whenever OpenMP has several threads) keeps an int64 node
  mapping between calls that its int32 kernel misreads: from the second batch on, blocks of
  an int32 graph get edges from the wrong sources;
* with several OpenMP threads the node order of its blocks depends on thread scheduling, so
  a seed no longer determines a batch (and the thread pool contends with compute).
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Callable, Iterator

import dgl
import numpy as np
import torch

from bgrl_dgl.loading.features import FeatureSource
from bgrl_dgl.model.adjacency import Adjacency
from bgrl_dgl.model.sparse import SparseRows
from bgrl_dgl.store.reader import GraphStore


@dataclass
class SampledView:
    """One sampled computation graph: ``adjs[0]`` consumes ``features``.

    ``input_nodes``: [adjs[0].num_src] int64 store ids; ``features``: [adjs[0].num_src, F]
    in the store's dtype (float16 or float32), dense or as sparse rows (their non-zeros),
    float32 once moved by :meth:`to`;
    ``adjs[-1].num_dst`` equals the number of seed nodes. ``cache_hits`` and
    ``cache_misses`` count the feature rows found in and missing from the feature cache (both 0
    without one).
    """

    adjs: list[Adjacency]
    input_nodes: torch.Tensor
    features: torch.Tensor | SparseRows
    cache_hits: int = 0
    cache_misses: int = 0

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "SampledView":
        return SampledView([a.to(device) for a in self.adjs], self.input_nodes,
                           self.features.to(device, non_blocking=non_blocking).float(),
                           self.cache_hits, self.cache_misses)

    def pin_memory(self) -> "SampledView":
        """The view with its features in page-locked memory (for asynchronous copies to a
        GPU; the DataLoader's pinning thread calls this)."""
        return SampledView(self.adjs, self.input_nodes, self.features.pin_memory(),
                           self.cache_hits, self.cache_misses)


@dataclass
class SampledBatch:
    """Seed nodes [B] int64 and their two views (the same object twice unless independent)."""

    seeds: torch.Tensor
    views: tuple[SampledView, SampledView]
    sample_s: float
    gather_s: float

    @property
    def cache_lookups(self) -> tuple[int, int]:
        """(hits, misses) of the feature cache over the batch's distinct views."""
        views = self.views[:1] if self.views[0] is self.views[1] else self.views
        return sum(v.cache_hits for v in views), sum(v.cache_misses for v in views)

    def _map_views(self, convert: Callable[[SampledView], SampledView]) -> "SampledBatch":
        """The batch with ``convert`` applied once to each distinct view."""
        first = convert(self.views[0])
        second = first if self.views[1] is self.views[0] else convert(self.views[1])
        return SampledBatch(self.seeds, (first, second), self.sample_s, self.gather_s)

    def pin_memory(self) -> "SampledBatch":
        return self._map_views(SampledView.pin_memory)

    def with_float32_features(self) -> "SampledBatch":
        return self._map_views(lambda view: SampledView(
            view.adjs, view.input_nodes, view.features.float(), view.cache_hits,
            view.cache_misses))

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "SampledBatch":
        """The views on ``device`` with float32 features (a view shared by both is moved once)."""
        return self._map_views(lambda view: view.to(device, non_blocking=non_blocking))


def batch_rng_seed(seed: int, epoch: int, batch: int, rank: int = 0) -> int:
    """A 31-bit seed (what ``dgl.seed`` accepts) for rank ``rank``'s share of one batch,
    whichever process samples it."""
    # Rank 0 samples what a single-process run samples.
    entropy = [seed, epoch, batch] + ([rank] if rank else [])
    state = np.random.SeedSequence(entropy).generate_state(1, dtype=np.uint32)
    return int(state[0]) >> 1


@contextlib.contextmanager
def one_omp_thread() -> Iterator[None]:
    """Run DGL's sampling single-threaded: with several OpenMP threads the node order of its
    blocks depends on thread scheduling (batches would not be reproducible), and the pool
    contends with compute threads."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


class BlockSampler:
    """DGL neighbour sampling of blocks over ``graph`` with per-layer ``fanouts`` (input
    layer first; -1 = all neighbours), the same blocks for the same ``rng_seed``."""

    def __init__(self, graph: dgl.DGLGraph, fanouts: list[int]) -> None:
        self.graph = graph
        self._sampler = dgl.dataloading.NeighborSampler(list(fanouts), fused=False)

    @contextlib.contextmanager
    def seeded(self, rng_seed: int) -> Iterator[None]:
        """Sample single-threaded from ``rng_seed`` (a 31-bit int) inside the block."""
        with one_omp_thread():
            dgl.seed(rng_seed)
            yield

    def blocks(self, seeds: torch.Tensor) -> tuple[torch.Tensor, list[dgl.DGLGraph]]:
        """(input node ids, blocks) of ``seeds``; call inside :meth:`seeded`."""
        input_nodes, _, blocks = self._sampler.sample_blocks(self.graph,
                                                             seeds.to(self.graph.idtype))
        return input_nodes, blocks

    def sample(self, seeds: torch.Tensor, rng_seed: int) -> tuple[torch.Tensor, list[dgl.DGLGraph]]:
        """(input node ids, blocks) of ``seeds`` sampled from ``rng_seed``."""
        with self.seeded(rng_seed):
            return self.blocks(seeds)


class NeighborBatchSampler:
    """Samples the blocks of one seed batch from the store's graph and gathers features.

    Args:
        store: the graph store.
        fanouts: neighbours per layer, input layer first (-1 = all).
        graph_degrees: attach whole-graph degrees to the blocks (GCN normalisation).
        features: where feature rows come from (default: the store's matrix, no cache).
        degrees: the whole-graph (out-degree, in-degree) [N] float32 to attach, e.g. maps of
            the machine's shared files (default: counted here when ``graph_degrees``).
        sparse_rows: hand over the gathered rows as their non-zeros (:class:`SparseRows`,
            extracted here, in the sampling worker); the time counts as gathering.
    """

    def __init__(self, store: GraphStore, fanouts: list[int], graph_degrees: bool,
                 features: FeatureSource | None = None,
                 degrees: tuple[torch.Tensor, torch.Tensor] | None = None,
                 sparse_rows: bool = False) -> None:
        self.store = store
        self.sparse_rows = sparse_rows
        self.features = FeatureSource(store.features) if features is None else features
        self.blocks = BlockSampler(store.graph, fanouts)
        self.degrees = None
        if graph_degrees:
            self.degrees = _graph_degrees(store) if degrees is None else degrees

    def _view(self, seeds: torch.Tensor) -> tuple[SampledView, float, float]:
        start = time.perf_counter()
        input_nodes, blocks = self.blocks.blocks(seeds)
        adjs = [self._adjacency(block) for block in blocks]
        sampled = time.perf_counter()
        features, hits, misses = self.features.gather(input_nodes)
        if self.sparse_rows:
            features = SparseRows.from_dense(features)
        view = SampledView(adjs, input_nodes.long(), features, hits, misses)
        return view, sampled - start, time.perf_counter() - sampled

    def _adjacency(self, block: dgl.DGLGraph) -> Adjacency:
        adj = Adjacency.from_block(block)
        if self.degrees is None:
            return adj
        src_ids = block.srcdata[dgl.NID].long()
        dst_ids = block.dstdata[dgl.NID].long()
        out_deg, in_deg = self.degrees
        return adj.with_degrees(src_degree=out_deg[src_ids], dst_degree=in_deg[dst_ids])

    def view(self, seeds: torch.Tensor, rng_seed: int) -> SampledView:
        """One sampled view of ``seeds`` [B] int64 (inference)."""
        with self.blocks.seeded(rng_seed):
            return self._view(seeds)[0]

    def sample(self, seeds: torch.Tensor, rng_seed: int, independent: bool) -> SampledBatch:
        """The training batch of ``seeds`` [B] int64: one view used twice, or two
        independently sampled ones; the same ``rng_seed`` gives the same blocks."""
        with self.blocks.seeded(rng_seed):
            first, sample_s, gather_s = self._view(seeds)
            second = first
            if independent:
                second, more_sample, more_gather = self._view(seeds)
                sample_s, gather_s = sample_s + more_sample, gather_s + more_gather
        return SampledBatch(seeds, (first, second), sample_s, gather_s)


def _graph_degrees(store: GraphStore) -> tuple[torch.Tensor, torch.Tensor]:
    """(out-degree, in-degree) of every node: [N] float32 each."""
    return (torch.from_numpy(store.out_degrees().astype(np.float32)),
            torch.from_numpy(store.in_degrees().astype(np.float32)))

