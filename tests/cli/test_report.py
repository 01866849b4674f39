"""``bgrl-dgl report``: the text summary and the PNG (curves, probe accuracies, embedding map),
and the map's sampling, embeddings and projection."""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
from matplotlib.image import imread
from test_export import NUM_NODES, cli, run_dir, store_dir  # noqa: F401  (fixtures)

from bgrl_dgl.cli import main
from bgrl_dgl.embedding_map import embedding_map, project, sample_labelled
from bgrl_dgl.report import RunHistory, format_summary

from helpers import assert_input_error

WIDTH, HEIGHT = 1600, 800


@pytest.fixture(scope="module")
def evaluated_run(run_dir, tmp_path_factory) -> Path:  # noqa: F811
    """``run_dir`` with probes of raw features and of both encoders' exports recorded."""
    exports = tmp_path_factory.mktemp("exports")
    assert main(["evaluate", "--raw-features", "--run", str(run_dir)]) == 0
    for encoder in ("random", "online"):
        out = exports / encoder
        assert main(["embed", "--run", str(run_dir), "--encoder", encoder, "--out", str(out)]) == 0
        assert main(["evaluate", "--embeddings", str(out), "--run", str(run_dir)]) == 0
    return run_dir


def test_report_prints_the_accuracies_and_draws_one_png(cli, evaluated_run, tmp_path):  # noqa: F811
    png = tmp_path / "report.png"
    result = cli("report", evaluated_run, "--out", png)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "2 steps (1 epochs)" in lines[0] and "s of training" in lines[0]
    table = [re.fullmatch(r"  (\w[\w ]+?) +(\d+\.\d\d)(  \(step 2\))?", line)
             for line in lines if line.startswith("  ")]
    assert all(table), lines
    assert [row[1] for row in table] == ["raw features", "untrained encoder", "trained encoder"]
    assert all(0 < float(row[2]) <= 100 for row in table)
    assert any(line.startswith("embeddings (Parquet): ") and line.endswith("online")
               for line in lines)
    assert lines[-1] == f"picture: {png}"

    image = imread(png)
    assert image.shape[:2] == (HEIGHT, WIDTH)
    assert 30_000 < png.stat().st_size < 600_000
    rgb = image[..., :3]
    ink = (rgb < 0.9).any(axis=2)
    assert 0.03 < ink.mean() < 0.6  # drawn, not blank, not a solid block
    # The map (right two fifths): many points of several class colours.
    map_rgb = rgb[60:HEIGHT - 20, int(WIDTH * 0.64):WIDTH - 20]
    coloured = map_rgb[(map_rgb.max(axis=2) - map_rgb.min(axis=2)) > 0.25]
    assert len(coloured) > 2_000
    hues = {tuple(np.round(c, 1)) for c in coloured}
    assert len(hues) >= 4


def test_the_map_reads_the_recorded_export(evaluated_run, store_dir):  # noqa: F811
    history = RunHistory.load(evaluated_run)
    found = embedding_map(evaluated_run, store_dir, history.evaluations)
    assert "online encoder, step 2, from online" == found.source
    assert found.points.shape == (NUM_NODES, 2) and np.isfinite(found.points).all()
    assert found.method == "t-SNE"


def test_without_recorded_exports_the_map_embeds_a_sample(run_dir, store_dir):  # noqa: F811
    found = embedding_map(run_dir, store_dir, [], limit=100)
    assert found.source == "online encoder, step 2"
    assert found.points.shape == (100, 2) and found.labels.shape == (100,)
    assert (found.labels >= 0).all()


def test_report_without_a_store_still_draws_the_curves(cli, run_dir, tmp_path):  # noqa: F811
    png = tmp_path / "report.png"
    result = cli("report", run_dir, "--out", png, "--data", tmp_path / "gone")
    assert result.returncode == 0
    assert "no embedding map" in result.stderr and "gone" in result.stderr
    assert imread(png).shape[:2] == (HEIGHT, WIDTH)


def test_sample_of_labelled_nodes_is_bounded_sorted_and_seeded():
    labels = np.full(50_000, -1, dtype=np.int64)
    labels[::3] = np.arange(labels[::3].size) % 5
    ids = sample_labelled(labels, limit=1_000, chunk=4096)
    assert ids.size == 1_000 and (np.diff(ids) > 0).all() and (labels[ids] >= 0).all()
    assert np.array_equal(ids, sample_labelled(labels, limit=1_000))
    assert np.array_equal(sample_labelled(labels[:30], limit=1_000), np.arange(0, 30, 3))


def blobs(per_class: int = 60, classes: int = 3, dim: int = 32) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    centres = rng.normal(0, 6, (classes, dim))
    labels = np.repeat(np.arange(classes), per_class)
    return centres[labels] + rng.normal(0, 1, (labels.size, dim)), labels


def separation(points: np.ndarray, labels: np.ndarray) -> float:
    """Smallest distance between class centroids over the largest within-class spread."""
    centroids = np.array([points[labels == c].mean(axis=0) for c in np.unique(labels)])
    spread = max(np.linalg.norm(points[labels == c] - centroids[c], axis=1).mean()
                 for c in np.unique(labels))
    gaps = [np.linalg.norm(a - b) for i, a in enumerate(centroids) for b in centroids[i + 1:]]
    return min(gaps) / spread


def test_tsne_separates_clusters():
    x, labels = blobs()
    points, method = project(x)
    assert method == "t-SNE" and points.shape == (x.shape[0], 2)
    assert separation(points, labels) > 2


@pytest.mark.parametrize("missing", [["openTSNE"], ["openTSNE", "sklearn", "sklearn.manifold"]])
def test_fallbacks_when_libraries_are_missing(monkeypatch, missing):
    for name in missing:
        monkeypatch.setitem(sys.modules, name, None)  # makes `import name` fail
    x, labels = blobs()
    points, method = project(x)
    if "sklearn" in missing:
        assert method == "PCA"
        z = (x - x.mean(0)) / x.std(0)
        _, _, vt = np.linalg.svd(z - z.mean(0), full_matrices=False)
        expected = (z - z.mean(0)) @ vt[:2].T
        for axis in range(2):  # principal axes are defined up to sign
            sign = np.sign(points[:, axis] @ expected[:, axis])
            np.testing.assert_allclose(sign * points[:, axis], expected[:, axis], rtol=1e-4,
                                       atol=1e-4)
    else:
        assert method == "t-SNE"  # scikit-learn's
    assert separation(points, labels) > 2


def test_few_points_are_mapped_by_pca():
    x, _ = blobs(per_class=5)
    points, method = project(x)
    assert method == "PCA" and points.shape == (15, 2)


def test_training_time_sums_the_sessions_of_a_resumed_run(tmp_path):
    metrics = [{"step": s, "loss": 1.0, "lr": 0.1, "tau": 0.99, "seeds_per_s": 10.0,
                "compute_s": 0.1, "wait_s": 0.0, "epoch": 0, "elapsed_s": e}
               for s, e in ((1, 1.0), (2, 2.0), (3, 0.5), (4, 1.5))]
    history = RunHistory(tmp_path, metrics, [])
    assert history.train_seconds() == pytest.approx(3.5)
    summary = format_summary(history.summary(), [])
    assert "4 steps (1 epochs), 4 s of training" in summary


def test_bad_report_input_is_one_line(cli, run_dir, tmp_path):  # noqa: F811
    assert_input_error(cli("report", tmp_path / "norun"), "norun", "not a run directory")
    assert_input_error(cli("report", run_dir, "--out", tmp_path / "no" / "r.png"), "no",
                       "no such directory")
    assert not (tmp_path / "no").exists()
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.yaml").write_text((run_dir / "config.yaml").read_text())
    (bad / "metrics.jsonl").write_text(json.dumps({"step": 1}) + "\n")
    assert_input_error(cli("report", bad), "metrics.jsonl", "lacks")
