"""Parallel listing of an S3 prefix (pipeline.storage `_s3_parallel_find`) against moto on loopback: the same
entries as the serial listing (one recursive ``find``) on nested, flat, empty and non-media prefixes and on a
whole bucket; the sub-prefix calls really overlap; a dropped sub-prefix, transient errors and sub-prefixes
that may not be listed are all caught."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from pipeline import storage


@pytest.fixture
def s3_opts(s3_endpoint) -> dict:
    return {"endpoint_url": s3_endpoint}


def put(bucket: str, keys: list[str], opts: dict) -> None:
    """Upload small objects (content = the key, so sizes and ETags differ), keys byte for byte (boto3: s3fs
    would strip a trailing "/"), 8 at a time."""
    import boto3

    client = boto3.client("s3", endpoint_url=opts["endpoint_url"])
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda k: client.put_object(Bucket=bucket, Key=k, Body=k.encode()), keys))


def nested_keys() -> list[str]:
    """Several levels, files at every level, empty-name and placeholder keys, non-media and hidden files."""
    keys = ["raw/top.mp4", "raw/readme.txt", "raw/.hidden.mp4", "raw/", "raw/emptydir/",
            "raw//double-slash.jpg", "raw/a b/space.png", "rawish/not-under-raw.mp4", "other/x.mp4"]
    for a in range(5):
        keys.append(f"raw/s{a}/level1-{a}.MOV")
        for b in range(4):
            keys.append(f"raw/s{a}/t{b}/level2.webm")
            keys += [f"raw/s{a}/t{b}/u{c}/clip{c}.mp4" for c in range(6)]
            keys.append(f"raw/s{a}/t{b}/u0/notes.json")
    return keys


@pytest.fixture
def nested(s3_bucket, s3_opts) -> str:
    put(s3_bucket, nested_keys(), s3_opts)
    return s3_bucket


def listing(url: str, opts: dict, workers: int, **kw) -> list[dict]:
    fs, _ = storage.filesystem_for(url, **opts)
    fs.invalidate_cache()  # every listing asks the store, none answers from s3fs's directory cache
    return storage.list_media_entries(url, list_workers=workers, **opts, **kw)


def assert_same_listing(url: str, opts: dict, workers=(2, 4, 16, 64)) -> list[dict]:
    serial = listing(url, opts, 1)
    for w in workers:
        assert listing(url, opts, w) == serial, f"list_workers={w}"
    return serial


def expected_media(bucket: str, prefix: str) -> list[str]:
    keys = [k for k in nested_keys() if k.startswith(prefix)]
    media = [k for k in keys if not k.rsplit("/", 1)[-1].startswith(".")
             and k.rsplit(".", 1)[-1].lower() in ("mp4", "mov", "webm", "jpg", "png")]
    return sorted(f"s3://{bucket}/{k}" for k in media)


def test_nested_prefix_equals_serial(nested, s3_opts):
    entries = assert_same_listing(f"s3://{nested}/raw", s3_opts)
    assert [e["uri"] for e in entries] == expected_media(nested, "raw/")
    assert len(entries) == 3 + 5 * (1 + 4 * 7)
    assert all(e["source_version"].startswith("size=") and ";etag=" in e["source_version"] for e in entries)
    # a trailing slash lists the same keys; the whole bucket too
    assert listing(f"s3://{nested}/raw/", s3_opts, 8) == entries
    whole = assert_same_listing(f"s3://{nested}", s3_opts, workers=(4, 16))
    assert [e["uri"] for e in whole] == expected_media(nested, "")
    assert [e["uri"] for e in assert_same_listing(f"s3://{nested}/raw/s3/t1", s3_opts, workers=(4,))] == \
        expected_media(nested, "raw/s3/t1/")


def test_raw_find_equals_s3fs_find(nested, s3_opts):
    """Below the media filter: every object (placeholders, non-media) with the same info as s3fs's own find."""
    fs, path = storage.filesystem_for(f"s3://{nested}/raw", **s3_opts)
    fs.invalidate_cache()
    serial = fs.find(path, detail=True)
    failed: list[str] = []
    parallel = storage._s3_parallel_find(fs, path, failed, 4)
    assert failed == [] and sorted(parallel) == sorted(serial)
    assert all(parallel[k]["ETag"] == serial[k]["ETag"] and parallel[k]["size"] == serial[k]["size"] for k in serial)


def test_flat_empty_and_non_media_prefixes(s3_bucket, s3_opts):
    put(s3_bucket, [f"flat/{i:04d}.jpg" for i in range(250)] + ["flat/z.txt"]
        + [f"docs/{i}.txt" for i in range(30)] + ["docs/sub/readme.md"], s3_opts)
    flat = assert_same_listing(f"s3://{s3_bucket}/flat", s3_opts)
    assert [e["uri"] for e in flat] == [f"s3://{s3_bucket}/flat/{i:04d}.jpg" for i in range(250)]
    assert assert_same_listing(f"s3://{s3_bucket}/docs", s3_opts) == []
    for w in (1, 16):
        with pytest.raises(FileNotFoundError, match="nothing at"):
            listing(f"s3://{s3_bucket}/no-such-prefix", s3_opts, w)


def test_kinds_filter_is_the_same(nested, s3_opts):
    url = f"s3://{nested}/raw"
    images = listing(url, s3_opts, 1, kinds=["image"])
    assert [e["uri"] for e in images] == [f"s3://{nested}/raw//double-slash.jpg", f"s3://{nested}/raw/a b/space.png"]
    assert listing(url, s3_opts, 8, kinds=["image"]) == images


# ------------------------------------------------------------------------------------ concurrency, faults


def prefix_of(kwargs: dict) -> str:
    return kwargs.get("prefix", kwargs.get("Prefix", ""))


class Recorder:
    """Wraps the filesystem's find and call_s3 (the delimiter listings): counts calls in flight (each held
    ``hold_s``), records the prefix each call lists ("" for a find without one: the serial listing)."""

    def __init__(self, fs, monkeypatch, hold_s: float = 0.0, fault=None):
        self.lock, self.in_flight, self.max_in_flight, self.prefixes = threading.Lock(), 0, 0, []
        self.hold_s, self.fault = hold_s, fault
        for name in ("find", "call_s3"):
            monkeypatch.setattr(fs, name, self.wrap(getattr(fs, name)))

    def wrap(self, real):
        def call(path, *args, **kwargs):
            with self.lock:
                self.in_flight += 1
                self.max_in_flight = max(self.max_in_flight, self.in_flight)
                self.prefixes.append(prefix_of(kwargs))
            try:
                time.sleep(self.hold_s)
                if self.fault:
                    self.fault(path, kwargs)
                return real(path, *args, **kwargs)
            finally:
                with self.lock:
                    self.in_flight -= 1

        return call


def test_sub_prefix_calls_run_concurrently(nested, s3_opts, monkeypatch):
    url = f"s3://{nested}/raw"
    fs, _ = storage.filesystem_for(url, **s3_opts)
    serial = listing(url, s3_opts, 1)
    rec = Recorder(fs, monkeypatch, hold_s=0.2)
    assert listing(url, s3_opts, 4) == serial
    # raw/ has 8 sub-prefixes (>= 4 workers): one delimiter listing, then 8 recursive finds, 4 at a time
    assert rec.max_in_flight == 4
    assert sorted(rec.prefixes) == sorted(["raw/", "raw//", "raw/a b/", "raw/emptydir/"]
                                          + [f"raw/s{a}/" for a in range(5)])
    rec2 = Recorder(fs, monkeypatch, hold_s=0.05)
    assert listing(url, s3_opts, 1) == serial and rec2.max_in_flight == 1 and rec2.prefixes == [""]


def test_small_levels_are_split_further(nested, s3_opts, monkeypatch):
    """raw/s0/ has 4 sub-prefixes: with 16 workers it is split again (delimiter listings of each t*), and its
    u* prefixes are listed recursively."""
    url = f"s3://{nested}/raw/s0"
    fs, _ = storage.filesystem_for(url, **s3_opts)
    serial = listing(url, s3_opts, 1)
    rec = Recorder(fs, monkeypatch)
    assert listing(url, s3_opts, 16) == serial and len(serial) == 1 + 4 * 7
    assert sorted(rec.prefixes) == sorted(["raw/s0/"] + [f"raw/s0/t{b}/" for b in range(4)]
                                          + [f"raw/s0/t{b}/u{c}/" for b in range(4) for c in range(6)])


def test_a_dropped_sub_prefix_is_caught_by_the_equality_check(nested, s3_opts, monkeypatch):
    """The injected bug: the recursive listing of one sub-prefix comes back empty."""
    url = f"s3://{nested}/raw"
    fs, _ = storage.filesystem_for(url, **s3_opts)
    real_find = fs.find

    def drops_one(path, *args, **kwargs):
        if kwargs.get("prefix") == "raw/s2/":
            return {}
        return real_find(path, *args, **kwargs)

    monkeypatch.setattr(fs, "find", drops_one)
    with pytest.raises(AssertionError, match="list_workers=2"):
        assert_same_listing(url, s3_opts)


def test_transient_errors_are_retried_per_call(nested, s3_opts, monkeypatch):
    url = f"s3://{nested}/raw"
    fs, _ = storage.filesystem_for(url, **s3_opts)
    serial = listing(url, s3_opts, 1)
    failures: dict[str, int] = {}

    def flaky(path, kwargs):  # every call fails twice with a dropped connection, then succeeds
        key = repr(sorted(kwargs.items()))
        failures[key] = failures.get(key, 0) + 1
        if failures[key] <= 2:
            raise ConnectionResetError("connection reset by peer")

    monkeypatch.setattr(storage.time, "sleep", lambda s: None)
    Recorder(fs, monkeypatch, fault=flaky)
    assert listing(url, s3_opts, 4) == serial
    assert len(failures) == 1 + 8 and set(failures.values()) == {3}


def test_a_sub_prefix_that_cannot_be_listed_is_reported(nested, s3_opts, monkeypatch):
    url = f"s3://{nested}/raw"
    fs, _ = storage.filesystem_for(url, **s3_opts)
    serial = listing(url, s3_opts, 1)

    def denied(path, kwargs):
        if prefix_of(kwargs) in ("raw/s1/", "raw/s0/t2/"):
            raise PermissionError("Access Denied")

    Recorder(fs, monkeypatch, fault=denied)
    unreadable: list[str] = []
    got = listing(url, s3_opts, 4, unreadable=unreadable)
    assert unreadable == [f"s3://{nested}/raw/s1/"]
    assert [e for e in serial if "/raw/s1/" not in e["uri"]] == got
    unreadable = []
    got = listing(f"s3://{nested}/raw/s0", s3_opts, 16, unreadable=unreadable)  # a split level, denied
    assert unreadable == [f"s3://{nested}/raw/s0/t2/"] and len(got) == 1 + 3 * 7
    with pytest.raises(PermissionError):  # the prefix itself: an error, as with the serial listing
        listing(f"s3://{nested}/raw/s1", s3_opts, 4)


def test_list_workers_setting(nested, s3_opts, monkeypatch):
    url = f"s3://{nested}/raw"
    for bad in (0, -2, 1.5, "4", True):
        with pytest.raises(ValueError, match="list_workers"):
            storage.list_media(url, list_workers=bad, **s3_opts)
    fs, _ = storage.filesystem_for(url, **s3_opts)
    monkeypatch.setenv("MEDA_LIST_WORKERS", "1")
    rec = Recorder(fs, monkeypatch)
    storage.list_media(url, **s3_opts)
    assert rec.prefixes == [""]  # one recursive find: the serial listing
    monkeypatch.setenv("MEDA_LIST_WORKERS", "3")
    rec = Recorder(fs, monkeypatch, hold_s=0.1)
    assert storage.list_media(url, **s3_opts) == [e["uri"] for e in listing(url, s3_opts, 1)]
    assert rec.max_in_flight == 3
    monkeypatch.setenv("MEDA_LIST_WORKERS", "many")
    with pytest.raises(ValueError, match="MEDA_LIST_WORKERS"):
        storage.list_media(url, **s3_opts)


def test_local_listing_ignores_workers(tmp_path):
    (tmp_path / "d" / "e").mkdir(parents=True)
    for p in ("d/a.mp4", "d/e/b.png", "d/c.txt"):
        (tmp_path / p).write_bytes(b"x")
    assert storage.list_media(str(tmp_path / "d"), list_workers=1) == \
        storage.list_media(str(tmp_path / "d"), list_workers=16) == \
        [str(tmp_path / "d" / "a.mp4"), str(tmp_path / "d" / "e" / "b.png")]
