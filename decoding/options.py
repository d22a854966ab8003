"""Sampling options and per-row seeds: what a decode is asked to do, independent of how it runs."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from .errors import InputError

SEED_BITS = 63


def row_seed(seed: int, key) -> int:
    """A row's sampling seed from the run's seed and the row's id: the same wherever and whenever
    the row is decoded (another batch, another actor, a resumed run)."""
    digest = hashlib.blake2b(f"{seed}\x00{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> (64 - SEED_BITS)


@dataclass
class SamplingOptions:
    """What `generate(do_sample=...)` would do: temperature 0 = greedy (argmax); otherwise the
    target's warpers in generate's order (temperature, top_k, top_p; top_k 0 = off)."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    eos: frozenset[int] = frozenset()

    def __post_init__(self) -> None:
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise InputError(f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")
        if not self.temperature >= 0:
            raise InputError(f"temperature must be >= 0, got {self.temperature!r}")
        if not 0 < self.top_p <= 1:
            raise InputError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise InputError(f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")

    @property
    def sampling(self) -> bool:
        return self.temperature > 0


def eos_set(target, eos_token_id) -> frozenset[int]:
    """EOS ids: an id, a list ([] = never stop early) or None for the target's generation_config."""
    if eos_token_id is None and target is not None:
        eos_token_id = target.generation_config.eos_token_id
    if eos_token_id is None:
        return frozenset()
    if isinstance(eos_token_id, int):
        return frozenset({eos_token_id})
    return frozenset(int(e) for e in eos_token_id)


def default_top_k(target) -> int:
    """The top_k `generate(do_sample=True)` applies for this target: its generation config's, or
    transformers' global default when the config leaves it unset (50 in transformers 5)."""
    top_k = getattr(target.generation_config, "top_k", None)
    if top_k is None:
        from transformers import GenerationConfig
        defaults = getattr(GenerationConfig, "_get_default_generation_params", None)
        top_k = defaults().get("top_k", 0) if defaults else 0
    return int(top_k or 0)


def seeds_from(generator: torch.Generator | None, rows: int) -> list[int]:
    """Per-row seeds drawn from a generator (the `generate(generator=...)` form)."""
    device = generator.device if generator is not None else "cpu"
    return torch.randint(0, 2 ** SEED_BITS - 1, (rows,), generator=generator, device=device).tolist()

