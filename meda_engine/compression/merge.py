"""Reducers: keep the selected KV pairs and fold the evicted ones into them (LOOK-M / MEDA merging).

Each evicted token of a KV head is assigned to its *pivot*, the kept token of the same head whose
key is most cosine-similar (optionally only among kept tokens of its own modality). Then, per kept
token ``j`` with assigned evicted tokens ``E_j``:

* ``average``:  ``V_j <- mean(V_j, V_e for e in E_j)``           (MEDA's released code)
* ``pivot``:    ``V_j <- mean(V_j, (V_e + V_j)/2 for e in E_j)``  (LOOK-M "pivotal")
* ``weighted``: ``V_j <- (V_j + sum_e s_e V_e) / (1 + sum_e s_e)``, ``s_e`` = the clamped similarity

Keys are merged the same way only with ``merge_keys`` (off by default: a merged post-RoPE key no
longer encodes one position).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def gather_tokens(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``x (H, L, D)``, ``idx (H, n)`` -> ``(H, n, D)``."""
    return torch.gather(x, 1, idx[..., None].expand(-1, -1, x.shape[-1]))


def evicted_indices(keep_idx: torch.Tensor, length: int) -> torch.Tensor:
    """Complement of ``keep_idx (H, n)`` in ``[0, length)``, per head: ``(H, length - n)``."""
    n_kv = keep_idx.shape[0]
    mask = torch.ones((n_kv, length), dtype=torch.bool, device=keep_idx.device)
    mask.scatter_(1, keep_idx, False)
    return torch.nonzero(mask)[:, 1].view(n_kv, -1)


@dataclass(frozen=True)
class KVMerger:
    mode: str = "average"  # average | pivot | weighted
    merge_keys: bool = False
    within_modality: bool = True
    chunk_bytes: int = 64 * 2**20

    def reduce(self, keys: torch.Tensor, values: torch.Tensor, keep_idx: torch.Tensor,
               modality: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``keys``/``values (H, L, D)`` of one request in one layer -> kept and merged ``(H, n, D)``."""
        kept_k = gather_tokens(keys, keep_idx)
        kept_v = gather_tokens(values, keep_idx)
        length = keys.shape[1]
        if keep_idx.shape[1] >= length or keep_idx.shape[1] == 0:
            return kept_k, kept_v
        ev_idx = evicted_indices(keep_idx, length)
        ev_k = gather_tokens(keys, ev_idx)
        ev_v = gather_tokens(values, ev_idx)
        pivot, sim, ok = self._pivots(kept_k, ev_k, keep_idx, ev_idx, modality.to(keys.device))
        new_v = self._fold(kept_v, ev_v, pivot, sim, ok)
        new_k = self._fold(kept_k, ev_k, pivot, sim, ok) if self.merge_keys else kept_k
        return new_k, new_v

    def _pivots(self, kept_k, ev_k, keep_idx, ev_idx, modality):
        """Pivot (index into kept) of each evicted token, its similarity, and whether it merges."""
        n_kv, n_ev, _ = ev_k.shape
        kn = F.normalize(kept_k.float(), dim=-1)
        en = F.normalize(ev_k.float(), dim=-1)
        kept_text = modality[keep_idx] == 0  # (H, n)
        ev_text = modality[ev_idx] == 0  # (H, m)
        pivot = torch.empty((n_kv, n_ev), dtype=torch.long, device=kept_k.device)
        best = torch.empty((n_kv, n_ev), dtype=torch.float32, device=kept_k.device)
        step = max(1, self.chunk_bytes // max(1, n_kv * kn.shape[1] * 4))
        for s in range(0, n_ev, step):
            e = min(n_ev, s + step)
            sim = torch.matmul(en[:, s:e], kn.transpose(1, 2))  # (H, c, n)
            if self.within_modality:
                same = ev_text[:, s:e, None] == kept_text[:, None, :]
                sim = sim.masked_fill(~same, float("-inf"))
            best[:, s:e], pivot[:, s:e] = sim.max(dim=-1)
        ok = torch.isfinite(best)  # no kept token of the same modality -> not merged
        return pivot, best.nan_to_num(neginf=0.0), ok

    def _fold(self, kept, evicted, pivot, sim, ok):
        kept32, ev32 = kept.float(), evicted.float()
        d = kept.shape[-1]
        if self.mode == "pivot":
            ev32 = (ev32 + torch.gather(kept32, 1, pivot[..., None].expand(-1, -1, d))) / 2
        if self.mode == "weighted":
            w = sim.clamp(min=0.0) * ok
        else:
            w = ok.float()
        num = kept32.clone()
        den = torch.ones(kept.shape[:2], dtype=torch.float32, device=kept.device)
        num.scatter_add_(1, pivot[..., None].expand(-1, -1, d), ev32 * w[..., None])
        den.scatter_add_(1, pivot, w)
        return (num / den[..., None]).to(kept.dtype)
