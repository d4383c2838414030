"""Methods are named compositions of a scorer, an allocator and a reducer.

| method       | scorer                       | allocator        | reducer                       |
|--------------|------------------------------|------------------|-------------------------------|
| full         | -                            | -                | keep everything               |
| streamingllm | recency + sink tokens        | uniform          | evict                         |
| h2o          | accumulated attention (all)  | uniform          | evict                         |
| snapkv       | window attention, pooled     | uniform          | evict                         |
| pyramidkv    | window attention, pooled     | pyramid          | evict                         |
| lookm        | accumulated + text prior     | uniform          | merge (average)               |
| meda         | accumulated + text prior     | entropy          | merge (average)               |
| meda-window  | window attention, pooled     | entropy          | evict                         |
| kvzip        | context reconstruction (max) | uniform          | evict                         |
| kvzip-global | context reconstruction (max) | global (scores)  | evict                         |

H2O here is the one-shot variant (compress once after prefill) so every method runs on equal terms.

``meda-window`` is MEDA's entropy allocation (the same statistic, softmax and clamp as ``meda``) on
SnapKV's observation-window scorer, selection and eviction: it differs from ``snapkv`` *only* in the
allocation, so ``meda-window`` vs ``snapkv`` isolates entropy-driven vs uniform layer budgets on a
query-aware scorer (``meda`` vs ``lookm`` does the same on accumulated attention).

``kvzip`` scores the context by how much the model attends to it while repeating it (KVzip, Kim et
al. 2025, the query-agnostic press of kvpress), at a uniform budget per layer and KV head (kvpress's
``KVzipPress(layerwise=True)``; its default ranks all layers and heads together, which a cache with one
length per layer cannot hold). The reconstruction runs in the prefill forward itself (context, then
the repeat prompt), so it costs a second pass over the context's length; its K/V are dropped before
compression. Text prompts only: the model cannot repeat pixels.

``kvzip-global`` is ``kvzip`` with kvpress's default allocation over the layers (`GlobalScoreAllocator`:
all layers' scores ranked together, each layer keeping the share its entries won); it differs from
``kvzip`` only in the allocation, as ``meda-window`` from ``snapkv``. kvpress's default also lets the
heads of one layer keep different counts; here each head of a layer keeps the layer's count.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..attention import RowPlan
from ..config import CompressionConfig
from .allocators import EntropyAllocator, GlobalScoreAllocator, PyramidAllocator, UniformAllocator
from .merge import KVMerger
from .scorers import AccumulatedAttentionScorer, ReconstructionScorer, RecencyScorer, WindowAttentionScorer


@dataclass(frozen=True)
class Method:
    config: CompressionConfig
    scorer: Any | None
    allocator: Any | None
    merger: KVMerger | None

    @property
    def name(self) -> str:
        return self.config.method

    @property
    def uses_entropy(self) -> bool:
        return isinstance(self.allocator, EntropyAllocator)

    def row_plan(self, modality, length: int) -> tuple[RowPlan, str | None]:
        """Statistics to record during prefill, and the entropy variant that will be used."""
        plan = RowPlan(modality=modality, score_queries=self.config.score_queries)
        if self.scorer is None or self.config.keep_fraction(length) >= 1.0:
            return plan, None
        self.scorer.plan(plan)
        variant = None
        if self.uses_entropy:
            has_text = bool((modality == 0).any())
            has_visual = bool((modality != 0).any())
            variant = self.config.entropy
            if variant == "paper" and not (has_text and has_visual):
                variant = "code"  # cross-modal entropy needs both modalities
            if variant == "paper":
                plan.cross_modal = True
            else:
                plan.row_entropy = True
        return plan, variant


def build_method(cfg: CompressionConfig) -> Method:
    m = cfg.method
    merge = cfg.merge_mode
    merger = None
    if merge != "none":
        merger = KVMerger(mode=merge, merge_keys=cfg.merge_keys, within_modality=cfg.merge_within_modality)
    if m == "full":
        return Method(cfg, None, None, None)
    if m == "streamingllm":
        return Method(cfg, RecencyScorer(sink=cfg.sink), UniformAllocator(), merger)
    if m in ("h2o", "lookm"):
        return Method(cfg, AccumulatedAttentionScorer(), UniformAllocator(), merger)
    if m == "snapkv":
        return Method(cfg, WindowAttentionScorer(cfg.window, cfg.pool_kernel), UniformAllocator(), merger)
    if m == "pyramidkv":
        return Method(cfg, WindowAttentionScorer(cfg.window, cfg.pool_kernel), PyramidAllocator(cfg.pyramid_beta),
                      merger)
    if m == "meda":
        alloc = EntropyAllocator(cfg.temperature, cfg.min_layer_ratio, cfg.max_layer_ratio)
        return Method(cfg, AccumulatedAttentionScorer(), alloc, merger)
    if m == "meda-window":
        alloc = EntropyAllocator(cfg.temperature, cfg.min_layer_ratio, cfg.max_layer_ratio)
        return Method(cfg, WindowAttentionScorer(cfg.window, cfg.pool_kernel), alloc, merger)
    if m == "kvzip":
        return Method(cfg, ReconstructionScorer(sink=cfg.sink), UniformAllocator(), merger)
    if m == "kvzip-global":
        alloc = GlobalScoreAllocator(cfg.min_layer_ratio, cfg.max_layer_ratio)
        return Method(cfg, ReconstructionScorer(sink=cfg.sink), alloc, merger)
    raise AssertionError(m)  # CompressionConfig validated the name
