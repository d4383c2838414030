"""Per-family input building: pixels, placeholders, modality masks, positions."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from transformers import AutoConfig
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from meda_engine import Request
from meda_engine.models import IMAGE, TEXT, VIDEO, build_adapter
from meda_engine.models.vision import MediaError, VisionSpec, preprocess_image, preprocess_video, smart_resize
from tiny_models import FIXTURES, PREPROCESSOR, build_model, tokenizer

RNG = np.random.default_rng(1)


@pytest.mark.parametrize("shape", [(60, 90), (224, 224), (33, 500), (700, 300)])
def test_image_pixels_equal_transformers_processor(shape):
    img = RNG.integers(0, 255, (*shape, 3), dtype=np.uint8)
    spec = VisionSpec(min_pixels=56 * 56, max_pixels=28 * 28 * 64)
    rows, grid = preprocess_image(img, spec)
    ref = Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=28 * 28 * 64)(images=[img], return_tensors="np")
    assert list(grid) == ref["image_grid_thw"][0].tolist()
    np.testing.assert_allclose(rows, ref["pixel_values"], atol=1e-6)


def test_video_patchify_layout_and_odd_frame_count():
    spec = VisionSpec(video_min_pixels=56 * 56, video_max_pixels=112 * 112)
    frames = RNG.integers(0, 255, (5, 112, 112, 3), dtype=np.uint8)
    rows, grid = preprocess_video(frames, spec)
    assert grid == (3, 8, 8)  # 5 frames -> padded to 6 -> 3 temporal patches of 8x8 patches
    assert rows.shape == (3 * 8 * 8, 3 * 2 * 14 * 14)
    # The last temporal patch repeats frame 4; its two halves are identical.
    last = rows[-64:].reshape(64, 3, 2, 14 * 14)
    np.testing.assert_array_equal(last[:, :, 0], last[:, :, 1])
    # A single frame patchifies like an image.
    one, g1 = preprocess_video(frames[:1], spec)
    img, gi = preprocess_image(frames[0], VisionSpec(min_pixels=56 * 56, max_pixels=112 * 112))
    assert g1 == gi
    np.testing.assert_allclose(one, img, atol=1e-6)


def test_smart_resize_bounds_and_errors():
    h, w = smart_resize(1000, 2000, 28, 56 * 56, 28 * 28 * 100)
    assert h % 28 == 0 and w % 28 == 0 and h * w <= 28 * 28 * 100
    with pytest.raises(MediaError, match="aspect ratio"):
        smart_resize(1, 500, 28, 56 * 56, 28 * 28 * 100)
    with pytest.raises(MediaError):
        preprocess_video(np.zeros((4, 10, 3), np.uint8), VisionSpec())


def adapter_for(family):
    model, tok = build_model(family)
    return model, build_adapter(model.config, tok, PREPROCESSOR.get(family))


def test_qwen2_vl_prompt_layout_and_modality():
    model, ad = adapter_for("qwen2_vl")
    frames = RNG.integers(0, 255, (4, 112, 112, 3), dtype=np.uint8)
    img = RNG.integers(0, 255, (56, 112, 3), dtype=np.uint8)
    p = ad.prepare(Request(prompt="what is it ?", images=[img], video=frames))
    tok = ad.tokenizer
    ids = p.input_ids.tolist()
    n_img = int(p.vision["image_grid_thw"].prod()) // 4
    n_vid = int(p.vision["video_grid_thw"].prod()) // 4
    assert (p.modality == IMAGE).sum() == n_img == 8 and (p.modality == VIDEO).sum() == n_vid == 32
    assert ids.count(tok.convert_tokens_to_ids("<|vision_start|>")) == 2
    # Visual tokens are exactly the pad tokens; everything else is text.
    assert torch.equal(p.modality != TEXT, (p.input_ids == ad.image_token_id) | (p.input_ids == ad.video_token_id))
    pos, nxt = ad.positions(model, p)
    assert pos.shape == (3, p.length)
    assert nxt == int(pos.max()) + 1 < p.length  # M-RoPE compresses visual positions


def test_qwen3_vl_video_has_per_frame_timestamps():
    _, ad = adapter_for("qwen3_vl")
    frames = RNG.integers(0, 255, (6, 128, 128, 3), dtype=np.uint8)
    p = ad.prepare(Request(prompt="what ?", video=frames, video_fps=2.0))
    assert p.vision["video_grid_thw"].tolist() == [[3, 8, 8]]
    assert ad.vision_spec.patch_size == 16
    # One <|vision_start|> per temporal patch (3), each with 16 video tokens.
    assert p.input_ids.tolist().count(ad.tokenizer.convert_tokens_to_ids("<|vision_start|>")) == 3
    assert int((p.modality == VIDEO).sum()) == 3 * 16
    # Timestamps (mean time of each temporal patch's two frames at 2 fps) precede each block.
    layout = ad._video_text((3, 8, 8), fps=2.0)
    assert layout.startswith("<0.2 seconds><|vision_start|>") and "<1.2 seconds>" in layout and "<2.2 seconds>" in layout


def test_text_adapter_rejects_media_and_uses_1d_positions():
    model, ad = adapter_for("llama")
    p = ad.prepare(Request(prompt="how many squares ?"))
    assert (p.modality == TEXT).all()
    pos, nxt = ad.positions(model, p)
    assert pos.shape == (1, p.length) and nxt == p.length


def test_fixture_configs_are_real_architectures():
    for f in FIXTURES.glob("*.json"):
        spec = json.loads(f.read_text())
        cfg = AutoConfig.for_model(spec.pop("model_type"), **spec)
        assert cfg.model_type in {"qwen2_vl", "qwen2_5_vl", "qwen3_vl", "llama", "qwen2"}
    assert len(tokenizer()) < 100
