"""Benchmark the shared hot-feature cache: hit rate, and rows gathered per second from a cold
feature file with and without the cache.

A power-law synthetic store is prepared (by default 4M nodes with 256-d float32 features, a
4 GiB feature file; ``--store DIR`` keeps it for the next run, and a later run with other
graph options refuses it) and a cache is built with a budget of ``--budget-fraction`` of the
feature bytes (default 10%). ``--sources powerlaw`` draws edge sources by the power-law
weights too (see ``prepare synthetic --sources``), which concentrates the edges on the hubs;
the store's skew is reported as ``top10_degree_share``, the fraction of edge endpoints held
by the 10% of nodes of highest in-degree. Batches are sampled as
training samples them (seed batches of ``--batch-size`` from the first epoch's permutation,
neighbours with ``--fanouts``; the defaults of ``bgrl-dgl train``), then the input features of
every batch are gathered twice, without and with the cache, alternating per batch.

A feature file far larger than memory is simulated by dropping the file's pages from the page
cache before every gather (``posix_fadvise(POSIX_FADV_DONTNEED)``, in both arms): each gather
maps the file afresh and unmaps it before the pages are dropped, since the kernel keeps pages
that a process still maps. Both arms map the file with the same ``--advice``: ``random``
(the default, how a sampler with a cache maps it: a fault reads one page) or ``normal`` (a
fault reads the device's read-ahead window around the row). Bytes read are counted twice:
``read_bytes`` of ``/proc/self/io`` (what the disk delivered, read-around included) and the
4 KiB pages holding the rows read from the file.

The last line printed is one JSON object: ``hit_rate``, ``cached_rows_per_s``,
``uncached_rows_per_s``, ``speedup``, ``top10_degree_share``, the bytes read per arm and
details.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from bgrl_dgl.loading.feature_cache import FeatureCache
from bgrl_dgl.loading.features import advise_random_reads, read_rows
from bgrl_dgl.loading.loader import SamplingConfig, epoch_permutation
from bgrl_dgl.loading.sampler import BlockSampler
from bgrl_dgl.store.reader import GraphStore

REPO = Path(__file__).resolve().parents[1]
PAGE = 4096
TOP_FRACTION = 0.1  # of the nodes, by in-degree, whose share of edge endpoints is reported


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    defaults = SamplingConfig()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-nodes", type=int, default=4_000_000)
    parser.add_argument("--avg-degree", type=float, default=10.0,
                        help="input edges per node of the synthetic graph (default: 10)")
    parser.add_argument("--degree-exponent", type=float, default=2.5,
                        help="power-law exponent of the in-degrees (default: 2.5, as prepare)")
    parser.add_argument("--sources", choices=["uniform", "powerlaw"], default="uniform",
                        help="how the synthetic graph's edges pick their source (default: "
                             "uniform, as prepare)")
    parser.add_argument("--feat-dim", type=int, default=256)
    parser.add_argument("--feature-dtype", choices=["float16", "float32"], default="float32")
    parser.add_argument("--budget-fraction", type=float, default=0.1,
                        help="cache budget as a fraction of the feature bytes (default: 0.1)")
    parser.add_argument("--policy", choices=["degree", "sampled"], default="degree")
    parser.add_argument("--fanouts", default=",".join(map(str, defaults.fanouts)))
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--batches", type=int, default=30, help="batches gathered per arm")
    parser.add_argument("--advice", choices=["random", "normal"], default="random",
                        help="madvise of the feature file's mapping in both arms: 'random' (as "
                             "a sampler with a cache reads it) or 'normal' (kernel read-around "
                             "of the device's read-ahead size on every fault)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--store", type=Path,
                        help="store directory: used if it exists, else prepared there and kept "
                             "(default: a temporary one)")
    return parser.parse_args(argv)


def graph_params(args: argparse.Namespace) -> dict:
    """The ``prepare synthetic`` options of the benchmark's store, as its meta records them."""
    return {"num_nodes": args.num_nodes, "avg_degree": args.avg_degree,
            "degree_exponent": args.degree_exponent, "sources": args.sources,
            "feat_dim": args.feat_dim, "num_classes": 10, "feature_dtype": args.feature_dtype,
            "seed": args.seed}


def prepare_store(args: argparse.Namespace, out: Path) -> float:
    """Write the synthetic store; returns the seconds it took."""
    flags = [x for name, value in graph_params(args).items()
             for x in ("--" + name.replace("_", "-"), str(value))]
    command = [sys.executable, "-m", "bgrl_dgl", "prepare", "synthetic", "--out", str(out),
               *flags]
    print("running:", " ".join(command), flush=True)
    start = time.perf_counter()
    subprocess.run(command, cwd=REPO, stdin=subprocess.DEVNULL, check=True)
    return time.perf_counter() - start


def check_reused_store(args: argparse.Namespace, store: GraphStore) -> None:
    """Exit if an existing ``--store`` was prepared with other graph options (a store from
    before ``--sources`` existed has uniform sources)."""
    params = {"sources": "uniform", **store.meta["source"]["params"]}
    differ = {name: (params.get(name), value) for name, value in graph_params(args).items()
              if params.get(name) != value}
    if differ:
        sys.exit(f"{store.path} was prepared with other options (stored, asked): {differ}; "
                 f"pass another --store")


def top_degree_share(store: GraphStore, fraction: float) -> float:
    """Fraction of the edge endpoints (in- plus out-degrees) held by the ``fraction`` of the
    nodes with the highest in-degree."""
    in_degrees, out_degrees = store.in_degrees(), store.out_degrees()
    count = max(1, round(fraction * store.num_nodes))
    top = np.argpartition(in_degrees, store.num_nodes - count)[store.num_nodes - count:]
    return float(in_degrees[top].sum() + out_degrees[top].sum()) / (2 * store.num_edges)


def sample_input_nodes(store: GraphStore, fanouts: list[int], batch_size: int,
                       num_batches: int, seed: int) -> list[np.ndarray]:
    """Input node ids of the first ``num_batches`` batches of epoch 0, as training samples
    them: one int64 array per batch."""
    sampler = BlockSampler(store.graph, fanouts)
    order = epoch_permutation(store.num_nodes, seed, 0)
    batches = []
    for index in range(num_batches):
        seeds = torch.from_numpy(order[index * batch_size:(index + 1) * batch_size])
        input_nodes, _ = sampler.sample(seeds, seed + index)
        batches.append(input_nodes.numpy().astype(np.int64))
    return batches


def read_bytes() -> int:
    """Bytes this process has caused to be read from storage."""
    with open("/proc/self/io", encoding="ascii") as io:
        for line in io:
            if line.startswith("read_bytes:"):
                return int(line.split()[1])
    raise RuntimeError("/proc/self/io has no read_bytes")


def drop_page_cache(path: Path) -> None:
    """Evict the file's pages that no process maps from the page cache."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


@contextmanager
def cold_features(path: Path, advice: str) -> Iterator[np.ndarray]:
    """The feature matrix, memory-mapped with none of its pages in memory."""
    drop_page_cache(path)
    features = np.load(path, mmap_mode="r")
    if advice == "random":
        advise_random_reads(features)
    try:
        yield features
    finally:
        del features  # unmapped, so that the next drop reaches every page read here


def row_page_bytes(ids: np.ndarray, row_bytes: int, data_offset: int) -> int:
    """Bytes of the distinct 4 KiB pages of the file that hold rows ``ids``."""
    first = (data_offset + ids * row_bytes) // PAGE
    last = (data_offset + (ids + 1) * row_bytes - 1) // PAGE
    if row_bytes > PAGE:
        pages = np.concatenate([np.arange(a, b + 1) for a, b in zip(first, last)])
    else:
        pages = np.concatenate([first, last])
    return len(np.unique(pages)) * PAGE


@dataclass
class Arm:
    rows: int = 0
    seconds: float = 0.0
    read_bytes: int = 0
    row_page_bytes: int = 0
    hits: int = 0
    outputs: list[np.ndarray] = field(default_factory=list)

    @property
    def rows_per_s(self) -> float:
        return self.rows / self.seconds


def gather_cold(path: Path, advice: str, ids: np.ndarray, cache: FeatureCache | None, arm: Arm,
                row_bytes: int, data_offset: int) -> np.ndarray:
    """Gather rows ``ids`` from the cold feature file (through ``cache`` if given) into
    ``arm``'s totals; returns the rows."""
    with cold_features(path, advice) as features:
        before = read_bytes()
        start = time.perf_counter()
        if cache is None:
            rows, hits = read_rows(features, ids), 0
        else:
            rows, hits = cache.gather(features, ids)
        arm.seconds += time.perf_counter() - start
        arm.read_bytes += read_bytes() - before
    missed = ids if cache is None else ids[np.asarray(cache.slot_of[ids]) < 0]
    arm.rows += len(ids)
    arm.hits += hits
    arm.row_page_bytes += row_page_bytes(np.unique(missed), row_bytes, data_offset)
    return rows


def features_mapped(path: Path) -> bool:
    with open("/proc/self/maps", encoding="utf-8") as maps:
        return str(path) in maps.read()


def run(args: argparse.Namespace, store_dir: Path) -> dict:
    prepare_s = None
    if not (store_dir / "meta.json").exists():
        prepare_s = prepare_store(args, store_dir)
    load_before = os.getloadavg()[0]  # other work on the machine skews the timings
    store = GraphStore.open(store_dir)
    check_reused_store(args, store)
    top_share = top_degree_share(store, TOP_FRACTION)
    print(f"skew: the top {TOP_FRACTION:.0%} of nodes by in-degree hold {top_share:.3f} of "
          f"the edge endpoints", flush=True)
    path = store.array_path("features").resolve()
    row_bytes = store.feat_dim * store.feat_dtype.itemsize
    feature_bytes = store.num_nodes * row_bytes
    data_offset = os.path.getsize(path) - feature_bytes
    budget = int(args.budget_fraction * feature_bytes)
    fanouts = [int(f) for f in args.fanouts.split(",")]
    batches = sample_input_nodes(store, fanouts, args.batch_size, args.batches, args.seed)
    start = time.perf_counter()
    cache = FeatureCache.build(store, budget, args.policy, fanouts=fanouts,
                               batch_size=args.batch_size, seed=args.seed)
    build_s = time.perf_counter() - start
    cache_rows = cache.num_rows
    num_nodes, feat_dim = store.num_nodes, store.feat_dim
    del store  # unmaps the features the build read, which the page drops must reach
    gc.collect()
    if features_mapped(path):
        sys.exit(f"{path} is still mapped: its pages cannot be dropped")
    print(f"cache: {cache.num_rows:,} rows ({cache.nbytes / 2**20:.0f} MiB, budget {budget:,} "
          f"bytes) + slot map {4 * num_nodes / 2**20:.0f} MiB in {cache.directory}, "
          f"built in {build_s:.1f} s", flush=True)
    uncached, cached = Arm(), Arm()
    try:
        for index, ids in enumerate(batches):
            plain = gather_cold(path, args.advice, ids, None, uncached, row_bytes, data_offset)
            through_cache = gather_cold(path, args.advice, ids, cache, cached, row_bytes,
                                        data_offset)
            if not np.array_equal(plain, through_cache):
                sys.exit(f"batch {index}: the cache returned other rows than the file")
    finally:
        cache.close()
    report = {
        "hit_rate": cached.hits / cached.rows,
        "cached_rows_per_s": cached.rows_per_s,
        "uncached_rows_per_s": uncached.rows_per_s,
        "speedup": cached.rows_per_s / uncached.rows_per_s,
        "cached_read_bytes": cached.read_bytes,
        "uncached_read_bytes": uncached.read_bytes,
        "cached_row_page_bytes": cached.row_page_bytes,
        "uncached_row_page_bytes": uncached.row_page_bytes,
        "rows_gathered": cached.rows,
        "batches": len(batches),
        "cache_rows": cache_rows,
        "cache_bytes": budget,
        "feature_bytes": feature_bytes,
        "slot_map_bytes": 4 * num_nodes,
        "build_s": build_s,
        "prepare_s": prepare_s,
        "num_nodes": num_nodes,
        "feat_dim": feat_dim,
        "feature_dtype": args.feature_dtype,
        "policy": args.policy,
        "advice": args.advice,
        "degree_exponent": args.degree_exponent,
        "sources": args.sources,
        "top10_degree_share": top_share,
        "fanouts": fanouts,
        "batch_size": args.batch_size,
        "load_avg_before": load_before,
    }
    print(f"hit rate {report['hit_rate']:.3f} (goal >= 0.5) with {args.budget_fraction:.0%} of "
          f"the feature bytes cached ({args.policy} policy); mapping advice {args.advice}")
    print(f"rows/s from a cold file: {uncached.rows_per_s:,.0f} without the cache, "
          f"{cached.rows_per_s:,.0f} with it: {report['speedup']:.2f}x (goal >= 2)")
    print(f"bytes read per batch: {uncached.read_bytes / len(batches) / 2**20:.1f} MiB without, "
          f"{cached.read_bytes / len(batches) / 2**20:.1f} MiB with the cache "
          f"(pages holding the rows read: {uncached.row_page_bytes / len(batches) / 2**20:.1f} "
          f"and {cached.row_page_bytes / len(batches) / 2**20:.1f} MiB)")
    return report


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.store is not None:
        report = run(args, args.store)
    else:
        with tempfile.TemporaryDirectory(prefix="bench-cache-") as tmp:
            report = run(args, Path(tmp) / "store")
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
