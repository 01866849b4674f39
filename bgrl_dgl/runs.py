"""The run directory: its file names, its settings, and the encoders it holds.

A run directory, written by ``train`` (rank 0) and read by ``embed``, ``evaluate`` and
``report``::

    config.yaml         the resolved training settings (TrainConfig)
    run.yaml            what the run trained on: store path, feature dim, nodes, processes
    metrics.jsonl       one JSON object per logged step
    evaluations.jsonl   one JSON object per linear probe (``evaluate --run``)
    checkpoints/        step-*.pt (see training/checkpoint.py)
    .lock               locked (``flock``) by the ``train`` process writing the run; holds its pid
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from bgrl_dgl import config as cfg
from bgrl_dgl.errors import InputError
from bgrl_dgl.io import TEMP_NAME, file_sha256, remove_stale_temp_files
from bgrl_dgl.model.bgrl import build_model
from bgrl_dgl.model.encoder import Encoder
from bgrl_dgl.store.format import META_FILE
from bgrl_dgl.training.checkpoint import (
    check_resumable,
    latest_checkpoint,
    load_checkpoint,
    load_model_weights,
)
from bgrl_dgl.training.config import TrainConfig
from bgrl_dgl.training.distributed import World, broadcast_object

CONFIG_FILE = "config.yaml"
RUN_INFO_FILE = "run.yaml"
METRICS_FILE = "metrics.jsonl"
EVALUATIONS_FILE = "evaluations.jsonl"
LOCK_FILE = ".lock"
ENCODERS = ("online", "target", "random")
EncoderName = Literal["online", "target", "random"]


@dataclass(frozen=True)
class RunInfo:
    """What a run trained on (``run.yaml``)."""

    data: Path
    feat_dim: int
    num_nodes: int
    world_size: int = 1

    def to_dict(self) -> dict[str, Any]:
        return {"data": str(self.data), "feat_dim": self.feat_dim, "num_nodes": self.num_nodes,
                "world_size": self.world_size}

    @classmethod
    def from_dict(cls, data: Any, source: Path) -> "RunInfo":
        if not isinstance(data, dict):
            raise InputError(source, "must be a mapping of data, feat_dim, num_nodes")
        missing = [key for key in ("data", "feat_dim", "num_nodes") if key not in data]
        if missing:
            raise InputError(source, f"lacks {', '.join(missing)}")
        try:
            return cls(Path(data["data"]), int(data["feat_dim"]), int(data["num_nodes"]),
                       int(data.get("world_size", 1)))
        except (TypeError, ValueError) as err:
            raise InputError(source, f"holds a value of the wrong type ({err})") from None


def check_run_dir(run_dir: str | os.PathLike) -> Path:
    """``run_dir`` as a Path; InputError unless it holds a run's ``config.yaml``."""
    run_dir = Path(run_dir)
    if not (run_dir / CONFIG_FILE).is_file():
        raise InputError(run_dir, f"not a run directory (no {CONFIG_FILE})")
    return run_dir


class RunLock:
    """The exclusive right to write a run directory: an ``flock`` on ``RUN/.lock``, held from
    :meth:`acquire` until :meth:`release` (or the end of a ``with`` block, or the process).

    The kernel drops the lock when its holder dies, however it dies, so a lock is never
    stale; the file stays and records the holder (``pid@host``) for the message of a refused
    writer.
    """

    def __init__(self, run_dir: str | os.PathLike) -> None:
        self.run_dir = Path(run_dir)
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> None:
        """Take the lock; InputError when another process holds it (or the directory cannot
        be written)."""
        if self._fd is not None:
            return
        try:
            # O_NOFOLLOW: a link planted as .lock must not make the pid overwrite its target.
            fd = os.open(self.run_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW,
                         0o644)
        except OSError as err:
            raise InputError(self.run_dir,
                             f"cannot write into it ({err.strerror or err})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 256, 0).decode("utf-8", "replace").strip()
            os.close(fd)
            raise InputError(self.run_dir, "is in use by another train process "
                                           f"({_describe_holder(holder)})") from None
        holder = f"{os.getpid()}@{socket.gethostname()}\n".encode()
        if os.pread(fd, 256, 0) != holder:  # (unchanged when this process held it before)
            os.ftruncate(fd, 0)
            os.pwrite(fd, holder, 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def __enter__(self) -> "RunLock":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


def _describe_holder(holder: str) -> str:
    """'pid N' (on this host) or 'pid N on HOST', from a lock file's ``pid@host``."""
    pid, _, host = holder.partition("@")
    if not pid.isdigit():
        return "pid unknown"
    return f"pid {pid}" if host in ("", socket.gethostname()) else f"pid {pid} on {host}"


def check_run_target(run_dir: Path) -> None:
    """InputError unless ``run_dir`` may receive a run: absent, an empty directory, or a run
    directory (holds ``config.yaml``). A file, a graph store or any other directory with
    contents is refused, so that ``train`` never writes into what is not a run."""
    if not run_dir.exists():
        if run_dir.is_symlink():
            raise InputError(run_dir, "is a broken symbolic link")
        return
    if not run_dir.is_dir():
        raise InputError(run_dir, "exists and is not a directory; --out must name a run directory")
    if (run_dir / CONFIG_FILE).is_file():
        return
    try:
        others = sorted(entry.name for entry in run_dir.iterdir()
                        if entry.name != LOCK_FILE and not TEMP_NAME.fullmatch(entry.name))
    except OSError as err:
        raise InputError(run_dir, f"cannot read it ({err.strerror or err})") from None
    if (run_dir / META_FILE).is_file():
        raise InputError(run_dir, "is a graph store, not a run directory; refusing to write "
                                  "into it: choose a new or empty directory for --out")
    if others:
        more = f" and {len(others) - 1} more" if len(others) > 1 else ""
        raise InputError(run_dir, f"exists and is not a run directory (no {CONFIG_FILE}; holds "
                                  f"{others[0]}{more}); refusing to write into it: choose a new "
                                  "or empty directory")


def claim_run_dir(run_dir: Path, resume: bool, lock: RunLock) -> Path | None:
    """Check, create and lock ``run_dir`` for training (lock held until released by the
    caller); return the checkpoint to resume from, if any."""
    check_run_target(run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise InputError(run_dir, f"cannot create it ({err.strerror or err})") from None
    lock.acquire()
    check_run_target(run_dir)  # as found once locked: no other writer can change it now
    checkpoint = latest_checkpoint(run_dir)
    if checkpoint is not None and not resume:
        raise InputError(run_dir, "already holds a run; pass --resume to continue it")
    remove_stale_temp_files(run_dir)
    return checkpoint


def resume_state(run_dir: Path, resume: bool, world: World,
                 lock: RunLock) -> tuple[Path, dict[str, Any]] | None:
    """Rank 0 claims ``run_dir`` (:func:`claim_run_dir`, holding ``lock``) and reads the
    checkpoint to resume from; every rank gets its path and state (so only rank 0 needs to
    see the run directory), or the same error."""
    outcome: tuple[str, Any] | None = None
    if world.is_main:
        try:
            checkpoint = claim_run_dir(run_dir, resume, lock)
            if checkpoint is not None:
                state = load_checkpoint(checkpoint)
                check_resumable(state, checkpoint)
                outcome = ("ok", (str(checkpoint), state))
        except InputError as err:
            outcome = ("error", (None if err.path is None else str(err.path), err.problem))
    outcome = broadcast_object(outcome)  # plain data and tensors only
    if outcome is None:
        return None
    kind, (path, value) = outcome
    if kind == "error":
        raise InputError(path, value)
    return Path(path), value


def load_run_config(run_dir: str | os.PathLike) -> tuple[TrainConfig, RunInfo]:
    """The resolved settings of a run and what it trained on."""
    run_dir = check_run_dir(run_dir)
    config = TrainConfig.from_plain(cfg.load_yaml(run_dir / CONFIG_FILE),
                                    str(run_dir / CONFIG_FILE))
    info_path = run_dir / RUN_INFO_FILE
    return config, RunInfo.from_dict(cfg.load_yaml(info_path), info_path)


def write_run_files(run_dir: Path, config: TrainConfig, info: RunInfo) -> None:
    """Write ``config.yaml`` and ``run.yaml`` (each atomically)."""
    cfg.save_yaml(cfg.to_dict(config), run_dir / CONFIG_FILE)
    cfg.save_yaml(info.to_dict(), run_dir / RUN_INFO_FILE)


@dataclass(frozen=True)
class RunEncoder:
    """An encoder of a run or checkpoint, and where it came from.

    ``checkpoint``: {"path", "sha256", "step"} of the weights; None for the initial weights.
    ``data``: the store the run trained on (None when loaded from a checkpoint file alone).
    """

    encoder: Encoder
    config: TrainConfig
    checkpoint: dict[str, Any] | None
    data: Path | None


def load_encoder(run: str | os.PathLike | None = None,
                 checkpoint: str | os.PathLike | None = None,
                 which: EncoderName = "online") -> RunEncoder:
    """The ``which`` encoder of a run (its newest checkpoint) or of a checkpoint file.

    Args:
        run: a run directory; its newest checkpoint is read.
        checkpoint: a checkpoint file (``step-*.pt``), instead of ``run``.
        which: ``online``, ``target``, or ``random``: the encoder as initialised before
            training (the baseline of the linear probe; no weights are read).

    Returns:
        The encoder in eval mode, with its settings and origin.
    """
    if (run is None) == (checkpoint is None):
        raise InputError(None, "give exactly one of --run and --checkpoint")
    if which not in ENCODERS:
        raise InputError(None, f"--encoder must be one of {', '.join(ENCODERS)}, got {which!r}")
    data = None
    if run is not None:
        config, info = load_run_config(run)
        data = info.data
        if which == "random":
            model = build_model(info.feat_dim, config.model, config.run.seed)
            return RunEncoder(model.online.eval(), config, None, data)
        checkpoint = latest_checkpoint(Path(run))
        if checkpoint is None:
            raise InputError(run, "holds no checkpoint")
    checkpoint = Path(checkpoint)
    state = load_checkpoint(checkpoint)
    missing = [key for key in ("config", "feat_dim", "model", "step") if key not in state]
    if missing:
        raise InputError(checkpoint, f"not a training checkpoint (lacks {', '.join(missing)})")
    config = TrainConfig.from_plain(state["config"], str(checkpoint))
    feat_dim, step = state["feat_dim"], state["step"]
    if not (_is_int(feat_dim) and _is_int(step) and feat_dim > 0 and step >= 0):
        raise InputError(checkpoint, "not a training checkpoint (feat_dim and step must be "
                                     "positive and non-negative integers)")
    model = build_model(feat_dim, config.model, config.run.seed)
    origin = None
    if which != "random":
        load_model_weights(model, state["model"], checkpoint)
        origin = {"path": str(checkpoint.resolve()), "sha256": file_sha256(checkpoint),
                  "step": step}
    encoder = model.target if which == "target" else model.online
    return RunEncoder(encoder.eval(), config, origin, data)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The JSON objects of the non-empty lines of ``path``."""
    return [record for _, record in read_numbered_jsonl(path)]


def read_numbered_jsonl(path: Path) -> list[tuple[int, dict[str, Any]]]:
    """(line number, JSON object) of the non-empty lines of ``path``; InputError naming the
    first line that is not a JSON object."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise InputError(path, "not found") from None
    except (OSError, UnicodeDecodeError) as err:
        raise InputError(path, f"unreadable ({err})") from None
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise InputError(path, f"line {number} is not valid JSON ({err})") from None
        if not isinstance(record, dict):
            raise InputError(path, f"line {number} is not a JSON object")
        records.append((number, record))
    return records


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    """Append ``record`` as one line, in a single write (lines of concurrent writers stay whole)."""
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(record) + "\n")


def append_evaluation(run_dir: str | os.PathLike, record: dict[str, Any]) -> Path:
    """Append one probe result to ``RUN/evaluations.jsonl``."""
    path = check_run_dir(run_dir) / EVALUATIONS_FILE
    append_jsonl(path, record)
    return path
