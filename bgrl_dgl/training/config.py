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
    checkpoint_every: int = field(500, "steps between checkpoints (one is always written at the "
                                       "end)")
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

