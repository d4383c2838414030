"""Where one decode step's time goes: torch.profiler over a few `Engine.decode_step` calls on a synthetic
cache (same model and cache construction as the decode suite). Not a suite: a diagnostic for the
engine owner, printing the top operators by self CPU time and writing them to
``benchmarks/results/profile_decode_<dtype>_<L>_b<B>_<method>.txt``.

    python -m benchmarks.profile_decode --dtype bf16 --context 8k --batch 1 --method full --steps 3
"""

from __future__ import annotations

import argparse
import sys
import time

from . import common


def attention_micro(contexts, batches, reps: int = 5) -> str:
    """`meda_engine.attention.decode_attention` alone, one layer of the Qwen2-0.5B shape (14 query heads,
    2 KV heads, head_dim 64), fp32 vs bf16, and its two matmuls in the native dtype vs upcast to fp32
    (the upcast timing includes converting K or V). Median process CPU time per call."""
    import time

    import torch

    from meda_engine.attention import decode_attention

    def med(fn):
        fn()
        ts = []
        for _ in range(reps):
            c = time.process_time()
            fn()
            ts.append(time.process_time() - c)
        return 1e3 * sorted(ts)[len(ts) // 2]

    lines = ["| batch | L | dtype | decode_attention ms/layer | Q·Kᵀ native | Q·Kᵀ upcast | P·V native | P·V upcast |",
             "|---|---|---|---|---|---|---|---|"]
    for b in batches:
        for n in contexts:
            for dt in (torch.float32, torch.bfloat16):
                q = torch.randn(b, 14, 1, 64).to(dt)
                k = torch.randn(b, 2, n + 16, 64).to(dt)[:, :, :n]
                v = torch.randn(b, 2, n + 16, 64).to(dt)[:, :, :n]
                off = torch.full((b,), n - 1)
                qg = q.view(b, 2, 7, 64)
                pr = torch.softmax(torch.randn(b, 2, 7, n), -1)
                row = [med(lambda: decode_attention(q, k, v, off, 0.125)),
                       med(lambda: torch.matmul(qg, k.transpose(-1, -2))),
                       med(lambda: torch.matmul(qg.float(), k.float().transpose(-1, -2))),
                       med(lambda: torch.matmul(pr.to(dt), v)),
                       med(lambda: torch.matmul(pr, v.float()))]
                lines.append(f"| {b} | {n} | {str(dt)[6:]} | " + " | ".join(f"{x:.2f}" for x in row) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.profile_decode", description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--model", default="qwen2-0.5b", choices=sorted(common.MODEL_SHAPES))
    p.add_argument("--dtype", default="fp32")
    p.add_argument("--context", type=lambda s: common.int_list(s)[0], default=8192)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--method", default="full", choices=["full", "snapkv", "meda_fixed"])
    p.add_argument("--budget", type=float, default=0.2)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--rows", type=int, default=18)
    p.add_argument("--out-dir", default=str(common.RESULTS_DIR))
    p.add_argument("--attention", action="store_true",
                   help="instead: time decode_attention alone, fp32 vs bf16 (contexts 2k,8k,32k; batch 1 and 8)")
    args = p.parse_args(argv)
    common.set_threads(args.threads)
    if args.attention:
        text = (f"decode_attention micro-benchmark, threads {args.threads}, load average {common.load_average()}, "
                f"CPU ms per call (median of 5)\n\n" + attention_micro([2048, 8192, 32768], [1, 8]))
        print(text)
        out = common.Path(args.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "profile_attention.md").write_text(text + "\n")
        return 0
    import torch
    from torch.profiler import ProfilerActivity, profile

    from meda_engine import Engine

    from .decode import KVPool, decoder, layer_lengths

    dtype = common.parse_dtype(args.dtype)
    model, tok = common.build_model(args.model, dtype)
    engine = Engine.from_model(model, tok)
    lengths = layer_lengths(args.method, args.context, args.budget, engine.dims.n_layers, None)
    pool = KVPool(engine.dims, args.batch, max(lengths), dtype, 0)
    cache = pool.cache(lengths, args.batch, reserve=args.steps + 4)
    step = decoder(engine, cache, args.context, args.batch)
    step()
    times = []
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for _ in range(args.steps):
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows)
    head = (f"profile: {args.model} {args.dtype} L={args.context} B={args.batch} {args.method}"
            f"{'' if args.method == 'full' else f' r={args.budget}'}, {args.steps} steps, "
            f"step times (profiled) {[round(1e3 * t) for t in times]} ms, threads {args.threads}, "
            f"load average {common.load_average()}\n")
    text = head + table
    print(text)
    name = f"profile_decode_{args.dtype}_{args.context}_b{args.batch}_{args.method}.txt"
    out = common.Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / name).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
