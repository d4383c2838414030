"""fixed_memory: under a KV memory cap, the largest batch that fits and its tokens/s, full vs meda.

For each method, batch-1 and batch-2 caches of a context of L tokens are built (full: L tokens per
layer; meda at r: the per-layer lengths `EntropyAllocator` gives from the entropies of a real short
prefill, as in the decode suite) and their allocated bytes measured (`RaggedKVCache.allocated_bytes`,
which includes the room reserved for the tokens still to be generated). The largest batch B with
measured bytes <= cap is found from the measured per-row increment, the cache for B is built and its
bytes measured again (must be <= cap; B+1 rows must not fit), and decoding is timed on it, the
methods interleaved step by step. What compression buys a batch job: batch and tokens/s ratios.

    python -m benchmarks.fixed_memory --cap-gib 2 --context 8k --budget 0.2
"""

from __future__ import annotations

import statistics
import sys
import time
from typing import Any

from . import common
from .common import GiB, MiB, log

SUITE = "fixed_memory"
KEY = ("model", "dtype", "context", "cap_bytes", "method", "budget")


def parse_args(argv):
    p = common.base_parser(SUITE, __doc__.split("\n")[0])
    p.add_argument("--cap-gib", type=float, default=2.0, help="KV memory cap in GiB (default 2)")
    p.add_argument("--context", type=lambda s: common.int_list(s)[0], default=8192)
    p.add_argument("--budget", type=float, default=0.2)
    p.add_argument("--methods", type=common.str_list, default=["full", "meda"])
    p.add_argument("--dtypes", type=common.str_list, default=["fp32"])
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--profile-tokens", type=int, default=1024)
    p.add_argument("--max-batch", type=int, default=256)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    common.set_threads(args.threads)
    import torch

    from meda_engine import Engine

    from .decode import KVPool, decoder, entropy_profile, held_bytes, layer_lengths

    command = common.command_line(SUITE, argv)
    t_start = time.perf_counter()
    machine = common.machine_info(args.threads, bandwidth_mib=args.bandwidth_mib)
    cap = int(args.cap_gib * GiB)
    model, tok = common.build_model(args.model, torch.float32, seed=args.seed)
    engine = Engine.from_model(model, tok)
    n_layers = engine.dims.n_layers
    profile = entropy_profile(engine, min(args.profile_tokens, args.context)) if "meda" in args.methods else None
    reserve = args.warmup + args.steps + 2
    records: list[dict[str, Any]] = []
    for dname in args.dtypes:
        dtype = common.parse_dtype(dname)
        model.to(dtype)
        engine = Engine.from_model(model, tok)
        plans = {}
        for method in args.methods:
            budget = 1.0 if method == "full" else args.budget
            lengths = layer_lengths(method, args.context, budget, n_layers,
                                    profile["layer_entropies"] if profile else None)
            pool = KVPool(engine.dims, 2, max(lengths), dtype, args.seed)
            one = pool.cache(lengths, 1, reserve).allocated_bytes()
            two = pool.cache(lengths, 2, reserve).allocated_bytes()
            per_row = two - one
            batch = max(0, min(args.max_batch, (cap - (one - per_row)) // per_row))
            plans[method] = dict(budget=budget, lengths=lengths, bytes_b1=one, bytes_per_row=per_row, batch=batch)
            log(f"[fixed_memory] {dname} {method}: {per_row / MiB:.1f} MiB per row -> batch {batch} under "
                f"{cap / GiB:.2f} GiB")
        caches, fns = {}, {}
        for method, pl in plans.items():
            if pl["batch"] == 0:
                continue
            pool = KVPool(engine.dims, pl["batch"], max(pl["lengths"]), dtype, args.seed)
            caches[method] = pool.cache(pl["lengths"], pl["batch"], reserve)
            del pool
            pl["allocated_bytes"] = caches[method].allocated_bytes()
            pl["held_bytes"] = held_bytes(caches[method])
            # B+1 rows: the measured bytes of B rows plus the measured per-row increment must exceed the cap
            pl["allocated_bytes_batch_plus_1"] = pl["allocated_bytes"] + pl["bytes_per_row"]
            pl["fits"] = pl["allocated_bytes"] <= cap
            pl["next_exceeds"] = pl["allocated_bytes_batch_plus_1"] > cap or pl["batch"] == args.max_batch
            fns[method] = decoder(engine, caches[method], args.context, pl["batch"])
        log(f"[fixed_memory] timing {list(fns)}")
        cpu: dict[str, list[float]] = {}
        times = common.round_robin(fns, warmup=args.warmup, steps=args.steps, log=log, cpu_times=cpu)
        del caches, fns
        for method, pl in plans.items():
            ts = times.get(method, [])
            s = common.summarize(ts) if ts else {}
            rec = {"model": args.model, "dtype": dname, "context": args.context, "cap_bytes": cap, "method": method,
                   "budget": pl["budget"], "batch": pl["batch"], "bytes_per_row": pl["bytes_per_row"],
                   "allocated_bytes": pl.get("allocated_bytes"), "held_bytes": pl.get("held_bytes"),
                   "allocated_bytes_batch_plus_1": pl.get("allocated_bytes_batch_plus_1"),
                   "fits": pl.get("fits"), "next_exceeds": pl.get("next_exceeds"),
                   "layer_lengths": pl["lengths"], "step_times_s": ts, **s,
                   "ms_per_step": 1e3 * s["median_s"] if s else None,
                   "tokens_per_s": pl["batch"] / s["median_s"] if s else 0.0,
                   "step_cpu_s": cpu.get(method, []),
                   "tokens_per_cpu_s": pl["batch"] / common.statistics.median(cpu[method]) if cpu.get(method) else 0.0}
            records.append(rec)
        full = next((r for r in records if r["method"] == "full" and r["dtype"] == dname), None)
        for r in records:
            if full and r["dtype"] == dname and full["batch"]:
                r["batch_vs_full"] = r["batch"] / full["batch"]
                r["tokens_per_s_vs_full"] = r["tokens_per_s"] / full["tokens_per_s"]
                r["tokens_per_cpu_s_vs_full"] = r["tokens_per_cpu_s"] / full["tokens_per_cpu_s"]
            log(f"    {r['dtype']} {r['method']:5s} batch {r['batch']:3d}  {r['allocated_bytes'] / MiB:.0f} MiB  "
                f"{r['ms_per_step']:.0f} ms/step  {r['tokens_per_s']:.1f} tok/s")
    run = {"command": command, "machine": machine, "args": {k: str(v) for k, v in vars(args).items()},
           "meda_profile": profile, "wall_s": time.perf_counter() - t_start, "load_average_at_end": common.load_average()}
    common.write_results(SUITE, args.out_dir, run, records, KEY, to_markdown, fresh=args.fresh)
    log(f"[fixed_memory] wrote {args.out_dir / (SUITE + '.json')}")
    return 0


def to_markdown(data: dict[str, Any]) -> str:
    rows = [[r["dtype"], r["context"], r["cap_bytes"] / GiB, r["method"], None if r["method"] == "full" else r["budget"],
             r["bytes_per_row"] / MiB, r["batch"], r["allocated_bytes"] / MiB, r["ms_per_step"], r["tokens_per_s"],
             r.get("batch_vs_full"), r.get("tokens_per_s_vs_full"),
             1e3 * statistics.median(r["step_cpu_s"]) if r.get("step_cpu_s") else None, r.get("tokens_per_cpu_s"),
             r.get("tokens_per_cpu_s_vs_full")] for r in data["records"]]
    table = common.md_table(["dtype", "context", "cap GiB", "method", "r", "MiB per row", "largest batch",
                             "KV allocated MiB", "ms/step", "tok/s", "batch vs full", "tok/s vs full", "CPU ms/step",
                             "tok per CPU s", "tok per CPU s vs full"], rows)
    return f"# fixed_memory\n\n{table}\n\nRuns:\n{common.runs_markdown(data)}\n"


if __name__ == "__main__":
    sys.exit(main())
