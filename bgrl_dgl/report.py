"""A run at a glance: a text summary and one PNG of loss, tau, learning rate, seeds/s and
probe accuracies over the training steps, beside a 2-D map of the node embeddings.

Training writes ``RUN/metrics.jsonl`` (one line per logged step); ``bgrl-dgl evaluate --run
RUN`` appends one line per linear probe to ``RUN/evaluations.jsonl`` (the probed export's
path, step, encoder, splits and accuracies). The map is drawn by
:mod:`bgrl_dgl.embedding_map`.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from bgrl_dgl import config as cfg
from bgrl_dgl.errors import InputError
from bgrl_dgl.io import atomic_path
from bgrl_dgl.runs import (
    EVALUATIONS_FILE,
    METRICS_FILE,
    RUN_INFO_FILE,
    check_run_dir,
    read_numbered_jsonl,
)

if TYPE_CHECKING:
    from bgrl_dgl.embedding_map import EmbeddingMap


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
    """The logged metrics of a run (ascending steps), its probe results and its store."""

    run_dir: Path
    metrics: list[dict[str, Any]]
    evaluations: list[dict[str, Any]]
    data: str | None = None

    @classmethod
    def load(cls, run_dir: str | os.PathLike) -> "RunHistory":
        run_dir = check_run_dir(run_dir)
        metrics = read_records(run_dir / METRICS_FILE, METRIC_KEYS)
        if not metrics:
            raise InputError(run_dir / METRICS_FILE, "holds no logged steps yet")
        evaluations_path = run_dir / EVALUATIONS_FILE
        evaluations = (read_records(evaluations_path, EVALUATION_KEYS)
                       if evaluations_path.exists() else [])
        return cls(run_dir, sorted(metrics, key=lambda m: m["step"]), evaluations,
                   recorded_store(run_dir))

    def series(self, key: str) -> tuple[list[int], list[float]]:
        return [m["step"] for m in self.metrics], [m[key] for m in self.metrics]

    def train_seconds(self) -> float:
        """Training time: the elapsed time of the last logged step of each session (a resumed
        run restarts its clock), summed; without elapsed times, steps x mean step time."""
        if all("elapsed_s" in m for m in self.metrics):
            total = previous = 0.0
            for record in self.metrics:
                if record["elapsed_s"] < previous:
                    total += previous
                previous = record["elapsed_s"]
            return total + previous
        step_s = sum(m["compute_s"] + m["wait_s"] for m in self.metrics) / len(self.metrics)
        return step_s * self.metrics[-1]["step"]

    def summary(self) -> dict[str, Any]:
        """steps, epochs, final and best loss, mean seeds/s and the training time."""
        best = min(self.metrics, key=lambda m: m["loss"])
        last = self.metrics[-1]
        return {
            "run": str(self.run_dir),
            "data": self.data,
            "steps": last["step"],
            "epochs": last["epoch"] + 1 if "epoch" in last else None,
            "final_loss": last["loss"],
            "best_loss": best["loss"],
            "best_loss_step": best["step"],
            "seeds_per_s": sum(m["seeds_per_s"] for m in self.metrics) / len(self.metrics),
            "train_s": self.train_seconds(),
            "evaluations": len(self.evaluations),
        }


def recorded_store(run_dir: Path) -> str | None:
    """The store path in ``RUN/run.yaml``; None when it is missing or unreadable (the summary
    and the curves do not need it)."""
    try:
        data = cfg.load_yaml(run_dir / RUN_INFO_FILE).get("data")
    except InputError:
        return None
    return None if data is None else str(data)


ENCODER_NAMES = {"raw-features": "raw features", "random": "untrained encoder",
                 "online": "trained encoder", "target": "trained target encoder"}
BASELINES = ("raw-features", "random")


def latest_evaluations(evaluations: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The newest record of each (encoder, splits), baselines first."""
    latest: dict[tuple[str, str], dict[str, Any]] = {}
    for record in evaluations:
        latest[(record["encoder"], record["splits"])] = record
    order = list(ENCODER_NAMES)
    return sorted(latest.values(), key=lambda r: (
        r["splits"], order.index(r["encoder"]) if r["encoder"] in order else len(order)))


def shown(path: str) -> str:
    """``path`` relative to the working directory when it lies inside it, else as given."""
    relative = os.path.relpath(path)
    return path if relative.startswith("..") else relative


def format_summary(summary: dict[str, Any], evaluations: list[dict[str, Any]]) -> str:
    epochs = f" ({summary['epochs']} epochs)" if summary.get("epochs") else ""
    store = f" on store {shown(summary['data'])}" if summary.get("data") else ""
    lines = [
        (f"run {summary['run']}{store}: {summary['steps']} steps{epochs}, "
         f"{summary['train_s']:.0f} s of training"),
        (f"loss: final {summary['final_loss']:.4f}, best {summary['best_loss']:.4f} "
         f"(step {summary['best_loss_step']}); {summary['seeds_per_s']:,.0f} seeds/s "
         "(mean of the logged steps)"),
    ]
    splits = None
    for record in latest_evaluations(evaluations):
        if record["splits"] != splits:
            splits = record["splits"]
            lines.append(f"linear probe, test {record.get('metric', 'accuracy')} "
                         f"({splits} splits):")
        name = ENCODER_NAMES.get(record["encoder"], record["encoder"])
        several = record.get("num_splits", 1) > 1
        spread = f" ± {100 * record['test_acc_std']:.2f}" if several else ""
        step = "" if record["encoder"] in BASELINES else f"  (step {record['step']})"
        lines.append(f"  {name:<24}{100 * record['test_acc_mean']:6.2f}{spread}{step}")
    exports = [r["embeddings"] for r in evaluations
               if r.get("embeddings") and r["encoder"] not in BASELINES]
    if exports:
        lines.append(f"embeddings (Parquet): {shown(exports[-1])}")
    return "\n".join(lines)


def plot_history(history: RunHistory, out: Path, embedding: "EmbeddingMap | str") -> Path:
    """Draw the run's curves, probe accuracies and ``embedding`` (a map, or why there is
    none) into the PNG ``out`` (written to a temp name, then renamed)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(16, 8), layout="constrained")
    FigureCanvasAgg(figure)
    store = f" on store '{Path(history.data).name}'" if history.data else ""
    figure.suptitle(f"BGRL run '{history.run_dir.name}'{store}: {history.metrics[-1]['step']} "
                    "steps", fontsize=15, fontweight="bold")
    grid = figure.add_gridspec(2, 5)
    first = figure.add_subplot(grid[0, 0])
    panels = [(first, "loss", "BGRL loss"),
              (figure.add_subplot(grid[0, 1], sharex=first), "tau", "target EMA momentum τ"),
              (figure.add_subplot(grid[0, 2], sharex=first), "lr", "learning rate"),
              (figure.add_subplot(grid[1, 0], sharex=first), "seeds_per_s", "seeds per second")]
    for ax, key, title in panels:
        steps, values = history.series(key)
        ax.plot(steps, values, marker="o" if len(steps) < 30 else None, color="tab:blue")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    panels[2][0].ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
    accuracy = figure.add_subplot(grid[1, 1:3], sharex=first)
    plot_accuracy(accuracy, history.evaluations)
    for ax in (panels[3][0], accuracy):
        ax.set_xlabel("step")
    plot_map(figure.add_subplot(grid[:, 3:]), embedding)
    with atomic_path(out) as tmp:
        figure.savefig(tmp, dpi=100, format="png")
    return out


def plot_accuracy(ax: Any, evaluations: list[dict[str, Any]]) -> None:
    """Baselines (raw features, untrained encoder) as dashed lines; the trained encoders'
    test accuracy (mean ± std over splits) per step, one line per (encoder, splits); each
    labelled with its newest value."""
    ax.set_title("linear probe: test accuracy (%)")
    ax.grid(alpha=0.3)
    if not evaluations:
        ax.text(0.5, 0.5, "no evaluations yet:\nbgrl-dgl evaluate --run RUN ...",
                ha="center", va="center", transform=ax.transAxes)
        return
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for record in evaluations:
        groups.setdefault((record["encoder"], record["splits"]), []).append(record)
    several_splits = len({splits for _, splits in groups}) > 1
    colours = iter(["tab:blue", "tab:green", "tab:purple", "tab:brown", "tab:pink"])
    values = []
    for (encoder, splits), records in groups.items():
        name = ENCODER_NAMES.get(encoder, encoder)
        name += f", {splits} splits" if several_splits else ""
        value = 100 * records[-1]["test_acc_mean"]
        values.append(value)
        if encoder in BASELINES:
            colour = "tab:orange" if encoder == "raw-features" else "tab:gray"
            ax.axhline(value, linestyle="--", color=colour)
            ax.annotate(f"{name}: {value:.1f}", (0.02, value), xycoords=("axes fraction", "data"),
                        xytext=(0, 3), textcoords="offset points", color=colour, fontsize=10)
            continue
        records.sort(key=lambda r: r["step"])
        colour = next(colours)
        ax.errorbar([r["step"] for r in records], [100 * r["test_acc_mean"] for r in records],
                    yerr=[100 * r["test_acc_std"] for r in records], marker="o", markersize=7,
                    capsize=3, color=colour)
        ax.annotate(f"{name}: {value:.1f}", (records[-1]["step"], value), xytext=(-6, 6),
                    textcoords="offset points", ha="right", color=colour, fontsize=10,
                    fontweight="bold")
    ax.set_ylim(min(values) - 6, max(values) + 6)


def plot_map(ax: Any, embedding: "EmbeddingMap | str") -> None:
    """The 2-D map coloured by class, or the reason there is none."""
    ax.set_xticks([])
    ax.set_yticks([])
    if isinstance(embedding, str):
        ax.set_title("node embeddings")
        ax.text(0.5, 0.5, f"no map:\n{embedding}", ha="center", va="center", wrap=True,
                transform=ax.transAxes)
        return
    import matplotlib

    classes = np.unique(embedding.labels)
    cmap = matplotlib.colormaps["tab10" if classes.size <= 10 else "tab20"]
    for index, label in enumerate(classes):
        chosen = embedding.labels == label
        color = cmap(index % cmap.N) if classes.size <= 20 else cmap(index / classes.size)
        ax.scatter(*embedding.points[chosen].T, s=6, alpha=0.8, color=color,
                   label=f"class {label}", linewidths=0)
    ax.set_title(f"node embeddings: {embedding.method} of {len(embedding.labels):,} labelled "
                 f"nodes\n({embedding.source})", fontsize=11)
    if classes.size <= 20:
        ax.legend(markerscale=3, fontsize=9, loc="best", ncols=2 if classes.size > 10 else 1)
