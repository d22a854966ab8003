"""Per-row decoding statistics and the result of `SpeculativeDecoder.generate`."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class RowStats:
    """What one row cost.

    new_tokens:        tokens produced (EOS included, prompt excluded).
    target_forwards:   target forwards the row took part in (prefill + one per verify step).
    accepted_lengths:  tokens each verify step added to the output, bonus token included
                       (truncated at EOS / max_new_tokens). The prefill produces one more token,
                       so new_tokens == 1 + sum(accepted_lengths).
    draft_forwards:    draft forwards the row took part in (prefill excluded).
    tree_nodes:        draft-tree nodes verified per step (root excluded).
    prefill_s, draft_s, verify_s: wall time of the batched calls the row took part in.
    """

    new_tokens: int = 0
    target_forwards: int = 0
    accepted_lengths: list[int] = field(default_factory=list)
    draft_forwards: int = 0
    tree_nodes: list[int] = field(default_factory=list)
    prefill_s: float = 0.0
    draft_s: float = 0.0
    verify_s: float = 0.0

    @property
    def mean_accepted(self) -> float:
        """Mean tokens per verify step (tau); 0.0 when the row never reached a verify step."""
        return sum(self.accepted_lengths) / len(self.accepted_lengths) if self.accepted_lengths else 0.0

    @property
    def draft_tokens(self) -> int:
        """Draft-tree nodes proposed to the target over the whole row."""
        return sum(self.tree_nodes)


@dataclass
class GenerationResult:
    sequences: list[list[int]]   # new tokens per row, cut after the first EOS (EOS kept)
    stats: list[RowStats]


def mean_accepted_length(new_tokens: int, target_forwards: int, rows: int) -> float | None:
    """Tau: tokens per verify step over `rows` rows that produced `new_tokens` in `target_forwards`.

    Each row's prefill forward yields its first token, which is not an accepted draft; every
    other target forward is one verify step. None when there was no verify step. The one formula
    behind `_run.json`, `specllava stats` and `specllava bench`.
    """
    steps = target_forwards - rows
    return (new_tokens - rows) / steps if steps > 0 else None


def cut_after_eos(rows: list[list[int]], eos: set[int]) -> list[list[int]]:
    """Each row up to and including its first EOS token (the form `GenerationResult.sequences` has)."""
    out = []
    for row in rows:
        cut = []
        for token in row:
            cut.append(token)
            if token in eos:
                break
        out.append(cut)
    return out
