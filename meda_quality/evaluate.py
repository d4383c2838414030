"""Exact-match accuracy of a needle checkpoint on the held-out split, through `meda_engine.Engine`.

    python -m meda_quality.evaluate models/needle-s0                  # full cache, writes eval.json
    python -m meda_quality.evaluate models/needle-s0 --card runs/needle-s0   # + README.md model card

Answers are generated greedily and compared after `task.normalise` (lower case, no punctuation).
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from meda_engine import CompressionConfig, Engine, GenerationConfig, Request

from . import task

MAX_NEW_TOKENS = 24  # the longest answer (a 6-object caption) is 17 words
# The fixed subset tests/test_quality_model.py replays: 2 clips per (type, length), short videos.
TEST_SUBSET = {"per_cell": 2, "lengths": (4, 8), "split": 0}


def test_subset() -> list[task.Item]:
    return task.heldout_set(TEST_SUBSET["per_cell"], TEST_SUBSET["lengths"], split=TEST_SUBSET["split"])


def evaluate(engine: Engine, items: Sequence[task.Item], *, compression: CompressionConfig | None = None,
             batch_size: int = 8, frames: Callable[[task.Item], np.ndarray] | None = None,
             query_after_compression: bool = False) -> list[dict]:
    """Answer every item (batched by clip length) and score it.

    ``frames(item)`` gives the ``(2N, H, W, 3)`` uint8 video (default: the rendered clip, e.g. pass
    a function that decodes the item's MP4 instead). ``query_after_compression`` selects the engine's
    query-agnostic protocol (the question is fed after the video's cache was compressed). Returns
    one record per item, in order:
    ``{seed, n_frames, qtype, question, answer, output, correct}``.
    """
    frames = frames or (lambda item: item.clip().raw_frames)
    compression = compression or CompressionConfig(method="full")
    order = sorted(range(len(items)), key=lambda i: items[i].n_frames)
    records: list[dict | None] = [None] * len(items)
    for start in range(0, len(order), batch_size):
        chunk = [items[i] for i in order[start : start + batch_size]]
        requests = [Request(prompt=it.question, video=frames(it), video_fps=task.RAW_FPS,
                            generation=GenerationConfig(max_new_tokens=MAX_NEW_TOKENS),
                            query_after_compression=query_after_compression) for it in chunk]
        results = engine.generate(requests, compression=compression)
        for i, it, res in zip(order[start : start + batch_size], chunk, results):
            records[i] = {"seed": it.seed, "n_frames": it.n_frames, "qtype": it.qtype, "question": it.question,
                          "answer": it.answer, "output": res.text,
                          "correct": task.normalise(res.text) == task.normalise(it.answer)}
    return [r for r in records if r is not None]


def evaluate_corpus(engine: Engine, manifest: Path, *, batch_size: int = 8) -> dict:
    """Accuracy on an MP4 corpus (`task.write_corpus`): decoded files vs the same clips rendered in memory.

    Returns ``{"mp4": summary, "rendered": summary, "same_answer": fraction of identical outputs}``.
    """
    lines = [json.loads(line) for line in manifest.read_text().splitlines() if line.strip()]
    items = [task.Item(d["seed"], d["n_frames"], d["qtype"], d["prompt"], d["answer"]) for d in lines]
    files = {(d["seed"], d["n_frames"]): manifest.parent / d["uri"] for d in lines}
    decoded = evaluate(engine, items, batch_size=batch_size,
                       frames=lambda it: task.read_mp4(files[(it.seed, it.n_frames)]))
    rendered = evaluate(engine, items, batch_size=batch_size)
    same = float(np.mean([a["output"] == b["output"] for a, b in zip(decoded, rendered)]))
    return {"mp4": summarise(decoded), "rendered": summarise(rendered), "same_answer": round(same, 4)}


def summarise(records: Sequence[dict]) -> dict:
    """Accuracy overall, per question type, per clip length and per (type, length); with counts."""
    def acc(rows):
        return {"accuracy": round(float(np.mean([r["correct"] for r in rows])), 4), "n": len(rows)}

    groups: dict[str, dict] = {"by_type": defaultdict(list), "by_length": defaultdict(list), "by_cell": defaultdict(list)}
    for r in records:
        groups["by_type"][r["qtype"]].append(r)
        groups["by_length"][str(r["n_frames"])].append(r)
        groups["by_cell"][f"{r['qtype']}@{r['n_frames']}"].append(r)
    out = {"overall": acc(records)}
    for name, g in groups.items():
        out[name] = {k: acc(v) for k, v in sorted(g.items(), key=lambda kv: _sort_key(kv[0]))}
    return out


def _sort_key(key: str):
    qtype, _, length = key.partition("@")
    if qtype.isdigit():
        return (0, int(qtype), "")
    return (task.QTYPES.index(qtype), int(length or 0), qtype)


# ---- the model card ---------------------------------------------------------------------------------------


def table(summary: dict, lengths: Sequence[int]) -> str:
    """Markdown: one row per question type, one column per clip length, plus the totals."""
    cells = summary["by_cell"]
    head = "| question type | " + " | ".join(f"{n} frames" for n in lengths) + " | all |"
    rule = "|---" * (len(lengths) + 2) + "|"
    rows = [head, rule]
    for t in task.QTYPES:
        vals = [cells.get(f"{t}@{n}", {}).get("accuracy") for n in lengths]
        rows.append(f"| {t} | " + " | ".join("-" if v is None else f"{100 * v:.0f}" for v in vals)
                    + f" | {100 * summary['by_type'][t]['accuracy']:.1f} |")
    rows.append("| **all** | " + " | ".join(f"{100 * summary['by_length'][str(n)]['accuracy']:.1f}" for n in lengths)
                + f" | **{100 * summary['overall']['accuracy']:.1f}** |")
    return "\n".join(rows)


def seeds_table(model_dirs: Sequence[str | Path]) -> str:
    """Markdown: per question type and per clip length, each checkpoint's held-out accuracy (from its
    eval.json) and the mean over checkpoints."""
    evals = [json.loads((Path(d) / "eval.json").read_text())["heldout"] for d in model_dirs]
    names = [Path(d).name for d in model_dirs]
    rows = ["| | " + " | ".join(names) + " | mean |", "|---" * (len(names) + 2) + "|"]
    keys = [("by_type", t) for t in task.QTYPES] + [("by_length", str(n)) for n in evals[0]["lengths"]]
    for group, key in keys:
        vals = [100 * e[group][key]["accuracy"] for e in evals]
        label = key if group == "by_type" else f"{key} frames"
        rows.append(f"| {label} | " + " | ".join(f"{v:.1f}" for v in vals) + f" | {np.mean(vals):.1f} |")
    vals = [100 * e["overall"]["accuracy"] for e in evals]
    rows.append("| **all** | " + " | ".join(f"{v:.1f}" for v in vals) + f" | **{np.mean(vals):.1f}** |")
    return "\n".join(rows)


def write_model_card(model_dir: Path, state_dir: Path, heldout: dict, per_cell: int, lengths: Sequence[int],
                     mp4: dict | None = None) -> Path:
    """README.md in ``model_dir`` from the training summary (``state_dir``) and held-out results."""
    from .train import CURRICULUM

    args = json.loads((state_dir / "args.json").read_text())
    summary = json.loads((state_dir / "summary.json").read_text())
    flags = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in args.items() if k not in ("out", "state"))
    n_params = sum(p.numel() for p in _load_params(model_dir))
    reached = {}
    for row in summary["history"]:
        reached.setdefault(row["level"], row["wall_s"])
    levels = "\n".join(
        f"  {i}. {lv.frames} frames, {lv.objects[0]}-{lv.objects[1]} objects, runs of 1-{lv.max_duration} frames"
        + ("" if lv.types == task.QTYPES else f", types {', '.join(lv.types)}")
        + (f" (reached after {reached[i] / 60:.0f} min)" if i in reached else " (not reached)")
        for i, lv in enumerate(CURRICULUM))
    text = f"""# needle-s{args['seed']}: a tiny Qwen2-VL for the "needle in a video" task

A `Qwen2VLForConditionalGeneration` ({n_params / 1e6:.2f} M parameters) trained from scratch on CPU on the
synthetic clips of `meda_quality.task` (see `docs/quality_model.md`). It is the default model of the demo
job and the model of the KV-compression quality benchmark. Not a general VLM: it only knows this task.

## Training
- Command: `python -m meda_quality.train --out {args['out']} {flags}`
- Seed {args['seed']}; {summary['steps']} steps in {summary['wall_s'] / 60:.1f} min wall time (1 CPU thread,
  2 shared cores); final curriculum level {summary['final_level']}.
- Data: a fresh random clip per sample (seeds from {10_000_000 * (args['seed'] + 1)}; the held-out split uses
  seeds below 2,000,000). {args['frames_per_step']} logical frames of video per step, up to
  {args['questions_per_clip']} questions per clip (question types cycled). Curriculum (moves on at
  {args['advance_at']} running exact match; {args['replay']:.0%} of steps replay an earlier level):
{levels}
- Loss: answer-token cross-entropy (each question weighted equally) + {args['aux_weight']} x alignment loss
  of the merged visual tokens against the colour / shape / number word embeddings + {args['key_weight']} x
  key-word loss (the question's key word also predicts the first answer token); one query head per KV
  group starts as a similarity head (std {args['similarity_init']}).

## Held-out accuracy (full KV cache, greedy, exact match, `meda_quality.evaluate`)
{per_cell} clips per (question type, length), split 0 (clip seeds fixed in `task.heldout_set`).
Lengths are logical frames (a frame is 16 visual tokens; 128 frames is a 2,068-token prompt).

{table(heldout, lengths)}

{_mp4_line(mp4)}

`eval.json` holds these numbers and the accuracy on the fixed test subset
(`meda_quality.evaluate.TEST_SUBSET`) that `tests/test_quality_model.py` checks.
"""
    path = model_dir / "README.md"
    path.write_text(text)
    return path


def _mp4_line(mp4: dict | None) -> str:
    if mp4 is None:
        return ""
    return (f"Decoded MP4 files (H.264 yuv420p, crf 6; demo corpus of `task.write_corpus`, {mp4['mp4']['overall']['n']} "
            f"questions, split 1): {100 * mp4['mp4']['overall']['accuracy']:.1f}% exact match, vs "
            f"{100 * mp4['rendered']['overall']['accuracy']:.1f}% on the same clips rendered in memory; "
            f"{100 * mp4['same_answer']:.0f}% of the answers are identical.")


def _load_params(model_dir: Path):
    from safetensors.torch import load_file

    return load_file(str(model_dir / "model.safetensors")).values()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Held-out exact match of a needle checkpoint through the engine")
    p.add_argument("model_dir")
    p.add_argument("--per-cell", type=int, default=25, help="clips per (question type, length)")
    p.add_argument("--lengths", type=int, nargs="+", default=list(task.HELDOUT_LENGTHS))
    p.add_argument("--split", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--card", default=None, help="training state dir: also write README.md and eval.json")
    p.add_argument("--records", default=None, help="write every answer to this JSONL file")
    p.add_argument("--mp4", default=None, help="also write the MP4 demo corpus here and score it decoded")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    engine = Engine.from_pretrained(args.model_dir, device="cpu", dtype="float32")
    t0 = time.perf_counter()
    records = evaluate(engine, task.heldout_set(args.per_cell, tuple(args.lengths), split=args.split),
                       batch_size=args.batch_size)
    heldout = summarise(records)
    subset = summarise(evaluate(engine, test_subset(), batch_size=args.batch_size))
    print(json.dumps({"overall": heldout["overall"], "by_type": heldout["by_type"], "by_length": heldout["by_length"],
                      "test_subset": subset["overall"], "eval_s": round(time.perf_counter() - t0)}, indent=1))
    mp4 = None
    if args.mp4:
        mp4 = evaluate_corpus(engine, task.write_corpus(args.mp4), batch_size=args.batch_size)
        print(json.dumps({"mp4": mp4["mp4"]["overall"], "rendered": mp4["rendered"]["overall"],
                          "same_answer": mp4["same_answer"]}))
    if args.records:
        Path(args.records).write_text("".join(json.dumps(r) + "\n" for r in records))
    if args.card:
        model_dir = Path(args.model_dir)
        (model_dir / "eval.json").write_text(json.dumps(
            {"heldout": {"per_cell": args.per_cell, "lengths": args.lengths, "split": args.split, **heldout},
             "test_subset": {**TEST_SUBSET, **subset["overall"]},
             "mp4_corpus": None if mp4 is None else {"mp4": mp4["mp4"]["overall"], "rendered": mp4["rendered"]["overall"],
                                                     "same_answer": mp4["same_answer"]}}, indent=1) + "\n")
        write_model_card(model_dir, Path(args.card), heldout, args.per_cell, args.lengths, mp4)


if __name__ == "__main__":
    main()
