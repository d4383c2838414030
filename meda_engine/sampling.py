"""Next-token choice per row: greedy at temperature 0, else temperature + nucleus (top-p) sampling
with a per-request generator (reproducible with a seed)."""

from __future__ import annotations

import torch

from .config import GenerationConfig


def make_generators(configs: list[GenerationConfig], device: torch.device) -> list[torch.Generator | None]:
    gens: list[torch.Generator | None] = []
    for cfg in configs:
        if cfg.temperature == 0:
            gens.append(None)
            continue
        g = torch.Generator(device=device)
        if cfg.seed is not None:
            g.manual_seed(int(cfg.seed))
        else:
            g.seed()
        gens.append(g)
    return gens


def next_tokens(logits: torch.Tensor, configs: list[GenerationConfig],
                generators: list[torch.Generator | None]) -> torch.Tensor:
    """``logits (B, V)`` -> token ids ``(B,)``."""
    out = torch.argmax(logits, dim=-1)
    for b, cfg in enumerate(configs):
        if cfg.temperature == 0:
            continue
        probs = torch.softmax(logits[b].float() / cfg.temperature, dim=-1)
        if cfg.top_p < 1.0:
            sorted_p, order = torch.sort(probs, descending=True)
            keep = torch.cumsum(sorted_p, dim=0) - sorted_p < cfg.top_p  # always keeps the top token
            sorted_p = sorted_p * keep
            probs = torch.zeros_like(probs).scatter_(0, order, sorted_p)
        out[b] = torch.multinomial(probs / probs.sum(), 1, generator=generators[b])[0]
    return out
