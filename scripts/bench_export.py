"""Benchmark ``bgrl-dgl embed``: nodes per second and peak anonymous memory of exporting the
exact layer-wise embeddings of every node of a large graph to Parquet, against an in-memory
reference in the same run.

The store is a synthetic graph (default: 10M nodes, average input degree 10, 128-d float16
features, 16 classes), prepared once into ``data/bench-export-<size>`` and reused. The
encoder is a 2-layer GCN (``--hidden``) from a one-step run made once with ``train
--max-steps 1`` next to the store. ``python -m bgrl_dgl embed`` then runs in a subprocess
under ``memwatch``: peak ``RssAnon`` summed over the process and its children (the pages of
the memory-mapped store, scratch layers and output files are file-backed and not counted).

The reference computes the same encoder over a store that fits in memory (the embedded one,
or with ``--reference-nodes`` the benchmark store of that size): the features as one float32
tensor, the normalised adjacency with self loops as one ``torch.sparse_csr_tensor``, per
layer one sparse product with the weight applied on the narrower side, then bias, norm and
PReLU; then one zstd Parquet table of the result (node_id, embedding) written with
``pyarrow.parquet.write_table``. Its time counts the products and the write, not loading the
store nor building the matrix. When both run on one store, ``max_abs_diff`` compares their
embeddings.

``--device cuda`` runs the encoder on the GPU (``embed --device cuda``); the embed process
then also reports its peak GPU memory (``torch.cuda.max_memory_allocated``; the reference
stays on the CPU).

With ``--repeats K`` both are run K times, alternating, and the fastest run of each counts.
The last line printed is one JSON object with ``nodes_per_s`` (nodes over the embed
command's wall time, start-up included), ``reference_nodes_per_s``, ``ratio_to_reference``
(reference nodes/s over embed nodes/s), ``peak_anon_gb`` (GiB, 2**30 bytes),
``peak_gpu_mem_gb`` (null on the CPU), ``wall_s``,
``cpu_us_per_node`` (user + sys CPU time of the embed command per node: less sensitive to
other jobs than the wall time),
``load_average`` (1-minute, before and after), ``output_gb`` and the settings.
Goals: ratio <= 1.5 at 1M nodes; at 10M nodes, nodes/s >= 0.8x the 1M figure and peak
anonymous memory <= 2.5 GB.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchlib import DATA, REPO, benchmark_store, run_module
from memwatch import GIB, measure_command

# ``bgrl-dgl ARGS`` in a process that reports its peak GPU memory on its last stderr line
# (-1 where it used no GPU).
PEAK_PREFIX = "peak_gpu_bytes="
EMBED_REPORTING_GPU_MEMORY = f"""
import sys
import torch
from bgrl_dgl.cli import main
code = main(sys.argv[1:])
peak = torch.cuda.max_memory_allocated() if torch.cuda.is_initialized() else -1
sys.stderr.write("{PEAK_PREFIX}" + str(peak) + "\\n")
sys.exit(code)
"""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-nodes", type=int, default=10_000_000)
    parser.add_argument("--avg-degree", type=float, default=10.0,
                        help="input edges per node of the synthetic graph (default: 10)")
    parser.add_argument("--feat-dim", type=int, default=128)
    parser.add_argument("--hidden", default="256,128",
                        help="encoder layer sizes (default: 256,128)")
    parser.add_argument("--dtype", choices=["float32", "float16"], default="float32",
                        help="embedding dtype of the export (default: float32)")
    parser.add_argument("--batch-size", type=int,
                        help="destination nodes per inference batch (default: embed's own)")
    parser.add_argument("--scratch-dtype", choices=["float32", "float16"], default="float32",
                        help="precision of embed's intermediate layers (default: float32)")
    parser.add_argument("--reference-nodes", type=int,
                        help="nodes of the store the in-memory reference runs on (default: "
                             "--num-nodes up to 2M, else 1M)")
    parser.add_argument("--repeats", type=int, default=1,
                        help="runs of each arm, alternating; the fastest counts (default: 1)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                        help="where the encoder runs (default: cpu)")
    parser.add_argument("--out", type=Path,
                        help="export directory to write and keep (default: a temporary one "
                             "under data/, deleted afterwards)")
    return parser.parse_args(argv)


def one_step_run(store: Path, hidden: str) -> Path:
    """A run of one training step on ``store`` (made once): the encoder to export with."""
    run = store.with_name(f"{store.name}-run-{hidden.replace(',', '-')}")
    if not (run / "checkpoints").is_dir():
        shutil.rmtree(run, ignore_errors=True)
        run_module("train", "--data", str(store), "--out", str(run), "--max-steps", "1",
                   "--hidden", hidden, "--num-workers", "0", "--batch-size", "256",
                   "--device", "cpu")
    return run


def directory_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def peak_gpu_gib(stderr: str) -> float | None:
    """The peak GPU memory the embed process reported (GiB), None where it used no GPU."""
    for line in reversed(stderr.splitlines()):
        if line.startswith(PEAK_PREFIX):
            peak = int(line.removeprefix(PEAK_PREFIX))
            return None if peak < 0 else peak / GIB
    return None


def normalised_adjacency(store_dir: Path):
    """The store's CSC with a self loop per node as a float32 sparse CSR tensor with GCN's
    symmetric normalisation (whole-graph degrees + 1), built in memory."""
    import torch

    from bgrl_dgl.store.reader import GraphStore

    store = GraphStore.open(store_dir)
    indptr = np.asarray(store.indptr, dtype=np.int64)
    indices = np.asarray(store.indices, dtype=np.int64)
    n = store.num_nodes
    counts = np.diff(indptr)
    looped = indptr + np.arange(n + 1)
    columns = np.empty(indices.size + n, dtype=np.int64)
    columns[looped[:-1]] = np.arange(n)
    columns[np.arange(indices.size) + np.repeat(np.arange(n), counts) + 1] = indices
    rows = np.repeat(np.arange(n), counts + 1)
    dst = (counts + 1.0) ** -0.5
    src = dst if store.symmetrized else (store.out_degrees() + 1.0) ** -0.5
    values = (dst[rows] * src[columns]).astype(np.float32)
    del rows
    matrix = torch.sparse_csr_tensor(torch.from_numpy(looped), torch.from_numpy(columns),
                                     torch.from_numpy(values), size=(n, n))
    features = torch.from_numpy(np.asarray(store.features, dtype=np.float32))
    return matrix, features


class Reference:
    """The in-memory reference pass over ``store_dir`` with the GCN encoder of ``run``."""

    def __init__(self, store_dir: Path, run: Path) -> None:
        from bgrl_dgl.runs import load_encoder

        self.encoder = load_encoder(run, which="online").encoder
        if self.encoder.config.conv != "gcn":
            sys.exit("the reference is a GCN encoder")
        self.matrix, self.features = normalised_adjacency(store_dir)

    def run(self) -> tuple[float, np.ndarray]:
        """Seconds of the products and the Parquet write, and the embeddings [N, D]."""
        import pyarrow as pa
        import pyarrow.parquet as pq
        import torch

        with tempfile.TemporaryDirectory(prefix="bench-export-ref-", dir=DATA) as tmp:
            start = time.perf_counter()
            with torch.no_grad():
                h = self.features
                for i, conv in enumerate(self.encoder.convs):
                    if conv.out_dim < conv.in_dim:
                        h = self.matrix @ (h @ conv.weight)
                    else:
                        h = (self.matrix @ h) @ conv.weight
                    h = self.encoder.activations[i](self.encoder.norms[i](h + conv.bias))
            values = pa.array(h.numpy().reshape(-1))
            table = pa.table({"node_id": pa.array(np.arange(h.shape[0], dtype=np.int64)),
                              "embedding": pa.FixedSizeListArray.from_arrays(values,
                                                                             h.shape[1])})
            pq.write_table(table, Path(tmp) / "reference.parquet", compression="zstd")
            return time.perf_counter() - start, h.numpy()


def run_embed(args: argparse.Namespace, run: Path,
              out: Path) -> tuple[float, float, float, float | None]:
    """Wall seconds, peak anonymous GiB, CPU seconds (user + sys) and peak GPU GiB (None on
    the CPU) of one embed command."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    command = [sys.executable, "-c", EMBED_REPORTING_GPU_MEMORY, "embed", "--run", str(run),
               "--out", str(out), "--overwrite", "--dtype", args.dtype,
               "--scratch-dtype", args.scratch_dtype, "--device", args.device]
    if args.batch_size is not None:
        command += ["--batch-size", str(args.batch_size)]
    print("running: bgrl-dgl", " ".join(command[3:]), flush=True)
    result = measure_command(command, cwd=REPO, stdin=subprocess.DEVNULL,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if result.returncode != 0:
        sys.exit(f"{result.stderr}embed failed with exit code {result.returncode}")
    print(result.stdout.strip())
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_s = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    print(f"embed: {result.wall_s:.1f} s, {cpu_s:.1f} s of CPU, peak anonymous memory "
          f"{result.peak_anon_gib:.2f} GiB", flush=True)
    return result.wall_s, result.peak_anon_gib, cpu_s, peak_gpu_gib(result.stderr)


def read_export(out: Path) -> np.ndarray:
    import pyarrow.dataset as ds

    table = ds.dataset(out, format="parquet").to_table().sort_by("node_id")
    embedding = table.column("embedding").combine_chunks()
    return embedding.flatten().to_numpy().reshape(len(embedding), -1)


def bench(args: argparse.Namespace, store: Path, run: Path, out: Path) -> dict:
    load_before = os.getloadavg()[0]  # other work on the machine skews the timings
    same_store = args.reference_nodes == args.num_nodes
    if same_store:
        ref_store, ref_run = store, run
    else:
        ref_args = argparse.Namespace(**{**vars(args), "num_nodes": args.reference_nodes})
        ref_store = benchmark_store("export", ref_args, num_classes=16)
        ref_run = one_step_run(ref_store, args.hidden)
    walls, peaks, cpus, ref_walls, gpu_peaks = [], [], [], [], []
    ref = Reference(ref_store, ref_run)
    for _ in range(args.repeats):
        ref_s, expected = ref.run()
        ref_walls.append(ref_s)
        print(f"reference: {ref_s:.2f} s for {args.reference_nodes:,} nodes", flush=True)
        if not same_store:
            expected = None
        wall, peak, cpu_s, peak_gpu = run_embed(args, run, out)
        gpu_peaks.append(peak_gpu)
        walls.append(wall)
        peaks.append(peak)
        cpus.append(cpu_s)
    del ref
    manifest = json.loads((out / "_manifest.json").read_text())
    peak_gpu = None if None in gpu_peaks else max(gpu_peaks)
    wall_s, ref_s = min(walls), min(ref_walls)
    report = {
        "nodes_per_s": manifest["num_nodes"] / wall_s,
        "reference_nodes_per_s": args.reference_nodes / ref_s,
        "ratio_to_reference": (args.reference_nodes / ref_s) / (manifest["num_nodes"] / wall_s),
        "peak_anon_gb": max(peaks),
        "peak_gpu_mem_gb": peak_gpu,
        "device": args.device,
        "wall_s": wall_s,
        "reference_s": ref_s,
        "reference_nodes": args.reference_nodes,
        "cpu_us_per_node": 1e6 * min(cpus) / manifest["num_nodes"],
        "all_cpu_s": cpus,
        "all_wall_s": walls,
        "all_reference_s": ref_walls,
        "load_average": [load_before, os.getloadavg()[0]],
        "output_gb": directory_bytes(out) / GIB,
        "num_nodes": manifest["num_nodes"],
        "num_edges": manifest["data"]["num_edges"],
        "dim": manifest["dim"],
        "dtype": manifest["dtype"],
        "scratch_dtype": args.scratch_dtype,
        "hidden": args.hidden,
        "parts": len(manifest["parts"]),
        "batch_size": args.batch_size,
    }
    if expected is not None:
        report["max_abs_diff"] = float(np.abs(read_export(out) - expected).max())
    print(f"embedded {report['num_nodes']:,} nodes ({report['num_edges']:,} edges) in "
          f"{wall_s:.1f} s: {report['nodes_per_s']:,.0f} nodes/s; reference "
          f"{report['reference_nodes_per_s']:,.0f} nodes/s; "
          f"ratio {report['ratio_to_reference']:.2f}")
    print(f"peak anonymous memory: {report['peak_anon_gb']:.2f} GiB; output "
          f"{report['output_gb']:.2f} GiB in {report['parts']} parts")
    if peak_gpu is not None:
        print(f"peak GPU memory: {peak_gpu:.2f} GiB")
    return report


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.reference_nodes is None:
        args.reference_nodes = args.num_nodes if args.num_nodes <= 2_000_000 else 1_000_000
    store = benchmark_store("export", args, num_classes=16)
    run = one_step_run(store, args.hidden)
    if args.out is not None:
        report = bench(args, store, run, args.out)
    else:
        with tempfile.TemporaryDirectory(prefix="bench-export-", dir=DATA) as tmp:
            report = bench(args, store, run, Path(tmp) / "embeddings")
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    sys.exit(main())
