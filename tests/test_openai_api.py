"""Request parsing, limits, response shapes and the media URL policy, without Ray or a model."""

from __future__ import annotations

import base64
import http.server
import json
import threading

import pytest

from meda_engine import CompressionConfig, Image, Result, Telemetry, Video
from pipeline.fetch import (
    FetchError,
    MediaPolicy,
    MediaTooLargeError,
    URLPolicyError,
    check_url,
    decode_data_url,
    fetch,
    is_public_address,
    resolve_host,
)
from pipeline.openai_api import (
    APIError,
    Limits,
    MediaRef,
    chunk_body,
    completion_body,
    merge_compression,
    parse_chat_request,
    plan_chat,
    sse,
)

DEFAULT = CompressionConfig(method="meda", budget=0.2)
LIMITS = Limits(default_max_tokens=16, max_tokens=64, max_images=2, max_videos=1, default_video_frames=8,
                max_video_frames=32)


def body(**fields) -> bytes:
    data = {"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields}
    return json.dumps(data).encode()


def plan(**fields):
    return plan_chat(parse_chat_request(body(**fields)), LIMITS, DEFAULT)


def status_of(fn, *args, **kwargs) -> int:
    with pytest.raises(APIError) as info:
        fn(*args, **kwargs)
    return info.value.status


def user(*parts) -> list[dict]:
    return [{"role": "user", "content": list(parts)}]


def image(url="data:image/png;base64,AAAA") -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def video(url="s3://bucket/clip.mp4") -> dict:
    return {"type": "video_url", "video_url": {"url": url}}


# ---------------------------------------------------------------------------------------- parsing
@pytest.mark.parametrize("raw, status", [
    (b"{not json", 400),
    (b"\xff\xfe", 400),
    (b"[" * 100_000 + b"]" * 100_000, 400),  # nesting deep enough to overflow the parser
    (b"[]", 422),
    (body(frequency_penalty=0.5), 422),  # unknown field
    (body(max_tokens="many"), 422),
    (body(messages=[]), 422),
    (body(messages=[{"role": "tool", "content": "x"}]), 422),
    (body(messages=user({"type": "audio_url", "audio_url": {"url": "x"}})), 422),
    (body(n=2), 422),
    (body(temperature=3), 422),
    (body(video={"frames": 4, "extra": 1}), 422),
])
def test_parse_rejects(raw, status):
    assert status_of(parse_chat_request, raw) == status


def test_parse_accepts_openai_shapes():
    req = parse_chat_request(body(messages=[
        {"role": "developer", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "what"}, image(), video()], "name": "u"},
    ], max_completion_tokens=5, stop="x", seed=3, stream=True, stream_options={"include_usage": True}, user="me"))
    assert req.stream and req.stream_options.include_usage and req.seed == 3


# ---------------------------------------------------------------------------------------- planning
def test_plan_text_defaults():
    p = plan()
    assert p.generation.max_new_tokens == 16 and p.generation.temperature == 0.0 and p.compression is DEFAULT
    req = p.to_request([])
    assert req.messages[0].content == ["hi"] and req.compression is DEFAULT


def test_plan_media_order_and_substitution():
    p = plan(messages=[{"role": "system", "content": "sys"},
                       {"role": "user", "content": [image("data:,a"), {"type": "text", "text": "q"}, video()]}])
    assert p.media == [MediaRef("image", "data:,a"), MediaRef("video", "s3://bucket/clip.mp4")]
    img, vid = Image(pixels="I"), Video(frames=None)
    req = p.to_request([img, vid])
    assert req.messages[0].role == "system" and req.messages[1].content == [img, "q", vid]
    with pytest.raises(ValueError):
        p.to_request([img])


def test_plan_generation_fields():
    p = plan(max_tokens=32, temperature=0.7, top_p=0.9, stop=["a", "b"], seed=5)
    g = p.generation
    assert (g.max_new_tokens, g.temperature, g.top_p, g.stop, g.seed) == (32, 0.7, 0.9, ("a", "b"), 5)
    assert plan(max_completion_tokens=7).generation.max_new_tokens == 7


@pytest.mark.parametrize("fields", [
    {"max_tokens": 65},
    {"max_tokens": 4, "max_completion_tokens": 4},
    {"stop": ["a", "b", "c", "d", "e"]},
    {"messages": user(image(), image(), image(), {"type": "text", "text": "q"})},
    {"messages": user(video(), video(), {"type": "text", "text": "q"})},
    {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": [image()]}]},
    {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
    {"messages": [{"role": "user", "content": "  "}]},
    {"kv_compression": {"method": "meda", "budgett": 0.3}},
    {"kv_compression": {"budget": 1.5}},
    {"kv_compression": {"method": "nope"}},
    {"kv_compression": {"window": "wide"}},
    {"video": {"frames": 33}},
    {"video": {"frames": 4, "fps": 1.0}},
])
def test_plan_rejects(fields):
    assert status_of(plan, **fields) == 400


def test_compression_override_merges_with_server_default():
    server = CompressionConfig(method="meda", budget=0.2, window=8, merge="pivot")
    same = merge_compression(server, {"budget": 0.5})
    assert (same.method, same.budget, same.window, same.merge) == ("meda", 0.5, 8, "pivot")
    other = merge_compression(server, {"method": "snapkv"})
    # the method-dependent knobs fall back to snapkv's own defaults; the rest is inherited
    assert (other.budget, other.window, other.merge_mode, other.use_text_prior) == (0.2, 8, "none", False)
    assert merge_compression(server, None) is server


def test_video_sampling():
    assert plan().video.frames == 8 and plan().video.fps is None
    p = plan(video={"fps": 2.0})
    assert (p.video.frames, p.video.fps, p.video.max_frames) == (None, 2.0, 32)
    by_rate = plan_chat(parse_chat_request(body()), Limits(default_video_fps=1.0), DEFAULT)
    assert (by_rate.video.frames, by_rate.video.fps) == (None, 1.0)


def test_stream_flags():
    p = plan(stream=True, stream_options={"include_usage": True})
    assert p.stream and p.include_usage
    assert not plan(stream=True).include_usage


# ---------------------------------------------------------------------------------------- responses
def fake_result(text="a b", n_prompt=10, n_gen=2) -> Result:
    tele = Telemetry(method="meda", budget=0.2, entropy_variant="paper", n_prompt_tokens=n_prompt, n_text_tokens=6,
                     n_visual_tokens=4, n_frames=2, n_generated_tokens=n_gen, kv_bytes_full=1000, kv_bytes_kept=200,
                     kv_keep_ratio=0.2, kv_bytes_allocated=300, layer_budgets=[2, 2], layer_entropies=[1.0, 2.0],
                     prefill_s=0.1, compress_s=0.01, decode_s=0.2, decode_tokens_per_s=5.0, peak_mem_bytes=1,
                     peak_mem_kind="rss_hwm", batch_size=1, device="cpu", dtype="float32")
    return Result("rid", text, [1, 2], "length", tele)


def test_completion_body_is_openai_shaped():
    out = completion_body(fake_result(), model="m", created=7)
    assert out["id"] == "chatcmpl-rid" and out["object"] == "chat.completion" and out["created"] == 7
    assert out["choices"] == [{"index": 0, "message": {"role": "assistant", "content": "a b"}, "logprobs": None,
                               "finish_reason": "length"}]
    assert out["usage"] == {"prompt_tokens": 10, "completion_tokens": 2, "total_tokens": 12}
    assert out["meda"]["kv_keep_ratio"] == 0.2 and out["meda"]["layer_budgets"] == [2, 2]
    json.dumps(out)


def test_chunks_and_sse():
    first = chunk_body("rid", model="m", created=1, delta={"role": "assistant", "content": ""})
    assert first["object"] == "chat.completion.chunk" and first["choices"][0]["finish_reason"] is None
    final = chunk_body("rid", model="m", created=1, finish_reason="stop", result=fake_result())
    assert final["choices"][0]["delta"] == {} and final["meda"]["method"] == "meda"
    usage = chunk_body("rid", model="m", created=1, result=fake_result(), with_usage=True)
    assert usage["choices"] == [] and usage["usage"]["total_tokens"] == 12
    assert sse("[DONE]") == b"data: [DONE]\n\n"
    assert json.loads(sse(first)[len(b"data: "):]) == first


def test_api_error_body():
    e = APIError(401, "no key", code="invalid_api_key")
    assert e.body() == {"error": {"message": "no key", "type": "authentication_error", "param": None,
                                  "code": "invalid_api_key"}}


# ---------------------------------------------------------------------------------------- URL policy
POLICY = MediaPolicy(allowed_buckets=("media-*",), allowed_hosts=("cdn.example.com", "*.example.org"))


@pytest.mark.parametrize("url", [
    "data:image/png;base64,AAAA",
    "s3://media-eu/clips/a.mp4",
    "https://cdn.example.com/a.jpg",
    "https://x.example.org/a.jpg?sig=1",
    "HTTPS://CDN.EXAMPLE.COM./a.jpg",
])
def test_policy_allows(url):
    check_url(url, POLICY)


@pytest.mark.parametrize("url", [
    "file:///etc/passwd",
    "/etc/passwd",
    "ftp://cdn.example.com/a",
    "http://cdn.example.com/a.jpg",  # http is off unless configured
    "gs://media-eu/a.mp4",  # gs is off unless configured
    "s3://private/a.mp4",
    "s3://media-eu",
    "https://evil.com/a.jpg",
    "https://cdn.example.com.evil.com/a.jpg",
    "https://user:pw@cdn.example.com/a.jpg",
    "https://example.org/a.jpg",
    "https:///a.jpg",
])
def test_policy_refuses(url):
    with pytest.raises(URLPolicyError):
        check_url(url, POLICY)


def test_default_policy_allows_only_inline_data():
    check_url("data:,x", MediaPolicy())
    for url in ("s3://any/x", "https://example.com/x"):
        with pytest.raises(URLPolicyError):
            check_url(url, MediaPolicy())


@pytest.mark.parametrize("address, public", [
    ("8.8.8.8", True), ("2001:4860:4860::8888", True),
    ("127.0.0.1", False), ("10.1.2.3", False), ("172.16.0.1", False), ("192.168.1.1", False),
    ("169.254.169.254", False), ("100.64.0.1", False), ("0.0.0.0", False), ("224.0.0.1", False),
    ("::1", False), ("fe80::1%eth0", False), ("fd00::1", False), ("::ffff:127.0.0.1", False),
    ("::ffff:169.254.169.254", False),
])
def test_public_addresses(address, public):
    assert is_public_address(address) is public


def test_loopback_names_are_refused_unless_allowed():
    for host in ("localhost", "127.0.0.1", "2130706433", "0x7f.1"):
        with pytest.raises(URLPolicyError):
            resolve_host(host, 80, allow_private=False)
    assert resolve_host("127.0.0.1", 80, allow_private=True) == "127.0.0.1"


def test_data_urls():
    payload = b"\x00\x01binary"
    assert decode_data_url("data:image/png;base64," + base64.b64encode(payload).decode()) == payload
    assert decode_data_url("data:text/plain,a%20b") == b"a b"
    for bad in ("data:image/png;base64", "data:image/png;base64,@@@"):
        with pytest.raises(FetchError):
            decode_data_url(bad)
    with pytest.raises(MediaTooLargeError):
        fetch("data:;base64," + base64.b64encode(b"x" * 100).decode(), MediaPolicy(max_bytes=99))


# ---------------------------------------------------------------------------------------- http fetch
class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 - http.server's naming
        if self.path == "/redirect":
            self.send_response(302)
            self.send_header("Location", "http://169.254.169.254/")
            self.end_headers()
            return
        if self.path != "/media.bin":
            self.send_error(404)
            return
        data = b"m" * 1000
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def http_server():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def loopback_policy(**kw) -> MediaPolicy:
    return MediaPolicy(allowed_schemes=("http",), allowed_hosts=("127.0.0.1",), **kw)


def test_http_fetch_needs_explicit_private_permission(http_server):
    with pytest.raises(URLPolicyError, match="non-public"):
        fetch(f"{http_server}/media.bin", loopback_policy())
    assert fetch(f"{http_server}/media.bin", loopback_policy(allow_private_networks=True)) == b"m" * 1000


def test_http_fetch_limits_and_errors(http_server):
    allowed = loopback_policy(allow_private_networks=True)
    with pytest.raises(MediaTooLargeError):
        fetch(f"{http_server}/media.bin", loopback_policy(allow_private_networks=True, max_bytes=999))
    with pytest.raises(FetchError, match="redirect"):
        fetch(f"{http_server}/redirect", allowed)
    with pytest.raises(FetchError, match="404"):
        fetch(f"{http_server}/missing", allowed)


# ---------------------------------------------------------------------------------------- every field, strictly
# Each field of the chat request and of kv_compression, with a wrong type and out-of-range values:
# every one must be refused with a 4xx and a non-null code by parsing/planning alone (before any
# media is fetched or a batch is formed). Issue 14 item 1: floats for window / sink / pool_kernel
# used to pass and then raise inside the engine's batch loop.
CHAT_FIELD_CASES = {
    "model": [3, None, ["m"]],
    "messages": [[], "hi", [{"role": "robot", "content": "hi"}], [{"role": "user"}],
                 [{"role": "user", "content": 3}], [{"role": "user", "content": [{"type": "audio"}]}],
                 [{"role": "user", "content": [{"type": "text", "text": 3}]}],
                 [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": ""}}]}],
                 [{"role": "user", "content": [{"type": "image_url", "image_url": "data:x"}]}],
                 [{"role": "user", "content": "hi", "name": 5}]],
    "max_tokens": ["4", 4.0, 4.5, True, 0, -1, 65],
    "max_completion_tokens": ["4", 2.5, False, 0, 65],
    "temperature": ["0", True, -0.1, 2.5, [0]],
    "top_p": ["1", True, 0, 1.5, -1],
    "stop": [3, [3], {"a": 1}, ["a", "b", "c", "d", "e"]],
    "seed": ["1", 1.5, True, 2**64, -(2**63) - 1],
    "stream": ["yes", 1, "true", None],
    "stream_options": ["yes", {"include_usage": "yes"}, {"include_usage": 1}, {"extra": True}],
    "n": [2, 0, "1", 1.0],
    "user": [3, ["u"]],
    "kv_compression": ["meda", ["meda"], 3],
    "video": [{"frames": 1.5}, {"frames": "4"}, {"frames": 0}, {"frames": 33}, {"fps": 0}, {"fps": "1"},
              {"fps": float("inf")}, {"frames": 4, "fps": 1.0}, {"frame": 4}, 3],
}
COMPRESSION_FIELD_CASES = {
    "method": [3, None, "nope", True],
    "budget": ["0.2", True, 0, 0.0, -0.5, 1.5, 64, float("nan"), None],
    "budget_tokens": [1.5, 64.0, "64", True, 0, -3],
    "window": [1.5, 3.0, "16", True, -1, None],
    "sink": [2.5, "4", False, -1],
    "entropy": [1, "both", None],
    "temperature": ["1", True, 0, -1.0, float("inf")],
    "min_layer_ratio": ["0", True, -0.1, 1.5],
    "max_layer_ratio": ["1", False, -0.5, 1.01],
    "text_prior": ["yes", 1, "true"],
    "keep_all_text": ["yes", 0, None],
    "merge": [1, "sum", True],
    "merge_keys": ["no", 1, None],
    "merge_within_modality": ["yes", 0],
    "score_queries": [1.5, "512", True, -1],
    "pool_kernel": [3.0, 2.5, "5", True, 0, 4, -3],
    "pyramid_beta": ["20", True, 0.5, -1, float("nan")],
}


def _cases(table):
    return [(f, v) for f, values in table.items() for v in values]


def test_the_suites_cover_every_field():
    import dataclasses

    from pipeline.openai_api import ChatCompletionRequest

    assert set(CHAT_FIELD_CASES) == set(ChatCompletionRequest.model_fields)
    assert set(COMPRESSION_FIELD_CASES) == {f.name for f in dataclasses.fields(CompressionConfig)}


def _refusal(payload: bytes) -> APIError:
    with pytest.raises(APIError) as info:
        plan_chat(parse_chat_request(payload), LIMITS, DEFAULT)
    return info.value


@pytest.mark.parametrize(("field", "value"), _cases(CHAT_FIELD_CASES), ids=repr)
def test_every_bad_chat_field_is_a_4xx_with_a_code(field, value):
    data = {"model": "m", "messages": [{"role": "user", "content": "hi"}], field: value}
    err = _refusal(json.dumps(data).encode())
    assert 400 <= err.status < 500 and err.code, (field, value, err.status, err.code)
    assert err.body()["error"]["code"] == err.code


@pytest.mark.parametrize(("field", "value"), _cases(COMPRESSION_FIELD_CASES), ids=repr)
def test_every_bad_kv_compression_field_is_a_400(field, value):
    err = _refusal(body(kv_compression={field: value}))
    assert err.status == 400 and err.code == "invalid_kv_compression" and err.param == "kv_compression"
    assert field in err.message, err.message


def test_kv_compression_well_typed_values_pass():
    p = plan(kv_compression={"method": "snapkv", "budget": 1, "window": 8, "pool_kernel": 3, "text_prior": True,
                             "temperature": 2})
    assert (p.compression.method, p.compression.budget, p.compression.window) == ("snapkv", 1.0, 8)
    tokens = plan(kv_compression={"budget_tokens": 64}).compression
    assert tokens.budget_tokens == 64
    # a fraction asked for replaces a server default given as a token count
    server = CompressionConfig(method="meda", budget_tokens=128)
    merged = plan_chat(parse_chat_request(body(kv_compression={"budget": 0.3})), LIMITS, server).compression
    assert (merged.budget, merged.budget_tokens) == (0.3, None)


def test_strict_booleans_at_the_top_level():
    assert _refusal(body(stream="yes")).status == 422
    assert plan(stream=True).stream is True
