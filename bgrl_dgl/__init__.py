"""bgrl_dgl: scalable mini-batch BGRL on DGL-sampled blocks over a memory-mapped graph store."""
import os
import sys

os.environ.setdefault("DGLBACKEND", "pytorch")
# ogb imports `outdated`, whose import starts a thread that asks PyPI for a newer version.
sys.modules.setdefault("outdated", None)

__version__ = "0.1.0"
