"""Decode media bytes into the frames the engine takes: video ``(T, H, W, 3)`` uint8, image ``(H, W, 3)`` uint8.

No Ray, no fsspec, no HTTP: callers fetch the bytes (see ``pipeline.storage``) and run decoding where a hang
or a leak is contained (the pipeline uses Ray tasks with a timeout).

Video: decord 0.6.0 first (seek-based ``get_batch``), PyAV as the fallback on import failure, on any decord
error, or by choice (``backend="pyav"``). Both backends number frames the same way (by presentation time), so
they return the same source frames for the same request. Images: Pillow, with a pixel limit checked from the
header before any pixel is allocated.

Every failure caused by the input surfaces as `MediaDecodeError` with a readable reason.
"""

from __future__ import annotations

import io
import math
import os
import threading
import time
from bisect import bisect_right
from dataclasses import dataclass
from typing import IO, Any, Callable, Literal, TypeVar

import numpy as np

# Per-frame cap: the engine's Qwen-VL video preprocessing never uses more than 768*28*28 pixels per frame
# (see models/vision.py), so decoding larger frames only costs memory.
DEFAULT_VIDEO_MAX_PIXELS = 768 * 28 * 28
# Images: a generous cap above any Qwen-VL image budget the engine uses (1280*28*28).
DEFAULT_IMAGE_MAX_PIXELS = 2048 * 2048
# Decompression-bomb guard: Pillow's own default warning threshold (~89.5 MP, 0.25 GB as RGB).
DEFAULT_IMAGE_SOURCE_PIXEL_LIMIT = 89_478_485

VIDEO_EXTENSIONS = frozenset({".mp4", ".mkv", ".webm", ".avi", ".mov", ".m4v"})
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif"})

Backend = Literal["auto", "decord", "pyav"]
MediaInput = bytes | bytearray | memoryview | str | os.PathLike | IO[bytes]
T = TypeVar("T")

# ISO-BMFF brands that hold still images (HEIF/AVIF), not video, although they share the "ftyp" box.
_IMAGE_BRANDS = frozenset({b"heic", b"heix", b"heim", b"heis", b"mif1", b"msf1", b"avif", b"avis"})
# QuickTime files may start with one of these atoms instead of "ftyp".
_QUICKTIME_ATOMS = frozenset({b"moov", b"mdat", b"wide", b"free", b"skip", b"pnot"})
_HEAD_BYTES = 512


class MediaDecodeError(ValueError):
    """The input cannot be decoded into frames; the message says why (empty, corrupt, not media, too large...)."""


@dataclass(frozen=True)
class DecodedVideo:
    frames: np.ndarray  # (T, H, W, 3) uint8, RGB
    indices: np.ndarray  # (T,) int64: source frame index of each returned frame (presentation order)
    fps_sampled: float  # rate of the returned frames in video time: T / duration_s
    source_fps: float
    duration_s: float  # n_source_frames / source_fps
    n_source_frames: int
    backend_used: str  # "decord" or "pyav"
    decode_s: float  # wall time of the decode call


# ---------------------------------------------------------------------------------------------------------
# Sniffing and input handling


def sniff_kind(data_or_name: MediaInput, name: str | None = None) -> Literal["video", "image"] | None:
    """Say whether bytes (or a file) hold a video or an image, from magic bytes; the extension is a hint.

    Bytes are judged by their first bytes, falling back to ``name``'s extension. A local path is judged by
    its content when it exists, else by its extension; any other string (a URL) by its extension only.
    Returns None when neither tells.
    """
    if isinstance(data_or_name, (bytes, bytearray, memoryview)):
        return _kind_from_magic(bytes(data_or_name[:64])) or (_kind_from_name(name) if name else None)
    name = os.fspath(data_or_name)
    if os.path.isfile(name):
        with open(name, "rb") as f:
            kind = _kind_from_magic(f.read(64))
        if kind:
            return kind
    return _kind_from_name(name)


def _kind_from_name(name: str) -> Literal["video", "image"] | None:
    ext = os.path.splitext(name.split("?", 1)[0])[1].lower()  # a URL's query string is not part of the name
    return "video" if ext in VIDEO_EXTENSIONS else "image" if ext in IMAGE_EXTENSIONS else None


def _kind_from_magic(head: bytes) -> Literal["video", "image"] | None:
    if head[4:8] == b"ftyp":
        return "image" if head[8:12] in _IMAGE_BRANDS else "video"
    if head.startswith((b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF87a", b"GIF89a", b"II*\x00", b"MM\x00*")):
        return "image"
    if head.startswith(b"BM") and head[6:10] == b"\x00\x00\x00\x00":  # BMP: "BM" alone is too common a start
        return "image"
    if head.startswith(b"RIFF") and head[8:12] in (b"WEBP", b"AVI "):
        return "image" if head[8:12] == b"WEBP" else "video"
    if head.startswith((b"\x1a\x45\xdf\xa3", b"FLV", b"\x00\x00\x01\xba", b"\x30\x26\xb2\x75")):
        return "video"  # Matroska/WebM, FLV, MPEG-PS, ASF/WMV
    if head[4:8] in _QUICKTIME_ATOMS:
        return "video"
    return None


def _looks_like_text(head: bytes) -> bool:
    """True for bytes that decode as UTF-8 text (media headers contain NULs and control bytes)."""
    if not head or b"\x00" in head:
        return False
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as e:
        if e.start < len(head) - 3:  # tolerate a multi-byte character cut at the end of the head
            return False
        text = head[: e.start].decode("utf-8")
    return all(c.isprintable() or c in "\r\n\t" for c in text)


def _load(data: MediaInput) -> tuple[bytes | str, bytes]:
    """Normalise the input to bytes or a local path, and return it with its first bytes.

    File-like objects are read whole: decord copies them into memory anyway, and the PyAV fallback must be
    able to read them a second time.
    """
    if isinstance(data, (bytes, bytearray, memoryview)):
        source: bytes | str = bytes(data)
        head = source[:_HEAD_BYTES]
    elif isinstance(data, (str, os.PathLike)):
        source = os.fspath(data)
        try:
            with open(source, "rb") as f:
                head = f.read(_HEAD_BYTES)
        except OSError as e:
            raise MediaDecodeError(f"cannot read {source!r}: {e}") from e
    elif hasattr(data, "read"):
        source = data.read()
        head = source[:_HEAD_BYTES]
    else:
        raise TypeError(f"expected bytes, a path or a binary file object, got {type(data).__name__}")
    if not head:
        raise MediaDecodeError("empty input (0 bytes)")
    return source, head


def fit_within(width: int, height: int, max_pixels: int | None) -> tuple[int, int]:
    """(width, height) scaled down, aspect kept, so that width * height <= max_pixels; unchanged if it fits."""
    if max_pixels is None or width * height <= max_pixels:
        return width, height
    scale = math.sqrt(max_pixels / (width * height))
    return max(1, int(width * scale)), max(1, int(height * scale))


# ---------------------------------------------------------------------------------------------------------
# Frame sampling


def sample_indices(
    n_source: int, source_fps: float, *, n_frames: int | None = 16, fps: float | None = None, max_frames: int = 256
) -> np.ndarray:
    """Source frame indices to keep, (T,) int64, increasing and distinct.

    - ``fps`` given: one frame every ``source_fps / fps`` source frames from the start (``fps`` is capped at
      ``source_fps``); ``n_frames`` is then ignored.
    - else ``n_frames`` given: that many frames spread uniformly from the first to the last frame.
    - neither: every frame.
    Whenever that would exceed ``max_frames``, ``max_frames`` frames are spread uniformly over the whole clip
    instead (a lower rate rather than a cut-off clip: a caption should cover the whole video).
    """
    _check_sampling(n_frames, fps, max_frames)
    if fps is not None:
        if source_fps <= 0:
            raise MediaDecodeError("the video reports no frame rate, so it cannot be sampled at a given fps")
        step = max(1.0, source_fps / fps)
        count = math.ceil(n_source / step - 1e-9)
        if count <= max_frames:
            return np.floor(np.arange(count) * step).astype(np.int64)
        want = max_frames
    else:
        want = min(n_source if n_frames is None else n_frames, max_frames)
    return np.unique(np.round(np.linspace(0, n_source - 1, min(want, n_source))).astype(np.int64))


def _check_sampling(n_frames: int | None, fps: float | None, max_frames: int) -> None:
    if max_frames < 1 or (n_frames is not None and n_frames < 1) or (fps is not None and fps <= 0):
        raise ValueError(f"need n_frames >= 1, fps > 0 and max_frames >= 1, got {n_frames}, {fps}, {max_frames}")


# ---------------------------------------------------------------------------------------------------------
# Video


def decode_video(
    data: MediaInput,
    *,
    n_frames: int | None = 16,
    fps: float | None = None,
    max_frames: int = 256,
    max_pixels: int | None = DEFAULT_VIDEO_MAX_PIXELS,
    backend: Backend = "auto",
    threads: int = 0,
) -> DecodedVideo:
    """Decode sampled frames of a video given as bytes, a local path or a binary file object.

    Sampling follows `sample_indices`. Frames above ``max_pixels`` are downscaled (aspect kept, bicubic) by the
    decoder. ``threads`` is the decoder's thread count (0: its own choice). ``backend="auto"`` tries decord,
    then PyAV. Raises `MediaDecodeError` for anything wrong with the input.
    """
    if backend not in ("auto", "decord", "pyav"):
        raise ValueError(f"backend must be auto, decord or pyav, got {backend!r}")
    _check_sampling(n_frames, fps, max_frames)
    start = time.perf_counter()
    source, head = _load(data)
    _refuse_non_video(head)
    plan = dict(n_frames=n_frames, fps=fps, max_frames=max_frames)
    decoders = {"decord": _decode_decord, "pyav": _decode_pyav}
    order = ["decord", "pyav"] if backend == "auto" else [backend]
    failures = []
    for name in order:
        try:
            frames, idx, n_source, source_fps = decoders[name](source, plan, max_pixels, threads)
        except Exception as e:  # noqa: BLE001 - any decoder failure means: try the next one, then report all
            failures.append((name, e))
            continue
        duration_s = n_source / source_fps if source_fps > 0 else 0.0
        return DecodedVideo(
            frames=frames,
            indices=idx,
            fps_sampled=len(idx) / duration_s if duration_s else 0.0,
            source_fps=source_fps,
            duration_s=duration_s,
            n_source_frames=n_source,
            backend_used=name,
            decode_s=time.perf_counter() - start,
        )
    raise _combine(failures)


def _refuse_non_video(head: bytes) -> None:
    """Fail fast, with a precise reason, on inputs that are clearly not video."""
    if sniff_kind(head) == "image":
        raise MediaDecodeError("the input is an image, not a video (use decode_image)")
    if _looks_like_text(head):
        raise MediaDecodeError(f"the input is text, not a video (starts with {head[:32]!r})")


def _combine(failures: list[tuple[str, Exception]]) -> MediaDecodeError:
    """One error for all backends' failures: the reason a backend diagnosed itself, else a generic one,
    followed by what each backend raised."""
    own = [e for _, e in failures if isinstance(e, MediaDecodeError)]
    reason = str(own[-1]) if own else "unsupported, truncated or corrupt video"
    detail = "; ".join(f"{name}: {type(e).__name__}: {_first_line(e)}" for name, e in failures)
    err = MediaDecodeError(f"{reason} [{detail}]")
    err.__cause__ = failures[-1][1]
    return err


def _first_line(e: Exception, limit: int = 200) -> str:
    """An exception's message without the C++ stack traces decord appends."""
    lines = str(e).strip().splitlines()
    return lines[0][:limit] if lines else ""


def _decode_decord(source: bytes | str, plan: dict, max_pixels: int | None, threads: int):
    """(frames (T,H,W,3) uint8, indices (T,), n_source, source_fps) with decord's seek-based get_batch."""
    import decord

    def open_reader(width: int = -1, height: int = -1):
        src = io.BytesIO(source) if isinstance(source, bytes) else source
        try:
            return decord.VideoReader(src, width=width, height=height, num_threads=threads)
        except AssertionError as e:  # decord asserts on a frame count of zero
            raise MediaDecodeError("the video has zero frames") from e
        except decord.DECORDError as e:
            if "cannot find video stream" in str(e):
                raise MediaDecodeError("the file has no video stream") from e
            raise

    vr = open_reader()
    n_source, source_fps = len(vr), float(vr.get_avg_fps())
    _check_complete(_declared_frames(source), n_source)
    height, width = vr[0].shape[:2]  # decord exposes no frame size without decoding one frame
    size = fit_within(width, height, max_pixels)
    if size != (width, height):
        vr = open_reader(*size)  # decord scales while decoding, so full-size frames are never held
    else:
        vr.seek(0)
    idx = sample_indices(n_source, source_fps, **plan)
    frames = vr.get_batch(idx.tolist()).asnumpy()
    vr.seek(0)  # releases decoder buffers; works around decord's memory growth after get_batch (dmlc/decord#208)
    return frames, idx, n_source, source_fps


def _decode_pyav(source: bytes | str, plan: dict, max_pixels: int | None, threads: int):
    """(frames (T,H,W,3) uint8, indices (T,), n_source, source_fps) with PyAV.

    One demux pass (no decoding) lists every frame's timestamp and the keyframes, which numbers frames the way
    decord does; `_frames_at` then seeks and decodes. Only the wanted frames are converted and kept.
    """
    import av

    with av.open(io.BytesIO(source) if isinstance(source, bytes) else source) as container:
        if not container.streams.video:
            raise MediaDecodeError("the file has no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        stream.codec_context.thread_count = threads
        declared = stream.frames
        stamps, keyframes, n_packets = _frame_table(container, stream)
        if not stamps:
            raise MediaDecodeError("the video has zero frames")
        _check_complete(declared, n_packets)
        source_fps = _pyav_fps(stream, stamps)
        idx = sample_indices(len(stamps), source_fps, **plan)
        width, height = fit_within(stream.codec_context.width, stream.codec_context.height, max_pixels)
        frames = np.empty((len(idx), height, width, 3), np.uint8)  # filled in place: no list, no stacking copy
        for k, frame in enumerate(_frames_at(container, stream, stamps, idx, keyframes)):
            frames[k] = frame.to_ndarray(format="rgb24", width=width, height=height, interpolation="BICUBIC")
    return frames, idx, len(stamps), source_fps


def _frame_stamp(item) -> int | None:
    """A packet's or frame's position: pts, or dts for containers (AVI) that leave pts unset."""
    return item.pts if item.pts is not None else item.dts


def _frame_table(container, stream) -> tuple[list[int], list[int], int]:
    """(every frame's timestamp in presentation order, keyframe timestamps, both sorted; the number of non-empty
    packets, discarded ones included), from packets only."""
    stamps, keyframes, n_packets = [], [], 0
    for packet in container.demux(stream):
        n_packets += packet.size > 0
        stamp = _frame_stamp(packet)
        if packet.size == 0 or stamp is None or packet.is_discard:  # flush packets carry no frame
            continue
        stamps.append(stamp)
        if packet.is_keyframe:
            keyframes.append(stamp)
    return sorted(stamps), sorted(keyframes), n_packets


def _declared_frames(source: bytes | str) -> int:
    """The frame count the container's header declares (0: it declares none, or PyAV cannot say)."""
    try:
        import av

        with av.open(io.BytesIO(source) if isinstance(source, bytes) else source) as container:
            return int(container.streams.video[0].frames) if container.streams.video else 0
    except Exception:  # noqa: BLE001 - only a cross-check: the decoder's own errors stay the diagnosis
        return 0


def _check_complete(declared: int, present: int) -> None:
    """Refuse a video whose data ends before the frames its index declares.

    A file cut at a packet boundary (an interrupted upload of a faststart mp4, whose index comes first) demuxes
    and decodes without an error in FFmpeg: it only drops the index entries past the end of the file. Without
    this check such a clip would pass as a shorter one.
    """
    if declared > 0 and present < declared:
        raise MediaDecodeError(f"the video is truncated: its index declares {declared} frames, the data holds {present}")


def _pyav_fps(stream, stamps: list[int]) -> float:
    rate = stream.average_rate or stream.guessed_rate
    if rate:
        return float(rate)
    span = (stamps[-1] - stamps[0]) * stream.time_base if len(stamps) > 1 else 0
    return float((len(stamps) - 1) / span) if span else 0.0


def _frames_at(container, stream, stamps: list[int], idx: np.ndarray, keyframes: list[int]):
    """Yield the decoded frames number ``idx`` (increasing) of the frame table ``stamps``.

    It seeks to the keyframe before a wanted frame only when that keyframe lies beyond the next frame the
    decoder would produce anyway, so dense sampling decodes straight through and sparse sampling skips.
    """
    frames, next_stamp = None, None
    for i in idx.tolist():
        target = stamps[i]
        pos = bisect_right(keyframes, target) - 1
        key = keyframes[pos] if pos >= 0 else None
        seeked = frames is None or (key is not None and key > next_stamp)
        if seeked:
            frames = _seek_and_decode(container, stream, key)
        frame = _next_at_or_after(frames, target)
        if seeked and key is not None and (frame is None or _frame_stamp(frame) > target):
            # The seek landed past the target (an odd index): decode from the start instead.
            frames = _seek_and_decode(container, stream, None)
            frame = _next_at_or_after(frames, target)
        if frame is None:
            raise MediaDecodeError(f"the video ends before frame {i} of {len(stamps)}: truncated or corrupt")
        yield frame
        next_stamp = stamps[min(i + 1, len(stamps) - 1)]


def _seek_and_decode(container, stream, stamp: int | None):
    """A frame iterator starting at the keyframe at or before ``stamp`` (None: the start of the file)."""
    if stamp is None:
        container.seek(0)
    else:
        container.seek(stamp, stream=stream, backward=True, any_frame=False)
    return container.decode(stream)


def _next_at_or_after(frames, target: int):
    """Advance the iterator to the first frame with timestamp >= target; None if the stream ends first."""
    for frame in frames:
        stamp = _frame_stamp(frame)
        if stamp is not None and stamp >= target:
            return frame
    return None


# ---------------------------------------------------------------------------------------------------------
# Images


def decode_image(
    data: MediaInput,
    *,
    max_pixels: int | None = DEFAULT_IMAGE_MAX_PIXELS,
    max_source_pixels: int = DEFAULT_IMAGE_SOURCE_PIXEL_LIMIT,
) -> np.ndarray:
    """Decode an image into (H, W, 3) uint8 RGB, downscaled (aspect kept) to at most ``max_pixels``.

    Images whose header declares more than ``max_source_pixels`` are refused before their pixels are
    allocated (decompression bombs); Pillow's process-wide ``Image.MAX_IMAGE_PIXELS`` guard applies as well.
    EXIF orientation is applied; transparency is composited on white; animations give their first frame.
    """
    from PIL import Image, UnidentifiedImageError

    source, head = _load(data)
    if sniff_kind(head) == "video":
        raise MediaDecodeError("the input is a video, not an image (use decode_video)")
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as img:
            width, height = img.size  # from the header: nothing is decoded yet
            if width * height > max_source_pixels:
                raise MediaDecodeError(_too_large(width, height, max_source_pixels))
            return _to_rgb_array(img, max_pixels)
    except Image.DecompressionBombError as e:
        raise MediaDecodeError(f"image too large: {e}") from e
    except UnidentifiedImageError as e:
        reason = "text" if _looks_like_text(head) else "not an image format Pillow can read"
        raise MediaDecodeError(f"unsupported image: {reason} (starts with {head[:16]!r})") from e
    except MediaDecodeError:
        raise
    except Exception as e:  # noqa: BLE001 - truncated or corrupt data surfaces as OSError, SyntaxError, ...
        raise MediaDecodeError(f"truncated or corrupt image: {type(e).__name__}: {e}") from e


def _too_large(width: int, height: int, limit: int) -> str:
    return f"image too large: {width}x{height} = {width * height} pixels exceeds the limit of {limit}"


def _to_rgb_array(img, max_pixels: int | None) -> np.ndarray:
    """Decode an opened Pillow image to (H, W, 3) uint8, downscaling within max_pixels."""
    from PIL import Image, ImageOps

    target = fit_within(*img.size, max_pixels)
    if target != img.size:
        img.draft("RGB", target)  # JPEG: let the decoder itself scale by 1/2..1/8, far cheaper than a full decode
    img = ImageOps.exif_transpose(img)
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        img = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    img = img.convert("RGB")
    target = fit_within(*img.size, max_pixels)  # the size after draft and a possible 90-degree rotation
    if target != img.size:
        img = img.resize(target, Image.Resampling.BICUBIC, reducing_gap=3.0)
    return np.asarray(img, dtype=np.uint8)


# ---------------------------------------------------------------------------------------------------------
# Timeout


def decode_with_timeout(fn: Callable[..., T], timeout_s: float, *args: Any, **kwargs: Any) -> T:
    """Run ``fn(*args, **kwargs)`` in a daemon thread and wait at most ``timeout_s`` seconds for it.

    On timeout this raises `MediaDecodeError` but cannot stop the thread: a hung C decoder keeps running (and
    holding its memory) until it returns or the process exits. It only helps if the decoder releases the GIL,
    as FFmpeg calls in PyAV and decord do. For hard isolation run decoding in a separate process (the pipeline
    uses Ray tasks) and kill it.
    """
    result: dict[str, Any] = {}

    def target() -> None:
        try:
            result["value"] = fn(*args, **kwargs)
        except BaseException as e:  # noqa: BLE001 - handed to the waiting caller
            result["error"] = e

    worker = threading.Thread(target=target, name="decode_with_timeout", daemon=True)
    worker.start()
    worker.join(timeout_s)
    if worker.is_alive():
        raise MediaDecodeError(f"decoding timed out after {timeout_s:g} s (the decoder thread is left running)")
    if "error" in result:
        raise result["error"]
    return result["value"]


# ---------------------------------------------------------------------------------------------------------
# Pixel budgets: what decoding may hold, counted before anything is decoded


def image_decode_pixels(data: MediaInput, *, max_pixels: int | None = DEFAULT_IMAGE_MAX_PIXELS) -> int:
    """Pixels `decode_image` will hold at its peak for this image: the source size after the decoder's own
    downscaling (JPEG ``draft`` scales by 1/2..1/8 while decoding; PNG, WebP and the rest decode at full
    size), read from the header only. Raises `MediaDecodeError` for what is not a readable image."""
    from PIL import Image

    source, head = _load(data)
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as img:
            target = fit_within(*img.size, max_pixels)
            if target != img.size:
                img.draft("RGB", target)  # header-level: sets the decode scale, decodes nothing
            width, height = img.size
    except Exception as e:  # noqa: BLE001 - decode_image reports the precise reason; here: unreadable
        raise MediaDecodeError(f"unreadable image header: {type(e).__name__}: {e}") from e
    return width * height


def video_decode_pixels(*, n_frames: int | None, fps: float | None, max_frames: int,
                        max_pixels: int | None = DEFAULT_VIDEO_MAX_PIXELS) -> int:
    """An upper bound on the pixels `decode_video` holds for one video with these settings (frames are
    scaled by the decoder to at most ``max_pixels`` each, so the bound needs no header)."""
    frames = max_frames if (fps is not None or n_frames is None) else min(n_frames, max_frames)
    return frames * (max_pixels or DEFAULT_VIDEO_MAX_PIXELS)


class PixelBudgetTimeout(MediaDecodeError):
    """No room in the pixel budget before the timeout (the server is busy decoding other media)."""


class PixelBudget:
    """A process-wide bound on decoded pixels: callers reserve what they will decode before decoding it
    and wait while others hold the room. Thread-safe; one instance per process (or per server).

    ``peak`` is the largest amount ever reserved at once (never above ``limit``).
    """

    def __init__(self, limit: int):
        if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
            raise ValueError(f"limit must be an integer >= 1, got {limit!r}")
        self.limit = limit
        self.in_use = 0
        self.peak = 0
        self._cond = threading.Condition()

    def acquire(self, pixels: int, timeout_s: float | None = None) -> None:
        """Reserve ``pixels`` (all at once: no partial holds, so two callers cannot deadlock)."""
        if pixels > self.limit:
            raise ValueError(f"{pixels} pixels can never fit the budget of {self.limit}")
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        with self._cond:
            while self.in_use + pixels > self.limit:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise PixelBudgetTimeout(f"no room to decode {pixels} pixels within {timeout_s:g} s "
                                             f"({self.in_use} of {self.limit} in use)")
                self._cond.wait(left)
            self.in_use += pixels
            self.peak = max(self.peak, self.in_use)

    def try_acquire(self, pixels: int) -> bool:
        """Reserve ``pixels`` if they fit now; never waits (for asyncio callers, which poll)."""
        if pixels > self.limit:
            raise ValueError(f"{pixels} pixels can never fit the budget of {self.limit}")
        with self._cond:
            if self.in_use + pixels > self.limit:
                return False
            self.in_use += pixels
            self.peak = max(self.peak, self.in_use)
            return True

    def release(self, pixels: int) -> None:
        with self._cond:
            if pixels > self.in_use:
                raise ValueError(f"releasing {pixels} pixels, but only {self.in_use} are reserved")
            self.in_use -= pixels
            self._cond.notify_all()


__all__ = [
    "DEFAULT_IMAGE_MAX_PIXELS",
    "DEFAULT_IMAGE_SOURCE_PIXEL_LIMIT",
    "DEFAULT_VIDEO_MAX_PIXELS",
    "IMAGE_EXTENSIONS",
    "VIDEO_EXTENSIONS",
    "DecodedVideo",
    "MediaDecodeError",
    "PixelBudget",
    "PixelBudgetTimeout",
    "decode_image",
    "decode_video",
    "decode_with_timeout",
    "fit_within",
    "image_decode_pixels",
    "sample_indices",
    "sniff_kind",
    "video_decode_pixels",
]
