"""Allocators: how much of a request's prompt each layer keeps.

An allocator returns one keep-ratio per layer whose mean is the requested budget ``rho``;
`ratios_to_tokens` turns ratios into whole token counts with the total conserved.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


def clamp_to_mean(weights: list[float], mean: float, low: float, high: float) -> list[float]:
    """Ratios ``r_l = clamp(c * w_l, low, high)`` with ``c`` chosen so that ``mean(r) == mean``.

    This is the "clamp, then redistribute the excess" rule: a layer pushed past a bound is held there
    and the others are scaled in proportion to their weights until the total is met exactly. (The
    released MEDA code clamps without redistributing, so its total budget drifts.)
    """
    n = len(weights)
    if n == 0:
        return []
    if not (low <= mean <= high):
        raise ValueError(f"mean {mean} outside [{low}, {high}]")
    if all(w <= 0 for w in weights):
        weights = [1.0] * n
    target = mean * n

    def total(c: float) -> float:
        return sum(min(high, max(low, c * w)) for w in weights)

    lo, hi = 0.0, 1.0
    while total(hi) < target and hi < 1e18:
        hi *= 2.0
    for _ in range(200):  # bisection on the monotone total(c)
        mid = (lo + hi) / 2
        if total(mid) < target:
            lo = mid
        else:
            hi = mid
    ratios = [min(high, max(low, hi * w)) for w in weights]
    # Remove the last floating-point residue on the layers strictly inside the bounds.
    free = [i for i, r in enumerate(ratios) if low < r < high]
    if free:
        residue = (target - sum(ratios)) / len(free)
        for i in free:
            ratios[i] = min(high, max(low, ratios[i] + residue))
    return ratios


def ratios_to_tokens(ratios: list[float], length: int, *, minimum: int = 1) -> list[int]:
    """Token counts per layer: ``round(mean(ratios) * length * n_layers)`` in total (largest
    remainder), each within ``[minimum, length]``."""
    n = len(ratios)
    if length <= 0:
        return [0] * n
    minimum = min(minimum, length)
    target = round(sum(ratios) * length)
    target = min(max(target, minimum * n), length * n)
    exact = [min(max(r * length, minimum), length) for r in ratios]
    counts = [int(math.floor(x)) for x in exact]
    order = sorted(range(n), key=lambda i: exact[i] - counts[i], reverse=True)
    short = target - sum(counts)
    i = 0
    while short > 0 and i < 4 * n:  # hand out missing tokens by largest remainder
        j = order[i % n]
        if counts[j] < length:
            counts[j] += 1
            short -= 1
        i += 1
    i = 0
    while short < 0 and i < 4 * n:  # or take back surplus from the smallest remainders
        j = order[-1 - (i % n)]
        if counts[j] > minimum:
            counts[j] -= 1
            short += 1
        i += 1
    return counts


@dataclass(frozen=True)
class UniformAllocator:
    """Every layer keeps the same fraction."""

    def ratios(self, budget: float, n_layers: int, entropies: list[float] | None = None) -> list[float]:
        return [budget] * n_layers


@dataclass(frozen=True)
class PyramidAllocator:
    """PyramidKV: a linear pyramid from the first layer (largest) to the last (smallest), with
    ``max/min = 2*beta - 1`` before clamping (kvpress's formula: min = mean/beta, max = 2*mean - min)."""

    beta: float = 20.0

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

    def ratios(self, budget: float, n_layers: int, entropies: list[float] | None = None) -> list[float]:
        if not entropies:
            return [budget] * n_layers
        m = max(entropies)
        weights = [math.exp((e - m) / self.temperature) for e in entropies]
        z = sum(weights)
        weights = [w / z * n_layers for w in weights]  # mean 1
        low = min(self.min_ratio, budget)
        high = max(self.max_ratio, budget)
        return clamp_to_mean(weights, budget, low, high)
