"""The Serve application end to end: real HTTP on 127.0.0.1, the official `openai` client, a tiny
random Qwen2-VL checkpoint on the CPU, and media from data: URLs and the session's moto S3 on loopback."""

from __future__ import annotations

import base64
import io
import json
import socket
import time
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests
import torch
import yaml

from media_factory import make_video
from tiny_models import build_checkpoint

torch.set_num_threads(1)
pytestmark = pytest.mark.slow

NAME = "tiny-qwen2-vl"
KEY = "test-key"
BUCKET = f"serve-media-{uuid.uuid4().hex[:8]}"  # the moto server is shared by the session
DENIED_BUCKET = f"serve-denied-{uuid.uuid4().hex[:8]}"
S3_KEYS = {"key": "testing", "secret": "testing", "region": "us-east-1"}
RNG = np.random.default_rng(0)
QUESTIONS = ["what colour is the circle ?", "how many squares are in the image ?", "describe the video ."]
REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def png_data_url(size=(112, 112)) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(RNG.integers(0, 255, (*size, 3), dtype=np.uint8)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


IMAGE = png_data_url()
MP4 = make_video(n_frames=8, width=112, height=112, fps=8)


# ---------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def media_bucket(s3_endpoint):
    """The allowed bucket (a clip and a corrupt one) and a bucket the server must refuse, on the shared moto S3."""
    import boto3

    s3 = boto3.client("s3", endpoint_url=s3_endpoint, aws_access_key_id=S3_KEYS["key"],
                      aws_secret_access_key=S3_KEYS["secret"], region_name=S3_KEYS["region"])
    for bucket in (BUCKET, DENIED_BUCKET):
        s3.create_bucket(Bucket=bucket)
        s3.put_object(Bucket=bucket, Key="clip.mp4", Body=MP4)
    s3.put_object(Bucket=BUCKET, Key="broken.mp4", Body=b"\x00" * 2048)
    return BUCKET


def settings(checkpoint: Path, s3_endpoint: str) -> dict:
    return {
        "model": str(checkpoint), "served_model_name": NAME, "device": "cpu", "dtype": "float32", "torch_threads": 1,
        "method": "meda", "budget": 0.5,
        "max_num_seqs": 16, "num_cpus": 1, "ingress_num_cpus": 1,
        "ingress_max_replicas": 1,
        "default_max_tokens": 8, "max_tokens": 64, "max_images": 2, "default_video_frames": 4, "max_video_frames": 8,
        "max_body_bytes": 256 * 1024, "max_prompt_tokens": 300,
        "allowed_buckets": [BUCKET], "allowed_hosts": ["127.0.0.1"], "allow_http": True,
        "storage": {"endpoint_url": s3_endpoint, **S3_KEYS},
        "api_keys": [KEY],
    }


@pytest.fixture(scope="module")
def server(ray_local, tmp_path_factory, s3_endpoint, media_bucket):
    from ray import serve

    from pipeline.serve import app_builder

    checkpoint = build_checkpoint("qwen2_vl", tmp_path_factory.mktemp("serve") / "qwen2_vl", seed=1)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(app_builder(settings(checkpoint, s3_endpoint)), name="meda-test", route_prefix="/")
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0, timeout=120)


def ask(client, content, **kwargs):
    kwargs.setdefault("max_tokens", 8)
    kwargs.setdefault("temperature", 0)
    return client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": content}], **kwargs)


def image_part(url=IMAGE) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def video_part(url=f"s3://{BUCKET}/clip.mp4") -> dict:
    return {"type": "video_url", "video_url": {"url": url}}


def text_part(text) -> dict:
    return {"type": "text", "text": text}


# ---------------------------------------------------------------------------------------- happy paths
def test_health_and_models(server, client):
    for path in ("/health", "/v1/health"):
        assert requests.get(server + path, timeout=30).json() == {"status": "ok"}
    assert [m.id for m in client.models.list().data] == [NAME]


def test_text_only(client):
    r = ask(client, QUESTIONS[0], max_tokens=6)
    meda = r.model_extra["meda"]
    assert r.object == "chat.completion" and r.model == NAME and r.id.startswith("chatcmpl-")
    assert r.choices[0].message.role == "assistant" and r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens == meda["n_prompt_tokens"] > 0
    assert r.usage.completion_tokens == meda["n_generated_tokens"] <= 6
    assert meda["method"] == "meda" and meda["n_visual_tokens"] == 0


def test_image_data_url(client):
    r = ask(client, [image_part(), text_part(QUESTIONS[1])],
            extra_body={"kv_compression": {"method": "snapkv", "budget": 0.4}})
    meda = r.model_extra["meda"]
    assert meda["method"] == "snapkv" and meda["n_visual_tokens"] == 16 and meda["kv_keep_ratio"] < 1


def test_video_from_s3(client):
    r = ask(client, [video_part(), text_part(QUESTIONS[2])],
            extra_body={"kv_compression": {"method": "meda", "budget": 0.3}, "video": {"frames": 6}})
    meda = r.model_extra["meda"]
    assert meda["method"] == "meda" and meda["budget"] == 0.3 and meda["n_frames"] == 6
    assert meda["n_visual_tokens"] > 0 and meda["kv_bytes_kept"] < meda["kv_bytes_full"]
    # the server default sampling (4 frames) applies without extra_body.video
    assert ask(client, [video_part(), text_part("what ?")]).model_extra["meda"]["n_frames"] == 4


def test_streaming_matches_unary(server, client):
    content = [image_part(), text_part(QUESTIONS[0])]
    unary = ask(client, content, max_tokens=12)
    chunks = list(ask(client, content, max_tokens=12, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == unary.choices[0].message.content
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].choices[0].finish_reason == unary.choices[0].finish_reason
    assert finals[0].model_extra["meda"]["n_generated_tokens"] == unary.usage.completion_tokens
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == unary.usage.total_tokens

    raw = requests.post(f"{server}/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"}, stream=True,
                        json={"model": NAME, "stream": True, "max_tokens": 3,
                              "messages": [{"role": "user", "content": "what ?"}]}, timeout=60)
    assert raw.status_code == 200 and raw.headers["content-type"].startswith("text/event-stream")
    events = [line for line in raw.iter_lines(decode_unicode=True) if line]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"


def test_concurrent_requests_with_different_settings(client):
    methods = ["full", "streamingllm", "h2o", "snapkv", "pyramidkv", "lookm", "meda"]
    budgets = [{"budget": 0.3}, {"budget": 0.5}, {"budget": 0.8}, {"budget_tokens": 6}]
    jobs = [({"method": methods[i % len(methods)], **budgets[i % len(budgets)]}, QUESTIONS[i % 3])
            for i in range(16)]

    def run(job):
        comp, question = job
        return ask(client, [image_part(), text_part(question)], extra_body={"kv_compression": comp})

    with ThreadPoolExecutor(16) as pool:
        together = list(pool.map(run, jobs))
    alone = [run(job) for job in jobs]
    for (comp, _), a, b in zip(jobs, together, alone, strict=True):
        assert a.choices[0].message.content == b.choices[0].message.content
        assert a.model_extra["meda"]["method"] == comp["method"]
        if comp["method"] != "full" and "budget" in comp:
            assert a.model_extra["meda"]["budget"] == comp["budget"]
    assert max(r.model_extra["meda"]["batch_size"] for r in together) > 1  # they were batched
    assert all(r.model_extra["meda"]["batch_size"] == 1 for r in alone)


# ---------------------------------------------------------------------------------------- refusals
def chat(content="what ?", **fields) -> dict:
    return {"model": NAME, "max_tokens": 4, "messages": [{"role": "user", "content": content}], **fields}


def b64(data: bytes, mime: str) -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


BAD_REQUESTS = {
    "malformed json": (b'{"model": "x", "messages": [', 400, "invalid_json"),
    "unknown field": (chat(logit_bias={"1": 2}), 422, "invalid_request"),
    "wrong type": (chat(max_tokens="four"), 422, "invalid_request"),
    "unknown compression key": (chat(kv_compression={"method": "meda", "budgett": 0.2}), 400,
                                "invalid_kv_compression"),
    "bad budget": (chat(kv_compression={"budget": 7.5}), 400, "invalid_kv_compression"),
    # issue 14 item 1: these passed validation and then raised inside the engine's batch loop
    "float window": (chat(kv_compression={"window": 1.5}), 400, "invalid_kv_compression"),
    "float sink": (chat(kv_compression={"method": "streamingllm", "sink": 2.5}), 400, "invalid_kv_compression"),
    "float pool_kernel": (chat(kv_compression={"method": "snapkv", "pool_kernel": 3.0}), 400,
                          "invalid_kv_compression"),
    "text_prior yes": (chat(kv_compression={"text_prior": "yes"}), 400, "invalid_kv_compression"),
    "stream yes": (chat(stream="yes"), 422, "invalid_request"),
    "both token limits": (chat(max_completion_tokens=4), 400, "invalid_request"),
    "unknown model": (dict(chat(), model="gpt-4o"), 404, "model_not_found"),
    "too many images": (chat([image_part()] * 3 + [text_part("q")]), 400, "too_many_media"),
    "too many frames": (chat([video_part(), text_part("q")], video={"frames": 9}), 400, "too_many_frames"),
    "max_tokens too large": (chat(max_tokens=65), 400, "max_tokens_too_large"),
    "body too large": (chat("red " * 70_000), 413, "request_too_large"),
    "file url": (chat([image_part("file:///etc/passwd"), text_part("q")]), 400, "url_not_allowed"),
    "bucket not allowed": (chat([video_part(f"s3://{DENIED_BUCKET}/clip.mp4"), text_part("q")]), 400,
                           "url_not_allowed"),
    "loopback http": (chat([image_part("http://127.0.0.1:9/x.png"), text_part("q")]), 400, "url_not_allowed"),
    "metadata address": (chat([image_part("http://169.254.169.254/latest"), text_part("q")]), 400,
                         "url_not_allowed"),
    "missing object": (chat([video_part(f"s3://{BUCKET}/nope.mp4"), text_part("q")]), 400, "media_fetch_failed"),
    "undecodable image": (chat([image_part(b64(b"not an image", "image/png")), text_part("q")]), 400,
                          "media_decode_failed"),
    "undecodable video": (chat([video_part(f"s3://{BUCKET}/broken.mp4"), text_part("q")]), 400,
                          "media_decode_failed"),
    "prompt over the server limit": (chat("red " * 400), 400, "context_length_exceeded"),
    "prompt over the model context": (chat("red " * 5000), 400, "context_length_exceeded"),
    "prompt too long, streamed": (chat("red " * 400, stream=True), 400, "context_length_exceeded"),
    "last message not from the user": (chat(messages=[{"role": "assistant", "content": "hi"}]), 400,
                                       "invalid_request"),
}


def post(server, payload, headers=None):
    data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {KEY}", **(headers or {})}
    return requests.post(f"{server}/v1/chat/completions", data=data, headers=headers, timeout=60)


@pytest.mark.parametrize("case", sorted(BAD_REQUESTS))
def test_bad_requests(server, case):
    payload, status, code = BAD_REQUESTS[case]
    r = post(server, payload)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["code"] == code and error["message"]


def test_bad_requests_do_not_hurt_their_batch_mates(server, client):
    """Issue 14 item 1: bad requests sent among good ones; every good one still answers 200."""
    bad = [BAD_REQUESTS[c][0] for c in ("float window", "float sink", "float pool_kernel", "text_prior yes")]

    def good(i):
        return ask(client, [image_part(), text_part(QUESTIONS[i % 3])], max_tokens=6)

    with ThreadPoolExecutor(12) as pool:
        bad_jobs = [pool.submit(post, server, b) for b in bad * 2]
        good_jobs = [pool.submit(good, i) for i in range(6)]
        assert all(j.result().status_code == 400 for j in bad_jobs)
        assert all(j.result().choices[0].finish_reason in ("stop", "length") for j in good_jobs)


def test_auth(server):
    assert post(server, chat(), headers={"Authorization": ""}).status_code == 401
    assert post(server, chat(), headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert post(server, chat(), headers={"Authorization": KEY}).status_code == 401  # no scheme
    assert requests.get(f"{server}/v1/models", timeout=30).status_code == 401
    for path in ("/docs", "/openapi.json"):  # the schema is behind the key too
        assert requests.get(server + path, timeout=30).status_code == 401
        assert requests.get(server + path, headers={"Authorization": f"Bearer {KEY}"}, timeout=30).status_code == 200
    assert requests.get(f"{server}/health", timeout=30).status_code == 200  # probes need no key


def test_still_serving_after_refusals(server, client):
    for case in ("malformed json", "undecodable video", "prompt over the model context"):
        post(server, BAD_REQUESTS[case][0])
    # a client that hangs up in the middle of a stream
    with requests.post(f"{server}/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"}, stream=True,
                       json=chat("what ?", stream=True, max_tokens=32), timeout=60) as r:
        assert next(r.iter_lines()).startswith(b"data: ")
    assert ask(client, [video_part(), text_part("what ?")]).choices[0].finish_reason in ("stop", "length")


# ---------------------------------------------------------------------------------------- metrics
def scrape_until(port: int, expected: list[str], timeout_s: float = 60) -> list[str]:
    """Poll the Prometheus endpoint until every expected text appears; return those still missing.
    Ray's metrics agent exports on an interval, so the last seconds of records show up late."""
    deadline = time.monotonic() + timeout_s
    while True:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        missing = [e for e in expected if e not in text]
        if not missing or time.monotonic() > deadline:
            return missing
        time.sleep(2)


def test_custom_metrics_on_the_prometheus_endpoint(client, ray_local):
    # a random tiny model may answer some prompts with EOS at once: make sure some tokens were generated
    assert max(ask(client, [image_part(), text_part(q)]).usage.completion_tokens for q in QUESTIONS) > 0
    assert requests.get(f"{client.base_url}models", timeout=30).status_code == 401
    port = ray_local._private.worker.global_worker.node.metrics_export_port
    expected = ["ray_meda_requests_total", "ray_meda_prompt_tokens_total", "ray_meda_completion_tokens_total",
                "ray_meda_kv_bytes_saved_total", "ray_meda_request_latency_seconds_bucket",
                'status="200"', 'status="401"', f'model="{NAME}"',
                # the engine's gauges, sampled from the replica's scheduler
                "ray_meda_engine_rows_running", "ray_meda_engine_rows_waiting", "ray_meda_engine_kv_bytes_in_use",
                "ray_meda_engine_kv_cache_capacity_bytes", "ray_meda_engine_preemptions"]
    assert not scrape_until(port, expected)


# ---------------------------------------------------------------------------------------- config
def test_serve_config_is_valid(monkeypatch):
    from ray.serve.schema import ServeDeploySchema

    from pipeline.serve import ServeSettings, app_builder

    config = ServeDeploySchema.model_validate(yaml.safe_load((REPO / "serve_config.yaml").read_text()))
    (app,) = config.applications
    assert app.import_path == "pipeline.serve:app_builder"
    assert "working_dir" not in (app.runtime_env or {})
    ServeSettings.model_validate(app.args)
    monkeypatch.delenv("MEDA_API_KEY", raising=False)
    with pytest.raises(ValueError, match="no API key"):  # the checked-in config fails closed
        app_builder(app.args)
    monkeypatch.setenv("MEDA_API_KEY", "k1,k2")
    app_builder(app.args)  # builds the graph (binds deployments) without loading the model
    with pytest.raises(ValueError, match="modle"):
        app_builder({**app.args, "modle": "typo"})


def test_meda_serve_cli_builds_the_app():
    from pipeline.cli import build_parser
    from pipeline.serve import app_builder, run_serve, settings_from_cli

    args = build_parser().parse_args(["serve", "--model", "/ckpt", "--method", "snapkv", "--budget-tokens", "512",
                                      "--window", "8", "--allow-bucket", "media-*", "--num-gpus", "0",
                                      "--port", "9000"])
    assert args.func is run_serve and args.port == 9000
    settings = settings_from_cli(args)
    assert (settings["method"], settings["budget_tokens"], settings["allowed_buckets"]) == ("snapkv", 512, ["media-*"])
    assert settings["compression"]["window"] == 8 and not settings["require_api_key"]
    with pytest.raises(ValueError, match="does not exist"):  # a local path is checked on the launching side
        app_builder(settings)
    settings["model"] = str(REPO / "tests")  # any existing directory: resolved to an absolute path
    app_builder(settings)
    explicit = settings_from_cli(build_parser().parse_args(["serve", "--model", "m", "--num-gpus", "0",
                                                            "--api-key-env", "MEDA_UNSET_KEY_VAR"]))
    with pytest.raises(ValueError, match="no API key"):  # a named key variable that is empty: refuse
        app_builder(explicit)


def test_autoscaling_defaults():
    from pipeline.serve import ServeSettings, app_builder

    s = ServeSettings(model="m", max_num_seqs=8)
    assert s.autoscaling_target == 4 and s.downscale_delay_s == 120 and s.upscale_delay_s == 10
    app = app_builder({"model": "m", "max_num_seqs": 8, "max_replicas": 4})
    ingress = app._bound_deployment
    model = ingress.init_args[0]._bound_deployment
    cfg = model._deployment_config.autoscaling_config
    assert cfg.target_ongoing_requests == 4 < model._deployment_config.max_ongoing_requests
    assert cfg.downscale_delay_s == 120
