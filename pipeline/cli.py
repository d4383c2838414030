"""The `meda` command: one entry point for the engine, the batch job, the endpoint and the tools.

    meda generate ...   one prompt through the engine            (meda_engine.cli)
    meda annotate ...   Ray Data annotation job, resumable        (pipeline.annotate)
    meda serve ...      OpenAI-compatible Ray Serve endpoint      (pipeline.serve)
    meda report RUN     plots + Markdown summary of a run         (pipeline.report)
    meda bench SUITE    benchmarks                                (benchmarks)
"""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    from meda_engine.cli import add_generate_parser

    from .annotate import add_annotate_parser

    parser = argparse.ArgumentParser(prog="meda", description="MEDA compressed-KV inference for multimodal LLMs")
    sub = parser.add_subparsers(dest="command", required=True)
    add_generate_parser(sub)
    add_annotate_parser(sub)
    for module, fn in (("pipeline.serve", "add_serve_parser"), ("pipeline.report", "add_report_parser"),
                       ("benchmarks", "add_bench_parser")):
        try:
            mod = __import__(module, fromlist=[fn])
        except ImportError as e:  # an optional part whose dependencies are not installed
            if not e.name or not e.name.startswith(("pipeline", "benchmarks")):
                continue
            raise
        getattr(mod, fn)(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from meda_engine import ConfigError

    args, extra = build_parser().parse_known_args(argv)
    if extra:  # one line, naming the subcommand (argparse would print the top-level usage first)
        print(f"meda {args.command}: error: unrecognized arguments: {' '.join(extra)} "
              f"(see meda {args.command} --help)", file=sys.stderr)
        return 2
    try:
        return int(args.func(args) or 0)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"meda {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
