"""A separate virtual environment for NVIDIA kvpress, and running a worker script inside it.

kvpress pins ``transformers>=4.56,<5.3`` while meda runs on transformers 5.23, so the two cannot share
an environment. `ensure_env()` creates ``<cache>/kvpress-venv`` (default cache: ``~/.cache/meda-bench``,
or ``$MEDA_BENCH_CACHE``) with ``pip install torch==<this torch> kvpress "transformers<5.3" gguf accelerate``
(the last two for transformers' GGUF loader, `peers_kvpress_real.py`; pip's
ordinary resolution; on this machine torch comes from the local wheel directory), once; later calls
reuse it. `run_worker()` runs ``benchmarks/peers_kvpress_worker.py`` in it and returns its JSON.

Every failure is returned as a string that says exactly which step failed and pip's/the worker's
own last lines, so the peers suite can print and record why kvpress did not run (it never skips
silently).

    python -m benchmarks.peers_kvpress_env            # create (or check) the environment, print its facts
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

WORKER = Path(__file__).with_name("peers_kvpress_worker.py")
KVPRESS_SPEC = "kvpress"
TRANSFORMERS_SPEC = "transformers<5.3"
GGUF_SPECS = ("gguf", "accelerate")  # transformers' GGUF loader (the real-model peer run)


def cache_dir() -> Path:
    return Path(os.environ.get("MEDA_BENCH_CACHE", Path.home() / ".cache" / "meda-bench"))


def env_dir() -> Path:
    return cache_dir() / "kvpress-venv"


def _python(env: Path) -> Path:
    return env / "bin" / "python"


def _tail(text: str, n: int = 25) -> str:
    return "\n".join(text.strip().splitlines()[-n:])


def _torch_spec() -> str:
    return "torch==" + torch.__version__.split("+")[0]


def env_facts(env: Path | None = None) -> dict | None:
    """Versions inside the environment, or None when it is not usable."""
    env = env or env_dir()
    py = _python(env)
    if not py.exists():
        return None
    code = ("import json, torch, transformers, kvpress, gguf, accelerate, importlib.metadata as m; "
            "print(json.dumps({'torch': torch.__version__, 'transformers': transformers.__version__, "
            "'kvpress': m.version('kvpress'), 'python': __import__('sys').version.split()[0]}))")
    r = subprocess.run([str(py), "-c", code], capture_output=True, text=True)
    if r.returncode != 0:
        return None
    return json.loads(r.stdout.strip().splitlines()[-1])


def ensure_env(log=print) -> tuple[dict | None, str | None]:
    """Create the kvpress environment if needed. Returns ``(facts, None)`` or ``(None, why_not)``."""
    env = env_dir()
    facts = env_facts(env)
    if facts is not None:
        return facts, None
    env.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    log(f"[kvpress-env] creating {env} (torch {_torch_spec()}, {KVPRESS_SPEC}, {TRANSFORMERS_SPEC})")
    steps = [
        ([sys.executable, "-m", "venv", "--clear", str(env)], "python -m venv"),
        ([str(_python(env)), "-m", "pip", "install", "-q", _torch_spec(), KVPRESS_SPEC, TRANSFORMERS_SPEC, *GGUF_SPECS],
         f"pip install {_torch_spec()} {KVPRESS_SPEC} '{TRANSFORMERS_SPEC}' {' '.join(GGUF_SPECS)}"),
    ]
    for cmd, what in steps:
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            return None, f"kvpress environment: `{what}` failed (exit {r.returncode}):\n{_tail(r.stderr or r.stdout)}"
    facts = env_facts(env)
    if facts is None:
        r = subprocess.run([str(_python(env)), "-c", "import kvpress"], capture_output=True, text=True)
        return None, f"kvpress environment: installed, but `import kvpress` fails:\n{_tail(r.stderr)}"
    log(f"[kvpress-env] ready in {time.perf_counter() - t0:.0f}s: {facts}")
    return facts, None


def run_worker(spec: dict, *, threads: int, timeout_s: float = 7200) -> tuple[dict | None, str | None]:
    """Run the worker with ``spec`` (a JSON-able dict) in the kvpress environment.
    Returns ``(result, None)`` or ``(None, why_not)``."""
    facts, why = ensure_env()
    if why:
        return None, why
    spec_path = cache_dir() / f"kvpress-spec-{os.getpid()}.json"
    out_path = cache_dir() / f"kvpress-out-{os.getpid()}.json"
    spec_path.write_text(json.dumps(spec))
    out_path.unlink(missing_ok=True)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    try:
        r = subprocess.run([str(_python(env_dir())), str(WORKER), str(spec_path), str(out_path)],
                           capture_output=True, text=True, env=env, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return None, f"kvpress worker: did not finish within {timeout_s:.0f}s"
    finally:
        spec_path.unlink(missing_ok=True)
    if r.returncode != 0 or not out_path.exists():
        return None, f"kvpress worker failed (exit {r.returncode}):\n{_tail(r.stderr or r.stdout, 40)}"
    result = json.loads(out_path.read_text())
    out_path.unlink(missing_ok=True)
    result["env"] = facts
    result["worker_log"] = _tail(r.stderr, 40)
    return result, None


if __name__ == "__main__":
    facts, why = ensure_env()
    print(json.dumps(facts) if facts else why)
    sys.exit(0 if facts else 1)
