"""`meda report RUN_DIR`: PNG plots and a Markdown summary of an annotation run's Parquet rows.

Writes into ``RUN_DIR/report/`` (or ``--out``): ``kv_by_method.png`` (keep-ratio and KV memory per
method), ``latency.png`` (prefill and per-token decode time distributions), ``layer_budgets.png``
(per-layer keep-ratio heatmap) and ``report.md``.
"""

from __future__ import annotations

import argparse
import io
from typing import Any

import numpy as np

from . import storage
from .batch.layout import join
from .batch.results import _paired_ratios, decode_speed, read_rows


def _save(fig, fs, path: str) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    with fs.open(path, "wb") as f:
        f.write(buf.getvalue())


def method_table(df) -> list[dict[str, Any]]:
    rows = []
    for method, g in df.groupby("method"):
        ok = g[g.status == "ok"]
        scored = ok[ok.expected_answer.notna()]
        rows.append({
            "method": method,
            "rows": len(g),
            "ok": len(ok),
            "error": int((g.status == "error").sum()),
            "accuracy": float(scored.correct.astype(bool).mean()) if len(scored) else None,
            "keep_ratio": float(ok.kv_keep_ratio.mean()) if len(ok) else None,
            "kv_mib_kept": float(ok.kv_bytes_kept.mean() / 2**20) if len(ok) else None,
            "kv_mib_full": float(ok.kv_bytes_full.mean() / 2**20) if len(ok) else None,
            "prefill_s": float(ok.prefill_s.median()) if len(ok) else None,
            **decode_speed(ok),  # tpot_s_median, decode_tokens_per_s (the job summary's definition)
        })
    return rows


def _fmt(v, spec: str) -> str:
    return "-" if v is None or (isinstance(v, float) and np.isnan(v)) else format(v, spec)


def plot_kv(table: list[dict[str, Any]]):
    """Keep-ratio and KV MiB per method; the legend sits above the bars' axes, never on a bar."""
    import matplotlib.pyplot as plt

    methods = [r["method"] for r in table]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    axes[0].bar(methods, [r["keep_ratio"] or 0 for r in table], color="tab:blue")
    axes[0].set_ylabel("KV keep-ratio (measured)")
    axes[0].set_ylim(0, 1.05)
    x = np.arange(len(methods))
    axes[1].bar(x - 0.2, [r["kv_mib_full"] or 0 for r in table], 0.4, label="full prompt KV")
    axes[1].bar(x + 0.2, [r["kv_mib_kept"] or 0 for r in table], 0.4, label="kept")
    axes[1].set_xticks(x, methods)
    axes[1].set_ylabel("MiB per input (mean)")
    axes[1].legend(loc="lower left", bbox_to_anchor=(0.0, 1.01), ncol=2, frameon=False, borderaxespad=0.0)
    fig.suptitle("KV cache by method", y=1.06)
    return fig


def plot_latency(ok, methods: list[str]):
    """Histograms of prefill seconds and of time per output token (rows that ran a decode step)."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    tpot_ms = (ok.time_per_output_token_s if "time_per_output_token_s" in ok else ok.prefill_s * np.nan) * 1000
    decoded = tpot_ms.notna() & (tpot_ms > 0)
    for a, values, keep in ((axes[0], ok.prefill_s, ok.prefill_s.notna()), (axes[1], tpot_ms, decoded)):
        if not keep.any():
            continue
        bins = np.histogram_bin_edges(values[keep].astype(float), bins=20)  # shared by the methods
        for m in methods:
            v = values[keep & (ok.method == m)]
            if len(v):
                a.hist(v, bins=bins, alpha=0.5, label=m)
    axes[0].set_xlabel("prefill s (per request)")
    axes[1].set_xlabel("time per output token, ms (rows with a decode step)")
    for a in axes:
        a.set_ylabel("requests")
        if a.get_legend_handles_labels()[0]:
            a.legend()
    fig.suptitle("Latency distribution")
    return fig


def plot_layer_budgets(ok, methods: list[str]):
    """Heatmap of the mean per-layer keep-ratio per method (layers as integer ticks), or None."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    comp = ok[ok.layer_budgets.notna() & (ok.n_prompt_tokens > 0)]
    heat_methods = [m for m in methods if len(comp[comp.method == m])]
    if not heat_methods:
        return None
    mat = np.stack([
        np.mean([np.asarray(b, float) / n for b, n in zip(g.layer_budgets, g.n_prompt_tokens)], axis=0)
        for g in (comp[comp.method == m] for m in heat_methods)
    ])
    fig, ax = plt.subplots(figsize=(10, 0.9 + 0.45 * len(heat_methods)))
    im = ax.imshow(mat, aspect="auto", cmap="viridis", vmin=0, vmax=1)
    ax.set_yticks(range(len(heat_methods)), heat_methods)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlim(-0.5, mat.shape[1] - 0.5)
    ax.set_xlabel("layer")
    fig.colorbar(im, ax=ax, label="mean keep-ratio")
    ax.set_title("Per-layer budgets")
    return fig


def make_report(run_dir: str, out: str | None = None, storage_options: dict | None = None) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    opts = storage_options or {}
    df = read_rows(run_dir, opts)
    if df.empty:
        raise ValueError(f"no result rows under {run_dir}/rows")
    out = out or join(run_dir, "report")
    fs, out_root = storage.filesystem_for(out, **opts)
    fs.makedirs(out_root, exist_ok=True)
    table = method_table(df)
    methods = [r["method"] for r in table]
    ok = df[df.status == "ok"]

    written = set()
    for name, fig in (("kv_by_method.png", plot_kv(table)), ("latency.png", plot_latency(ok, methods)),
                      ("layer_budgets.png", plot_layer_budgets(ok, methods))):
        if fig is not None:
            _save(fig, fs, join(out_root, name))
            plt.close(fig)
            written.add(name)

    lines = [f"# Run report: {run_dir}", "",
             f"{len(df)} rows, {int((df.status == 'ok').sum())} ok, {int((df.status == 'error').sum())} errors; "
             f"model `{df.model.dropna().iloc[0] if df.model.notna().any() else '?'}`; "
             f"run `{df.run_id.dropna().iloc[0] if df.run_id.notna().any() else '?'}`.", "",
             "| method | rows | ok | error | accuracy | KV keep-ratio | KV MiB kept / full | prefill s (median) "
             "| TPOT ms (median) | decode tok/s |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in table:
        lines.append(
            f"| {r['method']} | {r['rows']} | {r['ok']} | {r['error']} | {_fmt(r['accuracy'], '.1%')} | "
            f"{_fmt(r['keep_ratio'], '.1%')} | {_fmt(r['kv_mib_kept'], '.2f')} / {_fmt(r['kv_mib_full'], '.2f')} | "
            f"{_fmt(r['prefill_s'], '.3f')} | {_fmt(r['tpot_s_median'] and r['tpot_s_median'] * 1e3, '.1f')} | "
            f"{_fmt(r['decode_tokens_per_s'], '.1f')} |")
    lines += ["", "TPOT: time per output token (a request's decode seconds / the decode steps it ran), median "
              "over the rows that ran a decode step (n per method: "
              + ", ".join(f"{r['method']} {r['n_decoded']}" for r in table) + "); decode tok/s = 1 / TPOT."]
    if "full" in methods:
        for m in (m for m in methods if m != "full"):
            vs = _paired_ratios(df, m, "full")
            if vs.get("decode_speedup"):
                lines.append(f"{m} vs full: decode speed-up {vs['decode_speedup']:.2f}x (median TPOT of full / of "
                             f"{m}, over the {vs['n_decode_pairs']} inputs where both ran a decode step).")
    errors = df[df.status == "error"]
    if len(errors):
        lines += ["", "## Errors", "", "| stage | reason | count |", "|---|---|---|"]
        reasons = errors.assign(reason=errors.error.str.slice(0, 90)).groupby(["error_stage", "reason"]).size()
        for (stage, reason), n in reasons.sort_values(ascending=False).head(15).items():
            lines.append(f"| {stage} | {reason.replace('|', '/')} | {n} |")
    lines += ["", "![KV by method](kv_by_method.png)", "", "![Latency](latency.png)"]
    if "layer_budgets.png" in written:
        lines += ["", "![Per-layer budgets](layer_budgets.png)"]
    md_path = join(out_root, "report.md")
    with fs.open(md_path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return md_path


def add_report_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("report", help="plots and a Markdown summary of an annotation run")
    p.add_argument("run_dir", help="the --output of a `meda annotate` run (local or s3://)")
    p.add_argument("--out", default=None, help="where to write (default RUN_DIR/report)")
    p.add_argument("--endpoint-url", default=None)
    p.set_defaults(func=_cli)
    return p


def _cli(args: argparse.Namespace) -> int:
    opts = {"endpoint_url": args.endpoint_url} if args.endpoint_url else {}
    path = make_report(args.run_dir, args.out, opts)
    print(path)
    return 0

