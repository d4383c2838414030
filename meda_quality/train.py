"""Train the needle model: a small Qwen2-VL, from scratch, on CPU (one thread), seeded and resumable.

    python -m meda_quality.train --seed 0 --out models/needle-s0

Recipe (see docs/quality_model.md):

* **Inputs as the engine builds them.** Every (clip, question) prompt comes from
  `Qwen2VLAdapter.prepare` and its positions from `Qwen2VLAdapter.positions` (HF's ``get_rope_index``).
  The answer tokens continue at the engine's decode positions ``max(prompt positions) + 1, + 2, ...``
  (HF's ``rope_deltas`` rule), which for videos longer than about 16 frames differ from the positions
  ``get_rope_index`` would give the answer as text after the prompt.
* **Several questions per clip, shared prefix.** A clip's prompts share everything up to
  ``<|vision_end|>``; the vision tower and that prefix run once per clip (standard HF forward with a
  ``DynamicCache``), then the question + answer suffixes of all its questions run on the expanded cache.
  Causal attention makes this exactly the per-prompt forward, at a fraction of the cost.
* **Auxiliary alignment loss** on the merged visual tokens: cosine similarity to the (tied) word
  embeddings of the colours, the shapes and the clock numbers, plus a learned "none" vector, so the
  vision tower learns to speak the LM's words (LLaVA stage-1 style); without it the vision tower
  gets almost no gradient.
* **Key-word loss** (deep supervision): the question's key word (the shape, colour or frame number
  it asks about) is also trained to predict the first answer token, and one query head per KV group
  starts as a similarity head (`similarity_init`). Both target the slow step: matching the words of
  the question to the visual token that shows them.
* **Adaptive curriculum** over frames, objects and question types (`CURRICULUM`), moving on when
  the running exact match of the training answers passes ``--advance-at`` or a level has used
  ``--level-cap`` of the run; a fraction of steps replays earlier levels.
* AdamW, LR warm-up then cosine decay over the run's progress, batch = ``--frames-per-step``
  logical frames of video. The run ends after ``--steps`` or ``--minutes`` of training, whichever
  comes first; progress (for the LR and the curriculum caps) is the further along of the two.

Training state (model, optimiser, curriculum, step, wall time) is saved to ``--state`` every
``--save-every-s`` seconds; rerunning the same command continues from it. At the end the model is
written to ``--out`` as a standard Hugging Face checkpoint.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from meda_engine import Request
from meda_engine.models.base import PreparedPrompt
from meda_engine.models.qwen_vl import Qwen2VLAdapter
from meda_engine.models.word_tokenizer import build_word_tokenizer

from . import task

PREPROCESSOR_CONFIG = {
    # 112x112 frames stay 112x112 (16 tokens per temporal patch); larger frames are scaled down to
    # about 112x112 pixels (aspect kept, sides multiples of 28).
    "image_processor_type": "Qwen2VLImageProcessor",
    "patch_size": 14,
    "merge_size": 2,
    "temporal_patch_size": 2,
    "min_pixels": task.FRAME * task.FRAME,
    "max_pixels": task.FRAME * task.FRAME,
    "video_min_pixels": task.FRAME * task.FRAME,
    "video_max_pixels": task.FRAME * task.FRAME,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
}
TRAIN_SEED_BASE = 10_000_000  # training clip seeds; the held-out split lives below 2_000_000


@dataclass(frozen=True)
class Level:
    """One curriculum level: clip lengths (logical frames), object counts and question types."""

    frames: tuple[int, ...]
    objects: tuple[int, int]
    types: tuple[str, ...] = task.QTYPES
    max_duration: int = 3


# Level 0 leaves out the order questions (after, caption): they reward a sharp "attend to the
# first / last object" pattern, which saturates the answer's attention and stalls content matching.
CURRICULUM = (
    Level((2, 4), (1, 2), tuple(t for t in task.QTYPES if t not in ("after", "caption")), 2),
    Level((2, 4), (2, 3)),
    Level((4, 8), (2, 4)),
    Level((8, 16), (2, 6)),
    Level((8, 16, 32), (2, 6)),
    Level((4, 8, 16, 32, 64), (2, 6)),
    Level((4, 8, 16, 32, 64, 128), (2, 6)),
)


# ---- model, tokenizer, checkpoint files -----------------------------------------------------------------


def build_tokenizer():
    return build_word_tokenizer(task.vocabulary())


def build_model(tok, *, hidden: int = 128, layers: int = 4, heads: int = 4, kv_heads: int = 2,
                intermediate: int = 384, vision_depth: int = 2, vision_dim: int = 64):
    """A randomly initialised `Qwen2VLForConditionalGeneration` (GQA, M-RoPE section [4, 6, 6])."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    ids = tok.convert_tokens_to_ids
    pairs = hidden // heads // 2  # rotary frequency pairs per head: 1/4 temporal, 3/8 height, 3/8 width
    section = [pairs // 4, (pairs - pairs // 4) // 2, pairs - pairs // 4 - (pairs - pairs // 4) // 2]
    config = Qwen2VLConfig(
        text_config=dict(
            vocab_size=len(tok), hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
            num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=4096,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                             "mrope_section": section},
            eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=tok.pad_token_id,
        ),
        vision_config=dict(depth=vision_depth, embed_dim=vision_dim, hidden_size=hidden, num_heads=4, mlp_ratio=4,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2),
        image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"),
        tie_word_embeddings=True,
    )
    return Qwen2VLForConditionalGeneration._from_config(config, attn_implementation="sdpa")


def similarity_init(model, std: float) -> None:
    """Start one query head per KV group as a similarity head: its query and key projections are the
    same random matrix ``W`` (std ``std``), so ``q . k ~ x_q W^T W x_k`` favours keys whose content
    resembles the query's.

    Matching a word of the question to the visual token that shows it is the slow step of learning
    this task (a long loss plateau); this init shortens it.
    """
    tc = model.config.text_config
    hd = tc.hidden_size // tc.num_attention_heads
    group = tc.num_attention_heads // tc.num_key_value_heads
    with torch.no_grad():
        for layer in model.model.language_model.layers:
            attn = layer.self_attn
            for g in range(tc.num_key_value_heads):
                q_rows = slice(g * group * hd, (g * group + 1) * hd)
                k_rows = slice(g * hd, (g + 1) * hd)
                attn.q_proj.weight[q_rows].normal_(0.0, std)
                attn.k_proj.weight[k_rows] = attn.q_proj.weight[q_rows]
                attn.k_proj.bias[k_rows] = attn.q_proj.bias[q_rows]


def save_checkpoint(model, tok, out: Path) -> None:
    """Write a standard HF checkpoint directory (config, weights, tokenizer, preprocessor config)."""
    out.mkdir(parents=True, exist_ok=True)
    model.generation_config.update(eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, do_sample=False)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    (out / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR_CONFIG, indent=2) + "\n")


# ---- batches ---------------------------------------------------------------------------------------------


@dataclass
class ClipBatch:
    """One training step: ``C`` clips of ``N`` logical frames, ``R`` question rows in all.

    Shapes: ``pixels`` (C * 64N, 1176) and ``grid`` (C, 3) for the vision tower; ``prefix_ids``, ``prefix_types``
    (modality) (C, P) and ``prefix_pos`` (3, C, P), identical for all rows of a clip; ``suffix_ids``/``suffix_pos``
    (R, S) / (3, R, S) right-padded question + answer tokens; ``labels`` (R, S) the next-token target
    at each suffix position (-100 where none); ``key_labels`` (R, S) the first answer token at the
    question's key word (the shape, colour or frame number it asks about), -100 elsewhere; ``row_clip`` (R,) the clip of each row;
    ``aux`` (3, C * 16N) colour / shape / clock-number class of each merged visual token.
    """

    pixels: torch.Tensor
    grid: torch.Tensor
    prefix_ids: torch.Tensor
    prefix_types: torch.Tensor
    prefix_pos: torch.Tensor
    suffix_ids: torch.Tensor
    suffix_pos: torch.Tensor
    labels: torch.Tensor
    key_labels: torch.Tensor
    row_clip: torch.Tensor
    aux: torch.Tensor
    qtypes: list[str]


def prompt_ids(adapter: Qwen2VLAdapter, model, clip: task.Clip, questions: list[str]):
    """The engine's prepared prompt and positions for each question about ``clip``.

    Returns ``[(prompt, positions (3, L), next_position), ...]`` and the shared prefix length. The
    video is preprocessed once: the first question goes through `adapter.prepare` with the video and
    `adapter.positions`; the others are tokenised through `adapter.prepare` as text (cached), their
    question part is spliced after the shared prefix (``<|im_start|> user <|vision_start|>
    <|video_pad|>... <|vision_end|>``) and their text positions continue the first prompt's.
    tests/test_quality_model.py checks this equals a full `prepare` + `positions` per question.
    """
    first = adapter.prepare(Request(prompt=questions[0], video=clip.raw_frames, video_fps=task.RAW_FPS))
    pos0, _ = adapter.positions(model, first)
    vision_end = adapter.tokenizer.convert_tokens_to_ids("<|vision_end|>")
    n_prefix = int((first.input_ids == vision_end).nonzero()[0]) + 1
    out = []
    for q in questions:
        text = _text_ids(adapter, q)
        ids = torch.cat([first.input_ids[:n_prefix], text[2:]])  # text[:2] = <|im_start|> user
        modality = torch.cat([first.modality[:n_prefix], torch.zeros(len(text) - 2, dtype=first.modality.dtype)])
        # After the video every token is text, one position further than the previous one.
        pos = torch.cat([pos0[:, :n_prefix], pos0[:, n_prefix - 1 : n_prefix] + torch.arange(1, len(text) - 1)], dim=1)
        prompt = PreparedPrompt(ids, modality, first.vision, n_frames=first.n_frames)
        out.append((prompt, pos, int(pos.max()) + 1))
    return out, n_prefix


@functools.lru_cache(maxsize=4096)
def _text_ids(adapter: Qwen2VLAdapter, text: str) -> torch.Tensor:
    """Token ids of a text-only prompt (the engine's chat template), cached by question."""
    return adapter.prepare(Request(prompt=text)).input_ids


@functools.lru_cache(maxsize=4096)
def _answer_ids(tok, answer: str) -> tuple[int, ...]:
    return (*tok(answer, add_special_tokens=False)["input_ids"], tok.eos_token_id)


def aux_targets(scene: task.Scene) -> np.ndarray:
    """``(3, 16N)`` int64: per merged token, colour index (or len(COLOURS) for none), shape index
    (or len(SHAPES)), clock number - 1 (or MAX_FRAMES); tokens in frame-major raster order."""
    n = scene.n_frames
    out = np.empty((3, n, task.GRID, task.GRID), dtype=np.int64)
    out[0], out[1], out[2] = len(task.COLOURS), len(task.SHAPES), task.MAX_FRAMES
    colours, shapes = list(task.COLOURS), list(task.SHAPES)
    r, c = task.CLOCK_CELL
    out[2, :, r, c] = np.arange(n)
    for e in scene.events:
        for k, (r, c) in zip(e.frames, e.cells):
            out[0, k, r, c] = colours.index(e.colour)
            out[1, k, r, c] = shapes.index(e.shape)
    return out.reshape(3, -1)


def build_batch(model, adapter: Qwen2VLAdapter, clips: list[task.Clip]) -> ClipBatch:
    """Collate clips of equal length (and their questions) into one `ClipBatch`."""
    tok = adapter.tokenizer
    key_words = set(tok.convert_tokens_to_ids([*task.COLOURS, *task.SHAPES, *task.NUMBERS]))
    pixels, grids, prefix_ids, prefix_types, prefix_pos, rows, row_clip, aux, qtypes = ([] for _ in range(9))
    for ci, clip in enumerate(clips):
        prompts, n_prefix = prompt_ids(adapter, model, clip, [qa.question for qa in clip.qas])
        first = prompts[0][0]
        pixels.append(first.vision["pixel_values_videos"])
        grids.append(first.vision["video_grid_thw"])
        aux.append(torch.from_numpy(aux_targets(clip.scene)))
        prefix_ids.append(first.input_ids[:n_prefix])
        prefix_types.append(first.modality[:n_prefix].to(torch.int32))
        prefix_pos.append(prompts[0][1][:, :n_prefix])
        for qa, (prompt, pos, next_pos) in zip(clip.qas, prompts):
            answer = list(_answer_ids(tok, qa.answer))
            # Fed: question + assistant header, then the answer (not its final EOS).
            ids = torch.cat([prompt.input_ids[n_prefix:], torch.tensor(answer[:-1], dtype=torch.long)])
            ans_pos = torch.arange(next_pos, next_pos + len(answer) - 1)[None].expand(3, -1)
            row_pos = torch.cat([pos[:, n_prefix:], ans_pos], dim=1)
            labels = torch.full_like(ids, -100)
            n_q = prompt.length - n_prefix
            labels[n_q - 1 :] = torch.tensor(answer)  # the last prompt token predicts the first answer token
            key = torch.full_like(ids, -100)
            key_pos = [i for i in range(n_q) if int(ids[i]) in key_words]
            if key_pos:  # the question's key word (shape, colour or frame number) also predicts the answer
                key[key_pos[-1]] = answer[0]
            rows.append((ids, row_pos, labels, key))
            row_clip.append(ci)
            qtypes.append(qa.qtype)
    width = max(len(r[0]) for r in rows)
    suffix_ids = torch.full((len(rows), width), adapter.pad_token_id, dtype=torch.long)
    suffix_pos = torch.zeros((3, len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    key_labels = labels.clone()
    for i, (ids, pos, lab, key) in enumerate(rows):
        suffix_ids[i, : len(ids)], suffix_pos[:, i, : len(ids)] = ids, pos
        labels[i, : len(ids)], key_labels[i, : len(ids)] = lab, key
        suffix_pos[:, i, len(ids):] = pos[:, -1:] + 1  # right padding: never attended by real tokens
    return ClipBatch(torch.cat(pixels), torch.cat(grids), torch.stack(prefix_ids), torch.stack(prefix_types), torch.stack(prefix_pos, dim=1),
                     suffix_ids, suffix_pos, labels, key_labels, torch.tensor(row_clip), torch.cat(aux, dim=1), qtypes)


# ---- forward and losses -----------------------------------------------------------------------------------


def expand_cache(cache, index: torch.Tensor):
    """A new `DynamicCache` whose row ``i`` is row ``index[i]`` of ``cache`` (gradients flow)."""
    from transformers import DynamicCache

    out = DynamicCache()
    for layer_idx, layer in enumerate(cache.layers):
        out.update(layer.keys.index_select(0, index), layer.values.index_select(0, index), layer_idx)
    return out


class AlignmentHead(torch.nn.Module):
    """Scores merged visual tokens against word embeddings (+ a learned "none" vector per group)."""

    def __init__(self, tok, hidden: int, scale: float = 10.0):
        super().__init__()
        groups = (list(task.COLOURS), list(task.SHAPES), list(task.NUMBERS))
        self.word_ids = [torch.tensor(tok.convert_tokens_to_ids(g)) for g in groups]
        self.none = torch.nn.Parameter(torch.randn(len(groups), hidden) * 0.02)
        self.scale = scale

    def forward(self, feats: torch.Tensor, embeddings: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """feats (T, H) visual tokens, embeddings (V, H), targets (3, T) -> cross-entropy.

        Per group, the mean over the tokens that show something and the mean over "none" tokens are
        averaged, so the few object tokens weigh as much as the background."""
        f = F.normalize(feats, dim=-1)
        losses = []
        for g, ids in enumerate(self.word_ids):
            classes = F.normalize(torch.cat([embeddings[ids], self.none[g : g + 1]]), dim=-1)
            ce = F.cross_entropy(self.scale * f @ classes.T, targets[g], reduction="none")
            none = targets[g] == len(ids)
            losses += [ce[~none].mean(), ce[none].mean()] if (~none).any() else [ce.mean()]
        return torch.stack(losses).mean()


def forward_logits(model, batch: ClipBatch, features: torch.Tensor | None = None) -> torch.Tensor:
    """Logits ``(R, S, V)`` of every row's suffix: the vision tower and the video prefix run once per
    clip (standard HF forwards), the suffixes on the prefix cache expanded to one row per question.
    ``features``: the clips' merged visual tokens, when already computed."""
    from transformers import DynamicCache
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    base = model.model
    if features is None:
        features = torch.cat(base.get_video_features(batch.pixels, batch.grid).pooler_output)
    per_clip = features.split((batch.grid.prod(-1) // base.visual.spatial_merge_size**2).tolist())
    prefix = base(
        input_ids=batch.prefix_ids,
        position_ids=batch.prefix_pos,
        mm_token_type_ids=batch.prefix_types,
        video_grid_thw=batch.grid,
        mm_encoder_outputs={"video": BaseModelOutputWithPooling(pooler_output=per_clip)},
        past_key_values=DynamicCache(),
        use_cache=True,
    )
    return model(
        input_ids=batch.suffix_ids,
        position_ids=batch.suffix_pos,
        past_key_values=expand_cache(prefix.past_key_values, batch.row_clip),
        use_cache=True,
    ).logits


def forward_batch(model, head: AlignmentHead, batch: ClipBatch):
    """Answer loss (mean over rows of the per-row mean token CE), alignment loss, key-word loss
    (mean CE of the first answer token predicted at the question's key word), per-row exact match.

    The key-word loss is deep supervision of the hard step: it asks the token that names the needle
    to fetch the needle's attribute itself (one content-matching hop from a clean word embedding);
    the answer position then only has to read that token. Prompt positions are never decoded, so
    this changes nothing at inference."""
    features = torch.cat(model.model.get_video_features(batch.pixels, batch.grid).pooler_output)
    aux_loss = head(features, model.get_input_embeddings().weight, batch.aux)
    logits = forward_logits(model, batch, features)
    mask = batch.labels != -100
    token_ce = F.cross_entropy(logits.flatten(0, 1), batch.labels.flatten().clamp(min=0), reduction="none")
    token_ce = token_ce.view_as(batch.labels) * mask
    answer_loss = (token_ce.sum(1) / mask.sum(1)).mean()
    key = batch.key_labels != -100
    key_loss = F.cross_entropy(logits[key], batch.key_labels[key]) if key.any() else answer_loss * 0
    correct = (logits.argmax(-1) == batch.labels) | ~mask
    return answer_loss, aux_loss, key_loss, correct.all(1)


# ---- curriculum and schedule -------------------------------------------------------------------------------


@dataclass
class TrainState:
    step: int = 0
    level: int = 0
    level_steps: int = 0
    level_start: float = 0.0  # progress when the level began
    ema_exact: float = 0.0
    wall_s: float = 0.0
    history: list[dict] = field(default_factory=list)


def sample_clips(args, state: TrainState, step: int) -> list[task.Clip]:
    """The clips of ``step`` (a pure function of the seed, the step and the curriculum level)."""
    rng = np.random.default_rng([args.seed, step])
    level_idx = state.level
    if level_idx > 0 and rng.random() < args.replay:
        level_idx = int(rng.integers(level_idx))
    level = CURRICULUM[level_idx]
    n = int(rng.choice(level.frames))
    n_clips = max(1, min(args.frames_per_step // n, args.max_clips))
    n_questions = max(1, min(args.questions_per_clip, args.max_rows // n_clips))
    clips = []
    for i in range(n_clips):
        seed = TRAIN_SEED_BASE * (args.seed + 1) + step * 64 + i
        n_obj = int(rng.integers(level.objects[0], level.objects[1] + 1))
        clips.append(task.make_clip(seed, n, n_obj, max_duration=level.max_duration,
                                    n_questions=n_questions, types=level.types))
    return clips


def progress(args, state: "TrainState") -> float:
    """Fraction of the run done: steps or wall time, whichever is further along (so that a run on a
    busy machine still decays its LR and finishes its curriculum within ``--minutes``)."""
    return min(1.0, max(state.step / args.steps, state.wall_s / (60 * args.minutes)))


def learning_rate(args, state: "TrainState") -> float:
    if state.step < args.warmup:
        return args.lr * (state.step + 1) / args.warmup
    cosine = 0.5 * (1 + math.cos(math.pi * progress(args, state)))
    return args.lr * (args.final_lr_ratio + (1 - args.final_lr_ratio) * cosine)


def update_curriculum(args, state: "TrainState", exact: float) -> None:
    """Move to the next level when the running exact match passes ``--advance-at`` (after at least
    ``--level-min-steps``) or when the level has used ``--level-cap`` of the run."""
    state.ema_exact = 0.95 * state.ema_exact + 0.05 * exact
    state.level_steps += 1
    ready = state.level_steps >= args.level_min_steps and state.ema_exact >= args.advance_at
    capped = progress(args, state) - state.level_start >= args.level_cap
    if state.level + 1 < len(CURRICULUM) and (ready or capped):
        state.level += 1
        state.level_steps = 0
        state.level_start = progress(args, state)
        state.ema_exact = 0.0


# ---- the loop -----------------------------------------------------------------------------------------------


def save_state(path: Path, model, head, opt, state: TrainState) -> None:
    path.mkdir(parents=True, exist_ok=True)
    tmp = path / "state.pt.tmp"
    torch.save({"model": model.state_dict(), "head": head.state_dict(), "opt": opt.state_dict(),
                "state": asdict(state)}, tmp)
    os.replace(tmp, path / "state.pt")


def train(args) -> Path:
    torch.set_num_threads(1)
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    tok = build_tokenizer()
    model = build_model(tok, hidden=args.hidden, layers=args.layers, intermediate=args.intermediate,
                        vision_depth=args.vision_depth, vision_dim=args.vision_dim)
    if args.similarity_init:
        similarity_init(model, args.similarity_init)
    head = AlignmentHead(tok, args.hidden)
    params = list(model.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.98), weight_decay=args.weight_decay)
    adapter = Qwen2VLAdapter(model.config, tok, PREPROCESSOR_CONFIG)
    state_dir = Path(args.state or f"runs/{Path(args.out).name}")
    state = TrainState()
    if (state_dir / "state.pt").exists():
        saved = torch.load(state_dir / "state.pt", weights_only=False)
        model.load_state_dict(saved["model"])
        head.load_state_dict(saved["head"])
        opt.load_state_dict(saved["opt"])
        state = TrainState(**saved["state"])
        print(f"resumed from step {state.step} ({state.wall_s:.0f} s)", flush=True)
    (state_dir / "args.json").parent.mkdir(parents=True, exist_ok=True)
    (state_dir / "args.json").write_text(json.dumps(vars(args), indent=2))
    model.train()
    t_start, t_saved = time.perf_counter() - state.wall_s, time.perf_counter()
    log_rows, log_exact, log_loss, log_aux, log_key = {}, [], [], [], []
    while progress(args, state) < 1.0:
        clips = sample_clips(args, state, state.step)
        batch = build_batch(model, adapter, clips)
        for g in opt.param_groups:
            g["lr"] = learning_rate(args, state)
        answer_loss, aux_loss, key_loss, exact = forward_batch(model, head, batch)
        loss = answer_loss + args.aux_weight * aux_loss + args.key_weight * key_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        state.step += 1
        state.wall_s = time.perf_counter() - t_start
        update_curriculum(args, state, float(exact.float().mean()))
        log_loss.append(answer_loss.item())
        log_aux.append(aux_loss.item())
        log_key.append(key_loss.item())
        log_exact.append(float(exact.float().mean()))
        for t, e in zip(batch.qtypes, exact.tolist()):
            log_rows.setdefault(t, []).append(e)
        if state.step % args.log_every == 0 or progress(args, state) >= 1.0:
            row = {"step": state.step, "wall_s": round(state.wall_s), "level": state.level,
                   "loss": round(float(np.mean(log_loss)), 4), "aux": round(float(np.mean(log_aux)), 4),
                   "exact": round(float(np.mean(log_exact)), 3), "ema": round(state.ema_exact, 3),
                   "lr": round(learning_rate(args, state), 6), "key": round(float(np.mean(log_key)), 4),
                   "by_type": {t: round(float(np.mean(v)), 2) for t, v in sorted(log_rows.items())}}
            state.history.append(row)
            print(json.dumps(row), flush=True)
            log_rows, log_exact, log_loss, log_aux, log_key = {}, [], [], [], []
        if time.perf_counter() - t_saved > args.save_every_s:
            save_state(state_dir, model, head, opt, state)
            t_saved = time.perf_counter()
    save_state(state_dir, model, head, opt, state)
    out = Path(args.out)
    save_checkpoint(model.eval(), tok, out)
    (state_dir / "summary.json").write_text(json.dumps(
        {"seed": args.seed, "steps": state.step, "wall_s": round(state.wall_s), "final_level": state.level,
         "history": state.history}, indent=1))
    print(f"saved {out} after {state.step} steps, {state.wall_s / 60:.1f} min", flush=True)
    return out


def parse_args(argv: list[str] | None = None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="checkpoint directory to write at the end")
    p.add_argument("--state", default=None, help="resumable training state (default runs/<out name>)")
    p.add_argument("--steps", type=int, default=6000, help="the run ends at --steps or --minutes, whichever comes first")
    p.add_argument("--minutes", type=float, default=45.0, help="wall-time budget (training steps only)")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--final-lr-ratio", type=float, default=0.05)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--frames-per-step", type=int, default=32, help="logical frames of video per step")
    p.add_argument("--max-clips", type=int, default=16)
    p.add_argument("--questions-per-clip", type=int, default=8)
    p.add_argument("--max-rows", type=int, default=48, help="max questions per step")
    p.add_argument("--aux-weight", type=float, default=1.0)
    p.add_argument("--key-weight", type=float, default=1.0)
    p.add_argument("--advance-at", type=float, default=0.8)
    p.add_argument("--level-min-steps", type=int, default=100)
    p.add_argument("--level-cap", type=float, default=0.14, help="max fraction of the run spent in one level")
    p.add_argument("--replay", type=float, default=0.2, help="fraction of steps drawn from an earlier level")
    p.add_argument("--similarity-init", type=float, default=0.08,
                   help="std of the shared query/key projection of one head per KV group (0: off)")
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--intermediate", type=int, default=384)
    p.add_argument("--vision-depth", type=int, default=2)
    p.add_argument("--vision-dim", type=int, default=64)
    p.add_argument("--save-every-s", type=float, default=180.0)
    p.add_argument("--log-every", type=int, default=50)
    return p.parse_args(argv)


if __name__ == "__main__":
    train(parse_args())
