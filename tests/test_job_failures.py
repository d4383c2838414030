"""Failures of machines, not only of files (issue 13, item 4), on Ray's multi-node harness.

Each scenario runs in its own process (tests/cluster_scenarios.py): a `ray.cluster_utils.Cluster`
with a head and two worker nodes as separate raylets, the annotation job on the fake engine.
"""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

import media_factory as mf
from pipeline.annotate import read_rows

ROOT = Path(__file__).resolve().parent.parent
N_CLIPS = 12
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("corpus")
    for i in range(N_CLIPS):
        (d / f"v{i:02d}.mp4").write_bytes(mf.make_video(n_frames=6 + i % 3))
    return d


def scenario(name: str, corpus: Path, out: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "cluster_scenarios.py"), name, str(corpus), str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    lines = [ln[ln.index("RESULT {") + 7:] for ln in proc.stdout.splitlines() if "RESULT {" in ln]
    assert lines, f"the scenario printed no result (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return json.loads(lines[-1])


def raw_row_count(out: Path) -> int:
    return sum(pq.read_table(f).num_rows for f in glob.glob(str(out / "rows" / "*.parquet")))


def test_a_worker_node_killed_mid_job(corpus, tmp_path):
    """The node hosting a model actor is removed after the first rows are written: the job finishes
    and every input has exactly one row (one method: baseline none)."""
    out = tmp_path / "run"
    r = scenario("node-kill", corpus, out)
    assert r["ok"], r["error"]
    assert r["killed"].get("node_id"), "the node was never killed: the scenario did not test anything"
    assert 1 <= r["killed"]["rows_before"] < N_CLIPS
    df = read_rows(str(out))
    assert len(df) == N_CLIPS and df.clip_id.is_unique and (df.status == "ok").all()
    assert json.loads((out / "summary.json").read_text())["rows"] == N_CLIPS


def test_a_model_actor_killed_mid_batch_is_restarted_and_its_batch_retried(corpus, tmp_path):
    """The actor's process exits inside generate (once): Ray restarts it and retries the batch; no
    row is lost and none is written twice."""
    out = tmp_path / "run"
    r = scenario("actor-kill", corpus, out)
    assert r["ok"], r["error"]
    assert (tmp_path / "crashed-once").exists(), "no actor was killed: the scenario did not test anything"
    df = read_rows(str(out))
    assert len(df) == N_CLIPS and df.clip_id.is_unique and (df.status == "ok").all()
    assert raw_row_count(out) == N_CLIPS  # the killed batch was written once, by its retry


def test_a_job_that_cannot_make_progress_fails_fast_with_the_reason(corpus, tmp_path):
    """Every model actor fails to start: the job ends within a bounded time with the actor's error,
    instead of hanging."""
    out = tmp_path / "run"
    r = scenario("no-progress", corpus, out)
    assert not r["ok"]
    assert "the checkpoint cannot be loaded (injected)" in r["error"]
    assert r["wall_s"] < 120, r["wall_s"]
    assert raw_row_count(out) == 0
