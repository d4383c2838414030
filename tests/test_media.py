"""meda_engine.media: decord and PyAV agree frame for frame, sampling and size limits hold, images decode safely,
and every broken input fails with MediaDecodeError and a reason."""

from __future__ import annotations

import io
import sys
import time

import numpy as np
import pytest
from PIL import Image

import media_factory as mf
from meda_engine import media
from meda_engine.media import MediaDecodeError, decode_image, decode_video, sample_indices, sniff_kind

BACKENDS = ["decord", "pyav"]


@pytest.fixture(scope="module")
def clip48() -> bytes:
    """48 frames of 160x120 at 12 fps (4 s), H.264 with B-frames and a keyframe every 8 frames."""
    return mf.make_video(48, 160, 120)


def content_indices(frames: np.ndarray) -> list[int]:
    return [mf.frame_index_of(f) for f in frames]


# ------------------------------------------------------------------------------------------------ sampling


def test_sample_indices_uniform_fps_and_caps():
    assert sample_indices(24, 12.0, n_frames=7).tolist() == [0, 4, 8, 12, 15, 19, 23]
    assert sample_indices(5, 12.0, n_frames=16).tolist() == [0, 1, 2, 3, 4]  # never more than the clip has
    assert sample_indices(48, 12.0, fps=3).tolist() == list(range(0, 48, 4))
    assert sample_indices(10, 10.0, fps=100).tolist() == list(range(10))  # fps is capped at the source rate
    assert sample_indices(48, 12.0, n_frames=None).tolist() == list(range(48))
    capped = sample_indices(48, 12.0, fps=12, max_frames=10)
    assert len(capped) == 10 and capped[0] == 0 and capped[-1] == 47  # spread over the whole clip, not cut off
    for bad in ({"n_frames": 0}, {"fps": 0.0}, {"max_frames": 0}):
        with pytest.raises(ValueError):
            sample_indices(10, 10.0, **{"n_frames": 4, **bad})


# ------------------------------------------------------------------------------------------------ video


@pytest.mark.parametrize(
    "codec,container", [("libx264", "mp4"), ("mpeg4", "avi"), ("libvpx-vp9", "webm")], ids=["h264", "mpeg4", "vp9"]
)
def test_backends_return_the_same_frames(codec, container):
    data = mf.make_video(24, 64, 48, codec=codec, container=container)
    out = {b: decode_video(data, n_frames=7, backend=b) for b in BACKENDS}
    for name, video in out.items():
        assert video.backend_used == name
        assert video.frames.shape == (7, 48, 64, 3) and video.frames.dtype == np.uint8
        assert video.indices.tolist() == [0, 4, 8, 12, 15, 19, 23]
        assert content_indices(video.frames) == video.indices.tolist()  # the pixels really are those frames
        assert (video.source_fps, video.n_source_frames, video.duration_s) == (12.0, 24, 2.0)
        assert video.fps_sampled == pytest.approx(3.5) and video.decode_s > 0
    diff = np.abs(out["decord"].frames.astype(int) - out["pyav"].frames.astype(int))
    assert diff.mean() < 1.0  # same decoder library underneath: identical or nearly so


@pytest.mark.parametrize("backend", BACKENDS)
def test_fps_sampling(clip48, backend):
    video = decode_video(clip48, fps=3, backend=backend)
    assert video.indices.tolist() == list(range(0, 48, 4))
    assert content_indices(video.frames) == video.indices.tolist()
    assert video.fps_sampled == pytest.approx(3.0) and video.duration_s == pytest.approx(4.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_max_frames_and_max_pixels_bound_the_output(clip48, backend):
    video = decode_video(clip48, fps=12, max_frames=10, max_pixels=80 * 60, backend=backend)
    assert video.frames.shape == (10, 60, 80, 3)  # 160x120 halved: aspect kept
    assert video.fps_sampled == pytest.approx(2.5)  # 10 frames over 4 s
    assert content_indices(video.frames) == video.indices.tolist()
    odd = decode_video(clip48, n_frames=2, max_pixels=1000, backend=backend)
    h, w = odd.frames.shape[1:3]
    assert h * w <= 1000 and abs(w / h - 4 / 3) < 0.1


def test_all_input_kinds_decode_alike(clip48, tmp_path):
    path = tmp_path / "clip.mp4"
    path.write_bytes(clip48)
    results = [decode_video(x, n_frames=5) for x in (clip48, path, str(path), io.BytesIO(clip48))]
    for video in results[1:]:
        np.testing.assert_array_equal(video.frames, results[0].frames)


def test_decord_failure_falls_back_to_pyav(clip48, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("simulated decord crash")

    monkeypatch.setattr(media, "_decode_decord", broken)
    video = decode_video(clip48, n_frames=4)
    assert video.backend_used == "pyav" and content_indices(video.frames) == video.indices.tolist()
    with pytest.raises(MediaDecodeError, match="simulated decord crash"):
        decode_video(clip48, backend="decord")


def test_missing_decord_falls_back_to_pyav(clip48, monkeypatch):
    monkeypatch.setitem(sys.modules, "decord", None)  # makes `import decord` raise ImportError
    assert decode_video(clip48, n_frames=4).backend_used == "pyav"


BROKEN_VIDEOS = {
    "zero-byte": (lambda: b"", "empty input"),
    "text renamed .mp4": (mf.text_as_video, "is text"),
    "truncated mp4": (lambda: mf.truncated(mf.make_video()), "truncated"),
    "truncated faststart mp4": (lambda: mf.truncated(mf.make_video(48, faststart=True), 0.9), "truncated"),
    "faststart mp4 cut at a packet boundary": (
        lambda: mf.cut_at_packet_boundary(mf.make_video(48, faststart=True), 0.8),
        "truncated: its index declares 48 frames",
    ),
    "random bytes": (lambda: np.random.default_rng(0).bytes(4096), "unsupported"),
    "zero frames": (lambda: mf.make_video(0, codec="mpeg4", container="avi"), "zero frames"),
    "audio only": (mf.make_audio_only_mp4, "no video stream"),
    "an image": (mf.make_image, "is an image"),
}


@pytest.mark.parametrize("backend", ["auto", *BACKENDS])
@pytest.mark.parametrize("case", list(BROKEN_VIDEOS))
def test_broken_videos_raise_media_decode_error(case, backend):
    make, reason = BROKEN_VIDEOS[case]
    if backend == "decord" and case == "zero frames":
        reason = "corrupt"  # decord fails inside FFmpeg's filter set-up, with no better diagnosis
    with pytest.raises(MediaDecodeError, match=reason):
        decode_video(make(), backend=backend)


def test_missing_file_is_a_media_decode_error(tmp_path):
    with pytest.raises(MediaDecodeError, match="cannot read"):
        decode_video(tmp_path / "nope.mp4")


# ------------------------------------------------------------------------------------------------ images


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "BMP", "GIF"])
def test_decode_image_formats(fmt):
    pixels = decode_image(mf.make_image(64, 48, fmt, seed=3))
    assert pixels.shape == (48, 64, 3) and pixels.dtype == np.uint8
    assert pixels[:, 0, 0].mean() < 12 and pixels[:, -1, 0].mean() > 240  # the red ramp survives
    assert abs(float(pixels[..., 1].mean()) - 111) < 6  # green = 37 * seed


def test_decode_image_downscales_keeping_aspect():
    pixels = decode_image(mf.make_image(1600, 1200, "JPEG"), max_pixels=160 * 120)
    h, w = pixels.shape[:2]
    assert h * w <= 160 * 120 and abs(w / h - 4 / 3) < 0.02


def test_decode_image_applies_exif_rotation_and_flattens_alpha():
    buf = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    Image.new("RGB", (64, 48), (200, 10, 10)).save(buf, "JPEG", exif=exif)
    assert decode_image(buf.getvalue()).shape == (64, 48, 3)
    buf = io.BytesIO()
    Image.new("RGBA", (8, 8), (0, 0, 0, 0)).save(buf, "PNG")
    assert (decode_image(buf.getvalue()) == 255).all()  # fully transparent -> white, not black


def test_decompression_bomb_is_refused_without_allocating():
    bomb = mf.png_declaring_size(100_000, 100_000)
    start = time.perf_counter()
    with pytest.raises(MediaDecodeError, match="too large"):
        decode_image(bomb)
    assert time.perf_counter() - start < 1.0
    with pytest.raises(MediaDecodeError, match=r"64x48 = 3072 pixels exceeds the limit of 1000"):
        decode_image(mf.make_image(64, 48), max_source_pixels=1000)


@pytest.mark.parametrize(
    "make,reason",
    [
        (lambda: b"", "empty input"),
        (mf.text_as_video, "text"),
        (lambda: mf.truncated(mf.make_image(320, 240, "JPEG"), 0.5), "truncated"),
        (lambda: mf.truncated(mf.make_image(320, 240, "PNG"), 0.5), "truncated"),
        (lambda: np.random.default_rng(1).bytes(2048), "unsupported image"),
        (mf.make_video, "is a video"),
    ],
    ids=["empty", "text", "truncated-jpeg", "truncated-png", "random", "video"],
)
def test_broken_images_raise_media_decode_error(make, reason):
    with pytest.raises(MediaDecodeError, match=reason):
        decode_image(make())


# ------------------------------------------------------------------------------------------------ sniffing


def test_sniff_kind_by_magic_then_extension(tmp_path):
    assert sniff_kind(mf.make_video()) == "video"
    assert sniff_kind(mf.make_video(codec="libvpx-vp9", container="webm")) == "video"
    assert sniff_kind(mf.make_video(codec="mpeg4", container="avi")) == "video"
    for fmt in ("PNG", "JPEG", "WEBP", "BMP", "GIF"):
        assert sniff_kind(mf.make_image(fmt=fmt)) == "image"
    assert sniff_kind(b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00") == "image"  # HEIF shares mp4's ftyp box
    assert sniff_kind(mf.text_as_video()) is None
    assert sniff_kind(b"??", name="clip.MKV") == "video"
    assert sniff_kind("s3://bucket/a/b.JPEG?versionId=3") == "image"
    assert sniff_kind("notes.txt") is None
    disguised = tmp_path / "photo.mp4"
    disguised.write_bytes(mf.make_image())
    assert sniff_kind(disguised) == "image"  # content beats the extension for local files


# ------------------------------------------------------------------------------------------------ timeout


def test_decode_with_timeout(clip48):
    video = media.decode_with_timeout(decode_video, 30.0, clip48, n_frames=3)
    assert video.frames.shape[0] == 3
    with pytest.raises(MediaDecodeError, match="empty input"):
        media.decode_with_timeout(decode_video, 30.0, b"")
    with pytest.raises(MediaDecodeError, match="timed out after 0.05 s"):
        media.decode_with_timeout(time.sleep, 0.05, 0.5)
