"""The Parquet row's telemetry columns come from the engine's `Telemetry` dataclass: every field is a
column, a real engine Telemetry round-trips through the job's row and `to_table`, and a field added
to Telemetry becomes a column without touching the pipeline."""

from __future__ import annotations

import dataclasses

import pyarrow as pa
import pytest
import torch

from meda_engine import CompressionConfig, Engine, GenerationConfig, Request
from meda_engine.request import Result, Telemetry
from pipeline import schema
from pipeline.batch.stages import Annotator
from tiny_models import build_checkpoint

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    eng = Engine.from_pretrained(str(build_checkpoint("llama", tmp_path_factory.mktemp("ckpt") / "llama", seed=1)),
                                 device="cpu", dtype="float32")
    reqs = [Request(prompt="what colour is the circle and how many squares are there ?",
                    compression=CompressionConfig(method, budget=0.5), generation=GenerationConfig(max_new_tokens=n))
            for method, n in (("meda", 5), ("full", 1))]
    return eng.generate(reqs)


def _row_for(result: Result, fill=Annotator._fill) -> dict:
    row = schema.empty_row(row_id="c:m", clip_id="c", method=result.telemetry.method, status="ok")
    fill(row, result)
    return schema.to_table([row]).to_pylist()[0]


def _mismatches(result: Result, fill=Annotator._fill) -> set[str]:
    out = _row_for(result, fill)
    return {k for k, v in result.telemetry.to_dict().items() if out.get(k) != v}


def test_every_telemetry_field_is_a_column_with_its_type():
    names = [f.name for f in dataclasses.fields(Telemetry)]
    assert set(names) <= set(schema.COLUMNS)
    for must in ("device", "dtype", "queue_wait_s", "time_to_first_token_s", "time_per_output_token_s", "e2e_s",
                 "kv_bytes_held"):
        assert must in schema.COLUMNS
    t = schema.SCHEMA
    assert t.field("kv_bytes_full").type == pa.int64() and t.field("n_prompt_tokens").type == pa.int32()
    assert t.field("budget").type == pa.float64() and t.field("device").type == pa.string()
    assert t.field("layer_budgets").type == pa.list_(pa.int32())
    assert t.field("layer_entropies").type == pa.list_(pa.float64())
    # The job's own columns stay explicit, and column names the summary / report use are kept.
    for job in ("row_id", "clip_id", "uri", "status", "error", "batch_id", "node", "created_at", "decode_tokens_per_s"):
        assert job in schema.COLUMNS
    assert len(schema.COLUMNS) == len(set(schema.COLUMNS))  # method (job + Telemetry) appears once


def test_real_telemetry_round_trips_through_the_row(results):
    meda, one_token = results
    assert meda.telemetry.time_per_output_token_s > 0 and one_token.telemetry.n_generated_tokens == 1
    for r in results:
        assert _mismatches(r) == set()
        row = _row_for(r)
        assert row["device"] == "cpu" and row["dtype"] == "float32" and row["text"] == r.text


def test_a_hand_copied_fill_is_caught(results):
    """The old `_fill` copied fields by hand and dropped device, dtype and the scheduler's fields."""

    def legacy_fill(row, result):
        t = result.telemetry
        row.update({k: getattr(t, k) for k in ("method", "budget", "n_prompt_tokens", "kv_bytes_kept", "decode_s")},
                   text=result.text, finish_reason=result.finish_reason)

    missed = _mismatches(results[0], legacy_fill)
    assert {"device", "dtype", "queue_wait_s", "time_per_output_token_s", "kv_bytes_held"} <= missed


def test_a_new_telemetry_field_becomes_a_column(monkeypatch, results):
    Extended = dataclasses.make_dataclass(
        "Extended", [("spec_accept_rate", float, dataclasses.field(default=0.0)),
                     ("draft_lens", list[int] | None, dataclasses.field(default=None))], bases=(Telemetry,))
    assert "spec_accept_rate" not in schema.COLUMNS
    monkeypatch.setattr(schema, "Telemetry", Extended)
    built = schema.build_schema()
    assert built.field("spec_accept_rate").type == pa.float64()
    assert built.field("draft_lens").type == pa.list_(pa.int32())
    # With the schema rebuilt, the job's fill writes the new field without any pipeline edit.
    monkeypatch.setattr(schema, "SCHEMA", built)
    monkeypatch.setattr(schema, "COLUMNS", built.names)
    base = results[0]
    tele = Extended(**base.telemetry.to_dict(), spec_accept_rate=0.75, draft_lens=[3, 4])
    res = Result(base.request_id, base.text, base.token_ids, base.finish_reason, tele)
    row = _row_for(res)
    assert row["spec_accept_rate"] == 0.75 and row["draft_lens"] == [3, 4]
    assert _mismatches(res) == set()


def test_a_field_type_without_a_column_type_is_a_clear_error(monkeypatch):
    Bad = dataclasses.make_dataclass("Bad", [("blob", dict, dataclasses.field(default_factory=dict))],
                                     bases=(Telemetry,))
    monkeypatch.setattr(schema, "Telemetry", Bad)
    with pytest.raises(TypeError, match="'blob'.*no Parquet column type"):
        schema.build_schema()
