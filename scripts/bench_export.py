"""Benchmark ``bgrl-dgl embed``: nodes per second and peak anonymous memory of exporting the
exact layer-wise embeddings of every node of a large graph to Parquet.

The store is a synthetic graph (default: 10M nodes, average input degree 10, 128-d float16
features, 16 classes), prepared once into ``data/bench-export-<size>`` and reused. The
encoder is a 2-layer GCN (``--hidden``) from a one-step run made once with ``train
--max-steps 1`` next to the store. ``python -m bgrl_dgl embed`` then runs in a subprocess
under ``memwatch``: peak ``RssAnon`` summed over the process and its children (the pages of
the memory-mapped store, scratch layers and output files are file-backed and not counted).

``--device cuda`` runs the encoder on the GPU (``embed --device cuda``); the embed process
then also reports its peak GPU memory (``torch.cuda.max_memory_allocated``).

The last line printed is one JSON object with ``nodes_per_s`` (nodes over the embed
command's wall time, start-up included), ``peak_anon_gb`` (GiB, 2**30 bytes),
``peak_gpu_mem_gb`` (null on the CPU), ``wall_s``, ``output_gb`` and the settings. Goal: peak
anonymous memory <= 2.5 GB at 10M nodes.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

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
    parser.add_argument("--batch-size", type=int, default=4096,
                        help="destination nodes per inference batch (default: 4096)")
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


def bench(args: argparse.Namespace, run: Path, out: Path) -> dict:
    command = [sys.executable, "-c", EMBED_REPORTING_GPU_MEMORY, "embed", "--run", str(run),
               "--out", str(out), "--overwrite", "--dtype", args.dtype,
               "--batch-size", str(args.batch_size), "--device", args.device]
    print("running: bgrl-dgl", " ".join(command[3:]), flush=True)
    result = measure_command(command, cwd=REPO, stdin=subprocess.DEVNULL,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if result.returncode != 0:
        sys.exit(f"{result.stderr}embed failed with exit code {result.returncode}")
    manifest = json.loads((out / "_manifest.json").read_text())
    peak_gpu = peak_gpu_gib(result.stderr)
    report = {
        "nodes_per_s": manifest["num_nodes"] / result.wall_s,
        "peak_anon_gb": result.peak_anon_gib,
        "peak_gpu_mem_gb": peak_gpu,
        "device": args.device,
        "wall_s": result.wall_s,
        "output_gb": directory_bytes(out) / GIB,
        "num_nodes": manifest["num_nodes"],
        "num_edges": manifest["data"]["num_edges"],
        "dim": manifest["dim"],
        "dtype": manifest["dtype"],
        "hidden": args.hidden,
        "parts": len(manifest["parts"]),
        "batch_size": args.batch_size,
    }
    print(result.stdout.strip())
    print(f"embedded {report['num_nodes']:,} nodes ({report['num_edges']:,} edges) in "
          f"{result.wall_s:.1f} s: {report['nodes_per_s']:,.0f} nodes/s")
    print(f"peak anonymous memory: {result.peak_anon_gib:.2f} GiB; output "
          f"{report['output_gb']:.2f} GiB in {report['parts']} parts")
    if peak_gpu is not None:
        print(f"peak GPU memory: {peak_gpu:.2f} GiB")
    return report


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    store = benchmark_store("export", args, num_classes=16)
    run = one_step_run(store, args.hidden)
    if args.out is not None:
        report = bench(args, run, args.out)
    else:
        with tempfile.TemporaryDirectory(prefix="bench-export-", dir=DATA) as tmp:
            report = bench(args, run, Path(tmp) / "embeddings")
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
