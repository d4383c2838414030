"""Reading a run's rows back, and the run summary (counts, throughput, KV savings, ratios)."""

from __future__ import annotations

from typing import Any

from .. import storage
from ..schema import SCHEMA
from .config import AnnotateConfig
from .layout import RunLayout


def read_rows(output: str, storage_options: dict[str, Any] | None = None):
    """All result rows of a run as a pandas DataFrame, one per row_id (latest wins)."""
    import pandas as pd
    import pyarrow.parquet as pq

    fs, root = storage.filesystem_for(RunLayout(output).rows, **(storage_options or {}))
    tables = []
    if fs.exists(root):
        for path in sorted(p for p in fs.find(root) if p.endswith(".parquet")):
            with fs.open(path, "rb") as f:
                tables.append(pq.read_table(f))
    if not tables:
        return pd.DataFrame(columns=SCHEMA.names)
    import pyarrow as pa

    df = pa.concat_tables(tables).to_pandas()
    return df.sort_values("created_at").drop_duplicates("row_id", keep="last").reset_index(drop=True)


def summarize(cfg: AnnotateConfig, info: dict[str, Any], wall_s: float, stats_text: str) -> dict[str, Any]:
    df = read_rows(cfg.output, cfg.storage_options())
    per_method: dict[str, Any] = {}
    for method, g in df.groupby("method"):
        ok = g[g.status == "ok"]
        entry = {
            "rows": int(len(g)),
            "ok": int(len(ok)),
            "error": int((g.status == "error").sum()),
            "kv_keep_ratio_mean": float(ok.kv_keep_ratio.mean()) if len(ok) else None,
            "kv_bytes_full_total": int(ok.kv_bytes_full.sum()),
            "kv_bytes_kept_total": int(ok.kv_bytes_kept.sum()),
            "decode_tokens_per_s_mean": float(ok.decode_tokens_per_s.mean()) if len(ok) else None,
            "prefill_s_mean": float(ok.prefill_s.mean()) if len(ok) else None,
            "decode_media_s_mean": float(g.decode_media_s.mean()) if len(g) else None,
        }
        scored = ok[ok.expected_answer.notna()]
        if len(scored):
            entry["accuracy"] = float(scored.correct.astype(bool).mean())
            entry["n_scored"] = int(len(scored))
        per_method[str(method)] = entry
    errors = df[df.status == "error"]
    summary = {
        "run_id": info["run_id"],
        "output": cfg.output,
        "model": cfg.model,
        "method": cfg.method,
        "budget": cfg.budget,
        "baseline": cfg.baseline,
        "inputs": info["n_inputs"],
        "rows": int(len(df)),
        "status_counts": {str(k): int(v) for k, v in df.status.value_counts().items()},
        "errors_by_stage": {str(k): int(v) for k, v in errors.error_stage.value_counts().items()},
        "wall_s": wall_s,
        "rows_this_run": info["n_pending"],
        "rows_per_s_this_run": info["n_pending"] / wall_s if wall_s > 0 else None,
        "methods": per_method,
        "code_version": info["code_version"],
        "ray_data_stats": str(stats_text),
    }
    main_m, base_m = per_method.get(cfg.method), per_method.get(cfg.baseline)
    if main_m and base_m:
        paired = _paired_ratios(df, cfg.method, cfg.baseline)
        summary["vs_baseline"] = paired
    return summary


def _paired_ratios(df, method: str, baseline: str) -> dict[str, Any]:
    """KV and decode-speed ratios on the inputs that ran with both methods (side by side)."""
    ok = df[df.status == "ok"]
    a = ok[ok.method == method].set_index("clip_id")
    b = ok[ok.method == baseline].set_index("clip_id")
    both = a.index.intersection(b.index)
    if len(both) == 0:
        return {"n_pairs": 0}
    a, b = a.loc[both], b.loc[both]
    out = {
        "n_pairs": int(len(both)),
        "kv_bytes_ratio": float(a.kv_bytes_kept.sum() / max(1, b.kv_bytes_kept.sum())),
        "kv_memory_saved": float(1 - a.kv_bytes_kept.sum() / max(1, b.kv_bytes_kept.sum())),
        "decode_speedup": float(b.decode_s.sum() / a.decode_s.sum()) if a.decode_s.sum() > 0 else None,
        "agreement": float((a.text == b.text).mean()),
    }
    if a.expected_answer.notna().any():
        out["accuracy"] = float(a.correct.astype(bool).mean())
        out["accuracy_baseline"] = float(b.correct.astype(bool).mean())
    return out


def format_summary(s: dict[str, Any]) -> str:
    lines = [f"\nrun {s['run_id']}  ->  {s['output']}",
             f"rows: {s['rows']} ({', '.join(f'{k} {v}' for k, v in sorted(s['status_counts'].items()))})"
             + (f"; errors by stage: {s['errors_by_stage']}" if s["errors_by_stage"] else ""),
             f"{'method':<14}{'rows':>6}{'ok':>6}{'err':>5}{'accuracy':>10}{'KV kept':>9}{'decode tok/s':>14}"]
    for m, e in s["methods"].items():
        acc = f"{e['accuracy']:.1%}" if "accuracy" in e else "-"
        keep = f"{e['kv_keep_ratio_mean']:.1%}" if e["kv_keep_ratio_mean"] is not None else "-"
        tps = f"{e['decode_tokens_per_s_mean']:.1f}" if e["decode_tokens_per_s_mean"] is not None else "-"
        lines.append(f"{m:<14}{e['rows']:>6}{e['ok']:>6}{e['error']:>5}{acc:>10}{keep:>9}{tps:>14}")
    vs = s.get("vs_baseline")
    if vs and vs.get("n_pairs"):
        sp = f"{vs['decode_speedup']:.2f}x" if vs.get("decode_speedup") else "-"
        lines.append(f"{s['method']} vs {s['baseline']} on {vs['n_pairs']} inputs: KV memory saved "
                     f"{vs['kv_memory_saved']:.1%}, decode speed-up {sp}, same answer {vs['agreement']:.1%}")
    lines.append(f"wall {s['wall_s']:.1f}s for {s['rows_this_run']} new rows")
    return "\n".join(lines)

