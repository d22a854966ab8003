"""The draft side of a step: feed the newly accepted tokens, then grow a dynamic tree.

Tree growth (EAGLE-2 with Spec-LLaVA's confidence stop), all rows in the same draft forwards:
depth-1 candidates are the top-k children of the root; then, depth after depth, the best
`frontier` candidates of the last depth whose path probability is at least `threshold` are fed
to the draft (each sees the committed prefix and its own ancestors) and their top-k children
become the next candidates. Finally the best `max_nodes` candidates are kept (ancestors always
kept). Temporary tree KV is dropped afterwards: the draft cache only ever holds accepted tokens.

Dimensions: B rows, P pending tokens, F frontier width, C candidates, V vocabulary.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .cache import KVState
from .lean import supports_lean
from .models import forward_block
from .tree import NEG_INF, NO_NODE, ROOT, Candidates, DraftTree, TreeConfig, expand_children, prune_tree, select_frontier


@dataclass
class CandidatePool:
    """Every candidate drafted in one step, [B, capacity] preallocated and filled depth by depth
    (no re-concatenation per depth). Columns [0, size) are filled; parents come before children."""

    tokens: Tensor
    parents: Tensor
    depths: Tensor
    scores: Tensor
    valid: Tensor
    chain: Tensor
    size: int = 0

    @classmethod
    def allocate(cls, batch: int, capacity: int, device) -> "CandidatePool":
        long = dict(dtype=torch.long, device=device)
        return cls(tokens=torch.zeros(batch, capacity, **long), parents=torch.full((batch, capacity), ROOT, **long),
                   depths=torch.zeros(batch, capacity, **long),
                   scores=torch.full((batch, capacity), NEG_INF, device=device),
                   valid=torch.zeros(batch, capacity, dtype=torch.bool, device=device),
                   chain=torch.zeros(batch, capacity, dtype=torch.bool, device=device))

    def append(self, c: Candidates, depth: int) -> int:
        """Write one depth's candidates after the filled columns; returns where they start."""
        start, end = self.size, self.size + c.tokens.shape[1]
        self.tokens[:, start:end] = c.tokens
        self.parents[:, start:end] = c.parents
        self.depths[:, start:end] = depth
        self.scores[:, start:end] = c.scores
        self.valid[:, start:end] = c.valid
        self.chain[:, start:end] = c.chain
        self.size = end
        return start

    def prune(self, max_nodes: int, max_depth: int) -> DraftTree:
        n = self.size
        return prune_tree(self.tokens[:, :n], self.parents[:, :n], self.depths[:, :n], self.scores[:, :n],
                          self.valid[:, :n], self.chain[:, :n], max_nodes, max_depth)


class TreeDrafter:
    """Proposes one DraftTree per row from a draft LLaVA and its KVState."""

    def __init__(self, model, config: TreeConfig, vocab_limit: int, lean: bool = True):
        self.model = model
        self.config = config
        self.vocab_limit = vocab_limit   # tokens the target can also emit (drafts never propose others)
        self.lean = lean and supports_lean(model)   # lean.py forward: same logits, less overhead

    def _logprobs(self, logits: Tensor, temperature: float) -> Tensor:
        logits = logits[..., : self.vocab_limit].float()
        if temperature > 0:
            logits = logits / temperature
        return torch.log_softmax(logits, dim=-1)

    def feed_pending(self, state: KVState, pending: Tensor, pending_len: Tensor) -> Tensor:
        """Commit the accepted tokens the draft has not seen; return logits after the last one.

        pending: [B, P] (right-padded), pending_len: [B] >= 1. Returns [B, V].
        """
        B, P = pending.shape
        ar = torch.arange(P, device=pending.device)
        valid = ar.unsqueeze(0) < pending_len.unsqueeze(1)                      # [B, P]
        causal = torch.tril(torch.ones(P, P, dtype=torch.bool, device=pending.device))
        vis = (causal.unsqueeze(0) & valid.unsqueeze(1)) | torch.eye(P, dtype=torch.bool, device=pending.device)
        positions = state.lengths.unsqueeze(1) + ar.unsqueeze(0)
        logits = forward_block(self.model, state, pending, positions, vis, valid, lean=self.lean)
        state.commit_all()
        return logits[torch.arange(B, device=pending.device), pending_len - 1]

    def propose(self, state: KVState, pending: Tensor, pending_len: Tensor, max_depth: int,
                temperature: float, config: TreeConfig | None = None) -> tuple[DraftTree, int]:
        """Grow one tree per row (shape `config`, default self.config). Returns the tree and the
        number of draft forwards made."""
        cfg = config or self.config
        device = pending.device
        B = pending.shape[0]
        root_lp = self._logprobs(self.feed_pending(state, pending, pending_len), temperature)
        forwards = 1
        zeros = torch.zeros(B, 1, device=device)
        ones = torch.ones(B, 1, dtype=torch.bool, device=device)
        k = min(cfg.top_k, root_lp.shape[-1])
        pool = CandidatePool.allocate(B, k + (max_depth - 1) * cfg.frontier * k, device)
        level_start = pool.append(expand_children(torch.full((B, 1), ROOT, dtype=torch.long, device=device),
                                                  zeros, ones, ones, root_lp.unsqueeze(1), cfg.top_k), depth=1)
        temp_cand = torch.empty(B, 0, dtype=torch.long, device=device)    # pool index per temp slot (NO_NODE: none)
        log_thr = math.log(cfg.threshold) if cfg.threshold > 0 else -math.inf
        for depth in range(2, max_depth + 1):
            level = slice(level_start, pool.size)
            local, front_valid = select_frontier(pool.scores[:, level], pool.valid[:, level], pool.chain[:, level],
                                                 cfg.frontier)
            front = local + level_start                                          # [B, F]
            front_score = pool.scores.gather(1, front)
            front_valid &= front_score >= log_thr
            if not bool(front_valid.any()):
                break
            F = front.shape[1]
            # Ancestors of each frontier node (excluding itself) are frontier nodes of earlier depths.
            ancestors, cur = [], front
            for _ in range(depth - 2):
                cur = pool.parents.gather(1, cur.clamp(min=0))
                ancestors.append(cur)
            if ancestors:
                anc = torch.stack(ancestors, -1)                                  # [B, F, depth-2]
                sees_temp = (temp_cand.unsqueeze(1).unsqueeze(-1) == anc.unsqueeze(2)).any(-1)
                sees_temp &= (temp_cand != NO_NODE).unsqueeze(1)                  # [B, F, T]
            else:
                sees_temp = torch.zeros(B, F, temp_cand.shape[1], dtype=torch.bool, device=device)
            eye = torch.eye(F, dtype=torch.bool, device=device).expand(B, F, F)
            vis = torch.cat([sees_temp, eye], dim=-1)
            tokens = pool.tokens.gather(1, front)
            # The root sits at lengths - 1 (it was the last pending token); a node at depth j at root + j.
            positions = (state.lengths.unsqueeze(1) + (depth - 2)).expand(B, F)
            logits = forward_block(self.model, state, tokens, positions, vis, front_valid, lean=self.lean)
            forwards += 1
            temp_cand = torch.cat([temp_cand, front.masked_fill(~front_valid, NO_NODE)], 1)
            level_start = pool.append(expand_children(front, front_score, front_valid, pool.chain.gather(1, front),
                                                      self._logprobs(logits, temperature), cfg.top_k), depth=depth)
        state.crop()
        return pool.prune(cfg.max_nodes, max_depth), forwards
