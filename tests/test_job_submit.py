"""`ray job submit` of jobs/annotate.py to a local head node (ray start --head on 127.0.0.1)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

import media_factory as mf
from pipeline.annotate import read_rows

ROOT = Path(__file__).resolve().parent.parent
RAY = str(Path(sys.executable).parent / "ray")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def kill_cluster(temp_dir: str) -> None:
    """Stop only this test's Ray processes (`ray stop` would stop every Ray on the machine)."""
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="ignore")
        except OSError:
            continue
        if temp_dir in cmdline:
            try:
                os.kill(int(pid), signal.SIGKILL)
            except OSError:
                pass


@pytest.fixture
def head_node():
    temp_dir = tempfile.mkdtemp(prefix="rayjob", dir="/tmp")
    port, dash = free_port(), free_port()
    # The job's `python` must be this environment's (on a cluster it is the image's).
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    env = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0", PATH=path)
    # Every port explicit: another Ray on the machine (the test session's own) holds the defaults.
    ports = [f"--{name}={free_port()}" for name in (
        "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "metrics-export-port", "runtime-env-agent-port",
        "ray-client-server-port", "node-manager-port", "object-manager-port")]
    subprocess.run([RAY, "start", "--head", f"--port={port}", "--node-ip-address=127.0.0.1", *ports,
                    "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--num-cpus=4",
                    f"--temp-dir={temp_dir}", "--include-dashboard=true", "--disable-usage-stats"],
                   check=True, env=env, capture_output=True, timeout=180)
    try:
        yield f"http://127.0.0.1:{dash}", env
    finally:
        kill_cluster(temp_dir)


def test_ray_job_submit_succeeds_and_writes_complete_output(head_node, tmp_path):
    address, env = head_node
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(5):
        (corpus / f"c{i}.mp4").write_bytes(mf.make_video(n_frames=10))
    (corpus / "broken.mp4").write_bytes(b"\x00" * 100)
    out = tmp_path / "out"
    submit = [RAY, "job", "submit", "--address", address, "--submission-id", "meda-test-job",
              "--working-dir", str(ROOT), "--runtime-env", str(ROOT / "jobs" / "runtime_env.yaml"),
              "--", "python", "jobs/annotate.py", "--input", str(corpus), "--output", str(out),
              "--engine", "fake", "--baseline", "none", "--frames", "4", "--batch-size", "2", "--no-progress",
              "--cpus-per-actor", "0.5"]
    for _ in range(20):  # the head's job agent takes a while to come up after `ray start`
        proc = subprocess.run(submit, env=env, capture_output=True, text=True, timeout=600)
        if "No available agent" not in proc.stderr:
            break
        time.sleep(2)
    assert proc.returncode == 0, proc.stdout[-6000:]
    from ray.job_submission import JobStatus, JobSubmissionClient

    assert JobSubmissionClient(address).get_job_status("meda-test-job") == JobStatus.SUCCEEDED
    df = read_rows(str(out))
    assert len(df) == 6 and df.clip_id.is_unique
    assert (df.status == "ok").sum() == 5 and df[df.status == "error"].uri.str.endswith("broken.mp4").all()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status_counts"] == {"ok": 5, "error": 1}
