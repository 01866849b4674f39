"""``bgrl-dgl embed`` instrumented for tests/distributed/test_embed_ranks.py.

Runs the command line unchanged and records, in ``BGRL_TEST_DIR/embed-rank<R>.json``: the
rows the rank computed of each layer (``rows``: layer -> count) and the table files it
created or opened (``created``/``opened``). ``BGRL_TEST_KILL=RANK:LAYER`` SIGKILLs that rank
when it computes its first block of that layer (0-based).
"""
from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

from bgrl_dgl.cli import main
from bgrl_dgl.embeddings import blockio, layer_progress

RANK = int(os.environ.get("RANK", "0"))
RECORDS = Path(os.environ["BGRL_TEST_DIR"])


def instrument() -> dict:
    record: dict = {"rows": {}, "created": [], "opened": []}
    kill_rank, _, kill_layer = os.environ.get("BGRL_TEST_KILL", "-1:-1").partition(":")
    original_call = layer_progress.LayerProgress.__call__
    original_tables = blockio.NodeTables.__init__

    def call(self, layer: int, count: int) -> None:
        if int(kill_rank) == RANK and layer == int(kill_layer):
            os.kill(os.getpid(), signal.SIGKILL)
        record["rows"][str(layer)] = record["rows"].get(str(layer), 0) + count
        original_call(self, layer, count)

    def tables(self, directory, stem, num_nodes, widths, dtype, device, resident, create=True):
        original_tables(self, directory, stem, num_nodes, widths, dtype, device, resident,
                        create)
        record["created" if create else "opened"].extend(str(path) for path in self.files)

    layer_progress.LayerProgress.__call__ = call
    blockio.NodeTables.__init__ = tables
    return record


if __name__ == "__main__":
    records = instrument()
    code = main()
    (RECORDS / f"embed-rank{RANK}.json").write_text(json.dumps(records))
    sys.exit(code)
