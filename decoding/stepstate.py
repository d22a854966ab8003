"""What a running batch keeps on the device besides the KV pools, and the small pieces a step uses
around its phases: the per-slot state, the step's one host read, phase timing, cached constants.

Dimensions: R slots, P pending width, L max_new_tokens.
"""
from __future__ import annotations

import time

import torch
from torch import Tensor

from .consts import arange
from .graphs import tree_tensors
from .tree import DraftTree


class SlotState:
    """Per-slot device state of the running batch, [R] (or [R, ...]) tensors indexed by slot."""

    def __init__(self, rows: int, pending_width: int, sample_len: int | None, device):
        long = dict(dtype=torch.long, device=device)
        self.last = torch.zeros(rows, **long)                    # [R] last token (the root of the next tree)
        self.pending = torch.zeros(rows, pending_width, **long)  # [R, P] tokens the draft has not seen
        self.pending_len = torch.zeros(rows, **long)             # [R] (0 in a free slot)
        self.produced = torch.zeros(rows, **long)                # [R] tokens produced so far
        self.active = torch.zeros(rows, **long)                  # [R] 1 where a row decodes
        self.uniforms = None if sample_len is None else torch.zeros(rows, sample_len, device=device)  # [R, L]

    def grow(self, rows: int) -> None:
        for name in ("last", "pending", "pending_len", "produced", "active", "uniforms"):
            t = getattr(self, name)
            if t is not None and t.shape[0] < rows:
                setattr(self, name, torch.cat([t, t.new_zeros((rows - t.shape[0],) + t.shape[1:])]))


class PhaseTimer:
    """Draft and verify seconds of a step without a sync of their own: CUDA events read after the
    step's host read (which waits for them anyway), host clocks elsewhere."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.marks: list = []
        self.mark()

    def mark(self) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())

    def seconds(self) -> tuple[float, float]:
        """(draft, verify) — call after the step's host read."""
        a, b, c = self.marks
        if self.cuda:
            return a.elapsed_time(b) / 1e3, b.elapsed_time(c) / 1e3
        return b - a, c - b


_PINNED: dict = {}


def read_host(t: Tensor) -> list:
    """The step's one device->host read, as lists. On CUDA through a pinned buffer, non-blocking,
    then one wait for that copy (not for the whole device)."""
    if t.device.type != "cuda":
        return t.tolist()
    key = (tuple(t.shape), t.dtype)
    buf = _PINNED.get(key)
    if buf is None:
        buf = _PINNED[key] = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    buf.copy_(t, non_blocking=True)
    done = torch.cuda.Event()
    done.record()
    done.synchronize()
    return buf.tolist()


def zero_column(rows: int, device) -> Tensor:
    return arange(1, device).expand(rows, 1)


def rows_of(tree: DraftTree, rows: int) -> DraftTree:
    """The tree of the first `rows` rows (a bucket's active rows, for the step observer)."""
    return DraftTree(*(None if t is None else t[:rows] for t in tree_tensors(tree)))


def causal(width: int, device) -> Tensor:
    """[width, width] bool lower triangle (a view of a cached one)."""
    t = _CAUSAL.get(str(device))
    if t is None or t.shape[0] < width:
        t = _CAUSAL[str(device)] = torch.tril(torch.ones(max(width, 64), max(width, 64), dtype=torch.bool,
                                                        device=device))
    return t[:width, :width]


_CAUSAL: dict = {}


def empty_tree(batch: int, device) -> DraftTree:
    """A tree of no nodes for `batch` rows (cached per size: a plain step dispatches no op for it)."""
    key = (batch, str(device))
    tree = _EMPTY.get(key)
    if tree is None:
        empty_long = torch.zeros(batch, 0, dtype=torch.long, device=device)
        tree = _EMPTY[key] = DraftTree(tokens=empty_long, parents=empty_long.clone(), depths=empty_long.clone(),
                                       scores=torch.zeros(batch, 0, device=device),
                                       valid=torch.zeros(batch, 0, dtype=torch.bool, device=device),
                                       ancestors=torch.zeros(batch, 0, 0, dtype=torch.bool, device=device))
    return tree


_EMPTY: dict = {}
