"""What building a store will take, checked against the machine before anything is written.

A source describes the graph it is about to write (:class:`StorePlan`); :func:`check_capacity`
estimates the peak disk use of the writer (temp edge runs, the CSC files, the node arrays)
and its peak memory (the source's own node-sized arrays plus the budget-bounded working
set), and refuses, naming the option or file to change, when the output's file system or
the available memory cannot hold it.
"""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from bgrl_dgl.errors import InputError
from bgrl_dgl.store.format import INT32_LIMIT

# Working bytes per edge and per node while building the topology (the partition batches,
# the sorted pieces and their offsets); bounded above by the memory budget.
WORK_BYTES_PER_EDGE = 64
WORK_BYTES_PER_NODE = 64
# One chunk of feature rows may take this share of the memory budget (see StoreWriter).
ROW_CHUNK_SHARE = 16
# Node arrays besides the features: labels, split ids and original ids, int64 each.
NODE_ARRAY_BYTES = 3 * 8


@dataclass(frozen=True)
class StorePlan:
    """The size of the store a source is about to write.

    ``num_edges``: input edges (an upper bound: symmetrising doubles them, dedup may drop
    some). ``resident_bytes``: memory the source itself holds while the store is built
    (its node-sized arrays). ``what``: the option or file the sizes come from, named in a
    refusal.
    """

    num_nodes: int
    num_edges: int
    feat_dim: int
    feat_itemsize: int
    symmetrize: bool = False
    add_self_loops: bool = False
    resident_bytes: int = 0
    what: str | None = None

    @property
    def stored_edges(self) -> int:
        """Most edges the store can hold."""
        return (self.num_edges * (2 if self.symmetrize else 1)
                + (self.num_nodes if self.add_self_loops else 0))

    def disk_bytes(self) -> int:
        """Peak bytes on disk: the topology files, plus the larger of the temp edge runs
        (deleted once sorted) and the node arrays written after them."""
        edges, nodes = self.stored_edges, self.num_nodes
        id_bytes = 4 if nodes <= INT32_LIMIT else 8
        index_bytes = 4 if max(nodes, edges) < INT32_LIMIT else 8
        topology = (edges + nodes + 1) * index_bytes
        runs = 2 * edges * id_bytes
        node_arrays = nodes * (self.feat_dim * self.feat_itemsize + NODE_ARRAY_BYTES)
        return topology + max(runs, node_arrays)

    def row_bytes(self) -> int:
        """Bytes of one feature row while it is converted (float32 and the stored copy)."""
        return self.feat_dim * (4 + self.feat_itemsize)

    def memory_bytes(self, memory_budget: int) -> int:
        """Peak memory: the source's arrays plus the writer's working set, which the budget
        bounds."""
        work = (WORK_BYTES_PER_EDGE * self.stored_edges + WORK_BYTES_PER_NODE * self.num_nodes
                + ROW_CHUNK_SHARE * self.row_bytes())
        return self.resident_bytes + min(memory_budget, work)


def format_bytes(count: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB", "PB"):
        if abs(count) < 1024 or unit == "PB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    raise AssertionError("unreachable")


def read_meminfo() -> dict[str, int]:
    """The byte counts of /proc/meminfo by name (MemTotal, MemAvailable, ...); empty where it
    cannot be read."""
    info: dict[str, int] = {}
    try:
        with open("/proc/meminfo", encoding="ascii") as file:
            for line in file:
                name, _, value = line.partition(":")
                if value.strip():
                    info[name] = int(value.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        return {}
    return info


def available_memory() -> int | None:
    """Bytes this process can still allocate: MemAvailable, lowered by a cgroup limit."""
    amounts = []
    meminfo = read_meminfo()
    if "MemAvailable" in meminfo:
        amounts.append(meminfo["MemAvailable"])
    limit = _cgroup_room()
    if limit is not None:
        amounts.append(limit)
    return min(amounts) if amounts else None


def _cgroup_room() -> int | None:
    """memory.max - memory.current of this process's cgroup (v2), when it has a limit."""
    try:
        with open("/proc/self/cgroup", encoding="ascii") as file:
            relative = next((line.strip().split(":", 2)[2] for line in file
                             if line.startswith("0::")), None)
        if relative is None:
            return None
        base = Path("/sys/fs/cgroup") / relative.lstrip("/")
        limit = (base / "memory.max").read_text().strip()
        if limit == "max":
            return None
        return max(0, int(limit) - int((base / "memory.current").read_text()))
    except (OSError, ValueError, IndexError):
        return None


def free_disk(directory: Path) -> int:
    """Bytes an unprivileged user may still write on ``directory``'s file system."""
    return shutil.disk_usage(directory).free


def check_capacity(plan: StorePlan, directory: Path, memory_budget: int) -> None:
    """InputError unless ``plan`` fits the disk under ``directory`` and the free memory."""
    what = plan.what
    if plan.row_bytes() > memory_budget // ROW_CHUNK_SHARE:
        raise InputError(what, f"one feature row of {plan.feat_dim:,} values takes "
                         f"{format_bytes(plan.row_bytes())} to convert, more than "
                         f"1/{ROW_CHUNK_SHARE} of --memory-budget "
                         f"({format_bytes(memory_budget)})")
    disk, free = plan.disk_bytes(), free_disk(directory)
    if disk > free:
        raise InputError(what, f"a store of {plan.num_nodes:,} nodes, up to "
                         f"{plan.stored_edges:,} edges and {plan.feat_dim:,}-d features needs "
                         f"about {format_bytes(disk)} of disk, but {os.fspath(directory)} has "
                         f"{format_bytes(free)} free")
    memory, available = plan.memory_bytes(memory_budget), available_memory()
    if available is not None and memory > available:
        hint = ("" if plan.resident_bytes > available else
                "; a smaller --memory-budget lowers the builder's share")
        raise InputError(what, f"building a store of {plan.num_nodes:,} nodes and up to "
                         f"{plan.stored_edges:,} edges needs about {format_bytes(memory)} of "
                         f"memory, but {format_bytes(available)} is available{hint}")


def check_memory(needed: int, what: str | os.PathLike, doing: str) -> None:
    """InputError if ``needed`` bytes exceed the memory available now."""
    available = available_memory()
    if available is not None and needed > available:
        raise InputError(what, f"{doing} needs about {format_bytes(needed)} of memory, but "
                         f"{format_bytes(available)} is available")
