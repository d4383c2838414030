"""`meda annotate`'s front door: every mistake is one line on stderr, exit status 2, before Ray starts.

The CLI cases run the real command in a subprocess with TMPDIR / RAY_TMPDIR pointed at a fresh directory,
and check the status, the single line (naming the flag), the time taken, that no Ray session directory
appeared and that no run.json (or output directory) was written.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from meda_engine import ConfigError
from meda_engine.cli_args import add_compression_args, compression_from_args
from pipeline.batch import preflight as pf
from pipeline.batch.config import DEFAULT_INPUT, DEFAULT_MODEL, AnnotateConfig, add_annotate_args, config_from_args

REPO = Path(__file__).resolve().parent.parent
TIME_LIMIT_S = 6.0  # well under Ray start-up or a model load (10+ s); generous for a loaded 2-core machine


def meda(*argv: str, tmp: Path, cwd: Path = REPO, timeout: float = 60) -> tuple[subprocess.CompletedProcess, float]:
    env = dict(os.environ, TMPDIR=str(tmp), RAY_TMPDIR=str(tmp), PYTHONPATH=str(REPO))
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", *argv], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)
    return proc, time.perf_counter() - t0


@pytest.fixture
def sandbox(tmp_path):
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    (tmp_path / "a-file").write_text("not a directory\n")
    return tmp_path


BAD_FLAGS = {
    "budget-zero": (["--budget", "0"], "--budget", ["(0, 1]"]),
    "budget-1.5": (["--budget", "1.5"], "--budget", ["(0, 1]", "--budget-tokens"]),
    "window-negative": (["--window", "-1"], "--window", [">= 0"]),
    "frames-zero": (["--frames", "0"], "--frames", [">= 1"]),
    "baseline-misspelt": (["--baseline", "fulll"], "--baseline", ["fulll"]),
    "budget-tokens-zero": (["--budget-tokens", "0"], "--budget-tokens", [">= 1"]),
    "budget-tokens-text": (["--budget-tokens", "lots"], "--budget-tokens", ["whole number"]),
    "max-actors-below-num": (["--num-actors", "2", "--max-actors", "1"], "--max-actors", ["--num-actors"]),
    "decode-timeout-zero": (["--decode-timeout", "0"], "--decode-timeout", ["> 0"]),
    "device-unknown": (["--device", "gpu0"], "--device", ["cuda"]),
    "model-missing": (["--model", "models/nope"], "--model", [str(REPO / "models" / "nope")]),
    "model-bare-name": (["--model", "nope"], "--model", ["owner/name"]),
    "input-missing": (["--input", "{tmp}/no-such-corpus"], "--input", ["no-such-corpus"]),
    "output-is-a-file": (["--output", "{tmp}/a-file"], "--output", ["existing file"]),
}


@pytest.mark.parametrize("case", sorted(BAD_FLAGS))
def test_bad_flag_is_one_line_exit_2_before_ray(case, sandbox):
    argv, flag, words = BAD_FLAGS[case]
    argv = [a.replace("{tmp}", str(sandbox)) for a in argv]
    out = sandbox / "out"
    if "--output" not in argv:
        argv += ["--output", str(out)]
    proc, wall = meda("annotate", *argv, tmp=sandbox / "tmp")
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len(lines) == 1, proc.stderr[-2000:]
    assert lines[0].startswith("meda annotate: error: "), lines[0]
    assert flag in lines[0] and all(w in lines[0] for w in words), lines[0]
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    assert wall < TIME_LIMIT_S, f"{case} took {wall:.2f} s"
    assert not out.exists(), "a failed check wrote the output directory"
    assert not list(sandbox.rglob("run.json"))
    assert not [p for p in (sandbox / "tmp").iterdir() if "ray" in p.name.lower()], list((sandbox / "tmp").iterdir())


def test_budget_message_says_what_is_allowed():
    with pytest.raises(ConfigError, match=r"--budget: budget must be a fraction in \(0, 1\].*--budget-tokens"):
        AnnotateConfig(budget=64)


def test_meda_help_is_fast(sandbox):
    proc, wall = meda("--help", tmp=sandbox / "tmp")
    assert proc.returncode == 0 and "annotate" in proc.stdout
    assert wall < 1.5, f"meda --help took {wall:.2f} s"
    proc, wall = meda("annotate", "--no-such-flag", tmp=sandbox / "tmp")
    assert proc.returncode == 2 and wall < 1.5
    assert proc.stderr.strip().splitlines() == [
        "meda annotate: error: unrecognized arguments: --no-such-flag (see meda annotate --help)"]


def test_annotate_help_shows_defaults(sandbox):
    proc, _ = meda("annotate", "--help", tmp=sandbox / "tmp")
    assert proc.returncode == 0
    text = " ".join(proc.stdout.split())
    for snippet in ("(default: 16)", "(default: full)", "(default: 64)", "(default: 120.0)", "(default 0.2)"):
        assert snippet in text, snippet
    assert "(default 0.2) (default" not in text  # a default is said once
    assert "(default: None)" not in text


def test_config_and_preflight_import_no_torch_or_ray():
    code = ("import sys, pipeline.batch.config, pipeline.batch.preflight, pipeline.cli; "
            "bad = [m for m in ('torch', 'ray', 'pyarrow') if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=60)


# ---------------------------------------------------------------------------------------------------------
# Configuration: one validated CompressionConfig, built as `meda generate` / `meda serve` build it


def _annotate_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_annotate_args(p)
    return p.parse_args(argv)


@pytest.mark.parametrize("argv", [
    [],
    ["--method", "snapkv", "--budget", "0.3", "--window", "8"],
    ["--budget-tokens", "64", "--score-queries", "0", "--merge", "pivot", "--merge-keys"],
    ["--entropy", "code", "--keep-all-text", "--temperature-entropy", "0.5"],
])
def test_job_compression_is_the_generate_serve_config(argv):
    p = argparse.ArgumentParser()
    add_compression_args(p)
    expected = compression_from_args(p.parse_known_args(argv)[0])
    cfg = config_from_args(_annotate_args(argv))
    assert cfg.compression_for(cfg.method) == expected
    # what each actor rebuilds (stages.Annotator: AnnotateConfig(**asdict(cfg)), then the same construction)
    again = AnnotateConfig(**dataclasses.asdict(cfg))
    assert again == cfg and again.compression_for(again.method) == expected
    from meda_engine import CompressionConfig

    assert CompressionConfig(method=cfg.method, budget=cfg.budget, **cfg.compression) == expected
    assert cfg.compression_for("full") == CompressionConfig(method="full")


@pytest.mark.parametrize("kwargs, flag", [
    (dict(budget=0), "--budget"), (dict(method="medaa"), "--method"), (dict(baseline="snap"), "--baseline"),
    (dict(compression={"window": -1}), "--window"), (dict(compression={"budget_tokens": 0}), "--budget-tokens"),
    (dict(compression={"windw": 3}), "unknown compression setting"), (dict(frames=0), "--frames"),
    (dict(frames=2.0), "--frames"), (dict(fps=0.0), "--fps"), (dict(max_frames=0), "--max-frames"),
    (dict(max_new_tokens=0), "--max-new-tokens"), (dict(batch_size=0), "--batch-size"),
    (dict(num_actors=0), "--num-actors"), (dict(num_actors=3, max_actors=2), "--max-actors"),
    (dict(gpus_per_actor=-1), "--gpus-per-actor"), (dict(cpus_per_actor=-0.5), "--cpus-per-actor"),
    (dict(decode_timeout_s=0), "--decode-timeout"), (dict(limit=0), "--limit"), (dict(dtype="fp8"), "--dtype"),
    (dict(device="cuda:x"), "--device"), (dict(baseline_sample=-2), "--baseline-sample"),
    (dict(run_id="a/b"), "--run-id"), (dict(compression={"method": "full"}), "AnnotateConfig.method"),
])
def test_python_config_is_validated_too(kwargs, flag):
    with pytest.raises(ConfigError, match=flag.replace("(", r"\(")):
        AnnotateConfig(**kwargs)


def test_good_values_pass_and_normalise():
    cfg = AnnotateConfig(budget=1, gpus_per_actor=1, fps=2, baseline="none", device="cuda:1", dtype="bf16",
                         num_actors=2, max_actors=2, limit=1, compression={"budget_tokens": 32})
    assert cfg.budget == 1.0 and isinstance(cfg.gpus_per_actor, float) and cfg.fps == 2.0
    assert cfg.compression["budget_tokens"] == 32 and cfg.compression["window"] == 16


# ---------------------------------------------------------------------------------------------------------
# Preflight: model, input, output on the driver


def test_relative_paths_resolve_on_the_driver(tmp_path, monkeypatch):
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "config.json").write_text("{}")
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "a.png").write_bytes(b"\x89PNG")
    monkeypatch.chdir(tmp_path)
    assert pf.resolve_model("ckpt") == str(tmp_path / "ckpt")
    assert pf.resolve_model("./ckpt/") == str(tmp_path / "ckpt")
    assert pf.resolve_model("ckpt/missing") == str(tmp_path / "ckpt" / "missing")  # ./ckpt exists: local
    assert pf.resolve_model("Qwen/Qwen2.5-VL-3B-Instruct") == "Qwen/Qwen2.5-VL-3B-Instruct"  # hub id
    assert pf.resolve_model("owner/repo/q4.gguf") == "owner/repo/q4.gguf"
    assert pf.resolve_model("s3://bucket/ckpt/") == "s3://bucket/ckpt/"
    assert pf.resolve_local("file://" + str(tmp_path / "x")) == str(tmp_path / "x")
    cfg = pf.preflight(AnnotateConfig(model="ckpt", input="corpus", output="runs/r1"))
    assert (cfg.model, cfg.input, cfg.output) == (str(tmp_path / "ckpt"), str(tmp_path / "corpus"),
                                                  str(tmp_path / "runs" / "r1"))
    assert not (tmp_path / "runs").exists()  # preflight writes nothing


def test_default_model_and_input_pass(tmp_path):
    cfg = pf.preflight(AnnotateConfig(output=str(tmp_path / "out")))
    assert cfg.model == DEFAULT_MODEL and cfg.input == DEFAULT_INPUT


def _expect(match: str, **kw):
    with pytest.raises(pf.PreflightError, match=match) as info:
        pf.preflight(AnnotateConfig(**kw))
    assert "\n" not in str(info.value)
    return str(info.value)


def test_model_checks(tmp_path):
    out = str(tmp_path / "out")
    empty = tmp_path / "empty"
    empty.mkdir()
    _expect("--model: .*no config.json and no .gguf", model=str(empty), output=out)
    bad_json = tmp_path / "bad-json"
    bad_json.mkdir()
    (bad_json / "config.json").write_text("{not json")
    _expect("--model: .*config.json is not readable JSON", model=str(bad_json), output=out)
    (tmp_path / "weights.bin").write_bytes(b"x")
    _expect("--model: .*not a .gguf", model=str(tmp_path / "weights.bin"), output=out)
    (tmp_path / "fake.gguf").write_bytes(b"PK\x03\x04")
    _expect("--model: .*not a GGUF file", model=str(tmp_path / "fake.gguf"), output=out)
    (tmp_path / "real.gguf").write_bytes(b"GGUF\x03\x00\x00\x00")
    assert pf.preflight(AnnotateConfig(model=str(tmp_path / "real.gguf"), output=out)).model.endswith("real.gguf")
    two = tmp_path / "two"
    two.mkdir()
    for name in ("a.gguf", "b.gguf"):
        (two / name).write_bytes(b"GGUF")
    _expect("--model: .*several .gguf files", model=str(two), output=out)
    # the stand-in engine loads no model: not checked
    pf.preflight(AnnotateConfig(model=str(empty), engine="fake", output=out))


def test_input_and_output_checks(tmp_path):
    (tmp_path / "empty-dir").mkdir()
    _expect("--input: no media files under", input=str(tmp_path / "empty-dir"), output=str(tmp_path / "o"))
    (tmp_path / "m.jsonl").write_text("")
    _expect("--input: the manifest .* is empty", input=str(tmp_path / "m.jsonl"), output=str(tmp_path / "o"))
    (tmp_path / "notes.txt").write_text("x")
    _expect("--input: .*neither a manifest", input=str(tmp_path / "notes.txt"), output=str(tmp_path / "o"))
    (tmp_path / "file").write_text("x")
    _expect("--output: .*is an existing file", output=str(tmp_path / "file"))
    _expect("--output: cannot create .*is a file", output=str(tmp_path / "file" / "run"))


def test_failed_preflight_in_run_writes_nothing(tmp_path):
    from pipeline.batch.job import run

    out = tmp_path / "out"
    with pytest.raises(pf.PreflightError, match="--model"):
        run(AnnotateConfig(model=str(tmp_path / "missing"), output=str(out)))
    assert not out.exists()


def test_s3_checks_name_the_bucket(s3_endpoint, s3_bucket, tmp_path):
    import boto3

    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    s3.put_object(Bucket=s3_bucket, Key="videos/a.mp4", Body=b"x")
    s3.put_object(Bucket=s3_bucket, Key="ckpt/config.json", Body=b"{}")
    s3.put_object(Bucket=s3_bucket, Key="weights/model.bin", Body=b"x")
    s3.put_object(Bucket=s3_bucket, Key="runs/taken", Body=b"x")
    base = dict(endpoint_url=s3_endpoint, output=str(tmp_path / "o"))
    cfg = pf.preflight(AnnotateConfig(model=f"s3://{s3_bucket}/ckpt/", input=f"s3://{s3_bucket}/videos/",
                                      **{**base, "output": f"s3://{s3_bucket}/runs/r1/"}))
    assert cfg.input == f"s3://{s3_bucket}/videos/"  # URLs unchanged
    msg = _expect("--input: bucket 'no-such-bucket-x1' .* does not exist", input="s3://no-such-bucket-x1/videos/",
                  **base)
    assert "s3://no-such-bucket-x1/videos/" in msg
    _expect(f"--input: nothing at s3://{s3_bucket}/nothing/", input=f"s3://{s3_bucket}/nothing/", **base)
    _expect("--model: bucket 'no-such-bucket-x2'", model="s3://no-such-bucket-x2/ckpt", **base)
    _expect("--model: .*holds no config.json and no .gguf", model=f"s3://{s3_bucket}/weights/", **base)
    _expect("--output: bucket 'no-such-bucket-x3'", **{**base, "output": "s3://no-such-bucket-x3/run/"})
    _expect("--output: .*is an existing object", **{**base, "output": f"s3://{s3_bucket}/runs/taken"})


def test_run_json_written_only_after_preflight(tmp_path):
    """The happy path still plans: preflight passes and plan_run writes run.json with the resolved paths."""
    from pipeline.batch.plan import plan_run

    cfg = pf.preflight(AnnotateConfig(output=str(tmp_path / "out"), engine="fake", limit=1))
    plan_run(cfg)
    info = json.loads((tmp_path / "out" / "run.json").read_text())
    assert info["config"]["output"] == str(tmp_path / "out") and os.path.isabs(info["config"]["model"])


def test_without_the_output_check_the_file_reaches_plan_run(tmp_path, monkeypatch):
    """The injected bug (no output check) lets an output that is a file through to plan_run, which fails
    with a FileExistsError traceback instead of a one-line PreflightError: the check is what stops it."""
    from pipeline.batch.job import run

    target = tmp_path / "file"
    target.write_text("x")
    cfg = AnnotateConfig(output=str(target), engine="fake", limit=1, progress=False)
    with pytest.raises(pf.PreflightError, match="--output"):
        run(cfg)
    monkeypatch.setattr(pf, "check_output", lambda url, opts: None)
    with pytest.raises(OSError) as info:
        run(cfg)
    assert not isinstance(info.value, pf.PreflightError)
