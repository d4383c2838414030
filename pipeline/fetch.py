"""Media URLs from untrusted requests: which ones may be read (`MediaPolicy`), reading them within
limits, and decoding them into the engine's `Image` / `Video`.

A request may point the server at any URL, so every URL is checked before anything is read:

* the scheme must be allowed (``data``, ``s3`` and ``https`` by default; ``http`` and ``gs`` only when
  configured);
* an object-store URL's bucket must match ``allowed_buckets``; the object store itself (endpoint,
  credentials) is the operator's configuration, never the request's;
* an http(s) URL's host must match ``allowed_hosts``, and every address the name resolves to must be
  public: loopback, private, link-local (cloud metadata) and other non-global addresses are refused
  unless ``allow_private_networks`` is set. The connection then goes to the address that was checked,
  so a second DNS answer cannot redirect it (DNS rebinding), and redirects are not followed.

Nothing is allowed by default except inline ``data:`` URLs: an empty allow-list refuses everything.
"""

from __future__ import annotations

import base64
import binascii
import fnmatch
import http.client
import ipaddress
import socket
import ssl
import threading
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote_to_bytes, urlsplit

from meda_engine import Image, Video

OBJECT_STORE_SCHEMES = ("s3", "gs")
_CHUNK = 1 << 20


class MediaLoadError(ValueError):
    """A media part that cannot be used; ``status`` is the HTTP status to answer with."""

    status = 400
    code = "invalid_media"


class URLPolicyError(MediaLoadError):
    """The URL is not one this server may read."""

    code = "url_not_allowed"


class MediaTooLargeError(MediaLoadError):
    status = 413
    code = "media_too_large"


class FetchError(MediaLoadError):
    """The URL was allowed but could not be read."""

    code = "media_fetch_failed"


class DecodeError(MediaLoadError):
    code = "media_decode_failed"


@dataclass(frozen=True)
class MediaPolicy:
    """Which media URLs may be read, and how much of them."""

    allowed_schemes: tuple[str, ...] = ("data", "s3", "https")
    allowed_buckets: tuple[str, ...] = ()  # shell patterns matched against the bucket, e.g. "media-*"
    allowed_hosts: tuple[str, ...] = ()  # shell patterns matched against the host name, e.g. "*.example.com"
    allow_private_networks: bool = False  # http(s) only; for tests and trusted internal hosts
    max_bytes: int = 256 * 2**20  # per media object
    timeout_s: float = 30.0  # per http(s) fetch
    storage_options: dict[str, Any] = field(default_factory=dict)  # pipeline.storage.filesystem_for kwargs


# ---------------------------------------------------------------------------------------- policy
def check_url(url: str, policy: MediaPolicy) -> None:
    """Raise `URLPolicyError` unless ``url`` may be read under ``policy`` (addresses are checked at
    fetch time, when the name is resolved)."""
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme not in policy.allowed_schemes:
        allowed = ", ".join(policy.allowed_schemes)
        raise URLPolicyError(f"URL scheme {scheme or '(none)'!r} is not allowed (allowed: {allowed})")
    if scheme == "data":
        return
    parts = urlsplit(url)
    if scheme in OBJECT_STORE_SCHEMES:
        if not parts.netloc or not parts.path.strip("/"):
            raise URLPolicyError(f"object URL must look like {scheme}://bucket/key")
        if not _matches(parts.netloc, policy.allowed_buckets):
            raise URLPolicyError(f"bucket {parts.netloc!r} is not in this server's allowed buckets")
        return
    if scheme not in ("http", "https"):
        raise URLPolicyError(f"URL scheme {scheme!r} cannot be fetched")
    if parts.username is not None or parts.password is not None:
        raise URLPolicyError("URLs with credentials are not accepted")
    host = (parts.hostname or "").rstrip(".")
    if not host:
        raise URLPolicyError("URL has no host")
    if not _matches(host, policy.allowed_hosts):
        raise URLPolicyError(f"host {host!r} is not in this server's allowed hosts")


def _matches(name: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(name.lower(), p.lower()) for p in patterns)


def is_public_address(address: str) -> bool:
    """True for globally routable unicast addresses (an IPv4-mapped IPv6 address counts as its IPv4)."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])  # drop an IPv6 zone index
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


def resolve_host(host: str, port: int, *, allow_private: bool) -> str:
    """Resolve ``host`` and return the address to connect to; refuse if any address is not public."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise FetchError(f"cannot resolve host {host!r}: {e}") from None
    addresses = [info[4][0] for info in infos]
    if not allow_private:
        # All of them, not just the first: a name with one public and one private answer could
        # otherwise reach the private one through a retry or a different resolver order.
        blocked = sorted({a for a in addresses if not is_public_address(a)})
        if blocked:
            raise URLPolicyError(f"host {host!r} resolves to a non-public address ({blocked[0]}); refused")
    return addresses[0]


# ---------------------------------------------------------------------------------------- fetching
def fetch(url: str, policy: MediaPolicy) -> bytes:
    """The bytes behind an allowed URL, at most ``policy.max_bytes`` of them."""
    check_url(url, policy)
    scheme = url.split(":", 1)[0].lower()
    if scheme == "data":
        data = decode_data_url(url)
    elif scheme in OBJECT_STORE_SCHEMES:
        data = _fetch_object(url, policy)
    else:
        data = _fetch_http(url, policy)
    _check_size(len(data), policy.max_bytes)
    return data


def _check_size(n: int, limit: int) -> None:
    if n > limit:
        raise MediaTooLargeError(f"media object of {n} bytes exceeds this server's limit of {limit} bytes")


def decode_data_url(url: str) -> bytes:
    """The payload of ``data:[<mime>][;base64],<data>``."""
    head, sep, payload = url.partition(",")
    if not sep:
        raise FetchError("malformed data URL: no ',' before the payload")
    if head.lower().endswith(";base64"):
        try:
            return base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError) as e:
            raise FetchError(f"malformed base64 in data URL: {e}") from None
    return unquote_to_bytes(payload)


def _fetch_object(url: str, policy: MediaPolicy) -> bytes:
    from . import storage

    try:
        fs, path = storage.filesystem_for(url, **policy.storage_options)
        _check_size(int(fs.size(path)), policy.max_bytes)  # before reading, not after
        return storage.read_bytes(url, **policy.storage_options)
    except MediaLoadError:
        raise
    except FileNotFoundError:
        raise FetchError(f"no such object: {url}") from None
    except Exception as e:  # noqa: BLE001 - any storage failure is this request's error, not the server's
        raise FetchError(f"cannot read {url}: {type(e).__name__}: {e}"[:500]) from None


def _fetch_http(url: str, policy: MediaPolicy) -> bytes:
    """GET ``url`` under one deadline (``policy.timeout_s``) over connect, headers and the whole body:
    a watchdog closes the socket when it passes, so a server that trickles bytes cannot hold a thread
    longer than the timeout, however often it sends."""
    deadline = time.monotonic() + policy.timeout_s
    parts = urlsplit(url)
    https = parts.scheme.lower() == "https"
    host = parts.hostname or ""
    port = parts.port or (443 if https else 80)
    address = resolve_host(host, port, allow_private=policy.allow_private_networks)
    conn_cls = _PinnedHTTPSConnection if https else _PinnedHTTPConnection
    conn = conn_cls(host, port, address=address, timeout=max(deadline - time.monotonic(), 0.001))
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    watchdog = _Watchdog(conn, deadline)
    try:
        conn.request("GET", target, headers={"User-Agent": "meda-serve", "Accept": "*/*"})
        response = conn.getresponse()
        if 300 <= response.status < 400:
            raise FetchError(f"{url} answered with a redirect (HTTP {response.status}); redirects are not followed")
        if response.status != 200:
            raise FetchError(f"{url} answered HTTP {response.status}")
        length = response.getheader("Content-Length")
        if length and length.isdigit():
            _check_size(int(length), policy.max_bytes)
        data = _read_bounded(response, policy.max_bytes, deadline)
        if watchdog.fired:  # the socket was shut down under the read: what came is a fragment
            raise TimeoutError("deadline")
        if length and length.isdigit() and len(data) != int(length):
            raise FetchError(f"{url} sent {len(data)} of the {length} bytes it announced")
        return data
    except MediaLoadError:
        raise
    except (OSError, http.client.HTTPException, ValueError) as e:
        if watchdog.fired or time.monotonic() >= deadline:
            raise FetchError(f"fetching {_short(url)} took longer than the fetch timeout of {policy.timeout_s:g} s "
                             "(connect + whole body)") from None
        raise FetchError(f"cannot fetch {url}: {type(e).__name__}: {e}") from None
    finally:
        watchdog.cancel()
        conn.close()


class _Watchdog:
    """Shuts the connection's socket down at ``deadline``: a blocked connect or read returns at once."""

    def __init__(self, conn: http.client.HTTPConnection, deadline: float):
        self.fired = False
        self._conn = conn
        self._timer = threading.Timer(max(deadline - time.monotonic(), 0.0), self._fire)
        self._timer.daemon = True
        self._timer.start()

    def _fire(self) -> None:
        self.fired = True
        sock = self._conn.sock
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def cancel(self) -> None:
        self._timer.cancel()


def _read_bounded(response: http.client.HTTPResponse, limit: int, deadline: float) -> bytes:
    # read1 returns after one receive, so the deadline is checked as bytes arrive (the watchdog
    # covers a receive that blocks).
    chunks, total = [], 0
    while chunk := response.read1(_CHUNK):
        total += len(chunk)
        _check_size(total, limit)
        if time.monotonic() > deadline:
            raise FetchError("media download took longer than the fetch timeout")
        chunks.append(chunk)
    return b"".join(chunks)


class _PinnedHTTPConnection(http.client.HTTPConnection):
    """Connects to the already-checked ``address``, whatever the host name resolves to now."""

    def __init__(self, host: str, port: int, *, address: str, timeout: float):
        super().__init__(host, port, timeout=timeout)
        self._address = address

    def connect(self) -> None:
        self.sock = socket.create_connection((self._address, self.port), self.timeout)


class _PinnedHTTPSConnection(http.client.HTTPSConnection):
    """As `_PinnedHTTPConnection`, with TLS verified against the URL's host name."""

    def __init__(self, host: str, port: int, *, address: str, timeout: float):
        super().__init__(host, port, timeout=timeout)
        self._address = address
        self._tls = ssl.create_default_context()

    def connect(self) -> None:
        sock = socket.create_connection((self._address, self.port), self.timeout)
        self.sock = self._tls.wrap_socket(sock, server_hostname=self.host)


# ---------------------------------------------------------------------------------------- decoding
def load_image(url: str, policy: MediaPolicy, *, max_pixels: int | None = None,
               decode_timeout_s: float = 60.0) -> Image:
    """Fetch and decode one image."""
    return decode_image_bytes(fetch(url, policy), url, max_pixels=max_pixels, decode_timeout_s=decode_timeout_s)


def load_video(url: str, policy: MediaPolicy, *, frames: int | None, fps: float | None, max_frames: int,
               max_pixels: int | None = None, decode_timeout_s: float = 60.0) -> Video:
    """Fetch one video and sample ``frames`` evenly spaced frames, or frames at ``fps`` (at most
    ``max_frames``)."""
    return decode_video_bytes(fetch(url, policy), url, frames=frames, fps=fps, max_frames=max_frames,
                              max_pixels=max_pixels, decode_timeout_s=decode_timeout_s)


def decode_image_bytes(data: bytes, url: str, *, max_pixels: int | None = None,
                       decode_timeout_s: float = 60.0) -> Image:
    from meda_engine import media

    kwargs = {"max_pixels": max_pixels} if max_pixels else {}
    try:
        return Image(media.decode_with_timeout(media.decode_image, decode_timeout_s, data, **kwargs))
    except media.MediaDecodeError as e:  # corrupt, not media, too large, or timed out
        raise DecodeError(f"could not decode image {_short(url)}: {e}") from None


def decode_video_bytes(data: bytes, url: str, *, frames: int | None, fps: float | None, max_frames: int,
                       max_pixels: int | None = None, decode_timeout_s: float = 60.0) -> Video:
    from meda_engine import media

    kwargs = {"max_pixels": max_pixels} if max_pixels else {}
    try:
        decoded = media.decode_with_timeout(media.decode_video, decode_timeout_s, data, n_frames=frames, fps=fps,
                                            max_frames=max_frames, **kwargs)
    except media.MediaDecodeError as e:  # corrupt, not media, too large, or timed out
        raise DecodeError(f"could not decode video {_short(url)}: {e}") from None
    return Video(decoded.frames, fps=float(decoded.fps_sampled) if decoded.fps_sampled else None)


# ---------------------------------------------------------------------------------------- one request's media
class TooManyPixelsError(MediaLoadError):
    status = 413
    code = "too_many_pixels"


class ServerBusyError(MediaLoadError):
    status = 503
    code = "server_busy"


@dataclass(frozen=True)
class MediaItem:
    """One media part of a request: ``kind`` is "image" or "video"."""

    kind: str
    url: str


@dataclass(frozen=True)
class VideoPlan:
    frames: int | None
    fps: float | None
    max_frames: int


class MediaLoader:
    """Loads a request's media within bounds, in this order:

    1. check every URL against the policy (nothing is fetched if one is refused);
    2. fetch all of them concurrently (``fetch_threads``), each under one deadline;
    3. count the pixels decoding will hold, from the headers (`meda_engine.media.image_decode_pixels`;
       videos by their frame plan), and refuse a request above ``max_request_pixels`` (413);
    4. reserve that many pixels at once in the process-wide `PixelBudget` (``max_pixels_in_flight``),
       waiting up to ``wait_s`` for room (else 503), and decode with at most ``decode_concurrency``
       decodes running at once. The reservation is held until the caller leaves the `load` context.
    """

    def __init__(self, policy: MediaPolicy, *, max_pixels: int | None, max_request_pixels: int,
                 max_pixels_in_flight: int, decode_concurrency: int, fetch_threads: int, decode_timeout_s: float):
        from concurrent.futures import ThreadPoolExecutor

        from meda_engine import media

        self.policy = policy
        self.max_pixels = max_pixels
        self.max_request_pixels = max_request_pixels
        self.decode_timeout_s = decode_timeout_s
        self.budget = media.PixelBudget(max_pixels_in_flight)
        self._fetch_pool = ThreadPoolExecutor(fetch_threads, thread_name_prefix="meda-fetch")
        self._decode_pool = ThreadPoolExecutor(decode_concurrency, thread_name_prefix="meda-decode")

    def check(self, items: list[MediaItem]) -> None:
        for item in items:
            check_url(item.url, self.policy)

    def pixels(self, item: MediaItem, data: bytes, video: VideoPlan) -> int:
        from meda_engine import media

        if item.kind == "video":
            return media.video_decode_pixels(n_frames=video.frames, fps=video.fps, max_frames=video.max_frames,
                                             max_pixels=self.max_pixels)
        kwargs = {"max_pixels": self.max_pixels} if self.max_pixels else {}
        try:
            return media.image_decode_pixels(data, **kwargs)
        except media.MediaDecodeError as e:
            raise DecodeError(f"could not decode image {_short(item.url)}: {e}") from None

    def _decode(self, item: MediaItem, data: bytes, video: VideoPlan) -> Image | Video:
        if item.kind == "image":
            return decode_image_bytes(data, item.url, max_pixels=self.max_pixels,
                                      decode_timeout_s=self.decode_timeout_s)
        return decode_video_bytes(data, item.url, frames=video.frames, fps=video.fps, max_frames=video.max_frames,
                                  max_pixels=self.max_pixels, decode_timeout_s=self.decode_timeout_s)

    def load(self, items: list[MediaItem], video: VideoPlan, *, wait_s: float | None = None) -> "_Loading":
        """``async with loader.load(items, video) as media:`` the decoded `Image`/`Video` list."""
        return _Loading(self, items, video, self.decode_timeout_s if wait_s is None else wait_s)


class _Loading:
    def __init__(self, loader: MediaLoader, items: list[MediaItem], video: VideoPlan, wait_s: float):
        self.loader, self.items, self.video, self.wait_s = loader, items, video, wait_s
        self.reserved = 0

    async def __aenter__(self) -> list[Image | Video]:
        import asyncio

        ld = self.loader
        ld.check(self.items)
        if not self.items:
            return []
        loop = asyncio.get_running_loop()
        datas = await asyncio.gather(*[loop.run_in_executor(ld._fetch_pool, fetch, it.url, ld.policy)
                                       for it in self.items])
        counts = await asyncio.gather(*[loop.run_in_executor(ld._fetch_pool, ld.pixels, it, d, self.video)
                                        for it, d in zip(self.items, datas)])
        total = sum(counts)
        if total > ld.max_request_pixels:
            raise TooManyPixelsError(f"decoding this request's media needs {total} pixels; this server decodes at "
                                     f"most {ld.max_request_pixels} per request (send fewer or smaller images, "
                                     "or JPEGs, which decode downscaled)")
        await self._reserve(total)
        jobs = [loop.run_in_executor(ld._decode_pool, ld._decode, it, d, self.video) for it, d in zip(self.items, datas)]
        del datas
        try:
            return list(await asyncio.gather(*jobs))
        except BaseException:
            await asyncio.gather(*jobs, return_exceptions=True)  # no decode keeps running outside the budget
            self._release()
            raise

    async def _reserve(self, pixels: int) -> None:
        import asyncio

        deadline = time.monotonic() + self.wait_s
        budget = self.loader.budget
        while not budget.try_acquire(pixels):
            if time.monotonic() > deadline:
                raise ServerBusyError(f"the server is busy decoding other media ({budget.in_use} of {budget.limit} "
                                      f"pixels in use); retry later")
            await asyncio.sleep(0.02)
        self.reserved = pixels

    def _release(self) -> None:
        if self.reserved:
            self.loader.budget.release(self.reserved)
            self.reserved = 0

    async def __aexit__(self, *exc: Any) -> None:
        self._release()


def _short(url: str, n: int = 80) -> str:
    return url if len(url) <= n else url[: n - 3] + "..."
