"""decode: ms per decode step vs context length, full cache vs compressed caches (snapkv, meda).

A random-initialised model shaped like Qwen2-0.5B decodes one token per row per step on CPU, through
`Engine.decode_step`, on caches built with `RaggedKVCache.from_tensors` (prefilling 32k tokens on this
CPU is infeasible). A cache "compressed from L at r" holds, per layer, the lengths the method's own
allocator gives (the engine's `UniformAllocator` for snapkv; for meda `EntropyAllocator` on per-layer
entropies measured once from a real short prefill of the same model through `Engine.generate`), via
the engine's `ratios_to_tokens`. Within one (dtype, context, batch) group every configuration is timed
interleaved, step by step, so the ratios compare numbers measured side by side:

* speed-up vs our own full-cache decode at L;
* t(compressed from L at r) / t(full cache of round(r*L) tokens): the cost of ragged per-layer caches;
* the bandwidth bound: a step must read the weights and the KV it holds, so it takes at least
  (weight bytes + KV bytes) / measured read bandwidth; the speed-up that bound allows is
  (W + KV_full) / (W + KV_compressed), and we report the measured speed-up as a fraction of it.

    python -m benchmarks.decode --contexts 2k,8k,16k,32k --batches 1,8 --dtypes fp32,bf16 \
        --methods full,snapkv,meda --budgets 0.1,0.2,0.3 --steps 7
"""

from __future__ import annotations

import sys
import time
from typing import Any

from . import common
from .common import MiB, log

SUITE = "decode"
KEY = ("model", "dtype", "batch", "context", "method", "budget", "label")


def parse_args(argv):
    p = common.base_parser(SUITE, __doc__.split("\n")[0])
    p.add_argument("--contexts", type=common.int_list, default=common.int_list("2k,8k,16k,32k"))
    p.add_argument("--batches", type=common.int_list, default=[1, 8])
    p.add_argument("--dtypes", type=common.str_list, default=["fp32", "bf16"])
    p.add_argument("--methods", type=common.str_list, default=["full", "snapkv", "meda"],
                   help="full is the reference; with it, 'full at r*L' is timed too")
    p.add_argument("--budgets", type=common.float_list, default=[0.1, 0.2, 0.3])
    p.add_argument("--steps", type=int, default=7, help="timed steps per configuration (median reported)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--profile-tokens", type=int, default=1024,
                   help="prompt length of the real prefill that measures meda's per-layer entropies")
    p.add_argument("--only", action="append", default=[],
                   help="restrict budgets per context: CTX:B1/B2 (e.g. 2k:0.2); repeatable")
    p.add_argument("--label", default=None,
                   help="tag this run's records (kept apart from other runs' records of the same configuration)")
    p.add_argument("--max-group-bytes", type=float, default=7.0,
                   help="GiB of KV one interleaved group may hold; above it each budget is its own group")
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------------
def entropy_profile(engine, n_tokens: int, budget: float = 0.2) -> dict[str, Any]:
    """Per-layer entropies from one real prefill (meda, default settings), as the engine computes them."""
    from meda_engine import CompressionConfig

    prompt = common.make_prompt(engine, n_tokens, seed=1)
    t0 = time.perf_counter()
    res = engine.generate([prompt], compression=CompressionConfig(method="meda", budget=budget), max_new_tokens=1)[0]
    t = res.telemetry
    return {"prompt_tokens": n_tokens, "budget": budget, "entropy_variant": t.entropy_variant,
            "layer_entropies": t.layer_entropies, "layer_budgets": t.layer_budgets, "wall_s": time.perf_counter() - t0}


def fixed_entropies(n_layers: int) -> list[float]:
    """A documented fixed entropy profile for a strongly ragged meda cache: layer entropies rising
    linearly from 0 to 2 nats, so `EntropyAllocator` (T=1) gives the last layer e^2 = 7.4x the budget of
    the first (at r=0.2 about 0.07 ... 0.52 of L). A random-weight model's measured profile is almost flat
    (its attention is near uniform in every layer), which would leave the ragged case untested."""
    return [2.0 * l / max(1, n_layers - 1) for l in range(n_layers)]


def layer_lengths(method: str, context: int, budget: float, n_layers: int, entropies: list[float] | None) -> list[int]:
    """Per-layer token counts the method's allocator gives for a prompt of ``context`` tokens."""
    from meda_engine.compression import EntropyAllocator, UniformAllocator, ratios_to_tokens
    from meda_engine.config import CompressionConfig

    if method == "full":
        return [context] * n_layers
    cfg = CompressionConfig(method="snapkv", budget=budget)
    if method in ("meda", "meda_fixed"):
        if method == "meda_fixed":
            entropies = fixed_entropies(n_layers)
        cfg = CompressionConfig(method="meda", budget=budget)
        alloc = EntropyAllocator(cfg.temperature, cfg.min_layer_ratio, cfg.max_layer_ratio)
    elif method == "snapkv":
        alloc = UniformAllocator()
    else:
        raise ValueError(f"decode suite: unsupported method {method!r} (full, snapkv, meda, meda_fixed)")
    return ratios_to_tokens(alloc.ratios(budget, n_layers, entropies), context, minimum=1)


class KVPool:
    """Random K/V ``(B, H_kv, n, D)`` shared by every layer's copy (from_tensors copies it)."""

    def __init__(self, dims, batch: int, max_len: int, dtype, seed: int):
        import torch

        g = torch.Generator().manual_seed(seed)
        shape = (batch, dims.n_kv_heads, max_len, dims.head_dim)
        self.k = torch.randn(shape, generator=g).to(dtype)
        self.v = torch.randn(shape, generator=g).to(dtype)

    def cache(self, lengths: list[int], batch: int, reserve: int):
        from meda_engine.cache import RaggedKVCache

        return RaggedKVCache.from_tensors(
            [(self.k[:batch, :, :n], self.v[:batch, :, :n], [n] * batch) for n in lengths], reserve=reserve)


def held_bytes(cache) -> int:
    return sum(cache.row_bytes(b) for b in range(cache.n_rows))


def decoder(engine, cache, context: int, batch: int):
    """A closure running one decode step (greedy token fed back, positions continuing from ``context``)."""
    import torch

    state = {"tokens": torch.randint(10, 100, (batch,)), "pos": torch.full((batch,), context, dtype=torch.long)}

    def step():
        with torch.inference_mode():
            logits = engine.decode_step(cache, state["tokens"], state["pos"])
            state["tokens"] = logits.argmax(-1)
            state["pos"] += 1

    return step


def run_group(engine, pool, *, dtype_name, model_name, context, batch, budgets, methods, entropies, n_layers,
              steps, warmup, weights_b, bw_read) -> list[dict[str, Any]]:
    reserve = warmup + steps + 2
    configs: dict[str, dict[str, Any]] = {}
    if "full" in methods:
        configs["full"] = {"method": "full", "budget": 1.0, "lengths": [context] * n_layers}
    for r in budgets:
        if "full" in methods:
            n = round(r * context)
            configs[f"full@{r}"] = {"method": "full@rL", "budget": r, "lengths": [n] * n_layers}
        for m in methods:
            if m != "full":
                configs[f"{m}@{r}"] = {"method": m, "budget": r,
                                       "lengths": layer_lengths(m, context, r, n_layers, entropies)}
    caches = {}
    for name, c in configs.items():
        caches[name] = pool.cache(c["lengths"], batch, reserve)
        c["kv_bytes_held"] = held_bytes(caches[name])
        c["kv_bytes_allocated"] = caches[name].allocated_bytes()
    fns = {name: decoder(engine, caches[name], context, batch) for name in configs}
    log(f"[decode] {dtype_name} L={context} B={batch}: {len(fns)} configs, KV "
        f"{sum(c['kv_bytes_held'] for c in configs.values()) / MiB:.0f} MiB")
    cpu: dict[str, list[float]] = {}
    times = common.round_robin(fns, warmup=warmup, steps=steps, log=log, cpu_times=cpu)
    del caches, fns
    med_cpu = {k: common.statistics.median(v) for k, v in cpu.items()}

    full = configs.get("full")
    t_full = common.statistics.median(times["full"]) if full else None
    records = []
    for name, c in configs.items():
        t = common.summarize(times[name])
        kv = c["kv_bytes_held"]
        rec: dict[str, Any] = {
            "model": model_name, "dtype": dtype_name, "batch": batch, "context": context,
            "method": c["method"], "budget": c["budget"],
            "cache_tokens_per_layer": c["lengths"] if c["method"].startswith("meda") else c["lengths"][0],
            "kv_bytes_held": kv, "kv_bytes_allocated": c["kv_bytes_allocated"],
            "step_times_s": times[name], **t,
            "step_cpu_s": cpu[name], "cpu_median_s": med_cpu[name],
            "ms_per_step": 1e3 * t["median_s"], "tokens_per_s": batch / t["median_s"],
            "weight_bytes": weights_b,
            "bytes_read_per_step": weights_b + kv,
            "bound_s": (weights_b + kv) / bw_read,
            "achieved_bytes_per_s": (weights_b + kv) / t["median_s"],
        }
        if full:
            rec["kv_keep_ratio_bytes"] = kv / full["kv_bytes_held"]
            rec["speedup_vs_full"] = t_full / t["median_s"]
            rec["bound_speedup"] = (weights_b + full["kv_bytes_held"]) / (weights_b + kv)
            rec["fraction_of_bound_speedup"] = (rec["speedup_vs_full"] - 1) / (rec["bound_speedup"] - 1) \
                if rec["bound_speedup"] > 1 + 1e-9 else None
            rec["speedup_over_bound"] = rec["speedup_vs_full"] / rec["bound_speedup"]
            rec["speedup_vs_full_cpu"] = med_cpu["full"] / med_cpu[name]
            rec["speedup_over_bound_cpu"] = rec["speedup_vs_full_cpu"] / rec["bound_speedup"]
            if c["method"] in ("snapkv", "meda", "meda_fixed"):
                ref = f"full@{c['budget']}"
                rec["t_over_full_rL"] = t["median_s"] / common.statistics.median(times[ref])
                rec["t_over_full_rL_cpu"] = med_cpu[name] / med_cpu[ref]
        records.append(rec)
    return records


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    common.set_threads(args.threads)
    import torch

    from meda_engine import Engine

    only: dict[int, list[float]] = {}
    for spec in args.only:
        ctx, _, bs = spec.partition(":")
        only[common.int_list(ctx)[0]] = [float(b) for b in bs.split("/")]
    command = common.command_line(SUITE, argv)
    t_start = time.perf_counter()
    machine = common.machine_info(args.threads, bandwidth_mib=args.bandwidth_mib)
    bw = machine["bandwidth_bytes_per_s"]["read"]
    log(f"[decode] {machine['cpu_model']}, threads {args.threads}, read bandwidth {bw / 1e9:.1f} GB/s")

    model, tok = common.build_model(args.model, torch.float32, seed=args.seed)
    engine = Engine.from_model(model, tok)
    n_layers = engine.dims.n_layers
    profile = None
    if "meda" in args.methods or "meda_fixed" in args.methods:
        profile = entropy_profile(engine, min(args.profile_tokens, max(args.contexts)))
        log(f"[decode] meda entropy profile ({profile['entropy_variant']}): "
            f"{[round(e, 4) for e in profile['layer_entropies']]}")
    records: list[dict[str, Any]] = []
    for dname in args.dtypes:
        dtype = common.parse_dtype(dname)
        model.to(dtype)
        engine = Engine.from_model(model, tok)
        weights_b = common.weight_bytes(model)
        for context in args.contexts:
            budgets = only.get(context, args.budgets)
            for batch in args.batches:
                pool = KVPool(engine.dims, batch, context, dtype, args.seed)
                kv_full = batch * n_layers * 2 * engine.dims.n_kv_heads * engine.dims.head_dim * context * \
                    torch.tensor([], dtype=dtype).element_size()
                est = kv_full * (1 + 2 * sum(budgets) * (len(args.methods)))
                groups = [budgets] if est <= args.max_group_bytes * common.GiB else [[r] for r in budgets]
                for grp in groups:
                    recs = run_group(engine, pool, dtype_name=dname, model_name=args.model, context=context,
                                     batch=batch, budgets=grp, methods=args.methods,
                                     entropies=profile["layer_entropies"] if profile else None, n_layers=n_layers,
                                     steps=args.steps, warmup=args.warmup, weights_b=weights_b, bw_read=bw)
                    if len(groups) > 1:  # the full@L reference is timed in each group; keep the first
                        recs = [r for r in recs if not (r["method"] == "full" and any(
                            x["method"] == "full" and x["dtype"] == dname and x["context"] == context and
                            x["batch"] == batch for x in records))]
                    for r in recs:
                        r["group_budgets"] = grp
                        r["label"] = args.label
                    records.extend(recs)
                    for r in recs:
                        log(f"    {r['method']:8s} r={r['budget']:.2f} {r['ms_per_step']:8.1f} ms  "
                            f"speed-up {r.get('speedup_vs_full', 0):.2f}  bound {r.get('bound_speedup', 0):.2f}  "
                            f"t/t(full rL) {r.get('t_over_full_rL', float('nan')):.2f}")
                del pool
    run = {"command": command, "machine": machine, "args": {k: str(v) for k, v in vars(args).items()},
           "meda_profile": profile, "wall_s": time.perf_counter() - t_start,
           "load_average_at_end": common.load_average()}
    data = common.write_results(SUITE, args.out_dir, run, records, KEY, to_markdown, fresh=args.fresh)
    log(f"[decode] wrote {args.out_dir / (SUITE + '.json')} ({len(data['records'])} records)")
    return 0


def to_markdown(data: dict[str, Any]) -> str:
    rows = []
    recs = sorted(data["records"], key=lambda r: (r["model"], r["dtype"], r["batch"], r["context"],
                                                  r["budget"] if r["method"] != "full" else 0, r["method"]))
    for r in recs:
        rows.append([
            r["dtype"], r["batch"], r["context"], r["method"] + (f" [{r['label']}]" if r.get("label") else ""),
            None if r["method"] == "full" else r["budget"],
            r["kv_bytes_held"] / MiB, r.get("kv_keep_ratio_bytes"), r["ms_per_step"], r["tokens_per_s"],
            r.get("speedup_vs_full") if r["method"] != "full" else None, r.get("t_over_full_rL"),
            r.get("bound_speedup") if r["method"] != "full" else None,
            r.get("speedup_over_bound") if r["method"] != "full" else None,
            r["bound_s"] * 1e3,
        ])
    table = common.md_table(
        ["dtype", "batch", "context", "method", "r", "KV held MiB", "KV held / full", "ms/step (median)", "tok/s",
         "speed-up vs full", "t / t(full r·L)", "bound speed-up", "speed-up / bound", "bound ms"], rows)
    prof = [r.get("meda_profile") for r in data["runs"] if r.get("meda_profile")]
    extra = ""
    if prof:
        p = prof[-1]
        extra = (f"\n\nmeda per-layer entropies ({p['entropy_variant']}, real prefill of {p['prompt_tokens']} tokens): "
                 + ", ".join(f"{e:.4f}" for e in p["layer_entropies"]))
    return (f"# decode\n\n`full@rL` is a full cache of round(r·L) tokens; `r` = budget. "
            f"Model: {', '.join(sorted({r['model'] for r in recs}))}.\n\n{table}{extra}\n\nRuns:\n{common.runs_markdown(data)}\n")


if __name__ == "__main__":
    sys.exit(main())
