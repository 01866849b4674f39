"""``prepare synthetic``: a random graph with planted classes, generated block by block.

The model (a degree-corrected planted partition):

* A seeded permutation ``order`` of the node ids deals the nodes into ``C`` classes like
  cards: the node at position ``p`` of ``order`` has class ``p % C`` and rank ``p // C``
  within its class, so class sizes differ by at most one.
* There are ``E = round(num_nodes * avg_degree)`` input edges. Destinations are drawn in
  proportion to a weight, so in-degrees are heavy-tailed, like citation counts. A node of
  rank ``r`` has weight about ``(r + 1) ** -beta`` with ``beta = 1 / (degree_exponent - 1)``,
  so expected in-degrees follow the power law
  ``P(in-degree >= k) ~ k ** -(degree_exponent - 1)``. A node in a given class is drawn by
  inverting the continuous power-law CDF over ranks, which needs no per-node table.
* Sources follow ``--sources``:

  - ``uniform`` (the default): edge ``i`` leaves node ``floor(i * N / E)``, so every node
    is the source of ``avg_degree`` input edges (rounded down or up), like the reference
    list of a paper. Out-degrees are flat; only in-degrees follow the power law, and a
    hub's neighbours are mostly low-weight nodes.
  - ``powerlaw``: every edge draws its source like a destination, from a class drawn
    uniformly at random and then by weight within it, so a node's expected out-degree is
    proportional to its weight too, and both degrees follow the power law with the same
    exponent (a degree-corrected planted partition of Chung-Lu type). Both ends of an edge
    favour hubs, so hubs link to hubs and the stored (symmetrized) degrees are more skewed
    than under ``uniform``.

* The destination's class is the source's with probability ``homophily``, else one of the
  other classes uniformly. So ``homophily`` is the expected fraction of same-class input
  edges.
* Features are ``mean[class] + feature_noise * noise`` with random unit-norm class means and
  standard Gaussian noise quantized to 2**16 levels (a table lookup by a random 16-bit
  index, several times cheaper than exact sampling). A classifier on raw features is
  mediocre; averaging over (mostly same-class) neighbours shrinks the noise.

Every block of edges or feature rows draws from its own generator,
``SeedSequence(seed, spawn_key=(stream, block))``, with blocks of a fixed size (``powerlaw``
sources come from a stream of their own; destinations come from the edge stream under both
source models). So the output depends only on the options and the seed (never on the memory
budget or the number of threads), and every pass over the edges yields the same arrays.
"""
from __future__ import annotations

import argparse
import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterator, TypeVar

import numpy as np
from scipy.special import ndtri

from bgrl_dgl.errors import InputError
from bgrl_dgl.sources import UNDIRECTED, Source
from bgrl_dgl.splits import DEFAULT_FRACTIONS, parse_fractions, stratified_split
from bgrl_dgl.store.capacity import StorePlan
from bgrl_dgl.store.format import MAX_CLASSES

if TYPE_CHECKING:
    from bgrl_dgl.store.writer import StoreWriter

SOURCE_PATH = "synthetic"
EDGE_BLOCK = 1 << 20            # input edges per random block
FEATURE_BLOCK_VALUES = 1 << 22  # feature values per random block (rows = this // feat_dim)
NOISE_LEVELS = 1 << 16          # quantization levels of the Gaussian feature noise
WORKERS = min(2, os.cpu_count() or 1)

# Independent random streams: spawn_key[0] of each generator.
_NODE_STREAM, _EDGE_STREAM, _MEAN_STREAM, _FEATURE_STREAM, _LABEL_STREAM, _SOURCE_STREAM = \
    range(6)
SOURCE_MODELS = ("uniform", "powerlaw")
# Bounds that keep every id and count computation within int64; the machine's disk and
# memory (checked before generating) are the real limits.
MAX_NODES = 1 << 40
MAX_EDGES = 1 << 44
MAX_FEAT_DIM = 1 << 24
FEATURE_KINDS = ("gaussian", "binary")
TOPIC_FRACTION = 0.1  # share of the columns that are a class's topic columns (binary features)

T = TypeVar("T")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--num-nodes", type=int, required=True, help="number of nodes")
    parser.add_argument("--avg-degree", type=float, required=True,
                        help="input edges per node, before symmetrization, self-loop "
                             "removal and dedup")
    parser.add_argument("--feat-dim", type=int, required=True, help="feature dimension")
    parser.add_argument("--num-classes", type=int, required=True,
                        help="number of planted classes")
    parser.add_argument("--homophily", type=float, default=0.8,
                        help="expected fraction of input edges that join two nodes of the same "
                             "class (default: 0.8)")
    parser.add_argument("--feature-noise", type=float, default=1.5,
                        help="std of the Gaussian noise on each feature coordinate; class means "
                             "have unit norm (default: 1.5)")
    parser.add_argument("--feature-kind", choices=FEATURE_KINDS, default="gaussian",
                        help="'gaussian' (class mean + Gaussian noise) or 'binary' (sparse 0/1 "
                             "bag-of-words-like rows, see --feature-density) (default: gaussian)")
    parser.add_argument("--feature-density", type=float, default=0.01,
                        help="with --feature-kind binary: expected fraction of ones per row; a "
                             "share 1 / (1 + feature-noise) of them falls on the class's topic "
                             "columns, the rest anywhere (default: 0.01)")
    parser.add_argument("--degree-exponent", type=float, default=2.5,
                        help="power-law exponent of the in-degree distribution (and of the "
                             "out-degrees with --sources powerlaw), > 2 (default: 2.5)")
    parser.add_argument("--sources", choices=SOURCE_MODELS, default="uniform",
                        help="how input edges pick their source: 'uniform' (every node is "
                             "the source of avg-degree edges, rounded) or 'powerlaw' (drawn "
                             "by the same power-law weights as destinations, so hubs link to "
                             "hubs) (default: uniform)")
    parser.add_argument("--label-fraction", type=float, default=1.0,
                        help="fraction of nodes that keep their label; the others get -1 "
                             "(default: 1.0)")
    parser.add_argument("--split", type=parse_fractions, default=DEFAULT_FRACTIONS,
                        help="train/valid/test fractions of the labeled nodes, stratified by "
                             "class (default: 0.1/0.1/0.8)")


@dataclass(frozen=True)
class Options:
    """Validated generator options (see :func:`add_arguments` for their meaning)."""

    num_nodes: int
    num_edges: int
    feat_dim: int
    num_classes: int
    homophily: float
    feature_noise: float
    degree_exponent: float
    label_fraction: float
    sources: str
    seed: int
    feature_kind: str = "gaussian"
    feature_density: float = 0.01

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "Options":
        """Check the options; a bad one -> InputError naming its flag."""
        require(args.num_nodes >= 1, "--num-nodes", "must be at least 1")
        require(args.num_nodes <= MAX_NODES, "--num-nodes", f"must be at most {MAX_NODES:,}")
        require(1 <= args.num_classes <= args.num_nodes, "--num-classes",
                "must be between 1 and --num-nodes")
        require(args.num_classes <= MAX_CLASSES, "--num-classes",
                f"must be at most {MAX_CLASSES:,}")
        require(args.feat_dim >= 1, "--feat-dim", "must be at least 1")
        require(args.feat_dim <= MAX_FEAT_DIM, "--feat-dim", f"must be at most {MAX_FEAT_DIM:,}")
        require(np.isfinite(args.avg_degree) and args.avg_degree > 0, "--avg-degree",
                "must be a positive number")
        require(args.num_nodes * args.avg_degree <= MAX_EDGES, "--avg-degree",
                f"gives more than {MAX_EDGES:,} edges")
        num_edges = round(args.num_nodes * args.avg_degree)
        require(num_edges >= 1, "--avg-degree", "gives no edges for this --num-nodes")
        require(0.0 <= args.homophily <= 1.0, "--homophily", "must be between 0 and 1")
        require(np.isfinite(args.feature_noise) and args.feature_noise >= 0, "--feature-noise",
                "must be a non-negative number")
        require(np.isfinite(args.degree_exponent) and args.degree_exponent > 2,
                "--degree-exponent", "must be a number greater than 2")
        require(0.0 < args.label_fraction <= 1.0, "--label-fraction",
                "must be greater than 0 and at most 1")
        require(args.sources in SOURCE_MODELS, "--sources",
                "must be one of " + ", ".join(SOURCE_MODELS))
        require(args.seed >= 0, "--seed", "must be a non-negative integer")
        kind = getattr(args, "feature_kind", "gaussian")
        density = getattr(args, "feature_density", 0.01)
        require(kind in FEATURE_KINDS, "--feature-kind",
                "must be one of " + ", ".join(FEATURE_KINDS))
        require(np.isfinite(density) and 0.0 < density <= 1.0, "--feature-density",
                "must be greater than 0 and at most 1")
        return cls(args.num_nodes, num_edges, args.feat_dim, args.num_classes, args.homophily,
                   args.feature_noise, args.degree_exponent, args.label_fraction, args.sources,
                   args.seed, kind, density)


def require(condition: bool, flag: str, problem: str) -> None:
    if not condition:
        raise InputError(flag, problem)


def block_rng(seed: int, stream: int, block: int = 0) -> np.random.Generator:
    """The generator of one block of one random stream."""
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(stream, block)))


def index_dtype(num_nodes: int) -> np.dtype:
    return np.dtype(np.int32 if num_nodes < 2**31 else np.int64)


def power_inplace(x: np.ndarray, exponent: float) -> np.ndarray:
    """``x **= exponent``, by repeated multiplication when the exponent is a small integer
    (the default degree exponent 2.5 gives 3), which is many times faster than ``pow``."""
    if float(exponent).is_integer() and 1 <= exponent <= 8:
        base = x.copy()
        for _ in range(int(exponent) - 1):
            x *= base
    else:
        np.power(x, exponent, out=x)
    return x


def class_dtype(num_classes: int) -> np.dtype:
    """A small integer dtype for class ids ``0 .. num_classes - 1``."""
    for dtype in (np.int8, np.int16, np.int32):
        if num_classes <= np.iinfo(dtype).max:
            return np.dtype(dtype)
    return np.dtype(np.int64)


@dataclass(frozen=True)
class ClassLayout:
    """Which node holds which class and rank: ``order`` [N] int32/int64 is a permutation of
    the node ids; the node at position ``p`` has class ``p % C`` and rank ``p // C``.
    ``node_class`` [N] (int8 for up to 127 classes) is the class of every node id."""

    order: np.ndarray
    node_class: np.ndarray
    num_classes: int
    degree_exponent: float

    @classmethod
    def plant(cls, opts: Options) -> "ClassLayout":
        order = np.arange(opts.num_nodes, dtype=index_dtype(opts.num_nodes))
        block_rng(opts.seed, _NODE_STREAM).shuffle(order)
        node_class = np.empty(opts.num_nodes, dtype=class_dtype(opts.num_classes))
        node_class[order] = np.resize(np.arange(opts.num_classes, dtype=node_class.dtype),
                                      opts.num_nodes)
        return cls(order, node_class, opts.num_classes, opts.degree_exponent)

    @property
    def num_nodes(self) -> int:
        return len(self.order)

    @property
    def max_rank(self) -> int:
        """Ranks run over ``[0, max_rank)`` (the last rank is missing in some classes)."""
        return -(-self.num_nodes // self.num_classes)

    def draw_nodes(self, rng: np.random.Generator, classes: np.ndarray) -> np.ndarray:
        """One node per entry of ``classes`` ([B] int64), drawn in proportion to weight.

        A rank is the integer part, minus one, of a draw from the density ``x ** -beta`` on
        ``[1, max_rank + 1)``, by inverse CDF: ``x = (1 + u * span) ** (1 / (1 - beta))``
        with ``u`` uniform in [0, 1). Returns [B] node ids in ``order``'s dtype.
        """
        beta = 1.0 / (self.degree_exponent - 1.0)
        span = (self.max_rank + 1.0) ** (1.0 - beta) - 1.0
        x = rng.random(len(classes))
        x *= span
        x += 1.0
        power_inplace(x, (self.degree_exponent - 1.0) / (self.degree_exponent - 2.0))
        position = x.astype(np.int64)
        position -= 1
        np.minimum(position, self.max_rank - 1, out=position)
        position *= self.num_classes
        position += classes
        # Classes short of the last rank take the one before it instead.
        np.subtract(position, self.num_classes, out=position,
                    where=position >= self.num_nodes)
        return self.order[position]


def uniform_sources(opts: Options, first: int, count: int, dtype: np.dtype) -> np.ndarray:
    """``uniform`` sources of input edges ``first .. first + count - 1``: [count] ascending
    node ids of ``dtype``.

    Edge ``i`` leaves node ``floor(i * N / E)``, so each node is the source of
    ``floor(E / N)`` or ``ceil(E / N)`` edges, and a block's sources are consecutive nodes
    (which keeps the lookup of their classes in cache).
    """
    # floor((first + j) * N / E) = base + floor((offset + j * N) / E), exact in int64.
    base, offset = divmod(first * opts.num_nodes, opts.num_edges)
    sources = np.arange(count, dtype=np.int64)
    sources *= opts.num_nodes
    sources += offset
    sources //= opts.num_edges
    sources += base
    return sources.astype(dtype)


def powerlaw_sources(opts: Options, layout: ClassLayout, block: int, count: int) -> np.ndarray:
    """``powerlaw`` sources of the ``count`` input edges of edge block ``block``: [count]
    node ids in ``order``'s dtype, each drawn by weight from a uniformly random class, with
    the block's generator of the source stream."""
    rng = block_rng(opts.seed, _SOURCE_STREAM, block)
    return layout.draw_nodes(rng, rng.integers(0, opts.num_classes, size=count))


def edge_block(opts: Options, layout: ClassLayout, block: int) -> tuple[np.ndarray, np.ndarray]:
    """Input edges ``[block * EDGE_BLOCK, ...)``: (src, dst), each [B] int32/int64."""
    first = block * EDGE_BLOCK
    count = min(EDGE_BLOCK, opts.num_edges - first)
    if opts.sources == "powerlaw":
        src = powerlaw_sources(opts, layout, block, count)
    else:
        src = uniform_sources(opts, first, count, layout.order.dtype)
    rng = block_rng(opts.seed, _EDGE_STREAM, block)
    dst_class = layout.node_class[src].astype(np.int64)
    if opts.num_classes > 1:
        crosses = rng.random(count) >= opts.homophily
        shift = rng.integers(1, opts.num_classes, size=count)  # to one of the other classes
        shift *= crosses
        dst_class += shift
        dst_class %= opts.num_classes
    return src, layout.draw_nodes(rng, dst_class)


def num_blocks(total: int, block: int) -> int:
    return -(-total // block)


def ordered_map(fn: Callable[[int], T], count: int, workers: int = WORKERS) -> Iterator[T]:
    """``fn(0), fn(1), ... fn(count - 1)`` in order, computed by ``workers`` threads a few
    items ahead of the consumer (numpy releases the GIL in sampling and array arithmetic)."""
    with ThreadPoolExecutor(workers, thread_name_prefix="synthetic") as pool:
        pending: deque = deque()
        submitted = 0
        try:
            while pending or submitted < count:
                while submitted < count and len(pending) < 2 * workers:
                    pending.append(pool.submit(fn, submitted))
                    submitted += 1
                yield pending.popleft().result()
        finally:
            for future in pending:
                future.cancel()


def edge_chunks(opts: Options, layout: ClassLayout) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """All ``num_edges`` input edges as (src, dst) blocks; the same arrays on every call."""
    return ordered_map(lambda block: edge_block(opts, layout, block),
                       num_blocks(opts.num_edges, EDGE_BLOCK))


def class_means(opts: Options) -> np.ndarray:
    """[C, F] float32 random unit-norm class means."""
    means = block_rng(opts.seed, _MEAN_STREAM).standard_normal((opts.num_classes, opts.feat_dim))
    means /= np.linalg.norm(means, axis=1, keepdims=True)
    return means.astype(np.float32)


def noise_table(std: float) -> np.ndarray:
    """[NOISE_LEVELS] float32 quantiles of N(0, std**2) at the midpoints of equal-mass bins."""
    return (std * ndtri((np.arange(NOISE_LEVELS) + 0.5) / NOISE_LEVELS)).astype(np.float32)


def feature_rows_per_block(feat_dim: int) -> int:
    return max(1, FEATURE_BLOCK_VALUES // feat_dim)


def binary_probabilities(opts: Options) -> np.ndarray:
    """[C, F] float32: the probability of a one in each column for a node of each class.

    Every class has a random set of ``TOPIC_FRACTION * F`` topic columns; a row expects
    ``feature_density * F`` ones, a share ``1 / (1 + feature_noise)`` of them on its class's
    topic columns and the rest spread over all columns."""
    rng = block_rng(opts.seed, _MEAN_STREAM)
    num_topic = max(1, round(TOPIC_FRACTION * opts.feat_dim))
    signal = 1.0 / (1.0 + opts.feature_noise)
    probs = np.full((opts.num_classes, opts.feat_dim), opts.feature_density * (1.0 - signal))
    for row in probs:
        topic = rng.choice(opts.feat_dim, size=num_topic, replace=False)
        row[topic] += opts.feature_density * signal * opts.feat_dim / num_topic
    return np.minimum(probs, 1.0).astype(np.float32)


def binary_block(opts: Options, node_class: np.ndarray, probs: np.ndarray, block: int,
                 dtype: np.dtype) -> np.ndarray:
    """Binary feature rows ``[block * rows_per_block, ...)``: [r, F] 0/1 of ``dtype``."""
    rows = feature_rows_per_block(opts.feat_dim)
    start = block * rows
    stop = min(start + rows, opts.num_nodes)
    draws = block_rng(opts.seed, _FEATURE_STREAM, block).random(
        (stop - start, opts.feat_dim), dtype=np.float32)
    return (draws < probs[node_class[start:stop]]).astype(dtype)


def feature_block(opts: Options, node_class: np.ndarray, means: np.ndarray, noise: np.ndarray,
                  block: int, dtype: np.dtype) -> np.ndarray:
    """Feature rows ``[block * rows_per_block, ...)``: [r, F] float32, or float16 (rounded
    from float32) if ``dtype`` is float16."""
    if opts.feature_kind == "binary":
        return binary_block(opts, node_class, means, block, dtype)
    rows = feature_rows_per_block(opts.feat_dim)
    start = block * rows
    stop = min(start + rows, opts.num_nodes)
    size = (stop - start) * opts.feat_dim
    raw = block_rng(opts.seed, _FEATURE_STREAM, block).bit_generator.random_raw(-(-size // 4))
    levels = raw.view(np.uint16)[:size].reshape(stop - start, opts.feat_dim)
    features = noise[levels]
    features += means[node_class[start:stop]]
    if dtype == np.float16:
        import torch  # numpy's float32 -> float16 cast is scalar code, many times slower

        return torch.from_numpy(features).to(torch.float16).numpy()
    return features


def feature_chunks(opts: Options, node_class: np.ndarray,
                   dtype: np.dtype = np.dtype(np.float32)) -> Iterator[np.ndarray]:
    """Row blocks of the [N, F] features (float32 or float16), in node order, for nodes of
    classes ``node_class`` ([N] integers)."""
    if opts.feature_kind == "binary":  # the class profiles take the place of the means
        means, noise = binary_probabilities(opts), np.zeros(0, np.float32)
    else:
        means, noise = class_means(opts), noise_table(opts.feature_noise)
    return ordered_map(lambda block: feature_block(opts, node_class, means, noise, block, dtype),
                       num_blocks(opts.num_nodes, feature_rows_per_block(opts.feat_dim)))


def feature_dtype(args: argparse.Namespace) -> np.dtype:
    """float16 if that is the stored dtype, else float32. Generating the stored dtype puts
    the conversion in the generator's threads rather than in the writer's."""
    return np.dtype(np.float16 if args.feature_dtype == "float16" else np.float32)


def hide_labels(opts: Options, labels: np.ndarray) -> np.ndarray:
    """``labels`` with all but ``round(label_fraction * N)`` random entries set to -1."""
    num_hidden = opts.num_nodes - round(opts.label_fraction * opts.num_nodes)
    if num_hidden > 0:
        rng = block_rng(opts.seed, _LABEL_STREAM)
        labels[rng.choice(opts.num_nodes, size=num_hidden, replace=False)] = -1
    return labels


def store_plan(opts: Options, args: argparse.Namespace) -> StorePlan:
    """The store these options make, with the generator's own node-sized arrays: the class
    layout (ids and classes), the labels and their split."""
    id_bytes = index_dtype(opts.num_nodes).itemsize
    class_bytes = class_dtype(opts.num_classes).itemsize
    stored = 2 if args.feature_dtype == "float16" else 4
    return StorePlan(opts.num_nodes, opts.num_edges, opts.feat_dim, stored,
                     symmetrize=args.symmetrize, add_self_loops=args.self_loops == "add",
                     resident_bytes=opts.num_nodes * (id_bytes + 2 * class_bytes + 48),
                     what="--num-nodes/--avg-degree/--feat-dim")


def build(args: argparse.Namespace, writer: "StoreWriter") -> None:
    opts = Options.from_args(args)
    writer.plan(store_plan(opts, args))
    layout = ClassLayout.plant(opts)
    writer.write_topology(opts.num_nodes, lambda: edge_chunks(opts, layout),
                          source_path=SOURCE_PATH, symmetrize=args.symmetrize,
                          self_loops=args.self_loops, dedup=args.dedup)
    writer.write_features(opts.num_nodes,
                          feature_chunks(opts, layout.node_class, feature_dtype(args)),
                          source_path=SOURCE_PATH)
    # Small integer labels also make the stable sort inside the split a fast radix sort.
    labels = hide_labels(opts, layout.node_class.copy())
    writer.write_labels(labels, source_path=SOURCE_PATH, num_classes=opts.num_classes)
    for name, ids in stratified_split(labels, args.split, opts.seed).items():
        writer.write_split(name, ids, source_path=SOURCE_PATH)


SOURCE = Source(
    name="synthetic",
    help="generate a power-law graph with planted homophilous classes and noisy features",
    add_arguments=add_arguments,
    build=build,
    topology=UNDIRECTED,
)
