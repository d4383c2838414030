"""Preprocessing in a CPU stage (issue 13, item 2).

Tokenisation, the chat template and resize + patchify run in the job's ``Preprocess`` stage (a CPU
actor pool) with the checkpoint's tokenizer and processor settings only; the model actor gets the
prepared arrays as Arrow tensor columns and only makes the engine's requests of them. The answers
must equal those of the old path (frames to the actor, `Engine.prepare` inside it), a row that cannot
be prepared must be its own error row, and the stage must be an operator of its own.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import media_factory as mf
from meda_engine import ConfigError, ContextLengthError, Request, Video
from pipeline.batch import stages
from pipeline.batch.config import AnnotateConfig, add_annotate_args, config_from_args
from pipeline.batch.stages import Annotator, Preprocess, decode_media
from test_job_scheduler import operators, through_arrow
from tiny_models import build_checkpoint

COMPARED = ("status", "error_stage", "text", "n_generated_tokens", "n_prompt_tokens", "n_visual_tokens", "n_frames",
            "kv_bytes_full", "kv_bytes_kept", "layer_budgets", "layer_entropies", "finish_reason", "kind")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return build_checkpoint("qwen2_vl", tmp_path_factory.mktemp("ckpt") / "qwen2_vl")


@pytest.fixture(scope="module")
def decoded(tmp_path_factory) -> dict[str, np.ndarray]:
    """One decoded Ray batch (as Ray hands it on): videos of different sizes, each with the main method
    and the baseline, an image, a corrupt file, and a prompt far too long for the model's context."""
    d = tmp_path_factory.mktemp("media")
    tasks = []

    def task(name, uri, prompt="what is shown ?", method="meda", frames=4):
        tasks.append({"row_id": f"{name}:{method}", "clip_id": name, "uri": str(uri), "kind": "", "prompt": prompt,
                      "expected_answer": None, "method": method, "sample_fps": 0.0, "sample_frames": frames})

    for i in range(2):
        path = d / f"c{i}.mp4"
        path.write_bytes(mf.make_video(n_frames=8 + 4 * i, width=64 + 32 * i, height=48))
        for method in ("meda", "full"):
            task(f"c{i}", path, "what is shown ?" + " and then" * i, method, frames=4 + 2 * i)
    image = d / "x.png"
    image.write_bytes(mf.make_image(80, 60, "PNG"))
    task("x", image, "what colour ?")
    bad = d / "bad.mp4"
    bad.write_bytes(b"not a video")
    task("bad", bad)
    task("long", d / "c0.mp4", "describe the video " * 1500)  # > the tiny model's 4096-token context
    cols = {k: np.array([t[k] for t in tasks], dtype=object) for k in tasks[0]}
    return through_arrow(decode_media(cols, storage_options={}, max_frames=64, max_pixels=None, timeout_s=60))


def config(checkpoint: Path, **kw) -> dict:
    base = dict(input="unused", output="unused", model=str(checkpoint), method="meda", budget=0.3, baseline="full",
                max_new_tokens=6, device="cpu", dtype="float32", cpus_per_actor=1.0, max_num_seqs=4)
    base.update(kw)
    return vars(AnnotateConfig(**base))


def by_row(table) -> dict[str, dict]:
    return {r["row_id"]: {k: r[k] for k in COMPARED} for r in table.to_pylist()}


def annotate(cfg: dict, batch) -> dict[str, dict]:
    actor = Annotator(cfg, "run", "v")
    try:
        return by_row(actor(batch))
    finally:
        for loop in actor.loops.values():
            loop.shutdown()


@pytest.fixture(scope="module")
def old_path(checkpoint, decoded) -> dict[str, dict]:
    """The rows of the old path: frames to the model actor, `Engine.prepare` inside it."""
    return annotate(config(checkpoint, preprocess="in-actor"), decoded)


def test_the_cpu_stage_gives_the_old_paths_answers(checkpoint, decoded, old_path):
    cfg = config(checkpoint)
    prepared = through_arrow(Preprocess(cfg)(decoded))
    assert "frames" not in prepared  # the pixels travel once, patchified, not as frames too
    assert prepared["prep_pixel_values_videos"][0].dtype == np.float32  # tensor columns, not bytes
    new = annotate(cfg, prepared)
    assert set(new) == set(old_path) and sum(r["status"] == "ok" for r in new.values()) == 5
    assert new == old_path


def test_the_comparison_sees_a_preprocessing_bug(checkpoint, decoded, old_path, monkeypatch):
    """The equality above can fail: pixel rows shipped out of order change the answers' statistics."""
    cfg = config(checkpoint)
    real = stages.encode_host

    def shuffled(host):
        cells = real(host)
        cells["prep_pixel_values_videos"] = cells["prep_pixel_values_videos"][::-1].copy()
        return cells

    monkeypatch.setattr(stages, "encode_host", shuffled)
    new = annotate(cfg, through_arrow(Preprocess(cfg)(decoded)))
    assert new != old_path


def test_a_row_that_cannot_be_prepared_is_its_own_error_row(checkpoint, decoded):
    out = Preprocess(config(checkpoint))(decoded)
    by_id = dict(zip(out["row_id"], zip(out["error_stage"], out["error"])))
    assert by_id["long:meda"][0] == "prepare" and "ContextLengthError" in by_id["long:meda"][1]
    assert "context" in by_id["long:meda"][1]
    assert by_id["bad:meda"][0] == "decode"  # an earlier stage's error row passes through unchanged
    assert all(stage is None for rid, (stage, _) in by_id.items() if rid not in ("long:meda", "bad:meda"))
    # the error row reaches the model actor as an error row: nothing is prepared or generated for it
    rows = annotate(config(checkpoint), through_arrow(out))
    assert rows["long:meda"]["status"] == "error" and rows["long:meda"]["error_stage"] == "prepare"
    assert rows["c0:meda"]["status"] == "ok" and rows["x:meda"]["status"] == "ok"


def test_the_prepared_arrays_are_what_the_engine_prepares(checkpoint):
    """The CPU half alone (no weights) + `from_host` == `Engine.prepare`; the host form is numpy only."""
    from meda_engine.engine import Engine, HostPrompt, Preprocessor

    engine = Engine.from_pretrained(str(checkpoint), device="cpu", dtype="float32")
    pre = Preprocessor.from_pretrained(str(checkpoint))
    frames = np.random.default_rng(0).integers(0, 255, (6, 48, 64, 3), dtype=np.uint8)
    req = Request(prompt="what is shown ?", video=Video(frames, 2.0), images=[frames[0]])
    host = pre.preprocess(req)
    assert isinstance(host, HostPrompt) and isinstance(host.input_ids, np.ndarray)
    assert all(isinstance(v, np.ndarray) for v in host.vision.values())
    a, b = engine.prepare(req).prompt, engine.from_host(req, host).prompt
    assert a.input_ids.tolist() == b.input_ids.tolist() and a.modality.tolist() == b.modality.tolist()
    assert set(a.vision) == set(b.vision) == {"pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw"}
    assert all(bool((a.vision[k] == b.vision[k]).all()) for k in a.vision)
    assert (a.n_context, a.n_frames, a.extra) == (b.n_context, b.n_frames, b.extra)
    # through the job's columns (read-only arrays, as Arrow hands them) and back
    cells = through_arrow({k: [v] for k, v in stages.encode_host(host).items()})
    back = stages.decode_host(cells, 0, HostPrompt)
    c = engine.from_host(req, back).prompt
    assert c.input_ids.tolist() == a.input_ids.tolist() and all(bool((c.vision[k] == a.vision[k]).all()) for k in a.vision)
    # a prompt prepared for another model family, or with token ids outside the vocabulary, is refused
    with pytest.raises(ConfigError, match="prepared for a"):
        engine.from_host(req, HostPrompt(**{**vars(host), "family": "qwen3_vl"}))
    with pytest.raises(ConfigError, match="vocabulary"):
        engine.from_host(req, HostPrompt(**{**vars(host), "input_ids": host.input_ids + 10**6}))
    with pytest.raises(ContextLengthError):
        pre.preprocess(Request(prompt="what " * 5000))


def test_the_fake_engine_runs_both_paths(decoded):
    cfg = dict(input="unused", output="unused", engine="fake", baseline="full", cpus_per_actor=0.5)
    old = annotate(vars(AnnotateConfig(**cfg, preprocess="in-actor")), decoded)
    new = annotate(vars(AnnotateConfig(**cfg)), through_arrow(Preprocess(vars(AnnotateConfig(**cfg)))(decoded)))
    assert new == old and new["c1:meda"]["text"].endswith("| 6 frames")


@pytest.mark.parametrize("flags, message", [
    (["--preprocess", "gpu"], "invalid choice"),
    (["--preprocess-workers", "0"], "--preprocess-workers: must be >= 1"),
    (["--preprocess-workers", "3", "--max-preprocess-workers", "2"], "--max-preprocess-workers: must be >= "),
    (["--cpus-per-preprocess-worker", "-1"], "--cpus-per-preprocess-worker: must be >= 0"),
])
def test_bad_preprocessing_flags_are_refused_with_the_flag(flags, message):
    import argparse

    p = argparse.ArgumentParser()
    add_annotate_args(p)
    p.error = lambda m: (_ for _ in ()).throw(ValueError(m))
    with pytest.raises(ValueError, match=message):
        config_from_args(p.parse_args(flags))


def test_the_flags_set_the_pool(ray_local, tmp_path, monkeypatch):
    """Through Ray Data (fake engine): the stage is an operator of its own between decode and the model
    actors, its pool is sized by the flags, and --preprocess in-actor removes it with the same rows."""
    import ray.data

    from pipeline.annotate import read_rows, run

    pools = []
    real = ray.data.ActorPoolStrategy
    monkeypatch.setattr(ray.data, "ActorPoolStrategy", lambda **kw: pools.append(kw) or real(**kw))
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(4):
        (corpus / f"v{i}.mp4").write_bytes(mf.make_video(n_frames=8, width=64, height=48))
    (corpus / "y.png").write_bytes(mf.make_image(80, 60, "PNG"))
    rows = {}
    for mode in ("cpu-stage", "in-actor"):
        out = tmp_path / mode
        summary = run(AnnotateConfig(input=str(corpus), output=str(out), engine="fake", baseline="none", frames=4,
                                     batch_size=2, progress=False, cpus_per_actor=0.5, preprocess=mode,
                                     preprocess_workers=1, max_preprocess_workers=2,
                                     cpus_per_preprocess_worker=0.5))
        ops = operators(summary["ray_data_stats"])
        assert ("MapBatches(Preprocess)" in ops) == (mode == "cpu-stage"), ops
        assert "MapBatches(Annotator)" in ops, ops
        df = read_rows(str(out))
        rows[mode] = sorted(zip(df.clip_id, df.status, df.text, df.n_frames))
    assert rows["cpu-stage"] == rows["in-actor"] and len(rows["cpu-stage"]) == 5
    assert all(status == "ok" for _, status, _, _ in rows["cpu-stage"])
    # cpu-stage: the preprocessing pool (1..2, autoscaling), then the model actors'; in-actor: theirs only
    assert [(kw["min_size"], kw["max_size"]) for kw in pools] == [(1, 2), (1, 1), (1, 1)]
