"""A KV cache with per-row lengths, holes and explicit positions, written in place.

Rows of a batch accept different numbers of tokens per step, so a single cache offset cannot
describe them (stale KV, wrong RoPE positions). Instead every cache slot carries the position
of the token it holds, or HOLE (-1) when the slot is a hole (left padding, a rejected tree node, a
padded pending token). Attention masks are built from those positions, so holes are never seen
and rows never disturb one another.

Slots [0, committed) hold accepted tokens. Slots after `committed` are temporary (draft tree
nodes of the current step) until `crop` drops them or `commit_tail` gathers the accepted ones.

Storage: `SlotCache`, a transformers `DynamicCache` whose layers (`SlotLayer`) keep keys and
values in preallocated buffers. A forward writes its Q new slots in place after the used ones;
`crop` only moves the end; `commit_tail` rewrites only the accepted slots. `DynamicLayer` would
copy the whole cache at every forward (`torch.cat`) and again at every roll-forward.

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
    them; the roll-forward after a verify (`keep_tail`) rewrites only the accepted slots. When it
    runs out of room the buffer grows by an eighth (at least MIN_GROWTH slots): a few copies over
    a long decode instead of one per forward as `DynamicLayer`'s concatenation does, and never
    the doubling that would need twice a large batch's KV memory. `spare` preallocates: the
    first update (the prefill) leaves that many free slots after its own.
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

    def keep_tail(self, start: int, index: Tensor) -> None:
        """Per row, keep the slots start + index ([B, A], relative to start) at start..start+A
        and drop everything after. Only the A kept slots per row are copied."""
        B, A = index.shape
        for buf in (self._k, self._v):
            idx = index.view(B, 1, A, 1).expand(B, buf.shape[1], A, buf.shape[3])
            buf[:, :, start: start + A] = buf[:, :, start: self.length].gather(2, idx)
        self.length = start + A

    def select_rows(self, rows: Tensor) -> None:
        self._k, self._v = self._k.index_select(0, rows), self._v.index_select(0, rows)

    def select_slots(self, slots: Tensor) -> None:
        """Keep only the given slots ([S'] long, increasing) of every row."""
        self._k, self._v = self.keys.index_select(2, slots), self.values.index_select(2, slots)
        self.length = slots.shape[0]

    def merge(self, other: "SlotLayer", slots: int) -> None:
        """Append `other`'s rows after this layer's, both left-padded to `slots` slots with zeros
        (the padding is masked as holes; zeros keep it finite). Spare capacity is kept."""
        spare = max(self.capacity - self.length, other.capacity - other.length)
        merged = []
        for mine, theirs in ((self._k, other._k), (self._v, other._v)):
            B1, B2 = mine.shape[0], theirs.shape[0]
            buf = mine.new_empty((B1 + B2, mine.shape[1], slots + spare, mine.shape[3]))
            for rows, src, length in ((slice(0, B1), mine, self.length), (slice(B1, B1 + B2), theirs, other.length)):
                buf[rows, :, : slots - length] = 0
                buf[rows, :, slots - length: slots] = src[:, :, :length]
            merged.append(buf)
        self._k, self._v = merged
        self.length = slots


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

    def commit_tail(self, index: Tensor, keep: Tensor) -> None:
        """Keep, per row, the temporary slots `index` (relative to `committed`) and drop the rest.

        index: [B, A] long, keep: [B, A] bool (False = hole). The kept slots become committed.
        """
        start = self.committed
        for layer in self.cache.layers:
            layer.keep_tail(start, index)
        tail_pos = self.slot_pos[:, start:].gather(1, index).masked_fill(~keep, HOLE)
        self.slot_pos = torch.cat([self.slot_pos[:, :start], tail_pos], dim=1)
        self.commit_all()

    def select_rows(self, rows: Tensor) -> None:
        """Keep only the given rows (finished rows leave the batch).  rows: [B'] long."""
        for layer in self.cache.layers:
            layer.select_rows(rows)
        self.slot_pos = self.slot_pos.index_select(0, rows)
        self.lengths = self.lengths.index_select(0, rows)
        self._drop_dead_slots()

    def merge(self, other: "KVState") -> None:
        """Append the rows of `other` (rows joining a running batch) after this state's rows.

        Both states must be fully committed (between steps). The shorter one is left-padded with
        holes, so every row keeps its slots, positions and mask; nothing is recomputed."""
        if self.committed != self.slot_pos.shape[1] or other.committed != other.slot_pos.shape[1]:
            raise ValueError("merge needs fully committed states (no temporary tree slots)")
        S = max(self.slot_pos.shape[1], other.slot_pos.shape[1])
        for mine, theirs in zip(self.cache.layers, other.cache.layers):
            mine.merge(theirs, S)
        self.slot_pos = torch.cat([_left_pad(self.slot_pos, S, 1, HOLE), _left_pad(other.slot_pos, S, 1, HOLE)])
        self.commit_all()

    def _drop_dead_slots(self) -> None:
        """Remove leading slots that are holes in every remaining row (cheap compaction)."""
        live = (self.slot_pos[:, : self.committed] != HOLE).any(0)
        if bool(live.all()):
            return
        keep = torch.nonzero(live).squeeze(-1)
        keep = torch.cat([keep, torch.arange(self.committed, self.slot_pos.shape[1], device=keep.device)])
        for layer in self.cache.layers:
            layer.select_slots(keep)
        self.slot_pos = self.slot_pos.index_select(1, keep)
        self.committed = int(live.sum())


def _left_pad(t: Tensor, size: int, dim: int, value) -> Tensor:
    """`t` padded on the left of `dim` to `size` entries with `value`."""
    missing = size - t.shape[dim]
    if missing == 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([torch.full(shape, value, dtype=t.dtype, device=t.device), t], dim=dim)


def _buffer_like(t: Tensor, capacity: int) -> Tensor:
    """An uninitialised [B, H, capacity, d] buffer with t's dtype and device."""
    return t.new_empty((t.shape[0], t.shape[1], capacity, t.shape[3]))


def _to_float_mask(allowed: Tensor, dtype: torch.dtype) -> Tensor:
    """bool [B, Q, K] -> float [B, 1, Q, K] with 0 where allowed and dtype-min elsewhere."""
    mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask.unsqueeze(1)
