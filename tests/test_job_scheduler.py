"""The annotation actor on the continuous-batching scheduler (issue 11, item 3), driven in-process.

The actor streams every Ray batch's requests into one `EngineLoop` per method; several batches run on
one actor at once. Its answers must equal the static path's (each Ray batch one engine call), token
for token, a request that can never fit the KV cap must become its own error row, and the rows carry
the actor's scheduler figures.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

import media_factory as mf
from pipeline.batch.config import AnnotateConfig
from pipeline.batch.stages import Annotator, Preprocess, decode_media
from tiny_models import build_checkpoint


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return build_checkpoint("qwen2_vl", tmp_path_factory.mktemp("ckpt") / "qwen2_vl")


def through_arrow(batch: dict) -> dict[str, np.ndarray]:
    """A stage's output batch as the next stage receives it from Ray Data (an Arrow block, tensor columns)."""
    from ray.data.block import BlockAccessor

    return BlockAccessor.for_block(BlockAccessor.batch_to_block(batch)).to_batch_format("numpy")


@pytest.fixture(scope="module")
def batches(tmp_path_factory, checkpoint) -> list[dict[str, np.ndarray]]:
    """Two Ray batches as the model actor receives them (decoded, then prepared by the CPU stage):
    clips of different lengths, each clip with the main method and the full-cache baseline, plus
    prompts of different lengths."""
    d = tmp_path_factory.mktemp("media")
    out = []
    for b in range(2):
        tasks = []
        for i in range(3):
            path = d / f"b{b}c{i}.mp4"
            path.write_bytes(mf.make_video(n_frames=8 + 4 * i + 2 * b, width=64 + 16 * i, height=48))
            for method in ("meda", "full"):
                tasks.append({"row_id": f"b{b}c{i}:{method}", "clip_id": f"b{b}c{i}", "uri": str(path), "kind": "",
                              "prompt": "what is shown ?" + " and then" * (i + b), "expected_answer": None,
                              "method": method, "sample_fps": 0.0, "sample_frames": 4 + 2 * i})
        cols = {k: np.array([t[k] for t in tasks], dtype=object) for k in tasks[0]}
        out.append(decode_media(cols, storage_options={}, max_frames=64, max_pixels=None, timeout_s=60))
    prepare = Preprocess(config(checkpoint))
    return [through_arrow(prepare(through_arrow(b))) for b in out]


def config(checkpoint: Path, **kw) -> dict:
    base = dict(input="unused", output="unused", model=str(checkpoint), method="meda", budget=0.3, baseline="full",
                max_new_tokens=7, device="cpu", dtype="float32", cpus_per_actor=1.0, max_num_seqs=4)
    base.update(kw)
    return vars(AnnotateConfig(**base))


def answers(table) -> dict[str, tuple[str, str, int]]:
    rows = table.to_pylist()
    return {r["row_id"]: (r["status"], r["text"], r["n_generated_tokens"]) for r in rows}


def test_continuous_answers_equal_the_static_path_token_for_token(checkpoint, batches):
    static = Annotator(config(checkpoint, batching="static"), "run", "v")
    cont = Annotator(config(checkpoint, batching="continuous"), "run", "v")
    assert not static.loops and set(cont.loops) == {"meda", "full"}
    expected = {k: v for b in batches for k, v in answers(static(b)).items()}
    assert all(v[0] == "ok" for v in expected.values()), expected
    # both batches at once on one actor, as Ray Data's concurrent calls run them
    results: dict[int, object] = {}
    threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, cont(batches[i]))) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    got = {k: v for i in range(2) for k, v in answers(results[i]).items()}
    assert got == expected
    rows = [r for i in range(2) for r in results[i].to_pylist()]
    stats = cont.engine_stats()
    assert stats["admitted"] == stats["finished"] == len(rows)
    assert all(r["engine_kv_cap_bytes"] == stats["kv_cache_memory_bytes"] for r in rows)
    assert all(1 <= r["engine_peak_running"] <= 4 and r["engine_preemptions"] == 0 for r in rows)
    assert all(r["time_per_output_token_s"] and r["time_per_output_token_s"] > 0 for r in rows)
    for loop in cont.loops.values():
        loop.shutdown()


def test_a_request_that_can_never_fit_the_cap_is_its_own_error_row(checkpoint, batches):
    # a cap that holds the short text-free prompts of no row: every row is refused alone, nothing hangs
    cont = Annotator(config(checkpoint, kv_cache_memory_bytes=4096), "run", "v")
    rows = cont(batches[0]).to_pylist()
    assert all(r["status"] == "error" and r["error_stage"] == "generate" for r in rows)
    assert all("RequestTooLarge" in r["error"] for r in rows), rows[0]["error"]
    for loop in cont.loops.values():
        loop.shutdown()


def test_the_kv_cap_is_shared_by_the_methods_loops(checkpoint):
    cont = Annotator(config(checkpoint, kv_cache_memory_bytes=64 * 2**20), "run", "v")
    assert {m: loop.scheduler.kv_cache_memory_bytes for m, loop in cont.loops.items()} == \
        {"meda": 32 * 2**20, "full": 32 * 2**20}
    only = Annotator(config(checkpoint, baseline="none", kv_cache_memory_bytes=64 * 2**20), "run", "v")
    assert {m: loop.scheduler.kv_cache_memory_bytes for m, loop in only.loops.items()} == {"meda": 64 * 2**20}
    for a in (cont, only):
        for loop in a.loops.values():
            loop.shutdown()


def test_the_job_on_the_scheduler_end_to_end(ray_local, checkpoint, tmp_path):
    """Through Ray Data: several batches in flight on one actor, every row answered once, the
    engine's figures in the summary, and three separate stages: decode tasks, the CPU preprocessing
    pool, the model actors (nothing fused into another)."""
    from pipeline.annotate import read_rows, run

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(5):
        (corpus / f"v{i}.mp4").write_bytes(mf.make_video(n_frames=8 + 2 * i, width=64, height=48))
    out = tmp_path / "run"
    summary = run(AnnotateConfig(input=str(corpus), output=str(out), model=str(checkpoint), method="meda", budget=0.3,
                                 baseline="full", baseline_sample=-1, frames=4, max_new_tokens=5, batch_size=2,
                                 device="cpu", dtype="float32", progress=False, cpus_per_actor=1, max_num_seqs=3,
                                 batches_in_flight=3))
    df = read_rows(str(out))
    assert len(df) == 10 and df.row_id.is_unique and (df.status == "ok").all()
    assert summary["engine"]["preemptions"] == 0 and 1 <= summary["engine"]["peak_running"] <= 3
    assert summary["engine"]["peak_kv_bytes"] <= summary["engine"]["kv_cap_bytes"]
    stats = summary["ray_data_stats"]
    ops = operators(stats)
    assert any(op.endswith("MapBatches(decode_media)") for op in ops), ops  # (the read may fuse into it)
    assert "MapBatches(Preprocess)" in ops and "MapBatches(Annotator)" in ops, ops


def operators(stats: str) -> list[str]:
    """The operator names of Ray Data's stats ("Operator 3 MapBatches(Preprocess): 4 tasks ..."); a fused
    operator is named "A->B"."""
    return [line.split(" ", 2)[2].split(":")[0] for line in stats.splitlines()
            if line.startswith("Operator ") and line.split(" ", 2)[1].isdigit()]
