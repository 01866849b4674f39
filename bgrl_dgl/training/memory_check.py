"""The memory plan against a real machine: measured RAM and /dev/shm, the check ``train`` runs
before it writes anything, and the ``plan`` command's report (see
:mod:`~bgrl_dgl.training.memory_plan` for what the plan counts)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

from bgrl_dgl.errors import InputError
from bgrl_dgl.loading.feature_cache import default_cache_root
from bgrl_dgl.store.capacity import available_memory, read_meminfo
from bgrl_dgl.store.reader import GraphStore
from bgrl_dgl.training.config import TrainConfig
from bgrl_dgl.training.distributed import World, auto_device, gather_objects
from bgrl_dgl.training.memory_plan import GraphSizes, MachineMemory, MemoryPlan, plan_memory

# Replace the measured available RAM and free /dev/shm (bytes): for tests, and to see what
# ``train`` would say on a smaller machine.
RAM_ENV = "BGRL_DGL_RAM_BYTES"
SHM_ENV = "BGRL_DGL_SHM_BYTES"


def _override(environ: Mapping[str, str], name: str, measured: int) -> int:
    if name not in environ:
        return measured
    try:
        value = int(environ[name])
    except ValueError:
        raise InputError(None, f"{name}={environ[name]!r} is not a byte count") from None
    if value < 0:
        raise InputError(None, f"{name}={value} is negative")
    return value


def measure_machine(shm_path: Path | None = None,
                    environ: Mapping[str, str] | None = None) -> MachineMemory:
    """This machine's memory: MemTotal of /proc/meminfo, the RAM available as ``prepare``
    sees it (MemAvailable, lowered by the cgroup's limit when it has one), the size and free
    bytes of ``shm_path`` (default: where the feature cache goes, /dev/shm); ``RAM_ENV`` and
    ``SHM_ENV`` in ``environ`` replace the available RAM and the free shared memory."""
    environ = os.environ if environ is None else environ
    shm_path = default_cache_root() if shm_path is None else Path(shm_path)
    info = read_meminfo()
    stat = os.statvfs(shm_path)
    available = available_memory()
    if available is None:
        available = info.get("MemFree", 0)
    return MachineMemory(
        ram_total=info.get("MemTotal", 0),
        ram_available=_override(environ, RAM_ENV, available),
        shm_total=stat.f_blocks * stat.f_frsize,
        shm_free=_override(environ, SHM_ENV, stat.f_bavail * stat.f_frsize),
        shm_path=shm_path)


def existing_cache_bytes(directory: Path | None) -> int:
    """Bytes that the files of an existing feature cache directory occupy (0 if none): a
    cache that is already there is used, not written again."""
    if directory is None or directory.is_symlink() or not directory.is_dir():
        return 0
    return sum(entry.stat().st_blocks * 512 for entry in directory.iterdir()
               if entry.is_file() and not entry.is_symlink())


def check_machine_memory(store: GraphStore, config: TrainConfig, world: World, cuda: bool,
                         num_seeds: int, cache_dir: Path | None
                         ) -> tuple[MemoryPlan, list[str], str | None]:
    """The plan of this machine's processes; InputError on every rank when the machine of any
    rank cannot hold it (so that all ranks stop together). Writes nothing.

    Args:
        store: the run's store.
        config: the run's settings.
        world: this process's place; its ``local_world_size`` processes share the machine.
        cuda: whether the model runs on a GPU (pinned batches, store-dtype features).
        num_seeds: the seed nodes of an epoch.
        cache_dir: where the run's feature cache lives (None without one).

    Returns:
        The plan (the feature cache must leave its shared arrays and batches in flight
        room in /dev/shm), the lines that announce it and, when the topology does not fit
        in the page cache left, a warning; the lines and the warning on rank 0 only (none
        and None on the other ranks).
    """
    plan = plan_memory(GraphSizes.of_store(store, num_seeds), config, world.local_world_size,
                       cuda)
    machine = measure_machine()
    existing = existing_cache_bytes(cache_dir)
    problem = plan.problem(machine, existing)
    found = gather_objects(None if problem is None else (problem.path, problem.problem))
    refusal = next((item for item in found if item is not None), None)
    if refusal is not None:
        raise InputError(*refusal)
    if not world.is_main:
        return plan, [], None
    return plan, plan.lines(machine), plan.page_cache_warning(machine, existing)


def plan_report(config: TrainConfig, *, data: str | None, nodes: int | None,
                edges: int | None, feat_dim: int | None, feature_dtype: str, directed: bool,
                processes: int, ram: int | None, shm: int | None
                ) -> tuple[list[str], str | None, InputError | None]:
    """The ``plan`` command: the plan's lines for a store (``data``) or for a graph described
    by its counts, and the InputError ``train`` would raise on this machine (or one of
    ``ram`` available bytes and ``shm`` free bytes of shared memory), None if it fits.

    Args:
        config: the run's settings (``run.device`` auto: cuda when this machine has a GPU
            for each of the ``processes``).
        data: a store directory, whose sizes and seeds (``sampling.seeds``) are used.
        nodes, edges, feat_dim, feature_dtype: the graph's sizes without a store.
        directed: the store described by the sizes is not symmetrised.
        processes: training processes per machine.
        ram, shm: the machine's RAM and free /dev/shm (default: this machine's).

    Returns:
        (the plan's lines, a warning when the topology does not fit in the page cache left
        or None, the refusal or None).
    """
    if processes < 1:
        raise InputError(None, f"--nproc-per-node must be positive, got {processes}")
    if data is not None:
        from bgrl_dgl.loading.loader import resolve_seed_nodes

        store = GraphStore.open(data)
        seeds = config.sampling.seeds
        sizes = GraphSizes.of_store(store, store.num_nodes if seeds == "all"
                                    else len(resolve_seed_nodes(store, seeds)))
    elif nodes is None or edges is None or feat_dim is None:
        raise InputError(None, "give --data STORE, or --nodes, --edges and --feat-dim")
    elif min(nodes, feat_dim) < 1 or edges < 0:
        raise InputError(None, "--nodes and --feat-dim must be positive, --edges not negative")
    else:
        sizes = GraphSizes.of(nodes, edges, feat_dim, feature_dtype, symmetrized=not directed)
    device = config.run.device
    if device == "auto":
        device = auto_device(World(local_world_size=processes))
    plan = plan_memory(sizes, config, processes, device == "cuda")
    machine = measure_machine()
    if ram is not None:
        machine = MachineMemory(ram, ram, machine.shm_total, machine.shm_free, machine.shm_path)
    if shm is not None:
        machine = MachineMemory(machine.ram_total, machine.ram_available, shm, shm,
                                machine.shm_path)
    return plan.lines(machine), plan.page_cache_warning(machine), plan.problem(machine)
