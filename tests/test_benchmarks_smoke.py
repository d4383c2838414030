"""Each benchmark suite in a tiny configuration (tiny model, short contexts, 1-2 steps): the JSON has the
expected fields and sane values. The real runs are documented in docs/benchmarks.md.

The kvpress half of the peers suite needs its own environment (pip installs torch + kvpress +
transformers<5.3, minutes); here the suite is pointed at an empty cache with pip given no package
source, and the test checks that it records and prints exactly why kvpress did not run.
"""

from __future__ import annotations

import argparse
import json
import math

import pytest

from benchmarks import SUITES, add_bench_parser, run_suite

pytestmark = pytest.mark.bench

COMMON = ["--model", "tiny", "--bandwidth-mib", "16", "--fresh"]


def _load(out, suite):
    data = json.loads((out / f"{suite}.json").read_text())
    assert data["suite"] == suite
    assert (out / f"{suite}.md").read_text().startswith(f"# {suite}")
    run = data["runs"][-1]
    m = run["machine"]
    for key in ("cpu_model", "logical_cores", "threads", "torch", "transformers", "date"):
        assert m[key], key
    assert m["threads"] == 1 and m["torch_num_threads"] == 1
    assert run["command"].startswith(f"python -m benchmarks.{suite}") and "--model tiny" in run["command"]
    bw = m["bandwidth_bytes_per_s"]
    assert all(bw[k] > 1e8 for k in ("read", "copy", "gemv_fp32", "gemv_bf16"))
    return data


def _pos(x):
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_cli_registers_bench():
    parser = argparse.ArgumentParser(prog="meda")
    add_bench_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["bench", "decode", "--contexts", "2k", "--steps", "3"])
    assert args.suite == "decode" and args.suite_args == ["--contexts", "2k", "--steps", "3"]
    assert callable(args.func)
    assert set(SUITES) >= {"decode", "fixed_memory", "prefill", "peers"}


def test_decode(tmp_path):
    assert run_suite("decode", COMMON + [
        "--out-dir", str(tmp_path), "--contexts", "256", "--batches", "1,2", "--dtypes", "fp32,bf16",
        "--methods", "full,snapkv,meda,meda_fixed", "--budgets", "0.2", "--steps", "2", "--warmup", "1",
        "--profile-tokens", "64"]) == 0
    data = _load(tmp_path, "decode")
    recs = data["records"]
    assert len(recs) == 2 * 2 * 5  # dtypes x batches x (full, full@rL, snapkv, meda, meda_fixed)
    assert data["runs"][-1]["meda_profile"]["entropy_variant"] == "code"
    for r in recs:
        assert len(r["step_times_s"]) == 2 and _pos(r["ms_per_step"]) and _pos(r["tokens_per_s"])
        assert r["kv_bytes_allocated"] >= r["kv_bytes_held"] > 0
        assert _pos(r["bound_s"]) and r["bound_speedup"] >= 1.0
        if r["method"] in ("snapkv", "meda", "meda_fixed"):
            assert abs(r["kv_keep_ratio_bytes"] - 0.2) < 0.01
            assert _pos(r["speedup_vs_full"]) and _pos(r["t_over_full_rL"]) and r["bound_speedup"] > 1.0
        if r["method"] == "meda_fixed":
            assert max(r["cache_tokens_per_layer"]) > min(r["cache_tokens_per_layer"])
    full = [r for r in recs if r["method"] == "full" and r["dtype"] == "fp32"]
    assert {r["batch"] for r in full} == {1, 2}
    b1, b2 = sorted(full, key=lambda r: r["batch"])
    assert b2["kv_bytes_held"] == 2 * b1["kv_bytes_held"]
    # 2 layers x K,V x 2 KV heads x 16 dims x 256 tokens x 4 bytes
    assert b1["kv_bytes_held"] == 2 * 2 * 2 * 16 * 256 * 4


def test_fixed_memory(tmp_path):
    assert run_suite("fixed_memory", COMMON + [
        "--out-dir", str(tmp_path), "--context", "256", "--cap-gib", str(1 / 1024), "--steps", "2", "--warmup", "1",
        "--profile-tokens", "64"]) == 0
    recs = {r["method"]: r for r in _load(tmp_path, "fixed_memory")["records"]}
    assert set(recs) == {"full", "meda"}
    for r in recs.values():
        assert r["batch"] >= 1 and r["fits"] and r["next_exceeds"]
        assert r["allocated_bytes"] <= r["cap_bytes"] < r["allocated_bytes_batch_plus_1"]
        assert _pos(r["tokens_per_s"]) and len(r["step_times_s"]) == 2
    assert recs["meda"]["batch"] > 3 * recs["full"]["batch"]
    assert recs["meda"]["batch_vs_full"] == recs["meda"]["batch"] / recs["full"]["batch"]


def test_prefill(tmp_path):
    assert run_suite("prefill", COMMON + ["--out-dir", str(tmp_path), "--contexts", "128", "--repeats", "2"]) == 0
    recs = {r["method"]: r for r in _load(tmp_path, "prefill")["records"]}
    assert set(recs) == {"full", "meda"}
    for r in recs.values():
        assert len(r["calls"]) == 2 and r["context"] == 128
        assert _pos(r["median_prefill_s"]) and r["median_compress_s"] >= 0 and _pos(r["median_peak_mem_bytes"])
    assert recs["full"]["kv_keep_ratio"] == 1.0
    assert abs(recs["meda"]["kv_keep_ratio"] - 0.2) < 0.02
    assert _pos(recs["meda"]["total_s_vs_full"]) and _pos(recs["meda"]["peak_mem_bytes_vs_full"])


def test_peers_and_report(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("MEDA_BENCH_CACHE", str(cache))
    monkeypatch.setenv("PIP_CONFIG_FILE", "/dev/null")  # no find-links, no extra index ...
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # ... and no index: pip cannot find kvpress
    out = tmp_path / "results"
    assert run_suite("peers", COMMON + [
        "--out-dir", str(out), "--contexts", "256", "--dtypes", "fp32", "--budgets", "0.2", "--steps", "2",
        "--warmup", "1", "--generate-context", "32", "--generate-tokens", "2", "--agreement-model", "tiny",
        "--agreement-context", "200", "--agreement-tokens", "4"]) == 0
    data = _load(out, "peers")
    err = data["runs"][-1]["kvpress"]["error"]
    assert "pip install" in err and "kvpress" in err
    assert "did not run" in (out / "peers.md").read_text()
    dec = {r["method"]: r for r in data["records"] if r["kind"] == "decode" and r["context"] == 256}
    assert set(dec) == {"ours_full", "hf_full"}
    assert _pos(dec["hf_full"]["ours_speedup"]) and dec["ours_full"]["ours_speedup"] == 1.0
    gen = [r for r in data["records"] if r["kind"] == "hf_generate"]
    assert len(gen) == 1 and _pos(gen[0]["forward_step_ms"]) and len(gen[0]["generate_1_s"]) == 3
    side = {r["method"] for r in data["records"] if r["kind"] == "kvpress_side"}
    assert side == {"ours_full", "ours_snapkv", "ours_pyramidkv"}

    docs = tmp_path / "docs"
    assert run_suite("report", ["--results-dir", str(out), "--docs", str(docs / "benchmarks.md")]) == 0
    text = (docs / "benchmarks.md").read_text()
    assert "peers" in text and "python -m benchmarks.peers" in text


def test_quality(tmp_path):
    """The committed needle-s0 model on 4-frame clips, 2 configs, both protocols; plots written."""
    out, img = tmp_path / "results", tmp_path / "img"
    assert run_suite("quality", [
        "--models", "models/needle-s0", "--configs", "full,meda", "--budgets", "0.2", "--lengths", "4",
        "--per-cell", "1", "--protocols", "aware,agnostic", "--out-dir", str(out), "--plots-dir", str(img),
        "--fresh"]) == 0
    data = json.loads((out / "quality.json").read_text())
    recs = {(r["config"], r["protocol"]): r for r in data["records"]}
    assert set(recs) == {(c, p) for c in ("full", "meda") for p in ("aware", "agnostic")}
    for (config, protocol), r in recs.items():
        assert r["n"] == 8 and r["length"] == 4 and 0 <= r["accuracy"] <= 1 and r["model"] == "needle-s0"
        assert r["keep_ratio"] == pytest.approx(1.0 if config == "full" else 0.2, abs=0.05)
        assert len(r["layer_ratios"]) == 4
    assert recs[("meda", "aware")]["layer_entropies"] and 0 <= recs[("meda", "aware")]["agreement"] <= 1
    md = (out / "quality.md").read_text()
    assert "## aware, 4-frame clips" in md and "## Targets (longest clips)" in md
    assert {p.name for p in img.iterdir()} == {"quality_accuracy_vs_budget.png", "quality_layer_budgets.png"}
    (out / "quality.md").unlink()
    assert run_suite("quality", ["--render-only", "--out-dir", str(out)]) == 0
    assert (out / "quality.md").read_text() == md


def test_serve_load(tmp_path):
    """Both apps (engine loop and the former @serve.batch replica) on a local Ray, 2 streaming clients over
    real HTTP, the tiny model: every request answered with max_tokens tokens, the same text on both sides."""
    assert run_suite("serve_load", ["--model", "tiny", "--clients", "2", "--requests-per-client", "1",
                                    "--min-tokens", "3", "--max-tokens", "5", "--out-dir", str(tmp_path),
                                    "--fresh"]) == 0
    data = json.loads((tmp_path / "serve_load.json").read_text())
    assert (tmp_path / "serve_load.md").read_text().startswith("# serve_load")
    assert data["runs"][-1]["command"].startswith("python -m benchmarks.serve_load")
    recs = {r["side"]: r for r in data["records"]}
    assert set(recs) == {"new", "old"}
    for r in recs.values():
        assert r["requests_ok"] == r["requests_planned"] == 2 and r["n_errors"] == 0
        assert r["all_reached_max_tokens"] and r["usage_equals_content_chunks"]
        assert 3 * 2 <= r["completion_tokens"] <= 5 * 2 and _pos(r["tokens_per_s"]) and _pos(r["ttft_p50_s"])
        assert r["ttft_p50_s"] <= r["latency_p50_s"] and len(r["requests"]) == 2
        assert r["same_text_as_other_side"] == 1.0
        assert _pos(r["ttft_p50_new_over_old"]) and _pos(r["tokens_per_s_new_over_old"])


def test_planning(tmp_path):
    """The planning suite's plan case on a small manifest: a record with seconds, peak RSS and the task count."""
    assert run_suite("planning", ["--entries", "300", "--cases", "plan", "--no-resume", "--out-dir", str(tmp_path),
                                  "--fresh", "--label", "smoke"]) == 0
    data = json.loads((tmp_path / "planning.json").read_text())
    assert (tmp_path / "planning.md").read_text().startswith("# planning")
    (rec,) = data["records"]
    assert rec["case"] == "plan" and rec["state"] == "fresh" and rec["n_inputs"] == 300
    assert rec["n_pending"] == 300 + 32 and _pos(rec["seconds"]) and rec["peak_rss_bytes"] > 0


def test_pipeline_batching(tmp_path):
    """The job's continuous vs static batching on a tiny random VLM: both runs answer every clip with the
    same tokens, and the record has the ratio."""
    assert run_suite("pipeline", ["--experiment", "batching", "--checkpoint", "random:tiny", "--clips", "4",
                                  "--clip-frames", "8", "--frames", "2", "--batch-size", "2", "--min-new-tokens", "2",
                                  "--max-new-tokens", "6", "--out-dir", str(tmp_path), "--fresh"]) == 0
    data = json.loads((tmp_path / "pipeline.json").read_text())
    (rec,) = data["records"]
    assert rec["experiment"] == "batching" and rec["same_tokens"]
    for mode in ("static", "continuous"):
        assert rec[mode]["rows"] == rec[mode]["ok"] == 4 and _pos(rec[mode]["clips_per_s"])
    assert rec["continuous"]["engine"]["preemptions"] == 0 and rec["static"]["engine"] is None
    assert _pos(rec["continuous_vs_static"])
    assert "## batching" in (tmp_path / "pipeline.md").read_text()
