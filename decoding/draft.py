"""The draft side of a step: feed the newly accepted tokens, then grow a dynamic tree.

Tree growth (EAGLE-2), all rows in the same draft forwards: depth-1 candidates are the top-k
children of the root; then, depth after depth, the best `frontier` candidates of the last depth
(the greedy-chain node always among them) are fed to the draft, each seeing the row's committed
tokens and its own ancestors, and their top-k children become the next candidates. Finally the
best `max_nodes` candidates are kept, ancestors always kept (tree.prune_tree).

Every step runs the same ops for a given shape: a fixed number of depths, fixed widths, masks
instead of branches, and not one host read (the caller knows every length it needs). The
tree's temporary KV goes to a block after the longest row (kvpool.py) and is simply not
committed: the draft cache only ever holds accepted tokens.

Dimensions: B rows, P pending tokens, F frontier width, K top-k, C candidates, T temp slots,
V vocabulary.
"""
from __future__ import annotations

import math
from functools import partial

import torch
from torch import Tensor

from . import models
from .consts import arange
from .graphs import DraftSpec, draft_phase
from .kvpool import KVPool, float_mask
from .lean import supports_lean
from .tree import NEG_INF, DraftTree, TreeConfig, TreeLayout, prune_tree


class TreeDrafter:
    """Proposes one DraftTree per row from a draft LLaVA and its KVPool."""

    def __init__(self, model, config: TreeConfig, vocab_limit: int, lean: bool = True, target_vocab: int | None = None):
        self.model = model
        self.config = config
        self.vocab_limit = vocab_limit   # tokens the target can also emit (drafts never propose others)
        # ids the target may emit that the draft has no embedding for (vocabularies padded apart)
        self.embeddings = model.get_input_embeddings().weight.shape[0]
        self.clamp_ids = target_vocab is not None and target_vocab > self.embeddings
        self.lean = lean and supports_lean(model)   # lean.py forward: same logits, less overhead
        self.dtype = next(model.parameters()).dtype
        self._layouts: dict = {}
        self._causal: dict = {}

    def layout(self, cfg: TreeConfig, depth: int, device) -> TreeLayout:
        key = (cfg.top_k, cfg.frontier, depth, str(device))
        if key not in self._layouts:
            self._layouts[key] = TreeLayout.build(cfg.top_k, cfg.frontier, depth, self.vocab_limit, self.dtype, device)
        return self._layouts[key]

    def phase(self, cfg: TreeConfig, depth: int, temperature: float):
        """(key, fn) of the static draft phase for this shape (graphs.draft_phase)."""
        spec = DraftSpec(layout=self.layout(cfg, depth, self.model.device), config=cfg, vocab_limit=self.vocab_limit,
                         embeddings=self.embeddings, temperature=temperature, dtype=self.dtype)
        key = ("draft", cfg, depth, temperature)
        return key, partial(draft_phase, self.model, spec)

    def _logprobs(self, logits: Tensor, temperature: float) -> Tensor:
        logits = logits[..., : self.vocab_limit]
        if temperature > 0:
            logits = logits / temperature
        return torch.log_softmax(logits, dim=-1, dtype=torch.float32)

    def feed_pending(self, pool: KVPool, rows: int, pending: Tensor, pending_len: Tensor,
                     pending_host: list[int]) -> Tensor:
        """Commit the accepted tokens the draft has not seen; return the logits after each row's last.

        pending: [B, P] (right-padded), pending_len: [B] (0 for a free slot), pending_host: the same
        lengths on the host. Returns [B, V]."""
        B, P = pending.shape
        device = pending.device
        head = pool.head(rows)
        causal = self._causal.get(str(device))
        if causal is None or causal.shape[0] < P:   # float, built once: block_mask takes it as is
            allowed = torch.tril(torch.ones(max(P, 32), max(P, 32), dtype=torch.bool, device=device))
            causal = self._causal[str(device)] = float_mask(allowed, self.dtype)
        causal = causal[:P, :P]
        positions = pool.lengths[:rows, None] + arange(P, device)
        if self.clamp_ids:
            pending = torch.where(pending < self.embeddings, pending, 0)
        mask = pool.block_mask(rows, head, causal.expand(B, P, P), self.dtype, positions, positions)
        last = (pending_len - 1).clamp_(min=0)
        logits = models.model_forward(self.model, pool.begin(rows, head), pending, positions, mask, self.lean,
                                      keep=last)
        pool.commit(rows, head, arange(P, device).expand(B, P), pending_len)
        pool.advance_host(rows, pending_host)
        return logits[:, 0]

    def propose(self, pool: KVPool, rows: int, pending: Tensor, pending_len: Tensor, pending_host: list[int],
                max_depth: int, temperature: float, config: TreeConfig | None = None) -> tuple[DraftTree, int]:
        """Grow one tree per row (shape `config`, default self.config) to depth `max_depth`.
        Returns the tree and the number of draft forwards made (max_depth: one to feed the
        pending tokens, one per depth after the first)."""
        cfg = config or self.config
        device = pending.device
        B = pending.shape[0]
        lay = self.layout(cfg, max_depth, device)
        T = lay.slots
        root_lp = self._logprobs(self.feed_pending(pool, rows, pending, pending_len, pending_host), temperature)
        scores, tokens = root_lp.topk(lay.top_k, dim=-1)                       # [B, K] level 1
        levels_tok, levels_score, levels_mask, fronts = [tokens], [scores], [lay.empty.expand(B, -1, -1)], []
        mask_level = levels_mask[0]
        head = pool.head(rows)
        committed = pool.committed_mask(rows, head, self.dtype)                # [B, 1, head], all depths
        log_thr = math.log(cfg.threshold) if cfg.threshold > 0 else None
        # The root sits at lengths - 1 (the last pending token); a node at depth j at root + j,
        # so the frontier fed at depth i + 2 (nodes of depth i + 1) sits at lengths + i.
        tree_pos = pool.lengths[:rows, None] + arange(max(1, len(lay.fronts)), device)          # [B, D-1]
        for i, F in enumerate(lay.fronts):                                     # depth d = i + 2
            start, off = lay.level_start[i], lay.slot_start[i]
            top, front = (scores + lay.chain_bias[start: start + scores.shape[1]]).topk(F, dim=-1)   # [B, F]
            front_score = scores.gather(1, front)
            if log_thr is not None:   # below the threshold: not expanded (the chain, biased, always is)
                front_score = front_score.masked_fill(top < log_thr, NEG_INF)
            front_tok = tokens.gather(1, front)
            front_mask = torch.maximum(mask_level.gather(1, front.unsqueeze(-1).expand(B, F, T)), lay.own[i])
            mask = torch.cat([committed.expand(B, F, head), front_mask[..., : off + F]], dim=-1).unsqueeze(1)
            positions = tree_pos[:, i: i + 1].expand(B, F)
            if pool.window is not None:
                mask = pool.windowed(mask, head, positions, pool.lengths[:rows, None] + lay.slot_level[: off + F])
            logits = models.model_forward(self.model, pool.begin(rows, head + off), front_tok, positions, mask,
                                          self.lean)
            child_lp, child_tok = self._logprobs(logits, temperature).topk(lay.top_k, dim=-1)   # [B, F, K]
            scores = (front_score.unsqueeze(-1) + child_lp).view(B, -1)
            tokens = child_tok.view(B, -1)
            mask_level = front_mask.index_select(1, lay.child_parent[i])        # children inherit their parent's
            levels_tok.append(tokens)
            levels_score.append(scores)
            levels_mask.append(mask_level)
            fronts.append(front)
        if not lay.fronts:
            tree = prune_tree(lay, tokens, scores, lay.empty.expand(B, -1, -1), tokens[:, :0], cfg.max_nodes)
        else:
            tree = prune_tree(lay, torch.cat(levels_tok, 1), torch.cat(levels_score, 1), torch.cat(levels_mask, 1),
                              torch.cat(fronts, 1), cfg.max_nodes)
        return tree, max_depth
