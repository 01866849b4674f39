"""`make demo`'s script end to end on the shipped Cora, with a short training run."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from helpers import REPO


def test_the_demo_prints_three_accuracies_and_writes_the_picture(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHON": sys.executable, "DEMO_DATA": str(tmp_path / "cora"),
           "DEMO_RUNS": str(tmp_path / "runs"), "DEMO_TRAIN_FLAGS": "--steps 12 --log-every 4"}
    result = subprocess.run(["bash", str(REPO / "scripts" / "demo.sh")], env=env,
                            stdin=subprocess.DEVNULL, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    accuracies = {name: float(value) for name, value in
                  re.findall(r"^  (raw features|untrained encoder|trained encoder) +(\d+\.\d\d)",
                             out, re.M)}
    assert sorted(accuracies) == ["raw features", "trained encoder", "untrained encoder"], out
    assert all(20.0 < value <= 100.0 for value in accuracies.values()), out
    picture = Path(re.search(r"^picture: (\S+)$", out, re.M).group(1))
    assert (REPO / picture).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    run = picture.parent
    embeddings = re.search(r"^embeddings \(Parquet\): (\S+)$", out, re.M).group(1)
    assert list((REPO / embeddings).glob("*.parquet")), out
    # The log is beside the run, which holds only what the commands wrote.
    assert (REPO / f"{run}.log").read_text().count("$ bgrl-dgl ") == 7
    assert not (REPO / run / "demo.log").exists()
