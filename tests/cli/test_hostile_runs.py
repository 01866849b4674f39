"""``evaluate``, ``report`` and ``train --resume`` against damaged or mismatched inputs: a
manifest, a part, a store, a run file or a checkpoint that is not what it should be is
refused with one line naming it, and nothing is changed."""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from bgrl_dgl.cli import main
from bgrl_dgl.training.checkpoint import latest_checkpoint, list_checkpoints

from helpers import PLANTED_NODES, assert_input_error, write_test_store

FEAT_DIM = 16  # the planted store's


def cli_result(capsys, *args) -> subprocess.CompletedProcess:
    """The command line run in this process, reported as a finished process would be."""
    argv = [str(a) for a in args]
    code = main(argv)
    captured = capsys.readouterr()
    return subprocess.CompletedProcess(argv, code, captured.out, captured.err)


def snapshot(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*"))
            if p.is_file()}


@pytest.fixture(scope="module")
def run_dir(planted_store, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("inputs") / "run"
    assert main(["train", "--data", str(planted_store), "--out", str(run), "--max-steps", "2",
                 "--hidden", "16,8", "--predictor-hidden", "16", "--num-workers", "0",
                 "--batch-size", "128", "--threads", "1", "--device", "cpu",
                 "--log-every", "1"]) == 0
    return run


@pytest.fixture(scope="module")
def export_dir(run_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("inputs") / "emb"
    assert main(["embed", "--run", str(run_dir), "--out", str(out), "--rows-per-part", "250",
                 "--device", "cpu"]) == 0
    return out


def copy_of(source: Path, tmp_path: Path) -> Path:
    target = tmp_path / source.name
    shutil.copytree(source, target)
    return target


# ---- evaluate --embeddings: the manifest, the parts and the store --------------------------
def drop_keys(manifest: dict, *keys: str) -> None:
    for key in keys:
        del manifest[key]


MANIFEST_CASES = {
    # id: (change to the manifest, fragments of the message)
    "no dim": (lambda m: drop_keys(m, "dim"), ["_manifest.json", "lacks dim"]),
    "no data nor parts": (lambda m: drop_keys(m, "data", "parts"), ["lacks data, parts"]),
    "a part outside the export": (lambda m: m["parts"][0].update(file="../../x.parquet"),
                                  ["holds a malformed parts"]),
    "a dim of text": (lambda m: m.update(dim="8"), ["holds a malformed dim"]),
    "data without counts": (lambda m: m["data"].pop("num_edges"), ["holds a malformed data"]),
    "a dim the parts do not have": (lambda m: m.update(dim=9),
                                    ["part-00000.parquet", "column embedding is", "[9]"]),
}


@pytest.mark.parametrize("case", list(MANIFEST_CASES))
def test_a_damaged_manifest_is_named(export_dir, tmp_path, capsys, case) -> None:
    change, fragments = MANIFEST_CASES[case]
    out = copy_of(export_dir, tmp_path)
    manifest = json.loads((out / "_manifest.json").read_text())
    change(manifest)
    (out / "_manifest.json").write_text(json.dumps(manifest))
    assert_input_error(cli_result(capsys, "evaluate", "--embeddings", out), *fragments)


def rewrite_first_part(out: Path, column: str, values: pa.Array) -> None:
    path = out / "part-00000.parquet"
    table = pq.read_table(path)
    table = table.set_column(table.schema.get_field_index(column), column, values)
    pq.write_table(table, path)


def test_a_part_with_text_node_ids_is_named(export_dir, tmp_path, capsys) -> None:
    out = copy_of(export_dir, tmp_path)
    rewrite_first_part(out, "node_id", pa.array([str(i) for i in range(250)]))
    assert_input_error(cli_result(capsys, "evaluate", "--embeddings", out),
                       "part-00000.parquet", "column node_id is string")


def test_a_part_of_another_width_is_named(export_dir, tmp_path, capsys) -> None:
    out = copy_of(export_dir, tmp_path)
    wide = pa.FixedSizeListArray.from_arrays(pa.array(np.zeros(250 * 4, np.float32)), 4)
    rewrite_first_part(out, "embedding", wide)
    assert_input_error(cli_result(capsys, "evaluate", "--embeddings", out),
                       "part-00000.parquet", "column embedding is fixed_size_list", "[4]")


def test_another_store_than_the_exports_is_refused(export_dir, tmp_path, capsys) -> None:
    other = tmp_path / "other"
    assert main(["prepare", "synthetic", "--out", str(other), "--num-nodes", str(PLANTED_NODES),
                 "--avg-degree", "3", "--feat-dim", str(FEAT_DIM), "--num-classes", "4"]) == 0
    capsys.readouterr()
    result = cli_result(capsys, "evaluate", "--embeddings", export_dir, "--data", other)
    assert_input_error(result, str(other), "is not the store the export", "that one:",
                       f"this one: {PLANTED_NODES} nodes")


def test_a_copy_of_the_exports_store_is_accepted(export_dir, planted_store, tmp_path,
                                                 capsys) -> None:
    copy = copy_of(planted_store, tmp_path)
    result = cli_result(capsys, "evaluate", "--embeddings", export_dir, "--data", copy, "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["data"] == str(copy.resolve())


# ---- the probe's labels and splits ---------------------------------------------------------
def store_with_labels(path: Path, labels: np.ndarray) -> Path:
    rng = np.random.default_rng(0)
    n = labels.size
    src, dst = rng.integers(0, n, 4 * n), rng.integers(0, n, 4 * n)
    splits = {"train": np.arange(0, 20), "valid": np.arange(20, 40), "test": np.arange(40, n)}
    write_test_store(path, n, src, dst, rng.normal(size=(n, FEAT_DIM)).astype(np.float32),
                     labels=labels, splits=splits)
    return path


@pytest.mark.parametrize("splits", ["public", "random"])
def test_a_store_without_labelled_nodes_is_named(run_dir, tmp_path, capsys, splits) -> None:
    store = store_with_labels(tmp_path / "unlabelled", np.full(100, -1))
    result = cli_result(capsys, "evaluate", "--run", run_dir, "--data", store, "--splits", splits)
    assert_input_error(result, str(store), "has no labelled nodes")
    assert not (run_dir / "evaluations.jsonl").exists()


def test_a_split_without_labelled_nodes_is_named(run_dir, tmp_path, capsys) -> None:
    labels = np.where(np.arange(100) < 40, np.arange(100) % 3, -1)  # the test split: none
    store = store_with_labels(tmp_path / "no-test-labels", labels)
    result = cli_result(capsys, "evaluate", "--run", run_dir, "--data", store)
    assert_input_error(result, str(store), "split 'test' has no labelled nodes")


@pytest.mark.parametrize("splits", ["public", "random"])
def test_zero_splits_are_refused(export_dir, run_dir, capsys, splits) -> None:
    for source in (["--embeddings", export_dir], ["--run", run_dir]):
        result = cli_result(capsys, "evaluate", *source, "--splits", splits, "--num-splits", "0")
        assert_input_error(result, "--num-splits must be positive, got 0")
    assert not (run_dir / "evaluations.jsonl").exists()


@pytest.mark.parametrize("text,fragments", [
    ("feat_dim: 16\nnum_nodes: 600\n", ["run.yaml", "lacks data"]),
    ("- data\n", ["run.yaml", "mapping"]),
], ids=["no data", "a list"])
def test_a_damaged_run_yaml_is_named(run_dir, tmp_path, capsys, text, fragments) -> None:
    run = copy_of(run_dir, tmp_path)
    (run / "run.yaml").write_text(text)
    before = snapshot(run)
    assert_input_error(cli_result(capsys, "evaluate", "--run", run), *fragments)
    assert snapshot(run) == before


def test_a_checkpoint_whose_config_is_not_a_mapping_is_named(run_dir, tmp_path, capsys) -> None:
    run = copy_of(run_dir, tmp_path)
    path = latest_checkpoint(run)
    state = torch.load(path, weights_only=True)
    state["config"] = ["sampling"]
    torch.save(state, path)
    assert_input_error(cli_result(capsys, "evaluate", "--run", run), str(path),
                       "expected a mapping of sections")


# ---- report --------------------------------------------------------------------------------
REPORT_CASES = {
    "text loss": ("metrics.jsonl", lambda r: r.update(loss="abc"),
                  ["metrics.jsonl", "line 2: loss is not a number ('abc')"]),
    "null lr": ("metrics.jsonl", lambda r: r.update(lr=None), ["line 2: lr is not a number"]),
    "boolean step": ("metrics.jsonl", lambda r: r.update(step=True),
                     ["line 2: step is not a number"]),
    "evaluation without std": ("evaluations.jsonl", lambda r: r.pop("test_acc_std"),
                               ["evaluations.jsonl", "line 2 lacks test_acc_std"]),
    "evaluation of text accuracy": ("evaluations.jsonl", lambda r: r.update(test_acc_mean="0.8"),
                                    ["line 2: test_acc_mean is not a number"]),
}


@pytest.mark.parametrize("case", list(REPORT_CASES))
def test_a_damaged_record_is_named_by_report(run_dir, tmp_path, capsys, case) -> None:
    name, change, fragments = REPORT_CASES[case]
    run = copy_of(run_dir, tmp_path)
    if name == "evaluations.jsonl":
        record = {"step": 2, "encoder": "online", "splits": "public", "test_acc_mean": 0.8,
                  "test_acc_std": 0.0}
        lines = [dict(record), record]
    else:
        lines = [json.loads(line) for line in (run / name).read_text().splitlines()]
        assert len(lines) >= 2
    change(lines[1])
    (run / name).write_text("".join(json.dumps(line) + "\n" for line in lines))
    out = tmp_path / "report.png"
    assert_input_error(cli_result(capsys, "report", run, "--out", out), *fragments)
    assert not out.exists()


# ---- train --resume ------------------------------------------------------------------------
def resume(capsys, store: Path, run: Path) -> subprocess.CompletedProcess:
    """Continue ``run`` (2 steps) to step 3."""
    return cli_result(capsys, "train", "--data", store, "--out", run, "--resume",
                      "--max-steps", "3")


@pytest.mark.parametrize("change,fragments", [
    (lambda s: s.pop("optimizer"), ["cannot resume from this checkpoint: it lacks optimizer"]),
    (lambda s: [s.pop("scheduler"), s.pop("rng")], ["it lacks scheduler, rng"]),
    (lambda s: s.update(optimizer={}), ["its optimizer, scheduler, step or RNG state is unusable"]),
    (lambda s: s.update(world_size="two"), ["world_size is 'two'"]),
], ids=["no optimizer", "no scheduler nor rng", "empty optimizer", "text world size"])
def test_resuming_from_an_incomplete_checkpoint_is_refused(planted_store, run_dir, tmp_path,
                                                           capsys, change, fragments) -> None:
    run = copy_of(run_dir, tmp_path)
    path = latest_checkpoint(run)
    state = torch.load(path, weights_only=True)
    change(state)
    torch.save(state, path)
    before = snapshot(run)
    assert_input_error(resume(capsys, planted_store, run), str(path), *fragments)
    assert snapshot(run) == before


def logged_steps(run: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_resume_drops_a_metrics_line_cut_short_by_a_crash(planted_store, run_dir, tmp_path,
                                                          capsys) -> None:
    run = copy_of(run_dir, tmp_path)
    assert logged_steps(run) == [1, 2]
    with open(run / "metrics.jsonl", "a") as handle:
        handle.write('{"loss": 3.1, "st')
    result = resume(capsys, planted_store, run)
    assert result.returncode == 0, result.stderr
    assert logged_steps(run) == [1, 2, 3]
    assert list_checkpoints(run)[-1][0] == 3


def test_resume_refuses_a_damaged_metrics_line_before_the_last(planted_store, run_dir, tmp_path,
                                                               capsys) -> None:
    run = copy_of(run_dir, tmp_path)
    text = (run / "metrics.jsonl").read_text()
    (run / "metrics.jsonl").write_text("not json\n" + text)
    before = snapshot(run)
    assert_input_error(resume(capsys, planted_store, run), "metrics.jsonl",
                       "line 1 is not a metrics record with an integer step")
    assert snapshot(run) == before
