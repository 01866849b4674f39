"""The Parquet layout of an embedding export: parts, row groups, schema, reading back.

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
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from bgrl_dgl.errors import InputError
from bgrl_dgl.io import (
    fsync_path,
    read_json,
    temp_path,
)
from bgrl_dgl.progress import progress_bar
from bgrl_dgl.store.reader import GraphStore

FORMAT = "bgrl-dgl-embeddings/1"


INPUTS_FILE = "_inputs.json"


MANIFEST_FILE = "_manifest.json"


SUCCESS_FILE = "_SUCCESS"


PART_NAME = re.compile(r"part-(\d{5,})\.parquet")


ROW_GROUP_BYTES = 64 << 20


ROW_GROUPS_PER_PART = 4


DTYPES = {"float32": (np.float32, pa.float32()), "float16": (np.float16, pa.float16())}


def part_name(index: int) -> str:
    return f"part-{index:05d}.parquet"


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
        num_rows = num_nodes if nodes is None else nodes.size
        return cls(num_rows, nodes, per_part, min(group, per_part))

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
        if self.nodes is None:
            return np.arange(start, end, dtype=np.int64)
        return self.nodes[start:end]

    def rank_parts(self, rank: int, world_size: int) -> list[int]:
        """Rank ``rank``'s block of consecutive parts."""
        return [int(p) for p in np.array_split(np.arange(self.num_parts), world_size)[rank]]


def embedding_schema(dim: int, dtype: str, node_types: bool) -> pa.Schema:
    fields = [pa.field("node_id", pa.int64(), nullable=False)]
    if node_types:
        fields.append(pa.field("node_type", pa.dictionary(pa.int32(), pa.string())))
    fields.append(pa.field("embedding", pa.list_(DTYPES[dtype][1], dim), nullable=False))
    return pa.schema(fields)


def part_is_complete(path: Path, rows: int, schema: pa.Schema) -> bool:
    """Whether ``path`` is a readable part of ``rows`` rows with ``schema``."""
    try:
        metadata = pq.read_metadata(path)
        return metadata.num_rows == rows and metadata.schema.to_arrow_schema().equals(schema)
    except (OSError, pa.ArrowException):
        return False


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


class ParquetPart:
    """One part being written to ``path`` through a temp file, renamed by :meth:`commit`
    once complete and on disk; ``nodes``: the store indices of its rows."""

    def __init__(self, path: Path, store: GraphStore, nodes: np.ndarray, schema: pa.Schema) -> None:
        self.path, self.store, self.nodes, self.schema = path, store, nodes, schema
        self.tmp = temp_path(path)
        self.dtype = schema.field("embedding").type.value_type.to_pandas_dtype()
        dictionary = ["node_type"] if "node_type" in schema.names else False
        self.writer = pq.ParquetWriter(self.tmp, schema, compression="zstd",
                                       use_dictionary=dictionary, write_statistics=["node_id"])

    def write_group(self, start: int, rows: np.ndarray) -> None:
        """Rows ``[start, start + len(rows))`` of the part as one row group."""
        nodes = self.nodes[start:start + rows.shape[0]]
        table = row_group_table(self.store, nodes, rows.astype(self.dtype, copy=False), self.schema)
        self.writer.write_table(table, row_group_size=rows.shape[0])

    def commit(self) -> None:
        self.writer.close()
        fsync_path(self.tmp)
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        try:
            self.writer.close()
        except (OSError, pa.ArrowException):
            pass  # the file goes anyway
        finally:
            self.tmp.unlink(missing_ok=True)


def write_part(path: Path, store: GraphStore, nodes: np.ndarray, rows: np.ndarray,
               schema: pa.Schema, row_group_rows: int) -> None:
    """Write one part to ``path`` through a temp file renamed once complete and on disk."""
    part = ParquetPart(path, store, nodes, schema)
    try:
        for start in range(0, nodes.size, row_group_rows):
            part.write_group(start, rows[start:start + row_group_rows])
        part.commit()
    except BaseException:
        part.abort()
        raise


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
    check_manifest(manifest, out / MANIFEST_FILE)
    return manifest


def _is_count(value: Any, least: int = 0) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


def check_manifest(manifest: dict[str, Any], path: Path) -> None:
    """InputError unless ``manifest`` holds, with the right types, everything that reading
    and probing the export use (a missing or mistyped key must not surface as a traceback)."""
    checks = {
        "dim": lambda v: _is_count(v, 1),
        "dtype": lambda v: v in DTYPES,
        "encoder": lambda v: isinstance(v, str),
        "step": _is_count,
        "node_id": lambda v: v in ("orig_ids", "store_index"),
        "data": lambda v: isinstance(v, dict) and isinstance(v.get("path"), str)
        and _is_count(v.get("num_nodes")) and _is_count(v.get("num_edges")),
        "parts": lambda v: isinstance(v, list) and all(
            isinstance(part, dict) and isinstance(part.get("file"), str)
            and PART_NAME.fullmatch(part["file"]) for part in v),
    }
    missing = [key for key in checks if key not in manifest]
    if missing:
        raise InputError(path, f"lacks {', '.join(missing)}")
    bad = [key for key, ok in checks.items() if not ok(manifest[key])]
    if bad:
        raise InputError(path, f"holds a malformed {', '.join(bad)}")


def check_part_schema(path: Path, schema: pa.Schema, manifest: dict[str, Any]) -> None:
    """InputError unless the part at ``path`` has the node_id and embedding columns the
    manifest describes (int64; fixed_size_list<dtype>[dim])."""
    expected = {"node_id": pa.int64(),
                "embedding": pa.list_(DTYPES[manifest["dtype"]][1], manifest["dim"])}
    for name, kind in expected.items():
        index = schema.get_field_index(name)
        if index < 0:
            raise InputError(path, f"has no {name} column")
        found = schema.field(index).type
        if found != kind:
            raise InputError(path, f"column {name} is {found}, but the manifest says {kind}")


def iter_row_groups(out: Path, manifest: dict[str, Any], lowest: int,
                    highest: int) -> Iterator[pa.Table]:
    """node_id and embedding of every row group whose node_id range meets [lowest, highest]."""
    for part in progress_bar(manifest["parts"], desc="read embeddings", unit="parts"):
        path = out / part["file"]
        try:
            with pq.ParquetFile(path) as file:
                check_part_schema(path, file.schema_arrow, manifest)
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
        if table.column("node_id").null_count or table.column("embedding").null_count:
            raise InputError(out, "holds rows without a node_id or an embedding")
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

