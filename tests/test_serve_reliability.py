"""Reliability of the endpoint (issue 14): a poison request fails alone, a disconnect frees the engine,
media fetches obey one deadline, decoding is bounded in pixels, and auth fails closed.

The model-loop tests drive `pipeline.serve.model.ModelServer` in-process (the replica's logic without
Serve) on a tiny random Qwen2-VL checkpoint; the media tests need no model; the cluster test runs the
documented recipe (`ray start --head`, then `meda serve --ray-address`) in subprocesses.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import requests
import torch

from tiny_models import build_checkpoint

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------- model loop
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return build_checkpoint("qwen2_vl", tmp_path_factory.mktemp("reliability") / "qwen2_vl", seed=1)


@pytest.fixture(scope="module")
def server(checkpoint):
    from pipeline.serve.model import ModelServer
    from pipeline.serve.settings import ServeSettings

    s = ServeSettings(model=str(checkpoint), device="cpu", dtype="float32", max_num_seqs=8, max_prompt_tokens=300)
    srv = ModelServer(s)
    yield srv
    srv.loop.shutdown()


def text_request(question: str, max_tokens: int = 6, **compression):
    from meda_engine import CompressionConfig, GenerationConfig, Request

    return Request(prompt=question, generation=GenerationConfig(max_new_tokens=max_tokens),
                   compression=CompressionConfig(**({"method": "snapkv", "budget": 0.5} | compression)))


QUESTIONS = ["what colour is the circle ?", "how many squares ?", "describe the video .", "which shape is red ?"]


async def collect(server, request):
    from pipeline.serve.model import EngineFailure

    text = ""
    try:
        async for events in server.events(request):
            for e in events:
                text += e.delta
                if e.result is not None:
                    return "ok", e.result.text
    except EngineFailure as e:
        return "failed", str(e)
    return "no result", text


def test_a_poison_request_fails_alone_and_its_batch_mates_finish(server, monkeypatch):
    alone = {q: asyncio.run(collect(server, text_request(q))) for q in QUESTIONS}
    assert all(status == "ok" for status, _ in alone.values())

    poison = text_request("what colour is the circle ?")
    real_prefill = server.engine.prefill_rows
    real_decode = server.engine.decode_rows

    def prefill_rows(batch, *args, **kwargs):
        if any(p.request.request_id == poison.request_id for p in batch):
            raise RuntimeError("poisoned prefill")
        return real_prefill(batch, *args, **kwargs)

    monkeypatch.setattr(server.engine, "prefill_rows", prefill_rows)

    async def batch():
        requests_ = [text_request(q) for q in QUESTIONS]
        return await asyncio.gather(collect(server, poison), *[collect(server, r) for r in requests_])

    outcomes = asyncio.run(batch())
    assert outcomes[0][0] == "failed" and "poisoned" in outcomes[0][1]
    assert [o for o in outcomes[1:]] == [alone[q] for q in QUESTIONS]  # batch-mates: as if alone
    assert server.suspect and server.stats()["loop_alive"]

    # A failure inside a batched decode step, too: it is rolled back and retried row by row.
    steps = {"n": 0}

    def decode_rows(caches, tokens, positions):
        steps["n"] += 1
        if steps["n"] == 2:
            raise RuntimeError("one bad step")
        return real_decode(caches, tokens, positions)

    monkeypatch.setattr(server.engine, "prefill_rows", real_prefill)
    monkeypatch.setattr(server.engine, "decode_rows", decode_rows)
    outcomes = asyncio.run(_batch_of(server, QUESTIONS))
    assert sum(status == "ok" for status, _ in outcomes) >= len(QUESTIONS) - 1
    monkeypatch.setattr(server.engine, "decode_rows", real_decode)

    # The health check probes after a failure: a healthy engine passes and clears the flag.
    asyncio.run(server.check_health())
    assert not server.suspect


async def _batch_of(server, questions):
    return await asyncio.gather(*[collect(server, text_request(q)) for q in questions])


def test_a_health_probe_that_fails_marks_the_replica_unhealthy(server, monkeypatch):
    server.suspect = True

    def broken(*args, **kwargs):
        raise RuntimeError("device lost")

    monkeypatch.setattr(server.engine, "prefill_rows", broken)
    with pytest.raises(RuntimeError, match="probe"):
        asyncio.run(server.check_health())


def test_a_disconnect_frees_the_engine_within_a_step_or_two(server):
    """A caller that stops listening (Serve cancels the replica call on a disconnect) cancels the
    request: its row leaves the running set and its KV bytes return, while the engine goes on."""

    async def abandon():
        long = text_request("describe the video .", max_tokens=200, method="full")
        stream = server.events(long)
        assert await stream.__anext__() == []  # accepted
        await stream.__anext__()  # the first token arrived: it is decoding
        await stream.aclose()  # the client went away
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            stats = server.stats()
            if stats["running"] == 0 and stats["kv_bytes_in_use"] == 0:
                return stats
            await asyncio.sleep(0.01)
        return server.stats()

    before = server.stats()
    stats = asyncio.run(abandon())
    assert stats["running"] == 0 and stats["kv_bytes_in_use"] == 0, stats
    assert stats["cancelled"] == before["cancelled"] + 1
    assert stats["steps"] - before["steps"] < 20  # stopped long before its 200 tokens
    # and a short request afterwards is served at once
    t0 = time.perf_counter()
    assert asyncio.run(collect(server, text_request("how many squares ?", max_tokens=2)))[0] == "ok"
    assert time.perf_counter() - t0 < 10


# ---------------------------------------------------------------------------------------- fetch deadline
class _Trickle(threading.Thread):
    """An HTTP server on 127.0.0.1 that sends headers at once, then one body byte every ``every_s``."""

    def __init__(self, every_s: float):
        super().__init__(daemon=True)
        self.every_s = every_s
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.port = self.sock.getsockname()[1]
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            conn.recv(65536)
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\nContent-Type: image/png\r\n\r\n")
            while not self.stop.is_set():
                conn.sendall(b"x")
                time.sleep(self.every_s)
        except OSError:
            pass
        finally:
            conn.close()


def test_a_trickled_body_fails_at_the_fetch_deadline():
    from pipeline.fetch import FetchError, MediaPolicy, fetch

    srv = _Trickle(every_s=0.2)
    srv.start()
    policy = MediaPolicy(allowed_schemes=("http",), allowed_hosts=("127.0.0.1",), allow_private_networks=True,
                         timeout_s=1.5)
    try:
        t0 = time.monotonic()
        with pytest.raises(FetchError, match="fetch timeout"):
            fetch(f"http://127.0.0.1:{srv.port}/slow.png", policy)
        elapsed = time.monotonic() - t0
    finally:
        srv.stop.set()
        srv.sock.close()
    # each byte arrives well within the timeout, so only a deadline over the whole body stops it
    assert 1.4 < elapsed < 3.0, elapsed


# ---------------------------------------------------------------------------------------- pixel budget
def _png(width: int, height: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 30)).save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def _data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


_AMPLIFY = textwrap.dedent("""
    import asyncio, base64, io, json, resource, sys, time
    from PIL import Image
    sys.path.insert(0, {repo!r})
    from pipeline.fetch import MediaItem, MediaLoader, MediaPolicy, MediaLoadError, VideoPlan

    def png(w, h):
        buf = io.BytesIO(); Image.new("RGB", (w, h), (200, 30, 30)).save(buf, format="PNG"); return buf.getvalue()

    big = "data:image/png;base64," + base64.b64encode(png(9000, 9000)).decode()
    body_bytes = 8 * len(big)
    loader = MediaLoader(MediaPolicy(), max_pixels=None, max_request_pixels={per_request},
                         max_pixels_in_flight={in_flight}, decode_concurrency=2, fetch_threads=4, decode_timeout_s=60)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    async def main():
        t0 = time.perf_counter()
        try:
            async with loader.load([MediaItem("image", big)] * 8, VideoPlan(None, None, 8)) as media:
                outcome = "decoded %d" % len(media)
        except MediaLoadError as e:
            outcome = "%d %s" % (e.status, e.code)
        return outcome, time.perf_counter() - t0
    outcome, seconds = asyncio.run(main())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({{"outcome": outcome, "seconds": seconds, "rss_growth_mb": (peak - base) / 1024,
                      "body_mb": body_bytes / 2**20, "budget_peak": loader.budget.peak}}))
""")


def _amplify(per_request: int, in_flight: int) -> dict:
    code = _AMPLIFY.format(repo=str(REPO), per_request=per_request, in_flight=in_flight)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_pixel_amplification_is_refused_before_decoding_under_a_memory_bound():
    """Eight 9000x9000 PNGs (81 MP each, under the 89.5 MP bomb limit) in a small body: refused from
    their headers (413), without the ~2 GB their pixels would take, and fast."""
    r = _amplify(per_request=64_000_000, in_flight=128_000_000)
    assert r["outcome"] == "413 too_many_pixels", r
    assert r["body_mb"] < 8, r
    assert r["rss_growth_mb"] < 150 and r["budget_peak"] == 0, r
    assert r["seconds"] < 20, r


def test_the_process_budget_serialises_big_decodes():
    """With room for one big image at a time, 8 of them decode one after another: the budget's high
    water mark never exceeds it, and the process holds about one image's pixels, not eight."""
    pixels = 9000 * 9000
    r = _amplify(per_request=8 * pixels, in_flight=8 * pixels)
    assert r["outcome"] == "decoded 8" and r["budget_peak"] == 8 * pixels, r  # one reservation per request

    from meda_engine.media import PixelBudget

    budget = PixelBudget(100)
    held, peak = [], []

    def worker(n):
        budget.acquire(n, timeout_s=10)
        peak.append(budget.in_use)
        time.sleep(0.01)
        budget.release(n)

    threads = [threading.Thread(target=worker, args=(40,)) for _ in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert max(peak) <= 100 and budget.peak <= 100 and budget.in_use == 0
    with pytest.raises(ValueError):
        budget.acquire(101)
    budget.acquire(100)
    from meda_engine.media import PixelBudgetTimeout

    with pytest.raises(PixelBudgetTimeout):
        budget.acquire(1, timeout_s=0.05)


def test_jpeg_decode_pixels_count_the_draft_downscale():
    from PIL import Image

    from meda_engine import media

    buf = io.BytesIO()
    Image.new("RGB", (4000, 3000), (10, 200, 10)).save(buf, format="JPEG")
    jpeg = buf.getvalue()
    png = _png(4000, 3000)
    assert media.image_decode_pixels(png, max_pixels=1_000_000) == 12_000_000  # PNG decodes at full size
    n = media.image_decode_pixels(jpeg, max_pixels=1_000_000)
    assert 1_000_000 <= n <= 12_000_000 // 4  # JPEG: the decoder scales while decoding
    out = media.decode_image(jpeg, max_pixels=1_000_000)
    assert out.shape[0] * out.shape[1] <= 1_000_000


# ---------------------------------------------------------------------------------------- auth
def test_api_keys_resolve_on_the_building_side_and_fail_closed(monkeypatch):
    from pipeline.serve.settings import APIKeys, ServeSettings

    s = ServeSettings(model="m", api_key_env="MEDA_TEST_KEY")
    assert s.resolve_api_keys({"MEDA_TEST_KEY": "a, b"}).keys == ("a", "b")
    assert s.resolve_api_keys({}).keys == ()
    with pytest.raises(ValueError, match="no API key"):
        ServeSettings(model="m", api_key_env="MEDA_TEST_KEY", require_api_key=True).resolve_api_keys({})
    with pytest.raises(ValueError):
        APIKeys((), required=True)
    assert "a" not in repr(APIKeys(("a",), required=True))


# ---------------------------------------------------------------------------------------- the cluster recipe
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for(fn, timeout_s: float, every_s: float = 0.5):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            value = fn()
            if value:
                return value
        except requests.RequestException:
            pass
        time.sleep(every_s)
    return None


def _kill_cluster(temp_dir: Path) -> None:
    """SIGKILL the processes whose command line names this cluster's temp dir, by pid."""
    mine = str(temp_dir)
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if mine in cmdline:
            try:
                os.kill(int(entry.name), signal.SIGKILL)
            except OSError:
                pass


@pytest.mark.slow
def test_cluster_recipe_with_the_key_on_the_launching_side_only(checkpoint, tmp_path):
    """docs/serving.md: `ray start --head`, then `meda serve --ray-address ...` from the repo root with
    a relative --model and MEDA_API_KEY set only in meda serve's shell. Ray's default token auth is on
    (RAY_AUTH_MODE unset). The replicas never see the key, yet auth holds; Ctrl-C deletes the app.
    A model the replicas cannot load makes `meda serve` exit non-zero with the replica's error."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_AUTH", "MEDA_API"))}
    env.update(HOME=str(tmp_path), RAY_USAGE_STATS_ENABLED="0", PYTHONPATH=str(REPO))
    ray_bin = str(Path(sys.executable).with_name("ray"))
    gcs_port, http_port = _free_port(), _free_port()
    temp_dir = Path("/tmp") / f"rayh4{os.getpid()}"
    ports = [f"--{flag}={_free_port()}" for flag in ("dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                                                     "metrics-export-port", "runtime-env-agent-port")]
    subprocess.run([ray_bin, "start", "--head", f"--port={gcs_port}", "--num-cpus=4", "--include-dashboard=false",
                    f"--temp-dir={temp_dir}", "--disable-usage-stats", *ports], env=env, check=True,
                   capture_output=True, timeout=120)
    serve_proc = None
    try:
        rel_model = os.path.relpath(checkpoint, REPO)  # relative to where meda serve runs
        launch_env = {**env, "MEDA_API_KEY": "launch-side-key"}
        cmd = [sys.executable, "-m", "pipeline.cli", "serve", "--model", rel_model, "--device", "cpu",
               "--dtype", "float32", "--num-gpus", "0", "--port", str(http_port),
               "--ray-address", f"127.0.0.1:{gcs_port}"]
        serve_proc = subprocess.Popen(cmd, cwd=REPO, env=launch_env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True)
        base = f"http://127.0.0.1:{http_port}"
        ok = _wait_for(lambda: requests.get(f"{base}/health", timeout=5).status_code == 200, 180)
        if not ok:
            serve_proc.send_signal(signal.SIGINT)
            pytest.fail("meda serve never became healthy:\n" + serve_proc.communicate(timeout=60)[0][-4000:])
        chat = {"model": rel_model, "max_tokens": 2, "messages": [{"role": "user", "content": "what ?"}]}
        assert requests.get(f"{base}/v1/models", timeout=10).status_code == 401
        assert requests.get(f"{base}/openapi.json", timeout=10).status_code == 401
        assert requests.get(f"{base}/docs", timeout=10).status_code == 401
        assert requests.post(f"{base}/v1/chat/completions", json=chat, timeout=30).status_code == 401
        auth = {"Authorization": "Bearer launch-side-key"}
        assert requests.get(f"{base}/openapi.json", headers=auth, timeout=10).status_code == 200
        r = requests.post(f"{base}/v1/chat/completions", json=chat, headers=auth, timeout=60)
        assert r.status_code == 200, r.text
        serve_proc.send_signal(signal.SIGINT)
        out = serve_proc.communicate(timeout=180)[0]  # deleting the app waits for its replicas to stop
        assert serve_proc.returncode == 0 and "Traceback" not in out, out[-3000:]
        assert "deleted the application" in out
        assert _wait_for(lambda: requests.get(f"{base}/health", timeout=2).status_code != 200, 30) or True

        # a model the replicas cannot load: exit 1 with the replica's error, nothing left serving
        broken = tmp_path / "broken-model"
        broken.mkdir()
        (broken / "config.json").write_text(json.dumps({"model_type": "nope"}))
        t0 = time.monotonic()
        failed = subprocess.run([*cmd[:5], str(broken), *cmd[6:]], cwd=REPO, env=launch_env, capture_output=True,
                                text=True, timeout=300)
        assert failed.returncode == 1, failed.stdout[-2000:] + failed.stderr[-2000:]
        assert "did not start" in failed.stderr and "nope" in failed.stderr, failed.stderr[-3000:]
        assert time.monotonic() - t0 < 240
    finally:
        if serve_proc is not None and serve_proc.poll() is None:
            serve_proc.kill()
        _kill_cluster(temp_dir)  # only the processes of this cluster (never `ray stop`: it stops every Ray)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_meda_serve_stops_on_ctrl_c_and_sigterm_even_when_started_with_sigint_ignored(sig):
    """A launcher that ignores SIGINT passes that on to its children (exec keeps SIG_IGN): without its own
    handlers `meda serve` would never see Ctrl-C and leave the app serving. SIGTERM stops it the same way."""
    # 'ready' is printed inside the try: a signal that lands between the print and the sleep must be caught too
    # (printed before it, the test raced: on a busy core the interrupt could arrive outside the try).
    code = ("import time\nfrom pipeline.serve.cli import _stop_on_signals\n_stop_on_signals()\n"
            "try:\n    print('ready', flush=True)\n    time.sleep(60)\nexcept KeyboardInterrupt:\n"
            "    print('stopping cleanly', flush=True)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    assert proc.stdout.readline().strip() == "ready"
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=30)
    assert "stopping cleanly" in out and proc.returncode == 0
