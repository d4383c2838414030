"""Quality vs KV budget: exact-match accuracy of the project's trained needle models, every method.

    python -m benchmarks.quality --models models/needle-s0,models/needle-s1,models/needle-s2

Each held-out question (`meda_quality.task.heldout_set`: clips of several lengths, 8 question types)
is answered greedily under every method and budget, in two protocols:

* ``aware``: the prompt, question included, is prefilled and compressed (as MEDA does), all but its
  last token, which is fed on the compressed cache (`Request.answer_from_compressed_cache`), so that
  every answer token is decoded from the compressed cache. (Compressing the whole prompt would let the
  first answer token come from the full-cache prefill; with one-word answers every method would then
  score like the full cache.)
* ``agnostic``: the video is compressed before the question is seen; the question is fed on top of
  the compressed cache (`Request.query_after_compression`), the realistic streaming/caching case.

Reported per (method, budget, protocol, clip length): accuracy (mean and spread over the models),
agreement with the full-cache answer, the measured keep-ratio, and for entropy methods the per-layer
budgets and entropies. Methods: the baselines, MEDA (paper entropy, average merge, text prior) and
MEDA ablations (code entropy, no merge, pivot merge, no text prior, exact all-query scores, sharper allocation).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from . import common

# name -> CompressionConfig fields (besides budget)
CONFIGS: dict[str, dict[str, Any]] = {
    "full": {"method": "full"},
    "streamingllm": {"method": "streamingllm"},
    "h2o": {"method": "h2o"},
    "snapkv": {"method": "snapkv"},
    "pyramidkv": {"method": "pyramidkv"},
    "lookm": {"method": "lookm"},
    "meda": {"method": "meda"},
    "meda-code": {"method": "meda", "entropy": "code"},
    "meda-nomerge": {"method": "meda", "merge": "none"},
    "meda-noprior": {"method": "meda", "text_prior": False},
    "meda-exact": {"method": "meda", "score_queries": 0},
    "meda-pivot": {"method": "meda", "merge": "pivot"},
    # allocation study: sharper softmax over the layer entropies (MEDA uses temperature 1; lookm is the
    # same scorer and merger with a uniform allocation, i.e. temperature -> infinity)
    "meda-t0.5": {"method": "meda", "temperature": 0.5},
    "meda-t0.25": {"method": "meda", "temperature": 0.25},
}
UNIFORM_BASELINES = ("streamingllm", "h2o", "snapkv", "lookm")
DEFAULT_BUDGETS = (0.05, 0.1, 0.2, 0.3, 0.5)


def parse_args(argv):
    p = common.base_parser("quality", __doc__.split("\n\n")[0])
    p.add_argument("--models", type=common.str_list, default=["models/needle-s0", "models/needle-s1",
                                                               "models/needle-s2"],
                   help="trained checkpoint directories (one per training seed)")
    p.add_argument("--lengths", type=common.int_list, default=[16, 64, 128], help="clip lengths in frames")
    p.add_argument("--per-cell", type=int, default=3, help="questions per (question type, length)")
    p.add_argument("--split", type=int, default=0, help="held-out split (0 = the reference test split)")
    p.add_argument("--budgets", type=common.float_list, default=list(DEFAULT_BUDGETS))
    p.add_argument("--configs", type=common.str_list, default=list(CONFIGS), help=f"of {', '.join(CONFIGS)}")
    p.add_argument("--protocols", type=common.str_list, default=["aware", "agnostic"])
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--render-only", action="store_true",
                   help="run nothing: rewrite quality.md (and the plots with --plots-dir) from the JSON in --out-dir")
    p.add_argument("--plots-dir", type=Path, default=None,
                   help="also write PNG plots of all results in the JSON there (e.g. docs/img)")
    return p.parse_args(argv)


def prepare_items(engine, items, protocol: str) -> list:
    """Tokenise and preprocess every item's prompt once per protocol (`Engine.prepare`); the prepared
    requests are reused by every config, so the matrix pays the pixel preprocessing only once."""
    from meda_engine import GenerationConfig, Request
    from meda_quality import evaluate as qeval
    from meda_quality import task

    return [engine.prepare(Request(prompt=it.question, video=it.clip().raw_frames, video_fps=task.RAW_FPS,
                                   query_after_compression=protocol == "agnostic",
                                   answer_from_compressed_cache=protocol == "aware",
                                   generation=GenerationConfig(max_new_tokens=qeval.MAX_NEW_TOKENS)))
            for it in items]


def run_config(engine, items, prepared, compression, batch_size: int) -> list[dict[str, Any]]:
    """Answer every item under one compression config; ``prepared[i]`` is item i's prepared request."""
    from meda_quality import task

    order = sorted(range(len(items)), key=lambda i: items[i].n_frames)
    out: list[dict[str, Any] | None] = [None] * len(items)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        for i, res in zip(idx, engine.generate([prepared[i] for i in idx], compression=compression)):
            t = res.telemetry
            out[i] = {
                "n_frames": items[i].n_frames, "qtype": items[i].qtype, "output": res.text,
                "correct": task.normalise(res.text) == task.normalise(items[i].answer),
                "keep_ratio": t.kv_keep_ratio, "n_prompt": t.n_prompt_tokens,
                "layer_ratios": [b / max(1, t.n_prompt_tokens) for b in t.layer_budgets],
                "layer_entropies": t.layer_entropies,
            }
    return [r for r in out if r is not None]


def aggregate(rows: list[dict[str, Any]], full_rows: list[dict[str, Any]] | None) -> dict[str, Any]:
    rec: dict[str, Any] = {
        "n": len(rows),
        "accuracy": float(np.mean([r["correct"] for r in rows])),
        "keep_ratio": float(np.mean([r["keep_ratio"] for r in rows])),
        "by_type": {t: float(np.mean([r["correct"] for r in rows if r["qtype"] == t]))
                    for t in sorted({r["qtype"] for r in rows})},
        "layer_ratios": np.mean([r["layer_ratios"] for r in rows], axis=0).round(4).tolist(),
    }
    ent = [r["layer_entropies"] for r in rows if r["layer_entropies"]]
    rec["layer_entropies"] = np.mean(ent, axis=0).round(4).tolist() if ent else None
    if full_rows is not None:
        rec["agreement"] = float(np.mean([a["output"] == b["output"] for a, b in zip(rows, full_rows)]))
    return rec


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    common.set_threads(args.threads)
    from meda_engine import CompressionConfig, Engine
    from meda_quality import task

    if args.render_only:
        data = json.loads((Path(args.out_dir) / "quality.json").read_text())
        (Path(args.out_dir) / "quality.md").write_text(to_markdown(data))
        for path in plots(data, args.plots_dir) if args.plots_dir is not None else []:
            common.log(f"[quality] wrote {path}")
        return 0
    unknown = [c for c in args.configs if c not in CONFIGS]
    if unknown:
        raise SystemExit(f"unknown configs {unknown}; choose from {list(CONFIGS)}")
    t_start = time.time()
    items = task.heldout_set(args.per_cell, tuple(args.lengths), split=args.split)
    data = None
    for model_dir in args.models:
        # one results write per model, so that a long matrix interrupted later keeps what it measured
        t_model = time.time()
        machine = common.machine_info(args.threads, bandwidth=False)
        records = []
        engine = Engine.from_pretrained(model_dir, device="cpu", dtype="float32")
        model = Path(model_dir).name
        for protocol in args.protocols:
            prepared = prepare_items(engine, items, protocol)
            full_rows = run_config(engine, items, prepared, CompressionConfig(method="full"), args.batch_size)
            for name in args.configs:
                budgets = [1.0] if name == "full" else args.budgets
                for budget in budgets:
                    if name == "full":
                        rows = full_rows
                    else:
                        cfg = CompressionConfig(budget=float(budget), **CONFIGS[name])
                        rows = run_config(engine, items, prepared, cfg, args.batch_size)
                    for length in args.lengths:
                        sub = [r for r in rows if r["n_frames"] == length]
                        sub_full = [r for r in full_rows if r["n_frames"] == length]
                        rec = {"model": model, "config": name, "budget": float(budget), "protocol": protocol,
                               "length": length, **aggregate(sub, sub_full)}
                        records.append(rec)
                    common.log(f"[quality] {model} {protocol} {name}@{budget}: "
                               f"acc {np.mean([r['correct'] for r in rows]):.3f} ({time.time() - t_start:.0f}s)")
            del prepared
        run = {"command": common.command_line("quality", argv), "model": model,
               "machine": machine, "wall_s": time.time() - t_model, "load_average_at_end": common.load_average(),
               "items": {"per_cell": args.per_cell, "lengths": args.lengths, "split": args.split, "n": len(items)}}
        data = common.write_results("quality", args.out_dir, run, records,
                                    ("model", "config", "budget", "protocol", "length"), to_markdown,
                                    fresh=args.fresh and data is None)
    if args.plots_dir is not None and data is not None:
        for path in plots(data, args.plots_dir):
            common.log(f"[quality] wrote {path}")
    return 0


def summary_table(data: dict[str, Any]) -> list[dict[str, Any]]:
    """Accuracy per (config, budget, protocol, length): mean and std over the models."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in data["records"]:
        groups.setdefault((r["config"], r["budget"], r["protocol"], r["length"]), []).append(r)
    out = []
    def order(key):
        config, budget, protocol, length = key
        return protocol, length, list(CONFIGS).index(config) if config in CONFIGS else 99, budget

    for (config, budget, protocol, length), rs in sorted(groups.items(), key=lambda kv: order(kv[0])):
        acc = [r["accuracy"] for r in rs]
        out.append({"config": config, "budget": budget, "protocol": protocol, "length": length,
                    "models": len(rs), "accuracy": float(np.mean(acc)), "accuracy_std": float(np.std(acc)),
                    "agreement": float(np.mean([r.get("agreement", 1.0) for r in rs])),
                    "keep_ratio": float(np.mean([r["keep_ratio"] for r in rs])), "n": sum(r["n"] for r in rs)})
    return out


def targets(data: dict[str, Any]) -> list[str]:
    """The issue's targets on the longest clips, for each protocol: MEDA at 0.2 keeps >= 97% of the
    full cache's accuracy, and MEDA is at least as accurate as the best uniform baseline at each budget."""
    rows = summary_table(data)
    if not rows:
        return []
    longest = max(r["length"] for r in rows)
    lines = []
    for protocol in sorted({r["protocol"] for r in rows}):
        cell = {(r["config"], r["budget"]): r for r in rows if r["protocol"] == protocol and r["length"] == longest}
        full = cell.get(("full", 1.0))
        meda02 = cell.get(("meda", 0.2))
        if full and meda02:
            ratio = meda02["accuracy"] / full["accuracy"] if full["accuracy"] else float("nan")
            lines.append(f"- {protocol}: MEDA at 0.2 on {longest}-frame clips keeps {ratio:.1%} of full-cache "
                         f"accuracy ({meda02['accuracy']:.3f} vs {full['accuracy']:.3f}; target >= 97%): "
                         f"{'met' if ratio >= 0.97 else 'NOT met'}")
        for budget in sorted({b for (_, b) in cell if b < 1.0}):
            best = max((cell[(c, budget)] for c in UNIFORM_BASELINES if (c, budget) in cell),
                       key=lambda r: r["accuracy"], default=None)
            m = cell.get(("meda", budget))
            if best and m:
                ok = m["accuracy"] >= best["accuracy"] - 1e-9
                lines.append(f"- {protocol}, budget {budget}: MEDA {m['accuracy']:.3f} vs best uniform baseline "
                             f"{best['config']} {best['accuracy']:.3f}: "
                             f"{'at least as accurate' if ok else 'LESS accurate'}")
    return lines


def plots(data: dict[str, Any], img_dir: Path) -> list[Path]:
    """PNG plots: accuracy vs budget per method (one panel per protocol and clip length, error bars =
    std over models), and per-layer keep-ratios and entropies of the entropy-allocated methods."""
    plt = common.pyplot()

    rows = summary_table(data)
    if not rows:
        return []
    img_dir.mkdir(parents=True, exist_ok=True)
    made = []
    protocols = sorted({r["protocol"] for r in rows})
    lengths = sorted({r["length"] for r in rows})
    pooled = pooled_table(data)
    panels = ["all", *lengths] if len(lengths) > 1 else lengths
    fig, axes = plt.subplots(len(protocols), len(panels), figsize=(4.2 * len(panels), 3.6 * len(protocols)),
                             squeeze=False, sharey=True)
    styles = {"streamingllm": "c-v", "h2o": "y-d", "snapkv": "b-s", "pyramidkv": "g-p", "lookm": "m-x",
              "meda": "r-o", "meda-code": "r--^", "meda-nomerge": "r:.", "meda-noprior": "r-.", "meda-exact": "r--*", "meda-pivot": "r-s",
              "meda-t0.5": "k--o", "meda-t0.25": "k:o"}
    for i, protocol in enumerate(protocols):
        for j, length in enumerate(panels):
            ax = axes[i][j]
            sel = [r for r in (pooled if length == "all" else rows)
                   if r["protocol"] == protocol and r["length"] == length]
            full = next((r for r in sel if r["config"] == "full"), None)
            if full:
                ax.axhline(full["accuracy"], color="k", lw=1, label="full cache")
            for config, style in styles.items():
                pts = sorted((r["budget"], r["accuracy"], r["accuracy_std"]) for r in sel if r["config"] == config)
                if pts:
                    ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], fmt=style,
                                ms=4, lw=1, capsize=2, label=config)
            ax.set_xscale("log")
            ticks = sorted({r["budget"] for r in sel if r["config"] != "full"})
            ax.set_xticks(ticks, [f"{b:g}" for b in ticks])
            ax.minorticks_off()
            ax.set_title(f"{protocol}, " + ("all lengths pooled" if length == "all" else f"{length} frames"),
                         fontsize=10)
            ax.set_xlabel("KV budget (kept fraction)")
            if j == 0:
                ax.set_ylabel("exact-match accuracy")
            ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="lower right")
    made.append(common.save_figure(fig, img_dir / "quality_accuracy_vs_budget.png"))

    # per-layer allocation at budget 0.2 on the longest clips, mean over models
    longest = max(lengths)
    recs = [r for r in data["records"] if r["length"] == longest and r["budget"] == 0.2]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.6))
    for config, style in (("meda", "r-o"), ("meda-code", "r--^"), ("pyramidkv", "g-p"), ("snapkv", "b-s")):
        for protocol, alpha in (("aware", 1.0), ("agnostic", 0.5)):
            rs = [r for r in recs if r["config"] == config and r["protocol"] == protocol]
            if not rs:
                continue
            ratios = np.mean([r["layer_ratios"] for r in rs], axis=0)
            ax1.plot(range(len(ratios)), ratios, style, alpha=alpha, label=f"{config} ({protocol})")
            ents = [r["layer_entropies"] for r in rs if r.get("layer_entropies")]
            if ents:
                ax2.plot(range(len(ents[0])), np.mean(ents, axis=0), style, alpha=alpha, label=f"{config} ({protocol})")
    ax1.set_title(f"per-layer keep-ratio, budget 0.2, {longest} frames", fontsize=10)
    ax2.set_title("per-layer entropy (nats)", fontsize=10)
    for ax in (ax1, ax2):
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.set_xlabel("layer")
        ax.grid(alpha=0.3)
    ax1.legend(fontsize=7)
    made.append(common.save_figure(fig, img_dir / "quality_layer_budgets.png"))
    return made


def pooled_table(data: dict[str, Any]) -> list[dict[str, Any]]:
    """Accuracy and agreement per (config, budget, protocol) over all clip lengths (each model's records
    averaged over the lengths, which hold equally many questions), then mean and std over the models."""
    per_model: dict[tuple, list[dict[str, Any]]] = {}
    for r in data["records"]:
        per_model.setdefault((r["config"], r["budget"], r["protocol"], r["model"]), []).append(r)
    groups: dict[tuple, list[tuple[float, float, int]]] = {}
    for (config, budget, protocol, _), rs in per_model.items():
        groups.setdefault((config, budget, protocol), []).append(
            (float(np.mean([r["accuracy"] for r in rs])), float(np.mean([r.get("agreement", 1.0) for r in rs])),
             sum(r["n"] for r in rs)))
    return [{"config": c, "budget": b, "protocol": p, "length": "all", "models": len(v),
             "accuracy": float(np.mean([x[0] for x in v])), "accuracy_std": float(np.std([x[0] for x in v])),
             "agreement": float(np.mean([x[1] for x in v])), "n": sum(x[2] for x in v)}
            for (c, b, p), v in groups.items()]


def _grid(sel: list[dict[str, Any]], cell) -> str:
    """A method x budget Markdown table of ``cell(record)``; the full cache is repeated across budgets."""
    budgets = sorted({r["budget"] for r in sel if r["config"] != "full"})
    table = []
    for c in [c for c in CONFIGS if any(r["config"] == c for r in sel)]:
        cells = []
        for b in ([1.0] if c == "full" else budgets):
            r = next((x for x in sel if x["config"] == c and x["budget"] == b), None)
            cells.append("-" if r is None else cell(r))
        table.append([c, *(cells * len(budgets) if c == "full" else cells)])
    return common.md_table(["method", *[str(b) for b in budgets]], table)


def to_markdown(data: dict[str, Any]) -> str:
    rows = summary_table(data)
    lines = ["# quality", "", common.runs_markdown(data), ""]
    acc = lambda r: f"{r['accuracy']:.3f} ± {r['accuracy_std']:.3f}"  # noqa: E731
    pooled = pooled_table(data)
    for protocol in sorted({r["protocol"] for r in rows}):
        lengths = sorted({r["length"] for r in rows if r["protocol"] == protocol})
        sel = [r for r in pooled if r["protocol"] == protocol]
        n_models = max(r["models"] for r in sel)
        lines += [f"## {protocol}, all clip lengths ({', '.join(map(str, lengths))} frames) pooled: accuracy, "
                  f"mean ± std over {n_models} model(s), {max(r['n'] for r in sel)} answers per cell", "",
                  _grid(sel, acc), ""]
        lines += [f"## {protocol}, all clip lengths pooled: agreement with the full-cache answer", "",
                  _grid(sel, lambda r: f"{r['agreement']:.3f}"), ""]
        for length in lengths:
            sel = [r for r in rows if r["protocol"] == protocol and r["length"] == length]
            lines += [f"## {protocol}, {length}-frame clips (accuracy, mean ± std over models, "
                      f"{max(r['n'] for r in sel)} answers per cell)", "", _grid(sel, acc), ""]
    t = targets(data)
    if t:
        lines += ["## Targets (longest clips)", "", *t, ""]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())

