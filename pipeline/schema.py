"""The output row of an annotation run: one row per (input, method). The one place that defines it.

The telemetry columns are not listed here: they are every field of the engine's
`meda_engine.request.Telemetry`, typed from its annotations (`arrow_type`), so a field added there
becomes a column without touching the job."""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any

import pyarrow as pa

from meda_engine.request import Telemetry

# The job's own columns, before and after the engine's telemetry.
JOB_COLUMNS_HEAD: list[tuple[str, pa.DataType]] = [
    ("row_id", pa.string()),  # clip_id:method (clip_id:method@config_key after --new-config); the resume key
    ("clip_id", pa.string()),
    ("uri", pa.string()),
    ("kind", pa.string()),  # video | image
    ("prompt", pa.string()),
    ("text", pa.string()),
    ("status", pa.string()),  # ok | error
    ("error", pa.string()),
    ("error_stage", pa.string()),  # read | decode | prepare | generate
    ("expected_answer", pa.string()),  # from the manifest, when known
    ("correct", pa.bool_()),  # normalised exact match with expected_answer
    ("model", pa.string()),
    ("method", pa.string()),  # from the manifest (error rows too); also a Telemetry field, same value
    ("finish_reason", pa.string()),
]
JOB_COLUMNS_TAIL: list[tuple[str, pa.DataType]] = [
    ("batch_id", pa.string()),  # the engine call this row was answered in
    ("batch_infer_s", pa.float64()),  # wall time of that call (prepare + generate), shared by its rows
    # the model actor's scheduler when the batch ended (continuous batching; null for --batching static)
    ("engine_peak_running", pa.int32()),  # most rows one of its loops decoded together so far
    ("engine_peak_kv_bytes", pa.int64()),  # most KV bytes one loop held (measured storage)
    ("engine_kv_cap_bytes", pa.int64()),  # the actor's KV cap (shared equally by its methods' loops)
    ("engine_preemptions", pa.int64()),  # 0: the scheduler queues instead of preempting
    ("decode_media_s", pa.float64()),
    ("media_backend", pa.string()),
    ("source_fps", pa.float64()),
    ("duration_s", pa.float64()),
    ("node", pa.string()),
    ("run_id", pa.string()),
    ("code_version", pa.string()),
    ("created_at", pa.timestamp("ms", tz="UTC")),
]

_SCALARS: dict[Any, pa.DataType] = {float: pa.float64(), str: pa.string(), bool: pa.bool_()}


def arrow_type(name: str, hint: Any) -> pa.DataType:
    """The Parquet column type of a Telemetry field's annotation. ``X | None`` is X (every column is
    nullable); ``float | int`` is float64; ``int`` is int64 for byte counts, int32 for other counts;
    ``list[int]`` / ``list[float]`` are lists of int32 / float64."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        if set(args) == {float, int}:
            return pa.float64()
        if len(args) == 1:
            return arrow_type(name, args[0])
    elif typing.get_origin(hint) is list and len(args) == 1:
        if args[0] is int:
            return pa.list_(pa.int32())
        if args[0] is float:
            return pa.list_(pa.float64())
    elif hint is int:
        return pa.int64() if "bytes" in name else pa.int32()
    elif hint in _SCALARS:
        return _SCALARS[hint]
    raise TypeError(f"Telemetry field {name!r} has type {hint!r}, which has no Parquet column type: "
                    "extend pipeline.schema.arrow_type")


def telemetry_columns(telemetry_cls: type | None = None) -> list[tuple[str, pa.DataType]]:
    """(name, type) of every field of the engine's `Telemetry`, in its order."""
    cls = telemetry_cls or Telemetry
    hints = typing.get_type_hints(cls)
    return [(f.name, arrow_type(f.name, hints[f.name])) for f in dataclasses.fields(cls)]


def build_schema(telemetry_cls: type | None = None) -> pa.Schema:
    """The row schema: the job's columns with every Telemetry field in between. A Telemetry field
    that is also a job column (``method``) must agree on the type and appears once."""
    head = dict(JOB_COLUMNS_HEAD)
    tail = dict(JOB_COLUMNS_TAIL)
    tele = []
    for name, typ in telemetry_columns(telemetry_cls):
        job_typ = head.get(name, tail.get(name))
        if job_typ is None:
            tele.append((name, typ))
        elif job_typ != typ:
            raise TypeError(f"Telemetry field {name!r} ({typ}) clashes with the job's column type {job_typ}")
    return pa.schema(JOB_COLUMNS_HEAD + tele + JOB_COLUMNS_TAIL)


SCHEMA = build_schema()
TELEMETRY_COLUMNS = [name for name, _ in telemetry_columns()]
COLUMNS = SCHEMA.names


def empty_row(**values: Any) -> dict[str, Any]:
    row = dict.fromkeys(COLUMNS)
    row.update(values)
    return row


def telemetry_values(telemetry: Telemetry) -> dict[str, Any]:
    """A Telemetry's values for a row: its ``to_dict()`` restricted to the schema's columns."""
    cols = set(COLUMNS)
    return {k: v for k, v in telemetry.to_dict().items() if k in cols}


def to_table(rows: list[dict[str, Any]]) -> pa.Table:
    return pa.Table.from_pylist([{c: r.get(c) for c in COLUMNS} for r in rows], schema=SCHEMA)


def normalise_answer(text: str | None) -> str:
    """Lower-case words without punctuation, for exact-match scoring."""
    if text is None:
        return ""
    kept = "".join(ch.lower() if ch.isalnum() or ch.isspace() else " " for ch in text)
    return " ".join(kept.split())
