"""prefill: prefill + compression time and peak memory, meda (default CompressionConfig, budget 0.2)
vs a plain SDPA prefill (method full), through `Engine.generate` with max_new_tokens=1.

Prompts are text of exactly L tokens (word tokenizer, pseudo-random words). The two methods run
interleaved, A B A B ..., so drift in the machine's load hits both alike. Per call: the engine's
telemetry (prefill_s, compress_s, peak_mem_bytes = the process's RSS high-water mark during the call,
kv_keep_ratio measured from the cache bytes), the RSS before the call, and the peak minus the RSS after
the model was loaded (the memory the call itself needed above the weights).

    python -m benchmarks.prefill --contexts 2k,8k --repeats 2
"""

from __future__ import annotations

import gc
import statistics
import sys
import time
from typing import Any

from . import common
from .common import MiB, log

SUITE = "prefill"
KEY = ("model", "dtype", "context", "method", "budget")


def parse_args(argv):
    p = common.base_parser(SUITE, __doc__.split("\n")[0])
    p.add_argument("--contexts", type=common.int_list, default=common.int_list("2k,8k"))
    p.add_argument("--methods", type=common.str_list, default=["meda", "full"],
                   help="first is A, second is B (A B A B ...); others are allowed (e.g. snapkv)")
    p.add_argument("--budget", type=float, default=0.2)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--dtypes", type=common.str_list, default=["fp32"])
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    common.set_threads(args.threads)
    import torch

    from meda_engine import CompressionConfig, Engine

    command = common.command_line(SUITE, argv)
    t_start = time.perf_counter()
    machine = common.machine_info(args.threads, bandwidth_mib=args.bandwidth_mib)
    records: list[dict[str, Any]] = []
    rss_start = common.rss_bytes()
    model, tok = common.build_model(args.model, torch.float32, seed=args.seed)
    for dname in args.dtypes:
        model.to(common.parse_dtype(dname))
        engine = Engine.from_model(model, tok)
        gc.collect()
        rss_model = common.rss_bytes()
        for context in args.contexts:
            prompt = common.make_prompt(engine, context, seed=context)
            calls: dict[str, list[dict[str, Any]]] = {m: [] for m in args.methods}
            for rep in range(args.repeats):
                for method in args.methods:
                    cfg = CompressionConfig(method=method, budget=args.budget)
                    gc.collect()
                    rss_before = common.rss_bytes()
                    c0 = time.process_time()
                    t0 = time.perf_counter()
                    res = engine.generate([prompt], compression=cfg, max_new_tokens=1)[0]
                    wall = time.perf_counter() - t0
                    cpu_s = time.process_time() - c0
                    t = res.telemetry
                    calls[method].append({
                        "prefill_s": t.prefill_s, "compress_s": t.compress_s, "total_s": t.prefill_s + t.compress_s,
                        "wall_s": wall, "cpu_s": cpu_s, "peak_mem_bytes": t.peak_mem_bytes, "peak_mem_kind": t.peak_mem_kind,
                        "rss_before_bytes": rss_before, "peak_above_model_bytes": t.peak_mem_bytes - rss_model,
                        "kv_bytes_full": t.kv_bytes_full, "kv_bytes_kept": t.kv_bytes_kept,
                        "kv_keep_ratio": t.kv_keep_ratio, "layer_budgets": t.layer_budgets,
                        "entropy_variant": t.entropy_variant})
                    log(f"[prefill] {dname} L={context} {method} #{rep + 1}: prefill {t.prefill_s:.1f}s, "
                        f"compress {t.compress_s:.2f}s, peak {t.peak_mem_bytes / MiB:.0f} MiB "
                        f"(+{(t.peak_mem_bytes - rss_model) / MiB:.0f} over model), keep {t.kv_keep_ratio:.4f}")
            ref = calls.get("full")
            for method, cs in calls.items():
                med = {k: statistics.median(c[k] for c in cs) for k in
                       ("prefill_s", "compress_s", "total_s", "cpu_s", "peak_mem_bytes", "peak_above_model_bytes")}
                rec = {"model": args.model, "dtype": dname, "context": context, "method": method,
                       "budget": 1.0 if method == "full" else args.budget, "calls": cs, "rss_model_bytes": rss_model,
                       "rss_process_start_bytes": rss_start, **{f"median_{k}": v for k, v in med.items()},
                       "kv_keep_ratio": cs[-1]["kv_keep_ratio"], "order": args.methods}
                if ref and method != "full":
                    # paired by repeat: A_i / B_i, then the median of the ratios (and the ratio of medians)
                    for k in ("total_s", "cpu_s", "peak_mem_bytes", "peak_above_model_bytes"):
                        pairs = [a[k] / b[k] for a, b in zip(cs, ref) if b[k]]
                        rec[f"{k}_vs_full_paired_median"] = statistics.median(pairs) if pairs else None
                        rec[f"{k}_vs_full"] = med[k] / statistics.median(c[k] for c in ref)
                records.append(rec)
    run = {"command": command, "machine": machine, "args": {k: str(v) for k, v in vars(args).items()},
           "wall_s": time.perf_counter() - t_start, "load_average_at_end": common.load_average()}
    common.write_results(SUITE, args.out_dir, run, records, KEY, to_markdown, fresh=args.fresh)
    log(f"[prefill] wrote {args.out_dir / (SUITE + '.json')}")
    return 0


def to_markdown(data: dict[str, Any]) -> str:
    rows = []
    for r in sorted(data["records"], key=lambda r: (r["dtype"], r["context"], r["method"] != "full", r["method"])):
        rows.append([r["dtype"], r["context"], r["method"], None if r["method"] == "full" else r["budget"],
                     len(r["calls"]), r["median_prefill_s"], r["median_compress_s"], r["median_total_s"],
                     r["median_peak_mem_bytes"] / MiB, r["median_peak_above_model_bytes"] / MiB, r["kv_keep_ratio"],
                     r.get("median_cpu_s"), r.get("total_s_vs_full"), r.get("cpu_s_vs_full"),
                     r.get("peak_mem_bytes_vs_full"), r.get("peak_above_model_bytes_vs_full")])
    table = common.md_table(
        ["dtype", "context", "method", "r", "calls", "prefill s", "compress s", "prefill+compress s", "peak RSS MiB",
         "peak − RSS after load MiB", "KV kept / full (bytes)", "CPU s of the call", "wall time vs full",
         "CPU time vs full", "peak vs full", "peak above model vs full"],
        rows)
    return f"# prefill\n\nMedians over the calls (methods interleaved).\n\n{table}\n\nRuns:\n{common.runs_markdown(data)}\n"


if __name__ == "__main__":
    sys.exit(main())
