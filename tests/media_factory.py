"""Tiny synthetic media made in-process (PyAV, Pillow), plus broken variants, for decoder and storage tests.

Video frame ``i`` encodes its index: the top half is a flat grey of level ``level(i) = 8 + 5 * i`` (so up to 48
frames stay distinguishable after lossy coding), the bottom half a fixed horizontal red ramp.
`frame_index_of` reads the index back from a decoded frame.
"""

from __future__ import annotations

import io
import os
import struct
import tempfile
import zlib

import av
import numpy as np
from PIL import Image

LEVEL_BASE, LEVEL_STEP = 8, 5


def level(i: int) -> int:
    """Grey level of frame i's top half."""
    return LEVEL_BASE + LEVEL_STEP * i


def frame_pixels(i: int, width: int, height: int) -> np.ndarray:
    """The RGB content of frame i, (height, width, 3) uint8."""
    frame = np.zeros((height, width, 3), np.uint8)
    frame[: height // 2] = level(i)
    frame[height // 2 :, :, 0] = np.linspace(0, 255, width, dtype=np.float32)[None].astype(np.uint8)
    return frame


def frame_index_of(frame: np.ndarray) -> int:
    """The source index encoded in a decoded frame (H, W, 3): from the mean grey of its top half's centre."""
    h, w = frame.shape[:2]
    patch = frame[h // 8 : 3 * h // 8, w // 4 : 3 * w // 4]
    return round((float(patch.mean()) - LEVEL_BASE) / LEVEL_STEP)


def make_video(
    n_frames: int = 24,
    width: int = 64,
    height: int = 48,
    fps: int = 12,
    codec: str = "libx264",
    container: str = "mp4",
    gop: int = 8,
    faststart: bool = False,
) -> bytes:
    """Encode frames 0..n_frames-1 (see `frame_pixels`) and return the file's bytes.

    ``n_frames=0`` gives a valid file with an empty video stream (in mp4, FFmpeg then hides the track; use
    avi). ``gop`` sets the keyframe interval, so that seeking is exercised; libx264 also uses B-frames, so
    presentation order differs from decode order. ``faststart`` moves the mp4 index (moov) to the front.
    """
    if not 0 <= n_frames <= 48:
        raise ValueError("frame levels are only distinguishable for up to 48 frames")
    if faststart:  # the muxer rewrites the file by name to move the index, so it needs a real file
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, f"clip.{container}")
            _encode(path, n_frames, width, height, fps, codec, container, gop, {"movflags": "faststart"})
            with open(path, "rb") as f:
                return f.read()
    buf = io.BytesIO()
    _encode(buf, n_frames, width, height, fps, codec, container, gop, {})
    return buf.getvalue()


def _encode(target, n_frames, width, height, fps, codec, container, gop, options) -> None:
    with av.open(target, "w", format=container, options=options) as out:
        stream = out.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.codec_context.gop_size = gop
        out.start_encoding()  # writes the header even when no frame follows (n_frames=0)
        for i in range(n_frames):
            frame = av.VideoFrame.from_ndarray(frame_pixels(i, width, height), format="rgb24")
            out.mux(stream.encode(frame))
        out.mux(stream.encode())  # flush delayed frames


def make_audio_only_mp4(seconds: float = 0.5, rate: int = 16000) -> bytes:
    """An mp4 that holds an AAC audio track and no video stream."""
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as out:
        stream = out.add_stream("aac", rate=rate)
        samples = np.zeros((1, int(seconds * rate)), np.float32)
        frame = av.AudioFrame.from_ndarray(samples, format="fltp", layout="mono")
        frame.sample_rate = rate
        out.mux(stream.encode(frame))
        out.mux(stream.encode())
    return buf.getvalue()


def make_image(width: int = 64, height: int = 48, fmt: str = "PNG", seed: int = 0) -> bytes:
    """An RGB image with a horizontal ramp in red and a seed-dependent flat green (distinct files per seed)."""
    pixels = np.zeros((height, width, 3), np.uint8)
    pixels[..., 0] = np.linspace(0, 255, width, dtype=np.float32)[None].astype(np.uint8)
    pixels[..., 1] = (37 * seed) % 256
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt)
    return buf.getvalue()


def truncated(data: bytes, keep: float = 0.6) -> bytes:
    """The first ``keep`` fraction of a file, as left by an interrupted upload."""
    return data[: int(len(data) * keep)]


def cut_at_packet_boundary(data: bytes, keep: float = 0.6) -> bytes:
    """The file cut right after the last video packet that ends within the first ``keep`` fraction.

    FFmpeg demuxes and decodes such a file (a faststart mp4, whose index comes first) without an error: it drops
    the index entries past the end. `truncated` cuts mid-packet, which the decoder notices by itself.
    """
    with av.open(io.BytesIO(data)) as container:
        ends = [p.pos + p.size for p in container.demux(container.streams.video[0]) if p.size and p.pos is not None]
    return data[: max(end for end in ends if end <= len(data) * keep)]


def text_as_video() -> bytes:
    """A text file that someone renamed to .mp4."""
    return b"This is not a video, just a README that was renamed to clip.mp4.\nSecond line.\n"


def png_declaring_size(width: int = 100_000, height: int = 100_000) -> bytes:
    """A 60-byte PNG whose header claims width x height pixels (a decompression bomb's signature).

    Only the IHDR header and an empty IDAT are written, so opening it costs nothing; decoding it for real
    would allocate width * height * 3 bytes.
    """

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB, no interlace
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")
