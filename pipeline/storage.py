"""Where media and manifests live: filesystems from URLs, listings, manifests, and stable clip ids.

URLs are local paths, ``file://``, ``s3://`` (s3fs; any S3-compatible store such as MinIO, Ceph or GCS's
interoperability endpoint through ``endpoint_url`` or ``AWS_ENDPOINT_URL``), or any other URL fsspec knows.
Every function taking a URL also takes the `filesystem_for` options (``endpoint_url``, ``key``, ``secret``,
``region``, ``anon``) as keyword arguments, so one ``storage_options`` dict travels through the pipeline.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import io
import json
import logging
import os
import posixpath
import random
import time
from typing import Any, Callable, Iterable, TypeVar

import fsspec
from fsspec.core import split_protocol

from meda_engine.media import IMAGE_EXTENSIONS, VIDEO_EXTENSIONS, sniff_kind

log = logging.getLogger(__name__)
T = TypeVar("T")

# botocore's own retries, on top of s3fs's: adaptive mode also rate-limits the client after throttling.
S3_RETRIES = {"max_attempts": 8, "mode": "adaptive"}
MANIFEST_FORMATS = {".parquet": "parquet", ".pq": "parquet", ".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl"}
COMPRESSION_SUFFIXES = (".gz", ".bz2", ".xz", ".zst")  # CSV and JSONL may be compressed (fsspec infers the codec)
KIND_EXTENSIONS = {"video": VIDEO_EXTENSIONS, "image": IMAGE_EXTENSIONS}

# Error codes and exception class names that mean "try again": throttling, server-side 5xx, dropped connections.
TRANSIENT_CODES = frozenset({
    "SlowDown", "Throttling", "ThrottlingException", "ThrottledException", "RequestThrottled",
    "RequestLimitExceeded", "TooManyRequestsException", "RequestTimeout", "RequestTimeoutException",
    "InternalError", "ServiceUnavailable", "BandwidthLimitExceeded", "500", "502", "503", "504",
})  # fmt: skip
TRANSIENT_NAMES = frozenset({
    "EndpointConnectionError", "ConnectionClosedError", "ReadTimeoutError", "ConnectTimeoutError",
    "ResponseStreamingError", "IncompleteReadError", "ServerDisconnectedError", "ClientConnectionError",
    "ClientPayloadError", "ClientOSError",
})  # fmt: skip


# ---------------------------------------------------------------------------------------------------------
# Filesystems


def filesystem_for(
    url: str,
    *,
    endpoint_url: str | None = None,
    key: str | None = None,
    secret: str | None = None,
    region: str | None = None,
    anon: bool | None = None,
) -> tuple[fsspec.AbstractFileSystem, str]:
    """(fsspec filesystem, path within it) for a URL.

    ``s3://`` (and ``s3a://``) use s3fs. Unset options fall back to the usual AWS sources: the endpoint to
    ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``, credentials and region to botocore's chain (environment,
    ``~/.aws``, instance roles). The path is ``bucket/key`` for S3 and an absolute path for local files.
    """
    protocol, path = split_protocol(url)
    if protocol in (None, "file", "local"):
        return fsspec.filesystem("file"), os.path.abspath(os.path.expanduser(path))
    if protocol in ("s3", "s3a"):
        return _s3(endpoint_url, key, secret, region, anon), path
    return fsspec.core.url_to_fs(url)


def _s3(endpoint_url, key, secret, region, anon) -> fsspec.AbstractFileSystem:
    import s3fs

    endpoint_url = endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    config: dict[str, Any] = {"retries": dict(S3_RETRIES)}
    if endpoint_url:
        # S3-compatible stores: path-style URLs need no wildcard DNS, and checksums only where S3 requires
        # them (the default "when_supported" CRC headers are rejected by some MinIO, Ceph and GCS versions).
        config.update(
            s3={"addressing_style": "path"},
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
    return s3fs.S3FileSystem(
        endpoint_url=endpoint_url,
        key=key,
        secret=secret,
        anon=bool(anon),
        client_kwargs={"region_name": region} if region else None,
        config_kwargs=config,
    )


def pyarrow_filesystem_for(url: str, **options: Any):
    """(pyarrow FileSystem, path) for a URL, for Ray Data and pyarrow writers; same options as `filesystem_for`.

    Local paths get pyarrow's native LocalFileSystem; anything else wraps the fsspec filesystem, so that
    endpoints, credentials and retries are resolved in one place.
    """
    import pyarrow.fs as pafs

    fs, path = filesystem_for(url, **options)
    if _is_local(url):
        return pafs.LocalFileSystem(), path
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path


def _is_local(url: str) -> bool:
    return split_protocol(url)[0] in (None, "file", "local")


def _to_url(url_like: str, path: str) -> str:
    """``path`` (as the filesystem of ``url_like`` names it) as a URL in the same style as ``url_like``."""
    protocol = split_protocol(url_like)[0]
    return path if protocol is None else f"{protocol}://{path}"


# ---------------------------------------------------------------------------------------------------------
# Retries and reads


def is_transient(exc: BaseException) -> bool:
    """True for errors worth retrying: dropped connections, timeouts, throttling (SlowDown) and 5xx answers.

    Looks through the exception's causes, because s3fs re-raises botocore errors as OSError.
    """
    for e in _causes(exc):
        if isinstance(e, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
            return False
        if isinstance(e, (ConnectionError, TimeoutError)):
            return True
        if any(cls.__name__ in TRANSIENT_NAMES for cls in type(e).__mro__):
            return True
        response = getattr(e, "response", None)
        if isinstance(response, dict):
            code = str(response.get("Error", {}).get("Code", ""))
            status = response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
            if code in TRANSIENT_CODES or status >= 500 or status == 429:
                return True
    return False


def _causes(exc: BaseException) -> Iterable[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def retry(
    fn: Callable[[], T],
    attempts: int = 5,
    backoff: float = 0.5,
    *,
    transient: Callable[[BaseException], bool] = is_transient,
) -> T:
    """Call ``fn()``; on a transient error wait ``backoff * 2**k`` seconds (with +-50 % jitter) and try again,
    up to ``attempts`` calls in all. Other errors, and the last attempt's, propagate unchanged."""
    if attempts < 1:
        raise ValueError(f"attempts must be >= 1, got {attempts}")
    attempt = 1
    while True:
        try:
            return fn()
        except Exception as e:
            if attempt >= attempts or not transient(e):
                raise
            delay = backoff * 2 ** (attempt - 1) * random.uniform(0.5, 1.5)
            log.warning("transient error (attempt %d/%d), retrying in %.2f s: %s", attempt, attempts, delay, e)
            time.sleep(delay)
            attempt += 1


def read_bytes(url: str, *, attempts: int = 5, **options: Any) -> bytes:
    """The whole object at ``url``, retrying transient errors."""
    fs, path = filesystem_for(url, **options)
    return retry(lambda: fs.cat_file(path), attempts)


# ---------------------------------------------------------------------------------------------------------
# Listing

# An object-store listing (S3 through s3fs) runs this many requests at once over sub-prefixes (see
# `list_media_entries`); MEDA_LIST_WORKERS overrides the default, the ``list_workers`` argument both.
LIST_WORKERS = 16
# It splits at most this many levels of sub-prefixes (delimiter listings) before listing each one recursively.
LIST_SPLIT_DEPTH = 3


def list_media(
    prefix_url: str, *, kinds: Iterable[str] = ("video", "image"), list_workers: int | None = None, **options: Any
) -> list[str]:
    """Full URLs of the media files under a prefix (recursively), sorted; a single file's URL gives itself.

    Media are recognised by extension (case-insensitive; see `KIND_EXTENSIONS`); hidden files (a name starting
    with ".", such as macOS "._clip.mp4" resource forks) are skipped. Raises FileNotFoundError when nothing
    exists at the prefix, and ValueError for a single file that is not media. ``list_workers``: see
    `list_media_entries`.
    """
    return [e["uri"] for e in list_media_entries(prefix_url, kinds=kinds, list_workers=list_workers, **options)]


def list_media_entries(
    prefix_url: str,
    *,
    kinds: Iterable[str] = ("video", "image"),
    unreadable: list[str] | None = None,
    list_workers: int | None = None,
    **options: Any,
) -> list[dict[str, Any]]:
    """`list_media` with what the listing says of each file: ``{uri, source_version}`` (size and ETag or
    mtime, see `source_version`; None when the listing has neither).

    Directories that cannot be listed (a local subdirectory without read permission, an S3 sub-prefix the
    credentials may not list) are appended to ``unreadable`` (as URLs) when a list is given, and logged as a
    warning either way: never silently lost.

    An S3 prefix is listed in parallel over its sub-prefixes, ``list_workers`` requests at once (default
    `LIST_WORKERS`, or MEDA_LIST_WORKERS), see `_s3_parallel_find`; ``list_workers=1`` lists it with one
    recursive listing, as before. Local directories are walked serially; other stores are listed with one
    recursive ``find``. The result does not depend on how the listing was split.
    """
    extensions = set().union(*(KIND_EXTENSIONS[k] for k in kinds))
    workers = _list_workers(list_workers)
    fs, path = filesystem_for(prefix_url, **options)
    if fs.isfile(path):
        if not _is_media(path, extensions):
            raise ValueError(f"{prefix_url} is not a media file (known extensions: {sorted(extensions)})")
        return [{"uri": _to_url(prefix_url, path), "source_version": source_version(retry(lambda: fs.info(path)))}]
    failed: list[str] = []
    if _is_local(prefix_url):
        found = _local_find(path, failed)
    elif workers > 1 and _splittable(fs):
        found = _s3_parallel_find(fs, path, failed, workers)
    else:
        found = retry(lambda: fs.find(path, detail=True))
    if not found and not fs.exists(path):
        raise FileNotFoundError(f"nothing at {prefix_url}")
    for d in sorted(set(failed)):
        log.warning("list_media: cannot list %s (its files are left out)", d)
        if unreadable is not None:
            unreadable.append(_to_url(prefix_url, str(d)))
    return [{"uri": _to_url(prefix_url, p), "source_version": source_version(found[p])}
            for p in sorted(found) if _is_media(p, extensions)]


def _list_workers(value: int | None) -> int:
    if value is None:
        env = os.environ.get("MEDA_LIST_WORKERS")
        try:
            value = int(env) if env else LIST_WORKERS
        except ValueError:
            raise ValueError(f"MEDA_LIST_WORKERS must be an integer >= 1, got {env!r}") from None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"list_workers must be an integer >= 1, got {value!r}")
    return value


def _splittable(fs: fsspec.AbstractFileSystem) -> bool:
    """True for an s3fs filesystem (not version-aware): its listings can be split over key prefixes."""
    try:
        import s3fs
    except ImportError:  # pragma: no cover - s3fs is a dependency
        return False
    return isinstance(fs, s3fs.S3FileSystem) and not fs.version_aware


def _s3_parallel_find(
    fs, path: str, failed: list[str], workers: int, *, split_until: int | None = None
) -> dict[str, dict[str, Any]]:
    """What ``fs.find(path, detail=True)`` returns ({path: info} of every object under the prefix), listed
    concurrently over sub-prefixes.

    The prefix is split with delimiter listings (ListObjectsV2 with Delimiter="/", through s3fs's client:
    the objects at that level and its common prefixes), level by level, each level's prefixes at once, until
    there are at least ``split_until`` (default ``workers``) sub-prefixes or `LIST_SPLIT_DEPTH` levels were
    split; then each remaining sub-prefix is listed recursively by s3fs's own ``find(bucket, prefix=...)``,
    ``workers`` at a time. Key prefixes are used byte for byte (a key "a//b" is found: s3fs's ``ls`` would
    strip the empty level), and every request (each page of a delimiter listing, each sub-prefix's find) goes
    through `retry`. A prefix whose keys are all at one level ("flat") is listed page by page, serially: S3
    gives no way to split it without knowing its keys (StartAfter ranges would need guessed split points).
    A sub-prefix that the credentials may not list (PermissionError) goes to ``failed``; the prefix's own
    errors propagate, as ``find``'s do.
    """
    from concurrent.futures import ThreadPoolExecutor

    bucket, key, _ = fs.split_path(fs._strip_protocol(path))
    if not bucket:
        raise ValueError("cannot list all of S3: give a bucket")
    root = key.lstrip("/") + "/" if key else ""  # the key prefix that s3fs's find(path) lists

    def split(prefix: str) -> tuple[dict[str, dict[str, Any]], list[str]]:
        files: dict[str, dict[str, Any]] = {}
        subs: list[str] = []
        request = {"Bucket": bucket, "Prefix": prefix, "Delimiter": "/"}
        try:
            while True:
                page = retry(lambda: fs.call_s3("list_objects_v2", **dict(request)))
                subs += [p["Prefix"] for p in page.get("CommonPrefixes", [])]
                for obj in page.get("Contents", []):  # the info s3fs's listings give an object
                    name = f"{bucket}/{obj['Key']}"
                    files[name] = {**obj, "Key": name, "name": name, "size": obj["Size"], "type": "file"}
                if not page.get("IsTruncated"):
                    return files, subs
                request["ContinuationToken"] = page["NextContinuationToken"]
        except PermissionError:
            if prefix == root:
                raise
            failed.append(f"{bucket}/{prefix}")
            return {}, []

    def walk(prefix: str) -> dict[str, dict[str, Any]]:
        try:
            return retry(lambda: fs.find(bucket, detail=True, prefix=prefix))
        except PermissionError:
            failed.append(f"{bucket}/{prefix}")
            return {}

    found: dict[str, dict[str, Any]] = {}
    frontier = [root]
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="meda-list") as pool:
        depth = 0
        while frontier and depth < LIST_SPLIT_DEPTH and (depth == 0 or len(frontier) < (split_until or workers)):
            level, frontier = frontier, []
            for files, subs in pool.map(split, level):
                found.update(files)
                frontier += subs
            depth += 1
        for files in pool.map(walk, frontier):
            found.update(files)
    return found


def _local_find(root: str, failed: list[str]) -> dict[str, dict[str, Any]]:
    """{path: {size, mtime}} of the files under a local directory; directories that cannot be listed go to
    ``failed`` (fsspec's find drops them silently, even with on_error: its recursion does not pass it on)."""
    found: dict[str, dict[str, Any]] = {}
    for d, _, names in os.walk(root, onerror=lambda e: failed.append(e.filename or str(e)), followlinks=True):
        for name in names:
            p = os.path.join(d, name)
            try:
                st = os.stat(p)
            except OSError:  # vanished, or a dangling link: the read reports it as that input's error
                st = None
            if st is None or not os.path.isdir(p):
                found[p] = {"size": st.st_size, "mtime": st.st_mtime} if st else {}
    return found


def source_version(info: dict[str, Any] | None) -> str | None:
    """What a listing (or stat) says of a file's bytes, as one comparable string: ``size=N;etag=E`` where the
    store gives an ETag (S3), else ``size=N;mtime=T``; None when it says neither. A rerun compares these to
    find inputs whose bytes changed; it costs no request beyond the listing."""
    if not info:
        return None
    size = info.get("size", info.get("Size"))
    etag = info.get("ETag") or info.get("etag")
    mtime = info.get("mtime") or info.get("LastModified") or info.get("last_modified")
    if etag:
        return f"size={size};etag={str(etag).strip(chr(34))}"
    if mtime is not None:
        mtime = mtime.timestamp() if hasattr(mtime, "timestamp") else float(mtime)
        return f"size={size};mtime={mtime:.6f}"
    return None if size is None else f"size={size}"


def _local_version(uri: str) -> str | None:
    """`source_version` of a local file by stat (cheap), None for remote URLs or a file that cannot be stat'ed."""
    if not _is_local(uri):
        return None
    try:
        st = os.stat(os.path.expanduser(split_protocol(uri)[1]))
    except OSError:
        return None
    return source_version({"size": st.st_size, "mtime": st.st_mtime})


def _is_media(path: str, extensions: set[str]) -> bool:
    name = posixpath.basename(path.rstrip("/"))
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in extensions


# ---------------------------------------------------------------------------------------------------------
# Manifests


def manifest_format(url: str) -> str | None:
    """"parquet", "csv" or "jsonl" from the URL's extension (compressed CSV/JSONL included), else None."""
    stem, ext = os.path.splitext(split_protocol(url)[1].lower())
    if ext in COMPRESSION_SUFFIXES:
        stem, ext = os.path.splitext(stem)
    return MANIFEST_FORMATS.get(ext)


def read_manifest(url: str, **options: Any) -> list[dict[str, Any]]:
    """Rows of a Parquet, CSV or JSONL manifest, each with ``uri`` (resolved) and ``prompt`` (or None).

    ``uri`` is required; a relative one is resolved against the manifest's directory. Other columns pass
    through unchanged, except that empty CSV cells become None (CSV has no null). The rows of
    `read_manifest_table` as dicts: for small manifests and tests; the job plans on the table.
    """
    return read_manifest_table(url, **options).to_pylist()


def read_manifest_table(url: str, *, row_groups: list[int] | None = None, row_offset: int = 0, **options: Any):
    """A Parquet, CSV or JSONL manifest as one Arrow table (never one Python object per row): ``uri``
    (stripped, resolved against the manifest's directory when relative) and ``prompt`` (empty -> null,
    added when absent) plus every other column as it is. CSV cells are read as strings (as Python's csv
    module gives them, so ``007`` stays ``007``), empty ones as null. JSONL is read by pyarrow; a file it
    cannot type (a column whose JSON type changes between lines) or parse is read line by line instead,
    which names the bad line. Raises ValueError for a missing ``uri`` column or an empty uri (naming the row).

    ``row_groups``: only these row groups of a Parquet manifest (one chunk of the distributed plan, whose
    first row is row ``row_offset`` of the file: error messages count from there).
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    fmt = manifest_format(url)
    if fmt is None:
        raise ValueError(f"{url}: unknown manifest format (expected one of {sorted(MANIFEST_FORMATS)})")
    fs, path = filesystem_for(url, **options)
    if row_groups is not None and fmt != "parquet":
        raise ValueError(f"{url}: row groups are a Parquet manifest's; this one is {fmt}")
    reader = {"parquet": _parquet_table, "csv": _csv_table, "jsonl": _jsonl_table}[fmt]
    if row_groups is not None:
        reader = functools.partial(_parquet_table, row_groups=row_groups)
    table = retry(lambda: reader(fs, path, url))
    _require_uri(table.column_names, url)
    uri = pc.utf8_trim_whitespace(_as_strings(table.column("uri")))
    empty = pc.fill_null(pc.equal(uri, ""), True)
    if pc.any(empty).as_py():
        n = pc.index(empty, True).as_py() + 1 + row_offset
        raise ValueError(f"{url}: row {n} has an empty uri")
    uri = _resolve_column(uri, _to_url(url, posixpath.dirname(path)))
    table = table.set_column(table.column_names.index("uri"), "uri", uri)
    prompt = (_null_if_empty(_as_strings(table.column("prompt"))) if "prompt" in table.column_names
              else pa.nulls(table.num_rows, pa.string()))
    return _put(table, "prompt", prompt)


def _parquet_table(fs, path: str, url: str, row_groups: list[int] | None = None):
    import pyarrow.parquet as pq

    with fs.open(path, "rb") as f:
        return pq.read_table(f) if row_groups is None else pq.ParquetFile(f).read_row_groups(row_groups)


def _csv_table(fs, path: str, url: str):
    import pyarrow as pa
    import pyarrow.csv as pacsv

    with fs.open(path, "rb", compression="infer") as raw:
        header = next(csv.reader(io.TextIOWrapper(raw, encoding="utf-8-sig", newline="")), [])
    _require_uri(header, url)
    # Every column as a string, empty cells null: what csv.DictReader gave (no type guessing).
    convert = pacsv.ConvertOptions(column_types={name: pa.string() for name in header}, strings_can_be_null=True,
                                   null_values=[""])
    with fs.open(path, "rb", compression="infer") as raw:
        return pacsv.read_csv(raw, convert_options=convert)  # a UTF-8 BOM (Excel) is skipped


def _jsonl_table(fs, path: str, url: str):
    import pyarrow as pa
    import pyarrow.json as pajson

    try:
        with fs.open(path, "rb", compression="infer") as raw:
            return pajson.read_json(raw)
    except pa.ArrowInvalid:  # a bad line, or mixed types: line by line, with the line's number in the error
        rows = _jsonl_rows(fs, path, url)
    names = list(dict.fromkeys(k for r in rows for k in r))
    columns = {}
    for name in names:
        values = [r.get(name) for r in rows]
        try:
            columns[name] = pa.array(values)
        except (pa.ArrowInvalid, pa.ArrowTypeError):  # one column, several JSON types: as text
            columns[name] = pa.array([None if v is None else v if isinstance(v, str) else json.dumps(v)
                                      for v in values], pa.string())
    return pa.table(columns) if columns else pa.table({"uri": pa.array([], pa.string())})


def _as_strings(column):
    """A column as UTF-8 strings (Arrow's cast; a string column as it is)."""
    import pyarrow as pa

    return column if column.type == pa.string() else column.cast(pa.string())


def _null_if_empty(column):
    import pyarrow.compute as pc

    return pc.if_else(pc.equal(column, ""), None, column)


def _put(table, name: str, column):
    """``table`` with column ``name`` set to ``column`` (replaced in place, or appended)."""
    if name in table.column_names:
        return table.set_column(table.column_names.index(name), name, column)
    return table.append_column(name, column)


def _resolve_column(uris, base_url: str):
    """`_resolve` over a column of uris: only the relative ones (usually none) go through Python."""
    import pyarrow as pa
    import pyarrow.compute as pc

    relative = pc.invert(pc.or_(pc.starts_with(uris, "/"), pc.match_substring(uris, "://")))
    if not pc.any(relative).as_py():
        return uris
    uris, relative = _flat(uris), _flat(relative)
    resolved = [_resolve(u, base_url) for u in pc.filter(uris, relative).to_pylist()]
    return pc.replace_with_mask(uris, relative, pa.array(resolved, pa.string()))


def _flat(column):
    """One Array of a ChunkedArray (the kernels that take a mask want arrays)."""
    import pyarrow as pa

    return column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column


def _jsonl_rows(fs, path: str, url: str) -> list[dict[str, Any]]:
    rows = []
    with fs.open(path, "rb", compression="infer") as raw:
        for n, line in enumerate(io.TextIOWrapper(raw, encoding="utf-8"), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{url}: line {n} is not valid JSON: {e}") from None
            if not isinstance(row, dict):
                raise ValueError(f"{url}: line {n} is not a JSON object")
            _require_uri(row.keys(), url, f"line {n}")
            rows.append(row)
    return rows


def _require_uri(columns: Iterable[str], url: str, where: str = "") -> None:
    columns = list(columns)
    if "uri" not in columns:
        at = f" ({where})" if where else ""
        raise ValueError(f"{url}{at}: manifest needs a 'uri' column; found {columns}")


def _resolve(uri: str, base_url: str) -> str:
    """``uri`` as is if it is a URL or an absolute path, else relative to ``base_url`` (a directory URL)."""
    if "://" in uri or os.path.isabs(uri):
        return uri
    protocol, base = split_protocol(base_url)
    joined = posixpath.normpath(posixpath.join(base, uri))
    return joined if protocol is None else f"{protocol}://{joined}"


# ---------------------------------------------------------------------------------------------------------
# Clip ids and the manifest the pipeline runs on


def normalize_uri(uri: str) -> str:
    """A canonical spelling: local paths become absolute ``file://`` URLs, protocols lower case, s3a -> s3.

    Object keys are kept byte for byte ("a//b" and "a/b" are different S3 keys).
    """
    protocol, path = split_protocol(uri.strip())
    if protocol in (None, "file", "local"):
        return "file://" + os.path.abspath(os.path.expanduser(path))
    protocol = protocol.lower()
    return f"{'s3' if protocol == 's3a' else protocol}://{path}"


def clip_id(uri: str, start: float | None = None, end: float | None = None) -> str:
    """Deterministic 16-hex-digit id of a clip: sha1 of the normalised uri, plus the segment if one is given."""
    text = normalize_uri(uri)
    if start is not None or end is not None:
        text += "#t=" + ",".join("" if t is None else f"{float(t):.3f}" for t in (start, end))
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:16]


def build_manifest(
    source: str,
    *,
    prompt: str | None = None,
    kinds: Iterable[str] = ("video", "image"),
    unreadable: list[str] | None = None,
    **options: Any,
) -> list[dict[str, Any]]:
    """The inputs of a run: rows ``{clip_id, uri, prompt, kind, source_version, ...}`` without duplicate clip ids.

    The rows of `build_manifest_table` as dicts (for small manifests and tests; the job plans on the table).
    """
    return build_manifest_table(source, prompt=prompt, kinds=kinds, unreadable=unreadable, **options).to_pylist()


def build_manifest_table(
    source: str,
    *,
    prompt: str | None = None,
    kinds: Iterable[str] = ("video", "image"),
    unreadable: list[str] | None = None,
    **options: Any,
):
    """The inputs of a run as one Arrow table: columns ``clip_id, uri, prompt, kind, source_version`` (strings)
    and every other column of the manifest, without duplicate clip ids; vectorised, no Python object per row
    except where a value must be computed (a clip id not given, a kind or version read from a local file,
    once per distinct uri).

    ``source`` is a manifest (by extension, see `read_manifest_table`) or a prefix / file to list
    (`list_media_entries`). ``clip_id`` comes from the row if given, else from `clip_id` (with the row's
    ``start`` / ``end``); ``prompt`` from the row, else the ``prompt`` argument; ``kind`` from the row, else
    from the extension (None when unknown: the reader decides after sniffing the bytes). ``source_version``
    (size + ETag/mtime, see `source_version`) comes from the listing, or a stat for a manifest's local files,
    else the row's own column, else None. Order: listing order (sorted) or manifest order; the first of
    duplicate clip ids wins. A file that cannot be read is still listed (its read fails later, as that input's
    error row); directories that cannot be listed go to ``unreadable`` (see `list_media_entries`).
    """
    if manifest_format(source):
        table = read_manifest_table(source, **options)
        given_version = "source_version" in table.column_names
    else:
        table = listing_table(source, kinds=kinds, unreadable=unreadable, **options)
        given_version = True
    return normalize_manifest_table(table, source, given_version=given_version, prompt=prompt)


def listing_table(source: str, *, kinds: Iterable[str] = ("video", "image"), unreadable: list[str] | None = None,
                  **options: Any):
    """The media files under ``source`` (`list_media_entries`) as an Arrow table: ``uri``, ``source_version``."""
    import pyarrow as pa

    entries = list_media_entries(source, kinds=kinds, unreadable=unreadable, **options)
    table = (pa.Table.from_pylist(entries) if entries
             else pa.table({"uri": pa.array([], pa.string()), "source_version": pa.array([], pa.string())}))
    return _put(table, "uri", _as_strings(table.column("uri")))


def normalize_manifest_table(table, source: str, *, given_version: bool, prompt: str | None = None):
    """The second half of `build_manifest_table`, on a table already read (a whole manifest or listing, or one
    chunk of it in the distributed plan): clip ids, duplicates dropped (the first row wins), prompt, kind and
    source version filled in. ``given_version``: the table's own ``source_version`` column counts (a listing's,
    or a manifest's that has one); otherwise local files are stat'ed."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    names = table.column_names

    def given(name: str):  # a string column, "" as null; all null when the manifest has no such column
        if name not in names:
            return pa.nulls(table.num_rows, pa.string())
        return _null_if_empty(_as_strings(table.column(name)))

    n, uri, cid = table.num_rows, table.column("uri"), given("clip_id")
    missing = pc.is_null(cid)
    if pc.any(missing).as_py():
        cid, missing = _flat(cid), _flat(missing)
        idx = pc.indices_nonzero(missing)
        seg = [table.column(c).take(idx).to_pylist() if c in names else [None] * len(idx) for c in ("start", "end")]
        made = [clip_id(u, s, e) for u, s, e in zip(uri.take(idx).to_pylist(), *seg)]
        cid = pc.replace_with_mask(cid, missing, pa.array(made, pa.string()))
    # The first of duplicate clip ids wins: the smallest row index of each id, in manifest order.
    if n and pc.count_distinct(cid).as_py() < n:
        first = pa.table({"clip_id": cid, "i": pa.array(np.arange(n, dtype=np.int64))}).group_by(
            "clip_id").aggregate([("i", "min")])
        keep = np.sort(first.column("i_min").to_numpy())
        log.info("build_manifest: dropped %d duplicate clip(s) from %s", n - len(keep), source)
        table, cid = table.take(keep), cid.take(keep)
        uri = table.column("uri")
    row_prompt = given("prompt")
    prompt_col = pc.fill_null(row_prompt, prompt) if prompt is not None else row_prompt
    kind = _fill_by_uri(given("kind"), uri, _sniff_kind)
    version = given("source_version") if given_version else pa.nulls(len(uri), pa.string())
    version = _fill_by_uri(version, uri, _local_version)
    fixed = {"clip_id": cid, "uri": uri, "prompt": prompt_col, "kind": kind, "source_version": version}
    rest = [c for c in table.column_names if c not in fixed]
    return pa.table({**fixed, **{c: table.column(c) for c in rest}})


def _fill_by_uri(values, uris, fn: Callable[[str], Any]):
    """``values`` with its nulls filled by ``fn(uri)`` (a string or None), called once per distinct uri."""
    import pyarrow as pa
    import pyarrow.compute as pc

    missing = pc.is_null(values)
    if not pc.any(missing).as_py():
        return values
    wanted = pc.unique(pc.filter(uris, missing))
    found = pa.array([fn(u) for u in wanted.to_pylist()], pa.string())
    filled = pc.take(found, pc.index_in(uris, value_set=wanted))
    return pc.coalesce(values, filled)


def _sniff_kind(uri: str) -> str | None:
    """`sniff_kind` of a uri; None (decided from the bytes when they are read) for a file that cannot be opened
    here: an unreadable input is that input's error row, never the whole job's failure."""
    try:
        return sniff_kind(uri)
    except OSError:
        return None


__all__ = [
    "build_manifest",
    "build_manifest_table",
    "listing_table",
    "normalize_manifest_table",
    "clip_id",
    "filesystem_for",
    "is_transient",
    "list_media",
    "list_media_entries",
    "manifest_format",
    "normalize_uri",
    "pyarrow_filesystem_for",
    "read_bytes",
    "read_manifest",
    "read_manifest_table",
    "retry",
    "source_version",
]
