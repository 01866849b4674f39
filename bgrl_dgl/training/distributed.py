"""Training on several processes and machines under ``torchrun``.

``torchrun`` starts one process per GPU (or per CPU worker slot) on every machine and tells each
who it is through environment variables; :func:`world_from_env` reads them and
:func:`process_group` joins the group (NCCL when the model runs on CUDA, gloo on the CPU).

BGRL's target encoder is not trained by gradients, so DDP does not keep it in step; the ranks
keep it identical themselves. DDP makes the online weights equal on every rank (rank 0's
weights are broadcast when it wraps the model, then every rank applies the same averaged
gradients), :func:`average_buffers` makes the batch-norm statistics equal, and every rank
then applies the same EMA update. :func:`target_divergence` measures the largest difference
between the ranks' targets, which must stay exactly 0.

The tensors this module hands to its latest collectives stay referenced until the group is
destroyed (:func:`keep_until_destroyed`). A gloo worker thread that dropped the last reference to a
tensor made in Python would need the interpreter lock to free it, and the thread destroying
the group holds that lock while it waits for the worker threads: the process would hang at
exit (or, with the group left to interpreter shutdown, abort). For the same reason objects
travel as tensors of this module's own (:func:`gather_objects`, :func:`broadcast_object`),
not through torch's object collectives, whose tensors the caller cannot keep.
"""
from __future__ import annotations

import collections
import contextlib
import gc
import io
import os
import sys
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Iterator, Mapping, Sequence

import torch
import torch.distributed as dist
from torch import nn

from bgrl_dgl.errors import InputError, RunError

# A collective that waits longer than this (a rank died or hangs) fails instead of blocking.
COLLECTIVE_TIMEOUT = timedelta(minutes=10)

# The tensors of this process's latest collectives, released once the group is destroyed. A
# worker thread retires a collective right after it completes, so only the latest can still
# be held there; older ones are let go (a run makes millions of collectives).
KEPT_COLLECTIVES = 64
_COLLECTIVE_TENSORS: collections.deque[tuple[torch.Tensor, ...]] = collections.deque(
    maxlen=KEPT_COLLECTIVES)


@dataclass(frozen=True)
class World:
    """This process's place among the processes of a run.

    ``rank`` of ``world_size`` over all machines; ``local_rank`` of ``local_world_size`` on
    this machine; ``restart_count``: how often torchrun has restarted the group
    (``--max-restarts``).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    restart_count: int = 0

    @property
    def is_main(self) -> bool:
        """Whether this process writes the run's files (rank 0)."""
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


def world_from_env(environ: Mapping[str, str] | None = None) -> World:
    """The :class:`World` that torchrun's variables (RANK, WORLD_SIZE, LOCAL_RANK,
    LOCAL_WORLD_SIZE, TORCHELASTIC_RESTART_COUNT) describe; one process without them."""
    environ = os.environ if environ is None else environ
    names = {"rank": "RANK", "world_size": "WORLD_SIZE", "local_rank": "LOCAL_RANK",
             "local_world_size": "LOCAL_WORLD_SIZE", "restart_count": "TORCHELASTIC_RESTART_COUNT"}
    values: dict[str, int] = {}
    for key, name in names.items():
        try:
            values[key] = int(environ.get(name, World.__dataclass_fields__[key].default))
        except ValueError:
            raise InputError(None, f"{name}={environ[name]!r} is not an integer") from None
    world = World(**values)
    if world.world_size < 1 or not 0 <= world.rank < world.world_size:
        raise InputError(None, f"RANK={world.rank} is outside WORLD_SIZE={world.world_size}")
    if not 0 <= world.local_rank < world.local_world_size:
        raise InputError(None, f"LOCAL_RANK={world.local_rank} is outside "
                               f"LOCAL_WORLD_SIZE={world.local_world_size}")
    return world


def auto_device(world: World) -> str:
    """What ``--device auto`` means for this process: ``cuda`` when every process on this
    machine can have a GPU of its own, else ``cpu`` (with a one-line warning on stderr when
    there are GPUs, but fewer than processes)."""
    if not torch.cuda.is_available():
        return "cpu"
    count = torch.cuda.device_count()
    if world.local_world_size > count:
        sys.stderr.write(f"warning: --device auto: {world.local_world_size} processes on this "
                         f"machine but {count} GPU(s); running on the CPU\n")
        return "cpu"
    return "cuda"


def process_device(name: str, world: World) -> torch.device:
    """The device of this process: ``cuda`` means the GPU of its local rank, which also
    becomes the current CUDA device (so that nothing lands on GPU 0 by default); ``auto``
    see :func:`auto_device`."""
    if name == "auto":
        name = auto_device(world)
    if name != "cuda":
        return torch.device(name)
    if not torch.cuda.is_available():
        raise InputError(None, "--device cuda: no CUDA device is available")
    if world.local_rank >= torch.cuda.device_count():
        raise InputError(None, f"local rank {world.local_rank} has no GPU: this machine has "
                               f"{torch.cuda.device_count()} (start at most that many "
                               "processes per node)")
    device = torch.device("cuda", world.local_rank)
    torch.cuda.set_device(device)
    return device


@contextlib.contextmanager
def process_group(world: World, device: torch.device) -> Iterator[None]:
    """Join the run's process group for the duration of the block (nothing to join for one
    process, or when the caller has joined one already)."""
    if not world.is_distributed or dist.is_initialized():
        yield
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, rank=world.rank, world_size=world.world_size,
                            timeout=COLLECTIVE_TIMEOUT)
    try:
        yield
        # No rank tears down while a peer still has a collective in flight.
        dist.barrier()
    finally:
        destroy_process_group()


def destroy_process_group() -> None:
    """Leave the default group now, while the interpreter is fully alive.

    DDP holds the group too: whatever still refers to it is freed first (a reference cycle
    would keep it until interpreter shutdown, where its threads abort the process). The
    tensors of this process's collectives are released only after the group's threads are
    gone (see the module docstring).
    """
    gc.collect()
    dist.destroy_process_group()
    _COLLECTIVE_TENSORS.clear()


def keep_until_destroyed(*tensors: torch.Tensor) -> None:
    """Keep ``tensors`` (handed to one collective) referenced until the group is destroyed
    (the tensors of the latest :data:`KEPT_COLLECTIVES` collectives are kept)."""
    _COLLECTIVE_TENSORS.append(tensors)


def _collective_device(group: Any = None) -> torch.device:
    """Where a collective's tensors live: the current GPU for NCCL, else the CPU."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _encode(value: Any, device: torch.device) -> torch.Tensor:
    """``value`` (tensors, containers and primitives) as bytes [n] uint8 on ``device``."""
    buffer = io.BytesIO()
    torch.save(value, buffer)
    # A copy of its own: a tensor over the Python buffer would need the interpreter lock to
    # be freed (see the module docstring).
    data = torch.frombuffer(bytearray(buffer.getvalue()), dtype=torch.uint8).clone()
    return data.to(device)


def _decode(data: torch.Tensor, size: int) -> Any:
    """The value of :func:`_encode`'s first ``size`` bytes (weights_only: plain data and
    tensors only)."""
    raw = bytes(data[:size].cpu().numpy())
    return torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)


def broadcast_object(value: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``value`` on every rank (``value`` itself without a process group).

    ``value``: tensors, containers and primitives (what ``torch.load(weights_only=True)``
    reads back).
    """
    if not dist.is_initialized():
        return value
    device = _collective_device()
    is_src = dist.get_rank() == src
    data = _encode(value, device) if is_src else torch.zeros(0, dtype=torch.uint8, device=device)
    size = torch.tensor([data.numel()], dtype=torch.int64, device=device)
    dist.broadcast(size, src=src)
    if not is_src:
        data = torch.zeros(int(size), dtype=torch.uint8, device=device)
    dist.broadcast(data, src=src)
    keep_until_destroyed(size, data)
    return value if is_src else _decode(data, int(size))


def gather_objects(value: Any, group: Any = None) -> list[Any]:
    """Every rank's ``value`` (as for :func:`broadcast_object`), in rank order, on every rank
    of ``group`` (default: the default group; ``[value]`` without one)."""
    if not dist.is_initialized():
        return [value]
    device = _collective_device(group)
    data = _encode(value, device)
    world_size = dist.get_world_size(group)
    size = torch.tensor([data.numel()], dtype=torch.int64, device=device)
    sizes = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(world_size)]
    dist.all_gather(sizes, size, group=group)
    longest = max(int(n) for n in sizes)
    padded = torch.zeros(longest, dtype=torch.uint8, device=device)
    padded[:data.numel()] = data
    gathered = [torch.zeros(longest, dtype=torch.uint8, device=device)
                for _ in range(world_size)]
    dist.all_gather(gathered, padded, group=group)
    keep_until_destroyed(size, padded, *sizes, *gathered)
    return [_decode(part, int(n)) for part, n in zip(gathered, sizes)]


def sum_across_ranks(values: Sequence[float], device: torch.device) -> list[float]:
    """Element-wise sums of ``values`` over all ranks (float64)."""
    if not dist.is_initialized():
        return [float(v) for v in values]
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    keep_until_destroyed(tensor)
    return tensor.tolist()


def floating_buffers(module: nn.Module) -> list[torch.Tensor]:
    """The floating-point buffers of ``module`` (batch-norm running statistics)."""
    return [buf for buf in module.buffers() if buf.is_floating_point()]


@torch.no_grad()
def average_buffers(module: nn.Module) -> None:
    """Replace every floating-point buffer of ``module`` by its mean over all ranks.

    Each rank updates batch-norm running statistics from its own batch; averaging them after
    every step gives statistics of the global batch, the same on every rank.
    """
    buffers = floating_buffers(module)
    if not dist.is_initialized() or not buffers:
        return
    flat = torch.cat([buf.reshape(-1).double() for buf in buffers])
    dist.all_reduce(flat)
    keep_until_destroyed(flat)
    flat /= dist.get_world_size()
    offset = 0
    for buf in buffers:
        buf.copy_(flat[offset:offset + buf.numel()].view_as(buf))
        offset += buf.numel()


@torch.no_grad()
def target_divergence(module: nn.Module) -> float:
    """Largest absolute difference between the ranks' copies of ``module``'s parameters and
    floating-point buffers (0.0 when they are identical, and without a process group).

    One all-reduce (max) of the values and their negations gives each entry's max and min
    over the ranks.
    """
    tensors = list(module.parameters()) + floating_buffers(module)
    if not dist.is_initialized() or not tensors:
        return 0.0
    flat = torch.cat([t.reshape(-1).float() for t in tensors])
    both = torch.cat([flat, -flat])
    dist.all_reduce(both, op=dist.ReduceOp.MAX)
    keep_until_destroyed(both)
    highest, lowest = both[: flat.numel()], -both[flat.numel():]
    return float((highest - lowest).max())


class TargetDivergedError(RunError):
    """The ranks' target encoders are no longer identical."""


def check_target_in_sync(target: nn.Module, step: int) -> float:
    """:func:`target_divergence` of ``target``; raises :class:`TargetDivergedError` on every
    rank (they all see the same value) when it is not 0."""
    divergence = target_divergence(target)
    if divergence != 0.0:
        raise TargetDivergedError(
            f"the target encoders of the ranks differ by up to {divergence:.3e} at step {step}; "
            "they must stay identical (are all ranks running the same code and settings?)")
    return divergence


class TargetSyncCheck:
    """Compares the ranks' target encoders every ``every`` steps and at the last step
    (multi-process runs only); a difference stops every rank (see check_target_in_sync)."""

    def __init__(self, every: int, enabled: bool) -> None:
        self.every = every
        self.enabled = enabled

    def run(self, target: nn.Module, step: int, *, last_step: bool) -> float | None:
        """The largest difference between the ranks' targets (0.0) when a check is due."""
        if not self.enabled or not (last_step or step % self.every == 0):
            return None
        return check_target_in_sync(target, step)
