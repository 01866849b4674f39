"""The training settings: one dataclass per section (sampling, augment, model, optim, run),
parsed once into their final types (see config.py for the flag/YAML machinery)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

from bgrl_dgl import config as cfg
from bgrl_dgl.config import field
from bgrl_dgl.loading.loader import SamplingConfig
from bgrl_dgl.model.augment import AugmentConfig
from bgrl_dgl.model.encoder import ModelConfig

# The default length of a run. Counted in steps, not epochs, so that its cost is bounded on
# any graph (an epoch of a large graph is many steps); see the README's "Choosing the
# schedule" for how it was chosen and how to set it for a large graph.
DEFAULT_STEPS = 800
WARMUP_FRACTION = 16  # the default warm-up is 1/16 of the run's steps

# Bounds of what the code can run with: seeds feed 64-bit generators; AdamW's first update
# is about 10 x lr in float32; a thread count is one of torch's C ints.
MAX_SEED = 2**63 - 1
MAX_LR = 1e6
MAX_THREADS = 4096


@dataclass
class OptimConfig:
    steps: int = field(DEFAULT_STEPS, "length of the run in optimizer steps, whatever the "
                                      "graph's size; warm-up, lr and tau schedules follow it")
    epochs: int | None = field(None, "length of the run in passes over the seed nodes instead "
                                     "of --steps (steps = epochs x steps per epoch)")
    max_steps: int | None = field(None, "length of the run in steps, taking precedence over "
                                        "--epochs and --steps")
    lr: float = field(1e-3, "peak AdamW learning rate")
    weight_decay: float = field(1e-5, "AdamW weight decay")
    warmup_steps: int | None = field(
        None, "linear learning-rate warm-up steps, then cosine decay to 0 (default: 1/16 of "
              "the run's steps)")
    tau_base: float = field(0.99, "initial EMA momentum of the target; cosine-scheduled to 1.0")
    lr_scaling: Literal["none", "linear", "sqrt"] = field(
        "none", "how the peak learning rate grows with the number of processes P, whose global "
                "batch is P x batch_size: none (lr), linear (lr x P) or sqrt (lr x sqrt(P))")

    def peak_lr(self, world_size: int) -> float:
        """The peak learning rate of a run on ``world_size`` processes."""
        factor = {"none": 1.0, "linear": float(world_size), "sqrt": math.sqrt(world_size)}
        return self.lr * factor[self.lr_scaling]

    def total_steps(self, steps_per_epoch: int) -> int:
        """The run's number of optimizer steps: ``max_steps`` if set, else ``epochs`` passes
        of ``steps_per_epoch`` if set, else ``steps``."""
        if self.max_steps is not None:
            return self.max_steps
        if self.epochs is not None:
            return self.epochs * steps_per_epoch
        return self.steps

    def warmup(self, total_steps: int) -> int:
        """The warm-up steps of a run of ``total_steps``: ``warmup_steps`` if set, else
        1/16 of the run (50 of the default 800 steps)."""
        if self.warmup_steps is not None:
            return self.warmup_steps
        return max(1, total_steps // WARMUP_FRACTION)

    def __post_init__(self) -> None:
        cfg.check_finite(self)
        if self.steps <= 0 or any(value is not None and value <= 0
                                  for value in (self.epochs, self.max_steps)):
            raise ValueError("steps, epochs and max_steps must be positive")
        if self.lr <= 0 or self.weight_decay < 0 or (self.warmup_steps or 0) < 0:
            raise ValueError("lr must be positive; weight_decay and warmup_steps non-negative")
        if self.lr > MAX_LR:
            raise ValueError(f"lr must be at most {MAX_LR:g}, got {self.lr:g} (AdamW's float32 "
                             "updates overflow)")
        if not 0.0 <= self.tau_base <= 1.0:
            raise ValueError("tau_base must lie in [0, 1]")


@dataclass
class RunConfig:
    seed: int = field(0, "seed of weights, batches and augmentations")
    device: Literal["auto", "cpu", "cuda"] = field(
        "auto", "where the model runs (auto: cuda if each process on the machine gets a GPU)")
    threads: int = field(0, "torch CPU threads of the training process (0: the usable cores "
                            "left after the sampling workers, at least 1)")
    checkpoint_every: int = field(500, "steps between checkpoints (one is always written at the "
                                       "end)")
    log_every: int = field(10, "steps between lines of metrics.jsonl")
    sync_check_every: int = field(100, "steps between checks that the target encoders of all "
                                       "processes are identical (multi-process runs)")
    collapse_ratio: float = field(
        0.1, "warn when the embedding std falls below this fraction of 1/sqrt(dim)")
    tensorboard: str | None = field(
        None, "also write the metrics as TensorBoard scalars into this directory (rank 0)")

    def __post_init__(self) -> None:
        cfg.check_finite(self)
        if not 0 <= self.seed <= MAX_SEED:
            raise ValueError(f"seed must lie in [0, 2**63 - 1], got {self.seed}")
        if min(self.checkpoint_every, self.log_every, self.sync_check_every) <= 0:
            raise ValueError("checkpoint_every, log_every and sync_check_every must be positive")
        if not 0 <= self.threads <= MAX_THREADS:
            raise ValueError(f"threads must lie in [0, {MAX_THREADS}], got {self.threads}")


@dataclass
class TrainConfig:
    sampling: SamplingConfig
    augment: AugmentConfig
    model: ModelConfig
    optim: OptimConfig
    run: RunConfig

    def __post_init__(self) -> None:
        layers = len(self.model.hidden)
        if len(self.sampling.fanouts) != layers:
            raise ValueError(
                f"fanouts gives {len(self.sampling.fanouts)} layer(s) "
                f"({','.join(map(str, self.sampling.fanouts))}) but the encoder has {layers} "
                f"(hidden {','.join(map(str, self.model.hidden))}): give one fanout per layer")

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

