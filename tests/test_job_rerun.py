"""Reruns of the annotation job: configuration fingerprints (refuse, or --new-config kept apart), error rows
retried (and --only-new), inputs whose bytes changed, S3 resume reading rows written after planning,
unreadable local files and directories (as a non-root user), the _partial relocation, and a batch that
kills its worker. All on the fake engine and corpora of a few tiny files."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import s3fs

import media_factory as mf
from pipeline.annotate import AnnotateConfig, RunLayout, plan_run, read_done_rows, read_rows, run
from pipeline.batch.plan import ConfigMismatch

ROOT = Path(__file__).resolve().parent.parent
MODEL0, MODEL1 = str(ROOT / "models" / "needle-s0"), str(ROOT / "models" / "needle-s1")


def cfg(**kw) -> AnnotateConfig:
    base = dict(engine="fake", baseline="none", batch_size=4, frames=4, progress=False, cpus_per_actor=0.5,
                model=MODEL0)
    base.update(kw)
    return AnnotateConfig(**base)


def corpus(directory: Path, n: int = 3, bad: tuple[str, ...] = ()) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (directory / f"v{i}.mp4").write_bytes(mf.make_video(n_frames=8 + i))
    for name in bad:
        (directory / name).write_bytes(b"not a video")
    return directory


def raw_rows(out: str) -> list[dict]:
    rows = []
    for p in sorted(Path(out, "rows").glob("*.parquet")):
        rows += pq.read_table(p, columns=["row_id", "status", "model", "created_at"]).to_pylist()
    return rows


def _names(tasks) -> list[str]:
    """File names of the uris of a plan's tasks (read back from its Parquet shards)."""
    return [u.rsplit("/", 1)[1] for u in tasks.read(["uri"]).column("uri").to_pylist()]


# ------------------------------------------------------------------------------------------ fingerprint


def test_other_configuration_is_refused_or_kept_apart_with_new_config(ray_local, tmp_path, capsys):
    src = corpus(tmp_path / "c", 2)
    out = str(tmp_path / "run")
    first = run(cfg(input=str(src), output=out))
    assert first["rows"] == 2
    run_json = Path(out, "run.json").read_bytes()
    fp = json.loads(run_json)["fingerprint"]
    assert fp["model"] == MODEL0 and fp["budget"] == 0.2 and "window" in fp["compression"]
    assert "code_version" not in fp  # policy: excluded unless --fingerprint-code-version

    # The same command through the CLI: exit 2, one line naming the fields and the way out; nothing written.
    cli = [sys.executable, "-m", "pipeline.cli", "annotate", "--input", str(src), "--output", out,
           "--engine", "fake", "--baseline", "none", "--frames", "4", "--no-progress",
           "--model", MODEL1, "--budget", "0.5"]
    res = subprocess.run(cli, cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert res.returncode == 2, res.stderr
    msg = [ln for ln in res.stderr.splitlines() if "error" in ln]
    assert len(msg) == 1 and "model:" in msg[0] and "budget: 0.2 -> 0.5" in msg[0]
    assert "--output" in msg[0] and "--new-config" in msg[0]
    assert Path(out, "run.json").read_bytes() == run_json
    assert len(raw_rows(out)) == 2

    # --new-config: the new configuration's rows beside the old ones; the table holds the new ones only.
    second = run(cfg(input=str(src), output=out, model=MODEL1, budget=0.5, new_config=True))
    assert second["rows"] == 2 and second["rows_this_run"] == 2 and second["model"] == MODEL1
    df = read_rows(out)
    assert len(df) == 2 and set(df.model) == {MODEL1} and df.row_id.is_unique
    assert (df.kv_keep_ratio == 0.5).all()
    raw = raw_rows(out)
    assert len(raw) == 4 and len({r["row_id"] for r in raw}) == 4  # old and new never share a row id
    assert json.loads(Path(out, "run.json").read_text())["fingerprint"]["model"] == MODEL1
    # And now the first configuration is the other one: refused in turn.
    with pytest.raises(ConfigMismatch, match=r"budget: 0.5 -> 0.2"):
        run(cfg(input=str(src), output=out))
    # A plain rerun of the current configuration is a resume with nothing to do.
    third = run(cfg(input=str(src), output=out, model=MODEL1, budget=0.5))
    assert third["rows_this_run"] == 0 and third["rows"] == 2


# ------------------------------------------------------------------------------------------ error rows


def test_error_rows_are_retried_only_new_skips_them_and_changed_inputs_are_redone(ray_local, tmp_path, capsys):
    src = corpus(tmp_path / "c", 2, bad=("broken.mp4",))
    out = str(tmp_path / "run")
    first = run(cfg(input=str(src), output=out))
    assert first["status_counts"] == {"ok": 2, "error": 1}

    # --only-new: a new input runs, the error row is kept as it is.
    (src / "v9.mp4").write_bytes(mf.make_video(n_frames=8))
    _, tasks, info = plan_run(cfg(input=str(src), output=out, only_new=True))
    assert _names(tasks) == ["v9.mp4"] and info["n_errors_kept"] == 1
    run(cfg(input=str(src), output=out, only_new=True))
    assert read_rows(out).status.value_counts().to_dict() == {"ok": 3, "error": 1}

    # The broken input is repaired: a default rerun retries the error row; the success supersedes it.
    (src / "broken.mp4").write_bytes(mf.make_video(n_frames=8))
    capsys.readouterr()
    again = run(cfg(input=str(src), output=out))
    assert "retrying 1 error row" in capsys.readouterr().err
    assert again["rows_this_run"] == 1 and again["status_counts"] == {"ok": 4}
    df = read_rows(out)
    assert len(df) == 4 and df.row_id.is_unique and (df.status == "ok").all()
    assert sum(r["row_id"] == df[df.uri.str.endswith("broken.mp4")].row_id.iloc[0] for r in raw_rows(out)) == 2

    # An input that succeeded but whose bytes changed since (size/mtime from the listing) is redone.
    before = df.set_index("uri").created_at
    (src / "v0.mp4").write_bytes(mf.make_video(n_frames=20))
    _, tasks, info = plan_run(cfg(input=str(src), output=out))
    assert info["n_changed_inputs"] == 1 and info["n_redone_changed"] == 1 and info["n_retried_errors"] == 0
    assert _names(tasks) == ["v0.mp4"]
    # The plan wrote the manifest; being killed now must not lose the change (rows_version stays stale).
    _, tasks, _ = plan_run(cfg(input=str(src), output=out))
    assert len(tasks) == 1
    run(cfg(input=str(src), output=out))
    after = read_rows(out).set_index("uri").created_at
    changed = [u for u in before.index if after[u] != before[u]]
    assert [u.rsplit("/", 1)[1] for u in changed] == ["v0.mp4"]
    assert plan_run(cfg(input=str(src), output=out))[2]["n_pending"] == 0  # completed: nothing left


# ------------------------------------------------------------------------------------------ S3 resume


@pytest.mark.parametrize("inject_bug", [False, True])
def test_s3_resume_reads_rows_written_after_planning(ray_local, s3_endpoint, s3_bucket, monkeypatch, inject_bug):
    fs = s3fs.S3FileSystem(endpoint_url=s3_endpoint)
    for i in range(3):
        fs.pipe(f"{s3_bucket}/corpus/v{i}.mp4", mf.make_video(n_frames=8))
    c = dict(input=f"s3://{s3_bucket}/corpus/", output=f"s3://{s3_bucket}/runs/r1", endpoint_url=s3_endpoint)
    run(cfg(limit=1, **c))  # the first run, killed after one input (simulated by --limit)
    if inject_bug:  # the bug: a listing cached at plan time is used to read the rows back
        monkeypatch.setattr(s3fs.S3FileSystem, "invalidate_cache", lambda self, path=None: None)
        with pytest.raises((FileNotFoundError, AssertionError)):  # or a wrong summary below
            summary = run(cfg(**c))
            assert summary["rows"] == 3
        return
    summary = run(cfg(**c))
    assert summary["rows"] == 3 and summary["status_counts"] == {"ok": 3} and summary["rows_this_run"] == 2
    saved = json.loads(fs.cat(f"{s3_bucket}/runs/r1/summary.json"))
    assert saved["rows"] == 3


# ------------------------------------------------------------------------------------------ permissions


def test_unreadable_file_and_directory_as_a_non_root_user(request):
    # As root (CI), drop to uid 65534 for the job (root reads anything); a non-root user runs it as itself.
    root = os.geteuid() == 0
    setpriv = shutil.which("setpriv")
    assert setpriv or not root, "setpriv (util-linux) is needed to run this test as root"
    # /tmp itself (pytest's own tmp root is private to root): the dropped uid must reach its files.
    base = Path(tempfile.mkdtemp(prefix="meda-nonroot-", dir="/tmp"))
    request.addfinalizer(lambda: shutil.rmtree(base, ignore_errors=True))
    src = corpus(base / "c", 2)
    (src / "secret.mp4").write_bytes(mf.make_video(n_frames=8))
    (src / "locked").mkdir()
    (src / "locked" / "hidden.mp4").write_bytes(mf.make_video(n_frames=8))
    (base / "home").mkdir()
    if root:
        for p in [base, *base.rglob("*")]:
            os.chown(p, 65534, 65534)
    (src / "secret.mp4").chmod(0)
    (src / "locked").chmod(0)
    out = base / "run"
    drop = [setpriv, "--reuid=65534", "--regid=65534", "--clear-groups"] if root else []
    # The venv's interpreter may live where the uid cannot exec it (pyenv under /root): then the system
    # python of the same version, with the venv's packages on the path (Ray's workers inherit both).
    python, pypath = sys.executable, [str(ROOT)]
    if root and not _executable_by_nobody(python):
        python = shutil.which(f"python{sys.version_info.major}.{sys.version_info.minor}", path="/usr/bin:/usr/local/bin")
        assert python and _executable_by_nobody(python), "no interpreter uid 65534 can run"
        pypath += [p for p in sys.path if p.endswith("site-packages")]
    cmd = [*drop, python, "-m", "pipeline.cli", "annotate", "--input", str(src), "--output", str(out), "--engine", "fake", "--baseline", "none",
           "--frames", "4", "--no-progress", "--cpus-per-actor", "0.5", "--model", MODEL0]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(pypath), HOME=str(base / "home"), RAY_TMPDIR=str(base / "home"),
               TMPDIR=str(base / "home"))
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "could not be listed" in res.stderr and "locked" in res.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rows"] == 3 and summary["status_counts"] == {"ok": 2, "error": 1}
    assert summary["unreadable_dirs"] == 1  # the locked directory, counted where users look
    df = read_rows(str(out))
    secret = df[df.uri.str.endswith("secret.mp4")].iloc[0]
    assert secret.status == "error" and secret.error_stage == "read" and "Permission" in secret.error
    info = json.loads((out / "run.json").read_text())
    assert info["run_id"] == summary["run_id"]


def _executable_by_nobody(path: str) -> bool:
    res = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", path, "-c",
                          "import os, sys; sys.exit(0 if os.access(sys.executable, os.X_OK) else 1)"],
                         capture_output=True)
    return res.returncode == 0


# ------------------------------------------------------------------------------------------ _partial


def test_partial_target_stays_inside_an_output_whose_path_contains_rows(ray_local, tmp_path):
    layout = RunLayout("/data/rows/exp1")
    assert layout.partial_target("/data/rows/exp1/rows/a/b.parquet") == "/data/rows/exp1/_partial/a/b.parquet"
    assert RunLayout("bkt/rows/x").partial_target("bkt/rows/x/rows/f.parquet") == "bkt/rows/x/_partial/f.parquet"
    with pytest.raises(ValueError, match="not under"):
        layout.partial_target("/elsewhere/rows/b.parquet")
    # The old rule (first "/rows/" of the path) would have left the output: the case this test guards.
    assert "/data/rows/exp1/rows/a.parquet".replace("/rows/", "/_partial/", 1) == "/data/_partial/exp1/rows/a.parquet"

    out = tmp_path / "rows" / "exp"
    src = corpus(tmp_path / "c", 1)
    run(cfg(input=str(src), output=str(out)))
    good = next((out / "rows").glob("*.parquet"))
    (out / "rows" / "killed.parquet").write_bytes(good.read_bytes()[:100])
    existing = read_done_rows(cfg(input=str(src), output=str(out)))
    assert existing.moved == 1 and len(existing.status) == 1
    assert (out / "_partial" / "killed.parquet").exists()
    assert not (tmp_path / "_partial").exists()


# ------------------------------------------------------------------------------------------ worker deaths


def test_a_batch_that_kills_its_worker_becomes_error_rows_not_a_loop(ray_local, tmp_path):
    src = corpus(tmp_path / "c", 2)
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"uri": str(src / "v0.mp4"), "prompt": "fine"}) + "\n"
                        + json.dumps({"uri": str(src / "v1.mp4"), "prompt": "KILL_WORKER now"}) + "\n")
    out = str(tmp_path / "run")
    summary = run(cfg(input=str(manifest), output=out, batch_size=1, max_task_retries=1))
    df = read_rows(out).set_index("prompt")
    assert df.loc["KILL_WORKER now", "status"] == "error" and df.loc["KILL_WORKER now", "error_stage"] == "worker"
    # The other batch normally finishes; if Ray had queued it on the same actor when that actor died each
    # time, it is lost with it and is a "worker" error row too (a rerun retries it) -- never a hang.
    fine = df.loc["fine"]
    assert fine["status"] == "ok" or fine["error_stage"] == "worker"
    assert sum(summary["status_counts"].values()) == 2 and summary["status_counts"].get("error", 0) >= 1
