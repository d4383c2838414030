"""Adapters for the Qwen-VL family: Qwen2-VL, Qwen2.5-VL (one layout) and Qwen3-VL (another).

Layouts, per image / video part of a user message:

* Qwen2-VL, Qwen2.5-VL: ``<|vision_start|>`` + ``<|image_pad|>`` x n + ``<|vision_end|>``, where
  n = t*h*w / merge^2 of the part's grid; videos the same with ``<|video_pad|>`` and one grid for the
  whole clip (two raw frames per temporal patch).
* Qwen3-VL: images as above; a video becomes one block per temporal patch,
  ``<{t:.1f} seconds><|vision_start|>`` + ``<|video_pad|>`` x (h*w / merge^2) + ``<|vision_end|>``, with
  the timestamps in the text and one grid row per temporal patch for M-RoPE.

All three use 3-D M-RoPE positions, computed by the model's own ``get_rope_index`` (via `hf_glue`).
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import torch

from .. import hf_glue
from ..request import Image, Request, Video
from .base import IMAGE, VIDEO, ModelAdapter, PreparedPrompt, expand_placeholders
from .vision import (
    IMAGENET_STANDARD_MEAN,
    IMAGENET_STANDARD_STD,
    VisionSpec,
    preprocess_image,
    preprocess_video,
)
from .word_tokenizer import QWEN_CHAT_TEMPLATE

DEFAULT_VIDEO_FPS = 2.0  # the sampling rate assumed when the caller gives none (as HF's processors)


class Qwen2VLAdapter(ModelAdapter):
    family: ClassVar[str] = "qwen2_vl"
    model_types: ClassVar[tuple[str, ...]] = ("qwen2_vl",)
    multimodal: ClassVar[bool] = True
    position_axes: ClassVar[int] = 3
    vision_defaults: ClassVar[VisionSpec] = VisionSpec()

    def __init__(self, config: Any, tokenizer: Any, preprocessor_config: dict | None = None, *,
                 max_pixels_per_frame: int | None = None):
        super().__init__(config, tokenizer, preprocessor_config)
        self.vision_spec = VisionSpec.from_preprocessor_config(preprocessor_config, defaults=self.vision_defaults)
        self.max_pixels_per_frame = max_pixels_per_frame
        self.image_token_id = int(config.image_token_id)
        self.video_token_id = int(config.video_token_id)

    def default_chat_template(self) -> str | None:
        return QWEN_CHAT_TEMPLATE

    # ---- per-part expansion -----------------------------------------------------------------
    def _video_text(self, grid: tuple[int, int, int], fps: float) -> str:
        n = grid[0] * grid[1] * grid[2] // self.vision_spec.merge_size**2
        return "<|vision_start|>" + "<|video_pad|>" * n + "<|vision_end|>"

    def _video_grid_rows(self, grid: tuple[int, int, int]) -> list[list[int]]:
        return [list(grid)]

    def prepare(self, request: Request, *, max_new_tokens: int | None = None) -> PreparedPrompt:
        spec = self.vision_spec
        text = self.render(request)
        image_rows, image_grids, video_rows, video_grids, seconds_per_grid = [], [], [], [], []
        replacements: list[str] = []
        n_frames = 0
        for part in request.media:
            if isinstance(part, Image):
                rows, grid = preprocess_image(part.pixels, spec)
                image_rows.append(rows)
                image_grids.append(list(grid))
                n = grid[0] * grid[1] * grid[2] // spec.merge_size**2
                replacements.append("<|vision_start|>" + "<|image_pad|>" * n + "<|vision_end|>")
            elif isinstance(part, Video):
                rows, grid = preprocess_video(part.frames, spec, self.max_pixels_per_frame)
                fps = float(part.fps) if part.fps else DEFAULT_VIDEO_FPS
                n_frames += part.n_frames
                video_rows.append(rows)
                video_grids.extend(self._video_grid_rows(grid))
                seconds_per_grid.append(spec.temporal_patch_size / fps)
                replacements.append(self._video_text(grid, fps))
        text = expand_placeholders(
            text,
            replacements,
            r"<\|vision_start\|><\|(?:image|video)_pad\|><\|vision_end\|>",
        )
        input_ids = self._tokenize(text)
        modality = torch.zeros_like(input_ids, dtype=torch.int8)
        modality[input_ids == self.image_token_id] = IMAGE
        modality[input_ids == self.video_token_id] = VIDEO
        self._check_context(int(input_ids.shape[0]), n_frames, max_new_tokens)
        vision: dict[str, torch.Tensor] = {}
        if image_rows:
            vision["pixel_values"] = torch.from_numpy(np.concatenate(image_rows))
            vision["image_grid_thw"] = torch.tensor(image_grids, dtype=torch.long)
        if video_rows:
            vision["pixel_values_videos"] = torch.from_numpy(np.concatenate(video_rows))
            vision["video_grid_thw"] = torch.tensor(video_grids, dtype=torch.long)
        return PreparedPrompt(
            input_ids=input_ids,
            modality=modality,
            vision=vision,
            n_context=self._context_split(modality, request),
            n_frames=n_frames,
            extra={"second_per_grid_ts": seconds_per_grid},
        )

    # ---- positions and batching -------------------------------------------------------------
    def positions(self, model: Any, prompt: PreparedPrompt) -> tuple[torch.Tensor, int]:
        if prompt.n_visual == 0:
            # Text-only prompt: M-RoPE reduces to the same 1-D position on all three axes.
            pos = torch.arange(prompt.length, dtype=torch.long)[None].expand(3, -1).clone()
            return pos, prompt.length
        pos = hf_glue.mrope_positions(
            model,
            input_ids=prompt.input_ids,
            mm_token_type_ids=prompt.modality.to(torch.int32),
            image_grid_thw=prompt.vision.get("image_grid_thw"),
            video_grid_thw=prompt.vision.get("video_grid_thw"),
            second_per_grid_ts=self._seconds_per_grid(prompt),
        )
        return pos, int(pos.max()) + 1

    def _seconds_per_grid(self, prompt: PreparedPrompt) -> torch.Tensor | None:
        return None

    def collate_vision(self, prompts: list[PreparedPrompt], device: torch.device) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for key in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw"):
            parts = [p.vision[key] for p in prompts if key in p.vision]
            if parts:
                out[key] = torch.cat(parts).to(device)
        return out


class Qwen25VLAdapter(Qwen2VLAdapter):
    family: ClassVar[str] = "qwen2_5_vl"
    model_types: ClassVar[tuple[str, ...]] = ("qwen2_5_vl",)

    def _seconds_per_grid(self, prompt: PreparedPrompt) -> torch.Tensor | None:
        secs = prompt.extra.get("second_per_grid_ts") or []
        return torch.tensor(secs, dtype=torch.float32) if secs else None


class Qwen3VLAdapter(Qwen2VLAdapter):
    family: ClassVar[str] = "qwen3_vl"
    model_types: ClassVar[tuple[str, ...]] = ("qwen3_vl",)
    vision_defaults: ClassVar[VisionSpec] = VisionSpec(
        patch_size=16,
        image_mean=IMAGENET_STANDARD_MEAN,
        image_std=IMAGENET_STANDARD_STD,
        min_pixels=64 * 32 * 32,
        max_pixels=16384 * 32 * 32,
        video_min_pixels=128 * 32 * 32,
        video_max_pixels=768 * 32 * 32,
    )

    def _video_text(self, grid: tuple[int, int, int], fps: float) -> str:
        per_frame = grid[1] * grid[2] // self.vision_spec.merge_size**2
        tp = self.vision_spec.temporal_patch_size
        blocks = []
        for k in range(grid[0]):
            # Mean time of the raw frames in this temporal patch, as Qwen3-VL's processor writes it.
            t = (tp * k + (tp - 1) / 2) / fps
            blocks.append(f"<{t:.1f} seconds><|vision_start|>" + "<|video_pad|>" * per_frame + "<|vision_end|>")
        return "".join(blocks)

    def _video_grid_rows(self, grid: tuple[int, int, int]) -> list[list[int]]:
        # The model splits a video grid into one row per temporal patch itself; keep the clip's grid.
        return [list(grid)]


ADAPTERS: tuple[type[ModelAdapter], ...] = (Qwen2VLAdapter, Qwen25VLAdapter, Qwen3VLAdapter)
