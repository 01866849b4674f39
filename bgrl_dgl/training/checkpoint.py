"""Training checkpoints: atomic writes, pruning, safe loading and random-number-generator state.

Checkpoints live in ``<run_dir>/checkpoints/step-<8 digits>.pt`` and hold only tensors and
plain data, so they load with ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import json
import pickle
import random
import re
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from bgrl_dgl.errors import InputError
from bgrl_dgl.io import atomic_path, fsync_path, remove_stale_temp_files, write_atomic
from bgrl_dgl.model.bgrl import BGRL
from bgrl_dgl.training.distributed import gather_objects

CHECKPOINT_DIR = "checkpoints"
_CHECKPOINT_NAME = re.compile(r"step-(\d{8,})\.pt")
# How torch's weights-only unpickler names an object it will not build.
_REFUSED_OBJECT = re.compile(r"(unsupported class|unrecognized function) \S+", re.IGNORECASE)


def checkpoint_path(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / CHECKPOINT_DIR / f"step-{step:08d}.pt"


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """(step, path) of every checkpoint of ``run_dir``, oldest first."""
    folder = Path(run_dir) / CHECKPOINT_DIR
    if not folder.is_dir():
        return []
    found = []
    for path in folder.iterdir():
        match = _CHECKPOINT_NAME.fullmatch(path.name)
        if match:
            found.append((int(match.group(1)), path))
    return sorted(found)


def latest_checkpoint(run_dir: Path) -> Path | None:
    """Path of the checkpoint with the highest step, or None when there is none."""
    found = list_checkpoints(run_dir)
    return found[-1][1] if found else None


def save_checkpoint(run_dir: Path, state: dict, step: int, keep: int = 3) -> Path:
    """Write ``state`` as the checkpoint of ``step`` and delete all but the newest ``keep``.

    The file is written to a temporary name in the same directory, flushed to disk and renamed,
    so a crash never leaves a partial checkpoint under a checkpoint name.
    """
    if keep < 1:
        raise ValueError(f"keep must be at least 1, got {keep}")
    path = checkpoint_path(run_dir, step)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temp_files(path.parent)
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
    fsync_path(path.parent)
    for _, old in list_checkpoints(run_dir)[:-keep]:
        old.unlink(missing_ok=True)
    return path


def load_checkpoint(path: Path) -> dict:
    """Load a checkpoint written by :func:`save_checkpoint` onto the CPU.

    Only tensors and plain data are accepted; a missing, truncated or corrupt file, or one
    holding any other object, raises ``InputError(path, problem)``.
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise InputError(path, "checkpoint not found") from None
    except IsADirectoryError:
        raise InputError(path, "checkpoint is a directory, expected a file") from None
    except Exception as err:  # a corrupt file can make the unpickler fail with any error type
        refused = _REFUSED_OBJECT.search(str(err))
        if isinstance(err, pickle.UnpicklingError) and refused:
            raise InputError(path, "refusing to load a checkpoint holding objects other than "
                                   f"tensors and plain data ({refused.group(0)})") from None
        raise InputError(path,
                         "corrupt or truncated checkpoint (not a readable torch file)") from None
    if not isinstance(state, dict):
        raise InputError(path, f"not a checkpoint: holds a {type(state).__name__}, expected a "
                               f"mapping")
    return state


def capture_rng() -> dict[str, Any]:
    """State of Python's ``random``, NumPy's global generator, torch's CPU generator and every
    CUDA device's generator (when CUDA is available), as tensors and plain data only."""
    version, mt_state, gauss_next = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state: dict[str, Any] = {
        "python": [version, list(mt_state), gauss_next],
        "numpy": [np_name, torch.from_numpy(np_keys.astype(np.int64)), int(np_pos),
                  int(np_has_gauss), float(np_gauss)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Restore generators from :func:`capture_rng`'s output. CUDA states are restored for the
    devices present (a run may resume on a machine with fewer or no GPUs)."""
    version, mt_state, gauss_next = state["python"]
    random.setstate((version, tuple(mt_state), gauss_next))
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = state["numpy"]
    np.random.set_state((np_name, np_keys.numpy().astype(np.uint32), np_pos, np_has_gauss,
                         np_gauss))
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available():
        for device, cuda_state in enumerate(state.get("cuda", [])[: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state, device)


def load_model_weights(model: BGRL, weights: dict[str, torch.Tensor], checkpoint: Path) -> None:
    """Load a checkpoint's weights into ``model``; InputError when they do not fit it (the
    run is resumed or read with model settings other than those it was trained with)."""
    try:
        model.load_state_dict(weights)
    except (RuntimeError, KeyError) as err:
        problems = str(err).splitlines()
        raise InputError(checkpoint, "its weights do not fit the model of the run's settings "
                                     f"({problems[-1].strip()})") from None


def truncate_metrics(path: Path, last_step: int) -> None:
    """Drop metric lines after ``last_step`` (written after the checkpoint a run resumes from),
    and a last line cut short by a crash; InputError for any other line that is not a record
    with an integer step."""
    if not path.exists():
        return
    try:
        lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as err:
        raise InputError(path, f"unreadable ({err})") from None
    kept = []
    for number, line in enumerate(lines, start=1):
        step = _logged_step(line)
        if step is None and number < len(lines):
            raise InputError(path, f"line {number} is not a metrics record with an integer step")
        if step is not None and step <= last_step:
            kept.append(line)
    write_atomic(path, "".join(line + "\n" for line in kept))


def _logged_step(line: str) -> int | None:
    """The step of a metrics line, or None when it is not a JSON object with an integer step."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return None
    step = record.get("step") if isinstance(record, dict) else None
    return step if isinstance(step, int) and not isinstance(step, bool) else None


# What --resume needs of a checkpoint (see Trainer.state).
RESUME_KEYS = ("model", "optimizer", "scheduler", "step", "rng")


def check_resumable(state: dict[str, Any], path: Path) -> None:
    """InputError naming what ``state`` (the checkpoint at ``path``) lacks to resume from."""
    missing = [key for key in RESUME_KEYS if key not in state]
    if missing:
        raise InputError(path, f"cannot resume from this checkpoint: it lacks {', '.join(missing)}")


class Checkpointer:
    """Writes a checkpoint every ``every`` steps and at the last step.

    Every rank calls :meth:`save` after every step; when a save is due all ranks give their
    random-generator states and rank 0 writes the file.
    """

    def __init__(self, run_dir: Path, every: int, is_main: bool) -> None:
        self.run_dir = run_dir
        self.every = every
        self.is_main = is_main

    def due(self, step: int, *, last_step: bool) -> bool:
        """Whether a checkpoint is written at ``step``."""
        return last_step or step % self.every == 0

    def save(self, step: int, state: Callable[[list[dict[str, Any]]], dict[str, Any]], *,
             last_step: bool) -> Path | None:
        """Save ``state(every rank's capture_rng())`` if a save is due at ``step``.

        Returns:
            The checkpoint written (rank 0), else None.
        """
        if not self.due(step, last_step=last_step):
            return None
        rank_rng = gather_objects(capture_rng())
        if not self.is_main:
            return None
        return save_checkpoint(self.run_dir, state(rank_rng), step)
