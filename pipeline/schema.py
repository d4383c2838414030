"""The output row of an annotation run: one row per (input, method). The one place that defines it."""

from __future__ import annotations

from typing import Any

import pyarrow as pa

SCHEMA = pa.schema(
    [
        ("row_id", pa.string()),  # clip_id + ":" + method; unique in a run (the resume key)
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
        ("method", pa.string()),
        ("budget", pa.float64()),
        ("entropy_variant", pa.string()),
        ("n_frames", pa.int32()),
        ("n_text_tokens", pa.int32()),
        ("n_visual_tokens", pa.int32()),
        ("n_prompt_tokens", pa.int32()),
        ("n_generated_tokens", pa.int32()),
        ("finish_reason", pa.string()),
        ("kv_bytes_full", pa.int64()),
        ("kv_bytes_kept", pa.int64()),
        ("kv_keep_ratio", pa.float64()),
        ("kv_bytes_allocated", pa.int64()),
        ("layer_budgets", pa.list_(pa.int32())),
        ("layer_entropies", pa.list_(pa.float64())),
        ("prefill_s", pa.float64()),
        ("compress_s", pa.float64()),
        ("decode_s", pa.float64()),
        ("decode_tokens_per_s", pa.float64()),
        ("peak_mem_bytes", pa.int64()),
        ("peak_mem_kind", pa.string()),
        ("batch_size", pa.int32()),
        ("batch_id", pa.string()),  # the engine call this row was answered in
        ("batch_infer_s", pa.float64()),  # wall time of that call (prepare + generate), shared by its rows
        ("decode_media_s", pa.float64()),
        ("media_backend", pa.string()),
        ("source_fps", pa.float64()),
        ("duration_s", pa.float64()),
        ("node", pa.string()),
        ("run_id", pa.string()),
        ("code_version", pa.string()),
        ("created_at", pa.timestamp("ms", tz="UTC")),
    ]
)
COLUMNS = SCHEMA.names


def empty_row(**values: Any) -> dict[str, Any]:
    row = dict.fromkeys(COLUMNS)
    row.update(values)
    return row


def to_table(rows: list[dict[str, Any]]) -> pa.Table:
    return pa.Table.from_pylist([{c: r.get(c) for c in COLUMNS} for r in rows], schema=SCHEMA)


def normalise_answer(text: str | None) -> str:
    """Lower-case words without punctuation, for exact-match scoring."""
    if text is None:
        return ""
    kept = "".join(ch.lower() if ch.isalnum() or ch.isspace() else " " for ch in text)
    return " ".join(kept.split())
