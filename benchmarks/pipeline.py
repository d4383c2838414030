"""Pipeline throughput: clips/s through Ray Data (decode tasks + engine actor + Parquet) vs the engine alone.

    python -m benchmarks.pipeline --clips 32 --frames 16

Both sides answer the same MP4 clips with the same model, method, budget and engine batch size:

* **engine alone**: the clips are decoded in-process first (timed separately), then answered with
  `Engine.generate` in batches: clips / engine seconds;
* **pipeline**: `meda annotate` on a local Ray (already started, as on a long-lived cluster): clips /
  the job's wall time (planning, decode tasks, actor, Parquet writes and summary included).

Also reported: the time the pipeline spent in media decode vs inference (summed over rows / engine
calls) and the fraction of the pipeline's wall time the model actor was busy.

``--experiment batching`` compares the job's two batching modes on a corpus whose answers vary in
length (a manifest column ``max_new_tokens`` drawn uniformly from ``--min-new-tokens`` to
``--max-new-tokens`` per clip), same model, method, budget and row cap (``--max-num-seqs`` =
``--batch-size``): ``static`` (each Ray batch one engine call; the next starts when its slowest row
ends) vs ``continuous`` (every batch's requests stream into the actor's engine loop, up to
``--batches-in-flight`` batches at once). Target: continuous >= 1.2x clips/s.

    python -m benchmarks.pipeline --experiment batching --clips 48 --min-new-tokens 4 --max-new-tokens 64

``--experiment preprocess`` runs the job on the same clips with preparation (chat template, tokenisation,
resize + patchify) inside the model actor (``--preprocess in-actor``, the old path) and in the CPU
stage before it (``cpu-stage``), in ``--repeats`` pairs of runs (A B, B A, A B, ...), and reports for each run
clips/s and the model actor's time: busy (inside a call), engine busy (some row prefilling or
decoding: each row's admitted..finished span, from its telemetry) and the preparation done in the
actor (a call's start to its rows' submission).

    python -m benchmarks.pipeline --experiment preprocess --clips 32 --frames 16 --repeats 2
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any

from . import common


def parse_args(argv):
    p = common.base_parser("pipeline", __doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", default="random:small",
                   help="model directory used on both sides, or random:SHAPE for a random-weight Qwen2-VL whose "
                        "decoder has one of the --model shapes (built into a temporary directory)")
    p.add_argument("--clips", type=int, default=32)
    p.add_argument("--clip-frames", type=int, default=32, help="logical frames per generated clip")
    p.add_argument("--frames", type=int, default=16, help="frames sampled per clip by both sides")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--method", default="meda")
    p.add_argument("--budget", type=float, default=0.2)
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--ray-cpus", type=int, default=4, help="CPUs the local Ray advertises")
    p.add_argument("--experiment", default="alone", choices=("alone", "batching", "preprocess"),
                   help="alone: pipeline vs engine alone; batching: the job's continuous vs static batching; "
                        "preprocess: preparation inside the model actor vs in the CPU stage")
    p.add_argument("--preprocess", default="cpu-stage", choices=("cpu-stage", "in-actor"),
                   help="alone/batching: where the job prepares prompts (meda annotate --preprocess)")
    p.add_argument("--preprocess-workers", type=int, default=1, help="the job's CPU preprocessing workers (min)")
    p.add_argument("--max-preprocess-workers", type=int, default=None, help="... autoscaling up to this many")
    p.add_argument("--repeats", type=int, default=2, help="preprocess: pairs of runs (A B, B A, ...)")
    p.add_argument("--min-new-tokens", type=int, default=4, help="batching: shortest answer (per-clip max_new_tokens)")
    p.add_argument("--batches-in-flight", type=int, default=4, help="batching: Ray batches per actor at once")
    return p.parse_args(argv)


def make_corpus(directory: Path, n: int, clip_frames: int, seed: int) -> list[dict[str, Any]]:
    from meda_quality import task

    directory.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        clip = task.make_clip(seed + i, clip_frames, n_questions=1)
        path = directory / f"clip{i:04d}.mp4"
        task.write_mp4(path, clip.raw_frames)
        rows.append({"uri": str(path), "prompt": clip.qas[0].question, "answer": clip.qas[0].answer})
    (directory / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def random_vlm_checkpoint(shape: str, directory: Path, seed: int) -> str:
    """A Qwen2-VL checkpoint with random weights: decoder of `common.MODEL_SHAPES[shape]`, a 2-block vision
    tower, the word tokenizer and 112x112-per-frame preprocessing."""
    import torch
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    tok = common.word_tokenizer()
    text = {k: v for k, v in common.MODEL_SHAPES[shape].items() if k not in ("rope_theta", "tie_word_embeddings")}
    head_dim = text["hidden_size"] // text["num_attention_heads"]
    section = [head_dim // 8, 3 * head_dim // 16, 3 * head_dim // 16]
    text.update(eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": section})
    cfg = Qwen2VLConfig(
        text_config=text, tie_word_embeddings=True,
        vision_config=dict(depth=2, embed_dim=128, hidden_size=text["hidden_size"], num_heads=4, mlp_ratio=2,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2),
        image_token_id=tok.convert_tokens_to_ids("<|image_pad|>"), video_token_id=tok.convert_tokens_to_ids("<|video_pad|>"),
        vision_start_token_id=tok.convert_tokens_to_ids("<|vision_start|>"),
        vision_end_token_id=tok.convert_tokens_to_ids("<|vision_end|>"))
    torch.manual_seed(seed)
    Qwen2VLForConditionalGeneration._from_config(cfg).save_pretrained(directory)
    tok.save_pretrained(directory)
    (directory / "preprocessor_config.json").write_text(json.dumps(
        {"patch_size": 14, "merge_size": 2, "temporal_patch_size": 2, "min_pixels": 3136, "max_pixels": 12544,
         "video_min_pixels": 3136, "video_max_pixels": 12544}))
    return str(directory)


def engine_alone(checkpoint: str, rows, args) -> dict[str, Any]:
    from meda_engine import CompressionConfig, Engine, GenerationConfig, Request, Video, media

    engine = Engine.from_pretrained(checkpoint, device="cpu", dtype="float32")
    t0 = time.perf_counter()
    videos = [media.decode_video(r["uri"], n_frames=args.frames) for r in rows]
    decode_s = time.perf_counter() - t0
    comp = CompressionConfig(method=args.method, budget=args.budget)
    reqs = [Request(prompt=r["prompt"], video=Video(v.frames, v.fps_sampled),
                    generation=GenerationConfig(max_new_tokens=args.max_new_tokens)) for r, v in zip(rows, videos)]
    engine.generate(reqs[: args.batch_size], compression=comp)  # warm-up, as the actor's first batch is
    t0 = time.perf_counter()
    for start in range(0, len(reqs), args.batch_size):
        engine.generate(reqs[start : start + args.batch_size], compression=comp)
    infer_s = time.perf_counter() - t0
    return {"decode_s": decode_s, "infer_s": infer_s, "clips_per_s": len(reqs) / infer_s,
            "clips_per_s_with_decode": len(reqs) / (infer_s + decode_s)}


def pipeline_run(checkpoint: str, manifest: Path, out: Path, args, *, batching: str = "continuous",
                 preprocess: str | None = None) -> dict[str, Any]:
    import ray

    from pipeline.annotate import AnnotateConfig, read_rows, run

    preprocess = preprocess or getattr(args, "preprocess", "cpu-stage")
    cfg = AnnotateConfig(input=str(manifest), output=str(out), model=checkpoint, method=args.method,
                         budget=args.budget, baseline="none", frames=args.frames, batch_size=args.batch_size,
                         max_new_tokens=args.max_new_tokens, device="cpu", dtype="float32", progress=False,
                         cpus_per_actor=args.threads, batching=batching, max_num_seqs=args.batch_size,
                         batches_in_flight=getattr(args, "batches_in_flight", 4), preprocess=preprocess,
                         preprocess_workers=getattr(args, "preprocess_workers", 1),
                         max_preprocess_workers=getattr(args, "max_preprocess_workers", None))
    if not ray.is_initialized():
        ray.init(num_cpus=args.ray_cpus, include_dashboard=False, log_to_driver=False)
    t0 = time.perf_counter()
    summary = run(cfg)
    wall = time.perf_counter() - t0
    df = read_rows(str(out))
    ok = df[df.status == "ok"]
    # Busy time: the union of the actor's engine-call intervals (calls overlap under continuous batching).
    calls = df.drop_duplicates("batch_id")
    starts = [t.timestamp() for t in calls.created_at]  # a row's created_at is taken when its call starts
    busy = _union_length([(a, a + d) for a, d in zip(starts, calls.batch_infer_s)])
    # Steady state: rows finished after the first engine call, over the time since it finished (excludes
    # Ray Data start-up and the actor's model load, which a long job pays once).
    # A row's finish: its call's start (created_at) + the call's duration (calls overlap under continuous
    # batching, so the call starts alone would bunch at the beginning and inflate the rate).
    finish = df.created_at.map(lambda t: t.timestamp()) + df.batch_infer_s.astype(float)
    first_call = finish[df.batch_id == df.loc[finish.idxmin(), "batch_id"]].max()
    later = finish[finish > first_call]
    span = float(later.max() - first_call) if len(later) else 0.0
    steady = len(later) / span if span > 0 else None
    engine_busy, prepare_in_actor = _engine_busy(ok) if batching == "continuous" else (None, None)
    return {"wall_s": wall, "rows": int(len(df)), "ok": int(len(ok)), "clips_per_s": len(df) / wall,
            "generated_tokens": int(ok.n_generated_tokens.sum()), "preprocess": preprocess,
            "engine": summary.get("engine"),
            "clips_per_s_steady": steady,
            "media_decode_s": float(df.decode_media_s.sum()), "inference_s": busy,
            "actor_busy_fraction": busy / wall, "summary_wall_s": summary["wall_s"],
            "engine_busy_s": engine_busy, "engine_busy_fraction": None if engine_busy is None else engine_busy / wall,
            "prepare_in_actor_s": prepare_in_actor,
            "texts": dict(zip(ok.clip_id, ok.text))}


def _engine_busy(ok) -> tuple[float, float]:
    """(seconds some row was in the engine, seconds the actor's calls spent before submitting their rows).

    Continuous batching: a call's rows are submitted together once it has prepared them all, and the
    call ends as its last row finishes; so submission = call end - its longest row's ``e2e_s``, and row
    i was in the engine from submission + ``queue_wait_s`` (admitted) to submission + ``e2e_s``
    (finished). Engine busy is the union of those spans; the preparation in the actor is the sum of
    (submission - call start) over calls."""
    spans, prepare = [], 0.0
    for _, call in ok.groupby("batch_id"):
        start = call.created_at.min().timestamp()  # taken as the call starts (ms)
        submit = start + float(call.batch_infer_s.iloc[0]) - float(call.e2e_s.max())
        prepare += max(0.0, submit - start)
        spans += [(submit + float(q), submit + float(e)) for q, e in zip(call.queue_wait_s, call.e2e_s)]
    return _union_length(spans), prepare


def batching_runs(checkpoint: str, rows, corpus_dir: Path, tmp: Path, args) -> dict[str, Any]:
    """The same corpus (answers of varied length) through the job twice: static, then continuous."""
    import random

    rng = random.Random(args.seed)
    for r in rows:
        r["max_new_tokens"] = rng.randint(args.min_new_tokens, args.max_new_tokens)
    manifest = corpus_dir / "manifest-varied.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = {}
    for mode in ("static", "continuous"):
        out[mode] = pipeline_run(checkpoint, manifest, tmp / f"run-{mode}", args, batching=mode)
        out[mode].pop("texts")
        common.log(f"[pipeline] {mode}: {out[mode]['clips_per_s']:.3f} clips/s "
                   f"({out[mode]['generated_tokens']} tokens)")
    return out


def model_and_corpus(tmp: Path, args) -> tuple[str, list[dict[str, Any]]]:
    """The checkpoint (``random:SHAPE`` is built under ``tmp``) and the generated corpus."""
    checkpoint = args.checkpoint
    if checkpoint.startswith("random:"):
        checkpoint = random_vlm_checkpoint(checkpoint.split(":", 1)[1], tmp / "model", args.seed)
    return checkpoint, make_corpus(tmp / "corpus", args.clips, args.clip_frames, args.seed)


def _union_length(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b > end:
            total += b - max(a, end)
            end = b
    return total


KEY_FIELDS = ("experiment", "checkpoint", "clips", "frames", "batch_size", "method", "budget")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    common.set_threads(args.threads)
    t_start = time.time()
    run = {"command": common.command_line("pipeline", argv),
           "machine": common.machine_info(args.threads, bandwidth=False)}
    with tempfile.TemporaryDirectory(prefix="meda-bench-pipeline") as tmp:
        checkpoint, rows = model_and_corpus(Path(tmp), args)
        measure = {"batching": batching_record, "preprocess": preprocess_record}.get(args.experiment, alone_record)
        record = measure(checkpoint, rows, Path(tmp), args)
    run["wall_s"] = time.time() - t_start
    run["load_average_at_end"] = common.load_average()
    common.write_results("pipeline", args.out_dir, run, [record], KEY_FIELDS, to_markdown, fresh=args.fresh)
    return 0


def alone_record(checkpoint: str, rows, tmp: Path, args) -> dict[str, Any]:
    """The pipeline vs the engine alone on the same clips."""
    alone = engine_alone(checkpoint, rows, args)
    common.log(f"[pipeline] engine alone: {alone['clips_per_s']:.2f} clips/s")
    piped = pipeline_run(checkpoint, tmp / "corpus" / "manifest.jsonl", tmp / "run", args)
    piped.pop("texts")
    common.log(f"[pipeline] pipeline: {piped['clips_per_s']:.2f} clips/s")
    return {"checkpoint": args.checkpoint, "clips": args.clips, "frames": args.frames, "batch_size": args.batch_size,
            "method": args.method, "budget": args.budget, "engine_alone": alone, "pipeline": piped,
            "pipeline_vs_engine": piped["clips_per_s"] / alone["clips_per_s"],
            "pipeline_steady_vs_engine": (piped["clips_per_s_steady"] or 0.0) / alone["clips_per_s"]}


def batching_record(checkpoint: str, rows, tmp: Path, args) -> dict[str, Any]:
    """The job's static vs continuous batching on answers of varied length."""
    runs = batching_runs(checkpoint, rows, tmp / "corpus", tmp, args)
    s, c = runs["static"], runs["continuous"]
    return {"experiment": "batching", "checkpoint": args.checkpoint, "clips": args.clips, "frames": args.frames,
            "batch_size": args.batch_size, "method": args.method, "budget": args.budget,
            "new_tokens": [args.min_new_tokens, args.max_new_tokens], "batches_in_flight": args.batches_in_flight,
            "static": s, "continuous": c,
            "continuous_vs_static": c["clips_per_s"] / s["clips_per_s"],
            "continuous_vs_static_steady": ((c["clips_per_s_steady"] or 0.0) / s["clips_per_s_steady"]
                                            if s["clips_per_s_steady"] else None),
            "same_tokens": s["generated_tokens"] == c["generated_tokens"]}


def preprocess_record(checkpoint: str, rows, tmp: Path, args) -> dict[str, Any]:
    """The job with preparation in the model actor (the old path) vs in the CPU stage, alternating."""
    order: list[str] = []
    for k in range(max(1, args.repeats)):
        order += ["in-actor", "cpu-stage"] if k % 2 == 0 else ["cpu-stage", "in-actor"]
    runs: list[dict[str, Any]] = []
    for k, mode in enumerate(order):
        r = pipeline_run(checkpoint, tmp / "corpus" / "manifest.jsonl", tmp / f"run-{k}-{mode}", args, preprocess=mode)
        runs.append(r)
        common.log(f"[pipeline] preprocess {mode}: {r['clips_per_s']:.3f} clips/s, actor busy "
                   f"{r['actor_busy_fraction']:.0%}, engine busy {r['engine_busy_fraction']:.0%}, prepare in actor "
                   f"{r['prepare_in_actor_s']:.2f} s")
    texts = {m: [r.pop("texts") for r in runs if r["preprocess"] == m] for m in ("in-actor", "cpu-stage")}
    by_mode = {m: [r for r in runs if r["preprocess"] == m] for m in ("in-actor", "cpu-stage")}

    def mean(mode, key):
        vals = [r[key] for r in by_mode[mode] if r[key] is not None]
        return sum(vals) / len(vals) if vals else None

    summary = {m: {k: mean(m, k) for k in ("clips_per_s", "clips_per_s_steady", "actor_busy_fraction",
                                           "engine_busy_fraction", "prepare_in_actor_s", "wall_s")}
               for m in by_mode}
    return {"experiment": "preprocess", "checkpoint": args.checkpoint, "clips": args.clips, "frames": args.frames,
            "batch_size": args.batch_size, "method": args.method, "budget": args.budget,
            "preprocess_workers": [args.preprocess_workers, args.max_preprocess_workers or args.preprocess_workers],
            "order": order, "runs": runs, "mean": summary,
            "cpu_stage_vs_in_actor": summary["cpu-stage"]["clips_per_s"] / summary["in-actor"]["clips_per_s"],
            "same_answers": all(t == texts["in-actor"][0] for ts in texts.values() for t in ts)}


def to_markdown(data: dict[str, Any]) -> str:
    batching = [r for r in data["records"] if r.get("experiment") == "batching"]
    prep = [r for r in data["records"] if r.get("experiment") == "preprocess"]
    data = {**data, "records": [r for r in data["records"] if r.get("experiment") not in ("batching", "preprocess")]}
    rows = []
    for r in data["records"]:
        a, p = r["engine_alone"], r["pipeline"]
        rows.append([r["clips"], r["frames"], r["batch_size"], f"{r['method']}@{r['budget']}",
                     round(a["clips_per_s"], 3), round(p["clips_per_s"], 3), round(r["pipeline_vs_engine"], 3),
                     round(p["clips_per_s_steady"] or 0, 3), round(r["pipeline_steady_vs_engine"], 3),
                     round(a["decode_s"], 2), round(p["media_decode_s"], 2), round(p["inference_s"], 2),
                     round(p["actor_busy_fraction"], 3)])
    headers = ["clips", "frames", "batch", "method", "engine alone clips/s", "pipeline clips/s (whole job)",
               "whole job / engine", "pipeline clips/s (steady)", "steady / engine", "decode s (alone)", "media decode s (pipeline, summed)",
               "inference s (pipeline)", "actor busy fraction"]
    parts = ["# pipeline", "", common.runs_markdown(data), ""]
    if rows:
        parts += [common.md_table(headers, rows), ""]
    if batching:
        brows = []
        for r in batching:
            for mode in ("static", "continuous"):
                p = r[mode]
                brows.append([r["clips"], f"{r['new_tokens'][0]}-{r['new_tokens'][1]}", r["batch_size"],
                              f"{r['method']}@{r['budget']}", mode, p["generated_tokens"], round(p["wall_s"], 1),
                              round(p["clips_per_s"], 3), round(p["actor_busy_fraction"], 3),
                              (p.get("engine") or {}).get("peak_running", "-"),
                              round(r["continuous_vs_static"], 3) if mode == "continuous" else "-"])
        parts += ["## batching: continuous vs static (answers of varied length)", "",
                  common.md_table(["clips", "new tokens", "batch = row cap", "method", "batching", "tokens",
                                   "wall s", "clips/s (whole job)", "actor busy",
                                   "peak rows", "continuous / static"], brows), ""]
    if prep:
        prows = []
        for r in prep:
            for k, p in enumerate(r["runs"]):
                prows.append([r["clips"], r["frames"], r["batch_size"], r["checkpoint"], k + 1, p["preprocess"],
                              round(p["wall_s"], 1), round(p["clips_per_s"], 3), round(p["clips_per_s_steady"] or 0, 3),
                              round(p["actor_busy_fraction"], 3), round(p["engine_busy_fraction"], 3),
                              round(p["prepare_in_actor_s"], 2), round(p["media_decode_s"], 2)])
            for mode in ("in-actor", "cpu-stage"):
                m = r["mean"][mode]
                prows.append([r["clips"], r["frames"], r["batch_size"], r["checkpoint"], "mean", f"**{mode}**",
                              round(m["wall_s"], 1), round(m["clips_per_s"], 3), round(m["clips_per_s_steady"] or 0, 3),
                              round(m["actor_busy_fraction"], 3), round(m["engine_busy_fraction"], 3),
                              round(m["prepare_in_actor_s"], 2), "-"])
        parts += ["## preprocessing: in the model actor vs in the CPU stage", "",
                  "Runs alternate (A B, B A) on one local Ray (4 advertised CPUs). *actor busy*: the model actor's calls "
                  "(union) / wall; *engine busy*: some row admitted and not yet finished (from each row's "
                  "queue_wait_s and e2e_s) / wall; *prepare in actor*: summed seconds between a call's start and "
                  "its rows' submission (chat template, tokenisation, resize + patchify when prepared in the "
                  "actor; only the arrays' conversion after the CPU stage).", "",
                  common.md_table(["clips", "frames", "batch", "checkpoint", "run", "preprocess", "wall s",
                                   "clips/s (whole job)", "clips/s (steady)", "actor busy", "engine busy",
                                   "prepare in actor s", "media decode s (summed)"], prows), "",
                  "; ".join(f"{r['checkpoint']}: cpu-stage / in-actor clips/s {r['cpu_stage_vs_in_actor']:.3f}x, "
                            f"same answers: {r['same_answers']}" for r in prep), ""]
    return "\n".join(parts)


if __name__ == "__main__":
    raise SystemExit(main())
