"""`meda generate`: answer one prompt about a video and/or images, print the answer and telemetry.

    meda generate --model DIR_OR_ID --video clip.mp4 --prompt "..." --method meda --budget 0.2 [--json]

Also runnable as ``python -m meda_engine generate ...``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .cli_args import add_compression_args, compression_from_args
from .config import ConfigError, GenerationConfig


def add_model_args(p: argparse.ArgumentParser, *, default_model: str | None) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", default=default_model, required=default_model is None,
                   help="hub id, local checkpoint directory, s3:// prefix, or a GGUF checkpoint: a .gguf file, "
                        "a directory holding one, or owner/repo/name.gguf on the hub")
    g.add_argument("--gguf-file", default=None, help="the .gguf file to load inside --model (a directory or hub id)")
    g.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    g.add_argument("--dtype", default="auto", help="float32, bfloat16, float16 or auto (bf16 on GPU, fp32 on CPU)")
    g.add_argument("--max-pixels-per-frame", type=int, default=None, help="cap on pixels per video frame")


def add_generate_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("generate", help="answer one prompt about a video and/or images",
                       description="Answer one prompt with the engine and print the answer and its telemetry.")
    add_model_args(p, default_model=None)
    p.add_argument("--prompt", required=True, help="the question or instruction")
    p.add_argument("--video", help="video file (mp4, mkv, webm, ...)")
    p.add_argument("--image", action="append", default=[], help="image file (repeatable)")
    p.add_argument("--frames", type=int, default=16, help="frames sampled uniformly from the video (default 16)")
    p.add_argument("--fps", type=float, default=None, help="sample frames at this rate instead of --frames")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--query-after-compression", action="store_true",
                   help="compress the media context first, then feed the question (query-agnostic)")
    p.add_argument("--answer-from-compressed-cache", action="store_true",
                   help="feed the prompt's last token after compression, so every answer token is decoded "
                        "from the compressed cache")
    p.add_argument("--json", action="store_true", help="print one JSON object (answer + telemetry)")
    add_compression_args(p)
    p.set_defaults(func=run_generate)
    return p


def run_generate(args: argparse.Namespace) -> int:
    from . import Engine, Request, Video
    from .media import decode_image, decode_video

    compression = compression_from_args(args)
    generation = GenerationConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                  top_p=args.top_p, seed=args.seed)
    video = None
    if args.video:
        decoded = decode_video(Path(args.video), n_frames=None if args.fps else args.frames, fps=args.fps)
        video = Video(decoded.frames, decoded.fps_sampled)
    images = [decode_image(Path(p)) for p in args.image]
    engine = Engine.from_pretrained(args.model, device=args.device, dtype=args.dtype,
                                    max_pixels_per_frame=args.max_pixels_per_frame, gguf_file=args.gguf_file)
    request = Request(prompt=args.prompt, video=video, images=images, generation=generation,
                      query_after_compression=args.query_after_compression,
                      answer_from_compressed_cache=args.answer_from_compressed_cache)
    result = engine.generate([request], compression=compression)[0]
    if args.json:
        print(json.dumps({"text": result.text, "finish_reason": result.finish_reason,
                          "telemetry": result.telemetry.to_dict(), "model": engine.model_info}))
    else:
        t = result.telemetry
        print(result.text)
        print(
            f"\n[{t.method} budget={t.budget}] prompt {t.n_prompt_tokens} tokens ({t.n_visual_tokens} visual, "
            f"{t.n_frames} frames); KV {t.kv_bytes_kept / 2**20:.2f} / {t.kv_bytes_full / 2**20:.2f} MiB kept "
            f"({t.kv_keep_ratio:.1%}); prefill {t.prefill_s:.2f}s, compress {t.compress_s:.3f}s, "
            f"{decode_text(t)}; "
            f"peak mem {t.peak_mem_bytes / 2**20:.0f} MiB ({t.peak_mem_kind})",
            file=sys.stderr,
        )
    return 0


def decode_text(t) -> str:
    """Decode speed as the pipeline reports it: time per output token over the decode steps the
    request ran (decode tok/s = 1 / TPOT). An answer with no decode step (1 token) shows its TTFT."""
    n = f"{t.n_generated_tokens} token{'s' if t.n_generated_tokens != 1 else ''}"
    if t.time_per_output_token_s > 0:
        return (f"{n}, TTFT {t.time_to_first_token_s:.3f}s, decode {t.time_per_output_token_s * 1e3:.1f} ms/token "
                f"({t.decode_tokens_per_s:.1f} tok/s)")
    return f"{n}, TTFT {t.time_to_first_token_s:.3f}s, decode n/a (no decode step)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m meda_engine")
    sub = parser.add_subparsers(dest="command", required=True)
    add_generate_parser(sub)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
