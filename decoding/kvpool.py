"""The engine's KV cache: a pool of row slots, allocated once, written in place.

Layout. One buffer per model holds every layer's keys and values, `[2 * layers, R, H, L, d]`
(R row slots of L token slots each; entry 2i is layer i's keys, 2i+1 its values). A row gets a
free slot when it joins; its committed tokens sit at token slots `[0, lengths[r])`, token slot p
holding position p (prompts are stored left-aligned: no padding, no holes). The buffer is never
reallocated or compacted as a whole: a finish frees the slot, a join writes the new row's prompt
into a free slot, and when rows finish below others the engine moves the highest rows down into
the freed slots (`move`: those rows' tokens only), so the occupied slots stay a prefix.

A forward over the rows `[0, rows)` writes its Q new tokens as a *block* at token slots
`[head, head + Q)`, the same for every row, with head = the longest committed row (the host knows
every length, so this costs no sync). Each query sees its row's committed slots and the block
slots its visibility pattern allows; the gap between a shorter row's length and `head` holds
stale data that the mask hides. Committing (`commit`) moves, per row, the block slots it keeps
to the end of its own committed tokens, in one gather and one scatter over the stacked buffer
(not per layer): bytes moved are proportional to the tokens accepted, and a row's length grows
by exactly what it accepted.

Reads stop at `head + Q`, the active rows' longest length plus the block, never the pool's L,
and rows past the occupied prefix are not touched: a step's batch is one slice of the buffer.

Dimensions: R row slots, L token slots per row, B rows in a forward (a prefix of the slots),
Q block tokens, A block slots committed per row.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass

import torch
from torch import Tensor
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from .consts import arange


@dataclass(frozen=True)
class KVShape:
    """What one token slot costs in a model's cache."""

    layers: int
    kv_heads: int
    head_dim: int
    dtype: torch.dtype

    @classmethod
    def of(cls, model) -> "KVShape":
        from .families import adapter

        cfg = adapter(model).text_config(model.config)
        heads = cfg.num_attention_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        dtype = next(model.parameters()).dtype
        return cls(cfg.num_hidden_layers, getattr(cfg, "num_key_value_heads", None) or heads, head_dim, dtype)

    @property
    def bytes_per_token(self) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim * torch.empty(0, dtype=self.dtype).element_size()


class PoolLayer(DynamicLayer):
    """One layer's view of the pool for the forward in progress (what transformers' attention
    calls `update` on): writes the block's keys/values at `[head, head + Q)` of rows `[0, rows)`
    and returns the keys/values of token slots `[0, head + Q)`."""

    def __init__(self, keys: Tensor, values: Tensor):
        super().__init__()
        self._k, self._v = keys, values      # [R, H, L, d] views of the pool's buffer
        self.rows = 0
        self.head = 0
        self.is_initialized = True
        self.device = keys.device

    @property
    def keys(self) -> Tensor:
        return self._k[: self.rows, :, : self.head]

    @keys.setter
    def keys(self, value) -> None:   # DynamicLayer.__init__ assigns None; the pool owns the storage
        pass

    @property
    def values(self) -> Tensor:
        return self._v[: self.rows, :, : self.head]

    @values.setter
    def values(self, value) -> None:
        pass

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        end = self.head + key_states.shape[2]
        self._k[: self.rows, :, self.head: end] = key_states
        self._v[: self.rows, :, self.head: end] = value_states
        return self._k[: self.rows, :, :end], self._v[: self.rows, :, :end]

    def get_seq_length(self) -> int:
        return self.head


class PoolCache(DynamicCache):
    """The transformers `Cache` a forward over the pool is given (its layers are `PoolLayer`s)."""

    def __init__(self, layers: list[PoolLayer]):
        super().__init__()
        self.layers = layers


class KeptBuffer:
    """A pool buffer a finished decode leaves for the next one of the same size.

    A fresh CPU buffer of hundreds of MB pays its page faults again on every `generate` call (the
    demo pair's 128-row target pool: 140-960 ms, against ~23 ms to zero a kept one); CUDA's caching
    allocator already reuses freed blocks. The kept buffer is freed before one of another size is
    allocated, so the peak memory stays one buffer."""

    def __init__(self):
        self._buffer: Tensor | None = None
        self._lock = threading.Lock()

    def keep(self, buffer: Tensor) -> None:
        with self._lock:
            self._buffer = buffer

    def take(self, size: tuple, dtype: torch.dtype, device: torch.device) -> Tensor:
        """A zeroed buffer of `size`: the kept one when it matches, else a new one."""
        with self._lock:
            kept, self._buffer = self._buffer, None
        if kept is not None and tuple(kept.shape) == tuple(size) and kept.dtype == dtype and kept.device == device:
            return kept.zero_()
        del kept                                                  # freed before the new allocation
        return torch.zeros(size, dtype=dtype, device=device)


class KVPool:
    """Row slots of one model's KV cache (module doc)."""

    def __init__(self, shape: KVShape, rows: int, length: int, device, window: int | None = None,
                 layer_kinds: tuple[str, ...] | None = None, kept: KeptBuffer | None = None):
        self.shape = shape
        self.window = window              # sliding-window size (models.sliding_window), or None
        self.layer_kinds = layer_kinds    # per-layer attention kinds when full and sliding layers mix
        self.device = torch.device(device)
        # zeros, not empty: masked slots are multiplied by exactly 0 in attention, so they must be finite
        size = (2 * shape.layers, rows, shape.kv_heads, length, shape.head_dim)
        self.kv = (kept or KeptBuffer()).take(size, shape.dtype, self.device)
        self.lengths = torch.zeros(rows, dtype=torch.long, device=self.device)   # [R] committed tokens
        self.host_lengths = [0] * rows
        self._build_cache()

    def _build_cache(self) -> None:
        self.cache = PoolCache([PoolLayer(self.kv[2 * i], self.kv[2 * i + 1]) for i in range(self.shape.layers)])
        if self.layer_kinds is not None:   # transformers reads each layer's kind off the cache
            for layer, kind in zip(self.cache.layers, self.layer_kinds):
                layer.is_sliding = kind == "sliding_attention"

    @property
    def rows(self) -> int:
        return self.kv.shape[1]

    @property
    def length(self) -> int:
        return self.kv.shape[3]

    @property
    def nbytes(self) -> int:
        return self.kv.numel() * self.kv.element_size()

    def head(self, rows: int) -> int:
        """Where a block goes for rows [0, rows): after the longest committed row."""
        return max(self.host_lengths[:rows], default=0)

    # -- growth (rare: the engine sizes the pool up front; see capacity.py) -------------------------
    def resize(self, rows: int, length: int) -> None:
        """At least `rows` x `length` slots; copies the buffer once when it must grow."""
        rows, length = max(rows, self.rows), max(length, self.length)
        if rows == self.rows and length == self.length:
            return
        kv = torch.zeros(self.kv.shape[0], rows, self.kv.shape[2], length, self.kv.shape[4], dtype=self.kv.dtype,
                         device=self.device)
        kv[:, : self.rows, :, : self.length] = self.kv
        lengths = torch.zeros(rows, dtype=torch.long, device=self.device)
        lengths[: self.rows] = self.lengths
        self.kv, self.lengths = kv, lengths
        self.host_lengths += [0] * (rows - len(self.host_lengths))
        self._build_cache()

    # -- a forward over the pool ----------------------------------------------------------------
    def begin(self, rows: int, head: int) -> PoolCache:
        """Point every layer at rows [0, rows) with the block at `head`; returns the cache to pass."""
        for layer in self.cache.layers:
            layer.rows, layer.head = rows, head
        return self.cache

    def block_mask(self, rows: int, head: int, block_vis: Tensor, dtype: torch.dtype, query_pos: Tensor,
                   block_pos: Tensor, committed: Tensor | None = None) -> Tensor | dict:
        """Float mask [B, 1, Q, head + K] for a block forward: committed slots of the row, then the
        block slots `block_vis` ([B, Q, K] bool, or float additive) allows. query_pos [B, Q] and
        block_pos [B, K] (positions of the queries and of the block slots) matter only with a
        sliding window. `committed` ([B, 1, head] float, from `committed_mask`) may be passed
        when several forwards share it."""
        if committed is None:
            committed = self.committed_mask(rows, head, dtype)
        B, Q, _ = block_vis.shape
        block = float_mask(block_vis, dtype) if block_vis.dtype == torch.bool else block_vis
        mask = torch.cat([committed.expand(B, Q, head), block], dim=-1).unsqueeze(1)
        return mask if self.window is None else self.windowed(mask, head, query_pos, block_pos)

    def windowed(self, mask: Tensor, head: int, query_pos: Tensor, block_pos: Tensor) -> Tensor | dict:
        """`mask` [B, 1, Q, head + K] with keys `window` or more positions behind a query hidden (a
        committed slot j holds position j); a dict by layer kind when full and sliding layers mix."""
        B = query_pos.shape[0]
        key_pos = torch.cat([arange(head, self.device).expand(B, head), block_pos], dim=-1)        # [B, head + K]
        far = (query_pos.unsqueeze(-1) - key_pos.unsqueeze(1)) >= self.window                     # [B, Q, head + K]
        windowed = mask.masked_fill(far.unsqueeze(1), torch.finfo(mask.dtype).min)
        if self.layer_kinds is None:
            return windowed
        return {"full_attention": mask, "sliding_attention": windowed}

    def committed_mask(self, rows: int, head: int, dtype: torch.dtype) -> Tensor:
        """[B, 1, head] float: 0 on a row's committed token slots, dtype-min on the rest."""
        seen = arange(head, self.device) < self.lengths[:rows, None]
        return float_mask(seen, dtype).unsqueeze(1)

    def commit(self, rows: int, head: int, src: Tensor, count: Tensor) -> None:
        """Per row b, keep block slots head + src[b, :count[b]] as its next committed tokens.

        src: [B, A] long, block-relative (increasing within a row's kept prefix); count: [B] long.
        Slots past count[b] are written too (they land past the row's new length, where nothing
        reads them), so the copy is one gather and one scatter for every layer at once."""
        B, A = src.shape
        kv = self.kv[:, :rows]
        n, _, H, _, d = kv.shape
        dst = self.lengths[:rows, None] + arange(A, self.device)                     # [B, A]
        moved = kv.gather(3, (src + head).view(1, B, 1, A, 1).expand(n, B, H, A, d))
        kv.scatter_(3, dst.view(1, B, 1, A, 1).expand(n, B, H, A, d), moved)
        self.lengths[:rows] += count

    # -- rows joining and leaving -------------------------------------------------------------------
    def write_prompt(self, slots: Tensor, layers_kv: list[tuple[Tensor, Tensor]], pad: Tensor, lengths: list[int]) -> None:
        """Store prefilled rows, left-aligned, in `slots` ([n] long).

        layers_kv: per layer (keys, values) [n, H, T, d] of a left-padded prefill; pad: [n] padding
        tokens per row; lengths: tokens per row (host ints). Only those rows' slots are written."""
        n, _, T, _ = layers_kv[0][0].shape
        # Layer by layer into the pool: no [2*layers, n, H, T, d] temporary (a fresh buffer that large
        # cost 100-400 ms of page faults per 128-row prefill on a CPU), and no gather when no row is
        # padded (captions of one prompt: every row has the same length).
        padded = min(lengths) < T
        if padded:
            index = (pad[:, None] + arange(T, self.device)).clamp_(max=T - 1).view(n, 1, T, 1)   # [n, 1, T, 1]
        for i, t in enumerate(u for kv in layers_kv for u in kv):                  # [n, H, T, d] each
            self.kv[i, :, :, :T].index_copy_(0, slots, (t.gather(2, index.expand_as(t)) if padded else t).to(self.kv.dtype))
        self.lengths[slots] = torch.tensor(lengths, dtype=torch.long, device=self.device)
        for s, length in zip(slots.tolist(), lengths):
            self.host_lengths[s] = length

    def move(self, src: list[int], dst: list[int]) -> None:
        """Move rows `src` into free slots `dst` (their tokens only: rows x their length are copied)."""
        n = max(self.host_lengths[s] for s in src)
        si = torch.tensor(src, dtype=torch.long, device=self.device)
        di = torch.tensor(dst, dtype=torch.long, device=self.device)
        self.kv[:, di, :, :n] = self.kv[:, si, :, :n]
        self.lengths[di] = self.lengths[si]
        self.lengths[si] = 0
        for s, d in zip(src, dst):
            self.host_lengths[d], self.host_lengths[s] = self.host_lengths[s], 0

    def release(self, slots: list[int]) -> None:
        """Free slots (their data stays, unread: length 0)."""
        index = torch.tensor(slots, dtype=torch.long, device=self.device)
        self.lengths[index] = 0
        for s in slots:
            self.host_lengths[s] = 0

    def advance_host(self, rows: int, counts: list[int]) -> None:
        """Mirror on the host what `commit` did on the device (counts read once per step)."""
        for b in range(rows):
            self.host_lengths[b] += counts[b]


_MASK_VALUES: dict = {}


def float_mask(allowed: Tensor, dtype: torch.dtype) -> Tensor:
    """bool -> float additive mask (0 where allowed, dtype-min elsewhere), in one op."""
    if torch.compiler.is_compiling():
        return torch.zeros((), dtype=dtype, device=allowed.device).masked_fill(~allowed, torch.finfo(dtype).min)
    key = ("mask", dtype, str(allowed.device))
    pair = _MASK_VALUES.get(key)
    if pair is None:
        pair = _MASK_VALUES[key] = (torch.zeros((), dtype=dtype, device=allowed.device),
                               torch.tensor(torch.finfo(dtype).min, dtype=dtype, device=allowed.device))
    return torch.where(allowed, *pair)
