"""A prefill's KV cache: per-row slot positions with holes (left padding), written in place.

The engine's cache is kvpool.KVPool; this one holds what a prefill computes before the engine
stores it in the pool (rows are left-padded there, as `generate` pads them), and serves the
standalone probes that run a block forward over a prompt (models.lean_is_exact,
budget.forward_latency).

Every cache slot carries the position of the token it holds, or HOLE (-1) for a slot that holds
none (left padding, a padding query). Attention masks are built from those positions, so holes
are never seen. Slots [0, committed) hold the prompt; slots after it are temporary until `crop`
drops them. Storage: `SlotCache`, a transformers `DynamicCache` whose layers (`SlotLayer`) write
in place into preallocated buffers instead of concatenating at every forward.

Dimensions: B rows, S cache slots, Q query tokens of one forward, A slots committed per row.
"""
from __future__ import annotations

from functools import partial

import torch
from torch import Tensor
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

HOLE = -1   # slot_pos of a slot that holds no token (left padding, a rejected node, a padded pending token)


class SlotLayer(DynamicLayer):
    """One layer's keys and values in preallocated [B, H, capacity, d] buffers, written in place.

    `keys`/`values` are views of the first `length` slots. Appending writes the new slots after
    them. When it runs out of room the buffer grows by an eighth (at least MIN_GROWTH slots).
    `spare` preallocates: the first update (the prefill) leaves that many free slots after its own.
    """

    MIN_GROWTH = 64   # slots added at least when a layer runs out of room

    def __init__(self, spare: int = 0):
        self._k = self._v = None
        self.length = 0
        self.spare = spare   # room left after the first update (the prefill) for the slots to come
        super().__init__()

    # transformers reads and (in a few generic paths) assigns `keys`/`values`
    @property
    def keys(self) -> Tensor | None:
        return None if self._k is None else self._k[:, :, : self.length]

    @keys.setter
    def keys(self, value: Tensor | None) -> None:
        self._k = value
        self.length = 0 if value is None else value.shape[2]

    @property
    def values(self) -> Tensor | None:
        return None if self._v is None else self._v[:, :, : self.length]

    @values.setter
    def values(self, value: Tensor | None) -> None:
        self._v = value

    @property
    def capacity(self) -> int:
        return 0 if self._k is None else self._k.shape[2]

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        self.device = key_states.device
        self.is_initialized = True

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        """Append Q slots ([B, H, Q, d]) in place; returns the keys and values of every slot."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.shape[2]
        if self._k is None:
            self._k = _buffer_like(key_states, end + self.spare)
            self._v = _buffer_like(value_states, end + self.spare)
        elif end > self.capacity:                 # out of room: grow by an eighth (amortised O(1) per slot)
            self.reserve(max(end, self.capacity + max(self.MIN_GROWTH, self.capacity // 8)))
        self._k[:, :, self.length: end] = key_states
        self._v[:, :, self.length: end] = value_states
        self.length = end
        return self.keys, self.values

    def reserve(self, slots: int) -> None:
        """Make room for `slots` slots in all (never shrinks)."""
        if slots > self.capacity:
            self._k, self._v = self._regrown(self._k, slots), self._regrown(self._v, slots)

    def _regrown(self, buf: Tensor, capacity: int) -> Tensor:
        new = _buffer_like(buf, capacity)
        new[:, :, : self.length] = buf[:, :, : self.length]
        return new

    def truncate(self, length: int) -> None:
        """Drop every slot from `length` on (no copy)."""
        self.length = min(self.length, length)

class SlotCache(DynamicCache):
    """A DynamicCache of SlotLayers (what `prefill` builds; KVState needs its in-place operations),
    each with `spare` free slots after the prefill."""

    def __init__(self, spare: int = 0):
        super().__init__()
        self.layer_class_to_replicate = partial(SlotLayer, spare)


class KVState:
    def __init__(self, cache: SlotCache, slot_pos: Tensor, window: int | None = None,
                 layer_kinds: tuple[str, ...] | None = None):
        self.cache = cache
        self.slot_pos = slot_pos                        # [B, S] long, HOLE = no token
        self.committed = slot_pos.shape[1]
        self.lengths = (slot_pos != HOLE).sum(-1)       # [B] tokens committed = next position
        self.window = window                            # sliding-window size, or None
        self.layer_kinds = layer_kinds                  # per-layer attention kinds (Qwen2-style), or None

    # -- masks -----------------------------------------------------------------------------
    def attention_mask(self, query_pos: Tensor, extra_vis: Tensor, dtype: torch.dtype) -> Tensor | dict:
        """4D float mask for a forward of Q new tokens.

        query_pos: [B, Q] positions of the new tokens.
        extra_vis: [B, Q, S - committed + Q] bool, visibility of temporary slots and of the new
                   tokens themselves; committed slots are visible when not holes.
        Returns [B, 1, Q, S + Q] (0 = allowed, dtype-min = masked), or a dict by layer kind
        when the model mixes full and sliding-window layers.
        """
        B, Q = query_pos.shape
        committed_ok = (self.slot_pos[:, : self.committed] != HOLE).unsqueeze(1).expand(B, Q, self.committed)
        allowed = torch.cat([committed_ok, extra_vis], dim=-1)              # [B, Q, S+Q]
        if self.window is None:
            return _to_float_mask(allowed, dtype)
        key_pos = torch.cat([self.slot_pos, query_pos], dim=-1)             # [B, S+Q]
        in_window = (query_pos.unsqueeze(-1) - key_pos.unsqueeze(1)) < self.window
        windowed = _to_float_mask(allowed & in_window, dtype)
        if self.layer_kinds is None:
            return windowed
        return {"full_attention": _to_float_mask(allowed, dtype), "sliding_attention": windowed}

    # -- bookkeeping after a forward --------------------------------------------------------
    def appended(self, query_pos: Tensor, query_valid: Tensor) -> None:
        """Record the Q slots the model just appended.  query_pos, query_valid: [B, Q]."""
        self.slot_pos = torch.cat([self.slot_pos, query_pos.masked_fill(~query_valid, HOLE)], dim=1)

    def commit_all(self) -> None:
        """Make every slot permanent (after a forward over accepted tokens)."""
        self.committed = self.slot_pos.shape[1]
        self.lengths = (self.slot_pos != HOLE).sum(-1)

    def crop(self) -> None:
        """Drop every temporary slot."""
        keep = self.committed
        for layer in self.cache.layers:
            layer.truncate(keep)
        self.slot_pos = self.slot_pos[:, :keep]

def _buffer_like(t: Tensor, capacity: int) -> Tensor:
    """An uninitialised [B, H, capacity, d] buffer with t's dtype and device."""
    return t.new_empty((t.shape[0], t.shape[1], capacity, t.shape[3]))


def _to_float_mask(allowed: Tensor, dtype: torch.dtype) -> Tensor:
    """bool [B, Q, K] -> float [B, 1, Q, K] with 0 where allowed and dtype-min elsewhere."""
    mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask.unsqueeze(1)
