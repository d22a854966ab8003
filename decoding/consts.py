"""Cached constant tensors (aranges, identity masks): built once per device, sliced per use, so a
step dispatches no op to make them (decoding/profiling.py counts every op)."""
from __future__ import annotations

import torch
from torch import Tensor

_CACHE: dict = {}


def arange(n: int, device) -> Tensor:
    """torch.arange(n) as a view of a cached, growing one (inside a compiled graph a plain
    torch.arange: free there, and a cache the graph read would be guarded on and recompile it)."""
    if torch.compiler.is_compiling():
        return torch.arange(n, device=device)
    key = ("arange", str(device))
    t = _CACHE.get(key)
    if t is None or t.shape[0] < n:
        t = _CACHE[key] = torch.arange(max(n, 2 * (0 if t is None else t.shape[0]), 256), device=device)
    return t[:n]


def eye(n: int, device) -> Tensor:
    """[n, n] bool identity (cached per size: sizes are tree widths, a handful)."""
    if torch.compiler.is_compiling():
        return torch.eye(n, dtype=torch.bool, device=device)
    key = ("eye", n, str(device))
    if key not in _CACHE:
        _CACHE[key] = torch.eye(n, dtype=torch.bool, device=device)
    return _CACHE[key]


def first_true(n: int, device) -> Tensor:
    """[n] bool: True, then False (cached per size)."""
    if torch.compiler.is_compiling():
        return torch.arange(n, device=device) == 0
    key = ("first", n, str(device))
    if key not in _CACHE:
        t = torch.zeros(n, dtype=torch.bool, device=device)
        t[0] = True
        _CACHE[key] = t
    return _CACHE[key]
