"""The distributed plan (pipeline/batch/partitioned.py) against the driver plan (plan.py): the same manifest,
the same tasks, the same counts, for manifests cut into several chunks and clip-id ranges, with duplicates
across chunks, --limit, the baseline sample, resume (ok / error / other-configuration rows) and inputs whose
bytes changed. Run in-process (the same functions Ray runs) and once through Ray tasks."""

from __future__ import annotations

import random
import shutil
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.batch import partitioned
from pipeline.batch import plan as plan_mod
from pipeline.batch.plan import plan_run, row_id

from test_planning import cfg, write_rows


def _here(fn, calls):
    return [fn(*a) for a in calls]


@pytest.fixture
def small_ranges(monkeypatch):
    """Chunks of ~9 manifest rows, ranges of ~10 inputs: a 60-row manifest gets several of each. In-process
    (a monkeypatched worker function is then seen: Ray's workers would not see it)."""
    monkeypatch.setattr(partitioned, "CHUNK_ROWS", 9)
    monkeypatch.setattr(partitioned, "PARTITION_ROWS", 10)
    monkeypatch.setattr(partitioned, "ROW_FILES_PER_TASK", 2)
    monkeypatch.setattr(partitioned, "_map", _here)


def corpus(tmp_path: Path, n: int = 60, seed: int = 0) -> Path:
    """A Parquet manifest in row groups of 4: clip ids in no order, some missing (derived from the uri), some
    repeated (in another chunk: the first must win), versions, answers, per-input frames."""
    rng = random.Random(seed)
    ids = [f"clip{rng.randrange(10**6):06d}" for _ in range(n)]
    for i in range(0, n, 7):
        ids[i] = ids[rng.randrange(n)]  # duplicates, anywhere
    ids = [None if i % 11 == 3 else c for i, c in enumerate(ids)]
    t = pa.table({"uri": [f"/d/v{i}.mp4" for i in range(n)], "clip_id": ids,
                  "source_version": [f"size={i}" for i in range(n)], "answer": [str(i) for i in range(n)],
                  "frames": [i % 5 or None for i in range(n)]})
    m = tmp_path / "m.parquet"
    pq.write_table(t, m, row_group_size=4)
    return m


def snapshot(manifest, tasks, info):
    keys = ("n_inputs", "n_done_before", "n_pending", "n_retried_errors", "n_changed_inputs", "n_redone_changed",
            "n_errors_kept", "n_partial_moved", "n_other_config_rows", "n_stale_inputs")
    t = tasks.read()
    return {"manifest": manifest.read().to_pylist(), "n_manifest": len(manifest),
            "tasks": sorted(t.to_pylist(), key=lambda r: r["row_id"]), "info": {k: info[k] for k in keys},
            "stale": sorted(manifest.stale.to_pylist()), "needs_finish": manifest.needs_finish}


def both(tmp_path: Path, run_dir: Path, **kw):
    """Plan the same run directory twice, from two copies: on the driver and distributed."""
    out = {}
    for mode in ("driver", "distributed"):
        d = tmp_path / f"run-{mode}"
        if d.exists():
            shutil.rmtree(d)
        if run_dir.exists():
            shutil.copytree(run_dir, d)
        out[mode] = plan_run(cfg(output=str(d), plan=mode, **kw))
        assert out[mode][2]["plan"] == mode
    return out


def _rows_for(out: Path, key: str, manifest) -> None:
    """Rows of a half-done run: ok, error, an error later redone ok, another configuration's, in several files."""
    clips = manifest.read(["clip_id"]).column("clip_id").to_pylist()
    t = time.time()
    for f in range(5):
        rows = []
        for i, c in enumerate(clips[f::5]):
            if i % 3 == 0:
                rows.append((row_id(c, "meda", key), "ok", t))
            elif i % 3 == 1:
                rows.append((row_id(c, "meda", key), "error", t - 5))
                if f % 2:
                    rows.append((row_id(c, "meda", key), "ok", t))  # the later row wins
            rows.append((f"{c}:meda@0123abcd", "ok", t))
        write_rows(out, rows, f"r{f}")


@pytest.mark.parametrize("kw", [dict(), dict(limit=23, baseline="full", baseline_sample=13),
                                dict(baseline="full", baseline_sample=-1, only_new=True)],
                         ids=["plain", "limit+sample", "all-sample+only-new"])
def test_distributed_plan_equals_the_driver_plan(tmp_path, small_ranges, kw):
    m = corpus(tmp_path)
    fresh = both(tmp_path, tmp_path / "none", input=str(m), **kw)
    a, b = snapshot(*fresh["driver"]), snapshot(*fresh["distributed"])
    assert a == b
    info = fresh["distributed"][2]
    assert info["plan_chunks"] >= 5 and info["plan_ranges"] >= 3  # really cut up
    # A half-done run, then inputs whose bytes changed.
    base = tmp_path / "run-driver"
    manifest, _, info = fresh["driver"]
    _rows_for(base, info["config_key"], manifest)
    shutil.copytree(base, tmp_path / "half")
    resumed = both(tmp_path, tmp_path / "half", input=str(m), **kw)
    a, b = snapshot(*resumed["driver"]), snapshot(*resumed["distributed"])
    assert a == b and a["info"]["n_done_before"] > 0 and a["info"]["n_other_config_rows"] > 0
    assert kw.get("only_new") or a["info"]["n_retried_errors"] > 0
    t = pq.read_table(m)
    pq.write_table(t.set_column(2, "source_version", pa.array([f"size={i}" if i % 4 else "new" for i in range(60)])),
                   m, row_group_size=4)
    changed = both(tmp_path, tmp_path / "half", input=str(m), **kw)
    a, b = snapshot(*changed["driver"]), snapshot(*changed["distributed"])
    assert a == b and a["info"]["n_changed_inputs"] > 0


def test_csv_manifest_and_listed_prefix_plan_alike(tmp_path, small_ranges):
    from test_planning import manifest_csv

    for source, kw in ((manifest_csv(tmp_path), dict(limit=3, baseline="full", baseline_sample=1)), (None, {})):
        if source is None:
            media = tmp_path / "media"
            for i in range(25):
                (media / f"s{i % 3}").mkdir(parents=True, exist_ok=True)
                (media / f"s{i % 3}" / f"v{i}.mp4").write_bytes(b"x" * i)
            source = media
        got = both(tmp_path, tmp_path / "none", input=str(source), **kw)
        assert snapshot(*got["driver"]) == snapshot(*got["distributed"])


def test_the_equality_fails_when_ranges_lose_the_clip_id_order(tmp_path, small_ranges, monkeypatch):
    """The invariant the ranges carry: range j's clip ids all sort before range j+1's (so --limit and the
    baseline sample, by rank, are range offsets). Injected bug: rows routed by hash instead of by range."""
    m = corpus(tmp_path)
    kw = dict(input=str(m), limit=23, baseline="full", baseline_sample=13)
    got = both(tmp_path, tmp_path / "none", **kw)
    assert snapshot(*got["driver"]) == snapshot(*got["distributed"])
    real = partitioned.split_by_range

    def by_hash(table, clip, bounds):
        import zlib

        j = pa.array([zlib.crc32(str(c).encode()) % (len(bounds) + 1) for c in clip.to_pylist()])
        import pyarrow.compute as pc

        return [(k, real(table.filter(pc.equal(j, k)), clip.filter(pc.equal(j, k)), [])[0][1])
                for k in range(len(bounds) + 1) if pc.any(pc.equal(j, k)).as_py()]

    monkeypatch.setattr(partitioned, "split_by_range", by_hash)
    got = both(tmp_path, tmp_path / "none", **kw)
    assert snapshot(*got["driver"]) != snapshot(*got["distributed"])


def test_range_bounds_and_split():
    assert partitioned.range_bounds(["b", "a", "c"], 3, rows_per_range=10) == []
    bounds = partitioned.range_bounds([f"{i:03d}" for i in range(100)], 1000, rows_per_range=250)
    assert bounds == ["025", "050", "075"]
    t = pa.table({"x": list(range(6))})
    clip = pa.array(["075", "000", "050", "049", "999", "025"])
    parts = partitioned.split_by_range(t, clip, bounds)
    assert [(j, p.column("x").to_pylist()) for j, p in parts] == [(0, [1]), (1, [5, 3]), (2, [2]), (3, [0, 4])]
    ids = pa.array(["a:b:meda@0123abcd", "c:full", "odd"])
    assert partitioned.clip_of_row_ids(ids).to_pylist() == ["a:b", "c", "odd"]


def test_distributed_lost_rows_match_the_driver_check(tmp_path, small_ranges):
    from pipeline.batch import job

    m = corpus(tmp_path, n=40)
    got = both(tmp_path, tmp_path / "none", input=str(m))
    for mode in ("driver", "distributed"):
        manifest, tasks, info = got[mode]
        assert (tasks.bounds is None) == (mode == "driver")
        out = tmp_path / f"run-{mode}"
        c = cfg(input=str(m), output=str(out), plan=mode)
        t_plan = time.time()
        clips = manifest.read(["clip_id"]).column("clip_id").to_pylist()
        key = info["config_key"]
        for f in range(4):  # every third written since planning; others before (an old row) or never
            write_rows(out, [(row_id(cl, "meda", key), "ok", t_plan + 1 if i % 3 == 0 else t_plan - 3600)
                             for i, cl in enumerate(clips) if i % 4 == f and i % 5], f"w{f}")
        lost = sorted(job._lost_row_ids(c, info, tasks, t_plan).to_pylist())
        expect = sorted(row_id(cl, "meda", key) for i, cl in enumerate(clips) if not (i % 3 == 0 and i % 5))
        assert lost == expect


def test_distributed_plan_in_ray_tasks(ray_local, tmp_path, monkeypatch):
    """The same plan through Ray tasks (the workers import the module themselves: only driver-side sizes are
    changed here)."""
    monkeypatch.setattr(partitioned, "CHUNK_ROWS", 9)
    monkeypatch.setattr(partitioned, "PARTITION_ROWS", 10)
    m = corpus(tmp_path)
    got = both(tmp_path, tmp_path / "none", input=str(m), limit=31, baseline="full", baseline_sample=7)
    assert snapshot(*got["driver"]) == snapshot(*got["distributed"])
    assert got["distributed"][2]["plan_ranges"] >= 3


def test_auto_plans_large_manifests_distributed(tmp_path, monkeypatch):
    m = corpus(tmp_path, n=30)
    monkeypatch.setattr(plan_mod, "DISTRIBUTED_PLAN_ROWS", 31)
    assert not plan_mod.wants_distributed(cfg(input=str(m), output=str(tmp_path / "o")))
    monkeypatch.setattr(plan_mod, "DISTRIBUTED_PLAN_ROWS", 30)
    assert plan_mod.wants_distributed(cfg(input=str(m), output=str(tmp_path / "o")))
    assert not plan_mod.wants_distributed(cfg(input=str(m), output=str(tmp_path / "o"), plan="driver"))
    assert not plan_mod.wants_distributed(cfg(input=str(tmp_path), output=str(tmp_path / "o")))  # a prefix


def test_job_on_s3_with_a_distributed_plan_resumes_exactly_once(ray_local, s3_endpoint, s3_bucket, monkeypatch):
    """The whole job (fake engine) on object storage with ``--plan distributed``: a first run stopped after two
    inputs (--limit), then the rest; every input gets exactly one ok row, the stage directories are gone."""
    import json

    import s3fs

    import media_factory as mf
    from pipeline.annotate import run

    monkeypatch.setattr(partitioned, "CHUNK_ROWS", 2)
    monkeypatch.setattr(partitioned, "PARTITION_ROWS", 2)
    fs = s3fs.S3FileSystem(endpoint_url=s3_endpoint)
    for i in range(5):
        fs.pipe(f"{s3_bucket}/corpus/v{i}.mp4", mf.make_video(n_frames=8))
    buf = pa.BufferOutputStream()
    pq.write_table(pa.table({"uri": [f"v{i}.mp4" for i in range(5)]}), buf, row_group_size=1)
    fs.pipe(f"{s3_bucket}/corpus/manifest.parquet", buf.getvalue().to_pybytes())
    c = dict(input=f"s3://{s3_bucket}/corpus/manifest.parquet", output=f"s3://{s3_bucket}/runs/d1",
             endpoint_url=s3_endpoint, plan="distributed", batch_size=2, cpus_per_actor=0.5)
    first = run(cfg(limit=2, **c))
    assert first["rows"] == 2
    summary = run(cfg(**c))
    assert summary["rows"] == 5 and summary["status_counts"] == {"ok": 5} and summary["rows_this_run"] == 3
    info = json.loads(fs.cat(f"{s3_bucket}/runs/d1/run.json"))
    assert info["plan"] == "distributed" and info["plan_ranges"] >= 2 and info["n_done_before"] == 2
    ids = [r for p in fs.find(f"{s3_bucket}/runs/d1/rows") if p.endswith(".parquet")
           for r in pq.read_table(fs.open(p, "rb"), columns=["row_id"]).column("row_id").to_pylist()]
    assert len(ids) == len(set(ids)) == 5
    assert not fs.exists(f"{s3_bucket}/runs/d1/_plan")
