"""The annotation job on a local Ray: S3 in and out, corrupt inputs, resume, the real engine end to end."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
import s3fs

import media_factory as mf
from pipeline import storage
from pipeline.annotate import AnnotateConfig, read_rows, run
from pipeline.report import make_report
from tiny_models import build_checkpoint

ROOT = Path(__file__).resolve().parent.parent
GOOD_VIDEOS = {f"clip{i}.mp4": dict(n_frames=12 + 4 * i, width=64 + 16 * i, height=48) for i in range(4)}
BAD = {
    "truncated.mp4": mf.truncated(mf.make_video(n_frames=24)),
    "empty.mp4": b"",
    "notes.mp4": mf.text_as_video(),
    "bomb.png": mf.png_declaring_size(),
}


def corpus_files() -> dict[str, bytes]:
    files = {name: mf.make_video(**kw) for name, kw in GOOD_VIDEOS.items()}
    files["photo.png"] = mf.make_image(80, 60, "PNG")
    files["photo2.jpg"] = mf.make_image(120, 90, "JPEG", seed=1)
    files.update(BAD)
    return files


def write_local_corpus(directory: Path, files: dict[str, bytes]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (directory / name).write_bytes(data)
    return directory


def fake_config(**kw) -> AnnotateConfig:
    base = dict(engine="fake", baseline="none", batch_size=3, frames=6, progress=False, cpus_per_actor=0.5)
    base.update(kw)
    return AnnotateConfig(**base)


def test_s3_corpus_with_corrupt_files_gives_error_rows_and_loses_nothing(ray_local, s3_endpoint, s3_bucket):
    fs = s3fs.S3FileSystem(endpoint_url=s3_endpoint)
    files = corpus_files()
    for name, data in files.items():
        fs.pipe(f"{s3_bucket}/corpus/{name}", data)
    out = f"s3://{s3_bucket}/runs/r1"
    summary = run(fake_config(input=f"s3://{s3_bucket}/corpus/", output=out, endpoint_url=s3_endpoint))

    # Parquet written to the bucket, read back through pyarrow + s3fs.
    written = [p for p in fs.find(f"{s3_bucket}/runs/r1/rows") if p.endswith(".parquet")]
    assert written
    table = pq.read_table(written[0], filesystem=storage.pyarrow_filesystem_for(out, endpoint_url=s3_endpoint)[0])
    assert "kv_keep_ratio" in table.column_names
    df = read_rows(out, {"endpoint_url": s3_endpoint})
    assert len(df) == len(files) and df.clip_id.is_unique
    by_name = {u.rsplit("/", 1)[1]: r for u, r in zip(df.uri, df.to_dict("records"))}
    for name in BAD:
        row = by_name[name]
        assert row["status"] == "error" and row["error_stage"] == "decode" and row["error"], name
    for name, kw in GOOD_VIDEOS.items():
        row = by_name[name]
        assert row["status"] == "ok" and pd.isna(row["error"]), (name, row["error"])
        assert row["kind"] == "video" and row["n_frames"] == 6 and row["text"].endswith("| 6 frames")
        assert row["duration_s"] == pytest.approx(kw["n_frames"] / 12, rel=0.1)
    for name in ("photo.png", "photo2.jpg"):
        assert by_name[name]["status"] == "ok" and by_name[name]["kind"] == "image"
    assert summary["status_counts"] == {"ok": 6, "error": 4}
    assert summary["errors_by_stage"] == {"decode": 4}
    assert fs.exists(f"{s3_bucket}/runs/r1/summary.json")
    assert fs.exists(f"{s3_bucket}/runs/r1/_manifest/manifest.parquet")


def test_progress_line_counts_against_the_planned_total_from_the_start(ray_local, tmp_path, capfd):
    from pipeline.batch.progress import progress_line

    assert progress_line(0, 0, 32, 0.0) == "[meda] progress: 0/32 rows (0%)"
    assert progress_line(12, 1, 32, 30.0) == "[meda] progress: 12/32 rows (38%), 1 error, 0.40 rows/s, ETA 0:00:50"
    assert progress_line(40, 0, 32, 10.0).startswith("[meda] progress: 32/32 rows (100%)")  # clamped
    corpus = write_local_corpus(tmp_path / "corpus", {"a.mp4": mf.make_video(n_frames=12), "b.png": mf.make_image(),
                                                      "empty.mp4": b""})
    capfd.readouterr()
    run(fake_config(input=str(corpus), output=str(tmp_path / "run"), progress=True))
    err = capfd.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("[meda] progress:")]
    assert lines[0] == "[meda] progress: 0/3 rows (0%)"  # the total is known before any row exists
    assert lines[-1].startswith("[meda] progress: 3/3 rows (100%), 1 error")
    assert "Total Progress" not in err


def test_rerun_resumes_without_duplicates(ray_local, tmp_path):
    corpus = write_local_corpus(tmp_path / "corpus", {n: mf.make_video(**kw) for n, kw in GOOD_VIDEOS.items()}
                                | {"photo.png": mf.make_image()})
    out = str(tmp_path / "run")
    first = run(fake_config(input=str(corpus), output=out, limit=2, baseline="full", baseline_sample=1))
    assert first["rows"] == 3  # 2 inputs x meda + 1 baseline row
    before = read_rows(out).set_index("row_id").created_at
    # A job killed while writing leaves a partial file: it is moved aside and its rows are redone.
    rows_dir = Path(out) / "rows"
    good = next(rows_dir.glob("*.parquet"))
    (rows_dir / "killed_mid_write.parquet").write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    second = run(fake_config(input=str(corpus), output=out, baseline="full", baseline_sample=1))
    df = read_rows(out)
    assert second["rows"] == len(df) == 5 + 1
    assert df.row_id.is_unique and df.clip_id.nunique() == 5
    assert (Path(out) / "_partial" / "killed_mid_write.parquet").exists()
    after = df.set_index("row_id").created_at
    assert all(after[r] == before[r] for r in before.index)  # rows of the first run were not redone
    assert second["rows_this_run"] == 3
    assert second["vs_baseline"]["n_pairs"] == 1


def test_resume_after_the_job_is_killed(tmp_path):
    """A real interruption: SIGKILL the job's process group mid-run, then rerun to completion."""
    names = {f"v{i}.mp4": mf.make_video(n_frames=8) for i in range(6)}
    corpus = write_local_corpus(tmp_path / "corpus", names)
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "pipeline.cli", "annotate", "--input", str(corpus), "--output", str(out),
           "--engine", "fake", "--baseline", "none", "--batch-size", "1", "--frames", "4", "--no-progress",
           "--cpus-per-actor", "0.5"]
    env = dict(os.environ, MEDA_FAKE_DELAY_S="1.0", PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and not list((out / "rows").glob("*.parquet")):
            assert proc.poll() is None, "the job ended before it could be interrupted"
            time.sleep(0.5)
        assert list((out / "rows").glob("*.parquet"))
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    partial = len(read_rows(str(out)))
    assert 0 < partial < len(names)
    env["MEDA_FAKE_DELAY_S"] = "0"
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, timeout=300, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    df = read_rows(str(out))
    assert len(df) == len(names) and df.clip_id.is_unique and (df.status == "ok").all()


def test_real_engine_end_to_end_through_ray_data(ray_local, tmp_path):
    ckpt = build_checkpoint("qwen2_vl", tmp_path / "ckpt")
    corpus = write_local_corpus(tmp_path / "corpus", {
        "a.mp4": mf.make_video(n_frames=24, width=112, height=112),
        "b.mp4": mf.make_video(n_frames=16, width=96, height=64),
        "c.png": mf.make_image(112, 84),
        "bad.mp4": b"not a video at all",
    })
    out = str(tmp_path / "run")
    summary = run(AnnotateConfig(input=str(corpus), output=out, model=str(ckpt), method="meda", budget=0.25,
                                 baseline="full", baseline_sample=-1, frames=8, max_new_tokens=6, batch_size=4,
                                 device="cpu", dtype="float32", progress=False, cpus_per_actor=1))
    df = read_rows(out)
    assert len(df) == 8 and df.row_id.is_unique
    ok = df[df.status == "ok"]
    assert len(ok) == 6 and set(df[df.status == "error"].uri.str.rsplit("/", n=1).str[-1]) == {"bad.mp4"}
    meda, full = ok[ok.method == "meda"], ok[ok.method == "full"]
    assert ((meda.kv_keep_ratio - 0.25).abs() < 0.03).all()
    assert (full.kv_keep_ratio == 1.0).all() and (full.kv_bytes_kept == full.kv_bytes_full).all()
    assert (meda.kv_bytes_full.values == full.set_index("clip_id").loc[meda.clip_id].kv_bytes_full.values).all()
    assert all(len(b) == 3 for b in meda.layer_budgets) and (meda.entropy_variant == "paper").all()
    assert (ok.n_generated_tokens > 0).all() and (ok.peak_mem_bytes > 0).all() and (ok.n_visual_tokens > 0).all()
    assert summary["vs_baseline"]["n_pairs"] == 3
    assert 0.7 < summary["vs_baseline"]["kv_memory_saved"] < 0.8
    report = make_report(out)
    report_dir = Path(report).parent
    assert {"kv_by_method.png", "latency.png", "layer_budgets.png", "report.md"} <= {p.name for p in report_dir.iterdir()}
    assert "| meda |" in Path(report).read_text()


def test_manifest_prompts_and_answers_are_used(ray_local, tmp_path):
    corpus = write_local_corpus(tmp_path / "c", {"x.mp4": mf.make_video(n_frames=8), "y.mp4": mf.make_video(n_frames=8)})
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(
        '{"uri": "c/x.mp4", "prompt": "how many ?", "answer": "how many ? | 4 frames"}\n'
        '{"uri": "c/y.mp4", "prompt": "FAIL_PREPARE please", "answer": "x"}\n')
    out = str(tmp_path / "run")
    run(fake_config(input=str(manifest), output=out, frames=4))
    df = read_rows(out).set_index(read_rows(out).uri.str.rsplit("/", n=1).str[-1])
    assert df.loc["x.mp4", "prompt"] == "how many ?" and bool(df.loc["x.mp4", "correct"]) is True
    assert df.loc["y.mp4", "status"] == "error" and df.loc["y.mp4", "error_stage"] == "prepare"
    assert corpus.exists()
