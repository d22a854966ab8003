"""SpeculativeDecoder: a target/draft pair and its tree drafter; `generate` decodes a batch.

`generate` = `add` every row to a `SpeculativeEngine` (engine.py), then `step()` until no row is
left. The engine is also what a caption actor keeps across batches (continuous batching).
"""
from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

from .draft import TreeDrafter
from .graphs import step_graphs
from .kvpool import KeptBuffer
from .engine import SpeculativeEngine
from .options import SamplingOptions, default_top_k, eos_set, seeds_from
from .families import adapter
from .models import check_pair, lean_is_exact, shares_vision_tower, vocab_size
from .stats import GenerationResult
from .tree import TreeConfig


class SpeculativeDecoder:
    """Lossless tree speculative decoding with a LLaVA target and a draft of its family or a
    text-only draft (families.py).

    Greedy output (temperature 0) equals `target.generate(do_sample=False)` token for token;
    sampled output follows the target's own distribution (temperature, top_k, top_p, as `generate` warps it).
    """

    def __init__(self, target, draft, tree: TreeConfig | None = None, compile: str = "off"):
        check_pair(target, draft)
        self.target = target
        self.draft = draft
        self.tree = tree or TreeConfig()
        self.shared_vision = shares_vision_tower(target, draft)
        # A text-only draft (families.TextFamily) prefills the rows' prompts without image tokens.
        self.text_draft = not adapter(draft).multimodal
        self.image_token_id = adapter(target).image_token_id(target.config)
        # Verify with the lean forward when it is bit-identical to transformers' for this target
        # (models.lean_is_exact): same logits, without transformers' per-layer overhead.
        self.lean_target = lean_is_exact(target)
        self.drafter = TreeDrafter(draft, self.tree, min(vocab_size(target), vocab_size(draft)),
                                   target_vocab=vocab_size(target))
        # Optional observer called after every verify step with (tree, acceptance); used by
        # the tree-budget calibration (budget.py). None in normal use.
        self.step_observer = None
        # How steps run (graphs.py): None = op by op at each step's exact shapes ("off"); else the
        # static-shape phases at a bucket, compiled ("on"; "auto" on CUDA) or not ("static").
        self.graphs = step_graphs(compile, target, draft)
        # Optional budget.BudgetTable: the tree per active batch size (None: `tree` at every step).
        self.budget = None
        self.kept = (KeptBuffer(), KeptBuffer())   # target and draft pool buffers between `generate` calls

    def set_tree(self, tree: TreeConfig) -> None:
        """Use another tree shape from the next call on (when no `budget` table is set)."""
        self.tree = tree
        self.drafter.config = tree

    def engine(self, max_new_tokens: int = 64, temperature: float = 0.0, top_p: float = 1.0,
               top_k: int | None = None, eos_token_id: int | Iterable[int] | None = None,
               max_rows: int | None = None, max_length: int | None = None,
               trees: list[TreeConfig] | None = None, drafting: bool = True,
               kept=None) -> SpeculativeEngine:
        """A running batch over this pair (engine.py). top_k None: what `generate` would apply
        for the target (its generation config, else transformers' default); 0 = off. eos_token_id:
        an id, a list of ids ([] = never stop early) or None for the target's generation_config.
        max_rows / max_length: the KV plan (capacity.plan_capacity): rows decoding at once and
        token slots per row, allocated once; None = sized by the rows that come, growing. trees:
        every shape a step may run when more than `tree` and the budget table (the plan's room).
        drafting=False: a target-only engine (no draft prefill or pool); kept: the pools' buffers
        (engine.SpeculativeEngine)."""
        options = SamplingOptions(
            max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
            top_k=default_top_k(self.target) if top_k is None else top_k,
            eos=eos_set(self.target if eos_token_id is None else None, eos_token_id))
        engine = SpeculativeEngine(self, options, max_rows=max_rows, max_length=max_length, trees=trees,
                                   drafting=drafting, kept=kept)
        engine.step_observer = self.step_observer
        return engine

    def generate(self, input_ids: Tensor, attention_mask: Tensor, pixel_values: Tensor | None,
                 max_new_tokens: int = 64, temperature: float = 0.0, top_p: float = 1.0,
                 eos_token_id: int | Iterable[int] | None = None,
                 generator: torch.Generator | None = None, top_k: int | None = None,
                 seeds: list[int] | None = None, image_sizes: Tensor | None = None) -> GenerationResult:
        """Decode every row. input_ids/attention_mask: [B, T] left-padded with image tokens expanded;
        pixel_values: [num_images, C, H, W] or None (NeXT/OneVision: [num_images, tiles, C, H, W]
        with image_sizes [num_images, 2], the processor's output). Sampling (temperature > 0) draws row b from
        seeds[b] (see engine.row_seed) or, without seeds, from seeds drawn from `generator`."""
        B = input_ids.shape[0] if isinstance(input_ids, Tensor) and input_ids.dim() == 2 else 0
        # A budget that never drafts decodes on the target alone; the pools' buffers are kept for the
        # next call of the same size (kvpool.KeptBuffer: a fresh CPU buffer costs its page faults again).
        drafting = self.budget is None or self.budget.drafts
        engine = self.engine(max_new_tokens, temperature, top_p, top_k, eos_token_id, max_rows=max(B, 1),
                             drafting=drafting, kept=self.kept)
        if engine.options.sampling and seeds is None:
            seeds = seeds_from(generator, B)
        done = {row.key: row for row in engine.add(input_ids, attention_mask, pixel_values, seeds=seeds,
                                                              image_sizes=image_sizes)}
        while engine.active:
            done.update((row.key, row) for row in engine.step().finished)
        engine.keep_buffers()
        return GenerationResult(sequences=[done[b].tokens for b in range(B)], stats=[done[b].stats for b in range(B)])

    def generate_stream(self, batches: Iterable[tuple[Tensor, Tensor, Tensor | None]], slots: int,
                        max_new_tokens: int = 64, eos_token_id: int | Iterable[int] | None = None) -> GenerationResult:
        """Greedy decode of every row of `batches` ((input_ids, attention_mask, pixel_values), each
        as `generate` takes them, one image per row) through `slots` rows decoding at once: a row
        joins as soon as another finishes (continuous batching, as caption actors run), so a step
        never waits on the slowest row of a batch. Rows come back in input order, each equal to
        what `generate` gives it (greedy output does not depend on its batch-mates)."""
        if slots < 1:
            raise ValueError(f"slots must be >= 1, got {slots}")
        queue = [(ids[i:i + 1], mask[i:i + 1], None if pixels is None else pixels[i:i + 1])
                 for ids, mask, pixels in batches for i in range(ids.shape[0])]
        drafting = self.budget is None or self.budget.drafts
        engine = self.engine(max_new_tokens, eos_token_id=eos_token_id, max_rows=slots, drafting=drafting,
                             kept=self.kept)
        done, next_row = {}, 0
        while next_row < len(queue) or engine.active:
            join = queue[next_row: next_row + slots - engine.active]
            for ids, mask, pixels in _same_length_runs(join):   # one prefill per run of equal prompt lengths
                keys = range(next_row, next_row + ids.shape[0])
                done.update((row.key, row) for row in engine.add(ids, mask, pixels, keys=keys))
                next_row += ids.shape[0]
            if engine.active:
                done.update((row.key, row) for row in engine.step().finished)
        engine.keep_buffers()
        rows = range(len(queue))
        return GenerationResult(sequences=[done[r].tokens for r in rows], stats=[done[r].stats for r in rows])


def _same_length_runs(rows: list[tuple[Tensor, Tensor, Tensor | None]]):
    """Consecutive single rows of the same padded length, concatenated into one batch each."""
    start = 0
    for end in range(1, len(rows) + 1):
        if end == len(rows) or rows[end][0].shape[1] != rows[start][0].shape[1]:
            run = rows[start:end]
            pixels = None if run[0][2] is None else torch.cat([r[2] for r in run])
            yield torch.cat([r[0] for r in run]), torch.cat([r[1] for r in run]), pixels
            start = end
