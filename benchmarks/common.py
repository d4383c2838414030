"""What every suite shares: threads, machine facts, measured bandwidth, the models, timing, results files.

Everything reported is measured: KV bytes come from the cache tensors, times from ``perf_counter``
around the call, bandwidth from timed reads. Derived figures (ratios, bounds) are computed only from
numbers measured in the same run and are stored next to the raw measurements they come from.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import fcntl
import json
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

RESULTS_DIR = Path(__file__).with_name("results")
KiB, MiB, GiB = 2**10, 2**20, 2**30


# ---------------------------------------------------------------------------------------------------
# threads (must run before torch does any work)
# ---------------------------------------------------------------------------------------------------
def set_threads(n: int) -> None:
    """torch and OpenMP/MKL use ``n`` threads. With another process holding a core, 2 threads ran ~20x
    slower than 1 on this machine, so every suite defaults to 1 and records what it used."""
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(n)
    import torch

    torch.set_num_threads(n)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set (a second suite in one process)
        pass


def base_parser(suite: str, description: str) -> argparse.ArgumentParser:
    prog = os.environ.get("MEDA_BENCH_ENTRY") or f"python -m benchmarks.{suite}"
    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument("--threads", type=int, default=1, help="torch/OpenMP threads (default 1)")
    p.add_argument("--out-dir", type=Path, default=RESULTS_DIR, help="where <suite>.json/.md go")
    p.add_argument("--fresh", action="store_true",
                   help="discard earlier records in the JSON (default: records of this run replace earlier "
                        "ones with the same key, others are kept, so a long matrix can be run in parts)")
    p.add_argument("--model", default="qwen2-0.5b", choices=sorted(MODEL_SHAPES),
                   help="model shape (random weights); 'tiny' is for smoke tests")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bandwidth-mib", type=int, default=512, help="buffer size of the bandwidth measurement")
    return p


def int_list(text: str) -> list[int]:
    out = []
    for part in text.split(","):
        part = part.strip().lower()
        if not part:
            continue
        mult = 1
        if part.endswith("k"):
            part, mult = part[:-1], 1024
        out.append(int(float(part) * mult))
    return out


def float_list(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def str_list(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


# ---------------------------------------------------------------------------------------------------
# machine facts
# ---------------------------------------------------------------------------------------------------
def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _cpu_flags() -> list[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = line.split(":", 1)[1].split()
                return [f for f in flags if f.startswith(("avx", "amx", "fma"))]
    except OSError:
        pass
    return []


def _mem_total() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def measure_bandwidth(threads: int, size_bytes: int = 512 * MiB, repeats: int = 7) -> dict[str, float]:
    """Measured memory bandwidth in bytes/s (best of ``repeats``, with the given threads):

    * ``read``: streaming read, ``x.sum()`` over a ``size_bytes`` fp32 tensor (far larger than cache);
    * ``copy``: ``dst.copy_(src)`` (counted as read + write);
    * ``gemv_fp32`` / ``gemv_bf16``: a matrix-vector product over a weight matrix of ``size_bytes``, the
      access pattern of batch-1 decode (bytes of the matrix / time).
    """
    import torch

    out: dict[str, float] = {"threads": threads, "size_bytes": size_bytes}
    n = size_bytes // 4
    x = torch.randn(n)
    y = torch.empty_like(x)

    def best(fn: Callable[[], Any]) -> float:
        fn()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return min(times)

    out["read"] = size_bytes / best(lambda: x.sum())
    out["copy"] = 2 * size_bytes / best(lambda: y.copy_(x))
    del y
    cols = 4096
    w32 = x.view(-1, cols)
    v32 = torch.randn(cols)
    out["gemv_fp32"] = size_bytes / best(lambda: torch.mv(w32, v32))
    w16 = x[: n // 2].view(-1, cols).to(torch.bfloat16)
    v16 = v32.to(torch.bfloat16)
    del x, w32
    out["gemv_bf16"] = w16.numel() * 2 / best(lambda: torch.mv(w16, v16))
    return out


def machine_info(threads: int, *, bandwidth: bool = True, bandwidth_mib: int = 512) -> dict[str, Any]:
    import torch
    import transformers

    info: dict[str, Any] = {
        "cpu_model": _cpu_model(),
        "cpu_flags": _cpu_flags(),
        "logical_cores": os.cpu_count(),
        "threads": threads,
        "torch_num_threads": torch.get_num_threads(),
        "mem_total_bytes": _mem_total(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "load_average_at_start": load_average(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    if bandwidth:
        info["bandwidth_bytes_per_s"] = measure_bandwidth(threads, size_bytes=bandwidth_mib * MiB)
    return info


def command_line(suite: str, argv: list[str] | None) -> str:
    """The exact command that ran (as typed, for either entry point)."""
    entry = os.environ.get("MEDA_BENCH_ENTRY")
    args = sys.argv[1:] if argv is None else argv
    head = entry or f"python -m benchmarks.{suite}"
    return " ".join([head, *map(shlex.quote, args)])


# ---------------------------------------------------------------------------------------------------
# models
# ---------------------------------------------------------------------------------------------------
MODEL_SHAPES: dict[str, dict[str, Any]] = {
    # Qwen2-0.5B: 494 M parameters with the 152k vocabulary, tied embeddings.
    "qwen2-0.5b": dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                       intermediate_size=4864, vocab_size=151936, tie_word_embeddings=True,
                       max_position_embeddings=131072, rope_theta=1_000_000.0, rms_norm_eps=1e-6),
    # For smoke tests and the output-agreement check: same architecture, tiny.
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=128, vocab_size=512, tie_word_embeddings=True,
                 max_position_embeddings=131072, rope_theta=1_000_000.0, rms_norm_eps=1e-6),
    "small": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2,
                  intermediate_size=512, vocab_size=512, tie_word_embeddings=True,
                  max_position_embeddings=131072, rope_theta=1_000_000.0, rms_norm_eps=1e-6),
}

WORDS = (
    "the a an of in on and then frame video image describe circle square triangle star red green blue "
    "yellow white black how many which after before first last one two three four what colour shape is "
    "left right top bottom moves stays large small"
).split()


def word_tokenizer():
    from meda_engine.models.word_tokenizer import build_word_tokenizer

    return build_word_tokenizer(WORDS)


def qwen2_config(shape: str, tokenizer=None):
    from transformers import Qwen2Config

    kw = dict(MODEL_SHAPES[shape])
    if tokenizer is not None:
        kw.update(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                  bos_token_id=tokenizer.pad_token_id)
        kw["vocab_size"] = max(kw["vocab_size"], len(tokenizer))
    return Qwen2Config(**kw)


def build_model(shape: str, dtype, *, seed: int = 0, init_std: float | None = None, attn: str = "sdpa"):
    """A randomly initialised ``Qwen2ForCausalLM`` of the given shape, and the word tokenizer."""
    import torch
    from transformers import Qwen2ForCausalLM

    tok = word_tokenizer()
    config = qwen2_config(shape, tok)
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM._from_config(config, attn_implementation=attn, dtype=torch.float32).eval()
    if init_std is not None:
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() >= 2:
                    p.normal_(0.0, init_std)
    model = model.to(dtype)
    return model, tok


def weight_bytes(model) -> int:
    """Bytes of the distinct parameter tensors (tied embeddings counted once): what one decode step
    reads (the LM head reads the whole tied embedding matrix)."""
    seen, total = set(), 0
    for p in model.parameters():
        key = p.untyped_storage().data_ptr()
        if key in seen:
            continue
        seen.add(key)
        total += p.numel() * p.element_size()
    return total


def parse_dtype(name: str):
    import torch

    return {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}[name]


def dtype_name(dtype) -> str:
    return {"torch.float32": "fp32", "torch.bfloat16": "bf16"}[str(dtype)]


def rss_bytes() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def make_prompt(engine, n_tokens: int, *, seed: int = 0):
    """A `PreparedRequest` of exactly ``n_tokens`` prompt tokens (chat template included), made of
    pseudo-random words of the word tokenizer (one token per word)."""
    import random

    from meda_engine import Request

    rng = random.Random(seed)
    overhead = engine.prepare(Request(prompt="the")).prompt.length - 1
    words = [rng.choice(WORDS) for _ in range(max(1, n_tokens - overhead))]
    prepared = engine.prepare(Request(prompt=" ".join(words)))
    assert prepared.prompt.length == n_tokens, (prepared.prompt.length, n_tokens)
    return prepared


# ---------------------------------------------------------------------------------------------------
# timing
# ---------------------------------------------------------------------------------------------------
def summarize(times: list[float]) -> dict[str, float]:
    return {
        "median_s": statistics.median(times),
        "min_s": min(times),
        "max_s": max(times),
        "n": len(times),
    }


def round_robin(fns: dict[str, Callable[[], Any]], *, warmup: int, steps: int,
                log: Callable[[str], None] | None = None,
                cpu_times: dict[str, list[float]] | None = None) -> dict[str, list[float]]:
    """Time each function ``steps`` times, interleaved (a, b, c, a, b, c, ...) so that drift in the
    machine's load hits every configuration alike; ``warmup`` untimed calls each first. Returns wall
    times; ``cpu_times``, if given, receives the process CPU time of each call (with one thread this is
    the time the step computed, not counting the time other processes held the core)."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    if cpu_times is not None:
        cpu_times.update({k: [] for k in fns})
    for s in range(steps):
        for k, fn in fns.items():
            c0 = time.process_time()
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
            if cpu_times is not None:
                cpu_times[k].append(time.process_time() - c0)
        if log:
            log(f"  step {s + 1}/{steps}: " + ", ".join(f"{k} {1e3 * v[-1]:.0f}ms" for k, v in times.items()))
    return times


# ---------------------------------------------------------------------------------------------------
# results files
# ---------------------------------------------------------------------------------------------------
def write_results(suite: str, out_dir: Path, run: dict[str, Any], records: list[dict[str, Any]],
                  key_fields: tuple[str, ...], to_markdown: Callable[[dict[str, Any]], str],
                  fresh: bool = False) -> dict[str, Any]:
    """Merge this run's records into ``<out_dir>/<suite>.json`` (a record replaces an earlier one with the
    same key; each record names the run it came from) and rewrite ``<suite>.md`` from the result."""
    out_dir.mkdir(parents=True, exist_ok=True)
    # several runs of one suite may write the same file (e.g. one per core): serialise the merge
    with open(out_dir / f".{suite}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _merge_results(suite, out_dir, run, records, key_fields, to_markdown, fresh)


def _merge_results(suite, out_dir, run, records, key_fields, to_markdown, fresh) -> dict[str, Any]:
    path = out_dir / f"{suite}.json"
    data: dict[str, Any] = {"suite": suite, "runs": [], "records": []}
    if path.exists() and not fresh:
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError:
            pass
    run_id = 1 + max([r["run_id"] for r in data["runs"]] + [r.get("run_id", -1) for r in data["records"]] + [-1])
    run = dict(run, run_id=run_id)
    for r in records:
        r["run_id"] = run_id
    new_keys = {tuple(r.get(k) for k in key_fields) for r in records}
    kept = [r for r in data["records"] if tuple(r.get(k) for k in key_fields) not in new_keys]
    data["records"] = kept + records
    live = {r["run_id"] for r in data["records"]} | {run_id}
    data["runs"] = [r for r in data["runs"] if r["run_id"] in live] + [run]
    data["suite"] = suite
    data["key_fields"] = list(key_fields)
    path.write_text(json.dumps(data, indent=1, default=float) + "\n")
    (out_dir / f"{suite}.md").write_text(to_markdown(data))
    return data


def md_table(headers: list[str], rows: list[list[Any]]) -> str:
    def fmt(x: Any) -> str:
        if x is None:
            return "-"
        if isinstance(x, float):
            return f"{x:.3g}" if abs(x) < 100 else f"{x:.0f}"
        return str(x)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(fmt(x) for x in row) + " |" for row in rows]
    return "\n".join(lines)


def runs_markdown(data: dict[str, Any]) -> str:
    out = []
    for run in data["runs"]:
        m = run.get("machine", {})
        bw = m.get("bandwidth_bytes_per_s", {})
        bw_txt = (f"; measured bandwidth: read {bw['read'] / 1e9:.1f} GB/s, copy {bw['copy'] / 1e9:.1f} GB/s, "
                  f"GEMV fp32 {bw['gemv_fp32'] / 1e9:.1f} GB/s, bf16 {bw['gemv_bf16'] / 1e9:.1f} GB/s") if bw else ""
        out.append(
            f"- run {run['run_id']} ({m.get('date', '?')}, {run.get('wall_s', 0):.0f} s): `{run['command']}`  \n"
            f"  {m.get('cpu_model', '?')}, {m.get('logical_cores', '?')} cores, {m.get('threads', '?')} thread(s), "
            f"torch {m.get('torch', '?')}, transformers {m.get('transformers', '?')}, load average at start "
            f"{m.get('load_average_at_start')}, at end {run.get('load_average_at_end')}{bw_txt}"
        )
    return "\n".join(out)


def pyplot():
    """matplotlib.pyplot on the headless Agg backend (benchmarks run on servers without a display)."""
    os.environ.setdefault("MPLBACKEND", "Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path, dpi: int = 100) -> Path:
    """Lay out, write as PNG and close ``fig``; returns ``path``."""
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)
    return path


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)
