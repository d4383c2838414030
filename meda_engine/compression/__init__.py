"""KV-cache compression: scorers, allocators, selection, merging, and the named methods."""

from .allocators import (
    EntropyAllocator,
    PyramidAllocator,
    UniformAllocator,
    clamp_to_mean,
    clamp_to_mean_log,
    ratios_to_tokens,
    token_target,
)
from .compressor import CompressionOutcome, compress_cache
from .merge import KVMerger
from .methods import Method, build_method
from .scorers import AccumulatedAttentionScorer, ReconstructionScorer, RecencyScorer, WindowAttentionScorer
from .selection import recent_window, select_tokens

__all__ = [
    "AccumulatedAttentionScorer",
    "CompressionOutcome",
    "EntropyAllocator",
    "KVMerger",
    "Method",
    "PyramidAllocator",
    "RecencyScorer",
    "ReconstructionScorer",
    "UniformAllocator",
    "WindowAttentionScorer",
    "build_method",
    "clamp_to_mean",
    "clamp_to_mean_log",
    "compress_cache",
    "ratios_to_tokens",
    "recent_window",
    "select_tokens",
    "token_target",
]
