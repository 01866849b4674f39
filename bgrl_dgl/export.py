"""Node embeddings as a Parquet dataset: writing them (``embed``), reading and probing them
(``evaluate``).

An export is a directory::

    part-00000.parquet ...  node_id int64, node_type dictionary<string> (stores with node
                            types only), embedding fixed_size_list<float32|float16>[D];
                            zstd, row groups of about 64 MB; rows in store-index order
    _inputs.json            what the export is of (store, encoder, checkpoint, options),
                            written before any part
    _manifest.json          the inputs plus every part's row range, size and sha256
    _SUCCESS                empty; written last: the export is complete

``node_id`` is the node's original id where the store keeps ``orig_ids`` (the ``parquet``
source), else its store index. The underscore files are skipped by ``pyarrow.dataset`` and
pandas, so ``pandas.read_parquet(OUT)`` reads the embeddings alone.

Part ``p`` holds rows ``[p * rows_per_part, (p + 1) * rows_per_part)`` of the exported nodes
(all nodes, or the ``--nodes`` subset, ascending). Its content depends only on the inputs
(up to float rounding: layers may order their products by the shape of a batch), so parts
are computed independently of one another:

- Each part is written under a temporary name and renamed when complete. A rerun with the
  same inputs keeps the complete parts and computes and writes only the missing ones (with
  exact inference, the layers before the last still run for every node the missing parts
  read: with a power-law graph, usually nearly all of them).
- Under ``torchrun`` (``RANK``/``WORLD_SIZE``), rank ``r`` of ``W`` takes the ``r``-th of
  ``W`` contiguous blocks of parts. No process group is needed: whichever process finds all
  parts present when it finishes writes the manifest and ``_SUCCESS``. Without a barrier,
  ``--overwrite`` cannot be coordinated between ranks: delete an old export before starting
  several ranks on it.

The embeddings never sit in memory at once: the last layer is written to a memmap in a
scratch directory (inside OUT by default), from which the parts are streamed row group by
row group.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from . import config as cfg
from .builder import process_alive
from .checkpoint import latest_checkpoint, load_checkpoint
from .distributed import World, process_device
from .errors import InputError
from .evaluate import ProbeSummary, linear_probe, random_split_probe, summarize
from .inference import embed_store
from .model import Encoder
from .sampling import NeighborBatchSampler, batch_rng_seed, one_omp_thread
from .sources.splits import SPLIT_NAMES
from .store import GraphStore, read_node_ids
from .train import TrainConfig, build_model, load_encoder, load_run_config

FORMAT = "bgrl-dgl-embeddings/1"
INPUTS_FILE = "_inputs.json"
MANIFEST_FILE = "_manifest.json"
SUCCESS_FILE = "_SUCCESS"
PART_NAME = re.compile(r"part-(\d{5,})\.parquet")
ROW_GROUP_BYTES = 64 << 20
ROW_GROUPS_PER_PART = 4
ENCODERS = ("online", "target", "random")
DTYPES = {"float32": (np.float32, pa.float32()), "float16": (np.float16, pa.float16())}
# Temporary files and scratch directories in OUT: ".tmp-<pid>@<host>@<name>", removed by a
# later run once <pid> on this host is gone.
TEMP_NAME = re.compile(r"\.tmp-(\d+)@([^@]+)@.*")


def part_name(index: int) -> str:
    return f"part-{index:05d}.parquet"


def file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


# ---- the encoder ---------------------------------------------------------------------------
@dataclass(frozen=True)
class ExportEncoder:
    """An encoder to export with, and where it came from."""

    encoder: Encoder
    config: dict[str, Any]              # the training configuration
    checkpoint: dict[str, Any] | None   # {"path", "sha256", "step"}; None: initial weights
    data: Path | None                   # the run's store


def load_export_encoder(run: str | os.PathLike | None, checkpoint: str | os.PathLike | None,
                        which: Literal["online", "target", "random"]) -> ExportEncoder:
    """The ``which`` encoder of a run (its newest checkpoint) or of a checkpoint file.

    ``random`` is the encoder as initialised before training (no weights are loaded).
    """
    if (run is None) == (checkpoint is None):
        raise InputError(None, "give exactly one of --run and --checkpoint")
    if which not in ENCODERS:
        raise InputError(None, f"--encoder must be one of {', '.join(ENCODERS)}, got {which!r}")
    data = None
    if run is not None:
        run = Path(run)
        if not (run / "config.yaml").is_file():
            raise InputError(run, "not a run directory (no config.yaml)")
        config, info = load_run_config(run)
        data = Path(info["data"])
        if which == "random":
            return ExportEncoder(load_encoder(run, "random"), cfg.to_dict(config), None, data)
        checkpoint = latest_checkpoint(run)
        if checkpoint is None:
            raise InputError(run, "holds no checkpoint")
    checkpoint = Path(checkpoint)
    state = load_checkpoint(checkpoint)
    missing = [key for key in ("config", "feat_dim", "model", "step") if key not in state]
    if missing:
        raise InputError(checkpoint, f"not a training checkpoint (lacks {', '.join(missing)})")
    config = TrainConfig.from_plain(state["config"], str(checkpoint))
    model = build_model(int(state["feat_dim"]), config.model, config.run.seed)
    source = None
    if which != "random":
        try:
            model.load_state_dict(state["model"])
        except (RuntimeError, KeyError) as err:
            raise InputError(checkpoint, "weights do not fit the model of its configuration "
                             f"({str(err).splitlines()[0]})") from None
        source = {"path": str(checkpoint.resolve()), "sha256": file_sha256(checkpoint),
                  "step": int(state["step"])}
    encoder = model.target if which == "target" else model.online
    return ExportEncoder(encoder.eval(), cfg.to_dict(config), source, data)


# ---- what is exported ----------------------------------------------------------------------
@dataclass(frozen=True)
class PartLayout:
    """How the exported rows (all nodes, or the ascending store indices ``nodes``) are cut
    into parts and row groups."""

    num_rows: int
    nodes: np.ndarray | None
    rows_per_part: int
    row_group_rows: int

    @classmethod
    def plan(cls, num_nodes: int, nodes: np.ndarray | None, row_bytes: int,
             rows_per_part: int | None) -> "PartLayout":
        """Row groups of about ROW_GROUP_BYTES (``row_bytes`` per row), ROW_GROUPS_PER_PART
        of them per part unless ``rows_per_part`` is given."""
        if rows_per_part is not None and rows_per_part < 1:
            raise InputError(None, f"--rows-per-part must be positive, got {rows_per_part}")
        group = max(1, ROW_GROUP_BYTES // row_bytes)
        per_part = rows_per_part or ROW_GROUPS_PER_PART * group
        return cls(num_nodes if nodes is None else nodes.size, nodes, per_part, min(group, per_part))

    @property
    def num_parts(self) -> int:
        return -(-self.num_rows // self.rows_per_part)

    def rows(self, part: int) -> tuple[int, int]:
        """[start, end) rows of ``part``."""
        start = part * self.rows_per_part
        return start, min(start + self.rows_per_part, self.num_rows)

    def node_ids(self, part: int) -> np.ndarray:
        """Store indices [rows] int64 of the rows of ``part``, ascending."""
        start, end = self.rows(part)
        return np.arange(start, end, dtype=np.int64) if self.nodes is None else self.nodes[start:end]

    def rank_parts(self, rank: int, world_size: int) -> list[int]:
        """Rank ``rank``'s block of consecutive parts."""
        return [int(p) for p in np.array_split(np.arange(self.num_parts), world_size)[rank]]


def embedding_schema(dim: int, dtype: str, node_types: bool) -> pa.Schema:
    fields = [pa.field("node_id", pa.int64(), nullable=False)]
    if node_types:
        fields.append(pa.field("node_type", pa.dictionary(pa.int32(), pa.string())))
    fields.append(pa.field("embedding", pa.list_(DTYPES[dtype][1], dim), nullable=False))
    return pa.schema(fields)


def export_inputs(store: GraphStore, source: ExportEncoder, which: str, dtype: str,
                  nodes: np.ndarray | None, fanouts: list[int] | None, seed: int,
                  layout: PartLayout, run: Path | None) -> dict[str, Any]:
    """The JSON description of an export: equal for two runs iff they write the same parts."""
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
        "inference": ({"mode": "exact"} if fanouts is None
                      else {"mode": "sampled", "fanouts": list(fanouts), "seed": seed}),
        "rows_per_part": layout.rows_per_part,
        "row_group_rows": layout.row_group_rows,
        "config": source.config,
    }
    return json.loads(json.dumps(inputs))


# ---- the output directory ------------------------------------------------------------------
def temp_prefix() -> str:
    return f".tmp-{os.getpid()}@{socket.gethostname()}@"


def remove_stale_temp_files(out: Path) -> None:
    """Delete temp files and scratch directories left in ``out`` by dead processes of this host."""
    host = socket.gethostname()
    for entry in out.iterdir():
        match = TEMP_NAME.fullmatch(entry.name)
        if match and match.group(2) == host and not process_alive(int(match.group(1))):
            if entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)


def write_atomic(path: Path, text: str) -> None:
    """``text`` to ``path`` via a temp file in the same directory, flushed and renamed."""
    tmp = path.with_name(temp_prefix() + path.name)
    try:
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(path, "not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InputError(path, f"unreadable ({err})") from None


def clear_export(out: Path) -> None:
    """Delete an export's own files, the completion marker first."""
    for name in (SUCCESS_FILE, MANIFEST_FILE):
        (out / name).unlink(missing_ok=True)
    for entry in out.iterdir():
        if PART_NAME.fullmatch(entry.name):
            entry.unlink()
    (out / INPUTS_FILE).unlink(missing_ok=True)


def claim_output(out: Path, inputs: dict[str, Any], overwrite: bool) -> None:
    """Make ``out`` the export of ``inputs``, keeping the parts of an unfinished export of the
    same inputs. A complete export, or an unfinished one of other inputs, is replaced only
    with ``overwrite``; a directory that is not an export is never written into."""
    if out.exists() and not out.is_dir():
        raise InputError(out, "exists and is not a directory")
    if out.is_dir():
        recorded_path = out / INPUTS_FILE
        if recorded_path.exists():
            recorded = read_json(recorded_path)
            complete = (out / SUCCESS_FILE).exists()
            if complete and not overwrite:
                raise InputError(out, "already holds a complete embedding export; pass "
                                      "--overwrite to replace it")
            if recorded != inputs and not overwrite:
                raise InputError(out, "holds an unfinished export of other inputs; rerun with "
                                      "the same inputs to finish it, or pass --overwrite")
            if complete or recorded != inputs:
                clear_export(out)
        elif any(not TEMP_NAME.fullmatch(entry.name) for entry in out.iterdir()):
            raise InputError(out, "exists and is not an embedding export; refusing to write into it")
    out.mkdir(parents=True, exist_ok=True)
    publish_inputs(out, inputs)


def publish_inputs(out: Path, inputs: dict[str, Any]) -> None:
    """Write ``_inputs.json`` unless present; if another process wrote it first (another
    rank), it must record the same inputs."""
    path = out / INPUTS_FILE
    tmp = out / (temp_prefix() + INPUTS_FILE)
    tmp.write_text(json.dumps(inputs, indent=1) + "\n", encoding="utf-8")
    try:
        os.link(tmp, path)  # fails if the file exists: the first writer wins
    except FileExistsError:
        if read_json(path) != inputs:
            raise InputError(out, "another process is writing an export of other inputs here") from None
    finally:
        tmp.unlink(missing_ok=True)


def part_is_complete(path: Path, rows: int, schema: pa.Schema) -> bool:
    """Whether ``path`` is a readable part of ``rows`` rows with ``schema``."""
    try:
        metadata = pq.read_metadata(path)
        return metadata.num_rows == rows and metadata.schema.to_arrow_schema().equals(schema)
    except (OSError, pa.ArrowException):
        return False


# ---- computing and writing -----------------------------------------------------------------
@dataclass(frozen=True)
class InferenceOptions:
    """How embeddings are computed: exact layer-wise, or sampled with ``fanouts``."""

    batch_size: int = 4096
    device: str = "auto"
    fanouts: list[int] | None = None
    seed: int = 0


def sampled_embeddings(encoder: Encoder, sampler: NeighborBatchSampler, nodes: np.ndarray,
                       out: np.ndarray, batch_size: int, seed: int, stream: int,
                       device: torch.device) -> None:
    """The encoder over neighbour-sampled blocks of ``nodes`` [M] into ``out`` [M, D].

    Batch ``j`` is sampled with the seed of (``seed``, ``stream``, ``j``), so the result for
    a stream of nodes (a part) does not depend on what else is computed.
    """
    import dgl

    with torch.no_grad():
        for j, start in enumerate(range(0, nodes.size, batch_size)):
            with one_omp_thread():  # several threads sample differently on every run
                dgl.seed(batch_rng_seed(seed, stream, j))
                view, _, _ = sampler.sample_view(torch.from_numpy(nodes[start:start + batch_size]))
            view = view.to(device)
            out[start:start + batch_size] = encoder(view.adjs, view.features).cpu().numpy()


def compute_parts(encoder: Encoder, store: GraphStore, layout: PartLayout, parts: list[int],
                  out: np.ndarray, options: InferenceOptions, scratch: Path,
                  sampling_degrees: bool, device: torch.device) -> None:
    """Embeddings of the rows of ``parts`` (ascending), one after another, into ``out``."""
    encoder = encoder.to(device)
    if options.fanouts is None:
        everything = layout.nodes is None and len(parts) == layout.num_parts
        nodes = None if everything else np.concatenate([layout.node_ids(p) for p in parts])
        embed_store(encoder, store, batch_size=options.batch_size, device=device,
                    scratch_dir=scratch, out=out, nodes=nodes)
        return
    sampler = NeighborBatchSampler(store, options.fanouts, sampling_degrees)
    offset = 0
    for part in parts:
        nodes = layout.node_ids(part)
        sampled_embeddings(encoder, sampler, nodes, out[offset:offset + nodes.size],
                           options.batch_size, options.seed, part, device)
        offset += nodes.size


def node_type_codes(store: GraphStore, nodes: np.ndarray) -> pa.DictionaryArray:
    """The type of each node [n] as a dictionary array (null outside every type's range)."""
    names = list(store.node_types)
    codes = np.full(nodes.size, -1, dtype=np.int32)
    for code, name in enumerate(names):
        start, end = store.node_types[name]
        codes[(nodes >= start) & (nodes < end)] = code
    return pa.DictionaryArray.from_arrays(pa.array(codes, mask=codes < 0),
                                          pa.array(names, pa.string()))


def row_group_table(store: GraphStore, nodes: np.ndarray, rows: np.ndarray,
                    schema: pa.Schema) -> pa.Table:
    """One row group: store indices ``nodes`` [n] and their embeddings ``rows`` [n, D]."""
    node_id = nodes if store.orig_ids is None else np.asarray(store.orig_ids[nodes])
    columns = [pa.array(node_id, pa.int64())]
    if "node_type" in schema.names:
        columns.append(node_type_codes(store, nodes))
    values = pa.array(np.ascontiguousarray(rows).reshape(-1))
    columns.append(pa.FixedSizeListArray.from_arrays(values, rows.shape[1]))
    return pa.Table.from_arrays(columns, schema=schema)


def write_part(path: Path, store: GraphStore, nodes: np.ndarray, rows: np.ndarray,
               schema: pa.Schema, row_group_rows: int) -> None:
    """Write one part to ``path`` through a temp file renamed once complete and on disk."""
    tmp = path.with_name(temp_prefix() + path.name)
    dictionary = ["node_type"] if "node_type" in schema.names else False
    try:
        with pq.ParquetWriter(tmp, schema, compression="zstd", use_dictionary=dictionary,
                              write_statistics=["node_id"]) as writer:
            for start in range(0, nodes.size, row_group_rows):
                end = min(start + row_group_rows, nodes.size)
                writer.write_table(row_group_table(store, nodes[start:end], rows[start:end], schema),
                                   row_group_size=end - start)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def finish_if_complete(out: Path, inputs: dict[str, Any], layout: PartLayout) -> bool:
    """Write the manifest, then ``_SUCCESS``, if every part is present; returns whether the
    export is complete."""
    files = [out / part_name(p) for p in range(layout.num_parts)]
    if not all(path.exists() for path in files):
        return False
    parts = [{"file": path.name, "rows": list(layout.rows(p)), "bytes": path.stat().st_size,
              "sha256": file_sha256(path)} for p, path in enumerate(files)]
    manifest = {**inputs, "parts": parts,
                "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    write_atomic(out / MANIFEST_FILE, json.dumps(manifest, indent=1) + "\n")
    write_atomic(out / SUCCESS_FILE, "")
    return True


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
                      rows_per_part: int | None = None, scratch_dir: str | os.PathLike | None = None,
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
    if options.batch_size < 1:
        raise InputError(None, f"--batch-size must be positive, got {options.batch_size}")
    out = Path(out)
    if scratch_dir is not None and not Path(scratch_dir).is_dir():
        raise InputError(scratch_dir, "no such scratch directory")
    source = load_export_encoder(run, checkpoint, encoder)
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
    layout = PartLayout.plan(store.num_nodes, node_ids, dim * np.dtype(DTYPES[dtype][0]).itemsize + 8,
                             rows_per_part)
    inputs = export_inputs(store, source, encoder, dtype, node_ids, options.fanouts,
                           options.seed, layout, None if run is None else Path(run))
    schema = embedding_schema(dim, dtype, bool(store.node_types))

    claim_output(out, inputs, overwrite)
    remove_stale_temp_files(out)
    mine = layout.rank_parts(world.rank, world.world_size)
    missing = [p for p in mine
               if not part_is_complete(out / part_name(p), layout.rows(p)[1] - layout.rows(p)[0], schema)]
    if missing:
        scratch = Path(tempfile.mkdtemp(prefix=temp_prefix() + "scratch-",
                                        dir=out if scratch_dir is None else scratch_dir))
        try:
            num_rows = sum(layout.rows(p)[1] - layout.rows(p)[0] for p in missing)
            rows = np.memmap(scratch / "embeddings", dtype=DTYPES[dtype][0], mode="w+",
                             shape=(num_rows, dim))
            compute_parts(source.encoder, store, layout, missing, rows, options, scratch,
                          bool(source.config["sampling"]["graph_degrees"]), device)
            offset = 0
            for part in missing:
                part_nodes = layout.node_ids(part)
                write_part(out / part_name(part), store, part_nodes,
                           rows[offset:offset + part_nodes.size], schema, layout.row_group_rows)
                offset += part_nodes.size
            del rows
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    complete = finish_if_complete(out, inputs, layout)
    return ExportResult(out, layout.num_rows, dim, dtype, missing,
                        [p for p in mine if p not in missing], layout.num_parts, complete,
                        world.rank, world.world_size)


def check_fanouts(fanouts: list[int] | None, num_layers: int) -> None:
    if fanouts is None:
        return
    if len(fanouts) != num_layers or any(f == 0 or f < -1 for f in fanouts):
        raise InputError(None, f"--fanouts needs {num_layers} positive counts (or -1 = all), "
                               f"one per encoder layer, got {','.join(map(str, fanouts))}")


# ---- reading and probing -------------------------------------------------------------------
def open_export(out: str | os.PathLike) -> dict[str, Any]:
    """The manifest of the complete export ``out``."""
    out = Path(out)
    if not out.is_dir():
        raise InputError(out, "no such embedding export")
    if not (out / SUCCESS_FILE).exists():
        raise InputError(out, "not a complete embedding export (no _SUCCESS); finish it with "
                              "`bgrl-dgl embed`")
    manifest = read_json(out / MANIFEST_FILE)
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise InputError(out / MANIFEST_FILE, f"not a {FORMAT} manifest")
    return manifest


def iter_row_groups(out: Path, manifest: dict[str, Any], lowest: int,
                    highest: int) -> Iterator[pa.Table]:
    """node_id and embedding of every row group whose node_id range meets [lowest, highest]."""
    for part in manifest["parts"]:
        path = out / part["file"]
        try:
            with pq.ParquetFile(path) as file:
                for index in range(file.num_row_groups):
                    stats = file.metadata.row_group(index).column(0).statistics
                    if stats is not None and stats.has_min_max and (
                            stats.max < lowest or stats.min > highest):
                        continue
                    yield file.read_row_group(index, columns=["node_id", "embedding"])
        except (OSError, pa.ArrowException) as err:
            raise InputError(path, f"cannot read Parquet data: {err}") from None


def read_embeddings(out: str | os.PathLike, manifest: dict[str, Any], store: GraphStore,
                    nodes: np.ndarray) -> np.ndarray:
    """Embeddings [M, D] float32 of the store indices ``nodes`` [M], read from the export.

    Only the node_id and embedding columns are read; the rows of other nodes are dropped
    batch by batch. InputError unless every node appears exactly once.
    """
    out = Path(out)
    if manifest["node_id"] == "orig_ids" and store.orig_ids is None:
        raise InputError(store.path, "has no original node ids, but the export is keyed by them")
    keys = nodes if manifest["node_id"] == "store_index" else np.asarray(store.orig_ids[nodes])
    order = np.argsort(keys, kind="stable")
    sorted_keys = keys[order]
    result = np.zeros((nodes.size, int(manifest["dim"])), dtype=np.float32)
    found = np.zeros(nodes.size, dtype=bool)
    if nodes.size == 0:
        return result
    for table in iter_row_groups(out, manifest, int(sorted_keys[0]), int(sorted_keys[-1])):
        ids = table.column("node_id").to_numpy()
        slot = np.minimum(np.searchsorted(sorted_keys, ids), nodes.size - 1)
        hit = sorted_keys[slot] == ids
        if not hit.any():
            continue
        rows = order[slot[hit]]
        if found[rows].any() or np.unique(rows).size != rows.size:
            raise InputError(out, "holds the embedding of some node more than once")
        embedding = table.column("embedding").combine_chunks()
        values = embedding.flatten().to_numpy(zero_copy_only=False).reshape(len(embedding), -1)
        result[rows] = values[hit]
        found[rows] = True
    if not found.all():
        missing = int(keys[np.flatnonzero(~found)[0]])
        raise InputError(out, f"has no embedding for {int((~found).sum())} of the {nodes.size} "
                              f"nodes needed (e.g. node {missing})")
    return result


def evaluate_export(out: str | os.PathLike, data: str | os.PathLike | None = None, *,
                    splits: Literal["public", "random"] = "public", num_splits: int = 20,
                    seed: int = 0) -> dict[str, Any]:
    """Linear probe (BGRL protocol) of the embeddings in the export ``out`` on the labels of
    its store (or ``data``): the store's train/valid/test splits (``public``) or
    ``num_splits`` random stratified 10/10/80 splits. Returns a JSON-ready summary."""
    manifest = open_export(out)
    store = GraphStore.open(data if data is not None else manifest["data"]["path"])
    if store.labels is None:
        raise InputError(store.path, "has no labels to evaluate with")
    labels = np.asarray(store.labels)
    labelled = labels >= 0
    if splits == "public":
        split_ids = {name: np.asarray(store.split(name), dtype=np.int64) for name in SPLIT_NAMES}
        split_ids = {name: ids[labelled[ids]] for name, ids in split_ids.items()}
        nodes = np.unique(np.concatenate(list(split_ids.values())))
    elif splits == "random":
        if num_splits < 1:
            raise InputError(None, f"--num-splits must be positive, got {num_splits}")
        nodes = np.flatnonzero(labelled)
    else:
        raise InputError(None, f"--splits must be public or random, got {splits!r}")
    embeddings = read_embeddings(out, manifest, store, nodes)
    try:
        if splits == "public":
            local = {name: np.searchsorted(nodes, ids) for name, ids in split_ids.items()}
            summary = summarize([linear_probe(embeddings, labels[nodes], local)])
        else:
            summary = random_split_probe(embeddings, labels[nodes], num_splits, seed=seed)
    except ValueError as err:
        raise InputError(store.path, str(err)) from None
    return evaluation_record(manifest, out, store, splits, summary, nodes.size)


def evaluation_record(manifest: dict[str, Any], out: str | os.PathLike, store: GraphStore,
                      splits: str, summary: ProbeSummary, num_labelled: int) -> dict[str, Any]:
    return {
        "embeddings": str(Path(out).resolve()),
        "data": str(store.path.resolve()),
        "encoder": manifest["encoder"],
        "step": manifest["step"],
        "splits": splits,
        "metric": summary.results[0].metric,
        "test_acc_mean": summary.test_mean,
        "test_acc_std": summary.test_std,
        "val_acc_mean": summary.val_mean,
        "val_acc_std": summary.val_std,
        "num_splits": len(summary.results),
        "num_labelled": int(num_labelled),
    }
