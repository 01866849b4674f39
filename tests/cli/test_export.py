"""``bgrl-dgl embed``: Parquet parts that hold every node once with the exact layer-wise
embeddings, resumable part by part, refusing bad input up front (several ranks:
tests/distributed/test_embed_ranks.py)."""
from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path
from shutil import _ntuple_diskusage as DiskUsage

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
import torch

from bgrl_dgl.cli import main
from bgrl_dgl.embeddings import layerwise, scratch
from bgrl_dgl.embeddings.layerwise import embed_store
from bgrl_dgl.model.encoder import Encoder, ModelConfig
from bgrl_dgl.runs import load_encoder
from bgrl_dgl.store.reader import GraphStore
from bgrl_dgl.store.writer import StoreWriter
from bgrl_dgl.training.checkpoint import latest_checkpoint

from helpers import FLOAT16_SCRATCH_ATOL, assert_input_error

NUM_NODES = 600
FEAT_DIM = 16
DIM = 8
PART_ROWS = ["--rows-per-part", "250"]  # three parts: 250, 250, 100 rows


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory) -> Path:
    """A synthetic graph with 4 planted classes (labels and train/valid/test splits)."""
    out = tmp_path_factory.mktemp("store") / "synthetic"
    assert main(["prepare", "synthetic", "--out", str(out), "--num-nodes", str(NUM_NODES),
                 "--avg-degree", "5", "--feat-dim", str(FEAT_DIM), "--num-classes", "4"]) == 0
    return out


@pytest.fixture(scope="module")
def run_dir(store_dir, tmp_path_factory) -> Path:
    """A two-step BGRL run on ``store_dir`` with 8-d embeddings."""
    out = tmp_path_factory.mktemp("run") / "run"
    assert main(["train", "--data", str(store_dir), "--out", str(out), "--max-steps", "2",
                 "--hidden", f"16,{DIM}", "--predictor-hidden", "16", "--num-workers", "0",
                 "--batch-size", "128", "--device", "cpu"]) == 0
    return out


@pytest.fixture(scope="module")
def reference(run_dir, store_dir) -> np.ndarray:
    """The online encoder's exact embeddings of every node: [N, DIM] float32."""
    return embed_store(load_encoder(run_dir, which="online").encoder, GraphStore.open(store_dir))


@pytest.fixture
def cli(capsys):
    """``bgrl-dgl ARGS`` in this process, as a CompletedProcess (``embed`` on the CPU)."""
    def run(*args) -> subprocess.CompletedProcess:
        argv = [str(a) for a in args]
        code = main(argv + ["--device", "cpu"] if argv[0] == "embed" else argv)
        captured = capsys.readouterr()
        return subprocess.CompletedProcess(args, code, captured.out, captured.err)
    return run


def read_export(out: Path) -> tuple[np.ndarray, np.ndarray]:
    """(node_id [n] int64, embedding [n, D]) of an export, ordered by node id."""
    table = ds.dataset(out, format="parquet").to_table().sort_by("node_id")
    embedding = table.column("embedding").combine_chunks()
    values = embedding.flatten().to_numpy().reshape(len(embedding), -1)
    return table.column("node_id").to_numpy(), values


def part_files(out: Path) -> list[str]:
    return sorted(p.name for p in out.glob("part-*.parquet"))


def test_node_subset_inference_equals_the_rows_of_the_full_graph(store_dir):
    store = GraphStore.open(store_dir)
    torch.manual_seed(0)
    encoder = Encoder(FEAT_DIM, ModelConfig(hidden=[12, 10, 6], conv="sage"))
    full = embed_store(encoder, store, batch_size=64)
    nodes = np.array([0, 1, 2, 3, 40, 41, 299, 597, 599])  # consecutive runs and gaps
    subset = embed_store(encoder, store, batch_size=4, nodes=nodes)
    assert subset.shape == (nodes.size, 6)
    np.testing.assert_allclose(subset, full[nodes], rtol=0, atol=1e-5)


def test_export_holds_every_node_once_with_the_exact_embeddings(cli, run_dir, reference, tmp_path):
    out = tmp_path / "emb"
    result = cli("embed", "--run", run_dir, "--out", out, *PART_ROWS)
    assert result.returncode == 0, result.stderr
    assert "complete" in result.stdout
    assert sorted(p.name for p in out.iterdir()) == [
        "_SUCCESS", "_inputs.json", "_manifest.json",
        "part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]

    schema = ds.dataset(out, format="parquet").schema
    assert schema.names == ["node_id", "embedding"]
    assert schema.field("node_id").type == pa.int64()
    assert schema.field("embedding").type == pa.list_(pa.float32(), DIM)
    metadata = pq.read_metadata(out / "part-00000.parquet")
    assert metadata.num_rows == 250
    assert metadata.row_group(0).column(1).compression == "ZSTD"

    node_id, values = read_export(out)
    np.testing.assert_array_equal(node_id, np.arange(NUM_NODES))
    np.testing.assert_allclose(values, reference, rtol=0, atol=1e-6)
    frame = pd.read_parquet(out)
    assert len(frame) == NUM_NODES and frame["node_id"].is_unique

    manifest = json.loads((out / "_manifest.json").read_text())
    checkpoint = latest_checkpoint(run_dir)
    assert manifest["checkpoint"]["sha256"] == hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    assert (manifest["num_nodes"], manifest["dim"], manifest["dtype"], manifest["encoder"]) == (
        NUM_NODES, DIM, "float32", "online")
    assert manifest["config"]["model"]["hidden"] == [16, DIM]
    assert [part["rows"] for part in manifest["parts"]] == [[0, 250], [250, 500], [500, 600]]
    for part in manifest["parts"]:
        data = (out / part["file"]).read_bytes()
        assert part["bytes"] == len(data) and part["sha256"] == hashlib.sha256(data).hexdigest()


def test_float16_export(cli, run_dir, reference, tmp_path):
    out = tmp_path / "emb16"
    assert cli("embed", "--run", run_dir, "--out", out, "--dtype", "float16").returncode == 0
    schema = ds.dataset(out, format="parquet").schema
    assert schema.field("embedding").type == pa.list_(pa.float16(), DIM)
    node_id, values = read_export(out)
    assert values.dtype == np.float16
    np.testing.assert_array_equal(node_id, np.arange(NUM_NODES))
    np.testing.assert_allclose(values.astype(np.float32), reference, rtol=1e-3, atol=1e-3)


def test_random_encoder_is_the_initial_weights(cli, run_dir, store_dir, tmp_path):
    out = tmp_path / "random"
    assert cli("embed", "--run", run_dir, "--out", out, "--encoder", "random").returncode == 0
    expected = embed_store(load_encoder(run_dir, which="random").encoder,
                           GraphStore.open(store_dir))
    np.testing.assert_allclose(read_export(out)[1], expected, rtol=0, atol=1e-6)
    assert json.loads((out / "_manifest.json").read_text())["checkpoint"] is None


def test_original_ids_of_a_parquet_store_are_carried(cli, run_dir, tmp_path):
    rng = np.random.default_rng(0)
    orig = rng.choice(10**12, size=80, replace=False) - 5 * 10**11
    edges = rng.choice(orig, size=(300, 2))
    pq.write_table(pa.table({"src": edges[:, 0], "dst": edges[:, 1]}), tmp_path / "edges.parquet")
    np.save(tmp_path / "ids.npy", orig)
    np.save(tmp_path / "features.npy", rng.normal(size=(orig.size, FEAT_DIM)).astype(np.float32))
    assert cli("prepare", "parquet", "--out", tmp_path / "store",
               "--edges", tmp_path / "edges.parquet", "--features", tmp_path / "features.npy",
               "--node-ids", tmp_path / "ids.npy").returncode == 0
    store = GraphStore.open(tmp_path / "store")

    out = tmp_path / "emb"
    result = cli("embed", "--checkpoint", latest_checkpoint(run_dir), "--data", tmp_path / "store",
                 "--out", out)
    assert result.returncode == 0, result.stderr
    node_id, values = read_export(out)
    np.testing.assert_array_equal(node_id, np.sort(orig))
    expected = embed_store(load_encoder(run_dir, which="online").encoder, store)
    index = np.argsort(np.asarray(store.orig_ids))  # store index of each id in sorted order
    np.testing.assert_allclose(values, expected[index], rtol=0, atol=1e-6)


def test_node_types_become_a_dictionary_column(cli, run_dir, tmp_path):
    rng = np.random.default_rng(1)
    src, dst = rng.integers(0, 50, size=(2, 200))
    with StoreWriter(tmp_path / "typed") as writer:
        writer.write_topology(50, lambda: [(src, dst)], source_path="edges", symmetrize=True,
                              self_loops="remove", dedup=True)
        writer.write_feature_array(rng.normal(size=(50, FEAT_DIM)), source_path="features")
        writer.set_node_types({"paper": (0, 30), "author": (30, 50)})
        writer.commit()
    out = tmp_path / "emb"
    assert cli("embed", "--checkpoint", latest_checkpoint(run_dir), "--data", tmp_path / "typed",
               "--out", out, "--rows-per-part", "20").returncode == 0
    table = ds.dataset(out, format="parquet").to_table().sort_by("node_id")
    assert pa.types.is_dictionary(table.schema.field("node_type").type)
    assert table.column("node_type").to_pylist() == ["paper"] * 30 + ["author"] * 20


def test_nodes_option_exports_exactly_those_nodes(cli, run_dir, reference, tmp_path):
    np.save(tmp_path / "ids.npy", np.array([400, 5, 3, 3, 7, 599]))
    out = tmp_path / "emb"
    assert cli("embed", "--run", run_dir, "--out", out, "--nodes", tmp_path / "ids.npy",
               "--rows-per-part", "2").returncode == 0
    node_id, values = read_export(out)
    np.testing.assert_array_equal(node_id, [3, 5, 7, 400, 599])
    np.testing.assert_allclose(values, reference[node_id], rtol=0, atol=1e-5)
    assert part_files(out) == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]


def test_sampled_inference(cli, run_dir, reference, tmp_path):
    full = tmp_path / "all-neighbours"
    assert cli("embed", "--run", run_dir, "--out", full, "--fanouts=-1,-1",
               "--batch-size", "100").returncode == 0
    np.testing.assert_allclose(read_export(full)[1], reference, rtol=0, atol=1e-5)
    first, second = tmp_path / "sampled-1", tmp_path / "sampled-2"
    for out in (first, second):
        assert cli("embed", "--run", run_dir, "--out", out, "--fanouts", "2,2", *PART_ROWS,
                   "--batch-size", "100").returncode == 0
    np.testing.assert_array_equal(read_export(first)[1], read_export(second)[1])
    assert not np.allclose(read_export(first)[1], reference, atol=1e-3)


def test_rerun_after_a_crash_writes_only_the_missing_part(cli, run_dir, tmp_path):
    out = tmp_path / "emb"
    assert cli("embed", "--run", run_dir, "--out", out, *PART_ROWS).returncode == 0
    before = read_export(out)
    # A crash after parts 0 and 2 were written: part 1 missing, no manifest, not complete.
    for name in ("_SUCCESS", "_manifest.json", "part-00001.parquet"):
        (out / name).unlink()
    kept = {name: (out / name).stat().st_mtime_ns
            for name in ("part-00000.parquet", "part-00002.parquet")}
    result = cli("embed", "--run", run_dir, "--out", out, *PART_ROWS)
    assert result.returncode == 0, result.stderr
    assert "1 parts written, 2 already complete" in result.stdout
    assert {name: (out / name).stat().st_mtime_ns for name in kept} == kept
    assert (out / "_SUCCESS").exists()
    after = read_export(out)
    np.testing.assert_array_equal(after[0], before[0])
    # The rerun batches other nodes together, and GCN layers order their products by the
    # batch's shape: equal up to float32 rounding.
    np.testing.assert_allclose(after[1], before[1], rtol=1e-5, atol=1e-6)


def test_complete_or_foreign_output_is_refused_without_overwrite(cli, run_dir, tmp_path):
    out = tmp_path / "emb"
    assert cli("embed", "--run", run_dir, "--out", out).returncode == 0
    assert_input_error(cli("embed", "--run", run_dir, "--out", out), str(out), "--overwrite")
    assert cli("embed", "--run", run_dir, "--out", out, "--overwrite", "--dtype", "float16",
               *PART_ROWS).returncode == 0
    assert part_files(out) == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    assert json.loads((out / "_manifest.json").read_text())["dtype"] == "float16"
    # An unfinished export is resumed only with the same inputs.
    (out / "_SUCCESS").unlink()
    assert_input_error(cli("embed", "--run", run_dir, "--out", out), "other inputs")


BAD_INPUT = {  # case -> (arguments besides --out, fragment of the error line)
    "missing run": (lambda run, tmp: ["--run", tmp / "nowhere"], "nowhere"),
    "checkpoint without data": (lambda run, tmp: ["--checkpoint", latest_checkpoint(run)],
                                "--data"),
    "nodes out of range": (lambda run, tmp: ["--run", run, "--nodes", tmp / "ids.npy"], "ids.npy"),
    "fanouts per layer": (lambda run, tmp: ["--run", run, "--fanouts", "5"], "--fanouts"),
    "missing scratch dir": (lambda run, tmp: ["--run", run, "--scratch-dir", tmp / "none"],
                            "no such scratch directory"),
    "foreign directory": (lambda run, tmp: ["--run", run], "not an embedding export"),
}


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input_is_one_line_and_leaves_nothing(cli, run_dir, tmp_path, case):
    arguments, fragment = BAD_INPUT[case]
    np.save(tmp_path / "ids.npy", np.array([0, NUM_NODES]))
    out = tmp_path / "emb"
    if case == "foreign directory":
        out.mkdir()
        (out / "notes.txt").write_text("mine")
    assert_input_error(cli("embed", *arguments(run_dir, tmp_path), "--out", out), fragment)
    expected = ["notes.txt"] if case == "foreign directory" else None
    assert (sorted(p.name for p in out.iterdir()) if out.exists() else None) == expected


def test_a_crash_in_the_last_layer_keeps_the_parts_written_before(cli, run_dir, reference,
                                                                  tmp_path, monkeypatch):
    out = tmp_path / "emb"
    calls = {"last layer blocks": 0}
    real = layerwise.finish_layer

    def failing(encoder, layer, h):
        if layer == encoder.num_layers - 1:
            calls["last layer blocks"] += 1
            if calls["last layer blocks"] == 4:  # rows 300-399: part 1 is being written
                raise RuntimeError("killed")
        return real(encoder, layer, h)

    monkeypatch.setattr(layerwise, "finish_layer", failing)
    with pytest.raises(RuntimeError, match="killed"):
        cli("embed", "--run", run_dir, "--out", out, *PART_ROWS, "--batch-size", "100")
    # Part 0 was complete and stays; part 1's temporary file and the scratch are gone.
    assert sorted(p.name for p in out.iterdir()) == ["_inputs.json", "part-00000.parquet"]
    monkeypatch.setattr(layerwise, "finish_layer", real)
    result = cli("embed", "--run", run_dir, "--out", out, *PART_ROWS)
    assert result.returncode == 0, result.stderr
    assert "2 parts written, 1 already complete" in result.stdout
    node_id, values = read_export(out)
    np.testing.assert_array_equal(node_id, np.arange(NUM_NODES))
    np.testing.assert_allclose(values, reference, rtol=0, atol=1e-5)


def test_too_little_scratch_space_is_refused_before_starting(cli, run_dir, tmp_path,
                                                             monkeypatch):
    out = tmp_path / "emb"
    free = {"bytes": 1000}
    monkeypatch.setattr(scratch.shutil, "disk_usage",
                        lambda path: DiskUsage(10**12, 10**12 - free["bytes"], free["bytes"]))
    assert_input_error(cli("embed", "--run", run_dir, "--out", out, "--scratch-dir", tmp_path),
                       str(tmp_path), "scratch space")
    assert not out.exists()
    # Enough for float16 tables (16 + 8 wide, 2 bytes each) but not for float32 ones.
    free["bytes"] = (FEAT_DIM + DIM) * NUM_NODES * 3
    assert_input_error(cli("embed", "--run", run_dir, "--out", out), str(tmp_path), "float16")
    assert not out.exists()
    result = cli("embed", "--run", run_dir, "--out", out, "--scratch-dtype", "float16")
    assert result.returncode == 0, result.stderr


def test_float16_scratch_is_recorded_and_within_tolerance(cli, run_dir, reference, tmp_path):
    out = tmp_path / "emb"
    result = cli("embed", "--run", run_dir, "--out", out, "--scratch-dtype", "float16")
    assert result.returncode == 0, result.stderr
    manifest = json.loads((out / "_manifest.json").read_text())
    assert manifest["inference"] == {"mode": "exact", "scratch_dtype": "float16"}
    values = read_export(out)[1]
    np.testing.assert_allclose(values, reference, rtol=0, atol=FLOAT16_SCRATCH_ATOL)
    assert not np.array_equal(values, reference)
