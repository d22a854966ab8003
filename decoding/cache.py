"""A KV cache with per-row lengths, holes and explicit positions, on top of `DynamicCache`.

Rows of a batch accept different numbers of tokens per step, so a single cache offset cannot
describe them (stale KV, wrong RoPE positions). Instead every cache slot carries the position
of the token it holds, or HOLE (-1) when the slot is a hole (left padding, a rejected tree node, a
padded pending token). Attention masks are built from those positions, so holes are never seen
and rows never disturb one another.

Slots [0, committed) hold accepted tokens. Slots after `committed` are temporary (draft tree
nodes of the current step) until `crop` drops them or `commit_tail` gathers the accepted ones.

Dimensions: B rows, S cache slots, Q query tokens of one forward, A slots committed per row.
"""
from __future__ import annotations

import torch
from torch import Tensor
from transformers import DynamicCache

HOLE = -1   # slot_pos of a slot that holds no token (left padding, a rejected node, a padded pending token)


class KVState:
    def __init__(self, cache: DynamicCache, slot_pos: Tensor, window: int | None = None,
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
            layer.keys = layer.keys[..., :keep, :]
            layer.values = layer.values[..., :keep, :]
        self.slot_pos = self.slot_pos[:, :keep]

    def commit_tail(self, index: Tensor, keep: Tensor) -> None:
        """Keep, per row, the temporary slots `index` (relative to `committed`) and drop the rest.

        index: [B, A] long, keep: [B, A] bool (False = hole). The kept slots become committed.
        """
        start = self.committed
        B, A = index.shape
        for layer in self.cache.layers:
            for name in ("keys", "values"):
                t = getattr(layer, name)                                      # [B, H, S, d]
                tail = t[:, :, start:, :]
                idx = index.view(B, 1, A, 1).expand(B, t.shape[1], A, t.shape[3])
                setattr(layer, name, torch.cat([t[:, :, :start, :], tail.gather(2, idx)], dim=2))
        tail_pos = self.slot_pos[:, start:].gather(1, index).masked_fill(~keep, HOLE)
        self.slot_pos = torch.cat([self.slot_pos[:, :start], tail_pos], dim=1)
        self.commit_all()

    def select_rows(self, rows: Tensor) -> None:
        """Keep only the given rows (finished rows leave the batch).  rows: [B'] long."""
        for layer in self.cache.layers:
            layer.keys = layer.keys.index_select(0, rows)
            layer.values = layer.values.index_select(0, rows)
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
            for name in ("keys", "values"):
                a, b = getattr(mine, name), getattr(theirs, name)                  # [B, H, S, d]
                setattr(mine, name, torch.cat([_left_pad(a, S, 2, 0), _left_pad(b, S, 2, 0)], dim=0))
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
            layer.keys = layer.keys.index_select(2, keep)
            layer.values = layer.values.index_select(2, keep)
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


def _to_float_mask(allowed: Tensor, dtype: torch.dtype) -> Tensor:
    """bool [B, Q, K] -> float [B, 1, Q, K] with 0 where allowed and dtype-min elsewhere."""
    mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask.unsqueeze(1)
