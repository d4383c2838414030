"""Token selection inside one layer of one request: which prompt positions each KV head keeps."""

from __future__ import annotations

import torch


def recent_window(window: int, n_keep: int) -> int:
    """Recent tokens force-kept: the configured window, but at most half of the layer's budget, so
    the scorer always chooses at least half of what is kept."""
    return max(0, min(window, n_keep // 2))


def select_tokens(scores: torch.Tensor, n_keep: int, *, modality: torch.Tensor, window: int,
                  text_prior: bool, keep_all_text: bool) -> torch.Tensor:
    """Indices ``(H_kv, n)`` (ascending) of the prompt tokens to keep, per KV head.

    ``scores (H_kv, L)``: higher is more important. ``modality (L,)``: 0 for text. Rules, in order:

    * the last ``recent_window(window, n_keep)`` positions are always kept;
    * with ``text_prior``, every text token ranks above every visual token (LOOK-M / MEDA), inside the
      budget: if the budget is smaller than the text, the best-scored text tokens win;
    * with ``keep_all_text``, all text tokens are kept in addition to the budget (the released MEDA
      code), so ``n`` may exceed ``n_keep``;
    * the rest of the budget goes to the top-scored positions.
    """
    n_kv, length = scores.shape
    n_keep = max(0, min(n_keep, length))
    if n_keep >= length:
        return torch.arange(length, device=scores.device)[None].expand(n_kv, -1).clone()
    s = scores.float().clone()
    is_text = (modality == 0).to(s.device)
    big = float(s.abs().max()) + 1.0 if s.numel() else 1.0
    if text_prior:
        s[:, is_text] += 2 * big  # above any visual score
    w = recent_window(window, n_keep)
    forced = torch.zeros(length, dtype=torch.bool, device=s.device)
    if w:
        forced[length - w:] = True
    if keep_all_text:
        forced |= is_text
    n_forced = int(forced.sum())
    n_free = max(0, n_keep - min(w, n_keep)) if keep_all_text else max(0, n_keep - n_forced)
    s[:, forced] = float("inf")
    n_total = min(length, n_forced + n_free)
    idx = torch.topk(s, n_total, dim=-1).indices
    return torch.sort(idx, dim=-1).values
