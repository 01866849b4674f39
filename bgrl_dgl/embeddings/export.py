"""``embed``: node embeddings of a store written as a Parquet dataset (format: parquet.py).

Part ``p`` holds rows ``[p * rows_per_part, (p + 1) * rows_per_part)`` of the exported nodes
(all nodes, or the ``--nodes`` subset, ascending). Its content depends only on the inputs
(up to float rounding: layers may order their products by the shape of a batch), so parts
are computed independently of one another:

- Each part is written under a temporary name and renamed when complete. A rerun with the
  same inputs keeps the complete parts and computes and writes only the missing ones (with
  exact inference, the layers before the last still run for every node the missing parts
  read: with a power-law graph, usually nearly all of them).
- Under ``torchrun`` (``RANK``/``WORLD_SIZE``), rank ``r`` of ``W`` writes the ``r``-th of
  ``W`` contiguous blocks of parts. With exact inference the ranks work as one (ranks.py):
  rank 0 claims OUT (``--overwrite`` included) and checks the scratch space once for all;
  every layer before the last is computed once, each rank computing a share of its rows into
  one set of tables in a scratch directory that all ranks see (``--scratch-dir`` on several
  machines must be shared storage), and the ranks wait for each other between layers (a
  gloo group under torchrun, files in that directory for processes started by hand, which
  must then run at the same time). Each rank computes the last layer for its own parts, and
  rank 0 writes the manifest and ``_SUCCESS`` when all are written. A rank that dies makes
  the others fail with one line (at the latest after ``BGRL_EMBED_BARRIER_TIMEOUT``
  seconds, default 1800); a rerun finishes the export. Sampled ranks work alone: whichever
  finds all parts present when it finishes writes the manifest, and an old export must be
  deleted before several ranks start on it (they cannot agree on ``--overwrite``).

The embeddings never sit in memory at once. With exact inference the last layer's rows go,
block by block, to a writer thread that writes them row group by row group and commits each
part when complete (rowstream.py); the layers' tables live in a scratch directory, inside
OUT by default. Sampled embeddings are written to a memmap in the scratch directory, from
which the parts are streamed. The scratch space is checked and each memmap allocated
before any layer runs, and a rerun first removes the scratch directories of runs that died
(see scratch.py). A full disk met while writing ends the export with one line (the command
line maps the OSError), keeping the complete parts for a rerun.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from bgrl_dgl import config as cfg
from bgrl_dgl.embeddings.claim import (
    claim_output,
    finish_if_complete,
    layout_rows,
    part_complete,
    parts_to_compute,
)
from bgrl_dgl.embeddings.layerwise import scratch_requirement
from bgrl_dgl.embeddings.parquet import (
    DTYPES,
    FORMAT,
    MANIFEST_FILE,
    SUCCESS_FILE,
    ParquetPart,
    PartLayout,
    embedding_schema,
    part_name,
    write_part,
)
from bgrl_dgl.embeddings.ranks import RankSession, barrier_timeout
from bgrl_dgl.embeddings.rowstream import StreamedParts
from bgrl_dgl.embeddings.sampled import InferenceOptions, check_fanouts, compute_parts
from bgrl_dgl.embeddings.scratch import (
    allocate_array,
    check_free_space,
    remove_stale_scratch,
    scratch_directory,
)
from bgrl_dgl.errors import InputError
from bgrl_dgl.io import (
    remove_stale_temp_files,
)
from bgrl_dgl.progress import progress_bar
from bgrl_dgl.runs import RunEncoder, load_encoder
from bgrl_dgl.store.reader import GraphStore, read_node_ids
from bgrl_dgl.training.distributed import World, process_device
from bgrl_dgl.training.host import compute_threads


def export_inputs(store: GraphStore, source: RunEncoder, which: str, dtype: str,
                  nodes: np.ndarray | None, fanouts: list[int] | None, seed: int,
                  layout: PartLayout, run: Path | None,
                  scratch_dtype: str = "float32") -> dict[str, Any]:
    """The JSON description of an export: equal for two runs iff they write the same parts."""
    exact = {"mode": "exact"} if scratch_dtype == "float32" else {"mode": "exact",
                                                                  "scratch_dtype": scratch_dtype}
    inputs = {
        "format": FORMAT,
        "num_nodes": layout.num_rows,
        "dim": source.encoder.out_dim,
        "dtype": dtype,
        "encoder": which,
        "step": source.checkpoint["step"] if source.checkpoint else 0,
        "checkpoint": source.checkpoint,
        "run": None if run is None else str(run.resolve()),
        "data": {"path": str(store.path.resolve()), "num_nodes": store.num_nodes,
                 "num_edges": store.num_edges, "created": store.meta.get("created")},
        "node_id": "orig_ids" if store.orig_ids is not None else "store_index",
        "node_types": {name: list(bounds) for name, bounds in store.node_types.items()},
        "nodes": None if nodes is None else {
            "count": int(nodes.size), "sha256": hashlib.sha256(nodes.tobytes()).hexdigest()},
        "inference": (exact if fanouts is None
                      else {"mode": "sampled", "fanouts": list(fanouts), "seed": seed}),
        "rows_per_part": layout.rows_per_part,
        "row_group_rows": layout.row_group_rows,
        "config": cfg.to_dict(source.config),
    }
    return json.loads(json.dumps(inputs))


@dataclass(frozen=True)
class ExportResult:
    """What one process did: the parts it wrote and found complete, and whether the whole
    export is now complete."""

    out: Path
    num_rows: int
    dim: int
    dtype: str
    parts_written: list[int]
    parts_kept: list[int]
    num_parts: int
    complete: bool
    rank: int
    world_size: int

    def describe(self) -> str:
        who = f"rank {self.rank} of {self.world_size}: " if self.world_size > 1 else ""
        done = (f"complete: {self.num_rows:,} nodes x {self.dim} {self.dtype} in {self.num_parts} "
                f"parts, {MANIFEST_FILE} and {SUCCESS_FILE} written" if self.complete
                else "the export completes when the other ranks have written their parts")
        return (f"{who}{self.out}: {len(self.parts_written)} parts written, "
                f"{len(self.parts_kept)} already complete; {done}")


def export_embeddings(out: str | os.PathLike, *, run: str | os.PathLike | None = None,
                      checkpoint: str | os.PathLike | None = None,
                      data: str | os.PathLike | None = None,
                      encoder: Literal["online", "target", "random"] = "online",
                      dtype: Literal["float32", "float16"] = "float32",
                      nodes: str | os.PathLike | None = None,
                      options: InferenceOptions = InferenceOptions(),
                      rows_per_part: int | None = None,
                      scratch_dir: str | os.PathLike | None = None,
                      overwrite: bool = False, world: World = World()) -> ExportResult:
    """Embed the nodes of a store with a run's (or a checkpoint's) encoder into the Parquet
    export ``out`` (see the module docstring), writing the parts of ``world.rank`` of
    ``world.world_size`` (on the GPU of its local rank, with ``cuda``).

    ``data``: the store (default: the run's). ``nodes``: a .npy file of store indices to
    export (default: all nodes). ``scratch_dir``: where the memmaps of the layers go
    (default: inside ``out``). Every input is checked before ``out`` is touched.
    """
    if dtype not in DTYPES:
        raise InputError(None, f"--dtype must be float32 or float16, got {dtype!r}")
    if options.batch_size is not None and options.batch_size < 1:
        raise InputError(None, f"--batch-size must be positive, got {options.batch_size}")
    if options.scratch_dtype not in DTYPES:
        raise InputError(None, f"--scratch-dtype must be float32 or float16, got "
                               f"{options.scratch_dtype!r}")
    out = Path(out)
    if scratch_dir is not None and not Path(scratch_dir).is_dir():
        raise InputError(scratch_dir, "no such scratch directory")
    source = load_encoder(run, checkpoint, encoder)
    if data is None and source.data is None:
        raise InputError(None, "--data is required with --checkpoint")
    store = GraphStore.open(data if data is not None else source.data)
    if store.feat_dim != source.encoder.in_dim:
        raise InputError(store.path, f"has {store.feat_dim}-d features but the encoder takes "
                                     f"{source.encoder.in_dim}-d ones")
    check_fanouts(options.fanouts, source.encoder.num_layers)
    node_ids = None if nodes is None else read_node_ids(nodes, store.num_nodes)
    device = process_device(options.device, world)
    dim = source.encoder.out_dim
    rows_dtype = np.dtype(DTYPES[dtype][0])
    layout = PartLayout.plan(store.num_nodes, node_ids, dim * rows_dtype.itemsize + 8,
                             rows_per_part)
    inputs = export_inputs(store, source, encoder, dtype, node_ids, options.fanouts,
                           options.seed, layout, None if run is None else Path(run),
                           options.scratch_dtype)
    schema = embedding_schema(dim, dtype, bool(store.node_types))

    mine = layout.rank_parts(world.rank, world.world_size)
    scratch_root = out if scratch_dir is None else Path(scratch_dir)
    remove_stale_scratch(scratch_root)  # before the free space is measured
    exact = options.fanouts is None
    if exact and device.type == "cpu":
        torch.set_num_threads(compute_threads(0, 0, world.local_world_size))
    if exact and world.is_distributed:
        job = SharedExport(source, store, layout, options, device, out, schema, inputs)
        return job.run(world, scratch_root, overwrite)
    planned = parts_to_compute(out, inputs, layout, mine, schema, overwrite)
    if exact:  # the intermediate tables
        needed = scratch_requirement(source.encoder, store.num_nodes, options.scratch_dtype,
                                     device) if planned else 0
    else:  # the memmap of the sampled embeddings
        needed = layout_rows(layout, planned) * dim * rows_dtype.itemsize
    check_free_space(scratch_root, needed, f"embedding {layout_rows(layout, planned):,} nodes")

    claim_output(out, inputs, overwrite)
    remove_stale_temp_files(out)
    missing = [p for p in mine if not part_complete(out, layout, p, schema)]
    if missing:
        with scratch_directory(scratch_root) as scratch:
            if exact:
                write_exact_parts(source, store, layout, missing, options, scratch, device,
                                  out, schema)
            else:
                write_sampled_parts(source, store, layout, missing, options, scratch, device,
                                    out, schema, rows_dtype)
    complete = finish_if_complete(out, inputs, layout)
    return ExportResult(out, layout.num_rows, dim, dtype, missing,
                        [p for p in mine if p not in missing], layout.num_parts, complete,
                        world.rank, world.world_size)




@dataclass(frozen=True)
class SharedExport:
    """An exact export by several ranks that compute the layers before the last together
    (see ranks.py): rank 0 claims ``out`` and checks the scratch space for all of them."""

    source: RunEncoder
    store: GraphStore
    layout: PartLayout
    options: InferenceOptions
    device: torch.device
    out: Path
    schema: Any
    inputs: dict[str, Any]

    def claim(self, overwrite: bool, scratch_root: Path) -> list[int]:
        """Rank 0's part: claim ``out``, check the scratch space; the parts still missing."""
        everything = list(range(self.layout.num_parts))
        planned = parts_to_compute(self.out, self.inputs, self.layout, everything, self.schema,
                                   overwrite)
        needed = scratch_requirement(self.source.encoder, self.store.num_nodes,
                                     self.options.scratch_dtype, self.device,
                                     shared=True) if planned else 0
        check_free_space(scratch_root, needed,
                         f"embedding {layout_rows(self.layout, planned):,} nodes")
        claim_output(self.out, self.inputs, overwrite)
        remove_stale_temp_files(self.out)
        return [p for p in everything
                if not part_complete(self.out, self.layout, p, self.schema)]

    def run(self, world: World, scratch_root: Path, overwrite: bool) -> ExportResult:
        """This rank's share of the export (every rank calls it)."""
        key = hashlib.sha256(json.dumps([self.inputs, world.world_size],
                                        sort_keys=True).encode()).hexdigest()[:16]
        mine = self.layout.rank_parts(world.rank, world.world_size)
        if self.out.exists() and not self.out.is_dir():
            raise InputError(self.out, "exists and is not a directory")
        made = world.rank == 0 and not scratch_root.exists()  # OUT, holding the scratch
        if made:
            scratch_root.mkdir(parents=True)
        try:
            return self.share(world, scratch_root, overwrite, key, mine)
        except BaseException:
            if made:
                with contextlib.suppress(OSError):
                    scratch_root.rmdir()  # if nothing else was written into it
            raise

    def share(self, world: World, scratch_root: Path, overwrite: bool, key: str,
              mine: list[int]) -> ExportResult:
        """:meth:`run` once the scratch root exists."""
        with RankSession(world, scratch_root, key, barrier_timeout()) as session:
            status: dict[str, Any] = {}
            if world.rank == 0:
                try:
                    status = {"missing": self.claim(overwrite, scratch_root)}
                except InputError as err:
                    session.gather({"error": str(err)}, "rank 0 to claim the output")
                    raise
            first = session.gather(status, "rank 0 to claim the output")[0]
            if "error" in first:
                raise InputError(None, first["error"])
            everyone = first["missing"]
            missing = [p for p in mine if p in set(everyone)]
            if everyone:
                write_exact_parts(self.source, self.store, self.layout, missing, self.options,
                                  session.directory, self.device, self.out, self.schema,
                                  session, everyone)
            session.barrier("every rank's parts")
            complete = world.rank == 0 and finish_if_complete(self.out, self.inputs,
                                                              self.layout)
            complete = session.gather(complete, "rank 0 to write the manifest")[0]
        return ExportResult(self.out, self.layout.num_rows, self.source.encoder.out_dim,
                            self.inputs["dtype"], missing,
                            [p for p in mine if p not in missing], self.layout.num_parts,
                            complete, world.rank, world.world_size)


def write_exact_parts(source: RunEncoder, store: GraphStore, layout: PartLayout,
                      missing: list[int], options: InferenceOptions, scratch: Path,
                      device: torch.device, out: Path, schema: Any,
                      share: RankSession | None = None,
                      shared_parts: list[int] | None = None) -> None:
    """Exact embeddings of the parts ``missing``, written by a thread as the last layer's
    rows come (each part committed once complete). ``share``: the ranks compute the earlier
    layers together, for the parts ``shared_parts`` of all of them."""
    sizes = [layout.rows(p)[1] - layout.rows(p)[0] for p in missing]
    with progress_bar(total=len(missing), desc="write parts", unit="parts") as bar:
        def open_part(k: int) -> ParquetPart:
            return CountedPart(out / part_name(missing[k]), store, layout.node_ids(missing[k]),
                               schema, bar)

        with StreamedParts(sizes, layout.row_group_rows, open_part) as parts:
            compute_parts(source.encoder, store, layout, missing, parts, options, scratch,
                          False, device, share, shared_parts)


class CountedPart(ParquetPart):
    """A part counted on ``bar`` once committed."""

    def __init__(self, path: Path, store: GraphStore, nodes: np.ndarray, schema: Any,
                 bar: Any) -> None:
        super().__init__(path, store, nodes, schema)
        self.bar = bar

    def commit(self) -> None:
        super().commit()
        self.bar.update(1)


def write_sampled_parts(source: RunEncoder, store: GraphStore, layout: PartLayout,
                        missing: list[int], options: InferenceOptions, scratch: Path,
                        device: torch.device, out: Path, schema: Any,
                        rows_dtype: np.dtype) -> None:
    """Sampled embeddings of the parts ``missing`` into a memmap in ``scratch``, then the
    parts."""
    rows = allocate_array(scratch / "embeddings", rows_dtype,
                          (layout_rows(layout, missing), source.encoder.out_dim))
    compute_parts(source.encoder, store, layout, missing, rows, options, scratch,
                  source.config.sampling.graph_degrees, device)
    offset = 0
    for part in progress_bar(missing, desc="write parts", unit="parts"):
        part_nodes = layout.node_ids(part)
        write_part(out / part_name(part), store, part_nodes,
                   rows[offset:offset + part_nodes.size], schema, layout.row_group_rows)
        offset += part_nodes.size
    del rows
