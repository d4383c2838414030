"""Scorers: how important each prompt token is, per KV head. Higher is kept first.

Every scorer returns ``(H_kv, L)`` float32 for one request in one layer, from the statistics the
attention function recorded during prefill (`meda_engine.attention.RowStats`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..attention import RowPlan, RowStats


@dataclass(frozen=True)
class AccumulatedAttentionScorer:
    """H2O / LOOK-M / MEDA: the attention each key receives, summed over *all* prompt queries
    (``A_s = sum_i A[i, :]``), averaged over the query heads of each KV head."""

    def plan(self, plan: RowPlan) -> None:
        plan.column_sums = True

    def score(self, stats: RowStats, n_kv_heads: int, length: int, device) -> torch.Tensor:
        assert stats.column_sums is not None, "column sums were not recorded"
        return stats.column_sums


@dataclass(frozen=True)
class WindowAttentionScorer:
    """SnapKV / PyramidKV: attention from the last ``window`` prompt queries, summed, then smoothed
    with an average pool of width ``pool_kernel`` along the keys (keeps neighbours of hits)."""

    window: int = 16
    pool_kernel: int = 5

    def plan(self, plan: RowPlan) -> None:
        plan.window = max(1, self.window)

    def score(self, stats: RowStats, n_kv_heads: int, length: int, device) -> torch.Tensor:
        assert stats.window_scores is not None, "window scores were not recorded"
        s = stats.window_scores
        if self.pool_kernel > 1:
            s = F.avg_pool1d(s[:, None], self.pool_kernel, stride=1, padding=self.pool_kernel // 2,
                             count_include_pad=False)[:, 0]
        return s


@dataclass(frozen=True)
class RecencyScorer:
    """StreamingLLM: the first ``sink`` tokens, then the most recent ones."""

    sink: int = 4

    def plan(self, plan: RowPlan) -> None:
        pass

    def score(self, stats: RowStats, n_kv_heads: int, length: int, device) -> torch.Tensor:
        s = torch.arange(length, dtype=torch.float32, device=device)
        s[: self.sink] = float(length) + 1.0
        return s[None].expand(n_kv_heads, -1).clone()


@dataclass(frozen=True)
class ReconstructionScorer:
    """KVzip (Kim et al. 2025): how much the model needs each context token to *repeat the context*.
    The context is followed, in the same prefill forward, by "Repeat the previous context exactly."
    and the context itself (`ModelAdapter.reconstruction_ids`); a token's score is the largest
    attention it receives from any reconstruction query and any query head of its KV head. The
    scores do not depend on the question, which is what the query-agnostic protocol needs. The first
    ``sink`` tokens are always kept, as KVzip does."""

    sink: int = 4

    def plan(self, plan: RowPlan) -> None:
        plan.reconstruct = True

    def score(self, stats: RowStats, n_kv_heads: int, length: int, device) -> torch.Tensor:
        assert stats.recon_scores is not None, "reconstruction scores were not recorded"
        s = stats.recon_scores.clone()
        s[:, : self.sink] = float(s.max()) + 1.0
        return s
