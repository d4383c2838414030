"""Benchmarks of the MEDA engine on CPU: ``python -m benchmarks.SUITE [args]`` or ``meda bench SUITE [args]``.

Suites (each writes ``benchmarks/results/<suite>.json`` with raw measurements and machine facts, and a
Markdown table ``<suite>.md``; ``python -m benchmarks.report`` turns them into ``docs/benchmarks.md``):

* ``decode``        ms/step vs context, full vs snapkv vs meda caches, ratios and bandwidth bound
* ``fixed_memory``  largest batch under a KV cap and its tokens/s, full vs meda
* ``prefill``       prefill + compression time and peak memory, meda vs plain SDPA prefill
* ``peers``         transformers' own decode and NVIDIA kvpress (its own environment) vs ours
* ``quality``       accuracy vs KV budget of the trained needle models, every method and protocol
* ``scheduler``     continuous vs static batching tokens/s; rows and tokens/s under a KV cap, full vs meda
* ``serve_load``    the endpoint under 16 streaming clients: engine loop vs the former @serve.batch replica
* ``pipeline``      clips/s through Ray Data vs the engine alone, decode vs inference time, actor busy time
* ``planning``      planning and starting a job over a 1M-entry manifest, and its half-done resume: seconds, driver RSS
* ``report``        regenerate docs/benchmarks.md and the plots from the results

Every suite takes ``--threads`` (default 1: with another process on the second core, 2 threads ran
~20x slower here) and ``--help``.
"""

from __future__ import annotations

import argparse
import importlib
import os

SUITES = ("decode", "fixed_memory", "prefill", "peers", "quality", "pipeline", "planning", "scheduler", "serve_load",
          "report")


def run_suite(suite: str, argv: list[str]) -> int:
    if suite not in SUITES:
        raise ValueError(f"unknown benchmark suite {suite!r}; choose one of {', '.join(SUITES)}")
    module = importlib.import_module(f"benchmarks.{suite}")
    return int(module.main(list(argv)) or 0)


def _run_from_cli(args: argparse.Namespace) -> int:
    os.environ["MEDA_BENCH_ENTRY"] = f"meda bench {args.suite}"
    if args.suite_args and args.suite_args[0] == "--":
        args.suite_args = args.suite_args[1:]
    return run_suite(args.suite, args.suite_args)


def add_bench_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``meda bench SUITE [args...]``; the suite's own flags pass through unchanged."""
    p = subparsers.add_parser(
        "bench", help="run a benchmark suite (" + ", ".join(SUITES) + ")",
        description="Run a benchmark suite; arguments after SUITE go to the suite (see `meda bench SUITE --help`).",
        add_help=True)
    p.add_argument("suite", choices=SUITES)
    p.add_argument("suite_args", nargs=argparse.REMAINDER, help="arguments of the suite")
    p.set_defaults(func=_run_from_cli)
    return p
