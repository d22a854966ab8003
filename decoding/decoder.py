"""SpeculativeDecoder: the decode loop.

One step for the active rows of a batch:
  1. draft: feed the tokens accepted last step, grow a dynamic tree per row (draft.py);
  2. verify: one target forward over [last token, tree nodes] with a tree mask (models.py);
  3. accept: the longest path the target agrees with, plus its bonus token (verify.py);
  4. roll the target cache forward to the accepted path only (cache.py); finished rows leave.
The draft cache only ever holds accepted tokens, so it needs no rollback: next step's draft
forward starts with the tokens it has not seen yet ("pending").
"""
from __future__ import annotations

import time
from collections.abc import Iterable

import torch
from torch import Tensor

from .errors import InputError
from .models import (
    check_pair, forward_block, model_device, prefill, project_image_features, shares_vision_tower,
    validate_inputs, vision_hidden_states, vocab_size,
)
from .stats import GenerationResult, RowStats
from .tree import DraftTree, TreeConfig, verify_positions, verify_visibility
from .verify import greedy_accept, sample_accept, target_probs
from .draft import TreeDrafter


class SpeculativeDecoder:
    """Lossless tree speculative decoding with a target and a draft `LlavaForConditionalGeneration`.

    Greedy output (temperature 0) equals `target.generate(do_sample=False)` token for token;
    sampled output follows the target's own distribution (temperature, top_p).
    """

    def __init__(self, target, draft, tree: TreeConfig | None = None):
        check_pair(target, draft)
        self.target = target
        self.draft = draft
        self.tree = tree or TreeConfig()
        self.shared_vision = shares_vision_tower(target, draft)
        self.drafter = TreeDrafter(draft, self.tree, min(vocab_size(target), vocab_size(draft)))
        # Optional observer called after every verify step with (tree, acceptance); used by
        # the tree-budget calibration (budget.py). None in normal use.
        self.step_observer = None

    def set_tree(self, tree: TreeConfig) -> None:
        """Use another tree shape from the next call on (e.g. one picked by budget.choose_tree)."""
        self.tree = tree
        self.drafter.config = tree

    @torch.no_grad()
    def generate(self, input_ids: Tensor, attention_mask: Tensor, pixel_values: Tensor | None,
                 max_new_tokens: int = 64, temperature: float = 0.0, top_p: float = 1.0,
                 eos_token_id: int | Iterable[int] | None = None,
                 generator: torch.Generator | None = None) -> GenerationResult:
        """Decode every row. input_ids/attention_mask: [B, T] left-padded with image tokens expanded;
        pixel_values: [num_images, C, H, W] or None. eos_token_id: an id, a list of ids ([] = never
        stop early) or None for the target's generation_config default."""
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise InputError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
        if not temperature >= 0:
            raise InputError(f"temperature must be >= 0, got {temperature!r}")
        if not 0 < top_p <= 1:
            raise InputError(f"top_p must be in (0, 1], got {top_p!r}")
        validate_inputs(self.target, input_ids, attention_mask, pixel_values)
        device = model_device(self.target)
        input_ids = input_ids.to(device, torch.long)
        attention_mask = attention_mask.to(device, torch.long)
        eos = _eos_set(self.target if eos_token_id is None else None, eos_token_id)
        sampling = temperature > 0
        B = input_ids.shape[0]
        stats = [RowStats() for _ in range(B)]
        outputs: list[list[int]] = [[] for _ in range(B)]

        t0 = time.perf_counter()
        target_mm = draft_mm = None
        if pixel_values is not None and self.shared_vision:
            hidden = vision_hidden_states(self.target, pixel_values)
            target_mm = project_image_features(self.target, hidden)
            draft_mm = project_image_features(self.draft, hidden)
        tgt, logits = prefill(self.target, input_ids, attention_mask, pixel_values, target_mm)
        drf, _ = prefill(self.draft, input_ids, attention_mask, pixel_values, draft_mm)
        first = self._choose(logits, temperature, top_p, generator)             # [B]
        elapsed = time.perf_counter() - t0
        rows = torch.arange(B, device=device)             # original index of each active row
        done = torch.zeros(B, dtype=torch.bool, device=device)
        for b in range(B):
            stats[b].prefill_s = elapsed
            stats[b].target_forwards = 1
            done[b] = self._extend(outputs[b], [int(first[b])], eos, max_new_tokens) is not None
        last = first
        pending, pending_len = first.unsqueeze(1), torch.ones(B, dtype=torch.long, device=device)

        while True:
            if bool(done.any()):
                keep = torch.nonzero(~done).squeeze(-1)
                if keep.numel() == 0:
                    break
                tgt.select_rows(keep)
                drf.select_rows(keep)
                rows, last, pending, pending_len = rows[keep], last[keep], pending[keep], pending_len[keep]
                done = done[keep]
            active = rows.tolist()
            remaining = max(max_new_tokens - len(outputs[r]) for r in active)
            depth = min(self.tree.max_depth, remaining - 1)

            t0 = time.perf_counter()
            if depth >= 1:
                tree, n_draft = self.drafter.propose(drf, pending, pending_len, depth, temperature)
            else:  # every row needs a single token: the target alone gives it
                tree, n_draft = _empty_tree(len(active), device), 0
            t1 = time.perf_counter()
            tokens = torch.cat([last.unsqueeze(1), tree.tokens], dim=1)
            positions = verify_positions(tree, tgt.lengths)
            query_valid = torch.cat([torch.ones_like(last, dtype=torch.bool).unsqueeze(1), tree.valid], 1)
            logits = forward_block(self.target, tgt, tokens, positions, verify_visibility(tree), query_valid)
            if sampling:
                acc = sample_accept(tree, logits, temperature, top_p, generator)
            else:
                acc = greedy_accept(tree, logits)
            # Keep the root slot and the accepted nodes' slots of the target cache.
            width = 1 + max(len(p) for p in acc.paths)
            index = torch.zeros(len(active), width, dtype=torch.long, device=device)
            keep_slots = torch.zeros(len(active), width, dtype=torch.bool, device=device)
            for i, path in enumerate(acc.paths):
                index[i, : len(path) + 1] = torch.tensor([0] + [n + 1 for n in path], device=device)
                keep_slots[i, : len(path) + 1] = True
            tgt.commit_tail(index, keep_slots)
            t2 = time.perf_counter()
            if self.step_observer is not None:
                self.step_observer(tree, acc)

            new_pending = []
            n_nodes = tree.num_nodes.tolist()
            for i, r in enumerate(active):
                path_tokens = tree.tokens[i, acc.paths[i]].tolist() if acc.paths[i] else []
                step_tokens = path_tokens + [acc.bonus[i]]
                added = self._extend(outputs[r], step_tokens, eos, max_new_tokens)
                done[i] = added is not None
                st = stats[r]
                st.accepted_lengths.append(len(step_tokens) if added is None else added)
                st.target_forwards += 1
                st.draft_forwards += n_draft
                st.tree_nodes.append(n_nodes[i])
                st.draft_s += t1 - t0
                st.verify_s += t2 - t1
                new_pending.append(step_tokens)
            width = max(len(p) for p in new_pending)
            pending = torch.zeros(len(active), width, dtype=torch.long, device=device)
            for i, p in enumerate(new_pending):
                pending[i, : len(p)] = torch.tensor(p, device=device)
            pending_len = torch.tensor([len(p) for p in new_pending], dtype=torch.long, device=device)
            last = torch.tensor(acc.bonus, dtype=torch.long, device=device)

        for b in range(B):
            stats[b].new_tokens = len(outputs[b])
        return GenerationResult(sequences=outputs, stats=stats)

    @staticmethod
    def _choose(logits: Tensor, temperature: float, top_p: float, generator) -> Tensor:
        """The target's own next token from logits [B, V] -> [B]."""
        if temperature == 0:
            return logits.argmax(-1)
        return torch.multinomial(target_probs(logits, temperature, top_p), 1, generator=generator).squeeze(-1)

    @staticmethod
    def _extend(out: list[int], tokens: list[int], eos: set[int], max_new_tokens: int) -> int | None:
        """Append tokens, stopping after the first EOS or at max_new_tokens.

        Returns None when the row goes on, else how many of `tokens` were kept (row finished).
        """
        for n, token in enumerate(tokens, start=1):
            out.append(token)
            if token in eos or len(out) >= max_new_tokens:
                return n
        return None


def _eos_set(target, eos_token_id) -> set[int]:
    if eos_token_id is None and target is not None:
        eos_token_id = target.generation_config.eos_token_id
    if eos_token_id is None:
        return set()
    if isinstance(eos_token_id, int):
        return {eos_token_id}
    return {int(e) for e in eos_token_id}


def _empty_tree(batch: int, device) -> DraftTree:
    empty_long = torch.zeros(batch, 0, dtype=torch.long, device=device)
    return DraftTree(tokens=empty_long, parents=empty_long.clone(), depths=empty_long.clone(),
                     scores=torch.zeros(batch, 0, device=device),
                     valid=torch.zeros(batch, 0, dtype=torch.bool, device=device),
                     ancestors=torch.zeros(batch, 0, 0, dtype=torch.bool, device=device))
