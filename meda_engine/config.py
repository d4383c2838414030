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

METHODS = ("full", "streamingllm", "h2o", "snapkv", "pyramidkv", "lookm", "meda", "meda-window", "kvzip",
           "kvzip-global")
# methods whose scores come from the model repeating the context (a longer prefill forward; text only)
RECONSTRUCTION_METHODS = ("kvzip", "kvzip-global")
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
    "meda-window": {"text_prior": False, "merge": "none"},
    "kvzip": {"text_prior": False, "merge": "none"},
    "kvzip-global": {"text_prior": False, "merge": "none"},
}


def _typename(value: Any) -> str:
    return type(value).__name__


def check_int(name: str, value: Any, *, minimum: int | None = None, optional: bool = False) -> int | None:
    """A strict integer: rejects bools and floats (``3.0`` too: a setting that counts things is a whole
    number, and a float there is a client bug worth reporting)."""
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{name} must be an integer, got {value!r} ({_typename(value)})")
    if minimum is not None and value < minimum:
        raise ConfigError(f"{name} must be >= {minimum}, got {value!r}")
    return int(value)


def check_float(name: str, value: Any) -> float:
    """A finite real number; ints are accepted (JSON encoders send ``1.0`` as ``1``), bools are not."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{name} must be a number, got {value!r} ({_typename(value)})")
    out = float(value)
    if not math.isfinite(out):
        raise ConfigError(f"{name} must be finite, got {value!r}")
    return out


def check_bool(name: str, value: Any, *, optional: bool = False) -> bool | None:
    if value is None and optional:
        return None
    if not isinstance(value, bool):
        raise ConfigError(f"{name} must be true or false, got {value!r} ({_typename(value)})")
    return value


def check_choice(name: str, value: Any, choices: tuple[str, ...], *, optional: bool = False) -> str | None:
    if value is None and optional:
        return None
    if not isinstance(value, str) or value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}; got {value!r}")
    return value


def check_budget(value: Any, *, name: str = "budget") -> float:
    """The budget is a fraction in (0, 1] everywhere (Python, CLI, HTTP JSON, job configs); an integer
    ``1`` means ``1.0``. An absolute token count is a different setting: ``budget_tokens``."""
    b = check_float(name, value)
    if not (0.0 < b <= 1.0):
        raise ConfigError(
            f"{name} must be a fraction in (0, 1] (the mean share of the prompt's KV kept per layer), got {value!r}; "
            f"for an absolute number of tokens per layer use budget_tokens (CLI: --budget-tokens)"
        )
    return b


@dataclass(frozen=True)
class CompressionConfig:
    """How a request's prompt KV cache is compressed once, right after prefill.

    Every field is validated and normalised here, once, for every entry point (Python, the CLI, HTTP
    JSON, job configs): wrong types (``window=1.5``, ``merge_keys="yes"``), out-of-range values and,
    through `from_dict`, unknown keys raise `ConfigError` naming the field.

    Parameters
    ----------
    method:
        One of ``full, streamingllm, h2o, snapkv, pyramidkv, lookm, meda, meda-window``.
    budget:
        Mean fraction of the prompt's KV entries kept per layer, ``0 < budget <= 1``. An integer ``1``
        is ``1.0`` (it is never a token count). ``full`` ignores it.
    budget_tokens:
        If set (an integer >= 1), the absolute mean number of prompt tokens kept per layer; it
        overrides ``budget`` (capped at the prompt length).
    window:
        Recent prompt tokens that are always kept (inside the budget, at most half of a layer's
        budget), and the observation window of the window scorers (SnapKV, PyramidKV).
    sink:
        Leading "attention sink" tokens StreamingLLM always keeps.
    entropy:
        MEDA's layer statistic: ``paper`` = cross-modal entropy (text->visual and visual->text
        attention, each renormalised over the other modality); ``code`` = mean row entropy of the
        causal self-attention (over the ``score_queries`` rows, as the accumulated scores), as the
        released code computes it.
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
        prompt's query rows; for long prompts an evenly spaced subset of the rows (stride
        ``ceil(L / score_queries)``, always including the last, so between ``score_queries / 2`` and
        ``score_queries`` rows) is used, because the exact all-row sum costs about as much again as
        the attention itself. 0 = every row (exact, as the paper writes it).
    pool_kernel:
        Average-pool width applied to window scores (SnapKV, PyramidKV).
    pyramid_beta:
        PyramidKV's ratio between its largest and smallest layer budget.
    """

    method: str = "meda"
    budget: float = 0.2
    budget_tokens: int | None = None
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
        def put(name: str, value: Any) -> None:
            object.__setattr__(self, name, value)

        if not isinstance(self.method, str) or self.method not in METHODS:
            raise ConfigError(f"unknown compression method {self.method!r}; choose one of {', '.join(METHODS)}")
        put("budget", check_budget(self.budget))
        put("budget_tokens", check_int("budget_tokens", self.budget_tokens, minimum=1, optional=True))
        put("window", check_int("window", self.window, minimum=0))
        put("sink", check_int("sink", self.sink, minimum=0))
        check_choice("entropy", self.entropy, ENTROPY_VARIANTS)
        put("temperature", check_float("temperature", self.temperature))
        if self.temperature <= 0:
            raise ConfigError(f"temperature must be > 0, got {self.temperature}")
        put("min_layer_ratio", check_float("min_layer_ratio", self.min_layer_ratio))
        put("max_layer_ratio", check_float("max_layer_ratio", self.max_layer_ratio))
        if not (0.0 <= self.min_layer_ratio <= self.max_layer_ratio <= 1.0):
            raise ConfigError(
                f"need 0 <= min_layer_ratio <= max_layer_ratio <= 1, got {self.min_layer_ratio}, {self.max_layer_ratio}"
            )
        check_bool("text_prior", self.text_prior, optional=True)
        check_bool("keep_all_text", self.keep_all_text)
        check_choice("merge", self.merge, MERGE_MODES, optional=True)
        check_bool("merge_keys", self.merge_keys)
        check_bool("merge_within_modality", self.merge_within_modality)
        put("score_queries", check_int("score_queries", self.score_queries, minimum=0))
        put("pool_kernel", check_int("pool_kernel", self.pool_kernel, minimum=1))
        if self.pool_kernel % 2 == 0:
            raise ConfigError(f"pool_kernel must be a positive odd number, got {self.pool_kernel}")
        put("pyramid_beta", check_float("pyramid_beta", self.pyramid_beta))
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
        """The mean per-layer keep fraction this budget means for a prompt of ``prompt_len`` tokens:
        ``budget``, or ``min(1, budget_tokens / prompt_len)`` when ``budget_tokens`` is set."""
        if self.is_full or prompt_len <= 0:
            return 1.0
        if self.budget_tokens is not None:
            return min(1.0, self.budget_tokens / prompt_len)
        return self.budget

    def replace(self, **changes: Any) -> "CompressionConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> "CompressionConfig":
        """Build from a JSON-like mapping, rejecting unknown keys with a clear message."""
        if data is not None and not isinstance(data, dict):
            raise ConfigError(f"compression settings must be an object/mapping, got {_typename(data)}")
        data = dict(data or {})
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(k for k in data if k not in names)
        if unknown:
            raise ConfigError(f"unknown compression setting(s) {unknown}; known: {names}")
        return cls(**data)


def parse_budget(text: str | float | int) -> float:
    """A CLI / query-string budget: a fraction in (0, 1]. ``"1"`` is ``1.0``; ``"1.5"`` or ``"64"`` are
    errors that point at ``--budget-tokens`` (the absolute count has its own flag)."""
    if isinstance(text, bool):
        raise ConfigError(f"budget must be a number, got {text!r}")
    if isinstance(text, (int, float)):
        value: float = float(text)
    else:
        try:
            value = float(str(text).strip())
        except ValueError as e:
            raise ConfigError(f"budget {text!r} is not a number; give a fraction in (0, 1], e.g. 0.2") from e
    if not math.isfinite(value) or not (0.0 < value <= 1.0):
        raise ConfigError(
            f"budget must be a fraction in (0, 1] (the mean share of the prompt's KV kept per layer), got {text!r}; "
            f"for an absolute number of tokens per layer use --budget-tokens N"
        )
    return value


def parse_budget_tokens(text: str | int) -> int:
    """A CLI ``--budget-tokens``: a whole number >= 1."""
    if isinstance(text, bool):
        raise ConfigError(f"budget_tokens must be a whole number >= 1, got {text!r}")
    if isinstance(text, int):
        value = text
    else:
        try:
            value = int(str(text).strip())
        except ValueError as e:
            raise ConfigError(f"budget_tokens must be a whole number >= 1, got {text!r}") from e
    if value < 1:
        raise ConfigError(f"budget_tokens must be a whole number >= 1, got {text!r}")
    return value


@dataclass(frozen=True)
class GenerationConfig:
    """Decoding settings for one request."""

    max_new_tokens: int = 64
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    stop: tuple[str, ...] = field(default_factory=tuple)
    seed: int | None = None

    def __post_init__(self) -> None:
        check_int("max_new_tokens", self.max_new_tokens, minimum=1)
        object.__setattr__(self, "temperature", check_float("temperature", self.temperature))
        if self.temperature < 0:
            raise ConfigError(f"temperature must be >= 0, got {self.temperature}")
        object.__setattr__(self, "top_p", check_float("top_p", self.top_p))
        if not (0.0 < self.top_p <= 1.0):
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")
        check_int("seed", self.seed, optional=True)
        stop = (self.stop,) if isinstance(self.stop, str) else self.stop
        if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) for s in stop):
            raise ConfigError(f"stop must be a string or a list of strings, got {self.stop!r}")
        object.__setattr__(self, "stop", tuple(stop))
