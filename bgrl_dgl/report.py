"""A run at a glance: a text summary and a PNG of loss, learning rate, tau and probe accuracy
over the training steps.

Training writes ``RUN/metrics.jsonl`` (one line per logged step); ``bgrl-dgl evaluate --run
RUN`` appends one line per linear probe to ``RUN/evaluations.jsonl`` (the probed checkpoint's
step, encoder, splits and accuracies). The plot needs matplotlib, an optional extra
(``pip install 'bgrl-dgl[plot]'``); the summary does not.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bgrl_dgl.errors import InputError
from bgrl_dgl.io import atomic_path
from bgrl_dgl.runs import EVALUATIONS_FILE, METRICS_FILE, check_run_dir, read_numbered_jsonl

INSTALL_PLOT = "pip install 'bgrl-dgl[plot]'"


# The keys the summary and the plot read, and whether each must be a number.
METRIC_KEYS = {key: True for key in
               ("step", "loss", "lr", "tau", "seeds_per_s", "compute_s", "wait_s")}
EVALUATION_KEYS = {"step": True, "test_acc_mean": True, "test_acc_std": True,
                   "encoder": False, "splits": False}


def read_records(path: Path, keys: dict[str, bool]) -> list[dict[str, Any]]:
    """The JSON lines of ``path``; InputError naming the first line that lacks one of
    ``keys`` or holds something other than a number where a number is expected."""
    records = read_numbered_jsonl(path)
    for number, record in records:
        missing = [key for key in keys if key not in record]
        if missing:
            raise InputError(path, f"line {number} lacks {', '.join(missing)}")
        for key, numeric in keys.items():
            value = record[key]
            if numeric and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise InputError(path, f"line {number}: {key} is not a number ({value!r})")
    return [record for _, record in records]


@dataclass(frozen=True)
class RunHistory:
    """The logged metrics of a run (ascending steps) and its probe results."""

    run_dir: Path
    metrics: list[dict[str, Any]]
    evaluations: list[dict[str, Any]]

    @classmethod
    def load(cls, run_dir: str | os.PathLike) -> "RunHistory":
        run_dir = check_run_dir(run_dir)
        metrics = read_records(run_dir / METRICS_FILE, METRIC_KEYS)
        if not metrics:
            raise InputError(run_dir / METRICS_FILE, "holds no logged steps yet")
        evaluations_path = run_dir / EVALUATIONS_FILE
        evaluations = (read_records(evaluations_path, EVALUATION_KEYS)
                       if evaluations_path.exists() else [])
        return cls(run_dir, sorted(metrics, key=lambda m: m["step"]), evaluations)

    def series(self, key: str) -> tuple[list[int], list[float]]:
        return [m["step"] for m in self.metrics], [m[key] for m in self.metrics]

    def summary(self) -> dict[str, Any]:
        """steps, final and best loss, mean seeds/s, and the training time estimated as
        steps x the mean logged step time (compute + waiting for batches)."""
        best = min(self.metrics, key=lambda m: m["loss"])
        step_s = sum(m["compute_s"] + m["wait_s"] for m in self.metrics) / len(self.metrics)
        last = self.metrics[-1]
        return {
            "run": str(self.run_dir),
            "steps": last["step"],
            "final_loss": last["loss"],
            "best_loss": best["loss"],
            "best_loss_step": best["step"],
            "seeds_per_s": sum(m["seeds_per_s"] for m in self.metrics) / len(self.metrics),
            "train_s_estimate": step_s * last["step"],
            "evaluations": len(self.evaluations),
        }


def format_summary(summary: dict[str, Any], evaluations: list[dict[str, Any]]) -> str:
    lines = [
        f"run {summary['run']}: {summary['steps']} steps",
        f"loss: final {summary['final_loss']:.4f}, best {summary['best_loss']:.4f} "
        f"(step {summary['best_loss_step']})",
        f"throughput: {summary['seeds_per_s']:.0f} seeds/s (mean of the logged steps)",
        f"wall: about {summary['train_s_estimate']:.1f} s of training "
        "(steps x mean logged step time)",
    ]
    for record in evaluations:
        lines.append(f"probe at step {record['step']} ({record['encoder']} encoder, "
                     f"{record['splits']} splits): test {100 * record['test_acc_mean']:.2f} ± "
                     f"{100 * record['test_acc_std']:.2f}")
    return "\n".join(lines)


def plot_history(history: RunHistory, out: Path) -> Path:
    """Draw loss, lr, tau and probe accuracy against the step into the PNG ``out``
    (written to a temp name, then renamed). InputError when matplotlib is missing."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise InputError(None, f"the plot needs matplotlib: {INSTALL_PLOT}") from None

    figure = Figure(figsize=(11, 7), layout="constrained")
    FigureCanvasAgg(figure)
    figure.suptitle(f"BGRL run {history.run_dir.name}")
    axes = figure.subplots(2, 2, sharex=True)
    for ax, key, title in ((axes[0, 0], "loss", "loss"), (axes[0, 1], "lr", "learning rate"),
                           (axes[1, 0], "tau", "target EMA momentum τ")):
        steps, values = history.series(key)
        ax.plot(steps, values, marker="o" if len(steps) < 30 else None)
        ax.set_title(title)
    plot_accuracy(axes[1, 1], history.evaluations)
    for ax in axes[1]:
        ax.set_xlabel("step")
    with atomic_path(out) as tmp:
        figure.savefig(tmp, dpi=100)
    return out


def plot_accuracy(ax: Any, evaluations: list[dict[str, Any]]) -> None:
    """Test accuracy (mean ± std over splits) per step, one line per (encoder, splits)."""
    ax.set_title("linear probe: test accuracy")
    if not evaluations:
        ax.text(0.5, 0.5, "no evaluations yet:\nbgrl-dgl evaluate --run RUN ...",
                ha="center", va="center", transform=ax.transAxes)
        return
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for record in evaluations:
        groups.setdefault((record["encoder"], record["splits"]), []).append(record)
    for (encoder, splits), records in sorted(groups.items()):
        records.sort(key=lambda r: r["step"])
        ax.errorbar([r["step"] for r in records], [r["test_acc_mean"] for r in records],
                    yerr=[r["test_acc_std"] for r in records], marker="o", capsize=3,
                    label=f"{encoder}, {splits} splits")
    ax.legend()
