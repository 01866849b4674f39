"""Claiming an export directory and completing it: ``_inputs.json`` records what is being
exported (a rerun with the same inputs keeps the complete parts), ``_manifest.json`` then
``_SUCCESS`` mark a complete export (see export.py)."""
from __future__ import annotations

import json
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from bgrl_dgl.embeddings.parquet import (
    INPUTS_FILE,
    MANIFEST_FILE,
    PART_NAME,
    SUCCESS_FILE,
    PartLayout,
    part_is_complete,
    part_name,
)
from bgrl_dgl.errors import InputError
from bgrl_dgl.io import TEMP_NAME, file_sha256, read_json, temp_path, write_atomic


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
            raise InputError(out, "exists and is not an embedding export; refusing to write "
                                  "into it")
    out.mkdir(parents=True, exist_ok=True)
    publish_inputs(out, inputs)


def publish_inputs(out: Path, inputs: dict[str, Any]) -> None:
    """Write ``_inputs.json`` unless present; if another process wrote it first (another
    rank), it must record the same inputs."""
    path = out / INPUTS_FILE
    tmp = temp_path(path)
    tmp.write_text(json.dumps(inputs, indent=1) + "\n", encoding="utf-8")
    try:
        os.link(tmp, path)  # fails if the file exists: the first writer wins
    except FileExistsError:
        if read_json(path) != inputs:
            raise InputError(out, "another process is writing an export of other inputs "
                                  "here") from None
    finally:
        tmp.unlink(missing_ok=True)


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


def layout_rows(layout: PartLayout, parts: list[int]) -> int:
    """The number of rows of ``parts``."""
    return sum(layout.rows(p)[1] - layout.rows(p)[0] for p in parts)


def part_complete(out: Path, layout: PartLayout, part: int, schema: Any) -> bool:
    """Whether part ``part`` of ``out`` is written and complete."""
    start, end = layout.rows(part)
    return part_is_complete(out / part_name(part), end - start, schema)


def parts_to_compute(out: Path, inputs: dict[str, Any], layout: PartLayout, mine: list[int],
                     schema: Any, overwrite: bool) -> list[int]:
    """Which of the parts ``mine`` the export will compute (read-only: before
    :func:`claim_output`): those missing from an unfinished export of the same inputs,
    else all of them."""
    recorded = out / INPUTS_FILE
    keeps_parts = (recorded.is_file() and read_json(recorded) == inputs
                   and not (overwrite and (out / SUCCESS_FILE).exists()))
    if not keeps_parts:
        return list(mine)
    return [p for p in mine if not part_complete(out, layout, p, schema)]
