"""Draft trees: configuration, the pure tree-building steps, and the verify-time mask/positions.

Dimensions: B rows, C candidate nodes drafted so far, F frontier width, K top-k, N tree nodes
kept for verification (root excluded), V vocabulary. A node's depth is 1 for a child of the
root (the last accepted token, which sits at depth 0). Scores are log path probabilities under
the draft, so a child never scores above its parent.

Every function here is a pure tensor function, unit-tested on hand-made trees. The builder runs
a fixed number of tensor ops per depth whatever the draft proposes (no data-dependent branch, no
host read): `TreeLayout` holds the shape's constants, `prune_tree` keeps a fixed node count.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .consts import arange, eye, first_true

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
    threshold:  frontier nodes whose path probability is below this are not expanded (their
                children are masked out; the greedy chain always goes on). A step drafts a fixed
                number of depths whatever the probabilities (no host sync to stop early), so
                the threshold saves no draft work; it only narrows the tree. 0 = off (default).
    """

    top_k: int = 4
    frontier: int = 4
    max_depth: int = 6
    max_nodes: int = 24
    threshold: float = 0.0

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


CHAIN_BIAS = 1e9   # added to greedy-chain candidates' scores when ranking: they come first


@dataclass
class TreeLayout:
    """The static shape of one step's candidate pool for (top_k K, frontier F, depth D): every
    constant the drafting loop and `prune_tree` index with, built once per shape and device.

    Level 1 holds the root's K children; level d >= 2 the K children of each of the F_d =
    min(F, width of level d-1) frontier nodes chosen from level d-1, at columns f*K + k. The
    candidates of all levels, concatenated, are the pool (C of them, in depth order). Frontier
    nodes are fed to the draft and get a temporary cache slot each: slot `slot_start[d] + f` for
    the f-th frontier node chosen at depth d (T slots in all). Column 0 of every level is on the
    draft's greedy chain (the top child of frontier slot 0, which is the previous chain node).
    """

    top_k: int
    depth: int
    widths: tuple[int, ...]        # per level 1..D (index 0 = level 1)
    fronts: tuple[int, ...]        # F_d per depth 2..D (index 0 = depth 2)
    level_start: tuple[int, ...]   # first pool column of each level
    slot_start: tuple[int, ...]    # first temp slot of each depth 2..D
    chain_bias: Tensor             # [C] float: CHAIN_BIAS on chain columns, else 0
    depth_of: Tensor               # [C] long: depth of each pool column
    parent_slot: Tensor            # [C] long: temp slot of the parent (ROOT for level 1)
    front_offset: Tensor           # [T] long: level_start of the level each temp slot's node comes from
    slot_level: Tensor             # [T] long: depth - 2 of the depth each temp slot is fed at
    own: tuple[Tensor, ...]        # per depth 2..D: [F_d, T] float, 0 on the node's own slot, min elsewhere
    child_parent: tuple[Tensor, ...]  # per depth 2..D: [F_d * K] long, the frontier node of each child column
    empty: Tensor                  # [1, K, T] float min: level 1 has no ancestor among temp slots

    @property
    def candidates(self) -> int:
        return sum(self.widths)

    @property
    def slots(self) -> int:
        return sum(self.fronts)

    @classmethod
    def build(cls, top_k: int, frontier: int, depth: int, vocab: int, dtype: torch.dtype, device) -> "TreeLayout":
        k = min(top_k, vocab)
        widths, fronts = [k], []
        for _ in range(2, depth + 1):
            fronts.append(min(frontier, widths[-1]))
            widths.append(fronts[-1] * k)
        level_start = [sum(widths[:i]) for i in range(len(widths))]
        slot_start = [sum(fronts[:i]) for i in range(len(fronts))]
        C, T = sum(widths), sum(fronts)
        low = torch.finfo(dtype).min
        chain_bias = torch.zeros(C)
        chain_bias[list(level_start)] = CHAIN_BIAS
        depth_of = torch.cat([torch.full((w,), i + 1, dtype=torch.long) for i, w in enumerate(widths)])
        parent_slot = torch.full((C,), ROOT, dtype=torch.long)
        front_offset = torch.zeros(T, dtype=torch.long)
        slot_level = torch.zeros(T, dtype=torch.long)
        own = []
        for i, f in enumerate(fronts):                     # depth d = i + 2
            start = level_start[i + 1]
            parent_slot[start: start + f * k] = torch.arange(f).repeat_interleave(k) + slot_start[i]
            front_offset[slot_start[i]: slot_start[i] + f] = level_start[i]
            slot_level[slot_start[i]: slot_start[i] + f] = i
            m = torch.full((f, T), low, dtype=dtype)
            m[torch.arange(f), slot_start[i] + torch.arange(f)] = 0
            own.append(m.to(device))
        return cls(top_k=k, depth=depth, widths=tuple(widths), fronts=tuple(fronts), level_start=tuple(level_start),
                   slot_start=tuple(slot_start), chain_bias=chain_bias.to(device), depth_of=depth_of.to(device),
                   parent_slot=parent_slot.to(device), front_offset=front_offset.to(device),
                   slot_level=slot_level.to(device), own=tuple(own),
                   child_parent=tuple(torch.arange(f, device=device).repeat_interleave(k) for f in fronts),
                   empty=torch.full((1, k, T), low, dtype=dtype, device=device))


def prune_tree(layout: TreeLayout, tokens: Tensor, scores: Tensor, masks: Tensor, fronts: Tensor,
               max_nodes: int) -> DraftTree:
    """Keep the best `max_nodes` candidates per row, ancestors always kept; a fixed node count per
    row (rows with fewer valid candidates keep invalid ones, masked by `valid`).

    tokens, scores: [B, C] the pool in depth order (scores -inf = invalid); masks: [B, C, T] float,
    0 where the candidate's ancestors hold temp slot t; fronts: [B, T] the level-local column of
    the node in each temp slot.

    Ranking: greedy-chain candidates first, then by score, ties by depth (a stable sort over the
    pool's depth order). A child never scores above its parent and a chain node's ancestors are
    chain nodes, so any prefix of that order holds the ancestors of its members: the kept set is
    a tree. Kept nodes are returned in pool order (parents first); `rank` is each one's place in
    the ranking (the budget calibration reads it).
    """
    B, C = tokens.shape
    T = layout.slots
    n = min(max_nodes, C)
    order = torch.sort(scores + layout.chain_bias, dim=-1, descending=True, stable=True).indices[:, :n]
    keep, rank = torch.sort(order, dim=-1)                                    # [B, n] pool columns, parents first
    kept_scores = scores.gather(1, keep)
    depths = layout.depth_of[keep]
    if T == 0:
        ancestors = torch.eye(n, dtype=torch.bool, device=tokens.device).expand(B, n, n)
        parents = torch.full_like(keep, ROOT)
    else:
        sees_slot = masks.gather(1, keep.unsqueeze(-1).expand(B, n, T)) == 0  # [B, n, T] ancestors' temp slots
        slot_node = fronts + layout.front_offset                               # [B, T] pool column per temp slot
        place = torch.searchsorted(keep, slot_node)                             # [B, T] its place in `keep`
        held = keep.gather(1, place.clamp(max=n - 1)) == slot_node            # [B, T] that node was kept
        holds = (place.unsqueeze(1) == arange(n, tokens.device).view(1, n, 1)) & held.unsqueeze(1)  # [B, n, T]
        ancestors = (sees_slot.unsqueeze(2) & holds.unsqueeze(1)).any(-1) | eye(n, tokens.device)
        pslot = layout.parent_slot[keep]
        parents = torch.where(pslot >= 0, place.gather(1, pslot.clamp(min=0)), ROOT)
    return DraftTree(tokens=tokens.gather(1, keep), parents=parents, depths=depths, scores=kept_scores,
                     valid=kept_scores > NEG_INF, ancestors=ancestors, rank=rank)


def verify_visibility(tree: DraftTree) -> Tensor:
    """Which tree slots each verify query may see.  Returns [B, 1+N, 1+N] bool.

    Slot 0 is the root (last accepted token); slot i+1 is node i. The root sees itself; every
    node sees the root and its ancestors-or-self (a padding node's only ancestor is itself, so no
    attention row is empty; what it computes is never used)."""
    B, N = tree.tokens.shape
    root_row = first_true(N + 1, tree.tokens.device).view(1, 1, N + 1).expand(B, 1, N + 1)
    sees_root = first_true(1, tree.tokens.device).view(1, 1, 1).expand(B, N, 1)
    return torch.cat([root_row, torch.cat([sees_root, tree.ancestors], dim=-1)], dim=1)


def verify_positions(tree: DraftTree, lengths: Tensor) -> Tensor:
    """Position id of each verify slot: row length (image tokens included) + depth.  [B, 1+N]."""
    root = torch.zeros(tree.depths.shape[0], 1, dtype=tree.depths.dtype, device=tree.depths.device)
    return lengths.unsqueeze(-1) + torch.cat([root, tree.depths], dim=1)
