"""The KV-compression command-line flags, shared by every command that runs the engine
(`meda generate`, `meda serve`, `meda annotate`), so the flags and their meaning are the same
everywhere. Import-light on purpose: argparse and `meda_engine.config` only (no torch).

    add_compression_args(parser)             # --method --budget --budget-tokens --window ...
    config = compression_from_args(args)     # -> CompressionConfig (validated), or ConfigError
"""

from __future__ import annotations

import argparse

from .config import ENTROPY_VARIANTS, MERGE_MODES, METHODS, CompressionConfig, parse_budget, parse_budget_tokens

__all__ = ["add_compression_args", "compression_from_args"]


def _arg_type(fn):
    """Wrap a ConfigError-raising parser so argparse prints its message as a usage error."""
    def parse(text: str):
        try:
            return fn(text)
        except ValueError as e:  # ConfigError is a ValueError
            raise argparse.ArgumentTypeError(str(e)) from None
    parse.__name__ = fn.__name__
    return parse


def add_compression_args(parser: argparse.ArgumentParser, *, default_method: str = "meda") -> None:
    """Add the compression flags (in their own argument group) to ``parser``."""
    d = CompressionConfig()
    g = parser.add_argument_group("KV-cache compression")
    g.add_argument("--method", default=default_method, choices=METHODS, help=f"compression method (default: {default_method})")
    g.add_argument("--budget", default=d.budget, type=_arg_type(parse_budget),
                   help=f"mean fraction of the prompt's KV kept per layer, in (0, 1] (default {d.budget})")
    g.add_argument("--budget-tokens", default=None, type=_arg_type(parse_budget_tokens),
                   help="absolute mean number of prompt tokens kept per layer (overrides --budget)")
    g.add_argument("--entropy", default=d.entropy, choices=ENTROPY_VARIANTS, help="MEDA's layer statistic")
    g.add_argument("--window", type=int, default=d.window, help=f"recent prompt tokens always kept (default {d.window})")
    g.add_argument("--merge", default=None, choices=MERGE_MODES,
                   help="merge evicted KV into kept ones (default: the method's own)")
    g.add_argument("--merge-keys", action="store_true", help="also merge keys (default: values only)")
    g.add_argument("--keep-all-text", action="store_true", help="keep every text token outside the budget")
    g.add_argument("--temperature-entropy", type=float, default=d.temperature, dest="entropy_temperature",
                   help="softmax temperature over layer entropies (MEDA)")
    g.add_argument("--score-queries", type=int, default=d.score_queries,
                   help=f"query rows the accumulated scores sum over, 0 = all (default {d.score_queries})")


def compression_from_args(args: argparse.Namespace) -> CompressionConfig:
    """The validated `CompressionConfig` the flags of `add_compression_args` describe."""
    return CompressionConfig(
        method=args.method, budget=args.budget, budget_tokens=args.budget_tokens, entropy=args.entropy,
        window=args.window, merge=args.merge, merge_keys=args.merge_keys, keep_all_text=args.keep_all_text,
        temperature=args.entropy_temperature, score_queries=args.score_queries,
    )
