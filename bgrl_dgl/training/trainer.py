"""BGRL training: the :class:`Trainer` and the ``train`` command's :func:`train`.

One :class:`Trainer` owns the model (online encoder + predictor + EMA target), optimizer and
learning-rate schedule; :meth:`Trainer.fit` runs steps from a
:class:`~bgrl_dgl.loading.loader.BatchLoader` until the run's last step. The loop only
orchestrates: a step, then the components that decide for themselves whether they are due
(target check across ranks, metrics log, checkpointer). A run is fully determined by its
configuration, seed and number of processes: batches, augmentations and initial weights are
drawn from seeds derived from (seed, step, rank), so ``--resume`` continues exactly where a
run stopped.

Under ``torchrun`` every process runs a :class:`Trainer` on its share of each global batch
(see :mod:`~bgrl_dgl.training.distributed`): DDP averages the gradients of the online encoder
and predictor, every rank keeps an identical EMA target, and rank 0 alone writes the run's
files.
"""
from __future__ import annotations

import signal
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel

from bgrl_dgl import config as cfg
from bgrl_dgl.errors import InputError, RunError
from bgrl_dgl.loading.features import use_sparse_rows
from bgrl_dgl.loading.loader import (
    BatchLoader,
    SeedSchedule,
    check_training_cache,
    training_cache,
)
from bgrl_dgl.loading.sampler import SampledBatch
from bgrl_dgl.loading.shared_arrays import SharedArrays, check_found_directory
from bgrl_dgl.model.augment import augment_view
from bgrl_dgl.model.bgrl import OnlineBranch, build_model, cosine_tau, embedding_std
from bgrl_dgl.runs import METRICS_FILE, RunInfo, RunLock, resume_state, write_run_files
from bgrl_dgl.store.reader import GraphStore
from bgrl_dgl.training.checkpoint import (
    Checkpointer,
    load_model_weights,
    restore_rng,
    truncate_metrics,
)
from bgrl_dgl.training.config import TrainConfig, lr_factor
from bgrl_dgl.training.distributed import (
    TargetSyncCheck,
    World,
    average_buffers,
    process_device,
    process_group,
    sum_across_ranks,
    world_from_env,
)
from bgrl_dgl.training.host import compute_threads, keep_freed_host_memory
from bgrl_dgl.training.memory_check import check_machine_memory
from bgrl_dgl.training.monitor import (
    CollapseWatch,
    MetricsLog,
    ProgressBar,
    StepTimeEstimate,
    timed,
)
from bgrl_dgl.training.tensorboard import check_tensorboard, tensorboard_log


def step_generator(seed: int, step: int, rank: int = 0) -> torch.Generator:
    """The CPU generator of the augmentations of one step of one rank."""
    # Rank 0 draws what a single-process run draws.
    entropy = [seed, step, 0xA06] + ([rank] if rank else [])
    state = np.random.SeedSequence(entropy).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


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

    def __init__(self, config: TrainConfig, store: GraphStore, steps_per_epoch: int,
                 run_dir: Path, device: torch.device, world: World = World()) -> None:
        self.config = config
        self.store = store
        self.run_dir = run_dir
        self.device = device
        self.world = world
        self.is_main = world.is_main
        self.steps_per_epoch = steps_per_epoch
        torch.set_num_threads(compute_threads(config.run.threads, config.sampling.num_workers,
                                              world.local_world_size))
        if device.type == "cpu":
            keep_freed_host_memory()
        self.total_steps = config.optim.total_steps(steps_per_epoch)
        self.model = build_model(store.feat_dim, config.model, config.run.seed).to(device)
        self.online_branch = self._online_branch()
        self.model.copy_online_to_target()
        if world.rank:  # dropout masks of their own (rank 0 draws what one process draws)
            torch.manual_seed(int(np.random.SeedSequence([config.run.seed, world.rank])
                                  .generate_state(1)[0]))
        self.optimizer = torch.optim.AdamW(self.model.trainable_parameters(),
                                           lr=config.optim.peak_lr(world.world_size),
                                           weight_decay=config.optim.weight_decay)
        # The schedule closes over numbers, not over the trainer: a reference cycle would keep
        # the DDP branch, and with it the process group, alive until interpreter shutdown.
        total_steps, warmup_steps = self.total_steps, config.optim.warmup(self.total_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: lr_factor(step, warmup_steps, total_steps))
        self.step = 0
        run = config.run
        self.checkpointer = Checkpointer(run_dir, run.checkpoint_every, world.is_main)
        self.metrics_log = MetricsLog(run_dir / METRICS_FILE, run.log_every, world.is_main)
        self.sync_check = TargetSyncCheck(run.sync_check_every, world.is_distributed)
        self.collapse_watch = CollapseWatch(run.collapse_ratio, self.model.online.out_dim)

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
        finite = torch.isfinite(loss.detach())  # read after backward is queued: no GPU stall
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.check_loss(loss, finite)
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

    def check_loss(self, loss: torch.Tensor, finite: torch.Tensor) -> None:
        """RunError when the loss of this step is NaN or infinite on any rank: training
        diverged. Every rank raises before its optimizer step, so the weights, and the newest
        checkpoint, stay the last good ones, and no rank is left waiting for another."""
        bad = not bool(finite)
        if self.world.is_distributed:
            bad = sum_across_ranks([bad], self.device)[0] > 0
        if bad:
            where = "" if self.world.world_size == 1 else f" (rank {self.world.rank})"
            raise RunError(f"step {self.step + 1}: the loss is {float(loss.detach())}{where}: "
                           "training diverged (a lower --lr may help); stopped before the step "
                           "changed the weights, so the newest checkpoint is the last good one")

    def check_weights(self) -> None:
        """RunError when a weight or batch-norm statistic is NaN or infinite: such weights are
        never written as a checkpoint (it would replace a good one)."""
        for name, tensor in self.model.state_dict().items():
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                raise RunError(f"step {self.step}: {name} holds NaN or infinite values: "
                               "training diverged (a lower --lr may help); the newest "
                               "checkpoint is the last good one")

    def share_step_results(self, metrics: dict[str, float], batch: SampledBatch, wait_s: float,
                           stop_requested: bool) -> bool:
        """Turn this rank's step metrics into the global batch's (mean loss and embedding
        std, seeds and seeds/s, cache hit rate over all lookups); returns whether any rank was
        asked to stop (so that all ranks stop after the same step)."""
        hits, misses = batch.cache_lookups
        loss, std, hits, misses, seeds, stops = sum_across_ranks(
            [metrics["loss"], metrics["embedding_std"], hits, misses, len(batch.seeds),
             stop_requested], self.device)
        metrics.update(loss=loss / self.world.world_size, embedding_std=std / self.world.world_size)
        if hits + misses:
            metrics["cache_hit_rate"] = hits / (hits + misses)
        metrics.update(step=self.step, epoch=(self.step - 1) // self.steps_per_epoch,
                       seeds=seeds, seeds_per_s=seeds / (wait_s + metrics["compute_s"]),
                       wait_s=wait_s)
        return stops > 0

    # -- the loop -------------------------------------------------------------------------
    def fit(self, loader: BatchLoader) -> dict[str, float]:
        """Train on ``loader``'s batches until the last step (or a stop signal); returns the
        last step's metrics."""
        metrics: dict[str, float] = {}
        started = time.perf_counter()
        estimate = StepTimeEstimate(self.total_steps, self.step, self.is_main)
        progress = ProgressBar(self.total_steps, self.step, self.is_main)
        board = tensorboard_log(self.config.run.tensorboard, self.is_main)
        with StopRequest() as stop, progress as bar, board as self.metrics_log.board:
            for batch, wait_s in timed(loader.batches(self.step, self.total_steps)):
                metrics = self.train_step(batch)
                stopping = self.share_step_results(metrics, batch, wait_s, stop.requested)
                metrics["elapsed_s"] = time.perf_counter() - started
                last_step = stopping or self.step == self.total_steps
                self.collapse_watch.observe(metrics["embedding_std"], self.step)
                bar.update(metrics)
                estimate.observe(self.step)
                divergence = self.sync_check.run(self.model.target, self.step,
                                                 last_step=last_step)
                if divergence is not None:
                    metrics["target_divergence"] = divergence
                self.metrics_log.write(metrics, last_step=last_step)
                if self.checkpointer.due(self.step, last_step=last_step):
                    self.check_weights()
                self.checkpointer.save(self.step, self.state, last_step=last_step)
                if stopping:
                    self._announce_stop()
                    break
        return metrics

    def _announce_stop(self) -> None:
        if self.is_main:
            print(f"stopped at step {self.step}; checkpoint written, resume with --resume",
                  file=sys.stderr)

    # -- checkpoints ----------------------------------------------------------------------
    def state(self, rank_rng: list[dict[str, Any]]) -> dict[str, Any]:
        """The checkpoint of this step; ``rank_rng``: every rank's :func:`capture_rng`."""
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "step": self.step,
            "epoch": self.step // self.steps_per_epoch,
            "rng": rank_rng[0],
            "rank_rng": rank_rng,
            "config": cfg.to_dict(self.config),
            "feat_dim": self.store.feat_dim,
            "world_size": self.world.world_size,
        }

    def load_state(self, state: dict[str, Any], checkpoint: Path) -> None:
        """Continue from a checkpoint's weights, optimizer, schedule, step and RNG states
        (InputError when they do not fit this run)."""
        saved_world = state.get("world_size", 1)
        if not isinstance(saved_world, int) or saved_world < 1:
            raise InputError(checkpoint, f"cannot resume from this checkpoint: world_size is "
                                         f"{saved_world!r}")
        if saved_world != self.world.world_size:
            warnings.warn(f"{checkpoint} was written by {saved_world} processes, resumed on "
                          f"{self.world.world_size}: the remaining batches and learning-rate "
                          "schedule differ from those of the original run", stacklevel=2)
        load_model_weights(self.model, state["model"], checkpoint)
        try:
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            self.step = int(state["step"])
            rank_rng = state.get("rank_rng", [state["rng"]])
            same_world = saved_world == self.world.world_size
            restore_rng(rank_rng[self.world.rank] if same_world else state["rng"])
        except (KeyError, IndexError, TypeError, ValueError, RuntimeError) as err:
            raise InputError(checkpoint, "cannot resume from this checkpoint: its optimizer, "
                                         f"scheduler, step or RNG state is unusable "
                                         f"({err})") from None


def build_trainer(config: TrainConfig, store: GraphStore, run_dir: Path, device: torch.device,
                  world: World = World()) -> tuple[Trainer, SeedSchedule]:
    """The Trainer of one process and the schedule of its seeds (checks the settings; writes
    nothing)."""
    schedule = SeedSchedule.for_store(store, config.sampling, config.run.seed, world.rank,
                                      world.world_size)
    return Trainer(config, store, schedule.steps_per_epoch, run_dir, device, world), schedule


def batch_loader(config: TrainConfig, store: GraphStore, schedule: SeedSchedule,
                 device: torch.device, cache_dir: Path | None = None,
                 shared: SharedArrays | None = None) -> BatchLoader:
    """The loader of a training process's batches (``cache_dir``: the machine's feature cache;
    ``shared``: the machine's whole-graph arrays of the run); ``--sparse-input`` decides
    here, once, whether they carry sparse rows."""
    sparse = use_sparse_rows(config.sampling.sparse_input, store.features)
    return BatchLoader(store, config.sampling, schedule,
                       independent_views=config.augment.independent_views, device=device,
                       cache_dir=cache_dir, shared=shared, sparse_rows=sparse)


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
    # Rank 0 holds the run's lock from before its first write until train() returns. The
    # trainer lives in a function of its own, so it is gone before the group is left.
    with process_group(world, device), RunLock(run_dir) as lock:
        return _train_in_group(Path(data), run_dir, config, store, device, world, lock,
                               resume)


def _train_in_group(data: Path, run_dir: Path, config: TrainConfig, store: GraphStore,
                    device: torch.device, world: World, lock: RunLock,
                    resume: bool) -> dict[str, float]:
    """The body of :func:`train`, inside the process group and the run's lock."""
    # Built before the run directory is created, so that bad settings leave nothing behind.
    trainer, schedule = build_trainer(config, store, run_dir, device, world)
    cache_dir = check_training_cache(store, config.sampling, schedule.seed_nodes,
                                     config.run.seed)
    check_found_directory(store, run_dir)
    plan, plan_lines, plan_warning = check_machine_memory(
        store, config, world, device.type == "cuda", schedule.num_seeds, cache_dir)
    check_tensorboard(config.run.tensorboard if world.is_main else None)
    resumed = resume_state(run_dir, resume or world.restart_count > 0, world, lock)
    if resumed is not None:
        trainer.load_state(resumed[1], resumed[0])
    if trainer.is_main:
        # The metrics first: they are checked before anything is written.
        truncate_metrics(run_dir / METRICS_FILE, trainer.step)
        write_run_files(run_dir, config, RunInfo(data.resolve(), store.feat_dim,
                                                 store.num_nodes, world.world_size))
    if plan_lines:
        print("\n".join(plan_lines), flush=True)
    if plan_warning:
        print(plan_warning, file=sys.stderr, flush=True)
    if trainer.step >= trainer.total_steps:
        return {}
    # Built before the loader starts its workers, which attach to them by their paths.
    with training_cache(store, config.sampling, schedule.seed_nodes, config.run.seed,
                        reserve=plan.shm_needed - plan.cache) as cache, \
            SharedArrays.for_run(store, run_dir) as shared:
        cache_dir = None if cache is None else cache.directory
        return trainer.fit(batch_loader(config, store, schedule, device, cache_dir, shared))


