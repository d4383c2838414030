"""The needle task and its trained checkpoints (models/needle-s{0,1,2}): generator, prompts, engine accuracy."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from meda_engine import Engine, Request
from meda_engine.models.qwen_vl import Qwen2VLAdapter
from meda_quality import evaluate, task, train

MODEL = Path(__file__).resolve().parents[1] / "models" / "needle-s0"


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


# ---- the generator ----------------------------------------------------------------------------------


def read_scene(frames: np.ndarray) -> list[tuple[int, str, str]]:
    """Re-derive ``(frame, colour, shape)`` of every visible object from the pixels alone, checking the
    clock of each frame on the way."""
    seen = []
    for k, frame in enumerate(frames):
        cells = frame.reshape(task.GRID, task.CELL, task.GRID, task.CELL, 3).transpose(0, 2, 1, 3, 4).astype(int)
        assert np.array_equal(cells[task.CLOCK_CELL], task.clock_cell(k + 1)), f"clock of frame {k + 1}"
        for r in range(task.GRID):
            for c in range(task.GRID):
                if (r, c) == task.CLOCK_CELL:
                    continue
                for colour, rgb in task.COLOURS.items():
                    mask = (cells[r, c] == rgb).all(-1)
                    if mask.sum() > 40:
                        shape = max(task.SHAPES, key=lambda s: (mask & task.SPRITES[s]).sum() / (mask | task.SPRITES[s]).sum())
                        seen.append((k, colour, shape))
    return seen


def answers_from_pixels(frames: np.ndarray) -> dict[str, str]:
    """Every question's answer, computed from `read_scene` only."""
    seen = read_scene(frames)
    assert len({k for k, _, _ in seen}) == len(seen), "at most one object per frame"
    runs: list[dict] = []
    for k, colour, shape in seen:
        if runs and runs[-1]["shape"] == shape and runs[-1]["frames"][-1] == k - 1:
            runs[-1]["frames"].append(k)
        else:
            runs.append({"colour": colour, "shape": shape, "frames": [k]})
    out = {task.TEMPLATES["caption"]: " then ".join(f"{r['colour']} {r['shape']}" for r in runs)}
    for i, r in enumerate(runs):
        out[task.TEMPLATES["colour"].format(shape=r["shape"])] = r["colour"]
        out[task.TEMPLATES["shape"].format(colour=r["colour"])] = r["shape"]
        out[task.TEMPLATES["which_frame"].format(shape=r["shape"])] = str(r["frames"][0] + 1)
        out[task.TEMPLATES["count"].format(shape=r["shape"])] = str(len(r["frames"]))
        for k in r["frames"]:
            out[task.TEMPLATES["frame_colour"].format(frame=k + 1)] = r["colour"]
            out[task.TEMPLATES["frame_shape"].format(frame=k + 1)] = r["shape"]
        if i + 1 < len(runs):
            out[task.TEMPLATES["after"].format(shape=r["shape"])] = f"{runs[i + 1]['colour']} {runs[i + 1]['shape']}"
    return out


@pytest.mark.parametrize("seed,n_frames", [(1, 4), (2, 8), (3, 16), (4, 33), (5, 64)])
def test_answers_match_the_pixels(seed, n_frames):
    clip = task.make_clip(seed, n_frames)
    truth = answers_from_pixels(clip.frames)
    assert {q.qtype for q in clip.qas} == set(task.QTYPES)
    for qa in clip.qas:
        assert truth[qa.question] == qa.answer, qa


def test_generator_is_deterministic():
    a, b = task.make_clip(7, 16), task.make_clip(7, 16)
    assert np.array_equal(a.frames, b.frames) and a.qas == b.qas and a.scene == b.scene
    assert a.raw_frames.shape == (32, task.FRAME, task.FRAME, 3) and a.raw_frames.dtype == np.uint8
    assert np.array_equal(a.raw_frames[0], a.raw_frames[1])
    assert not np.array_equal(task.make_clip(8, 16).frames, a.frames)
    assert task.heldout_set(1, (4, 8)) == task.heldout_set(1, (4, 8))


def test_every_word_is_in_the_vocabulary():
    tok = train.build_tokenizer()
    clip = task.make_clip(3, 16)
    for qa in clip.qas:
        ids = tok(f"{qa.question} {qa.answer}", add_special_tokens=False)["input_ids"]
        assert tok.unk_token_id not in ids, qa


def test_mp4_round_trip_keeps_the_scene(tmp_path):
    clip = task.make_clip(11, 8)
    task.write_mp4(tmp_path / "c.mp4", clip.raw_frames)
    decoded = task.read_mp4(tmp_path / "c.mp4")
    assert decoded.shape == clip.raw_frames.shape
    assert np.abs(decoded.astype(int) - clip.raw_frames.astype(int)).mean() < 10


# ---- training inputs ----------------------------------------------------------------------------------


def test_spliced_prompts_equal_the_engines():
    tok = train.build_tokenizer()
    model = train.build_model(tok, layers=1)
    adapter = Qwen2VLAdapter(model.config, tok, train.PREPROCESSOR_CONFIG)
    clip = task.make_clip(5, 8, n_questions=4)
    prompts, _ = train.prompt_ids(adapter, model, clip, [qa.question for qa in clip.qas])
    for qa, (prompt, positions, next_position) in zip(clip.qas, prompts):
        full = adapter.prepare(Request(prompt=qa.question, video=clip.raw_frames, video_fps=task.RAW_FPS))
        assert torch.equal(prompt.input_ids, full.input_ids) and torch.equal(prompt.modality, full.modality)
        assert torch.equal(prompt.vision["pixel_values_videos"], full.vision["pixel_values_videos"])
        full_positions, full_next = adapter.positions(model, full)
        assert torch.equal(positions, full_positions) and next_position == full_next


def test_shared_prefix_forward_equals_the_full_forward():
    """Training runs the video prefix once per clip; the logits must equal a plain per-prompt forward."""
    torch.manual_seed(0)
    tok = train.build_tokenizer()
    model = train.build_model(tok, layers=2).eval()
    adapter = Qwen2VLAdapter(model.config, tok, train.PREPROCESSOR_CONFIG)
    clips = [task.make_clip(s, 24, n_questions=3) for s in (1, 2)]
    batch = train.build_batch(model, adapter, clips)
    row, clip, qa = 4, clips[1], clips[1].qas[1]
    prompt = adapter.prepare(Request(prompt=qa.question, video=clip.raw_frames, video_fps=task.RAW_FPS))
    positions, next_position = adapter.positions(model, prompt)
    answer = tok(qa.answer, add_special_tokens=False)["input_ids"]
    ids = torch.cat([prompt.input_ids, torch.tensor(answer)])[None]
    pos = torch.cat([positions, torch.arange(next_position, next_position + len(answer))[None].expand(3, -1)], 1)
    types = torch.cat([prompt.modality.to(torch.int32), torch.zeros(len(answer), dtype=torch.int32)])[None]
    with torch.no_grad():
        full = model(input_ids=ids, position_ids=pos[:, None], mm_token_type_ids=types, **prompt.vision).logits[0]
        shared = train.forward_logits(model, batch)[row]
    n = int((batch.suffix_ids[row] != adapter.pad_token_id).sum())
    assert torch.equal(batch.suffix_ids[row, :n], ids[0, -n:])
    torch.testing.assert_close(shared[:n], full[-n:], atol=1e-5, rtol=1e-5)


def test_preprocessor_keeps_112_and_shrinks_larger_frames():
    from meda_engine.models.vision import VisionSpec, video_frame_size

    spec = VisionSpec.from_preprocessor_config(train.PREPROCESSOR_CONFIG)
    assert video_frame_size(112, 112, 8, spec) == (112, 112)
    assert video_frame_size(448, 448, 8, spec) == (112, 112)


# ---- the checkpoint -----------------------------------------------------------------------------------


SEED_MODELS = sorted(MODEL.parent.glob("needle-s*"))


def test_three_training_seeds_are_committed():
    assert [m.name for m in SEED_MODELS] == ["needle-s0", "needle-s1", "needle-s2"]
    for m in SEED_MODELS:
        card = (m / "README.md").read_text()
        assert f"--seed {m.name[-1]}" in card and "Held-out accuracy" in card


@pytest.mark.parametrize("model_dir", SEED_MODELS, ids=lambda p: p.name)
def test_checkpoint_reproduces_its_recorded_accuracy(model_dir):
    recorded = json.loads((model_dir / "eval.json").read_text())["test_subset"]
    assert recorded["accuracy"] > 0.3  # well above chance (1/8 colours, 1/6 shapes)
    engine = Engine.from_pretrained(str(model_dir), device="cpu", dtype="float32")
    items = evaluate.test_subset()
    assert len(items) == recorded["n"]
    accuracy = evaluate.summarise(evaluate.evaluate(engine, items))["overall"]["accuracy"]
    assert abs(accuracy - recorded["accuracy"]) <= 1.5 / len(items)
