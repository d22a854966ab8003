"""SpeculativeEngine: a running batch of rows that new rows can join at any step.

    engine = decoder.engine(max_new_tokens=64)
    engine.add(input_ids, attention_mask, pixel_values, keys=[...])   # prefill, join the batch (engine.can_admit)
    while engine.active:
        result = engine.step()                 # one speculative step for every active row
        for row in result.finished: ...        # row.key, row.tokens, row.stats

One step for the active rows:
  1. draft: feed the tokens accepted last step, grow a dynamic tree per row (draft.py);
  2. verify: one target forward over [last token, tree nodes] with a tree mask (models.py);
  3. accept: the longest path the target agrees with, plus its bonus token (verify.py);
  4. commit to the target cache the root and the accepted path only (kvpool.py); finished rows leave.
The draft cache only ever holds accepted tokens, so it needs no rollback: next step's draft
forward starts with the tokens it has not seen yet ("pending").

KV: both models' caches are slot pools (kvpool.py), allocated once. A row takes a free slot when
it joins; a finish frees the slot, and rows above a freed slot move down into it (only their own
tokens are copied), so the active rows are always the slots [0, B) a step runs over.
The step issues a fixed sequence of ops for a given tree shape and reads the device once, at
the end (the accepted tokens, counts and node counts together); every length the host needs
(block heads, pending widths) it already knows from earlier reads.

Joining: `add` prefills the new rows on their own (target and draft, image features computed
once) and writes their prompts into free slots. Every row has its own length and positions, so a
row's tokens do not depend on which rows share its batch or when it joined: greedy output is the
target's greedy output, and a sampled row depends only on its seed (verify.py draws each output
position's token from a per-row uniform stream).
Dimensions: R slots, B slots a step runs over, T prompt tokens, N tree nodes, A accepted nodes,
L max_new_tokens.
"""
from __future__ import annotations

import time
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from functools import partial

import torch
from torch import Tensor

from . import models
from .capacity import PENDING_CAP, tree_room
from .errors import CapacityError, InputError
from .consts import arange
from .kvpool import KeptBuffer, KVPool, KVShape
from .families import adapter, text_prompt
from .models import model_device, model_dtype, prefill, sliding_window, project_image_features, validate_inputs, vision_hidden_states
from .stats import RowStats
from .stepstate import PhaseTimer, SlotState, causal, empty_tree, read_host, rows_of, zero_column
from .tree import DraftTree, verify_positions, verify_visibility
from .verify import Acceptance, greedy_accept, inverse_cdf, sample_accept, target_probs
from .graphs import (VerifySpec, batch_bucket, length_bucket, pending_bucket, spare_rows, tree_tensors,
                     verify_phase)
from .options import (SEED_BITS, SamplingOptions, default_top_k, eos_set, row_seed,  # noqa: F401 (re-exported)
                      seeds_from)

RESERVE_TOKENS = 256   # token slots an unplanned engine gives a row for new tokens before growing (kvpool.py)


@dataclass
class FinishedRow:
    key: Hashable
    tokens: list[int]           # new tokens, cut after the first EOS (EOS kept)
    stats: RowStats


@dataclass
class StepResult:
    """What one `step()` did. draft_s / verify_s: the phases' seconds (CUDA events on a GPU, read
    after the step's one host read, so timing adds no sync; host clocks on a CPU)."""

    rows: int                                   # active rows in the step
    accepted: list[int]                         # tokens each row gained (bonus included, cut at EOS)
    nodes: int                                  # tree nodes verified over all rows
    draft_forwards: int
    draft_s: float
    verify_s: float
    finished: list[FinishedRow] = field(default_factory=list)
    running_accepted: list[int] = field(default_factory=list)   # `accepted` of the rows still running


@dataclass
class _Row:
    """Host-side record of the row in one slot."""

    key: Hashable
    outputs: list[int]
    stats: RowStats


class SpeculativeEngine:
    """A running batch over a `SpeculativeDecoder`'s target, draft and drafter (see module doc).

    max_rows / max_length: the KV pools' row slots and token slots per row. Given (a memory plan,
    decoding/capacity.py), the pools are allocated once at that size and `add` refuses rows that
    would not fit (`can_admit` says beforehand); None: sized from the first rows, growing when more
    rows or longer rows come (a copy of the pool each time it grows).

    drafting=False: a target-only engine (plain decoding on the target's pool: no draft prefill,
    no draft pool, no backlog feeds), for a decoder whose budget never drafts; every step is a
    one-token target step whatever `tree_for` says. kept: (target, draft) `KeptBuffer`s the pools
    take their buffers from (the decoder's, for `generate`), None: fresh buffers."""

    def __init__(self, decoder, options: SamplingOptions, max_rows: int | None = None,
                 max_length: int | None = None, trees: list | None = None, drafting: bool = True,
                 kept: tuple[KeptBuffer, KeptBuffer] | None = None):
        self.decoder = decoder
        self.options = options
        self.device = model_device(decoder.target)
        self.max_rows, self.max_length = max_rows, max_length
        self.trees = trees    # tree shapes steps may run (the KV room is sized for them); None: the decoder's
        self.drafting = drafting
        self.kept = kept
        self._tpool = self._dpool = None
        self._slots: list[_Row | None] = []
        self._state: SlotState | None = None
        self._pending_host: list[int] = []      # pending_len per slot, on the host
        # The tree of a step, from the number of active rows: the decoder's budget table when it
        # has one (budget.py; None there = a plain target step, no drafting), else its TreeConfig.
        budget = getattr(decoder, "budget", None)
        self.tree_for = budget.lookup if budget is not None else (lambda active: decoder.tree)
        # Optional observer called after every verify with (tree, acceptance); the tree-budget
        # calibration (budget.py) uses it. None in normal use.
        self.step_observer = None

    def fresh(self) -> "SpeculativeEngine":
        """An empty engine with the same pair and options (after an error left this one unusable)."""
        engine = SpeculativeEngine(self.decoder, self.options, self.max_rows, self.max_length, self.trees,
                                   self.drafting)
        engine.step_observer = self.step_observer
        engine.tree_for = self.tree_for
        return engine

    def keep_buffers(self) -> None:
        """Leave the pools' buffers to `kept` for the next engine of the same size (call when done)."""
        if self.kept is not None:
            for kept, pool in zip(self.kept, (self._tpool, self._dpool)):
                if pool is not None:
                    kept.keep(pool.kv)

    @property
    def active(self) -> int:
        return sum(row is not None for row in self._slots)

    @property
    def keys(self) -> list:
        return [row.key for row in self._slots if row is not None]

    @property
    def rows(self) -> list[_Row]:
        """The active rows' host records (slot order)."""
        return [row for row in self._slots if row is not None]

    # -- sizing ---------------------------------------------------------------------------------
    def _tree_room(self) -> tuple[int, int]:
        """Block slots a step may need beyond a row's length: (target verify, draft feed or tree)."""
        if self.trees:
            return tree_room(self.trees)
        entries = getattr(getattr(self.decoder, "budget", None), "entries", None) or []
        return tree_room([self.decoder.tree] + [e.tree for e in entries if e.tree is not None])

    def row_length(self, prompt_tokens: int) -> int:
        """Token slots a row of this many prompt tokens needs for its whole decode (target pool)."""
        return prompt_tokens + self.options.max_new_tokens + self._tree_room()[0]

    def can_admit(self, rows: int, prompt_tokens: int) -> bool:
        """Whether `rows` more rows of up to `prompt_tokens` tokens fit the planned pools now."""
        if self.max_rows is not None and self.active + rows > self.max_rows:
            return False
        return self.max_length is None or self.row_length(prompt_tokens) <= self.max_length

    def _ensure(self, rows: int, prompt_tokens: int) -> None:
        """Pools with at least `rows` slots (in all) of room for prompts of `prompt_tokens`."""
        t_room, d_room = self._tree_room()
        ahead = min(self.options.max_new_tokens, RESERVE_TOKENS)
        if self.max_length is not None:
            t_len = self.max_length
        else:
            t_len = prompt_tokens + ahead + t_room
        d_len = t_len - t_room + d_room
        if self.max_rows is not None:
            rows = self.max_rows
        elif self._tpool is not None and rows > len(self._slots):
            rows = max(rows, 2 * len(self._slots))
        spare = spare_rows(self.decoder.graphs)
        rows += spare                                        # pool rows no slot uses
        if self._tpool is None:
            kept_t, kept_d = self.kept or (None, None)
            self._tpool = KVPool(KVShape.of(self.decoder.target), rows, t_len, self.device,
                                 *sliding_window(self.decoder.target), kept=kept_t)
            if self.drafting:
                self._dpool = KVPool(KVShape.of(self.decoder.draft), rows, d_len, self.device,
                                     *sliding_window(self.decoder.draft), kept=kept_d)
            self._state = SlotState(rows, PENDING_CAP + 2 * t_room, self.options.max_new_tokens
                                     if self.options.sampling else None, self.device)
        else:
            self._tpool.resize(rows, t_len)
            if self._dpool is not None:
                self._dpool.resize(rows, d_len)
            self._state.grow(rows)
        self._slots += [None] * (self._tpool.rows - spare - len(self._slots))
        self._pending_host += [0] * (len(self._slots) - len(self._pending_host))

    def _room(self, pool: KVPool, rows: int, block: int) -> int:
        """The block's head for rows [0, rows), growing the pool if a longer row than planned needs it."""
        head = pool.head(rows)
        if head + block > pool.length:
            if self.max_length is not None:
                raise CapacityError(f"a row needs {head + block} KV slots but the plan gives {pool.length}")
            pool.resize(pool.rows, head + block + max(64, pool.length // 8))
        return head

    # -- joining --------------------------------------------------------------------------------
    @torch.no_grad()
    def add(self, input_ids: Tensor, attention_mask: Tensor, pixel_values: Tensor | None,
            keys: Sequence | None = None, seeds: Sequence[int] | None = None,
            image_sizes: Tensor | None = None) -> list[FinishedRow]:
        """Prefill rows and add them to the running batch, each in a free slot.

        input_ids/attention_mask: [B, T] left-padded with image tokens expanded; pixel_values:
        [num_images, C, H, W] (llava-1.5) or [num_images, tiles, C, H, W] with image_sizes
        [num_images, 2] (NeXT, OneVision), as the target's processor makes them, or None. A
        text-only draft prefills each row's prompt without its image tokens. keys: the caller's handle per row (default 0..B-1 after
        the rows added so far). seeds: per-row sampling seeds (see `row_seed`); needed when
        sampling. Returns the rows already finished by their first token (EOS or
        max_new_tokens=1); the others are active from the next `step()` on.
        """
        opts, dec = self.options, self.decoder
        image_tokens = validate_inputs(dec.target, input_ids, attention_mask, pixel_values, image_sizes)   # [B]
        B = input_ids.shape[0]
        keys = list(range(B)) if keys is None else list(keys)
        if len(keys) != B:
            raise InputError(f"{len(keys)} keys for {B} rows")
        if opts.sampling and (seeds is None or len(seeds) != B):
            raise InputError("sampling needs one seed per row (decoding.engine.row_seed(seed, id))")
        lengths = attention_mask.sum(-1).tolist()
        if not self.can_admit(B, max(lengths)):
            raise CapacityError(f"{B} rows of up to {max(lengths)} prompt tokens do not fit: {self.active} of "
                                f"{self.max_rows} rows in use, {self.row_length(max(lengths))} KV slots a row needed, "
                                f"{self.max_length} planned (check engine.can_admit first)")
        input_ids = input_ids.to(self.device, torch.long)
        attention_mask = attention_mask.to(self.device, torch.long)
        if image_sizes is not None:
            image_sizes = image_sizes.to(self.device)
        if dec.text_draft:     # the draft's own prompt: the rows' text, at its own positions
            d_ids, d_mask = text_prompt(input_ids, attention_mask, dec.image_token_id)
        else:
            d_ids, d_mask = input_ids, attention_mask

        t0 = time.perf_counter()
        target_mm = draft_mm = None
        if pixel_values is not None and dec.shared_vision:
            hidden = vision_hidden_states(dec.target, pixel_values)
            target_mm = project_image_features(dec.target, hidden)
            draft_mm = project_image_features(dec.draft, hidden) if self.drafting else None
        elif pixel_values is not None:     # the family's own encoding (any-resolution: checked per row)
            target_mm = adapter(dec.target).encode_images(dec.target, pixel_values.to(self.device), image_sizes,
                                                          image_tokens.tolist())
        tgt, logits = prefill(dec.target, input_ids, attention_mask, pixel_values, target_mm,
                              image_sizes=image_sizes)
        drf = None
        if self.drafting:
            drf, _ = prefill(dec.draft, d_ids, d_mask, None if dec.text_draft else pixel_values, draft_mm,
                             image_sizes=image_sizes)
        uniforms = None
        if opts.sampling:
            uniforms = torch.stack([
                torch.rand(opts.max_new_tokens, generator=torch.Generator().manual_seed(int(s)))
                for s in seeds]).to(self.device)
            first = inverse_cdf(target_probs(logits, opts.temperature, opts.top_p, opts.top_k), uniforms[:, 0])
        else:
            first = logits.argmax(-1)                                                   # [B]
        first_list = first.tolist()
        elapsed = time.perf_counter() - t0

        done, keep = [], []
        for b in range(B):
            row = _Row(keys[b], [], RowStats(prefill_s=elapsed, target_forwards=1))
            if _extend(row.outputs, [first_list[b]], opts) is not None:
                done.append(_finished(row))
            else:
                keep.append((b, row))
        if not keep:
            return done
        self._ensure(self.active + len(keep), max(lengths))
        free = [s for s, row in enumerate(self._slots) if row is None][: len(keep)]
        slots = torch.tensor(free, dtype=torch.long, device=self.device)
        index = torch.tensor([b for b, _ in keep], dtype=torch.long, device=self.device)
        for pool, state, mask in ((self._tpool, tgt, attention_mask), (self._dpool, drf, d_mask)):
            if pool is None:     # a target-only engine
                continue
            n = mask.sum(-1)[index]
            pool.write_prompt(slots, [(layer.keys[index], layer.values[index]) for layer in state.cache.layers],
                              mask.shape[1] - n, n.tolist())
        st = self._state
        st.last[slots] = first[index]
        st.pending[slots] = 0
        st.pending[slots, 0] = first[index]
        st.pending_len[slots] = 1
        st.produced[slots] = 1
        st.active[slots] = 1
        if uniforms is not None:
            st.uniforms[slots] = uniforms[index]
        for s, (_, row) in zip(free, keep):
            self._slots[s] = row
            self._pending_host[s] = 1
        return done

    # -- one step -------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self) -> StepResult:
        """One speculative step for every active row; finished rows leave the batch.

        One host read per step (the accepted tokens, counts and node counts together); every
        length the step needs on the host is known from the previous reads."""
        occupied = [s for s, row in enumerate(self._slots) if row is not None]
        if not occupied:
            return StepResult(rows=0, accepted=[], nodes=0, draft_forwards=0, draft_s=0.0, verify_s=0.0)
        timer = PhaseTimer(self.device)
        if self.decoder.graphs is not None:
            B, tree, acc, host_t, n_draft, depth = self._static_phases(len(occupied), timer)
        else:
            B, tree, acc, host_t, n_draft, depth = self._eager_phases(occupied, timer)
        timer.mark()
        # The one host read of the step: lengths, node counts and tokens of every row.
        host = read_host(host_t)
        rows = self._slots
        gained = [(h[0] + 1) if rows[b] is not None else 0 for b, h in enumerate(host)]
        self._tpool.advance_host(B, gained)
        if depth >= 1:
            self._pending_host[:B] = gained
        else:
            self._pending_host[:B] = [p + g for p, g in zip(self._pending_host[:B], gained)]
        draft_s, verify_s = timer.seconds()
        if self.step_observer is not None:
            self.step_observer(tree, acc)
        return self._account(occupied, host, n_draft, draft_s, verify_s)

    def _eager_phases(self, occupied: list[int], timer: "PhaseTimer"):
        """Draft and verify op by op over slots [0, highest occupied + 1), at this step's exact shapes."""
        opts, dec, st, rows = self.options, self.decoder, self._state, self._slots
        B = occupied[-1] + 1                       # the step runs over slots [0, B); free ones are masked
        remaining = opts.max_new_tokens - min(len(rows[s].outputs) for s in occupied)
        shape = self.tree_for(len(occupied)) if self.drafting else None
        depth = min(shape.max_depth, remaining - 1) if shape is not None else 0
        P = max(self._pending_host[:B])
        n_draft = 0
        if depth >= 1:
            self._room(self._dpool, B, P + depth * shape.frontier)
            tree, n_draft = dec.drafter.propose(self._dpool, B, st.pending[:B, :P], st.pending_len[:B],
                                                self._pending_host[:B], depth, opts.temperature, shape)
        else:  # no drafting this step (the budget says it cannot pay, or one token is left): target alone
            tree = empty_tree(B, self.device)
            n_draft = self._feed_backlog(B, P)
        timer.mark()
        Q = 1 + tree.tokens.shape[1]
        head = self._room(self._tpool, B, Q)
        tokens = torch.cat([st.last[:B, None], tree.tokens], dim=1)
        positions = verify_positions(tree, self._tpool.lengths[:B])
        mask = self._tpool.block_mask(B, head, verify_visibility(tree), model_dtype(dec.target), positions, positions)
        logits = models.model_forward(dec.target, self._tpool.begin(B, head), tokens, positions, mask,
                                      dec.lean_target)
        if opts.sampling:
            acc = sample_accept(tree, logits, st.uniforms[:B], st.produced[:B], max(depth, 0),
                                opts.temperature, opts.top_p, opts.top_k)
        else:
            acc = greedy_accept(tree, logits, max(depth, 0))
        count = (acc.length + 1) * st.active[:B]                                 # [B] tokens each row gains
        src = acc.slots if acc.slots is not None else zero_column(B, self.device)   # root, then the path
        self._tpool.commit(B, head, src, count)
        if depth >= 1:               # the draft saw every pending token: the step's tokens are the new backlog
            st.pending[:B, : acc.tokens.shape[1]] = acc.tokens
            st.pending_len[:B] = count
        else:                        # nothing fed (or the backlog just fed): append to what the draft has not seen
            index = st.pending_len[:B, None] + arange(acc.tokens.shape[1], self.device)
            st.pending[:B].scatter_(1, index, acc.tokens)
            st.pending_len[:B] += count
        st.last[:B] = acc.bonus
        st.produced[:B] += acc.length + 1
        host_t = torch.cat([acc.length.unsqueeze(1), tree.num_nodes.unsqueeze(1), acc.tokens], 1)
        return B, tree, acc, host_t, n_draft, depth

    def _feed_backlog(self, B: int, P: int) -> int:
        """A step without drafting: feed the draft its backlog once it reaches PENDING_CAP (keeps it
        short; a target-only engine just drops it). Returns the draft forwards made (0 or 1)."""
        if P < PENDING_CAP:
            return 0
        st = self._state
        if self._dpool is not None:
            self._room(self._dpool, B, P)
            self.decoder.drafter.feed_pending(self._dpool, B, st.pending[:B, :P], st.pending_len[:B],
                                              self._pending_host[:B])
        st.pending_len[:B] = 0
        self._pending_host[:B] = [0] * B
        return int(self._dpool is not None)

    def _static_phases(self, active: int, timer: "PhaseTimer"):
        """Draft and verify as the static-shape phases of graphs.py (compiled or eager) at this
        step's bucket: rows rounded up to a batch bucket, the tree at its full depth, the windows
        read rounded up to a length bucket (the occupied slots are a prefix, see `_condense`)."""
        dec, st = self.decoder, self._state
        B = batch_bucket(active, len(self._slots))
        shape = self.tree_for(active) if self.drafting else None
        depth = shape.max_depth if shape is not None else 0
        P_host = max(self._pending_host[:B])
        n_draft = 0
        if depth >= 1:
            P = pending_bucket(P_host)
            if P > st.pending.shape[1] or self._dpool.head(B) + P > self._dpool.length:
                P = P_host
            d_head = self._room(self._dpool, B, P)            # the feed's commit stores P slots per row
            key, fn = dec.drafter.phase(shape, depth, self.options.temperature)
            tree_t = dec.graphs.run(key, fn, self._dpool.kv, length_bucket(d_head, self._dpool.length),
                                    self._dpool.lengths[:B], st.pending[:B, :P], st.pending_len[:B],
                                    causal(P, self.device))
            self._dpool.advance_host(B, self._pending_host[:B])
            tree = DraftTree(*tree_t)
            n_draft = depth
        else:
            tree = empty_tree(B, self.device)
            n_draft = self._feed_backlog(B, P_host)
        timer.mark()
        head = self._room(self._tpool, B, depth + 1)          # the commit stores depth + 1 slots per row
        opts = self.options
        spec = VerifySpec(depth=depth, drafted=depth >= 1, temperature=opts.temperature, top_p=opts.top_p,
                          top_k=opts.top_k, dtype=model_dtype(dec.target))
        uniforms = st.uniforms[:B] if st.uniforms is not None else None
        host_t, length, nodes = dec.graphs.run(
            ("verify", spec), partial(verify_phase, dec.target, spec), self._tpool.kv,
            length_bucket(head, self._tpool.length), self._tpool.lengths[:B], tree_tensors(tree), st.last[:B],
            st.pending[:B], st.pending_len[:B], st.produced[:B], st.active[:B], uniforms)
        acc = Acceptance(length=length[:active], nodes=nodes[:active], tokens=host_t[:active, 2:],
                         bonus=st.last[:active])
        return B, rows_of(tree, active), acc, host_t, n_draft, depth

    def _account(self, occupied: list[int], host: list, n_draft: int, draft_s: float,
                 verify_s: float) -> StepResult:
        """The host's side of a step from its one read: rows' outputs and stats, finished rows out."""
        opts, rows = self.options, self._slots
        accepted, finished, running = [], [], []
        for b in occupied:
            n_acc, n_nodes, *step_tokens = host[b]
            row = rows[b]
            kept = _extend(row.outputs, step_tokens[: n_acc + 1], opts)
            rs = row.stats
            rs.accepted_lengths.append(n_acc + 1 if kept is None else kept)
            rs.target_forwards += 1
            rs.draft_forwards += n_draft
            rs.tree_nodes.append(n_nodes)
            rs.draft_s += draft_s
            rs.verify_s += verify_s
            accepted.append(rs.accepted_lengths[-1])
            if kept is not None:
                finished.append(b)
            else:
                running.append(rs.accepted_lengths[-1])
        result = StepResult(rows=len(occupied), accepted=accepted, nodes=sum(host[b][1] for b in occupied),
                            draft_forwards=n_draft, draft_s=draft_s, verify_s=verify_s, running_accepted=running)
        if finished:
            result.finished = [_finished(rows[b]) for b in finished]
            self._release(finished)
            self._condense()
        return result

    def _condense(self) -> None:
        """Keep the occupied slots a prefix: move the highest rows into slots freed below them.

        A step runs over slots [0, highest occupied + 1), so without this a batch whose rows finish
        out of order would keep computing finished rows' slots until its last row is done. Only the
        moved rows' tokens are copied (as vLLM's persistent batch condenses), never the pool."""
        free = [s for s, row in enumerate(self._slots) if row is None]
        used = [s for s, row in enumerate(self._slots) if row is not None]
        src, dst = [], []
        while free and used and free[0] < used[-1]:
            dst.append(free.pop(0))
            src.append(used.pop())
        if not src:
            return
        for pool in (self._tpool, self._dpool):
            if pool is not None:
                pool.move(src, dst)
        si = torch.tensor(src, dtype=torch.long, device=self.device)
        di = torch.tensor(dst, dtype=torch.long, device=self.device)
        st = self._state
        for name in ("last", "pending", "pending_len", "produced", "active", "uniforms"):
            t = getattr(st, name)
            if t is not None:
                t[di] = t[si]
        st.active[si] = 0
        st.pending_len[si] = 0
        for s, d in zip(src, dst):
            self._slots[d], self._slots[s] = self._slots[s], None
            self._pending_host[d], self._pending_host[s] = self._pending_host[s], 0

    def _release(self, slots: list[int]) -> None:
        """Free finished rows' slots: nothing is copied, the slots just stop counting."""
        index = torch.tensor(slots, dtype=torch.long, device=self.device)
        self._state.active[index] = 0
        self._state.pending_len[index] = 0
        for pool in (self._tpool, self._dpool):
            if pool is not None:
                pool.release(slots)
        for s in slots:
            self._slots[s] = None
            self._pending_host[s] = 0


def _finished(row: _Row) -> FinishedRow:
    row.stats.new_tokens = len(row.outputs)
    return FinishedRow(key=row.key, tokens=row.outputs, stats=row.stats)


def _extend(out: list[int], tokens: list[int], opts: SamplingOptions) -> int | None:
    """Append tokens, stopping after the first EOS or at max_new_tokens.

    Returns None when the row goes on, else how many of `tokens` were kept (row finished).
    """
    for n, token in enumerate(tokens, start=1):
        out.append(token)
        if token in opts.eos or len(out) >= opts.max_new_tokens:
            return n
    return None
