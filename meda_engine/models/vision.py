"""Pixel preprocessing for the Qwen-VL family, in numpy + Pillow (no torchvision).

transformers' `Qwen2VLProcessor` and its video processor need torchvision, which cannot be installed
beside a CPU torch here, so the engine builds `pixel_values` itself. The steps and the flattened patch
layout are those of `Qwen2VLImageProcessorPil` (tests check they agree bit for bit on images):

1. ``smart_resize``: both sides a multiple of ``patch_size * merge_size``, pixel count within
   ``[min_pixels, max_pixels]``, aspect ratio kept; bicubic resampling.
2. rescale to [0, 1] and normalise with the checkpoint's mean/std.
3. patchify: frames ``(T, C, H, W)`` -> rows ``(T/tp * gh * gw, C * tp * p * p)``, ordered so that
   the ``merge_size x merge_size`` patches of one LM token are adjacent; an image is one frame
   repeated ``tp`` times; a video with an odd frame count repeats its last frame.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image as PILImage

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_STANDARD_MEAN = (0.5, 0.5, 0.5)
IMAGENET_STANDARD_STD = (0.5, 0.5, 0.5)


class MediaError(ValueError):
    """Pixels that cannot be turned into model input (wrong shape, too few pixels, absurd aspect)."""


@dataclass(frozen=True)
class VisionSpec:
    """The preprocessing constants of one checkpoint (from its preprocessor_config.json)."""

    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    image_mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    image_std: tuple[float, float, float] = OPENAI_CLIP_STD
    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 1280
    video_min_pixels: int = 128 * 28 * 28
    video_max_pixels: int = 768 * 28 * 28

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size

    @classmethod
    def from_preprocessor_config(cls, cfg: dict[str, Any] | None, *, defaults: "VisionSpec | None" = None) -> "VisionSpec":
        base = defaults or cls()
        cfg = dict(cfg or {})
        size = cfg.get("size") or {}
        min_px = cfg.get("min_pixels", size.get("shortest_edge", base.min_pixels))
        max_px = cfg.get("max_pixels", size.get("longest_edge", base.max_pixels))
        return cls(
            patch_size=int(cfg.get("patch_size", base.patch_size)),
            temporal_patch_size=int(cfg.get("temporal_patch_size", base.temporal_patch_size)),
            merge_size=int(cfg.get("merge_size", base.merge_size)),
            image_mean=tuple(cfg.get("image_mean", base.image_mean)),
            image_std=tuple(cfg.get("image_std", base.image_std)),
            min_pixels=int(min_px),
            max_pixels=int(max_px),
            video_min_pixels=int(cfg.get("video_min_pixels", base.video_min_pixels)),
            video_max_pixels=int(cfg.get("video_max_pixels", base.video_max_pixels)),
        )


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Target (height, width): multiples of ``factor``, pixel count in range, aspect ratio kept."""
    if height < 1 or width < 1:
        raise MediaError(f"image of size {height}x{width} has no pixels")
    if max(height, width) / min(height, width) > 200:
        raise MediaError(f"aspect ratio {max(height, width) / min(height, width):.0f} is above 200")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return max(h_bar, factor), max(w_bar, factor)


def as_rgb_array(image: Any) -> np.ndarray:
    """PIL image or array -> ``(H, W, 3)`` uint8."""
    if isinstance(image, PILImage.Image):
        return np.asarray(image.convert("RGB"))
    arr = np.asarray(image)
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=-1)
    if arr.ndim != 3 or arr.shape[-1] not in (3, 4):
        raise MediaError(f"expected an image of shape (H, W, 3), got {arr.shape}")
    if arr.shape[-1] == 4:
        arr = arr[..., :3]
    if arr.dtype != np.uint8:
        if np.issubdtype(arr.dtype, np.floating) and arr.size and arr.max() <= 1.0:
            arr = arr * 255.0
        arr = np.clip(arr, 0, 255).astype(np.uint8)
    return arr


def _resize_normalise(frames: np.ndarray, height: int, width: int, spec: VisionSpec) -> np.ndarray:
    """``(T, H, W, 3)`` uint8 -> ``(T, 3, height, width)`` float32, normalised."""
    out = np.empty((frames.shape[0], 3, height, width), dtype=np.float32)
    mean = np.asarray(spec.image_mean, dtype=np.float32)[:, None, None]
    std = np.asarray(spec.image_std, dtype=np.float32)[:, None, None]
    for i, frame in enumerate(frames):
        if frame.shape[0] != height or frame.shape[1] != width:
            frame = np.asarray(PILImage.fromarray(frame).resize((width, height), PILImage.BICUBIC))
        chw = frame.astype(np.float32).transpose(2, 0, 1) * np.float32(1.0 / 255.0)
        out[i] = (chw - mean) / std
    return out


def patchify(frames: np.ndarray, spec: VisionSpec) -> tuple[np.ndarray, tuple[int, int, int]]:
    """``(T, C, H, W)`` float frames (T a multiple of tp) -> patch rows and the (t, h, w) grid."""
    t, c, h, w = frames.shape
    p, tp, m = spec.patch_size, spec.temporal_patch_size, spec.merge_size
    gt, gh, gw = t // tp, h // p, w // p
    x = frames.reshape(gt, tp, c, gh // m, m, p, gw // m, m, p)
    # -> (gt, gh/m, gw/m, m, m, c, tp, p, p): one LM token's m*m patches are consecutive rows.
    x = x.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return np.ascontiguousarray(x.reshape(gt * gh * gw, c * tp * p * p)), (gt, gh, gw)


def preprocess_image(image: Any, spec: VisionSpec) -> tuple[np.ndarray, tuple[int, int, int]]:
    arr = as_rgb_array(image)
    h, w = smart_resize(arr.shape[0], arr.shape[1], spec.factor, spec.min_pixels, spec.max_pixels)
    frames = _resize_normalise(arr[None], h, w, spec)
    frames = np.repeat(frames, spec.temporal_patch_size, axis=0)
    return patchify(frames, spec)


def video_frame_size(height: int, width: int, n_frames: int, spec: VisionSpec, max_pixels_per_frame: int | None = None):
    max_px = spec.video_max_pixels if max_pixels_per_frame is None else min(spec.video_max_pixels, max_pixels_per_frame)
    min_px = min(spec.video_min_pixels, max_px)
    return smart_resize(height, width, spec.factor, min_px, max_px)


def preprocess_video(
    frames: Any, spec: VisionSpec, max_pixels_per_frame: int | None = None
) -> tuple[np.ndarray, tuple[int, int, int]]:
    arr = np.asarray(frames)
    if arr.ndim != 4 or arr.shape[-1] != 3 or arr.shape[0] < 1:
        raise MediaError(f"expected video frames of shape (T, H, W, 3), got {arr.shape}")
    if arr.dtype != np.uint8:
        arr = np.stack([as_rgb_array(f) for f in arr])
    h, w = video_frame_size(arr.shape[1], arr.shape[2], arr.shape[0], spec, max_pixels_per_frame)
    tp = spec.temporal_patch_size
    if arr.shape[0] % tp:
        arr = np.concatenate([arr, np.repeat(arr[-1:], tp - arr.shape[0] % tp, axis=0)])
    return patchify(_resize_normalise(arr, h, w, spec), spec)
