"""scheduler: continuous batching vs static batching, and rows under a fixed KV cap, through the scheduler.

Two experiments, each measured side by side in one run on one thread, on a CPU-time clock
(``time.thread_time``; idle gaps before the next arrival are skipped forward on the same clock for
every policy), so other processes on the machine do not move the ratios:

* ``mixed``: N requests (default 64) with max_tokens drawn uniformly from 8-128 (EOS ignored, so
  max_tokens sets each answer's length), arriving all at once and as a Poisson stream. Policies at
  the same row cap (``--max-num-seqs``): ``continuous`` (the scheduler), ``static`` (the scheduler
  admitting only when no row runs: batches that end together, finished rows leave the step early),
  and, for all-at-once, ``static_padded`` (today's `Engine.stream_static`: padded batches decoded
  until their slowest row ends). Target: continuous >= 1.5x static tokens/s.
* ``step_cost``: one decode step's CPU time against its rows, fitted as ``fixed + per_row * rows``:
  what a decode step avoided saves (``fixed``: reading the weights) against what every token costs
  whatever the policy (``per_row``: on one CPU thread the weight GEMVs become compute-bound).
* ``fixed_cap``: the same N' long-prompt requests through `Scheduler` under one KV cap, full cache
  vs meda@budget: concurrent rows (peak and mean over decode steps) and tokens/s (decode steps
  alone, and end to end with prefill). Target: meda >= 3x the rows and >= 2x decode tokens/s.

    python -m benchmarks.scheduler
"""

from __future__ import annotations

import dataclasses
import random
import statistics
import sys
import time
from typing import Any

from . import common
from .common import MiB, log

SUITE = "scheduler"
KEY = ("experiment", "model", "arrival", "policy", "method")


def parse_args(argv):
    p = common.base_parser(SUITE, __doc__.split("\n")[0])
    p.set_defaults(model="qwen2-0.5b")
    p.add_argument("--experiments", type=common.str_list, default=["step_cost", "mixed", "fixed_cap"])
    p.add_argument("--repeats", type=int, default=5, help="step_cost: timed rounds per row count")
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--min-tokens", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--max-num-seqs", type=int, default=16)
    p.add_argument("--arrivals", type=common.str_list, default=["all", "poisson"])
    p.add_argument("--rate", type=float, default=0.0,
                   help="Poisson arrivals per CPU second (0: the all-at-once continuous throughput in requests/s)")
    p.add_argument("--cap-model", default="small", choices=sorted(common.MODEL_SHAPES))
    p.add_argument("--cap-context", type=int, default=8192)
    p.add_argument("--cap-mib", type=float, default=80.0)
    p.add_argument("--cap-budget", type=float, default=0.2)
    p.add_argument("--cap-requests", type=int, default=24)
    p.add_argument("--cap-max-tokens", type=int, default=64)
    return p.parse_args(argv)


class DecodeMeter:
    """Wraps `Engine.decode_rows` on one engine instance: CPU time and rows of every decode step."""

    def __init__(self, engine):
        self.engine, self.orig = engine, type(engine).decode_rows
        self.cpu_s, self.rows, self.steps = 0.0, 0, 0
        engine.decode_rows = self

    def __call__(self, caches, toks, pos):
        t = time.thread_time()
        out = self.orig(self.engine, caches, toks, pos)
        self.cpu_s += time.thread_time() - t
        self.rows += len(caches)
        self.steps += 1
        return out

    def close(self):
        del self.engine.decode_rows


def drive(engine, prepared, arrivals, *, policy, max_num_seqs, cap_bytes, compression=None) -> dict[str, Any]:
    """Feed ``prepared[i]`` at CPU-clock time ``arrivals[i]``, step until all finish."""
    from meda_engine.scheduler import Scheduler

    sched = Scheduler(engine, max_num_seqs=max_num_seqs, kv_cache_memory_bytes=cap_bytes, policy=policy,
                      default_compression=compression)
    meter = DecodeMeter(engine)
    handles, i, skipped = [], 0, 0.0
    t0 = time.thread_time()
    running = []
    try:
        while i < len(prepared) or sched.has_work():
            now = time.thread_time() - t0 + skipped
            if not sched.has_work() and i < len(prepared) and arrivals[i] > now:
                skipped += arrivals[i] - now  # idle: jump to the next arrival
                now = arrivals[i]
            while i < len(prepared) and arrivals[i] <= now:
                handles.append(sched.submit(prepared[i]))
                i += 1
            sched.step()
            running.append(len(sched._running))
        total = time.thread_time() - t0 + skipped
    finally:
        meter.close()
    results = [h.result() for h in handles]
    tokens = sum(len(r.token_ids) for r in results)
    st = sched.stats()
    tele = [r.telemetry for r in results]
    return {"policy": policy, "requests": len(results), "tokens": tokens, "cpu_s": total,
            "tokens_per_s": tokens / total, "decode_steps": meter.steps, "decode_cpu_s": meter.cpu_s,
            "decode_tokens_per_s": meter.rows / meter.cpu_s if meter.cpu_s else 0.0,
            "mean_running": meter.rows / meter.steps if meter.steps else 0.0, "peak_running": st.peak_running,
            "peak_kv_bytes_in_use": st.peak_kv_bytes_in_use, "cap_bytes": cap_bytes,
            "ttft_p50_s": statistics.median(t.time_to_first_token_s for t in tele),
            "queue_wait_p50_s": statistics.median(t.queue_wait_s for t in tele),
            "tpot_p50_s": statistics.median(t.time_per_output_token_s for t in tele if t.time_per_output_token_s),
            "token_ids": [r.token_ids for r in results]}


def static_padded(engine, prepared, max_num_seqs) -> dict[str, Any]:
    engine.max_batch_size = max_num_seqs
    t0 = time.thread_time()
    results = engine.generate_static(prepared)
    total = time.thread_time() - t0
    tokens = sum(len(r.token_ids) for r in results)
    return {"policy": "static_padded", "requests": len(results), "tokens": tokens, "cpu_s": total,
            "tokens_per_s": tokens / total, "token_ids": [r.token_ids for r in results]}


def mixed(args, records) -> None:
    import torch

    from meda_engine import Engine

    model, tok = common.build_model(args.model, torch.float32, seed=args.seed)
    engine = Engine.from_model(model, tok)
    engine._eos = set()  # benchmark only: lengths set by max_tokens
    rng = random.Random(args.seed)
    prepared = []
    for i in range(args.requests):
        p = common.make_prompt(engine, args.prompt_tokens, seed=args.seed + i)
        n = rng.randint(args.min_tokens, args.max_tokens)
        prepared.append(dataclasses.replace(p, generation=dataclasses.replace(p.generation, max_new_tokens=n)))
    cap = 1 << 40  # rows, not bytes, limit this experiment
    base = {"experiment": "mixed", "model": args.model, "method": "full", "max_num_seqs": args.max_num_seqs,
            "prompt_tokens": args.prompt_tokens, "max_tokens_range": [args.min_tokens, args.max_tokens]}
    rate = args.rate
    for arrival in args.arrivals:
        if arrival == "all":
            arrivals = [0.0] * len(prepared)
        else:
            if rate <= 0:
                cont = next(r for r in records if r["experiment"] == "mixed" and r["arrival"] == "all"
                            and r["policy"] == "continuous")
                rate = cont["requests"] / cont["cpu_s"]
            arr_rng = random.Random(args.seed + 1)
            t, arrivals = 0.0, []
            for _ in prepared:
                t += arr_rng.expovariate(rate)
                arrivals.append(t)
        out = {}
        for policy in ("continuous", "static"):
            log(f"[scheduler] mixed {arrival} {policy}")
            out[policy] = drive(engine, prepared, arrivals, policy=policy, max_num_seqs=args.max_num_seqs,
                                cap_bytes=cap)
        if arrival == "all":
            log("[scheduler] mixed all static_padded")
            out["static_padded"] = static_padded(engine, prepared, args.max_num_seqs)
        same = all(out[p]["token_ids"] == out["continuous"]["token_ids"] for p in out)
        for policy, r in out.items():
            r.pop("token_ids")
            rec = {**base, "arrival": arrival, **({"rate_per_cpu_s": rate} if arrival != "all" else {}), **r,
                   "outputs_equal_across_policies": same,
                   "continuous_vs_this": out["continuous"]["tokens_per_s"] / r["tokens_per_s"]}
            records.append(rec)
            log(f"    {arrival:7s} {policy:13s} {r['tokens']} tokens in {r['cpu_s']:.1f} CPU s: "
                f"{r['tokens_per_s']:.1f} tok/s (continuous {rec['continuous_vs_this']:.2f}x)")


def step_cost(args, records) -> None:
    """CPU time of one decode step against the rows in it (1 .. max_num_seqs rows of real prefilled
    caches, rolled back after each step so every repeat sees the same lengths; sizes interleaved,
    median of the repeats), and its least-squares line ``t = fixed + per_row * rows``. ``fixed`` is
    what continuous batching saves per step avoided; ``per_row`` is paid per token whatever the policy."""
    import torch

    from meda_engine import Engine
    from meda_engine.cache import restore_lengths, snapshot_lengths

    model, tok = common.build_model(args.model, torch.float32, seed=args.seed)
    engine = Engine.from_model(model, tok)
    sizes = sorted({1, 2, 4, 8, args.max_num_seqs})
    prepared = [common.make_prompt(engine, args.prompt_tokens, seed=args.seed + i) for i in range(max(sizes))]
    rows = engine.prefill_rows(prepared)
    caches = [r.cache for r in rows]
    pos = [r.next_position for r in rows]
    times: dict[int, list[float]] = {n: [] for n in sizes}
    for _ in range(args.repeats + 1):  # the first round warms up
        for n in sizes:
            before = [snapshot_lengths(c) for c in caches[:n]]
            t = time.thread_time()
            engine.decode_rows(caches[:n], [1] * n, pos[:n])
            times[n].append(time.thread_time() - t)
            for c, b in zip(caches[:n], before):
                restore_lengths(c, b)
    med = {n: statistics.median(v[1:]) for n, v in times.items()}
    xs, ys = list(med), list(med.values())
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    per_row = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    fixed = my - per_row * mx
    log(f"[scheduler] step cost: {', '.join(f'{n} rows {t * 1e3:.0f} ms' for n, t in med.items())}; "
        f"fixed {fixed * 1e3:.0f} ms + {per_row * 1e3:.1f} ms/row")
    records.append({"experiment": "step_cost", "model": args.model, "arrival": "-", "policy": "-", "method": "full",
                    "prompt_tokens": args.prompt_tokens, "rows": xs, "step_cpu_s": ys, "fixed_s": fixed,
                    "per_row_s": per_row, "repeats": args.repeats})


def fixed_cap(args, records) -> None:
    import torch

    from meda_engine import CompressionConfig, Engine

    model, tok = common.build_model(args.cap_model, torch.float32, seed=args.seed)
    engine = Engine.from_model(model, tok)
    engine._eos = set()
    prompts = [common.make_prompt(engine, args.cap_context, seed=args.seed + i) for i in range(args.cap_requests)]
    prompts = [dataclasses.replace(p, generation=dataclasses.replace(p.generation, max_new_tokens=args.cap_max_tokens))
               for p in prompts]
    cap = int(args.cap_mib * MiB)
    out = {}
    for method in ("full", "meda"):
        comp = CompressionConfig("full") if method == "full" else CompressionConfig("meda", budget=args.cap_budget)
        log(f"[scheduler] fixed_cap {method}")
        out[method] = drive(engine, prompts, [0.0] * len(prompts), policy="continuous", max_num_seqs=256,
                            cap_bytes=cap, compression=comp)
        out[method].pop("token_ids")
    for method, r in out.items():
        f = out["full"]
        rec = {"experiment": "fixed_cap", "model": args.cap_model, "arrival": "all", "method": method,
               "budget": None if method == "full" else args.cap_budget, "context": args.cap_context, **r,
               "peak_rows_vs_full": r["peak_running"] / f["peak_running"],
               "mean_rows_vs_full": r["mean_running"] / f["mean_running"],
               "decode_tokens_per_s_vs_full": r["decode_tokens_per_s"] / f["decode_tokens_per_s"],
               "tokens_per_s_vs_full": r["tokens_per_s"] / f["tokens_per_s"]}
        records.append(rec)
        log(f"    {method:5s} peak rows {r['peak_running']} (mean {r['mean_running']:.1f}), peak KV "
            f"{r['peak_kv_bytes_in_use'] / MiB:.1f}/{cap / MiB:.0f} MiB, decode {r['decode_tokens_per_s']:.1f} tok/s, "
            f"end to end {r['tokens_per_s']:.1f} tok/s")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    common.set_threads(args.threads)
    command = common.command_line(SUITE, argv)
    t_start = time.perf_counter()
    machine = common.machine_info(args.threads, bandwidth=False)
    records: list[dict[str, Any]] = []
    for exp in args.experiments:
        {"mixed": mixed, "fixed_cap": fixed_cap, "step_cost": step_cost}[exp](args, records)
        run = {"command": command, "machine": machine, "args": {k: str(v) for k, v in vars(args).items()},
               "wall_s": time.perf_counter() - t_start, "load_average_at_end": common.load_average()}
        common.write_results(SUITE, args.out_dir, run, list(records), KEY, to_markdown, fresh=args.fresh)
    log(f"[scheduler] wrote {args.out_dir / (SUITE + '.json')}")
    return 0


def to_markdown(data: dict[str, Any]) -> str:
    recs = data["records"]
    mixed_rows = [[r["model"], r["arrival"], r["policy"], r["max_num_seqs"], r["requests"], r["tokens"], r["cpu_s"],
                   r["tokens_per_s"], r["continuous_vs_this"], r.get("decode_cpu_s"), r.get("decode_tokens_per_s"),
                   r.get("mean_running"), r.get("ttft_p50_s"),
                   r.get("outputs_equal_across_policies")] for r in recs if r["experiment"] == "mixed"]
    cap_rows = [[r["model"], r["context"], r["cap_bytes"] / MiB, r["method"], r.get("budget"), r["requests"],
                 r["peak_running"], r["mean_running"], r["peak_kv_bytes_in_use"] / MiB, r["decode_tokens_per_s"],
                 r["tokens_per_s"], r["peak_rows_vs_full"], r["mean_rows_vs_full"], r["decode_tokens_per_s_vs_full"],
                 r["tokens_per_s_vs_full"]] for r in recs if r["experiment"] == "fixed_cap"]
    t1 = common.md_table(["model", "arrivals", "policy", "max_num_seqs", "requests", "tokens", "CPU s", "tok/s",
                          "continuous vs this", "decode CPU s", "decode tok/s", "mean rows per step", "TTFT p50 (CPU s)", "same outputs"], mixed_rows)
    t2 = common.md_table(["model", "context", "cap MiB", "method", "r", "requests", "peak rows", "mean rows",
                          "peak KV MiB", "decode tok/s", "end-to-end tok/s", "peak rows vs full", "mean rows vs full",
                          "decode tok/s vs full", "end-to-end vs full"], cap_rows)
    how = (
        "Through `meda_engine.scheduler.Scheduler`, one thread, CPU-time clock (`time.thread_time`; idle gaps "
        "before the next Poisson arrival are skipped forward on that clock, the same way for every policy), EOS "
        "ignored so that max_tokens sets each answer's length. *Mixed lengths*: `continuous` admits whenever a row "
        "is free; `static` is the same scheduler admitting only when no row runs (batches end together, but "
        "finished rows already leave the step); `static_padded` is today's padded `Engine.stream_static` "
        "(finished rows keep decoding until the batch's slowest ends). tok/s is end to end (prefill included). "
        "*Fixed KV cap*: the same long-prompt requests, all at once, full vs meda; rows = rows decoding together "
        "(peak, and mean over decode steps), decode tok/s = tokens from decode steps / CPU time of those steps, "
        "end-to-end tok/s includes every prefill (meda's prefill also computes its statistics). Models have random "
        "weights of the named shape; `small` (4 layers, hidden 256) stands in where the 0.5B shape's 8k-token "
        "prefills would take hours on this CPU.")
    notes = []
    for arrival in ("all", "poisson"):
        c = next((r for r in recs if r["experiment"] == "mixed" and r["arrival"] == arrival
                  and r["policy"] == "continuous"), None)
        st = next((r for r in recs if r["experiment"] == "mixed" and r["arrival"] == arrival
                   and r["policy"] == "static"), None)
        if c and st and c.get("decode_steps"):
            pre_c, pre_s = c["cpu_s"] - c["decode_cpu_s"], st["cpu_s"] - st["decode_cpu_s"]
            notes.append(
                f"- {arrival}: static ran {st['decode_steps']} decode steps, continuous {c['decode_steps']} "
                f"({st['decode_steps'] / c['decode_steps']:.2f}x; mean rows per step {st['mean_running']:.1f} vs "
                f"{c['mean_running']:.1f}); decode-only tok/s {c['decode_tokens_per_s'] / st['decode_tokens_per_s']:.2f}x. "
                f"Everything outside decode steps (prefill, sampling, scheduling) took {pre_c:.0f} vs {pre_s:.0f} CPU s "
                f"of {c['cpu_s']:.0f} vs {st['cpu_s']:.0f}: the same prefills in both, which dilutes the end-to-end ratio.")
    sc = next((r for r in recs if r["experiment"] == "step_cost"), None)
    if sc:
        pts = ", ".join(f"{n} rows {t * 1e3:.0f} ms" for n, t in zip(sc["rows"], sc["step_cpu_s"]))
        notes.append(f"- step cost ({sc['model']}, CPU time of one decode step): {pts}; fitted "
                     f"{sc['fixed_s'] * 1e3:.0f} ms + {sc['per_row_s'] * 1e3:.1f} ms per row.")
        for arrival in ("all", "poisson"):
            c = next((r for r in recs if r["experiment"] == "mixed" and r["arrival"] == arrival
                      and r["policy"] == "continuous"), None)
            st = next((r for r in recs if r["experiment"] == "mixed" and r["arrival"] == arrival
                       and r["policy"] == "static"), None)
            if c and st and c.get("decode_steps"):
                a, b = sc["fixed_s"], sc["per_row_s"]
                rows_c, rows_s = c["mean_running"] * c["decode_steps"], st["mean_running"] * st["decode_steps"]
                pred = (st["decode_steps"] * a + rows_s * b) / (c["decode_steps"] * a + rows_c * b)
                notes.append(
                    f"  - {arrival}: with that step cost, the decode steps the two policies ran predict a decode "
                    f"gain of {pred:.2f}x for continuous (measured {c['decode_tokens_per_s'] / st['decode_tokens_per_s']:.2f}x); "
                    f"on a device whose step cost does not grow with the rows (a GPU at these batch sizes is "
                    f"bandwidth-bound) the same steps give {st['decode_steps'] / c['decode_steps']:.2f}x.")
    for m in (r for r in recs if r["experiment"] == "fixed_cap" and r["method"] != "full"):
        notes.append(
            f"- fixed cap ({m['model']}, {m['context']}-token prompts, {m['cap_bytes'] / MiB:.0f} MiB): {m['method']}@"
            f"{m['budget']} decoded {m['peak_rows_vs_full']:.2f}x the rows at peak ({m['mean_rows_vs_full']:.2f}x on "
            f"average over its decode steps, which include the tail where the last rows finish) and "
            f"{m['decode_tokens_per_s_vs_full']:.2f}x the decode tokens/s; end to end {m['tokens_per_s_vs_full']:.2f}x, "
            f"because every request still pays a full-length prefill (and meda its statistics).")
    findings = ("Findings (computed from the records):\n\n" + "\n".join(notes) + "\n\n") if notes else ""
    return (f"# scheduler\n\n{how}\n\n{findings}## mixed lengths\n\n{t1}\n\n## fixed KV cap\n\n{t2}\n\n"
            f"Runs:\n{common.runs_markdown(data)}\n")


if __name__ == "__main__":
    sys.exit(main())
