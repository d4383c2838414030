"""Checkpoint resolution: local directory, s3:// prefix (real S3 endpoint on loopback), hub id offline."""

from __future__ import annotations

import os

import boto3
import numpy as np
import pytest
import s3fs

from meda_engine import CheckpointNotFoundError, CompressionConfig, Engine, Request
from meda_engine.models.loading import resolve_checkpoint
from tiny_models import build_checkpoint


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return build_checkpoint("qwen2_vl", tmp_path_factory.mktemp("ckpt") / "qwen2_vl")


def upload(endpoint, bucket, prefix, directory):
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=bucket)
    fs = s3fs.S3FileSystem(endpoint_url=endpoint)
    for name in os.listdir(directory):
        fs.put_file(str(directory / name), f"{bucket}/{prefix}/{name}")
    return fs


def test_load_from_s3_prefix_is_cached_and_refreshed(checkpoint, s3_endpoint, tmp_path):
    fs = upload(s3_endpoint, "models-ckpt", "tiny/qwen2_vl", checkpoint)
    opts = {"endpoint_url": s3_endpoint}
    local = resolve_checkpoint("s3://models-ckpt/tiny/qwen2_vl", cache_dir=tmp_path, storage_options=opts)
    assert (local / "config.json").exists() and (local / ".complete").exists()
    stamp = (local / "model.safetensors").stat().st_mtime_ns
    again = resolve_checkpoint("s3://models-ckpt/tiny/qwen2_vl", cache_dir=tmp_path, storage_options=opts)
    assert again == local and (local / "model.safetensors").stat().st_mtime_ns == stamp  # not copied twice
    fs.pipe("models-ckpt/tiny/qwen2_vl/generation_config.json", b'{"max_new_tokens": 3}')
    resolve_checkpoint("s3://models-ckpt/tiny/qwen2_vl", cache_dir=tmp_path, storage_options=opts)
    assert (local / "generation_config.json").read_bytes() == b'{"max_new_tokens": 3}'  # a changed object is fetched

    from_s3 = Engine.from_pretrained("s3://models-ckpt/tiny/qwen2_vl", cache_dir=str(tmp_path),
                                     storage_options=opts, device="cpu", dtype="float32")
    from_dir = Engine.from_pretrained(str(checkpoint), device="cpu", dtype="float32")
    req = Request(prompt="what colour is the circle ?", video=np.full((4, 112, 112, 3), 90, np.uint8))
    a = from_s3.generate([req], compression=CompressionConfig("meda", budget=0.5), max_new_tokens=6)[0]
    b = from_dir.generate([req], compression=CompressionConfig("meda", budget=0.5), max_new_tokens=6)[0]
    assert a.token_ids == b.token_ids


def test_missing_checkpoints_fail_clearly(s3_endpoint, tmp_path, monkeypatch):
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket="empty-models")
    with pytest.raises(CheckpointNotFoundError, match="no objects"):
        resolve_checkpoint("s3://empty-models/nothing", cache_dir=tmp_path,
                           storage_options={"endpoint_url": s3_endpoint})
    with pytest.raises(CheckpointNotFoundError, match="no checkpoint directory"):
        resolve_checkpoint(str(tmp_path / "absent"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(CheckpointNotFoundError, match="HF_HUB_OFFLINE"):
        resolve_checkpoint("Qwen/Qwen2.5-VL-7B-Instruct")
