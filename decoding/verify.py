"""Acceptance: which draft-tree path the target keeps, and the target's own next (bonus) token.

Vocabulary of this module (as in vLLM's rejection sampler):
- accepted tokens: draft-tree nodes on the kept root-to-node path;
- bonus token: the token the target itself produces after the last accepted node. Every step
  therefore yields len(path) + 1 tokens.

One rule serves both modes: the target picks one token at every tree slot (the root and each
node), then the walk goes from the root down to the child whose token equals the parent's
pick, as far as it can; the pick at the last node reached is the bonus token.
- Greedy (temperature 0): the pick is the target's argmax, so the output is token for token
  the target's greedy output.
- Sampling: the pick at a slot is a draw from the target's warped distribution p at that slot
  (temperature, top_k, top_p, as `generate` applies them), by inverse CDF from a uniform that
  depends only on the row's seed and the output position the slot would fill. The draft's
  children are deterministic (top-k of the draft), i.e. point-mass proposals; recursive
  rejection sampling over point masses (SpecInfer/Sequoia: accept child x with probability
  p(x), else p <- norm(p with x removed), next child; bonus from the residual) accepts child x
  with probability exactly p(x) and otherwise emits y ~ p restricted to non-children, which is
  the same as drawing y ~ p once and moving to the child y if there is one. So each emitted
  token is a draw from p given the accepted prefix: the target's own distribution, whatever the
  tree. And since the uniform is tied to the output position, a row's sample is the one plain
  autoregressive inverse-CDF sampling with the same uniforms produces: it depends on the row's
  seed only, not on the tree, the batch, or the step the row joined at.

Everything is tensors; the caller reads the result from the host once per step.
Dimensions: B rows, N tree nodes (root excluded), A max accepted nodes, V vocabulary.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from .consts import arange
from .tree import NO_NODE, DraftTree


@dataclass
class Acceptance:
    """Per row: the accepted path and the bonus token, as tensors.

    length: [B] accepted nodes (bonus excluded).
    nodes:  [B, A] node index of the accepted path in root-to-leaf order, NO_NODE past `length`.
    tokens: [B, A + 1] the step's new tokens: the path's tokens, then the bonus at `length`
            (zeros after it).
    bonus:  [B] the target's token after the last accepted node.
    slots:  [B, A + 1] verify slots of the root and the path (slot i+1 = node i; 0 past the path),
            what the target cache keeps (kvpool.KVPool.commit).
    """

    length: Tensor
    nodes: Tensor
    tokens: Tensor
    bonus: Tensor
    slots: Tensor | None = None

    @property
    def paths(self) -> list[list[int]]:
        """Accepted node indices per row as lists (a host read; tests and calibration only)."""
        return [row[:n] for row, n in zip(self.nodes.tolist(), self.length.tolist())]


def target_probs(logits: Tensor, temperature: float, top_p: float, top_k: int = 0) -> Tensor:
    """The target's sampling distribution, with transformers' own warpers in `generate`'s order
    (temperature, top_k, top_p).  [..., V] -> [..., V]; top_k 0 = off."""
    shape = logits.shape
    flat = logits.reshape(-1, shape[-1]).float()
    if temperature != 1.0:
        flat = TemperatureLogitsWarper(temperature)(None, flat)
    if top_k:
        flat = TopKLogitsWarper(top_k)(None, flat)
    if top_p < 1.0:
        flat = TopPLogitsWarper(top_p)(None, flat)
    return torch.softmax(flat, dim=-1).reshape(shape)


def inverse_cdf(probs: Tensor, uniforms: Tensor) -> Tensor:
    """The token whose CDF interval holds each uniform.  probs [..., V], uniforms [...] -> [...] long.

    A token of probability 0 has an empty interval and is never drawn."""
    cdf = probs.cumsum(-1)
    total = cdf[..., -1]
    # Strictly below the total, so rounding never lands past the last token of nonzero probability.
    point = torch.minimum(uniforms.to(cdf.dtype) * total, torch.nextafter(total, torch.zeros_like(total)))
    point = point.unsqueeze(-1)
    token = torch.searchsorted(cdf, point, right=True).squeeze(-1)
    return token.clamp_(max=probs.shape[-1] - 1)


def slot_uniforms(uniforms: Tensor, produced: Tensor, tree: DraftTree) -> Tensor:
    """The uniform each verify slot draws with: the one of the output position it would fill.

    uniforms: [B, L] per-row stream (position -> uniform); produced: [B] tokens the row has so far.
    Returns [B, 1+N]: slot 0 (the root) fills position `produced`, a node at depth d fills
    `produced + d`. Positions past the stream reuse its last entry (those tokens are cut anyway)."""
    root = torch.zeros(tree.depths.shape[0], 1, dtype=tree.depths.dtype, device=tree.depths.device)
    position = produced.unsqueeze(1) + torch.cat([root, tree.depths], dim=1)
    return uniforms.gather(1, position.clamp(max=uniforms.shape[1] - 1))


def accept(tree: DraftTree, choice: Tensor, max_depth: int) -> Acceptance:
    """Walk from the root while a child's token equals its parent's pick.

    choice: [B, 1+N] the target's pick at the root (slot 0) and at every node (slot i+1).
    max_depth: the tree's depth bound this step (A; 0 for an empty tree).
    A fixed sequence of tensor ops (no host read); nodes must be stored parents first.
    """
    B, N = tree.tokens.shape
    device = choice.device
    if N == 0:
        bonus = choice[:, 0]
        return Acceptance(length=torch.zeros(B, dtype=torch.long, device=device),
                          nodes=torch.full((B, 0), NO_NODE, dtype=torch.long, device=device),
                          tokens=bonus.unsqueeze(1), bonus=bonus)
    A = max_depth
    match = (tree.tokens == choice.gather(1, tree.parents + 1)) & tree.valid   # [B, N] (ROOT -> slot 0)
    # A node is on the accepted path iff it and all its ancestors match.
    ok = (match.unsqueeze(1) | ~tree.ancestors).all(-1)                      # [B, N]
    length, best = (tree.depths * ok).max(-1)                                 # [B] deepest accepted node
    # The path: best's ancestors-or-self (none when length is 0: then best is not ok), one per depth.
    on_path = tree.ancestors.gather(1, best.view(B, 1, 1).expand(B, 1, N)).squeeze(1) & ok   # [B, N]
    column = torch.where(on_path, tree.depths, A + 2)                          # depth d -> column d; A+2: dropped
    path = torch.full((B, A + 3), NO_NODE, dtype=torch.long, device=device)
    path.scatter_(1, column, arange(N, device).expand(B, N))                  # column 0: the root (NO_NODE)
    bonus = choice.gather(1, ((best + 1) * (length > 0)).unsqueeze(1)).squeeze(1)
    tokens = torch.zeros(B, A + 3, dtype=torch.long, device=device)
    tokens.scatter_(1, column, tree.tokens)                                     # path tokens at depth d -> column d
    tokens.scatter_(1, (length + 1).unsqueeze(1), bonus.unsqueeze(1))
    return Acceptance(length=length, nodes=path[:, 1: A + 1], tokens=tokens[:, 1: A + 2], bonus=bonus,
                      slots=path[:, : A + 1] + 1)


def greedy_accept(tree: DraftTree, logits: Tensor, max_depth: int | None = None) -> Acceptance:
    """Longest path equal to the target's argmax, plus the target's argmax after it.

    logits: [B, 1+N, V] target logits at the root (slot 0) and at every node (slot i+1).
    """
    depth = int(tree.depths.max()) if max_depth is None and tree.depths.numel() else (max_depth or 0)
    return accept(tree, logits.argmax(-1), depth)


def sample_accept(tree: DraftTree, logits: Tensor, uniforms: Tensor, produced: Tensor, max_depth: int,
                  temperature: float, top_p: float, top_k: int) -> Acceptance:
    """The sampling walk (module docstring): one inverse-CDF draw per slot, then `accept`.

    logits: [B, 1+N, V]; uniforms: [B, L] per-row streams; produced: [B] tokens so far."""
    probs = target_probs(logits, temperature, top_p, top_k)
    return accept(tree, inverse_cdf(probs, slot_uniforms(uniforms, produced, tree)), max_depth)
