"""Allocators: how much of a request's prompt each layer keeps.

An allocator returns one keep-ratio per layer whose mean is the requested budget ``rho``;
`ratios_to_tokens` turns ratios into whole token counts with the total conserved.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch


def _check_finite(name: str, values: list[float]) -> None:
    bad = [i for i, v in enumerate(values) if not math.isfinite(v)]
    if bad:
        raise ValueError(
            f"{name} must be finite; layer(s) {bad[:8]} hold {[values[i] for i in bad[:8]]} "
            "(non-finite attention statistics: check the model's dtype/weights)"
        )


def _clamped(logc: float, lw: float, log_low: float, log_high: float, low: float, high: float) -> float:
    """``clamp(exp(logc + lw), low, high)`` without overflow or underflow."""
    t = logc + lw
    if t >= log_high:
        return high
    if t <= log_low:
        return low
    return math.exp(t)


def clamp_to_mean_log(log_weights: list[float], mean: float, low: float, high: float) -> list[float]:
    """Ratios ``r_l = clamp(c * exp(log_weights[l]), low, high)`` with ``c`` chosen so that
    ``mean(r) == mean`` (up to float rounding), for any spread of the log-weights.

    Exact water-filling: ``total(c)`` is piecewise linear in ``c`` with breakpoints where a layer
    leaves ``low`` or reaches ``high``; the segment holding the target is found among the sorted
    breakpoints (in log space, so a spread of 1000 nats is as exact as one of 1) and ``c`` is solved
    on it in closed form. A weight of ``-inf`` (zero) never leaves ``low`` unless every other layer
    is at ``high``; then the rest is shared equally among the zero-weight layers.
    """
    n = len(log_weights)
    if n == 0:
        return []
    for name, v in (("mean", mean), ("low", low), ("high", high)):
        if not math.isfinite(v):
            raise ValueError(f"{name} must be finite, got {v}")
    if any(math.isnan(w) or w == math.inf for w in log_weights):
        raise ValueError(f"log-weights must be finite or -inf, got {log_weights}")
    if not (0.0 <= low <= mean <= high):
        raise ValueError(f"mean {mean} outside [{low}, {high}] (or low < 0)")
    if high == low:
        return [low] * n
    target = mean * n
    pos = [i for i in range(n) if log_weights[i] > -math.inf]
    if not pos:  # no preference at all: uniform
        return [mean] * n
    zero = [i for i in range(n) if log_weights[i] == -math.inf]
    log_low = math.log(low) if low > 0 else -math.inf
    log_high = math.log(high)

    pos_set = set(pos)

    def values(logc: float) -> list[float]:
        return [_clamped(logc, log_weights[i], log_low, log_high, low, high) if i in pos_set else low
                for i in range(n)]

    # All positive-weight layers at high and still short: the zero-weight layers share the rest.
    cap = len(pos) * high + len(zero) * low
    if target >= cap:
        rest = (target - len(pos) * high) / len(zero) if zero else high
        rest = min(high, max(low, rest))
        return [high if i in pos_set else rest for i in range(n)]
    # Breakpoints in log c, sorted; total() is non-decreasing in log c.
    bps = sorted({log_high - log_weights[i] for i in pos}
                 | ({log_low - log_weights[i] for i in pos} if low > 0 else set()))
    lo_t = -math.inf  # total(lo_t) <= target
    for t in bps:
        if math.fsum(values(t)) >= target:
            hi_t = t
            break
        lo_t = t
    else:  # unreachable: total at the last breakpoint is cap > target
        hi_t = math.inf
    # On (lo_t, hi_t) each layer is fixed at low, fixed at high, or free (c * w inside the bounds).
    mid = hi_t - 1.0 if lo_t == -math.inf else (lo_t + hi_t) / 2
    at_high = [i for i in pos if mid + log_weights[i] >= log_high]
    free = [i for i in pos if i not in set(at_high) and (low == 0 or mid + log_weights[i] > log_low)]
    fixed_total = len(at_high) * high + (n - len(at_high) - len(free)) * low
    rest = target - fixed_total
    if not free or rest <= 0:
        return values(hi_t) if hi_t < math.inf else values(lo_t)
    m = max(log_weights[i] for i in free)
    lse = m + math.log(math.fsum(math.exp(log_weights[i] - m) for i in free))
    logc = math.log(rest) - lse
    ratios = values(logc)
    for i in free:  # the closed form, unclamped (float noise may push a value just past a bound)
        ratios[i] = min(high, max(low, math.exp(logc + log_weights[i])))
    return ratios


def clamp_to_mean(weights: list[float], mean: float, low: float, high: float) -> list[float]:
    """Ratios ``r_l = clamp(c * w_l, low, high)`` with ``c`` chosen so that ``mean(r) == mean``.

    This is the "clamp, then redistribute the excess" rule: a layer pushed past a bound is held there
    and the others are scaled in proportion to their weights until the total is met (exactly, up to
    float rounding; see `clamp_to_mean_log`). (The released MEDA code clamps without redistributing,
    so its total budget drifts.) All weights <= 0: uniform.
    """
    _check_finite("weights", weights)
    if all(w <= 0 for w in weights):
        weights = [1.0] * len(weights)
    return clamp_to_mean_log([math.log(w) if w > 0 else -math.inf for w in weights], mean, low, high)


def token_target(budget: float, length: int, n_layers: int, *, minimum: int = 1) -> tuple[int, bool]:
    """The total number of prompt tokens kept over all layers for a mean keep-fraction ``budget``:
    ``round(budget * length * n_layers)`` (Python's round), raised to ``minimum`` per layer and capped
    at ``length`` per layer. Returns ``(total, floor_applied)``, where ``floor_applied`` says the
    per-layer floor raised the total above what the budget asks for (e.g. ``budget * length < 1``)."""
    if not math.isfinite(budget) or budget < 0:
        raise ValueError(f"budget must be a finite fraction >= 0, got {budget}")
    if length <= 0 or n_layers <= 0:
        return 0, False
    minimum = min(minimum, length)
    asked = round(budget * length * n_layers)
    total = min(max(asked, minimum * n_layers), length * n_layers)
    return total, total > asked


def ratios_to_tokens(ratios: list[float], length: int, *, minimum: int = 1,
                     budget: float | None = None) -> list[int]:
    """Token counts per layer, each within ``[minimum, length]``, summing exactly to
    ``token_target(budget, length, n_layers)`` (``budget`` defaults to ``mean(ratios)``).

    Exact integer apportionment: the continuous counts ``clamp(r_l * length, minimum, length)`` are
    floored, then the missing tokens go one each to the layers with the largest fractional parts
    (ties: lower layer index first), or the surplus is taken back from the smallest; this repeats
    only if the ratios do not sum to the budget, so the total is exact whatever they sum to."""
    n = len(ratios)
    if length <= 0:
        return [0] * n
    _check_finite("ratios", ratios)
    if budget is None:
        budget = math.fsum(ratios) / n if n else 0.0
    target, _ = token_target(budget, length, n, minimum=minimum)
    minimum = min(minimum, length)
    exact = [min(max(r * length, float(minimum)), float(length)) for r in ratios]
    counts = [min(max(int(math.floor(x)), minimum), length) for x in exact]
    rem = [exact[i] - counts[i] for i in range(n)]
    short = target - sum(counts)
    while short > 0:  # hand out missing tokens by largest remainder
        room = sorted((i for i in range(n) if counts[i] < length), key=lambda i: (-rem[i], i))
        if short > len(room):  # far off (ratios not summing to the budget): whole tokens to all first
            each = short // len(room)
            for j in room:
                add = min(each, length - counts[j])
                counts[j] += add
                short -= add
            continue
        for j in room[:short]:
            counts[j] += 1
            rem[j] -= 1.0
        short -= min(short, len(room))
    while short < 0:  # or take back the surplus from the smallest remainders
        room = sorted((i for i in range(n) if counts[i] > minimum), key=lambda i: (rem[i], -i))
        if -short > len(room):
            each = -short // len(room)
            for j in room:
                sub = min(each, counts[j] - minimum)
                counts[j] -= sub
                short += sub
            continue
        for j in room[:-short]:
            counts[j] -= 1
            rem[j] += 1.0
        short += min(-short, len(room))
    return counts


@dataclass(frozen=True)
class UniformAllocator:
    """Every layer keeps the same fraction."""

    uses_scores: ClassVar[bool] = False

    def ratios(self, budget: float, n_layers: int, entropies: list[float] | None = None) -> list[float]:
        return [budget] * n_layers


@dataclass(frozen=True)
class PyramidAllocator:
    """PyramidKV: a linear pyramid from the first layer (largest) to the last (smallest), with
    ``max/min = 2*beta - 1`` before clamping (kvpress's formula: min = mean/beta, max = 2*mean - min)."""

    beta: float = 20.0
    uses_scores: ClassVar[bool] = False

    def ratios(self, budget: float, n_layers: int, entropies: list[float] | None = None) -> list[float]:
        if n_layers == 1:
            return [budget]
        lo = budget / self.beta
        hi = 2 * budget - lo
        shape = [hi - l * (hi - lo) / (n_layers - 1) for l in range(n_layers)]
        return clamp_to_mean(shape, budget, 0.0, 1.0)


@dataclass(frozen=True)
class EntropyAllocator:
    """MEDA: ``r_l = softmax(E / T)_l * n_layers * rho``, clamped to ``[min_ratio, max_ratio]`` with the
    excess redistributed (total conserved). A layer whose attention is more dispersed (higher
    entropy) gets more cache."""

    temperature: float = 1.0
    min_ratio: float = 0.01
    max_ratio: float = 1.0
    uses_scores: ClassVar[bool] = False

    def ratios(self, budget: float, n_layers: int, entropies: list[float] | None = None) -> list[float]:
        if not entropies:
            return [budget] * n_layers
        if len(entropies) != n_layers:
            raise ValueError(f"{len(entropies)} layer entropies for {n_layers} layers")
        _check_finite("layer entropies", [float(e) for e in entropies])
        # softmax(E / T) * n * rho, clamped: the softmax's normaliser is absorbed by clamp_to_mean's
        # scale, so only the log-weights E / T are needed (no exp underflow at any spread).
        low = min(self.min_ratio, budget)
        high = max(self.max_ratio, budget)
        return clamp_to_mean_log([float(e) / self.temperature for e in entropies], budget, low, high)


@dataclass(frozen=True)
class GlobalScoreAllocator:
    """KVzip's global allocation (kvpress's ``KVzipPress(layerwise=False)``, AdaKV's principle): the
    budget of all layers together goes to the highest-scored (layer, KV head, token) entries, ranked
    across layers; a layer keeps the share of its entries that won, ``r_l = won_l / (H_kv * L)``,
    clamped to ``[min_ratio, max_ratio]`` with the total conserved (`clamp_to_mean`).

    Each layer holds one cache length for all its KV heads, so the heads of a layer then keep their
    own top ``r_l * L`` tokens each (kvpress lets the heads of a layer differ too). The scores must be
    comparable across layers: attention probabilities (KVzip's max over the repeat queries) are."""

    min_ratio: float = 0.01
    max_ratio: float = 1.0
    uses_scores: ClassVar[bool] = True

    def ratios(self, budget: float, n_layers: int, entropies: list[float] | None = None, *,
               scores: list[torch.Tensor] | None = None) -> list[float]:
        """``scores``: one ``(H_kv, L)`` tensor per layer (higher is kept first)."""
        if not scores:
            raise ValueError("the global allocator needs every layer's token scores")
        if len(scores) != n_layers:
            raise ValueError(f"{len(scores)} layers of scores for {n_layers} layers")
        flat = torch.cat([s.float().reshape(-1) for s in scores])
        if not bool(torch.isfinite(flat).all()):
            raise ValueError("token scores must be finite (non-finite attention statistics: check the model's "
                             "dtype/weights)")
        k = min(flat.numel(), max(0, round(budget * flat.numel())))
        if k == 0 or k == flat.numel():
            return [budget] * n_layers
        sizes = torch.tensor([s.numel() for s in scores])
        layer_of = torch.repeat_interleave(torch.arange(n_layers), sizes)
        won = torch.bincount(layer_of[torch.topk(flat, k, sorted=False).indices], minlength=n_layers)
        weights = (won.double() / sizes.double()).tolist()
        low = min(self.min_ratio, budget)
        high = max(self.max_ratio, budget)
        return clamp_to_mean(weights, budget, low, high)
