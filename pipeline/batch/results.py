"""Reading a run's rows back, and the run summary (counts, throughput, KV savings, ratios)."""

from __future__ import annotations

from typing import Any

from .. import storage
from ..schema import SCHEMA
from .config import AnnotateConfig
from .layout import RunLayout
from .plan import current_config_rows


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

    # Files written before a Telemetry field was added lack its column: null there.
    df = pa.concat_tables(tables, promote_options="default").to_pandas()
    df = df.sort_values("created_at").drop_duplicates("row_id", keep="last").reset_index(drop=True)
    return current_config_rows(df, output, storage_options)  # the run's current configuration only (plan.py)


def decode_speed(rows) -> dict[str, Any]:
    """The one definition of decode speed for a set of rows: time per output token (TPOT, the
    ``time_per_output_token_s`` column = a request's decode seconds / the decode steps it ran) over
    the rows that ran at least one decode step; a 1-token answer has none and is left out, not
    counted as 0 tok/s. ``decode_tokens_per_s`` is 1 / the median TPOT."""
    tpot = rows.time_per_output_token_s if "time_per_output_token_s" in rows else None
    decoded = tpot[tpot.notna() & (tpot > 0)] if tpot is not None else []
    if len(decoded) == 0:
        return {"n_decoded": 0, "tpot_s_median": None, "decode_tokens_per_s": None}
    med = float(decoded.median())
    return {"n_decoded": int(len(decoded)), "tpot_s_median": med, "decode_tokens_per_s": 1.0 / med}


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
            **decode_speed(ok),
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
        # directories (or S3 sub-prefixes) under the input that could not be listed: their files are not inputs
        "unreadable_dirs": int(info.get("n_unreadable_dirs") or 0),
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
    engine = _engine_figures(df)
    if engine:
        summary["engine"] = engine
    main_m, base_m = per_method.get(cfg.method), per_method.get(cfg.baseline)
    if main_m and base_m:
        paired = _paired_ratios(df, cfg.method, cfg.baseline)
        summary["vs_baseline"] = paired
    return summary


def _engine_figures(df) -> dict[str, Any]:
    """The model actors' schedulers over the run (continuous batching): the most rows one loop
    decoded together, the most KV bytes it held against its cap, preemptions. Empty without them."""
    if "engine_peak_running" not in df or df.engine_peak_running.isna().all():
        return {}
    seen = df[df.engine_peak_running.notna()]
    return {"peak_running": int(seen.engine_peak_running.max()),
            "peak_kv_bytes": int(seen.engine_peak_kv_bytes.max()),
            "kv_cap_bytes": int(seen.engine_kv_cap_bytes.max()),
            "preemptions": int(seen.engine_preemptions.max())}


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
        # Paired by time per output token, over the inputs where both answers ran a decode step:
        # total decode seconds would compare answers of different lengths.
        **_paired_decode(a, b),
        "agreement": float((a.text == b.text).mean()),
    }
    if a.expected_answer.notna().any():
        out["accuracy"] = float(a.correct.astype(bool).mean())
        out["accuracy_baseline"] = float(b.correct.astype(bool).mean())
    return out


def _paired_decode(a, b) -> dict[str, Any]:
    """Decode speed-up of ``a`` over ``b`` (rows indexed by the same clip ids): median TPOT of ``b`` /
    median TPOT of ``a``, on the clips where both ran a decode step."""
    ta, tb = a.time_per_output_token_s, b.time_per_output_token_s
    keep = ta.notna() & tb.notna() & (ta > 0) & (tb > 0)
    if not keep.any():
        return {"n_decode_pairs": 0, "decode_speedup": None}
    return {"n_decode_pairs": int(keep.sum()),
            "decode_speedup": float(tb[keep].median() / ta[keep].median())}


def format_summary(s: dict[str, Any]) -> str:
    lines = [f"\nrun {s['run_id']}  ->  {s['output']}",
             f"rows: {s['rows']} ({', '.join(f'{k} {v}' for k, v in sorted(s['status_counts'].items()))})"
             + (f"; errors by stage: {s['errors_by_stage']}" if s["errors_by_stage"] else ""),
             f"{'method':<14}{'rows':>6}{'ok':>6}{'err':>5}{'accuracy':>10}{'KV kept':>9}{'TPOT ms':>9}"
             f"{'decode tok/s':>14}"]
    for m, e in s["methods"].items():
        acc = f"{e['accuracy']:.1%}" if "accuracy" in e else "-"
        keep = f"{e['kv_keep_ratio_mean']:.1%}" if e["kv_keep_ratio_mean"] is not None else "-"
        tpot = f"{e['tpot_s_median'] * 1e3:.1f}" if e["tpot_s_median"] is not None else "-"
        tps = f"{e['decode_tokens_per_s']:.1f}" if e["decode_tokens_per_s"] is not None else "-"
        lines.append(f"{m:<14}{e['rows']:>6}{e['ok']:>6}{e['error']:>5}{acc:>10}{keep:>9}{tpot:>9}{tps:>14}")
    vs = s.get("vs_baseline")
    if vs and vs.get("n_pairs"):
        sp = (f"{vs['decode_speedup']:.2f}x (median TPOT, {vs['n_decode_pairs']} pairs that decoded)"
              if vs.get("decode_speedup") else "- (no pair ran a decode step)")
        lines.append(f"{s['method']} vs {s['baseline']} on {vs['n_pairs']} inputs: KV memory saved "
                     f"{vs['kv_memory_saved']:.1%}, decode speed-up {sp}, same answer {vs['agreement']:.1%}")
    lines.append("TPOT: time per output token, median over the rows that ran a decode step; "
                 "decode tok/s = 1 / TPOT")
    if s.get("engine"):
        e = s["engine"]
        lines.append(f"engine (per actor): up to {e['peak_running']} rows decoding together, KV peak "
                     f"{e['peak_kv_bytes'] / 2**20:.1f} MiB of a {e['kv_cap_bytes'] / 2**20:.0f} MiB cap, "
                     f"{e['preemptions']} preemptions")
    lines.append(f"wall {s['wall_s']:.1f}s for {s['rows_this_run']} new rows")
    return "\n".join(lines)

