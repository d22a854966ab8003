"""The one learning-rate schedule of training/: linear warmup, then cosine decay to a floor.

    lr(step) = peak * warm(step) * (floor + (1 - floor) * 0.5 * (1 + cos(pi * progress)))
    warm(step) = min(1, (step + 1) / warmup)
    progress   = clamp((step - decay_start) / (total - decay_start), 0, 1)

`decay_start` is `warmup` (decay begins once warmup is over: the demo target and distillation)
or 0 (decay over the whole run, overlapping the warmup: the vision-tower stage). Every caller
gets exactly the curve it had before the three copies were merged.
"""
from __future__ import annotations

import math


def warmup_cosine(step: int, *, peak: float, total: int, warmup: int, floor: float,
                  decay_start: int | None = None) -> float:
    """Learning rate at `step` (0-based) of a `total`-step run; `decay_start` defaults to `warmup`."""
    start = warmup if decay_start is None else decay_start
    warm = min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0
    progress = min(1.0, max(0.0, (step - start) / max(1, total - start)))
    return peak * warm * (floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress)))


def optimizer_step(optimizer, params, loss, lr: float, max_norm: float = 1.0) -> float:
    """One update: `lr` on every parameter group, backpropagate `loss`, clip the gradients of
    `params` to `max_norm`, step, clear the gradients; returns the loss as a float."""
    import torch

    for group in optimizer.param_groups:
        group["lr"] = lr
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, max_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()
