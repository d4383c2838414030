"""peers: the same decode workload through transformers' own decoding and through NVIDIA kvpress.

1. **transformers** (this environment): the model's own forward with a ``DynamicCache`` holding the same
   random K/V, SDPA attention, a 2-D all-ones attention mask, explicit positions: what ``generate``
   does per step. Timed interleaved with our full-cache `Engine.decode_step` on a `RaggedKVCache`
   holding the same K/V. One real ``model.generate`` at a short context checks the per-step figure:
   (t(generate 1+n tokens) - t(generate 1 token)) / n.
2. **kvpress** (its own environment, `peers_kvpress_env.py`, since it pins transformers<5.3):
   * output agreement: a small random model (same architecture, saved as a checkpoint both sides
     load), one prompt; greedy tokens of our snapkv/pyramidkv vs kvpress's SnapKVPress/PyramidKVPress
     at the same budget and observation window (and no compression on both sides, as a sanity check);
   * decode speed at each context and budget on the Qwen2-0.5B-shaped model: a DynamicCache with the
     per-layer lengths the press produces, stepped like kvpress's pipeline loop; our side: a
     `RaggedKVCache` with the per-layer lengths our allocators give, timed in this process just before.

If kvpress cannot be installed or run, the suite records and prints exactly why (``kvpress.error``).

    python -m benchmarks.peers --contexts 2k,8k --dtypes fp32,bf16 --budgets 0.1,0.2,0.3
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

from . import common, peers_kvpress_env
from .common import log

SUITE = "peers"
KEY = ("kind", "model", "dtype", "batch", "context", "method", "budget")


def parse_args(argv):
    p = common.base_parser(SUITE, __doc__.split("\n")[0])
    p.add_argument("--contexts", type=common.int_list, default=common.int_list("2k,8k"))
    p.add_argument("--kvpress-contexts", type=common.int_list, default=None,
                   help="contexts of the kvpress speed comparison (default: --contexts)")
    p.add_argument("--batches", type=common.int_list, default=[1])
    p.add_argument("--dtypes", type=common.str_list, default=["fp32", "bf16"])
    p.add_argument("--budgets", type=common.float_list, default=[0.1, 0.2, 0.3])
    p.add_argument("--steps", type=int, default=7)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--window", type=int, default=64, help="SnapKV/PyramidKV observation window, both sides")
    p.add_argument("--generate-context", type=int, default=512, help="context of the real model.generate check")
    p.add_argument("--generate-tokens", type=int, default=8)
    p.add_argument("--agreement-model", default="small", choices=sorted(common.MODEL_SHAPES))
    p.add_argument("--agreement-context", type=int, default=2000)
    p.add_argument("--agreement-tokens", type=int, default=24)
    p.add_argument("--no-kvpress", action="store_true", help="skip kvpress (recorded as skipped on request)")
    p.add_argument("--generate-only", action="store_true",
                   help="only the model.generate check (first dtype) and its forward-loop comparison; implies --no-kvpress")
    args = p.parse_args(argv)
    if args.generate_only:
        args.no_kvpress = True
        args.contexts = []
    return args


# ---------------------------------------------------------------------------------------------------
def dynamic_cache(pool_k, pool_v, lengths):
    from transformers import DynamicCache

    cache = DynamicCache()
    for i, n in enumerate(lengths):
        cache.update(pool_k[:, :, :n].clone(), pool_v[:, :, :n].clone(), i)
    return cache


def hf_stepper(model, cache, context: int, batch: int):
    """One transformers decode step as ``generate`` runs it (SDPA, DynamicCache, 2-D mask)."""
    import torch

    st = {"tok": torch.randint(10, 100, (batch, 1)), "pos": context}

    def step():
        with torch.inference_mode():
            mask = torch.ones((batch, st["pos"] + 1), dtype=torch.long)
            out = model(input_ids=st["tok"], past_key_values=cache, attention_mask=mask,
                        position_ids=torch.full((batch, 1), st["pos"]), use_cache=True)
            st["tok"] = out.logits[:, -1].argmax(-1, keepdim=True)
            st["pos"] += 1

    return step


class AttnSwitch:
    """Runs a step with the model switched to the given attention implementation (outside the timing
    would be cleaner, but the switch costs microseconds: it only sets a config field per module)."""

    def __init__(self, model, impl: str, fn):
        self.model, self.impl, self.fn = model, impl, fn

    def __call__(self):
        self.model.set_attn_implementation(self.impl)
        self.fn()


def generate_check(model, context: int, n_new: int, dtype_name: str) -> dict[str, Any]:
    """Per-step time of a real ``model.generate``: (t(1+n) - t(1)) / n, best of three each."""
    import torch

    ids = torch.randint(10, 100, (1, context))
    model.set_attn_implementation("sdpa")
    kw = dict(do_sample=False, pad_token_id=0, eos_token_id=None)
    t = {1: [], 1 + n_new: []}
    c = {1: [], 1 + n_new: []}
    with torch.inference_mode():
        for _ in range(3):
            for n in t:
                c0 = time.process_time()
                t0 = time.perf_counter()
                model.generate(ids, max_new_tokens=n, min_new_tokens=n, **kw)
                t[n].append(time.perf_counter() - t0)
                c[n].append(time.process_time() - c0)
    per_step = (min(t[1 + n_new]) - min(t[1])) / n_new
    per_step_cpu = (min(c[1 + n_new]) - min(c[1])) / n_new
    return {"kind": "hf_generate", "model": "", "dtype": dtype_name, "batch": 1, "context": context,
            "method": "hf_generate", "budget": 1.0, "generate_1_s": t[1], f"generate_{1 + n_new}_s": t[1 + n_new],
            "generate_1_cpu_s": c[1], f"generate_{1 + n_new}_cpu_s": c[1 + n_new],
            "n_new": n_new, "per_step_s": per_step, "ms_per_step": 1e3 * per_step,
            "per_step_cpu_s": per_step_cpu, "cpu_ms_per_step": 1e3 * per_step_cpu}


def hf_vs_ours(engine, model, args, dname, context, batch, pool, n_layers) -> list[dict[str, Any]]:
    from .decode import decoder

    reserve = args.warmup + args.steps + 2
    ours_cache = pool.cache([context] * n_layers, batch, reserve)
    hf_cache = dynamic_cache(pool.k[:batch], pool.v[:batch], [context] * n_layers)
    fns = {"ours_full": AttnSwitch(model, "meda", decoder(engine, ours_cache, context, batch)),
           "hf_full": AttnSwitch(model, "sdpa", hf_stepper(model, hf_cache, context, batch))}
    log(f"[peers] transformers vs ours: {dname} L={context} B={batch}")
    cpu: dict[str, list[float]] = {}
    times = common.round_robin(fns, warmup=args.warmup, steps=args.steps, log=log, cpu_times=cpu)
    model.set_attn_implementation("meda")
    t_ours = common.statistics.median(times["ours_full"])
    c_ours = common.statistics.median(cpu["ours_full"])
    recs = []
    for name, ts in times.items():
        s = common.summarize(ts)
        c = common.statistics.median(cpu[name])
        recs.append({"kind": "decode", "model": args.model, "dtype": dname, "batch": batch, "context": context,
                     "method": name, "budget": 1.0, "step_times_s": ts, **s, "ms_per_step": 1e3 * s["median_s"],
                     "tokens_per_s": batch / s["median_s"], "ours_speedup": s["median_s"] / t_ours,
                     "step_cpu_s": cpu[name], "cpu_median_s": c, "ours_speedup_cpu": c / c_ours})
    return recs


def ours_compressed(engine, args, dname, context, pool, n_layers) -> list[dict[str, Any]]:
    """Our decode on caches with the per-layer lengths our snapkv/pyramidkv allocators give."""
    from meda_engine.compression import PyramidAllocator, UniformAllocator, ratios_to_tokens

    from .decode import decoder, held_bytes

    reserve = args.warmup + args.steps + 2
    configs = {("ours_full", 1.0): [context] * n_layers}
    for r in args.budgets:
        configs[("ours_snapkv", r)] = ratios_to_tokens(UniformAllocator().ratios(r, n_layers), context)
        configs[("ours_pyramidkv", r)] = ratios_to_tokens(PyramidAllocator().ratios(r, n_layers), context)
    caches = {k: pool.cache(v, 1, reserve) for k, v in configs.items()}
    fns = {f"{m}@{r}": decoder(engine, caches[(m, r)], context, 1) for (m, r) in configs}
    log(f"[peers] ours compressed: {dname} L={context}")
    cpu: dict[str, list[float]] = {}
    times = common.round_robin(fns, warmup=args.warmup, steps=args.steps, log=log, cpu_times=cpu)
    recs = []
    for (m, r), lengths in configs.items():
        ts = times[f"{m}@{r}"]
        s = common.summarize(ts)
        s["cpu_median_s"] = common.statistics.median(cpu[f"{m}@{r}"])
        recs.append({"kind": "kvpress_side", "model": args.model, "dtype": dname, "batch": 1, "context": context,
                     "method": m, "budget": r, "layer_lengths": lengths, "kv_bytes_held": held_bytes(caches[(m, r)]),
                     "step_times_s": ts, **s, "ms_per_step": 1e3 * s["median_s"]})
    return recs


def agreement_ours(args) -> tuple[dict[str, Any], Path, list[int]]:
    """Our greedy tokens (full, snapkv, pyramidkv at each budget) on the small random model; saves the
    model as a checkpoint for kvpress and returns the prompt ids."""
    import torch

    from meda_engine import CompressionConfig, Engine

    model, tok = common.build_model(args.agreement_model, torch.float32, seed=args.seed, init_std=0.15)
    ckpt = peers_kvpress_env.cache_dir() / f"peers-agreement-{args.agreement_model}-seed{args.seed}"
    model.save_pretrained(ckpt)
    engine = Engine.from_model(model, tok)
    prompt = common.make_prompt(engine, args.agreement_context, seed=args.seed + 7)
    out = {}
    for method in ("full", "snapkv", "pyramidkv"):
        for r in args.budgets if method != "full" else [1.0]:
            cfg = CompressionConfig(method=method, budget=r if method != "full" else 1.0, window=args.window)
            t0 = time.perf_counter()
            res = engine.generate([prompt], compression=cfg, max_new_tokens=args.agreement_tokens)[0]
            out[f"{method}@{r}"] = {"generated_ids": res.token_ids, "finish_reason": res.finish_reason,
                                    "layer_lengths": res.telemetry.layer_budgets, "wall_s": time.perf_counter() - t0,
                                    "kv_keep_ratio": res.telemetry.kv_keep_ratio}
    return out, ckpt, prompt.prompt.input_ids.tolist()


def agreement_table(ours: dict[str, Any], theirs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    names = {"none": "full", "snapkv": "snapkv", "pyramidkv": "pyramidkv"}
    rows = []
    for t in theirs:
        key = f"{names[t['press']]}@{t['budget']}"
        o = ours.get(key)
        if o is None:
            continue
        a, b = o["generated_ids"], t["generated_ids"]
        n = min(len(a), len(b))
        prefix = next((i for i in range(n) if a[i] != b[i]), n)
        rows.append({"kind": "agreement", "model": "", "dtype": "fp32", "batch": 1, "context": None,
                     "method": names[t["press"]], "budget": t["budget"], "compared_tokens": n,
                     "matching_tokens": sum(x == y for x, y in zip(a[:n], b[:n])), "identical_prefix": prefix,
                     "ours_ids": a, "kvpress_ids": b, "ours_layer_lengths": o["layer_lengths"],
                     "kvpress_layer_lengths": t["layer_lengths_after_prefill"],
                     "ours_finish": o["finish_reason"]})
    # compression matters: how far our compressed outputs are from our full-cache output
    full = ours.get("full@1.0", {}).get("generated_ids", [])
    for r in rows:
        a = r["ours_ids"]
        n = min(len(a), len(full))
        r["ours_vs_ours_full_matching"] = sum(x == y for x, y in zip(a[:n], full[:n]))
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    common.set_threads(args.threads)
    import torch

    from meda_engine import Engine

    from .decode import KVPool

    command = common.command_line(SUITE, argv)
    t_start = time.perf_counter()
    machine = common.machine_info(args.threads, bandwidth_mib=args.bandwidth_mib)
    records: list[dict[str, Any]] = []
    kv_info: dict[str, Any] = {"requested": not args.no_kvpress}
    kv_contexts = args.kvpress_contexts or args.contexts

    # -- kvpress agreement (small model, our side first)
    agree_ours = ckpt = prompt_ids = None
    if not args.no_kvpress:
        agree_ours, ckpt, prompt_ids = agreement_ours(args)

    # -- transformers vs ours, and our compressed caches for the kvpress comparison
    model, tok = common.build_model(args.model, torch.float32, seed=args.seed)
    big_ckpt = peers_kvpress_env.cache_dir() / f"peers-{args.model}-seed{args.seed}"
    if not args.no_kvpress:
        model.save_pretrained(big_ckpt)
    engine = Engine.from_model(model, tok)
    n_layers = engine.dims.n_layers
    for dname in args.dtypes:
        dtype = common.parse_dtype(dname)
        model.to(dtype)
        engine = Engine.from_model(model, tok)
        for context in args.contexts:
            for batch in args.batches:
                pool = KVPool(engine.dims, batch, context, dtype, args.seed)
                records += hf_vs_ours(engine, model, args, dname, context, batch, pool, n_layers)
                if batch == 1 and not args.no_kvpress and context in kv_contexts:
                    records += ours_compressed(engine, args, dname, context, pool, n_layers)
                del pool
        if args.generate_context and dname == args.dtypes[0]:
            rec = generate_check(model, args.generate_context, args.generate_tokens, dname)
            rec["model"] = args.model
            model.set_attn_implementation("meda")
            pool = KVPool(engine.dims, 1, args.generate_context, dtype, args.seed)
            step_recs = hf_vs_ours(engine, model, args, dname, args.generate_context, 1, pool, n_layers)
            records += step_recs
            hf_step = next(r for r in step_recs if r["method"] == "hf_full")
            rec["forward_step_ms"] = hf_step["ms_per_step"]
            rec["forward_step_cpu_ms"] = 1e3 * hf_step["cpu_median_s"]
            rec["generate_over_forward"] = rec["ms_per_step"] / hf_step["ms_per_step"]
            rec["generate_over_forward_cpu"] = rec["cpu_ms_per_step"] / rec["forward_step_cpu_ms"]
            records.append(rec)
            log(f"[peers] model.generate per step {rec['cpu_ms_per_step']:.1f} CPU ms vs forward step "
                f"{rec['forward_step_cpu_ms']:.1f} CPU ms at L={args.generate_context}")
    del model, engine

    # -- kvpress
    if not args.no_kvpress:
        spec = {"threads": args.threads,
                "agreement": {"checkpoint": str(ckpt), "dtype": "float32", "prompt_ids": prompt_ids,
                              "presses": ["none", "snapkv", "pyramidkv"], "budgets": args.budgets,
                              "window": args.window, "max_new_tokens": args.agreement_tokens},
                "synthetic": {"checkpoint": str(big_ckpt), "dtypes": args.dtypes, "contexts": kv_contexts,
                              "budgets": args.budgets, "presses": ["snapkv", "pyramidkv"], "window": args.window,
                              "steps": args.steps, "warmup": args.warmup}}
        log("[peers] running the kvpress worker in its own environment")
        result, why = peers_kvpress_env.run_worker(spec, threads=args.threads)
        if why:
            kv_info["error"] = why
            log(f"[peers] kvpress did not run: {why}")
        else:
            kv_info.update(env=result["env"], worker_threads=result["threads"])
            records += agreement_table(agree_ours, result["agreement"])
            for r in result["synthetic"]:
                name = "kvpress_full" if r["press"] == "none" else f"kvpress_{r['press']}"
                s = common.summarize(r["step_times_s"])
                records.append({"kind": "kvpress_side", "model": args.model, "dtype": r["dtype"], "batch": 1,
                                "context": r["context"], "method": name, "budget": r["budget"],
                                "layer_lengths": r["layer_lengths"], "kv_bytes_held": r["kv_bytes_held"],
                                "step_times_s": r["step_times_s"], **s, "ms_per_step": r["ms_per_step"],
                                "cpu_median_s": r.get("cpu_median_s")})
    else:
        kv_info["error"] = ("not part of this run (--generate-only)" if args.generate_only
                            else "skipped on request (--no-kvpress)")
    run = {"command": command, "machine": machine, "args": {k: str(v) for k, v in vars(args).items()},
           "kvpress": kv_info, "wall_s": time.perf_counter() - t_start, "load_average_at_end": common.load_average()}
    common.write_results(SUITE, args.out_dir, run, records, KEY, to_markdown, fresh=args.fresh)
    log(f"[peers] wrote {args.out_dir / (SUITE + '.json')}")
    return 0


def to_markdown(data: dict[str, Any]) -> str:
    recs = data["records"]
    parts = ["# peers\n"]
    rows = []
    for r in sorted([r for r in recs if r["kind"] == "decode"], key=lambda r: (r["dtype"], r["batch"], r["context"], r["method"])):
        if r["method"] != "hf_full":
            continue
        ours = next((o for o in recs if o["kind"] == "decode" and o["method"] == "ours_full" and o["dtype"] == r["dtype"]
                     and o["batch"] == r["batch"] and o["context"] == r["context"] and o["run_id"] == r["run_id"]), None)
        cms = lambda x: 1e3 * x["cpu_median_s"] if x and x.get("cpu_median_s") else None  # noqa: E731
        rows.append([r["dtype"], r["batch"], r["context"], r["ms_per_step"], ours and ours["ms_per_step"],
                     cms(r), cms(ours), r["ours_speedup"], r.get("ours_speedup_cpu")])
    parts.append("## Full-cache decode: transformers (DynamicCache + SDPA, as generate) vs ours\n\n" + common.md_table(
        ["dtype", "batch", "context", "transformers ms/step", "ours ms/step", "transformers CPU ms", "ours CPU ms",
         "ours speed-up (wall)", "ours speed-up (CPU)"], rows))
    gen = [r for r in recs if r["kind"] == "hf_generate"]
    if gen:
        parts.append("\n\n## Check: a real `model.generate`\n\n" + common.md_table(
            ["dtype", "context", "generate CPU ms/step ((t(1+n)-t(1))/n, best of 3)", "forward-loop CPU ms/step",
             "ratio (CPU)", "generate wall ms/step", "forward-loop wall ms/step"],
            [[g["dtype"], g["context"], g.get("cpu_ms_per_step"), g.get("forward_step_cpu_ms"),
              g.get("generate_over_forward_cpu"), g["ms_per_step"], g.get("forward_step_ms")] for g in gen]))
    side = [r for r in recs if r["kind"] == "kvpress_side"]
    if side:
        rows = []
        for r in sorted(side, key=lambda r: (r["dtype"], r["context"], r["budget"], r["method"])):
            ls = r["layer_lengths"]
            cpu = r.get("cpu_median_s")
            rows.append([r["dtype"], r["context"], r["method"], None if r["budget"] == 1.0 else r["budget"],
                         f"{min(ls)}-{max(ls)}", sum(ls), r["kv_bytes_held"] / common.MiB, r["ms_per_step"],
                         1e3 * cpu if cpu else None])
        parts.append("\n\n## Compressed decode: kvpress (its own env) vs ours, batch 1\n\n"
                     "kvpress rows are timed in the kvpress environment (transformers 5.2), ours in this process just "
                     "before; both interleave their own configurations.\n\n" + common.md_table(
            ["dtype", "context", "method", "r", "tokens/layer", "tokens total", "KV MiB", "ms/step", "CPU ms/step"], rows))
    agr = [r for r in recs if r["kind"] == "agreement"]
    if agr:
        parts.append("\n\n## Output agreement (greedy tokens, same random model and prompt)\n\n" + common.md_table(
            ["method", "r", "tokens compared", "same token", "identical prefix", "ours vs our full cache"],
            [[a["method"], None if a["method"] == "full" else a["budget"], a["compared_tokens"], a["matching_tokens"],
              a["identical_prefix"], a["ours_vs_ours_full_matching"]] for a in agr]))
    for run in data["runs"]:
        kv = run.get("kvpress", {})
        if run.get("args", {}).get("generate_only") == "True":
            parts.append(f"\n\nRun {run['run_id']} re-measured only the `model.generate` check (with CPU times).")
        elif kv.get("error"):
            parts.append(f"\n\n**kvpress (run {run['run_id']}) did not run:** {kv['error']}")
        elif kv.get("env"):
            parts.append(f"\n\nkvpress environment (run {run['run_id']}): {kv['env']}")
    parts.append("\n\nRuns:\n" + common.runs_markdown(data) + "\n")
    return "".join(parts)


if __name__ == "__main__":
    sys.exit(main())
