"""Acceptance: which draft-tree path the target keeps, and the target's own next (bonus) token.

Vocabulary of this module (as in vLLM's rejection sampler):
- accepted tokens: draft-tree nodes on the kept root-to-node path;
- bonus token: the token the target itself produces after the last accepted node (its argmax
  in greedy mode; a sample from the target's distribution, or from the residual left after
  rejections, in sampling mode). Every step therefore yields len(path) + 1 tokens.

Greedy (temperature 0): a node is accepted iff its token equals the target's argmax at its
parent and its parent is accepted. Siblings hold distinct tokens, so the accepted nodes form a
single path; the output is token-for-token the target's greedy output.

Sampling: the tree is a deterministic function of the context (top-k children of the draft),
so each drafted child is a point-mass proposal q = delta_x. Recursive rejection sampling
(SpecInfer/Sequoia residual form) then reads: at node u with target distribution p, try the
children in order; accept child x with probability min(1, p(x)/q(x)) = p(x); on rejection
p <- norm(max(p - q, 0)), i.e. p(x) <- 0 and renormalise; if every child is rejected, the bonus
token is sampled from the residual p. Each step is an exact sample of the target's
distribution, whatever the tree shape, because the shape never depends on target randomness.
(With *sampled* draft children, confidence-based pruning makes the kept set depend on the
drawn values and biases the output; deterministic children avoid that.)

Dimensions: B rows, N tree nodes (root excluded), V vocabulary.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper

from .tree import DraftTree


@dataclass
class Acceptance:
    """Per row: accepted node indices (root-to-leaf order) and the bonus token."""

    paths: list[list[int]]
    bonus: list[int]


def target_probs(logits: Tensor, temperature: float, top_p: float) -> Tensor:
    """The target's sampling distribution, with transformers' own warpers.  [..., V] -> [..., V]."""
    shape = logits.shape
    flat = logits.reshape(-1, shape[-1]).float()
    flat = TemperatureLogitsWarper(temperature)(None, flat)
    if top_p < 1.0:
        flat = TopPLogitsWarper(top_p)(None, flat)
    return torch.softmax(flat, dim=-1).reshape(shape)


def greedy_accept(tree: DraftTree, logits: Tensor) -> Acceptance:
    """Longest path equal to the target's argmax, plus the target's argmax after it.

    logits: [B, 1+N, V] target logits at the root (slot 0) and at every node (slot i+1).
    """
    choice = logits.argmax(-1)                                             # [B, 1+N]
    if tree.tokens.shape[1] == 0:
        return Acceptance(paths=[[] for _ in range(choice.shape[0])], bonus=choice[:, 0].tolist())
    parent_slot = tree.parents + 1                                         # root -> slot 0
    match = tree.valid & (tree.tokens == choice.gather(1, parent_slot))   # [B, N]
    # A node is on the accepted path iff it and all its ancestors match.
    ok = tree.valid & ~(tree.ancestors & ~match.unsqueeze(1)).any(-1)     # [B, N]
    depth_ok = torch.where(ok, tree.depths, torch.zeros_like(tree.depths))
    best_depth, best = depth_ok.max(-1)                                    # [B]
    last_slot = torch.where(best_depth > 0, best + 1, torch.zeros_like(best))
    bonus = choice.gather(1, last_slot.unsqueeze(-1)).squeeze(-1)
    paths = []
    for b in range(tree.tokens.shape[0]):
        if int(best_depth[b]) == 0:
            paths.append([])
            continue
        nodes = torch.nonzero(tree.ancestors[b, best[b]]).squeeze(-1)
        order = tree.depths[b, nodes].argsort()
        paths.append(nodes[order].tolist())
    return Acceptance(paths=paths, bonus=bonus.tolist())


def sample_accept(tree: DraftTree, logits: Tensor, temperature: float, top_p: float,
                  generator: torch.Generator | None) -> Acceptance:
    """Multi-branch recursive rejection sampling over deterministic draft children.

    logits: [B, 1+N, V]. Children of a node are tried in order of draft score (best first).
    """
    probs = target_probs(logits, temperature, top_p)                      # [B, 1+N, V]
    B, N = tree.tokens.shape
    parents = tree.parents.tolist()
    tokens = tree.tokens.tolist()
    valid = tree.valid.tolist()
    scores = tree.scores.tolist()
    paths, bonus = [], []
    for b in range(B):
        children: dict[int, list[int]] = {}
        for i in range(N):
            if valid[b][i]:
                children.setdefault(parents[b][i], []).append(i)
        node, path = -1, []
        while True:
            p = probs[b, node + 1].clone()
            accepted = None
            for child in sorted(children.get(node, []), key=lambda i: -scores[b][i]):
                x = tokens[b][child]
                r = torch.rand((), generator=generator, device=p.device)
                if bool(r < p[x]):
                    accepted = child
                    break
                p[x] = 0.0
                p = p / p.sum()
            if accepted is None:
                bonus.append(int(torch.multinomial(p, 1, generator=generator)))
                break
            path.append(accepted)
            node = accepted
        paths.append(path)
    return Acceptance(paths=paths, bonus=bonus)
