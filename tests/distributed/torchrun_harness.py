"""``bgrl-dgl`` under torchrun, instrumented for tests/distributed/test_distributed.py.

Runs the command line unchanged and records, in the directory named by ``BGRL_TEST_DIR``:
``saves-rank<R>.txt`` (the step of every checkpoint the rank wrote) and ``final-rank<R>.pt``
(the rank's model weights, the seed nodes of each of its steps and how often torchrun
restarted it). Faults on request:
``BGRL_TEST_KILL=RANK:STEP`` SIGKILLs that rank after that step in the first attempt (not
after a torchrun restart); ``BGRL_TEST_SIGTERM=RANK:STEP`` sends that rank SIGTERM during
that step; ``BGRL_TEST_PERTURB=RANK:STEP`` nudges that rank's target encoder after that step.
"""
from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import torch

from bgrl_dgl.cli import main
from bgrl_dgl.training import checkpoint as checkpoint_module
from bgrl_dgl.training import trainer as train_module

RANK = int(os.environ.get("RANK", "0"))
RECORDS = Path(os.environ["BGRL_TEST_DIR"])


def fault(name: str) -> int | None:
    """The step of fault ``name`` aimed at this rank, if any."""
    rank, _, step = os.environ.get(name, "-1:-1").partition(":")
    return int(step) if int(rank) == RANK else None


def instrument() -> None:
    seeds: list[list[int]] = []
    kill_at, term_at = fault("BGRL_TEST_KILL"), fault("BGRL_TEST_SIGTERM")
    perturb_at = fault("BGRL_TEST_PERTURB")
    first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
    original_step, original_fit = train_module.Trainer.train_step, train_module.Trainer.fit
    original_save = checkpoint_module.save_checkpoint

    def train_step(self, batch):
        metrics = original_step(self, batch)
        seeds.append(batch.seeds.tolist())
        if self.step == kill_at and first_attempt:
            os.kill(os.getpid(), signal.SIGKILL)
        if self.step == term_at:
            os.kill(os.getpid(), signal.SIGTERM)
        if self.step == perturb_at:
            with torch.no_grad():
                next(self.model.target.parameters()).add_(1e-3)
        return metrics

    def fit(self, loader):
        metrics = original_fit(self, loader)
        torch.save({"model": self.model.state_dict(), "seeds": seeds,
                    "restart_count": self.world.restart_count},
                   RECORDS / f"final-rank{RANK}.pt")
        return metrics

    def save_checkpoint(run_dir, state, step, *args, **kwargs):
        with open(RECORDS / f"saves-rank{RANK}.txt", "a", encoding="utf-8") as handle:
            handle.write(f"{step}\n")
        return original_save(run_dir, state, step, *args, **kwargs)

    train_module.Trainer.train_step = train_step
    train_module.Trainer.fit = fit
    checkpoint_module.save_checkpoint = save_checkpoint


if __name__ == "__main__":
    instrument()
    sys.exit(main())
