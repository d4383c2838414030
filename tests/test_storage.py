"""pipeline.storage against a real S3 endpoint on loopback (moto, through s3fs) and local paths: listing,
reads with retries, manifests in Parquet/CSV/JSONL, clip ids, and pyarrow writes."""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json

import botocore.exceptions
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

import media_factory as mf
from meda_engine.media import decode_image, decode_video
from pipeline import storage


@pytest.fixture
def s3_opts(s3_endpoint) -> dict:
    """Storage options for the moto endpoint; credentials come from the environment (conftest)."""
    return {"endpoint_url": s3_endpoint}


@pytest.fixture
def corpus(s3_bucket, s3_opts) -> dict[str, bytes]:
    """Media uploaded under s3://<bucket>/raw/ (nested, mixed case), plus files that are not media."""
    files = {
        "raw/b.mp4": mf.make_video(12, 64, 48),
        "raw/a.MOV": mf.make_video(8, 64, 48),
        "raw/nested/c.webm": mf.make_video(8, 64, 48, codec="libvpx-vp9", container="webm"),
        "raw/nested/x.JPG": mf.make_image(fmt="JPEG", seed=1),
        "raw/y.png": mf.make_image(seed=2),
        "raw/notes.txt": b"not media",
        "raw/._b.mp4": b"macOS resource fork",
        "elsewhere/z.mp4": mf.make_video(8),
    }
    fs, _ = storage.filesystem_for(f"s3://{s3_bucket}", **s3_opts)
    for key, data in files.items():
        fs.pipe_file(f"{s3_bucket}/{key}", data)
    return {f"s3://{s3_bucket}/{key}": data for key, data in files.items()}


def bucket_of(corpus: dict[str, bytes]) -> str:
    return next(iter(corpus)).split("/")[2]


# ------------------------------------------------------------------------------------------------ listing


def test_list_media_on_s3(corpus, s3_opts):
    bucket = bucket_of(corpus)
    base = f"s3://{bucket}/raw"
    expected = [f"{base}/a.MOV", f"{base}/b.mp4", f"{base}/nested/c.webm", f"{base}/nested/x.JPG", f"{base}/y.png"]
    assert storage.list_media(base, **s3_opts) == expected
    assert storage.list_media(base + "/", **s3_opts) == expected
    assert storage.list_media(base, kinds=["image"], **s3_opts) == [f"{base}/nested/x.JPG", f"{base}/y.png"]
    assert storage.list_media(f"{base}/b.mp4", **s3_opts) == [f"{base}/b.mp4"]
    with pytest.raises(FileNotFoundError):
        storage.list_media(f"s3://{bucket}/no-such-prefix", **s3_opts)
    with pytest.raises(ValueError, match="not a media file"):
        storage.list_media(f"{base}/notes.txt", **s3_opts)


def test_endpoint_and_credentials_from_environment(corpus, s3_endpoint, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    url = f"s3://{bucket_of(corpus)}/raw/y.png"
    assert storage.read_bytes(url) == corpus[url]
    assert storage.read_bytes(url, endpoint_url=s3_endpoint, key="testing", secret="testing", region="us-east-1")


def test_read_bytes_and_decode(corpus, s3_opts):
    bucket = bucket_of(corpus)
    video = decode_video(storage.read_bytes(f"s3://{bucket}/raw/b.mp4", **s3_opts), n_frames=4)
    assert [mf.frame_index_of(f) for f in video.frames] == [0, 4, 7, 11]
    assert decode_image(storage.read_bytes(f"s3://{bucket}/raw/y.png", **s3_opts)).shape == (48, 64, 3)
    with pytest.raises(FileNotFoundError):
        storage.read_bytes(f"s3://{bucket}/raw/missing.mp4", **s3_opts)


def test_read_bytes_retries_transient_errors(corpus, s3_opts, monkeypatch):
    url = f"s3://{bucket_of(corpus)}/raw/y.png"
    fs, _ = storage.filesystem_for(url, **s3_opts)
    real_cat, calls = fs.cat_file, []

    def flaky(path, *args, **kwargs):
        calls.append(path)
        if len(calls) < 3:
            raise ConnectionResetError("connection reset by peer")
        return real_cat(path, *args, **kwargs)

    monkeypatch.setattr(fs, "cat_file", flaky)
    monkeypatch.setattr(storage.time, "sleep", lambda s: None)
    assert storage.read_bytes(url, **s3_opts) == corpus[url] and len(calls) == 3


# ------------------------------------------------------------------------------------------------ retries


def client_error(code: str, status: int) -> botocore.exceptions.ClientError:
    response = {"Error": {"Code": code, "Message": code}, "ResponseMetadata": {"HTTPStatusCode": status}}
    return botocore.exceptions.ClientError(response, "GetObject")


def test_is_transient_classifies_errors():
    translated = OSError(5, "Please reduce your request rate.")
    translated.__cause__ = client_error("SlowDown", 503)  # how s3fs re-raises botocore's errors
    assert storage.is_transient(translated)
    assert storage.is_transient(client_error("InternalError", 500))
    assert storage.is_transient(botocore.exceptions.EndpointConnectionError(endpoint_url="http://x"))
    assert storage.is_transient(ConnectionResetError())
    assert not storage.is_transient(FileNotFoundError("bucket/key"))
    assert not storage.is_transient(client_error("AccessDenied", 403))
    assert not storage.is_transient(ValueError("bad manifest"))


def test_retry_gives_up_on_permanent_errors_and_after_attempts(monkeypatch):
    monkeypatch.setattr(storage.time, "sleep", lambda s: None)
    calls = []

    def permanent():
        calls.append(1)
        raise FileNotFoundError("gone")

    with pytest.raises(FileNotFoundError):
        storage.retry(permanent, attempts=5)
    assert len(calls) == 1

    def always_throttled():
        calls.append(1)
        raise client_error("SlowDown", 503)

    calls.clear()
    with pytest.raises(botocore.exceptions.ClientError):
        storage.retry(always_throttled, attempts=3)
    assert len(calls) == 3


# ------------------------------------------------------------------------------------------------ manifests

ROWS = [
    {"uri": "../raw/b.mp4", "prompt": "What happens?", "answer": "a"},  # relative to the manifest's folder
    {"uri": "S3_BASE/raw/y.png", "prompt": None, "answer": "b"},
    {"uri": "S3_BASE/raw/b.mp4", "prompt": "duplicate of row 1", "answer": "c"},
]


def manifest_bytes(fmt: str, rows: list[dict]) -> bytes:
    if fmt == "parquet":
        buf = io.BytesIO()
        pq.write_table(pa.Table.from_pylist(rows), buf)
        return buf.getvalue()
    if fmt == "csv":
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
        return text.getvalue().encode()
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


@pytest.mark.parametrize("fmt", ["parquet", "csv", "jsonl"])
def test_manifests_on_s3(corpus, s3_opts, fmt):
    base = f"s3://{bucket_of(corpus)}"
    rows = [{**r, "uri": r["uri"].replace("S3_BASE", base)} for r in ROWS]
    url = f"{base}/meta/manifest.{fmt}"
    fs, path = storage.filesystem_for(url, **s3_opts)
    fs.pipe_file(path, manifest_bytes(fmt, rows))

    read = storage.read_manifest(url, **s3_opts)
    assert [r["uri"] for r in read] == [f"{base}/raw/b.mp4", f"{base}/raw/y.png", f"{base}/raw/b.mp4"]
    assert [r["prompt"] for r in read] == ["What happens?", None, "duplicate of row 1"]
    assert [r["answer"] for r in read] == ["a", "b", "c"]  # other columns pass through

    built = storage.build_manifest(url, prompt="Describe.", **s3_opts)
    assert [(r["uri"], r["prompt"], r["kind"], r["answer"]) for r in built] == [
        (f"{base}/raw/b.mp4", "What happens?", "video", "a"),
        (f"{base}/raw/y.png", "Describe.", "image", "b"),
    ]  # the third row names the first row's clip again and is dropped
    assert [r["clip_id"] for r in built] == [storage.clip_id(r["uri"]) for r in built]


@pytest.mark.parametrize("fmt", ["parquet", "csv", "jsonl"])
def test_manifest_without_uri_column_is_refused(s3_bucket, s3_opts, fmt):
    url = f"s3://{s3_bucket}/bad.{fmt}"
    fs, path = storage.filesystem_for(url, **s3_opts)
    fs.pipe_file(path, manifest_bytes(fmt, [{"path": "a.mp4", "prompt": "x"}]))
    with pytest.raises(ValueError, match="needs a 'uri' column"):
        storage.read_manifest(url, **s3_opts)


def test_build_manifest_from_a_prefix(corpus, s3_opts):
    base = f"s3://{bucket_of(corpus)}/raw"
    built = storage.build_manifest(base, prompt="Describe.", **s3_opts)
    assert [r["uri"] for r in built] == storage.list_media(base, **s3_opts)
    assert [r["kind"] for r in built] == ["video", "video", "video", "image", "image"]
    assert all(r["prompt"] == "Describe." for r in built)
    assert len({r["clip_id"] for r in built}) == 5


# ------------------------------------------------------------------------------------------------ clip ids


def test_clip_id_is_deterministic_and_normalised(tmp_path, monkeypatch):
    expected = hashlib.sha1(b"s3://bucket/videos/a.mp4").hexdigest()[:16]
    assert storage.clip_id("s3://bucket/videos/a.mp4") == expected
    assert storage.clip_id(" s3a://bucket/videos/a.mp4 ") == expected
    assert storage.clip_id("s3://bucket/videos//a.mp4") != expected  # a different S3 key
    segment = storage.clip_id("s3://bucket/videos/a.mp4", 1.5, 3)
    assert segment != expected and segment == storage.clip_id("s3://bucket/videos/a.mp4", 1.5000, 3.0)
    assert len(segment) == 16 and int(segment, 16) >= 0
    monkeypatch.chdir(tmp_path)
    local = {storage.clip_id(u) for u in ("clip.mp4", str(tmp_path / "clip.mp4"), f"file://{tmp_path}/clip.mp4")}
    assert len(local) == 1


# ------------------------------------------------------------------------------------------------ local


def test_local_paths(tmp_path):
    (tmp_path / "media" / "sub").mkdir(parents=True)
    (tmp_path / "media" / "v.mp4").write_bytes(mf.make_video(8))
    (tmp_path / "media" / "sub" / "i.webp").write_bytes(mf.make_image(fmt="WEBP"))
    (tmp_path / "media" / "readme.md").write_text("hi")
    root = tmp_path / "media"
    assert storage.list_media(str(root)) == [str(root / "sub" / "i.webp"), str(root / "v.mp4")]
    assert storage.list_media(f"file://{root}") == [f"file://{root}/sub/i.webp", f"file://{root}/v.mp4"]
    assert storage.read_bytes(str(root / "v.mp4")) == (root / "v.mp4").read_bytes()

    with gzip.open(tmp_path / "manifest.jsonl.gz", "wt") as f:
        f.write(json.dumps({"uri": "media/v.mp4", "start": 0.5, "end": 1.0}) + "\n\n")
        f.write(json.dumps({"uri": "media/sub/i.webp", "clip_id": "given-id"}) + "\n")
    built = storage.build_manifest(str(tmp_path / "manifest.jsonl.gz"))
    assert [r["uri"] for r in built] == [str(root / "v.mp4"), str(root / "sub" / "i.webp")]
    assert built[0]["clip_id"] == storage.clip_id(str(root / "v.mp4"), 0.5, 1.0) and built[0]["start"] == 0.5
    assert built[1]["clip_id"] == "given-id" and built[1]["kind"] == "image"


def test_bad_jsonl_line_is_reported(tmp_path):
    (tmp_path / "m.jsonl").write_text('{"uri": "a.mp4"}\nnot json\n')
    with pytest.raises(ValueError, match="line 2 is not valid JSON"):
        storage.read_manifest(str(tmp_path / "m.jsonl"))


# ------------------------------------------------------------------------------------------------ pyarrow


def test_pyarrow_filesystem_writes_parquet_that_s3fs_reads(s3_bucket, s3_opts, tmp_path):
    table = pa.table({"clip_id": ["a", "b"], "n": [1, 2]})
    url = f"s3://{s3_bucket}/out/part-0.parquet"
    pa_fs, path = storage.pyarrow_filesystem_for(url, **s3_opts)
    pq.write_table(table, path, filesystem=pa_fs)
    fs, path = storage.filesystem_for(url, **s3_opts)
    fs.invalidate_cache()
    with fs.open(path, "rb") as f:
        assert pq.read_table(f).equals(table)

    local_fs, local_path = storage.pyarrow_filesystem_for(str(tmp_path / "part-0.parquet"))
    assert isinstance(local_fs, pafs.LocalFileSystem)
    pq.write_table(table, local_path, filesystem=local_fs)
    assert pq.read_table(local_path).equals(table)
