"""A KV cache with per-row lengths, holes and explicit positions, on top of `DynamicCache`.

Rows of a batch accept different numbers of tokens per step, so a single cache offset cannot
describe them (stale KV, wrong RoPE positions). Instead every cache slot carries the position
of the token it holds, or -1 when the slot is a hole (left padding, a rejected tree node, a
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


class KVState:
    def __init__(self, cache: DynamicCache, slot_pos: Tensor, window: int | None = None,
                 layer_kinds: tuple[str, ...] | None = None):
        self.cache = cache
        self.slot_pos = slot_pos                        # [B, S] long, -1 = hole
        self.committed = slot_pos.shape[1]
        self.lengths = (slot_pos >= 0).sum(-1)          # [B] tokens committed = next position
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
        committed_ok = (self.slot_pos[:, : self.committed] >= 0).unsqueeze(1).expand(B, Q, self.committed)
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
        self.slot_pos = torch.cat([self.slot_pos, query_pos.masked_fill(~query_valid, -1)], dim=1)

    def commit_all(self) -> None:
        """Make every slot permanent (after a forward over accepted tokens)."""
        self.committed = self.slot_pos.shape[1]
        self.lengths = (self.slot_pos >= 0).sum(-1)

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
        tail_pos = self.slot_pos[:, start:].gather(1, index).masked_fill(~keep, -1)
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

    def _drop_dead_slots(self) -> None:
        """Remove leading slots that are holes in every remaining row (cheap compaction)."""
        live = (self.slot_pos[:, : self.committed] >= 0).any(0)
        if bool(live.all()):
            return
        keep = torch.nonzero(live).squeeze(-1)
        keep = torch.cat([keep, torch.arange(self.committed, self.slot_pos.shape[1], device=keep.device)])
        for layer in self.cache.layers:
            layer.keys = layer.keys.index_select(2, keep)
            layer.values = layer.values.index_select(2, keep)
        self.slot_pos = self.slot_pos.index_select(1, keep)
        self.committed = int(live.sum())


def _to_float_mask(allowed: Tensor, dtype: torch.dtype) -> Tensor:
    """bool [B, Q, K] -> float [B, 1, Q, K] with 0 where allowed and dtype-min elsewhere."""
    mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask.unsqueeze(1)
