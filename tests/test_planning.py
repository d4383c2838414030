"""The columnar plan (pipeline/batch/plan.py, storage.build_manifest_table): manifest and tasks as Arrow
tables and Parquet shards, the resume's anti-join, lost tasks. No Ray: plan_run alone, on tiny manifests."""

from __future__ import annotations

import datetime as dt
import json
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.batch import plan as plan_mod
from pipeline.batch.config import AnnotateConfig
from pipeline.batch.layout import RunLayout
from pipeline.batch.plan import plan_run, row_id
from pipeline.schema import SCHEMA

ROOT = Path(__file__).resolve().parent.parent
MODEL = str(ROOT / "models" / "needle-s0")


def cfg(**kw) -> AnnotateConfig:
    base = dict(engine="fake", baseline="none", batch_size=2, frames=4, progress=False, model=MODEL)
    base.update(kw)
    return AnnotateConfig(**base)


def write_rows(out: Path, rows: list[tuple[str, str, float]], name: str) -> None:
    """Synthetic result rows (row_id, status, created_at as epoch seconds) as one row file."""
    given = {"row_id": pa.array([r[0] for r in rows]), "status": pa.array([r[1] for r in rows]),
             "created_at": pa.array([dt.datetime.fromtimestamp(r[2], dt.timezone.utc) for r in rows],
                                    pa.timestamp("us", tz="UTC"))}
    cols = [given[f.name].cast(f.type, safe=False) if f.name in given else pa.nulls(len(rows), f.type)
            for f in SCHEMA]
    (out / "rows").mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_arrays(cols, schema=SCHEMA), out / "rows" / f"{name}.parquet")


def manifest_csv(tmp_path: Path) -> Path:
    m = tmp_path / "m.csv"
    m.write_text("uri,clip_id,prompt,answer,fps,frames,max_new_tokens\n"
                 "/d/c.mp4,c,,007,,,\n"
                 "/d/a.mp4,a,Say a.,x,2.5,,9\n"
                 "/d/b.png,b,,,,3,\n"
                 "/d/a2.mp4,a,duplicate,y,,,\n"  # clip a again: the first one wins
                 "/d/d.mp4,d,,,,,\n")
    return m


def test_columnar_manifest_duplicates_limit_and_per_input_columns(tmp_path):
    out = tmp_path / "run"
    manifest, tasks, info = plan_run(cfg(input=str(manifest_csv(tmp_path)), output=str(out), limit=3,
                                         baseline="full", baseline_sample=1, prompt="Default?"))
    assert info["n_inputs"] == 3 and len(manifest) == 3
    # Shards on disk, read back: sorted by clip id, duplicate dropped (first wins), --limit applied.
    shards = sorted((out / "_manifest" / "manifest.parquet").glob("part-*.parquet"))
    assert shards and pq.read_table(shards[0]).column("clip_id").to_pylist() == ["a", "b", "c"]
    assert manifest.read(["uri"]).column("uri").to_pylist() == ["/d/a.mp4", "/d/b.png", "/d/c.mp4"]
    assert sorted((out / "_plan" / "tasks").glob("part-*.parquet"))
    t = tasks.read().to_pylist()
    key = info["config_key"]
    # Input order, the baseline sample's methods side by side.
    assert [r["row_id"] for r in t] == [row_id("a", "meda", key), row_id("a", "full", key), row_id("b", "meda", key),
                                         row_id("c", "meda", key)]
    a, b, c = t[0], t[2], t[3]
    assert (a["prompt"], a["expected_answer"], a["sample_fps"], a["sample_frames"], a["max_new_tokens"]) == \
        ("Say a.", "x", 2.5, 4, 9)
    assert (b["prompt"], b["expected_answer"], b["sample_fps"], b["sample_frames"], b["kind"]) == \
        ("Default?", None, 0.0, 3, "image")
    assert c["expected_answer"] == "007" and c["max_new_tokens"] == 64 and c["kind"] == "video"  # CSV as text


@pytest.mark.parametrize("baseline_sample", [-1, 0, 2, 10])
def test_methods_match_methods_for(baseline_sample):
    c = cfg(baseline="full", baseline_sample=baseline_sample)
    methods, n_sample = plan_mod._methods(c, 5)
    assert [[methods[0]] + (methods[1:] if i < n_sample else []) for i in range(5)] == [c.methods_for(i)
                                                                                         for i in range(5)]


def _plan_with_rows(tmp_path, **kw):
    """A 4-input run, planned once; rows: a ok, b error, c error then a later ok; d none; plus another config."""
    m = tmp_path / "m.parquet"
    pq.write_table(pa.table({"uri": [f"/d/{c}.mp4" for c in "abcd"], "clip_id": list("abcd"),
                             "source_version": [f"size=1;mtime={c}" for c in "abcd"]}), m)
    out = tmp_path / "run"
    _, _, info = plan_run(cfg(input=str(m), output=str(out)))
    key, t = info["config_key"], time.time()
    write_rows(out, [(row_id("a", "meda", key), "ok", t), (row_id("b", "meda", key), "error", t),
                     (row_id("c", "meda", key), "error", t - 10), ("a:meda@0123abcd", "ok", t)], "r1")
    write_rows(out, [(row_id("c", "meda", key), "ok", t)], "r2")  # c's later row: ok
    return m, out, key


def test_resume_anti_join_retries_errors_skips_done_and_redoes_changed(tmp_path):
    m, out, key = _plan_with_rows(tmp_path)
    _, tasks, info = plan_run(cfg(input=str(m), output=str(out)))
    assert sorted(tasks.read(["clip_id"]).column("clip_id").to_pylist()) == ["b", "d"]
    assert (info["n_done_before"], info["n_retried_errors"], info["n_other_config_rows"]) == (2, 1, 1)
    _, tasks, info = plan_run(cfg(input=str(m), output=str(out), only_new=True))
    assert tasks.read(["clip_id"]).column("clip_id").to_pylist() == ["d"] and info["n_errors_kept"] == 1
    # Input a's bytes changed (its version in the manifest): its ok row is redone.
    pq.write_table(pa.table({"uri": [f"/d/{c}.mp4" for c in "abcd"], "clip_id": list("abcd"),
                             "source_version": ["size=2;mtime=new", "size=1;mtime=b", "size=1;mtime=c",
                                                "size=1;mtime=d"]}), m)
    _, tasks, info = plan_run(cfg(input=str(m), output=str(out)))
    assert sorted(tasks.read(["clip_id"]).column("clip_id").to_pylist()) == ["a", "b", "d"]
    assert info["n_changed_inputs"] == 1 and info["n_redone_changed"] == 1


def _exactly_once(tasks, out: Path, key: str, clips: str) -> None:
    """The invariant: every input gets exactly one ok row per method -- pending = all minus those done."""
    done = {r["row_id"] for f in (out / "rows").glob("*.parquet") for r in pq.read_table(f).to_pylist()
            if r["status"] == "ok"}
    pending = set(tasks.read(["row_id"]).column("row_id").to_pylist())
    every = {row_id(c, "meda", key) for c in clips}
    assert not pending & done and pending | (done & every) == every


def test_exactly_once_invariant_fails_when_the_anti_join_keeps_done_rows(tmp_path, monkeypatch):
    m, out, key = _plan_with_rows(tmp_path)
    _, tasks, _ = plan_run(cfg(input=str(m), output=str(out)))
    _exactly_once(tasks, out, key, "abcd")
    # The injected bug: the anti-join finds no row (done rows are planned again).
    monkeypatch.setattr(plan_mod, "anti_join_status", lambda rid, latest: pa.nulls(len(rid), pa.string()))
    _, tasks, _ = plan_run(cfg(input=str(m), output=str(out)))
    with pytest.raises(AssertionError):
        _exactly_once(tasks, out, key, "abcd")


def test_legacy_run_single_manifest_file_and_clip_method_ids(tmp_path):
    """A run directory from before fingerprints and shards: run.json without config_key, rows `clip:method`,
    one _manifest/manifest.parquet file. Resumed with its own ids; the manifest becomes shards."""
    m = tmp_path / "m.parquet"
    pq.write_table(pa.table({"uri": ["/d/a.mp4", "/d/b.mp4"], "clip_id": ["a", "b"]}), m)
    out = tmp_path / "run"
    c = cfg(input=str(m), output=str(out))
    from dataclasses import asdict

    (out / "_manifest").mkdir(parents=True)
    (out / "run.json").write_text(json.dumps({"run_id": "old", "config": asdict(c)}))
    pq.write_table(pa.table({"clip_id": ["a", "b"], "rows_version": pa.array([None, None], pa.string())}),
                   out / "_manifest" / "manifest.parquet")
    write_rows(out, [("a:meda", "ok", time.time())], "old")
    _, tasks, info = plan_run(c)
    assert tasks.read(["row_id"]).column("row_id").to_pylist() == ["b:meda"] and info["n_done_before"] == 1
    assert (out / "_manifest" / "manifest.parquet").is_dir()


def test_lost_rows_are_found_columnar_and_become_worker_error_rows(tmp_path):
    from pipeline.batch import job

    m = tmp_path / "m.parquet"
    pq.write_table(pa.table({"uri": [f"/d/{c}.mp4" for c in "abc"], "clip_id": list("abc")}), m)
    out = tmp_path / "run"
    c = cfg(input=str(m), output=str(out))
    _, tasks, info = plan_run(c)
    t_plan = time.time()
    write_rows(out, [(row_id("a", "meda", info["config_key"]), "ok", t_plan + 1),
                     (row_id("b", "meda", info["config_key"]), "ok", t_plan - 3600)], "w")  # b: an old row only
    lost = job._lost_row_ids(c, info, tasks, t_plan)
    assert sorted(lost.to_pylist()) == [row_id(x, "meda", info["config_key"]) for x in "bc"]
    again = job._lost_tasks(c, info, tasks, t_plan)
    assert len(again) == 2 and (out / "_plan" / "lost-1").is_dir()
    assert job._rows_for_lost_blocks(c, info, tasks, t_plan) == 2
    errs = pq.read_table(next((out / "rows").glob("worker-errors-*.parquet"))).to_pylist()
    assert {r["clip_id"] for r in errs} == {"b", "c"} and all(r["error_stage"] == "worker" for r in errs)
    assert job._lost_row_ids(c, info, tasks, t_plan).to_pylist() == []


def test_plan_shards_read_by_ray_data_one_batch_per_block(ray_local, tmp_path, monkeypatch):
    """The job's task dataset (job.task_dataset) has one block per --batch-size batch, all tasks once; the check
    fails on a read that gives one block per shard (Ray 2.60's newer Parquet reader ignores the split)."""
    import ray.data

    from pipeline.batch import job

    m = tmp_path / "m.parquet"
    pq.write_table(pa.table({"uri": [f"/d/{i}.mp4" for i in range(7)], "clip_id": [f"c{i}" for i in range(7)]}), m)
    c = cfg(input=str(m), output=str(tmp_path / "run"), batch_size=3)
    _, tasks, _ = plan_run(c)

    def block_rows(ds) -> list[int]:
        ds = ds.materialize()
        assert sorted(r["clip_id"] for r in ds.take_all()) == [f"c{i}" for i in range(7)]
        return sorted((m.num_rows for b in ds.iter_internal_ref_bundles() for m in b.metadata), reverse=True)

    rows = block_rows(job.task_dataset(c, tasks))
    assert len(rows) == 3 and max(rows) <= 3  # ceil(7 / 3) blocks of at most one batch (3 + 2 + 2 here)
    ctx = ray.data.DataContext.get_current()
    real_setattr = type(ctx).__setattr__
    # The injected bug: the newer reader stays on (the job's switch to the read-task datasource is ignored).
    monkeypatch.setattr(type(ctx), "__setattr__",
                        lambda self, k, v: None if k == "use_datasource_v2" else real_setattr(self, k, v))
    real_setattr(ctx, "use_datasource_v2", True)
    try:
        assert block_rows(job.task_dataset(c, tasks)) == [7]
    finally:
        monkeypatch.undo()
        ctx.use_datasource_v2 = False
