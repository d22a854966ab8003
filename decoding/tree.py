"""Draft trees: configuration, the pure tree-building steps, and the verify-time mask/positions.

Dimensions: B rows, C candidate nodes drafted so far, F frontier width, K top-k, N tree nodes
kept for verification (root excluded), V vocabulary. A node's depth is 1 for a child of the
root (the last accepted token, which sits at depth 0). Scores are log path probabilities under
the draft, so a child never scores above its parent.

Every function here is a pure tensor function, unit-tested on hand-made trees.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

NEG_INF = float("-inf")
ROOT = -1      # parent index of a depth-1 node: the root is the last accepted token, not a node
NO_NODE = -1   # padding in node-index tensors (e.g. an accepted path shorter than its row of the batch)


@dataclass(frozen=True)
class TreeConfig:
    """Shape of the dynamic draft tree, validated when built.

    top_k:      children drafted under each expanded node.
    frontier:   nodes expanded per depth and row (the best-scoring ones, EAGLE-2).
    max_depth:  deepest node; a full step accepts at most max_depth + 1 tokens (bonus included).
    max_nodes:  nodes kept for verification after pruning (root excluded).
    threshold:  a row stops expanding when its best path probability falls below this
                (Spec-LLaVA's confidence-driven depth); 0 disables early stop.
    """

    top_k: int = 4
    frontier: int = 4
    max_depth: int = 6
    max_nodes: int = 24
    threshold: float = 0.05

    def __post_init__(self) -> None:
        for name in ("top_k", "frontier", "max_depth", "max_nodes"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"TreeConfig.{name} must be an integer >= 1, got {value!r}")
        if not 0.0 <= float(self.threshold) < 1.0:
            raise ValueError(f"TreeConfig.threshold must be in [0, 1), got {self.threshold!r}")

    @property
    def max_candidates(self) -> int:
        """Upper bound on nodes drafted per row before pruning."""
        return self.top_k + (self.max_depth - 1) * self.frontier * self.top_k


@dataclass
class DraftTree:
    """A batch of draft trees, one per row, in a padded layout.

    Nodes are ordered so that every parent comes before its children. `parents` holds the
    parent's node index, or ROOT (-1) for children of the root.
    """

    tokens: Tensor     # [B, N] long
    parents: Tensor    # [B, N] long, ROOT = child of the root
    depths: Tensor     # [B, N] long, >= 1 for valid nodes, 0 for padding
    scores: Tensor     # [B, N] float, log path probability under the draft; -inf for padding
    valid: Tensor      # [B, N] bool
    ancestors: Tensor  # [B, N, N] bool, ancestors[b, i, j]: node j is node i or one of its ancestors
    rank: Tensor | None = None  # [B, N] long, position in the pruning priority order (0 = kept first)

    @property
    def num_nodes(self) -> Tensor:  # [B]
        return self.valid.sum(-1)


def ancestor_matrix(parents: Tensor, valid: Tensor, max_depth: int) -> Tensor:
    """ancestors[b, i, j] = node j is node i or an ancestor of i.  parents: [B, C] (ROOT = root)."""
    B, C = parents.shape
    eye = torch.eye(C, dtype=torch.bool, device=parents.device).expand(B, C, C)
    # one_hot_parent[b, i, j] = (parents[b, i] == j)
    has_parent = (parents != ROOT) & valid
    step = torch.zeros(B, C, C, dtype=torch.float32, device=parents.device)
    step.scatter_(2, parents.clamp(min=0).unsqueeze(-1), has_parent.unsqueeze(-1).float())
    anc = eye & valid.unsqueeze(-1)
    reach = anc.float()
    for _ in range(max_depth):
        reach = torch.bmm(reach, step).clamp_(max=1.0)
        if not reach.any():
            break
        anc = anc | (reach > 0)
    return anc


@dataclass
class Candidates:
    """Candidate nodes of a batch in a padded layout, [B, C] each (one expansion, or a whole step's pool)."""

    tokens: Tensor     # long
    parents: Tensor    # long, pool index of the parent, ROOT for children of the root
    scores: Tensor     # float, log path probability under the draft (-inf when invalid)
    valid: Tensor      # bool
    chain: Tensor      # bool, on the draft's greedy chain


def expand_children(
    parent_index: Tensor,   # [B, F] pool index of each expanded node (ROOT = the root)
    parent_score: Tensor,   # [B, F] log path probability of each expanded node
    parent_valid: Tensor,   # [B, F] bool
    parent_chain: Tensor,   # [B, F] bool, the node is on the draft's greedy chain
    logprobs: Tensor,       # [B, F, V] draft log-probabilities at each expanded node
    top_k: int,
) -> Candidates:
    """Top-k children of every expanded node, [B, F*K] each; children of invalid parents are
    invalid; the top-1 child of a chain node continues the chain."""
    B, F, V = logprobs.shape
    k = min(top_k, V)
    child_lp, child_tok = logprobs.topk(k, dim=-1)                       # [B, F, K]
    scores = parent_score.unsqueeze(-1) + child_lp                        # [B, F, K]
    valid = parent_valid.unsqueeze(-1).expand(B, F, k) & torch.isfinite(scores)
    scores = scores.masked_fill(~valid, NEG_INF)
    parents = parent_index.unsqueeze(-1).expand(B, F, k)
    chain = torch.zeros(B, F, k, dtype=torch.bool, device=logprobs.device)
    chain[:, :, 0] = parent_chain & parent_valid
    chain &= valid
    return Candidates(tokens=child_tok.reshape(B, F * k), parents=parents.reshape(B, F * k),
                      scores=scores.reshape(B, F * k), valid=valid.reshape(B, F * k), chain=chain.reshape(B, F * k))


def select_frontier(scores: Tensor, valid: Tensor, chain: Tensor, width: int) -> tuple[Tensor, Tensor]:
    """The `width` best valid candidates per row, the greedy-chain node always among them.

    scores, valid, chain: [B, C] -> index [B, W], valid [B, W].
    """
    w = min(width, scores.shape[1])
    masked = scores.masked_fill(~valid, NEG_INF)
    top, index = _priority(masked, chain).topk(w, dim=-1)
    return index, top > NEG_INF


def _priority(masked_scores: Tensor, chain: Tensor) -> Tensor:
    """Ranking key: chain nodes first (the tree never does worse than a greedy chain), then score."""
    return torch.where(chain, torch.full_like(masked_scores, float("inf")), masked_scores)


def prune_tree(
    tokens: Tensor, parents: Tensor, depths: Tensor, scores: Tensor, valid: Tensor, chain: Tensor,
    max_nodes: int, max_depth: int,
) -> DraftTree:
    """Keep the best `max_nodes` candidates per row, ancestors always kept.

    Candidates ([B, C]) must list parents before children. Nodes are ranked greedy-chain first,
    then by score, ties broken by shallower depth; since a child's score never exceeds its
    parent's and a chain node's ancestors are chain nodes, any prefix of that order contains the
    ancestors of its members. The kept nodes are returned sorted by
    depth (parents first) with `parents` re-indexed into the kept set.
    """
    B, C = tokens.shape
    n = min(max_nodes, C)
    masked = scores.masked_fill(~valid, NEG_INF)
    # Two stable sorts: by depth ascending, then by score descending -> (score desc, depth asc).
    by_depth = torch.sort(depths.masked_fill(~valid, 1 << 30), dim=-1, stable=True).indices
    key = _priority(masked, chain & valid).gather(1, by_depth)
    order_in = torch.sort(key, dim=-1, descending=True, stable=True).indices
    keep = by_depth.gather(1, order_in)[:, :n]                            # [B, n] candidate index
    rank = torch.arange(n, device=tokens.device).expand(B, n)
    # Sort kept nodes by depth so parents come first in the verify layout.
    keep_depth = depths.gather(1, keep).masked_fill(~valid.gather(1, keep), 1 << 30)
    by_kept_depth = torch.sort(keep_depth, dim=-1, stable=True).indices
    keep, rank = keep.gather(1, by_kept_depth), rank.gather(1, by_kept_depth)
    kept_valid = valid.gather(1, keep)
    # Re-index parents: position of each candidate within `keep` (or NO_NODE).
    position = torch.full((B, C), NO_NODE, dtype=torch.long, device=tokens.device)
    position.scatter_(1, keep, torch.arange(n, device=tokens.device).expand(B, n))
    old_parent = parents.gather(1, keep)
    new_parent = torch.where(old_parent != ROOT, position.gather(1, old_parent.clamp(min=0)), old_parent)
    if bool(((new_parent == NO_NODE) & (old_parent != ROOT) & kept_valid).any()):
        raise AssertionError("pruning dropped an ancestor of a kept node")
    new_parent = new_parent.masked_fill(~kept_valid, ROOT)
    tree = DraftTree(
        tokens=tokens.gather(1, keep).masked_fill(~kept_valid, 0),
        parents=new_parent,
        depths=depths.gather(1, keep).masked_fill(~kept_valid, 0),
        scores=masked.gather(1, keep),
        valid=kept_valid,
        ancestors=torch.empty(0),
        rank=rank,
    )
    tree.ancestors = ancestor_matrix(tree.parents, tree.valid, max_depth)
    return tree


def verify_visibility(tree: DraftTree) -> Tensor:
    """Which tree slots each verify query may see.  Returns [B, 1+N, 1+N] bool.

    Slot 0 is the root (last accepted token); slot i+1 is node i. The root sees itself; a
    valid node sees the root and its ancestors-or-self; a padding node sees only itself, so
    that no attention row is empty.
    """
    B, N = tree.tokens.shape
    vis = torch.zeros(B, N + 1, N + 1, dtype=torch.bool, device=tree.tokens.device)
    vis[:, 0, 0] = True
    vis[:, 1:, 1:] = tree.ancestors
    vis[:, 1:, 0] = tree.valid
    idx = torch.arange(1, N + 1, device=tree.tokens.device)
    vis[:, idx, idx] = True
    return vis


def verify_positions(tree: DraftTree, lengths: Tensor) -> Tensor:
    """Position id of each verify slot: row length (image tokens included) + depth.  [B, 1+N]."""
    root = torch.zeros(tree.depths.shape[0], 1, dtype=tree.depths.dtype, device=tree.depths.device)
    return lengths.unsqueeze(-1) + torch.cat([root, tree.depths], dim=1)
