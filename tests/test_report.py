"""`meda report` and the job summary agree on decode speed (median time per output token over the rows
that ran a decode step; speed-ups paired by TPOT), and the plots are readable (y labels, integer layer
ticks, a KV legend that covers no bar). Built from a small synthetic rows table: no Ray, no model."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import pytest  # noqa: E402

from meda_engine.cli import decode_text  # noqa: E402
from meda_engine.request import Telemetry  # noqa: E402
from pipeline import report  # noqa: E402
from pipeline.batch.config import AnnotateConfig  # noqa: E402
from pipeline.batch.layout import RunLayout  # noqa: E402
from pipeline.batch.results import format_summary, read_rows, summarize  # noqa: E402
from pipeline.schema import empty_row, to_table  # noqa: E402

N_LAYERS = 12
# Per clip: (full: tokens, tpot), (meda: tokens, tpot). Most answers are one token (no decode step:
# tpot 0, decode_tokens_per_s 0), the decoded ones have different lengths per method.
CLIPS = {
    "c0": ((1, 0.0), (1, 0.0)),
    "c1": ((1, 0.0), (1, 0.0)),
    "c2": ((1, 0.0), (1, 0.0)),
    "c3": ((1, 0.0), (9, 0.010)),  # only meda decoded: not a decode pair
    "c4": ((2, 0.020), (12, 0.011)),
    "c5": ((3, 0.024), (8, 0.012)),
    "c6": ((2, 0.022), (10, 0.010)),
}


def _row(clip: str, method: str, n_gen: int, tpot: float) -> dict:
    keep = 1.0 if method == "full" else 0.2
    budgets = [int(100 * keep * (0.5 + i / N_LAYERS)) for i in range(N_LAYERS)] if method == "meda" else [100] * N_LAYERS
    t = Telemetry(
        method=method, budget=keep, entropy_variant=None, n_prompt_tokens=100, n_text_tokens=20, n_visual_tokens=80,
        n_frames=4, n_generated_tokens=n_gen, kv_bytes_full=4 << 20, kv_bytes_kept=int((4 << 20) * keep),
        kv_keep_ratio=keep, kv_bytes_allocated=int((4 << 20) * keep), layer_budgets=budgets, layer_entropies=None,
        prefill_s=0.05 + 0.01 * int(clip[1:]), compress_s=0.001, decode_s=tpot * (n_gen - 1 if tpot else 0),
        decode_tokens_per_s=1 / tpot if tpot else 0.0, peak_mem_bytes=1, peak_mem_kind="rss_hwm", batch_size=2,
        device="cpu", dtype="float32", time_to_first_token_s=0.06, time_per_output_token_s=tpot,
    )
    row = empty_row(row_id=f"{clip}:{method}", clip_id=clip, uri=f"file:///{clip}.mp4", kind="video", prompt="q",
                    status="ok", model="m", run_id="r", text="red" if n_gen == 1 else "x" * n_gen,
                    created_at=dt.datetime.now(dt.timezone.utc), decode_media_s=0.01, **t.to_dict())
    return row


@pytest.fixture()
def run_dir(tmp_path):
    rows = [_row(c, m, *spec) for c, specs in CLIPS.items() for m, spec in zip(("full", "meda"), specs)]
    rows.append(empty_row(row_id="bad:meda", clip_id="bad", method="meda", status="error", error_stage="decode",
                          error="ValueError: corrupt", created_at=dt.datetime.now(dt.timezone.utc), decode_media_s=0.0))
    out = tmp_path / "run"
    (Path(RunLayout(str(out)).rows)).mkdir(parents=True)
    pq.write_table(to_table(rows), Path(RunLayout(str(out)).rows) / "part-0.parquet")
    return str(out)


def _expected_tps(method: str) -> float:
    idx = 0 if method == "full" else 1
    tpots = [specs[idx][1] for specs in CLIPS.values() if specs[idx][1] > 0]
    return 1 / float(np.median(tpots))


def test_report_and_summary_agree_on_decode_speed(run_dir):
    md = Path(report.make_report(run_dir)).read_text()
    table = {r["method"]: r for r in report.method_table(read_rows(run_dir))}
    cfg = AnnotateConfig(output=run_dir, method="meda", baseline="full")
    s = summarize(cfg, {"run_id": "r", "n_inputs": 8, "n_pending": 15, "code_version": "v"}, 1.0, "")
    for m in ("full", "meda"):
        want = _expected_tps(m)
        assert table[m]["decode_tokens_per_s"] == pytest.approx(want)
        assert s["methods"][m]["decode_tokens_per_s"] == pytest.approx(want)
        assert f"| {want:.1f} |" in md  # not the 0.0 that a median over 1-token rows gives
    assert "| 0.0 |" not in md
    # Paired by TPOT over the 3 clips where both decoded: median(full) / median(meda) = 0.022 / 0.011.
    vs = s["vs_baseline"]
    assert vs["n_decode_pairs"] == 3 and vs["decode_speedup"] == pytest.approx(0.022 / 0.011)
    text = format_summary(s)
    assert "decode speed-up 2.00x" in text and "meda vs full: decode speed-up 2.00x" in md
    for m in ("full", "meda"):
        assert f"{s['methods'][m]['decode_tokens_per_s']:.1f}" in text


def test_summing_decode_seconds_would_not_give_this_speedup(run_dir):
    """The old definition (total decode seconds, answers of different lengths) reads below 1x here."""
    df = read_rows(run_dir)
    ok = df[df.status == "ok"].set_index(["clip_id", "method"]).decode_s.unstack()
    assert ok["full"].sum() / ok["meda"].sum() < 0.5


def test_generate_printout_has_no_zero_speed():
    base = _row("c4", "meda", 1, 0.0)
    fields = {k: base[k] for k in Telemetry.__dataclass_fields__}
    one = Telemetry(**fields)
    assert "n/a" in decode_text(one) and "0.0 tok/s" not in decode_text(one) and "TTFT 0.060s" in decode_text(one)
    fields.update(n_generated_tokens=5, time_per_output_token_s=0.02, decode_tokens_per_s=50.0)
    assert "20.0 ms/token (50.0 tok/s)" in decode_text(Telemetry(**fields))


def _overlaps(legend, patches, fig) -> list:
    fig.canvas.draw()
    box = legend.get_window_extent(fig.canvas.get_renderer())
    return [p for p in patches if p.get_height() > 0 and box.overlaps(p.get_window_extent())]


def test_plots_are_labelled_and_the_legend_covers_no_bar(run_dir):
    df = read_rows(run_dir)
    table = report.method_table(df)
    methods = [r["method"] for r in table]
    ok = df[df.status == "ok"]

    fig = report.plot_kv(table)
    ax = fig.axes[1]
    assert ax.get_legend() is not None and _overlaps(ax.get_legend(), ax.patches, fig) == []
    # The check can fail: a legend put on the bars is caught.
    bad = ax.legend(loc="center left", bbox_to_anchor=(0.0, 0.5))
    assert _overlaps(bad, ax.patches, fig)
    plt.close(fig)

    fig = report.plot_latency(ok, methods)
    assert all(a.get_ylabel() for a in fig.axes) and all(a.get_xlabel() for a in fig.axes)
    assert sum(len(a.patches) for a in fig.axes[1:]) > 0  # the decode histogram has the decoded rows
    plt.close(fig)

    fig = report.plot_layer_budgets(ok, methods)
    fig.canvas.draw()
    ax = fig.axes[0]
    ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
    assert ticks and all(float(t).is_integer() for t in ticks) and min(ticks) >= 0 and max(ticks) <= N_LAYERS - 1
    assert ax.get_xlabel() == "layer"
    plt.close(fig)
