"""Compression settings: one validated, immutable value per request.

A `CompressionConfig` names a method (a composition of a scorer, an allocator and a reducer, see
`meda_engine.compression.methods`) and the knobs those parts read. It is frozen and travels as an
argument with each request, so concurrent requests with different settings never share state.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

METHODS = ("full", "streamingllm", "h2o", "snapkv", "pyramidkv", "lookm", "meda")
ENTROPY_VARIANTS = ("paper", "code")
MERGE_MODES = ("none", "average", "pivot", "weighted")


class ConfigError(ValueError):
    """A compression or generation setting is invalid; the message names the field and the value."""


# Per-method defaults for the knobs whose natural value depends on the method. A user value of
# None means "the method's default"; an explicit value overrides it (e.g. snapkv + merge).
_METHOD_DEFAULTS: dict[str, dict[str, Any]] = {
    "full": {"text_prior": False, "merge": "none"},
    "streamingllm": {"text_prior": False, "merge": "none"},
    "h2o": {"text_prior": False, "merge": "none"},
    "snapkv": {"text_prior": False, "merge": "none"},
    "pyramidkv": {"text_prior": False, "merge": "none"},
    "lookm": {"text_prior": True, "merge": "average"},
    "meda": {"text_prior": True, "merge": "average"},
}


@dataclass(frozen=True)
class CompressionConfig:
    """How a request's prompt KV cache is compressed once, right after prefill.

    Parameters
    ----------
    method:
        One of ``full, streamingllm, h2o, snapkv, pyramidkv, lookm, meda``.
    budget:
        Mean fraction of the prompt's KV entries kept per layer, ``0 < budget <= 1`` (a float), or
        an absolute mean number of prompt tokens kept per layer (an int >= 1). ``full`` ignores it.
    window:
        Recent prompt tokens that are always kept (inside the budget, at most half of a layer's
        budget), and the observation window of the window scorers (SnapKV, PyramidKV).
    sink:
        Leading "attention sink" tokens StreamingLLM always keeps.
    entropy:
        MEDA's layer statistic: ``paper`` = cross-modal entropy (text->visual and visual->text
        attention, each renormalised over the other modality); ``code`` = mean row entropy of the
        full causal self-attention, as the released code computes it.
    temperature:
        Softmax temperature over layer entropies (MEDA uses 1).
    min_layer_ratio, max_layer_ratio:
        Clamp of each layer's keep-ratio; the excess is redistributed so the mean stays ``budget``.
    text_prior:
        Rank text tokens above every visual token inside the budget (LOOK-M / MEDA). None = the
        method's default.
    keep_all_text:
        Keep every text token outside the budget, as the released MEDA code does (the achieved
        keep-ratio is then larger than ``budget``; telemetry reports what was achieved).
    merge:
        How evicted KV pairs are folded into kept ones: ``none`` (plain eviction), ``average``,
        ``pivot`` or ``weighted``. None = the method's default (``average`` for lookm and meda).
    merge_keys:
        Also merge keys (post-RoPE). Off by default: merged keys lose their rotary position.
    merge_within_modality:
        An evicted token is merged only into kept tokens of its own modality (text into text,
        visual into visual), so visual content is not averaged into the question's tokens.
    score_queries:
        Accumulated-attention scores (H2O, LOOK-M, MEDA) and MEDA's ``code`` entropy sum over the
        prompt's query rows; for long prompts an evenly spaced subset of at most this many rows
        (always including the last) is used, because the exact all-row sum costs about as much
        again as the attention itself. 0 = every row (exact, as the paper writes it).
    pool_kernel:
        Average-pool width applied to window scores (SnapKV, PyramidKV).
    pyramid_beta:
        PyramidKV's ratio between its largest and smallest layer budget.
    """

    method: str = "meda"
    budget: float | int = 0.2
    window: int = 16
    sink: int = 4
    entropy: str = "paper"
    temperature: float = 1.0
    min_layer_ratio: float = 0.01
    max_layer_ratio: float = 1.0
    text_prior: bool | None = None
    keep_all_text: bool = False
    merge: str | None = None
    merge_keys: bool = False
    merge_within_modality: bool = True
    score_queries: int = 512
    pool_kernel: int = 5
    pyramid_beta: float = 20.0

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"unknown compression method {self.method!r}; choose one of {', '.join(METHODS)}")
        b = self.budget
        if isinstance(b, bool) or not isinstance(b, (int, float)):
            raise ConfigError(f"budget must be a number, got {b!r}")
        if isinstance(b, float):
            if not math.isfinite(b) or not (0.0 < b <= 1.0):
                raise ConfigError(
                    f"budget {b!r} is outside (0, 1]; pass a fraction in (0, 1] or an integer token count >= 1"
                )
        elif b < 1:
            raise ConfigError(f"budget {b!r} as a token count must be >= 1")
        if self.window < 0:
            raise ConfigError(f"window must be >= 0, got {self.window}")
        if self.sink < 0:
            raise ConfigError(f"sink must be >= 0, got {self.sink}")
        if self.entropy not in ENTROPY_VARIANTS:
            raise ConfigError(f"entropy must be one of {ENTROPY_VARIANTS}, got {self.entropy!r}")
        if not (self.temperature > 0 and math.isfinite(self.temperature)):
            raise ConfigError(f"temperature must be > 0, got {self.temperature}")
        if not (0.0 <= self.min_layer_ratio <= self.max_layer_ratio <= 1.0):
            raise ConfigError(
                f"need 0 <= min_layer_ratio <= max_layer_ratio <= 1, got {self.min_layer_ratio}, {self.max_layer_ratio}"
            )
        if self.merge is not None and self.merge not in MERGE_MODES:
            raise ConfigError(f"merge must be one of {MERGE_MODES}, got {self.merge!r}")
        if not isinstance(self.score_queries, int) or self.score_queries < 0:
            raise ConfigError(f"score_queries must be an integer >= 0 (0 = all rows), got {self.score_queries!r}")
        if self.pool_kernel < 1 or self.pool_kernel % 2 == 0:
            raise ConfigError(f"pool_kernel must be a positive odd number, got {self.pool_kernel}")
        if self.pyramid_beta < 1:
            raise ConfigError(f"pyramid_beta must be >= 1, got {self.pyramid_beta}")

    # Resolved views: the method default where the user left None.
    @property
    def use_text_prior(self) -> bool:
        if self.text_prior is not None:
            return self.text_prior
        return bool(_METHOD_DEFAULTS[self.method]["text_prior"])

    @property
    def merge_mode(self) -> str:
        return self.merge if self.merge is not None else _METHOD_DEFAULTS[self.method]["merge"]

    @property
    def is_full(self) -> bool:
        return self.method == "full"

    def keep_fraction(self, prompt_len: int) -> float:
        """The mean per-layer keep fraction this budget means for a prompt of ``prompt_len`` tokens."""
        if self.is_full or prompt_len <= 0:
            return 1.0
        if isinstance(self.budget, float):
            return float(self.budget)
        return min(1.0, self.budget / prompt_len)

    def replace(self, **changes: Any) -> "CompressionConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> "CompressionConfig":
        """Build from a JSON-like mapping, rejecting unknown keys with a clear message."""
        data = dict(data or {})
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError(f"unknown compression setting(s) {unknown}; known: {sorted(names)}")
        return cls(**data)


def parse_budget(text: str | float | int) -> float | int:
    """CLI/JSON budget: a value <= 1 is a fraction, a larger whole number a token count."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        value = float(text)
    else:
        try:
            value = float(str(text))
        except ValueError as e:
            raise ConfigError(f"budget {text!r} is not a number") from e
    if value <= 1.0:
        return value
    if value != int(value):
        raise ConfigError(f"budget {text!r} > 1 must be a whole token count")
    return int(value)


@dataclass(frozen=True)
class GenerationConfig:
    """Decoding settings for one request."""

    max_new_tokens: int = 64
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    stop: tuple[str, ...] = field(default_factory=tuple)
    seed: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        if not (self.temperature >= 0 and math.isfinite(self.temperature)):
            raise ConfigError(f"temperature must be >= 0, got {self.temperature}")
        if not (0.0 < self.top_p <= 1.0):
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        else:
            object.__setattr__(self, "stop", tuple(self.stop))

