"""The "needle in a video" task: synthetic clips of coloured shapes, with short-answer questions.

A clip has ``N`` logical frames of 112x112 RGB pixels. A frame is a 4x4 grid of 28x28 cells, and one
cell is exactly one merged visual token of Qwen2-VL (patch 14, spatial merge 2), so a logical frame
is 16 LM tokens. The model sees each logical frame as two identical raw frames (one temporal patch),
so the array handed to the engine is ``(2N, 112, 112, 3)`` uint8.

Scene: the top-left cell of every frame shows a clock (the 1-based frame number, white digits on
black). On a noisy grey background, ``K`` objects (distinct colours, distinct shapes) appear one after
another: object ``i`` is visible during a run of ``d_i`` consecutive frames, runs do not overlap and
may be separated by empty frames, and within its run an object can move to a neighbouring cell from
one frame to the next. Only the ``sum(d_i)`` object tokens (plus the clocks) matter; the rest is noise,
which is what a KV-compression benchmark needs.

Questions (``QTYPES``) have answers of one word, except ``after`` (two) and ``caption`` (a sequence).
Everything is a pure function of a seed: `make_clip(seed, n_frames, ...)` always renders the same
pixels and the same questions; `heldout_set` is the fixed test split.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

FRAME = 112
CELL = 28
GRID = FRAME // CELL  # 4 cells per side -> 16 tokens per logical frame
CLOCK_CELL = (0, 0)
RAW_PER_FRAME = 2  # temporal_patch_size: one logical frame = two identical raw frames
RAW_FPS = 2.0  # raw frames per second of the rendered clip (one logical frame per second)
MAX_FRAMES = 128  # largest clock value (and the largest number word)

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 70, 230),
    "yellow": (240, 220, 30),
    "purple": (140, 50, 200),
    "orange": (250, 140, 20),
    "cyan": (30, 210, 220),
    "pink": (250, 120, 200),
}
SHAPES = ("circle", "square", "triangle", "star", "cross", "diamond")
NUMBERS = tuple(str(i) for i in range(1, MAX_FRAMES + 1))

QTYPES = ("colour", "shape", "frame_colour", "frame_shape", "which_frame", "count", "after", "caption")
TEMPLATES = {
    "colour": "what colour is the {shape} ?",
    "shape": "which shape is {colour} ?",
    "frame_colour": "what colour is the shape in frame {frame} ?",
    "frame_shape": "which shape is in frame {frame} ?",
    "which_frame": "in which frame does the {shape} first appear ?",
    "count": "how many frames show the {shape} ?",
    "after": "what comes after the {shape} ?",
    "caption": "describe the video .",
}
CAPTION_JOIN = "then"


def vocabulary() -> list[str]:
    """Every word of every question and answer (the tokenizer's vocabulary, in a fixed order)."""
    words: list[str] = ["system", "user", "assistant"]  # chat-template role names
    for template in TEMPLATES.values():
        words += re.sub(r"\{\w+\}", " ", template).split()
    words += [CAPTION_JOIN, *COLOURS, *SHAPES, *NUMBERS]
    return list(dict.fromkeys(words))


# ---- sprites ----------------------------------------------------------------------------------------


def _shape_mask(shape: str) -> np.ndarray:
    """A fixed ``(CELL, CELL)`` boolean sprite of about 22x22 pixels."""
    yy, xx = np.mgrid[0:CELL, 0:CELL].astype(np.float32) - (CELL - 1) / 2
    r = 10.5
    if shape == "circle":
        return xx**2 + yy**2 <= r**2
    if shape == "square":
        return (np.abs(xx) <= 9) & (np.abs(yy) <= 9)
    if shape == "triangle":
        return (yy <= 9) & (yy >= -10) & (np.abs(xx) <= (yy + 10) * 0.55)
    if shape == "diamond":
        return np.abs(xx) + np.abs(yy) <= r
    if shape == "cross":
        return ((np.abs(xx) <= 3.5) & (np.abs(yy) <= r)) | ((np.abs(yy) <= 3.5) & (np.abs(xx) <= r))
    if shape == "star":
        angle = np.arctan2(yy, xx)
        radius = np.sqrt(xx**2 + yy**2)
        return radius <= 5 + 6 * (0.5 + 0.5 * np.cos(5 * angle + np.pi / 2))
    raise ValueError(f"unknown shape {shape!r}")


SPRITES = {s: _shape_mask(s) for s in SHAPES}

_DIGITS = {  # 3x5 bitmap font, rows top to bottom
    "0": "111101101101111", "1": "010110010010111", "2": "111001111100111", "3": "111001111001111",
    "4": "101101111001001", "5": "111100111001111", "6": "111100111101111", "7": "111001001001001",
    "8": "111101111101111", "9": "111101111001111",
}


def clock_cell(frame_number: int) -> np.ndarray:
    """``(CELL, CELL, 3)`` uint8: the frame number in white digits (6x15 each) on black."""
    cell = np.full((CELL, CELL, 3), 16, dtype=np.uint8)
    text = str(frame_number)
    width = 6 * len(text) + 2 * (len(text) - 1)
    x0, y0 = (CELL - width) // 2, (CELL - 15) // 2
    for i, ch in enumerate(text):
        glyph = np.array([int(b) for b in _DIGITS[ch]], dtype=bool).reshape(5, 3)
        glyph = np.repeat(np.repeat(glyph, 3, axis=0), 2, axis=1)  # (15, 6)
        x = x0 + 8 * i
        cell[y0 : y0 + 15, x : x + 6][glyph] = 240
    return cell


# ---- scenes -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Event:
    """One object, visible in frames ``start .. start + len(cells) - 1`` (0-based) at ``cells[j]``."""

    colour: str
    shape: str
    start: int
    cells: tuple[tuple[int, int], ...]

    @property
    def duration(self) -> int:
        return len(self.cells)

    @property
    def frames(self) -> range:
        return range(self.start, self.start + self.duration)


@dataclass(frozen=True)
class Scene:
    n_frames: int
    events: tuple[Event, ...]  # in time order

    def event_at(self, frame: int) -> Event | None:
        return next((e for e in self.events if frame in e.frames), None)


@dataclass(frozen=True)
class QA:
    qtype: str
    question: str
    answer: str


@dataclass
class Clip:
    """A scene and its questions; the pixels are rendered on first use (from the clip's seed)."""

    seed: int
    scene: Scene
    qas: list[QA]

    @cached_property
    def frames(self) -> np.ndarray:
        """``(N, 112, 112, 3)`` uint8 logical frames."""
        return render(self.scene, np.random.default_rng([self.seed, 1]))

    @property
    def raw_frames(self) -> np.ndarray:
        """``(2N, 112, 112, 3)`` uint8: what the engine is given (each logical frame twice)."""
        return np.repeat(self.frames, RAW_PER_FRAME, axis=0)


def _path(rng: np.random.Generator, duration: int, move_prob: float) -> tuple[tuple[int, int], ...]:
    free = [(r, c) for r in range(GRID) for c in range(GRID) if (r, c) != CLOCK_CELL]
    cells = [free[rng.integers(len(free))]]
    for _ in range(duration - 1):
        r, c = cells[-1]
        if rng.random() < move_prob:
            steps = [(r + dr, c + dc) for dr, dc in ((1, 0), (-1, 0), (0, 1), (0, -1))]
            steps = [s for s in steps if s in free]
            r, c = steps[rng.integers(len(steps))]
        cells.append((r, c))
    return tuple(cells)


def make_scene(rng: np.random.Generator, n_frames: int, n_objects: int, max_duration: int = 3,
               move_prob: float = 0.5) -> Scene:
    """Random scene: ``n_objects`` (clipped to what fits) events in order, separated by random gaps."""
    n_objects = max(1, min(n_objects, n_frames, len(SHAPES)))
    colours = rng.permutation(list(COLOURS))[:n_objects]
    shapes = rng.permutation(list(SHAPES))[:n_objects]
    durations = rng.integers(1, max_duration + 1, size=n_objects)
    while durations.sum() > n_frames:
        durations[int(np.argmax(durations))] -= 1
    # Spread the free frames over the n_objects + 1 gaps (stars and bars).
    free = n_frames - int(durations.sum())
    bars = np.sort(rng.integers(0, free + 1, size=n_objects))
    gaps = np.diff(np.concatenate([[0], bars]))
    events, t = [], 0
    for colour, shape, d, gap in zip(colours, shapes, durations, gaps):
        t += int(gap)
        events.append(Event(str(colour), str(shape), t, _path(rng, int(d), move_prob)))
        t += int(d)
    return Scene(n_frames, tuple(events))


def render(scene: Scene, rng: np.random.Generator) -> np.ndarray:
    """``(N, 112, 112, 3)`` uint8: noisy grey background, clock, and the visible object per frame."""
    n = scene.n_frames
    base = rng.integers(100, 150, size=(n, 1, 1, 1))
    frames = np.clip(base + rng.normal(0, 12, size=(n, FRAME, FRAME, 3)), 0, 255).astype(np.uint8)
    for k in range(n):
        r, c = CLOCK_CELL
        frames[k, r * CELL : (r + 1) * CELL, c * CELL : (c + 1) * CELL] = clock_cell(k + 1)
    for e in scene.events:
        for k, (r, c) in zip(e.frames, e.cells):
            block = frames[k, r * CELL : (r + 1) * CELL, c * CELL : (c + 1) * CELL]
            block[SPRITES[e.shape]] = COLOURS[e.colour]
    return frames


# ---- questions --------------------------------------------------------------------------------------


def caption(scene: Scene) -> str:
    return f" {CAPTION_JOIN} ".join(f"{e.colour} {e.shape}" for e in scene.events)


def all_questions(scene: Scene, rng: np.random.Generator) -> list[QA]:
    """Every question the scene supports (frame questions use one random frame of each object)."""
    qas: list[QA] = []
    for i, e in enumerate(scene.events):
        frame = int(e.frames[rng.integers(e.duration)]) + 1
        qas += [
            QA("colour", TEMPLATES["colour"].format(shape=e.shape), e.colour),
            QA("shape", TEMPLATES["shape"].format(colour=e.colour), e.shape),
            QA("frame_colour", TEMPLATES["frame_colour"].format(frame=frame), e.colour),
            QA("frame_shape", TEMPLATES["frame_shape"].format(frame=frame), e.shape),
            QA("which_frame", TEMPLATES["which_frame"].format(shape=e.shape), str(e.start + 1)),
            QA("count", TEMPLATES["count"].format(shape=e.shape), str(e.duration)),
        ]
        if i + 1 < len(scene.events):
            nxt = scene.events[i + 1]
            qas.append(QA("after", TEMPLATES["after"].format(shape=e.shape), f"{nxt.colour} {nxt.shape}"))
    qas.append(QA("caption", TEMPLATES["caption"], caption(scene)))
    return qas


def pick_questions(qas: list[QA], rng: np.random.Generator, k: int, types: tuple[str, ...] = QTYPES) -> list[QA]:
    """Up to ``k`` distinct questions, cycling over the question types in a random order."""
    by_type = {t: [q for q in qas if q.qtype == t] for t in types}
    pools = [list(rng.permutation(len(by_type[t]))) for t in types]
    order = rng.permutation(len(types))
    out: list[QA] = []
    while len(out) < k and any(pools):
        for j in order:
            if pools[j] and len(out) < k:
                out.append(by_type[types[j]][pools[j].pop()])
    return out


def make_clip(seed: int, n_frames: int, n_objects: int | None = None, *, max_duration: int = 3,
              n_questions: int | None = None, types: tuple[str, ...] = QTYPES) -> Clip:
    """The clip of ``seed`` (deterministic). ``n_objects`` None draws 2-6; ``n_questions`` None keeps all."""
    rng = np.random.default_rng([seed, 0])
    if n_objects is None:
        n_objects = int(rng.integers(2, 7))
    scene = make_scene(rng, n_frames, n_objects, max_duration)
    qas = [q for q in all_questions(scene, rng) if q.qtype in types]
    if n_questions is not None:
        qas = pick_questions(qas, rng, n_questions, types)
    return Clip(seed, scene, qas)


# ---- the held-out split -----------------------------------------------------------------------------

HELDOUT_SEED = 1_000_000  # training seeds stay far below (see meda_quality.train)
HELDOUT_LENGTHS = (4, 8, 16, 32, 64, 128)


@dataclass(frozen=True)
class Item:
    """One held-out question about one clip (the clip is rebuilt from ``seed`` and ``n_frames``)."""

    seed: int
    n_frames: int
    qtype: str
    question: str
    answer: str

    def clip(self) -> Clip:
        return make_clip(self.seed, self.n_frames, n_questions=0)


def heldout_set(per_cell: int = 25, lengths: tuple[int, ...] = HELDOUT_LENGTHS,
                types: tuple[str, ...] = QTYPES, split: int = 0) -> list[Item]:
    """``per_cell`` items per (length, type): clip seeds are fixed, so the split never changes.

    Clip ``j`` of a cell has seed ``HELDOUT_SEED + split * 10**5 + 1000 * length + 100 * type + j``
    (``split`` 0 is the reference test split; other splits give more, disjoint test data).
    """
    items = []
    for n in lengths:
        for ti, t in enumerate(types):
            for j in range(per_cell):
                seed = HELDOUT_SEED + split * 100_000 + 1000 * n + 100 * ti + j
                clip = make_clip(seed, n, n_questions=0)
                qa = _heldout_question(clip, t, seed)
                items.append(Item(seed, n, t, qa.question, qa.answer))
    return items


def _heldout_question(clip: Clip, qtype: str, seed: int) -> QA:
    """One question of type ``qtype`` about ``clip``, chosen by ``seed``."""
    rng = np.random.default_rng(seed + 7)
    qas = [q for q in all_questions(clip.scene, rng) if q.qtype == qtype]
    if not qas:
        raise ValueError(f"clip {seed} has no {qtype} question")
    return qas[int(rng.integers(len(qas)))]


def normalise(text: str) -> str:
    """Lower case, punctuation dropped, whitespace collapsed (for exact-match scoring)."""
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


# ---- MP4 files and the demo corpus --------------------------------------------------------------------


def write_mp4(path: str | Path, raw_frames: np.ndarray, fps: float = RAW_FPS, crf: int = 6) -> None:
    """Encode ``(T, H, W, 3)`` uint8 frames as H.264 (yuv420p, near-lossless ``crf``)."""
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=int(fps))
        stream.width, stream.height = raw_frames.shape[2], raw_frames.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": str(crf), "preset": "medium"}
        for arr in raw_frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(arr), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def read_mp4(path: str | Path) -> np.ndarray:
    """Decode every frame: ``(T, H, W, 3)`` uint8 (with PyAV)."""
    import av

    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def write_corpus(out_dir: str | Path, lengths: tuple[int, ...] = (8, 16, 32), per_cell: int = 2,
                 types: tuple[str, ...] = QTYPES, split: int = 1) -> Path:
    """Write held-out clips as MP4 files plus ``manifest.jsonl`` (one line per question).

    Each line: ``uri`` (file name relative to the manifest), ``prompt``, ``answer``, ``qtype``,
    ``n_frames`` (logical), ``raw_frames``, ``fps`` (of the raw frames), ``seed``. Returns the manifest path.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lines = []
    for item in heldout_set(per_cell, lengths, types, split=split):
        name = f"clip-{item.seed}-{item.n_frames}f.mp4"
        if not (out / name).exists():
            write_mp4(out / name, item.clip().raw_frames)
        lines.append({
            "uri": name, "prompt": item.question, "answer": item.answer, "qtype": item.qtype,
            "n_frames": item.n_frames, "raw_frames": item.n_frames * RAW_PER_FRAME, "fps": RAW_FPS,
            "seed": item.seed,
        })
    manifest = out / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return manifest
