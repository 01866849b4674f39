"""Exact ``embed`` by several ranks: the layers before the last are shared (each rank
computes a share of every such layer into one scratch table per layer), under torchrun with
a gloo group and with hand-started processes and a file barrier; a killed rank makes the
other fail with one line, and a rerun finishes the export."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.dataset as ds
import pytest

from bgrl_dgl.cli import main
from bgrl_dgl.embeddings.ranks import RankSession
from bgrl_dgl.errors import RunError
from bgrl_dgl.training.checkpoint import latest_checkpoint
from bgrl_dgl.training.distributed import World

from helpers import PLANTED_NODES, REPO

HARNESS = REPO / "tests" / "distributed" / "embed_harness.py"
# Blocks of 40 rows: each layer before the last has 15 blocks to share.
EMBED = ["--device", "cpu", "--rows-per-part", "200", "--batch-size", "40", "--no-progress"]


@pytest.fixture(scope="module")
def sources(planted_store, tmp_path_factory) -> list[str]:
    """``--checkpoint C --data S`` of a two-step run with three layers (16 -> 32 -> 16 -> 8)."""
    run = tmp_path_factory.mktemp("embed_ranks") / "run"
    assert main(["train", "--data", str(planted_store), "--out", str(run), "--max-steps", "2",
                 "--hidden", "32,16,8", "--fanouts", "5,5,5", "--predictor-hidden", "16",
                 "--num-workers", "0", "--batch-size", "128", "--device", "cpu"]) == 0
    return ["--checkpoint", str(latest_checkpoint(run)), "--data", str(planted_store)]


@pytest.fixture(scope="module")
def reference(sources, tmp_path_factory) -> np.ndarray:
    """The export of one process."""
    out = tmp_path_factory.mktemp("one") / "emb"
    assert main(["embed", *sources, "--out", str(out), *EMBED]) == 0
    return embeddings(out)


def embeddings(out: Path) -> np.ndarray:
    table = ds.dataset(out, format="parquet").to_table().sort_by("node_id")
    assert table.column("node_id").to_pylist() == list(range(PLANTED_NODES))
    column = table.column("embedding").combine_chunks()
    return column.flatten().to_numpy().reshape(len(column), -1)


def start(command: list[str], records: Path, env: dict[str, str]) -> subprocess.Popen:
    records.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen([sys.executable, *command], cwd=REPO, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "BGRL_TEST_DIR": str(records), **env})


def by_hand(sources: list[str], out: Path, records: Path,
            env: dict[str, str] | None = None) -> list[subprocess.Popen]:
    """Two ranks started as plain processes (RANK/WORLD_SIZE, no process group)."""
    records.mkdir(parents=True, exist_ok=True)
    clean = {name: value for name, value in os.environ.items()
             if name not in ("MASTER_ADDR", "MASTER_PORT")}
    return [subprocess.Popen([sys.executable, str(HARNESS), "embed", *sources, "--out", str(out),
                              *EMBED], cwd=REPO, stdin=subprocess.DEVNULL,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env={**clean, "BGRL_TEST_DIR": str(records), "RANK": str(rank),
                                  "WORLD_SIZE": "2", "LOCAL_RANK": str(rank),
                                  "LOCAL_WORLD_SIZE": "2", **(env or {})})
            for rank in range(2)]


def finish(processes: list[subprocess.Popen], timeout: float = 120) -> list[tuple[int, str]]:
    results = []
    for process in processes:
        output, errors = process.communicate(timeout=timeout)
        results.append((process.returncode, output + errors))
    return results


def rank_records(records: Path) -> list[dict]:
    return [json.loads((records / f"embed-rank{r}.json").read_text()) for r in range(2)]


def leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir() if p.name.startswith(".tmp-"))


def assert_layers_shared(records: list[dict], num_layers: int = 3) -> None:
    """Each layer before the last: a share computed by each rank, every row once; the
    tables: one set of files, created by rank 0 and opened by rank 1."""
    for layer in range(num_layers - 1):
        counts = [record["rows"][str(layer)] for record in records]
        assert sum(counts) == PLANTED_NODES and min(counts) > 0, (layer, counts)
    last = [record["rows"].get(str(num_layers - 1), 0) for record in records]
    assert sum(last) == PLANTED_NODES, last
    created, opened = records[0]["created"], records[1]["opened"]
    assert records[1]["created"] == [] and records[0]["opened"] == []
    assert created == opened and len(created) == len(set(created))
    assert len({Path(path).parent for path in created}) == 1  # one directory, shared
    assert {Path(path).name.split("-")[1] for path in created} == {"0", "1", "2"}  # per layer


def test_two_ranks_under_torchrun_share_each_layer_and_match_one_process(
        sources, reference, tmp_path) -> None:
    out, records = tmp_path / "emb", tmp_path / "records"
    launch = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
              str(HARNESS), "embed", *sources, "--out", str(out), *EMBED]
    process = start(launch, records, {"BGRL_EMBED_BARRIER_TIMEOUT": "60"})
    [(code, output)] = finish([process])
    assert code == 0, output
    np.testing.assert_allclose(embeddings(out), reference, rtol=0, atol=1e-6)
    assert (out / "_SUCCESS").exists() and leftovers(out) == []
    assert_layers_shared(rank_records(records))


def test_hand_started_ranks_use_a_file_barrier_and_a_rerun_keeps_complete_parts(
        sources, reference, tmp_path) -> None:
    out, records = tmp_path / "emb", tmp_path / "records"
    results = finish(by_hand(sources, out, records, {"BGRL_EMBED_BARRIER_TIMEOUT": "60"}))
    assert all(code == 0 for code, _ in results), results
    np.testing.assert_allclose(embeddings(out), reference, rtol=0, atol=1e-6)
    assert_layers_shared(rank_records(records))
    assert leftovers(out) == []
    # A rerun computes the earlier layers again (shared) and writes only the missing part.
    kept = (out / "part-00000.parquet").stat().st_mtime_ns
    (out / "part-00002.parquet").unlink()
    (out / "_SUCCESS").unlink()
    results = finish(by_hand(sources, out, records, {"BGRL_EMBED_BARRIER_TIMEOUT": "60"}))
    assert [code for code, _ in results] == [0, 0], results
    assert "1 parts written, 0 already complete" in results[1][1], results[1][1]
    assert "0 parts written, 2 already complete" in results[0][1], results[0][1]
    first, second = rank_records(records)
    assert first["rows"].get("2", 0) == 0 and second["rows"]["2"] == 200
    assert (out / "part-00000.parquet").stat().st_mtime_ns == kept
    np.testing.assert_allclose(embeddings(out), reference, rtol=0, atol=1e-6)
    assert (out / "_SUCCESS").exists() and leftovers(out) == []
    # Rank 0's refusal of a complete export is every rank's, in one line.
    for code, output in finish(by_hand(sources, out, records)):
        assert code == 2 and output.count("\n") == 1, output
        assert output.startswith("error: ") and "already holds a complete" in output, output


@pytest.mark.parametrize("killed", [0, 1])
def test_a_killed_rank_makes_the_other_fail_with_one_line(
        sources, reference, tmp_path, killed) -> None:
    out, records = tmp_path / "emb", tmp_path / "records"
    began = time.monotonic()
    results = finish(by_hand(sources, out, records, {"BGRL_EMBED_BARRIER_TIMEOUT": "20",
                                                     "BGRL_TEST_KILL": f"{killed}:1"}))
    assert results[killed][0] == -9
    code, output = results[1 - killed]
    lines = output.strip().splitlines()
    assert code == 1 and len(lines) == 1, output
    assert lines[0].startswith(f"error: rank {1 - killed} of 2: gave up waiting for "), output
    assert time.monotonic() - began < 60
    assert not (out / "_SUCCESS").exists()
    if killed == 1:  # rank 0 removed its scratch directory
        assert leftovers(out) == []
        return
    # A dead rank 0 left its scratch directory: the rerun removes it and finishes the export.
    assert len(leftovers(out)) == 1
    results = finish(by_hand(sources, out, records, {"BGRL_EMBED_BARRIER_TIMEOUT": "60"}))
    assert [code for code, _ in results] == [0, 0], results
    np.testing.assert_allclose(embeddings(out), reference, rtol=0, atol=1e-6)
    assert leftovers(out) == []


def test_a_rank_that_never_arrives_is_a_timeout_error(tmp_path) -> None:
    session = RankSession(World(rank=0, world_size=2), tmp_path, "key", timeout=0.5)
    began = time.monotonic()
    with pytest.raises(RunError, match=r"rank 0 of 2: gave up waiting for the start .*0\.5 s"):
        with session:
            session.barrier("the start")
    assert time.monotonic() - began < 5
    assert list(tmp_path.iterdir()) == []  # rank 0's scratch directory is removed
