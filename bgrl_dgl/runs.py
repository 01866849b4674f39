"""The run directory: its file names, its settings, and the encoders it holds.

A run directory, written by ``train`` (rank 0) and read by ``embed``, ``evaluate`` and
``report``::

    config.yaml         the resolved training settings (TrainConfig)
    run.yaml            what the run trained on: store path, feature dim, nodes, processes
    metrics.jsonl       one JSON object per logged step
    evaluations.jsonl   one JSON object per linear probe (``evaluate --run``)
    checkpoints/        step-*.pt (see training/checkpoint.py)
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from bgrl_dgl import config as cfg
from bgrl_dgl.errors import InputError
from bgrl_dgl.io import file_sha256
from bgrl_dgl.model.bgrl import build_model
from bgrl_dgl.model.encoder import Encoder
from bgrl_dgl.training.checkpoint import latest_checkpoint, load_checkpoint, load_model_weights
from bgrl_dgl.training.config import TrainConfig

CONFIG_FILE = "config.yaml"
RUN_INFO_FILE = "run.yaml"
METRICS_FILE = "metrics.jsonl"
EVALUATIONS_FILE = "evaluations.jsonl"
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
    model = build_model(int(state["feat_dim"]), config.model, config.run.seed)
    origin = None
    if which != "random":
        load_model_weights(model, state["model"], checkpoint)
        origin = {"path": str(checkpoint.resolve()), "sha256": file_sha256(checkpoint),
                  "step": int(state["step"])}
    encoder = model.target if which == "target" else model.online
    return RunEncoder(encoder.eval(), config, origin, data)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The JSON objects of the non-empty lines of ``path``."""
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
        records.append(record)
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
