"""Data-parallel BGRL training under torchrun, checked for identical targets on every rank.

    torchrun --standalone --nproc-per-node=G scripts/ddp_check.py --data STORE --out RUN
    torchrun --standalone --nproc-per-node=2 scripts/ddp_check.py --data STORE --out RUN \\
        --device cpu --backend gloo

Every process joins the process group (NCCL with ``--device cuda``: one process per GPU) and
runs the training loop of ``bgrl_dgl.training.trainer.Trainer`` for ``--steps`` steps on its
share of
each global batch. A world of one process (one GPU) still goes through the same
collectives: its online branch is wrapped in ``DistributedDataParallel`` and the batch-norm
averaging, the metrics and the checkpoint's generator states all go through the group.
At the end every rank measures ``target_divergence`` (one all-reduce, MAX: the largest
difference between the ranks' target encoders, which must be 0.0) and gathers every rank's
SHA-256 of its target's weights. Rank 0 prints one JSON line; the exit status is 0 when the
targets are identical, 1 otherwise.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import bgrl_dgl  # noqa: F401  (sets the DGL backend)
from bgrl_dgl import config as cfg
from bgrl_dgl.store.reader import GraphStore
from bgrl_dgl.training.config import TrainConfig
from bgrl_dgl.training.distributed import (
    COLLECTIVE_TIMEOUT,
    destroy_process_group,
    gather_objects,
    process_device,
    target_divergence,
    world_from_env,
)
from bgrl_dgl.training.trainer import batch_loader, build_trainer


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="store to train on")
    parser.add_argument("--out", type=Path, required=True, help="run directory to write")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--backend", choices=["nccl", "gloo"], default="nccl")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=256, help="seeds per process and step")
    return parser.parse_args(argv)


def weights_digest(module: nn.Module) -> str:
    """SHA-256 of every parameter and buffer of ``module``, in order, as bytes."""
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def check(args: argparse.Namespace) -> dict:
    """Train, compare the targets; the report of this rank."""
    world = world_from_env()
    device = process_device(args.device, world)
    config = cfg.from_sections(TrainConfig, {
        "sampling": {"fanouts": [10, 10], "batch_size": args.batch_size, "num_workers": 0},
        "model": {"hidden": [128, 64], "predictor_hidden": 128, "dropout": 0.1},
        "optim": {"max_steps": args.steps, "warmup_steps": 2},
        "run": {"device": args.device, "sync_check_every": 2, "log_every": 1,
                "checkpoint_every": args.steps},
    }, source="ddp_check")
    if world.is_main:
        args.out.mkdir(parents=True, exist_ok=True)
    store = GraphStore.open(args.data)
    trainer, schedule = build_trainer(config, store, args.out, device, world)
    wrapped_by_trainer = isinstance(trainer.online_branch, DistributedDataParallel)
    if not wrapped_by_trainer:  # a world of one: wrap it as the trainer wraps larger ones
        trainer.online_branch = DistributedDataParallel(
            trainer.online_branch, device_ids=[device.index] if device.type == "cuda" else None,
            broadcast_buffers=False)
    metrics = trainer.fit(batch_loader(config, store, schedule, device))
    divergence = target_divergence(trainer.model.target)
    digests = gather_objects(weights_digest(trainer.model.target))
    logged = []
    if world.is_main:
        lines = (args.out / "metrics.jsonl").read_text().splitlines()
        logged = [json.loads(line).get("target_divergence") for line in lines]
    return {
        "backend": dist.get_backend(),
        "world_size": world.world_size,
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        "steps": trainer.step,
        "loss": metrics.get("loss"),
        "target_divergence": divergence,
        "logged_target_divergence": [value for value in logged if value is not None],
        "targets_identical": len(set(digests)) == 1,
        "ddp_wrapped_by_trainer": wrapped_by_trainer,
        "peak_gpu_mem_gb": (torch.cuda.max_memory_allocated(device) / 2**30
                            if device.type == "cuda" else None),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    world = world_from_env()
    if args.device == "cuda":
        process_device("cuda", world)  # NCCL needs the current device set before it starts
    dist.init_process_group(args.backend, rank=world.rank, world_size=world.world_size,
                            timeout=COLLECTIVE_TIMEOUT)
    try:
        report = check(args)
    finally:
        destroy_process_group()
    if world.is_main:
        print(json.dumps(report), flush=True)
    ok = report["target_divergence"] == 0.0 and report["targets_identical"]
    ok = ok and all(value == 0.0 for value in report["logged_target_divergence"])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
