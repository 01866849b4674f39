"""BGRL training: configuration, the training loop and the ``train`` command.

One :class:`Trainer` owns the model (online encoder + predictor + EMA target), optimizer,
learning-rate schedule and the batch loader; :meth:`Trainer.fit` runs steps until the run's
last step, writing metrics, checkpoints and the progress bar. A run is fully determined by
its configuration, seed and number of processes: batches, augmentations and initial weights
are drawn from seeds derived from (seed, step, rank), so ``--resume`` continues exactly where
a run stopped.

Under ``torchrun`` every process runs a :class:`Trainer` on its share of each global batch
(see :mod:`~bgrl_dgl.distributed`): DDP averages the gradients of the online encoder and
predictor, every rank keeps an identical EMA target, and rank 0 alone writes the run's files.
"""
from __future__ import annotations

import ctypes
import json
import math
import os
import signal
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from . import config as cfg
from .augment import AugmentConfig, augment_view
from .bgrl import BGRL, OnlineBranch, cosine_tau, embedding_std
from .checkpoint import capture_rng, latest_checkpoint, load_checkpoint, restore_rng, save_checkpoint
from .config import field
from .distributed import (World, average_buffers, broadcast_object, check_target_in_sync,
                          gather_objects, process_device, process_group, sum_across_ranks,
                          world_from_env)
from .errors import InputError
from .features import check_cache_budget, training_cache
from .model import Encoder, ModelConfig, Predictor
from .sampling import BatchLoader, SampledBatch, SamplingConfig, resolve_seed_nodes
from .store import GraphStore


@dataclass
class OptimConfig:
    epochs: int = field(70, "passes over the seed nodes")
    max_steps: int | None = field(None, "stop after this many steps (overrides --epochs)")
    lr: float = field(1e-3, "peak AdamW learning rate")
    weight_decay: float = field(1e-5, "AdamW weight decay")
    warmup_steps: int = field(50, "linear learning-rate warm-up steps, then cosine decay to 0")
    tau_base: float = field(0.99, "initial EMA momentum of the target; cosine-scheduled to 1.0")
    lr_scaling: Literal["none", "linear", "sqrt"] = field(
        "none", "how the peak learning rate grows with the number of processes P, whose global "
                "batch is P x batch_size: none (lr), linear (lr x P) or sqrt (lr x sqrt(P))")

    def peak_lr(self, world_size: int) -> float:
        """The peak learning rate of a run on ``world_size`` processes."""
        factor = {"none": 1.0, "linear": float(world_size), "sqrt": math.sqrt(world_size)}
        return self.lr * factor[self.lr_scaling]

    def __post_init__(self) -> None:
        if self.epochs <= 0 or (self.max_steps is not None and self.max_steps <= 0):
            raise ValueError("epochs and max_steps must be positive")
        if self.lr <= 0 or self.weight_decay < 0 or self.warmup_steps < 0:
            raise ValueError("lr must be positive; weight_decay and warmup_steps non-negative")
        if not 0.0 <= self.tau_base <= 1.0:
            raise ValueError("tau_base must lie in [0, 1]")


@dataclass
class RunConfig:
    seed: int = field(0, "seed of weights, batches and augmentations")
    device: Literal["auto", "cpu", "cuda"] = field(
        "auto", "where the model runs (auto: cuda if each process on the machine gets a GPU)")
    threads: int = field(0, "torch CPU threads of the training process (0: the usable cores "
                            "left after the sampling workers, at least 1)")
    checkpoint_every: int = field(500, "steps between checkpoints (one is always written at the end)")
    log_every: int = field(10, "steps between lines of metrics.jsonl")
    sync_check_every: int = field(100, "steps between checks that the target encoders of all "
                                       "processes are identical (multi-process runs)")
    collapse_ratio: float = field(
        0.1, "warn when the embedding std falls below this fraction of 1/sqrt(dim)")

    def __post_init__(self) -> None:
        if min(self.checkpoint_every, self.log_every, self.sync_check_every) <= 0:
            raise ValueError("checkpoint_every, log_every and sync_check_every must be positive")
        if self.threads < 0:
            raise ValueError("threads must be >= 0")


def compute_threads(requested: int, num_workers: int, local_processes: int = 1) -> int:
    """Threads for compute: as requested, or this process's share of the machine's cores
    minus its sampling workers (oversubscribed cores make every parallel section wait for a
    descheduled thread)."""
    if requested:
        return requested
    return max(len(os.sched_getaffinity(0)) // local_processes - num_workers, 1)


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters
_ALLOCATOR_VARIABLES = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES")


def keep_freed_host_memory(mmap_threshold: int = 32 << 20, trim_threshold: int = 1 << 30) -> bool:
    """Let glibc's malloc keep freed blocks of up to ``mmap_threshold`` bytes (glibc's
    maximum) for reuse instead of unmapping them, and not trim its heap below
    ``trim_threshold`` free bytes. Returns whether the setting was applied.

    A CPU training step allocates and frees the same activations of a few MB every step;
    returned to the kernel, each comes back as fresh pages that fault in one by one
    (26,000 page faults and about 10% of a BGRL step in bench_train). Nothing is changed
    where the user tunes the allocator through its environment variables, or where the C
    library has no ``mallopt`` (then it is not glibc's allocator).
    """
    if any(name in os.environ for name in _ALLOCATOR_VARIABLES):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, mmap_threshold)) and bool(mallopt(_M_TRIM_THRESHOLD, trim_threshold))


@dataclass
class TrainConfig:
    sampling: SamplingConfig
    augment: AugmentConfig
    model: ModelConfig
    optim: OptimConfig
    run: RunConfig

    @classmethod
    def defaults(cls) -> "TrainConfig":
        return cfg.from_sections(cls)

    @classmethod
    def from_plain(cls, data: dict[str, Any], source: str = "config") -> "TrainConfig":
        return cfg.from_sections(cls, data, source=source)


def lr_factor(step: int, warmup_steps: int, total_steps: int) -> float:
    """Multiplier of the peak learning rate: linear warm-up, then cosine decay to 0."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(total_steps - warmup_steps, 1)
    progress = min((step - warmup_steps) / decay_steps, 1.0)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def step_generator(seed: int, step: int, rank: int = 0) -> torch.Generator:
    """The CPU generator of the augmentations of one step of one rank."""
    # Rank 0 draws what a single-process run draws.
    entropy = [seed, step, 0xA06] + ([rank] if rank else [])
    state = np.random.SeedSequence(entropy).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def build_model(feat_dim: int, config: ModelConfig, seed: int) -> BGRL:
    """Online encoder, predictor and target, initialised from ``seed``."""
    torch.manual_seed(seed)
    encoder = Encoder(feat_dim, config)
    return BGRL(encoder, Predictor(encoder.out_dim, config.predictor_hidden))


def load_model_weights(model: BGRL, weights: dict[str, torch.Tensor], checkpoint: Path) -> None:
    """Load a checkpoint's weights into ``model``; InputError when they do not fit it (the
    run is resumed or read with model settings other than those it was trained with)."""
    try:
        model.load_state_dict(weights)
    except RuntimeError as err:
        problems = str(err).splitlines()
        raise InputError(checkpoint, "its weights do not fit the model of the run's settings "
                                     f"({problems[-1].strip()})") from None


class StopRequest:
    """Turns SIGINT/SIGTERM into a flag checked between steps (checkpoint, then exit 0)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "StopRequest":
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, _frame: Any) -> None:
        self.requested = True

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class Trainer:
    """Mini-batch BGRL in one process of ``world`` (the process group, if any, is joined).

    With several processes, the online branch (encoder + predictor) is wrapped in DDP, which
    broadcasts rank 0's weights; the target is then copied from them, so every rank starts
    from the same online and target weights.
    """

    def __init__(self, config: TrainConfig, store: GraphStore, run_dir: Path,
                 device: torch.device, world: World = World()) -> None:
        self.config = config
        self.store = store
        self.run_dir = run_dir
        self.device = device
        self.world = world
        self.is_main = world.is_main
        torch.set_num_threads(compute_threads(config.run.threads, config.sampling.num_workers,
                                              world.local_world_size))
        if device.type == "cpu":
            keep_freed_host_memory()
        seed_nodes = resolve_seed_nodes(store, config.sampling.seeds)
        self.loader = BatchLoader(store, config.sampling, seed_nodes, seed=config.run.seed,
                                  independent_views=config.augment.independent_views,
                                  rank=world.rank, world_size=world.world_size)
        self.loader.device_type = device.type
        self.total_steps = config.optim.max_steps or config.optim.epochs * self.loader.steps_per_epoch
        self.model = build_model(store.feat_dim, config.model, config.run.seed).to(device)
        self.online_branch = self._online_branch()
        self.model.copy_online_to_target()
        if world.rank:  # dropout masks of their own (rank 0 draws what one process draws)
            torch.manual_seed(int(np.random.SeedSequence([config.run.seed, world.rank]).generate_state(1)[0]))
        self.optimizer = torch.optim.AdamW(self.model.trainable_parameters(),
                                           lr=config.optim.peak_lr(world.world_size),
                                           weight_decay=config.optim.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            lambda step: lr_factor(step, config.optim.warmup_steps, self.total_steps))
        self.step = 0
        self._collapse_warned = False

    def _online_branch(self) -> torch.nn.Module:
        branch = OnlineBranch(self.model.online, self.model.predictor)
        if not self.world.is_distributed:
            return branch
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        # broadcast_buffers=False: batch-norm statistics are averaged over the ranks after
        # every step (average_buffers) rather than overwritten by rank 0's before every forward.
        return DistributedDataParallel(branch, device_ids=device_ids, broadcast_buffers=False)

    # -- one step -------------------------------------------------------------------------
    def views(self, batch: SampledBatch) -> tuple[tuple, tuple]:
        """The two augmented views of a batch, on the training device."""
        generator = step_generator(self.config.run.seed, self.step, self.world.rank)
        batch = batch.to(self.device, non_blocking=self.device.type == "cuda")
        augmented = []
        for index, view in enumerate(batch.views):
            p_edge, p_feat = self.config.augment.view_rates(index)
            augmented.append(augment_view(view.adjs, view.features, p_edge, p_feat,
                                          self.config.augment.mask_mode, generator))
        return augmented[0], augmented[1]

    def train_step(self, batch: SampledBatch) -> dict[str, float]:
        """One optimizer step and EMA update; returns the step's metrics."""
        start = time.perf_counter()
        view1, view2 = self.views(batch)
        loss, online_h = self.model.loss(view1, view2, self.online_branch)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        lr = self.scheduler.get_last_lr()[0]
        self.scheduler.step()
        tau = cosine_tau(self.step + 1, self.total_steps, self.config.optim.tau_base)
        average_buffers(self.model)
        self.model.update_target(tau)
        metrics = {
            "loss": float(loss.detach()),
            "lr": lr,
            "tau": tau,
            "embedding_std": embedding_std(online_h),
            "sample_s": batch.sample_s,
            "features_s": batch.gather_s,
            "compute_s": time.perf_counter() - start,
        }
        self.step += 1
        return metrics

    def share_step_results(self, metrics: dict[str, float], batch: SampledBatch,
                           stop_requested: bool) -> tuple[float, bool]:
        """Turn this rank's step metrics into the global batch's (mean loss and embedding
        std, cache hit rate over all lookups); returns the global batch's seed count and
        whether any rank was asked to stop (so that all ranks stop after the same step)."""
        hits, misses = batch.cache_lookups
        loss, std, hits, misses, seeds, stops = sum_across_ranks(
            [metrics["loss"], metrics["embedding_std"], hits, misses, len(batch.seeds),
             stop_requested], self.device)
        metrics.update(loss=loss / self.world.world_size, embedding_std=std / self.world.world_size)
        if hits + misses:
            metrics["cache_hit_rate"] = hits / (hits + misses)
        return seeds, stops > 0

    # -- the loop -------------------------------------------------------------------------
    def fit(self) -> dict[str, float]:
        """Train until the last step (or a stop signal); returns the last step's metrics."""
        steps_per_epoch = self.loader.steps_per_epoch
        metrics: dict[str, float] = {}
        with StopRequest() as stop, tqdm(total=self.total_steps, initial=self.step,
                                         disable=None if self.is_main else True,
                                         dynamic_ncols=True, desc="train") as bar:
            started = waited = time.perf_counter()
            for batch in self.loader.batches(self.step, self.total_steps):
                wait_s = time.perf_counter() - waited
                metrics = self.train_step(batch)
                seeds, stopping = self.share_step_results(metrics, batch, stop.requested)
                seeds_per_s = seeds / (wait_s + metrics["compute_s"])
                metrics.update(step=self.step, epoch=(self.step - 1) // steps_per_epoch,
                               seeds=seeds, seeds_per_s=seeds_per_s, wait_s=wait_s,
                               elapsed_s=time.perf_counter() - started)
                self._watch_collapse(metrics["embedding_std"])
                bar.update(1)
                bar.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{metrics['lr']:.2e}",
                                tau=f"{metrics['tau']:.4f}", seeds_s=f"{seeds_per_s:.0f}")
                run = self.config.run
                last = self.step == self.total_steps or stopping
                if self.world.is_distributed and (self.step % run.sync_check_every == 0 or last):
                    metrics["target_divergence"] = check_target_in_sync(self.model.target, self.step)
                if self.step % run.log_every == 0 or last or "target_divergence" in metrics:
                    self.log_metrics(metrics)
                if self.step % run.checkpoint_every == 0 or last:
                    self.save()
                if stopping:
                    if self.is_main:
                        print(f"stopped at step {self.step}; checkpoint written, resume with "
                              "--resume", file=sys.stderr)
                    break
                waited = time.perf_counter()
        return metrics

    def _watch_collapse(self, std: float) -> None:
        threshold = self.config.run.collapse_ratio / math.sqrt(self.model.online.out_dim)
        if std < threshold and not self._collapse_warned:
            warnings.warn(f"embedding std {std:.2e} fell below {threshold:.2e} at step "
                          f"{self.step}: the representation may be collapsing", stacklevel=2)
            self._collapse_warned = True

    def log_metrics(self, metrics: dict[str, float]) -> None:
        if not self.is_main:
            return
        with open(self.run_dir / "metrics.jsonl", "a", encoding="utf-8") as handle:
            handle.write(json.dumps(metrics) + "\n")

    # -- checkpoints ----------------------------------------------------------------------
    def state(self, rank_rng: list[dict[str, Any]]) -> dict[str, Any]:
        """The checkpoint of this step; ``rank_rng``: every rank's :func:`capture_rng`."""
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "step": self.step,
            "epoch": self.step // self.loader.steps_per_epoch,
            "rng": rank_rng[0],
            "rank_rng": rank_rng,
            "config": cfg.to_dict(self.config),
            "feat_dim": self.store.feat_dim,
            "world_size": self.world.world_size,
        }

    def load_state(self, state: dict[str, Any], checkpoint: Path) -> None:
        saved_world = int(state.get("world_size", 1))
        if saved_world != self.world.world_size:
            warnings.warn(f"{checkpoint} was written by {saved_world} processes, resumed on "
                          f"{self.world.world_size}: the remaining batches and learning-rate "
                          "schedule differ from those of the original run", stacklevel=2)
        load_model_weights(self.model, state["model"], checkpoint)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step = int(state["step"])
        rank_rng = state.get("rank_rng", [state["rng"]])
        restore_rng(rank_rng[self.world.rank] if saved_world == self.world.world_size else state["rng"])

    def save(self) -> Path | None:
        """Write a checkpoint (rank 0; every rank takes part, giving its generators' state)."""
        rank_rng = gather_objects(capture_rng())
        if not self.is_main:
            return None
        return save_checkpoint(self.run_dir, self.state(rank_rng), self.step)


def truncate_metrics(path: Path, last_step: int) -> None:
    """Drop metric lines after ``last_step`` (written after the checkpoint a run resumes from)."""
    if not path.exists():
        return
    kept = [line for line in path.read_text(encoding="utf-8").splitlines()
            if line.strip() and json.loads(line)["step"] <= last_step]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
    tmp.replace(path)


def prepare_run_dir(run_dir: Path, resume: bool) -> Path | None:
    """Create ``run_dir``; return the checkpoint to resume from, if any."""
    checkpoint = latest_checkpoint(run_dir) if run_dir.exists() else None
    if checkpoint is not None and not resume:
        raise InputError(run_dir, "already holds a run; pass --resume to continue it")
    run_dir.mkdir(parents=True, exist_ok=True)
    return checkpoint


def resume_state(run_dir: Path, resume: bool, world: World) -> tuple[Path, dict[str, Any]] | None:
    """Rank 0 creates ``run_dir`` and reads the checkpoint to resume from; every rank gets
    its path and state (so only rank 0 needs to see the run directory), or the same error."""
    outcome: tuple[str, Any] | None = None
    if world.is_main:
        try:
            checkpoint = prepare_run_dir(run_dir, resume)
            if checkpoint is not None:
                outcome = ("ok", (checkpoint, load_checkpoint(checkpoint)))
        except InputError as err:
            outcome = ("error", (err.path, err.problem))
    outcome = broadcast_object(outcome)
    if outcome is None:
        return None
    kind, value = outcome
    if kind == "error":
        raise InputError(*value)
    return value


def train(data: str | Path, run_dir: str | Path, config: TrainConfig, *, resume: bool = False,
          world: World | None = None) -> dict[str, float]:
    """Train BGRL on the store at ``data``, writing into ``run_dir``; returns final metrics.

    ``world``: this process's place in the run (default: from torchrun's environment; one
    process without it). A process restarted by torchrun (``--max-restarts``) resumes from
    the newest checkpoint, as ``resume`` does.
    """
    world = world_from_env() if world is None else world
    run_dir = Path(run_dir)
    store = GraphStore.open(data)
    device = process_device(config.run.device, world)
    with process_group(world, device):
        # Built before the run directory is created, so that bad settings leave nothing behind.
        trainer = Trainer(config, store, run_dir, device, world)
        check_cache_budget(store, config.sampling.cache_size)
        resumed = resume_state(run_dir, resume or world.restart_count > 0, world)
        if resumed is not None:
            trainer.load_state(resumed[1], resumed[0])
        if trainer.is_main:
            cfg.save_yaml(cfg.to_dict(config), run_dir / "config.yaml")
            cfg.save_yaml({"data": str(Path(data).resolve()), "feat_dim": store.feat_dim,
                           "num_nodes": store.num_nodes, "world_size": world.world_size},
                          run_dir / "run.yaml")
            truncate_metrics(run_dir / "metrics.jsonl", trainer.step)
        if trainer.step >= trainer.total_steps:
            return {}
        # Built here, before the loader starts its workers, which attach to it by its path.
        with training_cache(store, config.sampling, trainer.loader.seed_nodes,
                            config.run.seed) as cache:
            trainer.loader.cache_dir = None if cache is None else cache.directory
            return trainer.fit()


def load_run_config(run_dir: str | Path) -> tuple[TrainConfig, dict[str, Any]]:
    """The resolved config of a run and its run.yaml (data path, feature dim, node count)."""
    run_dir = Path(run_dir)
    config = TrainConfig.from_plain(cfg.load_yaml(run_dir / "config.yaml"), str(run_dir / "config.yaml"))
    return config, cfg.load_yaml(run_dir / "run.yaml")


def load_encoder(run_dir: str | Path, which: Literal["online", "target", "random"] = "online") -> Encoder:
    """An encoder of a run: the online or target encoder of its newest checkpoint, or the
    encoder as initialised before training (``random``, the baseline of the linear probe)."""
    config, info = load_run_config(run_dir)
    model = build_model(int(info["feat_dim"]), config.model, config.run.seed)
    if which != "random":
        checkpoint = latest_checkpoint(Path(run_dir))
        if checkpoint is None:
            raise InputError(run_dir, "holds no checkpoint")
        load_model_weights(model, load_checkpoint(checkpoint)["model"], checkpoint)
    encoder = model.target if which == "target" else model.online
    return encoder.eval()
