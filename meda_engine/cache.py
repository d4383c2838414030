"""The engine's KV cache: per-layer buffers whose rows may hold different numbers of tokens.

Layout of layer ``l``: ``keys``/``values`` of shape ``(B, H_kv, capacity_l, D)``, row ``b`` valid in slots
``[0, lengths[b])``. Layers differ in capacity (after compression each layer holds only its own kept
tokens plus room for the tokens still to be generated), rows differ in length (different prompts
and budgets). A forward that writes ``q`` tokens puts row ``b``'s tokens at slots
``offsets[b] .. offsets[b] + q``, where ``offsets`` are the lengths before the write; with right
padding this makes the mask of every layer simply ``key_slot <= offsets[b] + query_index`` (pad keys
of a row sit after its real tokens, so only that row's pad queries can see them).

Nothing here is shared between calls: an `Engine.generate` call builds its own cache.
"""

from __future__ import annotations

import torch

from .hf_glue import Cache


class RaggedLayer:
    """One layer's K/V storage. ``lengths``/``offsets`` live on the device (masks) and on the host
    (slicing without a device sync)."""

    is_sliding = False
    is_compileable = False

    def __init__(self, batch_size: int, reserve: int):
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None
        self.reserve = reserve
        self.lengths_host = [0] * batch_size
        self.offsets_host = [0] * batch_size
        self.lengths: torch.Tensor | None = None
        self.offsets: torch.Tensor | None = None

    @property
    def capacity(self) -> int:
        return 0 if self.keys is None else int(self.keys.shape[2])

    def _allocate(self, like: torch.Tensor, capacity: int) -> None:
        b, h, _, d = like.shape
        # Zeros, not empty: slots past a row's length are masked, but garbage (NaN) in a masked value
        # slot would still turn 0 * NaN into NaN in the probability-times-value product.
        self.keys = torch.zeros((b, h, capacity, d), dtype=like.dtype, device=like.device)
        self.values = torch.zeros_like(self.keys)

    def _grow(self, needed: int) -> None:
        assert self.keys is not None and self.values is not None
        new_keys = torch.zeros((*self.keys.shape[:2], needed + self.reserve, self.keys.shape[3]),
                               dtype=self.keys.dtype, device=self.keys.device)
        new_values = torch.zeros_like(new_keys)
        new_keys[:, :, : self.keys.shape[2]] = self.keys
        new_values[:, :, : self.values.shape[2]] = self.values
        self.keys, self.values = new_keys, new_values

    def write(self, key_states: torch.Tensor, value_states: torch.Tensor, new_lengths: list[int],
              new_lengths_dev: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store ``(B, H_kv, q, D)`` new states; return the views the attention reads."""
        q = key_states.shape[2]
        if self.keys is None:
            self._allocate(key_states, q + self.reserve)
            self.offsets_host = [0] * len(new_lengths)
            self.offsets = torch.zeros(len(new_lengths), dtype=torch.long, device=key_states.device)
            self.keys[:, :, :q] = key_states
            self.values[:, :, :q] = value_states
        else:
            assert self.lengths is not None
            self.offsets_host = list(self.lengths_host)
            self.offsets = self.lengths
            end = max(self.offsets_host) + q
            if end > self.capacity:
                self._grow(end)
            rows = torch.arange(key_states.shape[0], device=key_states.device)
            if q == 1:
                self.keys[rows, :, self.offsets] = key_states[:, :, 0]
                self.values[rows, :, self.offsets] = value_states[:, :, 0]
            else:
                slots = self.offsets[:, None] + torch.arange(q, device=key_states.device)[None]
                self.keys[rows[:, None], :, slots] = key_states.transpose(1, 2)
                self.values[rows[:, None], :, slots] = value_states.transpose(1, 2)
        self.lengths_host = [o + n for o, n in zip(self.offsets_host, new_lengths)]
        self.lengths = self.offsets + new_lengths_dev
        extent = max(self.offsets_host) + q
        return self.keys[:, :, :extent], self.values[:, :, :extent]

    def replace(self, keys: torch.Tensor, values: torch.Tensor, lengths: list[int]) -> None:
        """Install compacted buffers (the old ones are released when no longer referenced)."""
        self.keys, self.values = keys, values
        self.lengths_host = list(lengths)
        self.lengths = torch.tensor(lengths, dtype=torch.long, device=keys.device)
        self.offsets_host = list(lengths)
        self.offsets = self.lengths

    # -- accounting: measured from the tensors held ----------------------------------------------
    def row_bytes(self, row: int) -> int:
        """Bytes of K and V that row ``row`` holds in its valid slots."""
        if self.keys is None:
            return 0
        n = self.lengths_host[row]
        k = self.keys[row, :, :n]
        v = self.values[row, :, :n]
        return k.numel() * k.element_size() + v.numel() * v.element_size()

    def allocated_bytes(self) -> int:
        if self.keys is None:
            return 0
        return self.keys.untyped_storage().nbytes() + self.values.untyped_storage().nbytes()


class RaggedKVCache(Cache):
    """A transformers ``Cache`` whose ``update`` writes into `RaggedLayer` buffers.

    ``begin_forward(new_lengths)`` must be called before each model forward with the number of real
    (non-pad) tokens each row contributes; the attention function reads each layer's ``offsets``.
    """

    def __init__(self, n_layers: int, batch_size: int, reserve: int):
        super().__init__(layers=[RaggedLayer(batch_size, reserve) for _ in range(n_layers)])
        self.n_rows = batch_size
        self.new_lengths: list[int] = [0] * batch_size
        self._new_lengths_dev: torch.Tensor | None = None

    @classmethod
    def from_tensors(cls, layers: list[tuple[torch.Tensor, torch.Tensor, list[int]]], reserve: int) -> "RaggedKVCache":
        """A cache already holding ``(keys, values, row_lengths)`` per layer, keys/values ``(B, H_kv, n_l, D)``,
        with ``reserve`` free slots per layer (benchmarks build synthetic caches with it)."""
        cache = cls(len(layers), layers[0][0].shape[0], reserve)
        for layer, (k, v, lengths) in zip(cache.layers, layers):
            b, h, n, d = k.shape
            keys = torch.zeros((b, h, n + reserve, d), dtype=k.dtype, device=k.device)
            values = torch.zeros_like(keys)
            keys[:, :, :n] = k
            values[:, :, :n] = v
            layer.reserve = reserve
            layer.replace(keys, values, list(lengths))
        return cache

    def begin_forward(self, new_lengths: list[int], device: torch.device) -> None:
        if len(new_lengths) != self.n_rows:
            raise ValueError(f"expected {self.n_rows} row lengths, got {len(new_lengths)}")
        self.new_lengths = list(new_lengths)
        self._new_lengths_dev = torch.tensor(new_lengths, dtype=torch.long, device=device)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        assert self._new_lengths_dev is not None, "begin_forward() was not called"
        return self.layers[layer_idx].write(key_states, value_states, self.new_lengths, self._new_lengths_dev)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return max(self.layers[layer_idx].lengths_host, default=0)

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return -1

    def get_mask_sizes(self, query_length: int, layer_idx: int) -> tuple[int, int]:
        return self.get_seq_length(layer_idx) + query_length, 0

    # -- accounting --------------------------------------------------------------------------------
    def row_bytes(self, row: int) -> int:
        return sum(layer.row_bytes(row) for layer in self.layers)

    def allocated_bytes(self) -> int:
        return sum(layer.allocated_bytes() for layer in self.layers)

    def layer_lengths(self, row: int) -> list[int]:
        return [layer.lengths_host[row] for layer in self.layers]


# ---------------------------------------------------------------------------------------------------
# per-row storage: the scheduler's cache
# ---------------------------------------------------------------------------------------------------
def held_bytes(tensors) -> int:
    """Bytes of the storages behind ``tensors``, each storage counted once (deduplicated by its
    data pointer): what the allocator really holds for them, slack and decode room included."""
    seen: dict[int, int] = {}
    for t in tensors:
        if t is None:
            continue
        s = t.untyped_storage()
        seen[s.data_ptr()] = s.nbytes()
    return sum(seen.values())


def row_cache_bytes(cache: "RaggedKVCache") -> int:
    """Storage bytes held by a one-row cache (every layer's K and V, decode room included)."""
    return held_bytes(t for layer in cache.layers for t in (layer.keys, layer.values))


class RowBatchLayer:
    """One layer of a decode step over rows that each own their storage.

    ``rows[b]`` is row ``b``'s own one-row `RaggedLayer` (its tensors are ``(1, H_kv, capacity_l,
    D)`` and hold nothing of any other row). After `RowBatchCache.update`, ``views[b]`` are row
    ``b``'s valid keys and values ``(1, H_kv, n_b, D)``, the token just written included; the decode
    attention reads those views row by row, so no row is padded to another's length.
    """

    is_sliding = False
    is_compileable = False

    def __init__(self, rows: list[RaggedLayer]):
        self.rows = rows
        self.views: list[tuple[torch.Tensor, torch.Tensor]] = []

    @property
    def lengths_host(self) -> list[int]:
        return [r.lengths_host[0] for r in self.rows]


class RowBatchCache(Cache):
    """A transformers ``Cache`` for one decode step over several rows, each a one-row
    `RaggedKVCache` that owns its memory per layer (`RowBatchLayer`).

    A row's storage is exactly its own kept tokens plus its decode room, whatever the other rows
    hold: a row's evicted tokens are free memory for other rows. Nothing is copied into a shared
    padded block; the step writes one token into each row's own buffers.
    """

    def __init__(self, rows: list["RaggedKVCache"]):
        if not rows:
            raise ValueError("a decode step needs at least one row")
        n_layers = len(rows[0].layers)
        super().__init__(layers=[RowBatchLayer([r.layers[l] for r in rows]) for l in range(n_layers)])
        self.rows = rows
        self.n_rows = len(rows)
        self.new_lengths: list[int] = [1] * len(rows)
        self._one: torch.Tensor | None = None

    def begin_forward(self, new_lengths: list[int], device: torch.device) -> None:
        if list(new_lengths) != [1] * self.n_rows:
            raise ValueError("a RowBatchCache step feeds exactly one token per row")
        self._one = torch.ones(1, dtype=torch.long, device=device)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        """``key_states``/``value_states`` ``(B, H_kv, 1, D)``: row ``b``'s goes into row ``b``'s storage."""
        assert self._one is not None, "begin_forward() was not called"
        layer = self.layers[layer_idx]
        layer.views = [
            row.write(key_states[b : b + 1], value_states[b : b + 1], [1], self._one)
            for b, row in enumerate(layer.rows)
        ]
        return key_states, value_states  # unused: the attention reads layer.views

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return max(self.layers[layer_idx].lengths_host, default=0)

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return -1

    def get_mask_sizes(self, query_length: int, layer_idx: int) -> tuple[int, int]:
        return self.get_seq_length(layer_idx) + query_length, 0


def snapshot_lengths(cache: "RaggedKVCache") -> list[int]:
    """A one-row cache's per-layer lengths (to roll back a failed step with `restore_lengths`)."""
    return [layer.lengths_host[0] for layer in cache.layers]


def restore_lengths(cache: "RaggedKVCache", lengths: list[int]) -> None:
    """Forget tokens written after `snapshot_lengths` (their slots are overwritten by the next write)."""
    for layer, n in zip(cache.layers, lengths):
        if layer.keys is None:
            continue
        layer.lengths_host = [n]
        layer.offsets_host = [n]
        layer.lengths = torch.tensor([n], dtype=torch.long, device=layer.keys.device)
        layer.offsets = layer.lengths


def truncate_rows(cache: "RaggedKVCache", lengths: list[int], reserve: int) -> None:
    """Keep only the first ``lengths[b]`` slots of each row, in every layer, in new buffers of
    ``max(lengths) + reserve`` slots (the old, longer ones are released layer by layer). Drops what a
    prefill wrote past the context (KVzip's reconstruction tokens)."""
    for layer in cache.layers:
        if layer.keys is None:
            continue
        b, h, _, d = layer.keys.shape
        new_k = torch.zeros((b, h, max(lengths) + reserve, d), dtype=layer.keys.dtype, device=layer.keys.device)
        new_v = torch.zeros_like(new_k)
        for row, n in enumerate(lengths):
            new_k[row, :, :n] = layer.keys[row, :, :n]
            new_v[row, :, :n] = layer.values[row, :, :n]
        layer.replace(new_k, new_v, list(lengths))
        layer.reserve = reserve


def split_rows(cache: "RaggedKVCache", reserves: list[int]) -> list["RaggedKVCache"]:
    """Give each row of a padded ``B``-row cache its own one-row `RaggedKVCache`: per layer
    ``(1, H_kv, n_b + reserves[b], D)`` holding row ``b``'s valid slots and ``reserves[b]`` free ones
    (its decode room), nothing shared with any other row.

    The padded cache is emptied layer by layer as its rows are copied out (each layer's padded
    buffers are released once copied), so the peak is the padded cache plus one layer's row copies.
    """
    n = cache.n_rows
    if len(reserves) != n:
        raise ValueError(f"expected {n} reserves, got {len(reserves)}")
    out = [RaggedKVCache(len(cache.layers), 1, reserve=r) for r in reserves]
    for l, layer in enumerate(cache.layers):
        assert layer.keys is not None and layer.values is not None
        for b in range(n):
            length = layer.lengths_host[b]
            k, v = layer.keys[b : b + 1, :, :length], layer.values[b : b + 1, :, :length]
            keys = torch.zeros((1, k.shape[1], length + reserves[b], k.shape[3]), dtype=k.dtype, device=k.device)
            values = torch.zeros_like(keys)
            keys[:, :, :length] = k
            values[:, :, :length] = v
            out[b].layers[l].replace(keys, values, [length])
        layer.keys = layer.values = None  # this layer's padded block is released now
        layer.lengths = layer.offsets = None
    return out
