"""SpeculativeEngine: a running batch of rows that new rows can join at any step.

    engine = decoder.engine(max_new_tokens=64)
    engine.add(input_ids, attention_mask, pixel_values, keys=[...])   # prefill, join the batch
    while engine.active:
        result = engine.step()                 # one speculative step for every active row
        for row in result.finished: ...        # row.key, row.tokens, row.stats

One step for the active rows:
  1. draft: feed the tokens accepted last step, grow a dynamic tree per row (draft.py);
  2. verify: one target forward over [last token, tree nodes] with a tree mask (models.py);
  3. accept: the longest path the target agrees with, plus its bonus token (verify.py);
  4. roll the target cache forward to the accepted path only (cache.py); finished rows leave.
The draft cache only ever holds accepted tokens, so it needs no rollback: next step's draft
forward starts with the tokens it has not seen yet ("pending").

Joining: `add` prefills the new rows on their own (target and draft, image features computed
once), then appends their caches to the running ones (cache.KVState.merge). Every row carries
its own positions and holes, so a row's tokens do not depend on which rows share its batch or
when it joined: greedy output is the target's greedy output, and a sampled row depends only on
its seed (verify.py draws each output position's token from a per-row uniform stream).
Dimensions: B active rows, T prompt tokens, N tree nodes, A accepted nodes, L max_new_tokens.
"""
from __future__ import annotations

import hashlib
import time
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .errors import InputError
from .models import forward_block, model_device, prefill, project_image_features, validate_inputs, vision_hidden_states
from .stats import RowStats
from .tree import DraftTree, verify_positions, verify_visibility
from .verify import Acceptance, greedy_accept, inverse_cdf, sample_accept, target_probs

SEED_BITS = 63
PENDING_CAP = 16   # steps without drafting let the draft's backlog grow up to this, then feed it
RESERVE_TOKENS = 256   # cache slots preallocated per row for new tokens when rows join (cache.SlotLayer)


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


@dataclass
class FinishedRow:
    key: Hashable
    tokens: list[int]           # new tokens, cut after the first EOS (EOS kept)
    stats: RowStats


@dataclass
class StepResult:
    """What one `step()` did. Timings are wall seconds with the device synchronised."""

    rows: int                                   # active rows in the step
    accepted: list[int]                         # tokens each row gained (bonus included, cut at EOS)
    nodes: int                                  # tree nodes verified over all rows
    draft_forwards: int
    draft_s: float
    verify_s: float
    finished: list[FinishedRow] = field(default_factory=list)


@dataclass
class _Rows:
    """Per-row state of the running batch, aligned with dim 0 of both caches."""

    keys: list
    outputs: list[list[int]]
    stats: list[RowStats]
    last: Tensor            # [B] last token (the root of the next tree)
    pending: Tensor         # [B, P] tokens the draft has not seen (right-padded)
    pending_len: Tensor     # [B]
    produced: Tensor        # [B] tokens produced so far (device copy of len(outputs[b]))
    uniforms: Tensor | None  # [B, L] per-row sampling streams (None when greedy)

    def select(self, keep: list[int], index: Tensor) -> None:
        self.keys = [self.keys[i] for i in keep]
        self.outputs = [self.outputs[i] for i in keep]
        self.stats = [self.stats[i] for i in keep]
        self.last, self.pending, self.pending_len = self.last[index], self.pending[index], self.pending_len[index]
        self.produced = self.produced[index]
        if self.uniforms is not None:
            self.uniforms = self.uniforms[index]

    def extend(self, other: "_Rows") -> None:
        self.keys += other.keys
        self.outputs += other.outputs
        self.stats += other.stats
        self.last = torch.cat([self.last, other.last])
        width = max(self.pending.shape[1], other.pending.shape[1])
        self.pending = torch.cat([_right_pad(self.pending, width), _right_pad(other.pending, width)])
        self.pending_len = torch.cat([self.pending_len, other.pending_len])
        self.produced = torch.cat([self.produced, other.produced])
        if self.uniforms is not None:
            self.uniforms = torch.cat([self.uniforms, other.uniforms])


class SpeculativeEngine:
    """A running batch over a `SpeculativeDecoder`'s target, draft and drafter (see module doc)."""

    def __init__(self, decoder, options: SamplingOptions):
        self.decoder = decoder
        self.options = options
        self.device = model_device(decoder.target)
        self._tgt = self._drf = None
        self._rows: _Rows | None = None
        # The tree of a step, from the number of active rows: the decoder's budget table when it
        # has one (budget.py; None there = a plain target step, no drafting), else its TreeConfig.
        budget = getattr(decoder, "budget", None)
        self.tree_for = budget.lookup if budget is not None else (lambda active: decoder.tree)
        # Optional observer called after every verify with (tree, acceptance); the tree-budget
        # calibration (budget.py) uses it. None in normal use.
        self.step_observer = None

    def fresh(self) -> "SpeculativeEngine":
        """An empty engine with the same pair and options (after an error left this one unusable)."""
        engine = SpeculativeEngine(self.decoder, self.options)
        engine.step_observer = self.step_observer
        engine.tree_for = self.tree_for
        return engine

    @property
    def active(self) -> int:
        return 0 if self._rows is None else len(self._rows.keys)

    @property
    def keys(self) -> list:
        return [] if self._rows is None else list(self._rows.keys)

    # -- joining --------------------------------------------------------------------------------
    @torch.no_grad()
    def add(self, input_ids: Tensor, attention_mask: Tensor, pixel_values: Tensor | None,
            keys: Sequence | None = None, seeds: Sequence[int] | None = None) -> list[FinishedRow]:
        """Prefill rows and add them to the running batch.

        input_ids/attention_mask: [B, T] left-padded with image tokens expanded; pixel_values:
        [num_images, C, H, W] or None. keys: the caller's handle per row (default 0..B-1 after
        the rows added so far). seeds: per-row sampling seeds (see `row_seed`); needed when
        sampling. Returns the rows already finished by their first token (EOS or
        max_new_tokens=1); the others are active from the next `step()` on.
        """
        opts, dec = self.options, self.decoder
        validate_inputs(dec.target, input_ids, attention_mask, pixel_values)
        B = input_ids.shape[0]
        keys = list(range(B)) if keys is None else list(keys)
        if len(keys) != B:
            raise InputError(f"{len(keys)} keys for {B} rows")
        if opts.sampling and (seeds is None or len(seeds) != B):
            raise InputError("sampling needs one seed per row (decoding.engine.row_seed(seed, id))")
        input_ids = input_ids.to(self.device, torch.long)
        attention_mask = attention_mask.to(self.device, torch.long)

        _sync(self.device)
        t0 = time.perf_counter()
        target_mm = draft_mm = None
        if pixel_values is not None and dec.shared_vision:
            hidden = vision_hidden_states(dec.target, pixel_values)
            target_mm = project_image_features(dec.target, hidden)
            draft_mm = project_image_features(dec.draft, hidden)
        # Cache room for the tokens to come (up to RESERVE_TOKENS; longer outputs grow the buffers)
        # and one step's temporary slots, so that steps write in place instead of copying the caches.
        ahead = min(opts.max_new_tokens, RESERVE_TOKENS)
        tgt, logits = prefill(dec.target, input_ids, attention_mask, pixel_values, target_mm,
                              spare=ahead + min(dec.tree.max_nodes, dec.tree.max_candidates) + 1)
        drf, _ = prefill(dec.draft, input_ids, attention_mask, pixel_values, draft_mm,
                         spare=ahead + PENDING_CAP + dec.tree.max_depth * dec.tree.frontier)
        uniforms = None
        if opts.sampling:
            uniforms = torch.stack([
                torch.rand(opts.max_new_tokens, generator=torch.Generator().manual_seed(int(s)))
                for s in seeds]).to(self.device)
            first = inverse_cdf(target_probs(logits, opts.temperature, opts.top_p, opts.top_k), uniforms[:, 0])
        else:
            first = logits.argmax(-1)                                                   # [B]
        first_list = first.tolist()
        _sync(self.device)
        elapsed = time.perf_counter() - t0

        stats = [RowStats(prefill_s=elapsed, target_forwards=1) for _ in range(B)]
        outputs = [[] for _ in range(B)]
        finished_first = [_extend(outputs[b], [first_list[b]], opts) is not None for b in range(B)]
        new = _Rows(keys=keys, outputs=outputs, stats=stats, last=first, pending=first.unsqueeze(1),
                    pending_len=torch.ones(B, dtype=torch.long, device=self.device),
                    produced=torch.ones(B, dtype=torch.long, device=self.device), uniforms=uniforms)
        done = [self._finish(new, b) for b in range(B) if finished_first[b]]
        if done:
            keep = [b for b in range(B) if not finished_first[b]]
            if not keep:
                return done
            _keep_rows(new, tgt, drf, keep)
        if self._rows is None:
            self._rows, self._tgt, self._drf = new, tgt, drf
        else:
            self._rows.extend(new)
            self._tgt.merge(tgt)
            self._drf.merge(drf)
        return done

    # -- one step -------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self) -> StepResult:
        """One speculative step for every active row; finished rows leave the batch."""
        rows, opts, dec = self._rows, self.options, self.decoder
        if rows is None:
            return StepResult(rows=0, accepted=[], nodes=0, draft_forwards=0, draft_s=0.0, verify_s=0.0)
        B = len(rows.keys)
        remaining = opts.max_new_tokens - min(len(o) for o in rows.outputs)
        shape = self.tree_for(B)
        depth = min(shape.max_depth, remaining - 1) if shape is not None else 0

        _sync(self.device)
        t0 = time.perf_counter()
        if depth >= 1:
            tree, n_draft = dec.drafter.propose(self._drf, rows.pending, rows.pending_len, depth, opts.temperature,
                                                shape)
        else:  # no drafting this step (the budget says it cannot pay, or one token is left): target alone
            tree, n_draft = _empty_tree(B, self.device), 0
            if rows.pending.shape[1] >= PENDING_CAP:   # keep the draft's backlog short
                dec.drafter.feed_pending(self._drf, rows.pending, rows.pending_len)
                rows.pending, rows.pending_len = rows.pending[:, :0], torch.zeros_like(rows.pending_len)
                n_draft = 1
        _sync(self.device)
        t1 = time.perf_counter()
        tokens = torch.cat([rows.last.unsqueeze(1), tree.tokens], dim=1)
        positions = verify_positions(tree, self._tgt.lengths)
        query_valid = torch.cat([torch.ones_like(rows.last, dtype=torch.bool).unsqueeze(1), tree.valid], 1)
        logits = forward_block(dec.target, self._tgt, tokens, positions, verify_visibility(tree), query_valid,
                               lean=dec.lean_target)
        if opts.sampling:
            acc = sample_accept(tree, logits, rows.uniforms, rows.produced, max(depth, 0),
                                opts.temperature, opts.top_p, opts.top_k)
        else:
            acc = greedy_accept(tree, logits, max(depth, 0))
        # The one host read of the step: tokens, lengths and node counts of every row.
        host = torch.cat([acc.length.unsqueeze(1), tree.num_nodes.unsqueeze(1), acc.tokens], 1).tolist()
        self._commit_target(acc, 1 + max(h[0] for h in host))
        _sync(self.device)
        t2 = time.perf_counter()
        if self.step_observer is not None:
            self.step_observer(tree, acc)

        accepted, finished_at = [], []
        for i, (n_acc, n_nodes, *step_tokens) in enumerate(host):
            step_tokens = step_tokens[: n_acc + 1]
            kept = _extend(rows.outputs[i], step_tokens, opts)
            st = rows.stats[i]
            st.accepted_lengths.append(len(step_tokens) if kept is None else kept)
            st.target_forwards += 1
            st.draft_forwards += n_draft
            st.tree_nodes.append(n_nodes)
            st.draft_s += t1 - t0
            st.verify_s += t2 - t1
            accepted.append(st.accepted_lengths[-1])
            if kept is not None:
                finished_at.append(i)
        if depth >= 1:               # the draft saw every pending token: the step's tokens are the new backlog
            rows.pending, rows.pending_len = acc.tokens, acc.length + 1
        else:                        # nothing fed (or the backlog just fed): append to what the draft has not seen
            rows.pending, rows.pending_len = _append_rows(rows.pending, rows.pending_len, acc.tokens, acc.length + 1)
        rows.last = acc.bonus
        rows.produced = rows.produced + acc.length + 1
        result = StepResult(rows=B, accepted=accepted, nodes=sum(h[1] for h in host), draft_forwards=n_draft,
                            draft_s=t1 - t0, verify_s=t2 - t1)
        if finished_at:
            result.finished = [self._finish(rows, i) for i in finished_at]
            self._drop(set(finished_at))
        return result

    def _commit_target(self, acc: Acceptance, width: int) -> None:
        """Keep the root slot and the accepted nodes' slots of the target cache: `width` slots per
        row (1 + the longest accepted path of the batch; shorter rows get holes)."""
        B = acc.nodes.shape[0]
        nodes = acc.nodes[:, : width - 1]
        index = torch.cat([torch.zeros(B, 1, dtype=torch.long, device=self.device), nodes.clamp(min=0) + 1], 1)
        keep = torch.arange(width, device=self.device).unsqueeze(0) <= acc.length.unsqueeze(1)
        self._tgt.commit_tail(index, keep)

    def _finish(self, rows: _Rows, i: int) -> FinishedRow:
        st = rows.stats[i]
        st.new_tokens = len(rows.outputs[i])
        return FinishedRow(key=rows.keys[i], tokens=rows.outputs[i], stats=st)

    def _drop(self, finished: set[int]) -> None:
        keep = [i for i in range(len(self._rows.keys)) if i not in finished]
        if not keep:
            self._rows = self._tgt = self._drf = None
            return
        _keep_rows(self._rows, self._tgt, self._drf, keep)


def _keep_rows(rows: _Rows, tgt, drf, keep: list[int]) -> None:
    """Keep only rows `keep` of the per-row state and both caches."""
    index = torch.tensor(keep, device=rows.last.device)
    rows.select(keep, index)
    tgt.select_rows(index)
    drf.select_rows(index)


def _extend(out: list[int], tokens: list[int], opts: SamplingOptions) -> int | None:
    """Append tokens, stopping after the first EOS or at max_new_tokens.

    Returns None when the row goes on, else how many of `tokens` were kept (row finished).
    """
    for n, token in enumerate(tokens, start=1):
        out.append(token)
        if token in opts.eos or len(out) >= opts.max_new_tokens:
            return n
    return None


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


def _append_rows(a: Tensor, a_len: Tensor, b: Tensor, b_len: Tensor) -> tuple[Tensor, Tensor]:
    """Per row, b[:b_len] appended after a[:a_len] (right-padded rows).  [B, P] + [B, Q] -> [B, P+Q]."""
    B, Q = b.shape
    out = torch.cat([a, torch.zeros_like(b)], dim=1)
    index = a_len.unsqueeze(1) + torch.arange(Q, device=b.device)
    out.scatter_(1, index, b)
    return out, a_len + b_len


def _right_pad(t: Tensor, width: int) -> Tensor:
    if t.shape[1] == width:
        return t
    return torch.cat([t, t.new_zeros(t.shape[0], width - t.shape[1])], dim=1)


def _empty_tree(batch: int, device) -> DraftTree:
    empty_long = torch.zeros(batch, 0, dtype=torch.long, device=device)
    return DraftTree(tokens=empty_long, parents=empty_long.clone(), depths=empty_long.clone(),
                     scores=torch.zeros(batch, 0, device=device),
                     valid=torch.zeros(batch, 0, dtype=torch.bool, device=device),
                     ancestors=torch.zeros(batch, 0, 0, dtype=torch.bool, device=device))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seeds_from(generator: torch.Generator | None, rows: int) -> list[int]:
    """Per-row seeds drawn from a generator (the `generate(generator=...)` form)."""
    device = generator.device if generator is not None else "cpu"
    return torch.randint(0, 2 ** SEED_BITS - 1, (rows,), generator=generator, device=device).tolist()

