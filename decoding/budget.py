"""Hardware-aware tree budget (Sequoia-style), per active batch size.

What a tree is worth depends on how many rows decode together: at batch 1 a verify of 25 tokens
costs about what one token costs, at batch 128 on a CPU it costs ~25 times as much. So the budget
is a table over active batch sizes, looked up at every step as rows finish or join
(`SpeculativeEngine.tree_for`); an entry is a tree shape, or None: no drafting, a plain target step.

1. Acceptance: one calibration decode with a large tree, stopping at EOS as captions do, records,
   for every step, each candidate's rank in the pruning order and depth, and the accepted path.
   With budget n and depth bound d, pruning sees only candidates of depth <= d (the draft grows depth by depth, so
   those are the same candidates) and keeps the n best of them, ancestors first; a path node is
   kept iff its rank among the candidates of depth <= d is < n. tau(n, d) = 1 + the accepted
   path's kept prefix, averaged over steps: for each calibration step, exactly what a tree
   (n, d) would have accepted there (greedy tokens do not depend on the tree; a real run with
   (n, d) would meet other step boundaries, so tau is an estimate over those contexts).
2. Cost, per batch size B: the wall time of whole engine steps at B rows (drafting, verify,
   acceptance, cache roll-forward and every fixed cost of a step) for each candidate shape and
   for a plain target step, measured on this device.
3. Choice, per B: argmax over candidates of tau(n, d) / step_s(B, n, d), against
   1 / step_s(B, none) for not drafting. Step times are medians of repeated steps, the shapes
   interleaved round by round; each one's spread is its noise (`spread` in the entry). "No
   drafting" wins over the best tree only when it is faster beyond the noise of both (`choose`):
   one noisy sample on a shared machine must not switch speculation off for an actor's whole
   life (and `DriftMonitor` re-checks the choice against the steps that follow).
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field, replace

import torch

from .decoder import SpeculativeDecoder
from .families import adapter
from .models import forward_block, model_device, prefill, vocab_size
from .options import eos_set
from .tree import TreeConfig

DEFAULT_SIZES = (1, 2, 4, 8, 16, 32, 64)


DEFAULT_BATCH_SIZES = (1, 8, 32, 128)
# Candidate (max_nodes, max_depth) shapes, from a one-node chain to a bushy tree.
DEFAULT_SHAPES = ((1, 1), (2, 2), (4, 3), (8, 4), (16, 5), (24, 6), (48, 8))


@dataclass
class BudgetEntry:
    batch_size: int
    tree: TreeConfig | None                                   # None: no drafting at this batch size
    step_s: dict = field(default_factory=dict)               # "n,d" or "none" -> median step seconds
    predicted_tps: dict = field(default_factory=dict)        # "n,d" or "none" -> tokens/s per row
    noise: float = 0.0                                       # the largest relative spread of those step times
    spread: dict = field(default_factory=dict)               # "n,d" or "none" -> relative spread of its step times


def shape_label(tree: TreeConfig | None) -> str:
    """The key of a shape in `BudgetEntry.step_s` and friends: "n,d", or "none" (no drafting)."""
    return "none" if tree is None else f"{tree.max_nodes},{tree.max_depth}"


@dataclass
class BudgetTable:
    """A tree shape (or None) per active batch size, looked up by the rows active at each step.

    At a calibrated batch size, its entry's choice. Between two calibrated sizes (the last rows of
    a batch finishing one by one, an actor's batch not yet full), the choice of one of the two
    neighbours: whichever predicts more tokens/s with each shape's step time interpolated linearly
    to the active rows (step time grows about linearly with rows on a device that is already
    busy). Taking the lower neighbour's choice, as this table once did, ran the tree chosen for
    one row (24 nodes, depth 6: 105 ms a step on the real-weights pair) on the 2-7 rows left at
    the end of a batch of 8, where it costs ~3x the 4-node tree chosen for 8 rows. Below the
    smallest calibrated size, its choice; above the largest, the largest's. Only the neighbours'
    own choices are candidates, so every shape a step runs is one the KV room was sized for."""

    entries: list[BudgetEntry]
    tau: dict[tuple[int, int], float] = field(default_factory=dict)
    _between: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def lookup(self, active: int) -> TreeConfig | None:
        entries = sorted(self.entries, key=lambda e: e.batch_size)
        below = [e for e in entries if e.batch_size <= active]
        above = [e for e in entries if e.batch_size > active]
        if not below or not above or below[-1].batch_size == active or below[-1].tree == above[0].tree:
            return (below or entries)[-1 if below else 0].tree
        if active not in self._between:
            self._between[active] = self._interpolated(below[-1], above[0], active)
        return self._between[active]

    def _interpolated(self, lo: BudgetEntry, hi: BudgetEntry, active: int) -> TreeConfig | None:
        """lo's or hi's choice at `active` rows (lo.batch_size < active < hi.batch_size), by `choose`
        over step times interpolated between theirs; lo's when a figure is missing (a table made
        by hand)."""
        w = (active - lo.batch_size) / (hi.batch_size - lo.batch_size)
        predicted, spread, trees = {}, {}, {}
        for tree in (lo.tree, hi.tree):
            key = shape_label(tree)
            shape = None if tree is None else (tree.max_nodes, tree.max_depth)
            tau = 1.0 if tree is None else self.tau.get(shape)
            if key not in lo.step_s or key not in hi.step_s or tau is None:
                return lo.tree
            predicted[shape] = tau / (lo.step_s[key] + w * (hi.step_s[key] - lo.step_s[key]))
            spread[shape] = max(lo.spread.get(key, 0.0), hi.spread.get(key, 0.0))
            trees[shape] = tree
        return trees[choose(predicted, spread)]

    @property
    def drafts(self) -> bool:
        """Whether some batch size drafts (False: a table of plain target steps only)."""
        return any(entry.tree is not None for entry in self.entries)

    def to_dict(self) -> dict:
        return {
            "tau": {f"{n},{d}": round(t, 3) for (n, d), t in sorted(self.tau.items())},
            "by_batch_size": [{
                "batch_size": e.batch_size,
                "chosen": None if e.tree is None else {"max_nodes": e.tree.max_nodes, "max_depth": e.tree.max_depth},
                "step_ms": {k: round(v * 1e3, 2) for k, v in e.step_s.items()},
                "predicted_tokens_per_s_per_row": {k: round(v, 2) for k, v in e.predicted_tps.items()},
                "noise": round(e.noise, 4),
                "spread": {k: round(v, 4) for k, v in e.spread.items()},
            } for e in self.entries],
        }


@torch.no_grad()
def forward_latency(model, sizes=DEFAULT_SIZES, prefix_len: int = 64, batch: int = 1, repeats: int = 5,
                    lean: bool = False) -> dict[int, float]:
    """Median latency of one forward of n+1 tree tokens (a chain mask) over a cached prefix.

    lean=True times the lean draft forward (decoding/lean.py), as the drafter runs it."""
    device = model_device(model)
    vocab = adapter(model).image_token_id(model.config) or vocab_size(model)   # text ids lie below the image token
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, max(4, vocab), (batch, prefix_len), generator=g).to(device)
    state, _ = prefill(model, ids, torch.ones_like(ids), None)
    result = {}
    for n in sizes:
        q = n + 1
        tokens = torch.randint(3, max(4, vocab), (batch, q), generator=g).to(device)
        positions = state.lengths.unsqueeze(1) + torch.arange(q, device=device)
        vis = torch.tril(torch.ones(q, q, dtype=torch.bool, device=device)).expand(batch, q, q)
        valid = torch.ones(batch, q, dtype=torch.bool, device=device)
        times = []
        for _ in range(repeats + 1):
            _sync(device)
            t0 = time.perf_counter()
            forward_block(model, state, tokens, positions, vis, valid, lean=lean)
            _sync(device)
            times.append(time.perf_counter() - t0)
            state.crop()
        result[n] = statistics.median(times[1:])
    return result


MIN_TAU_STEPS = 8   # row-steps below which the calibration decodes past EOS too (rows that end at once)
# The acceptance calibration decodes as many tokens as the run's rows do, up to this many. Acceptance
# changes along a row: on the real-weights pair (docs/benchmarks.md) tau(8, 4) is 4.38 over a row's
# first 32 tokens and 3.73 over 128, and 3.43 was accepted in a 128-token bench, so a short
# calibration of a long run picks trees too big. Beyond this the decode costs more than it tells.
MAX_CALIBRATION_TOKENS = 128


def calibration_tokens(max_new_tokens: int) -> int:
    """How many tokens a row decodes in the acceptance calibration of a run of `max_new_tokens`."""
    return max(1, min(max_new_tokens, MAX_CALIBRATION_TOKENS))


def calibrate_tau(decoder: SpeculativeDecoder, input_ids, attention_mask, pixel_values, max_new_tokens: int,
                  max_nodes_grid, depth_grid, image_sizes=None, eos_token_id=None) -> dict[tuple[int, int], float]:
    """tau(n, d) for every grid point, from one greedy decode with the largest tree (module doc).

    The decode stops at `eos_token_id` (None: the target's generation config, as captions do):
    past the end of a caption the pair agrees far less often than within it, and counting those
    steps would make every tree look worse than it is. A row's last step counts only the tokens
    up to its EOS, as a caption keeps them (a big tree's last step often accepts past it). Only
    when the rows end before MIN_TAU_STEPS row-steps does it decode again without EOS, to have
    something to count."""
    base = decoder.tree
    big = replace(base, max_depth=max(depth_grid), max_nodes=10 ** 6, threshold=base.threshold)
    eos = eos_set(decoder.target if eos_token_id is None else None, eos_token_id)
    steps: list[tuple] = []

    def observe(tree, acc):
        if tree.rank is None:   # a step that drafted nothing (one token left): not a tree's acceptance
            return
        ranks, depths, valid = tree.rank.tolist(), tree.depths.tolist(), tree.valid.tolist()
        tokens = acc.tokens.tolist()
        for b, path in enumerate(acc.paths):
            cand = [i for i, ok in enumerate(valid[b]) if ok]
            ends = [j + 1 for j, t in enumerate(tokens[b][: len(path) + 1]) if t in eos]
            steps.append(([ranks[b][i] for i in path], [depths[b][i] for i in path],
                          [ranks[b][i] for i in cand], [depths[b][i] for i in cand], ends[0] if ends else None))

    decoder.set_tree(big)
    decoder.step_observer = observe
    budget, decoder.budget = decoder.budget, None
    try:
        decoder.generate(input_ids, attention_mask, pixel_values, max_new_tokens=max_new_tokens,
                         eos_token_id=eos_token_id, image_sizes=image_sizes)
        if len(steps) < MIN_TAU_STEPS:
            eos = frozenset()
            decoder.generate(input_ids, attention_mask, pixel_values, max_new_tokens=max_new_tokens, eos_token_id=[],
                             image_sizes=image_sizes)
    finally:
        decoder.step_observer = None
        decoder.set_tree(base)
        decoder.budget = budget
    return tau_from_steps(steps, max_nodes_grid, depth_grid)


def tau_from_steps(steps, max_nodes_grid, depth_grid) -> dict[tuple[int, int], float]:
    """tau(n, d) from recorded steps: (path ranks, path depths, every candidate's rank, its depth[,
    cap]); cap: the tokens the step can yield at most (its row's EOS within the step), or None.

    A path node survives budget (n, d) iff its depth <= d and fewer than n candidates of depth
    <= d rank before it; the accepted length is the surviving prefix of the path, plus the bonus
    (at most `cap`)."""
    tau = {}
    for n in max_nodes_grid:
        for d in depth_grid:
            kept = []
            for path_ranks, path_depths, ranks, depths, *cap in steps:
                shallow = sorted(r for r, dep in zip(ranks, depths) if dep <= d)
                k = 0
                for r, dep in zip(path_ranks, path_depths):
                    if dep > d or _count_below(shallow, r) >= n:
                        break
                    k += 1
                kept.append(min(k + 1, cap[0]) if cap and cap[0] else k + 1)
            tau[(n, d)] = statistics.mean(kept) if kept else 1.0
    return tau


def _count_below(sorted_values: list[int], value: int) -> int:
    import bisect
    return bisect.bisect_left(sorted_values, value)


def _replicate(input_ids, attention_mask, pixel_values, rows: int, image_sizes=None):
    """`rows` rows cycled from the calibration batch (one image per row)."""
    index = torch.arange(rows) % input_ids.shape[0]
    pixels = None if pixel_values is None else pixel_values[index.to(pixel_values.device)]
    sizes = None if image_sizes is None else image_sizes[index.to(image_sizes.device)]
    return input_ids[index], attention_mask[index], pixels, sizes


def step_seconds(decoder: SpeculativeDecoder, input_ids, attention_mask, pixel_values, batch_size: int,
                 shapes, steps: int = 2, image_sizes=None) -> dict:
    """Median wall time of whole engine steps at `batch_size` rows, per shape ((n, d) or None)."""
    samples = step_samples(decoder, input_ids, attention_mask, pixel_values, batch_size, shapes, steps, image_sizes)
    return {shape: statistics.median(t) for shape, t in samples.items()}


def relative_spread(times: list[float]) -> float:
    """Half the range of `times` over their median: the noise of a median of a few steps."""
    return (max(times) - min(times)) / 2 / statistics.median(times) if len(times) > 1 else 0.0


@torch.no_grad()
def step_samples(decoder: SpeculativeDecoder, input_ids, attention_mask, pixel_values, batch_size: int,
                 shapes, steps: int = 2, image_sizes=None) -> dict:
    """Wall times of `steps` whole engine steps at `batch_size` rows, per shape ((n, d) or None),
    the shapes interleaved step by step after one warm-up round."""
    ids, mask, pixels, sizes = _replicate(input_ids, attention_mask, pixel_values, batch_size, image_sizes)
    engine = decoder.engine(max_new_tokens=10 ** 6, eos_token_id=[])
    engine.add(ids, mask, pixels, image_sizes=sizes)
    device = model_device(decoder.target)
    trees = {shape: None if shape is None else replace(decoder.tree, max_nodes=shape[0], max_depth=shape[1])
             for shape in shapes}
    times: dict = {shape: [] for shape in shapes}
    # warm-up rounds: one; two with compiled step graphs (graphs.py), whose second bucket recompiles
    warm = 2 if getattr(decoder, "graphs", None) is not None and decoder.graphs.mode is not None else 1
    for round_ in range(steps + warm):   # shapes interleaved, so drift on a shared machine hits all alike
        for shape in shapes:
            engine.tree_for = lambda active, tree=trees[shape]: tree
            _sync(device)
            t0 = time.perf_counter()
            engine.step()
            _sync(device)
            if round_ >= warm:
                times[shape].append(time.perf_counter() - t0)
    return times


def choose(predicted: dict, noise):
    """The shape with the most predicted tokens/s, except that None (no drafting) must beat the
    best tree by more than the noise of both (else that tree is kept): predicted[None] >
    predicted[tree] * (1 + noise[None] + noise[tree]). noise: the relative spread of each shape's
    step time (a dict), or one figure for the pair (a float, split evenly).

    Trees compete on predicted tokens/s alone: holding a smaller tree to the same margin was
    measured to pick trees too big (the calibration's step times favour them; docs/benchmarks.md,
    "Tree budget on drift")."""
    spread = noise if isinstance(noise, dict) else dict.fromkeys(predicted, noise / 2)
    best = max(predicted, key=predicted.get)
    trees = [s for s in predicted if s is not None]
    if best is None and trees:
        tree = max(trees, key=predicted.get)
        if predicted[None] <= predicted[tree] * (1.0 + spread[None] + spread[tree]):
            return tree
    return best


def choose_table(decoder: SpeculativeDecoder, input_ids, attention_mask, pixel_values,
                 batch_sizes=DEFAULT_BATCH_SIZES, max_new_tokens: int = 32, shapes=DEFAULT_SHAPES,
                 steps: int = 3, image_sizes=None, eos_token_id=None) -> BudgetTable:
    """Calibrate acceptance once and step costs per batch size on this device; return the table
    (not applied: set `decoder.budget = table`). image_sizes: for any-resolution targets;
    eos_token_id: where captions end (None: the target's generation config; see calibrate_tau)."""
    shapes = tuple(shapes)
    tau = calibrate_tau(decoder, input_ids, attention_mask, pixel_values, max_new_tokens,
                        sorted({n for n, _ in shapes}), sorted({d for _, d in shapes}), image_sizes, eos_token_id)
    entries = []
    for B in sorted(set(batch_sizes)):
        samples = step_samples(decoder, input_ids, attention_mask, pixel_values, B, shapes + (None,), steps,
                               image_sizes)
        cost = {shape: statistics.median(t) for shape, t in samples.items()}
        predicted = {shape: (tau[shape] if shape else 1.0) / cost[shape] for shape in cost}
        spread = {shape: relative_spread(t) for shape, t in samples.items()}
        noise = max(spread.values())
        best = choose(predicted, spread)
        tree = None if best is None else replace(decoder.tree, max_nodes=best[0], max_depth=best[1])
        label = lambda s: "none" if s is None else f"{s[0]},{s[1]}"  # noqa: E731   (shape_label of a tuple)
        entries.append(BudgetEntry(batch_size=B, tree=tree, step_s={label(k): v for k, v in cost.items()},
                                   predicted_tps={label(k): v for k, v in predicted.items()}, noise=noise,
                                   spread={label(k): v for k, v in spread.items()}))
    return BudgetTable(entries=entries, tau={k: v for k, v in tau.items() if k in shapes})


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class DriftMonitor:
    """Watches the steps an engine runs under a budget table and says when they drift from it.

    A table is measured once, on a few rows, at one moment: on a shared machine the moment may be
    unrepresentative (another actor compiling, a neighbour's burst), and a few rows' acceptance
    may not be the data's. So every step whose active rows equal a calibrated batch size is
    compared with that entry: the median wall time of the last `window` such steps against the
    calibrated time of the chosen shape, and (when it drafts) their mean accepted tokens per row
    against the calibrated tau. Outside `tolerance` either way (relative), `observe` returns the
    reason, and the caller re-measures the table (workers/caption.py drains its batch first). A
    table whose own step times varied by more than `noise_limit` (half-range over median) is
    measured again after its first window too: its choice rests on numbers it could not trust.
    Each re-measure doubles the window, and `max_remeasures` bounds how often an actor pays for
    one: a systematic difference (KV length, later tokens of long captions) cannot make it loop."""

    def __init__(self, table: BudgetTable, window: int = 64, tolerance: float = 0.3, max_remeasures: int = 3,
                 noise_limit: float = 0.5):
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self.window = window
        self.tolerance = tolerance
        self.noise_limit = noise_limit
        self.remeasures_left = max_remeasures
        self.reset(table)

    def reset(self, table: BudgetTable) -> None:
        """Watch a new table (after a re-measure): observations start again."""
        self.table = table
        self._entries = {e.batch_size: e for e in table.entries}
        self._times: dict[int, list[float]] = {b: [] for b in self._entries}
        self._accepted: dict[int, list[float]] = {b: [] for b in self._entries}

    def observe(self, rows: int, seconds: float, accepted: list[int]) -> str | None:
        """One engine step: its active rows, wall seconds, and the tokens each row that did not
        finish in it gained (rows cut at EOS or the token limit are left out). Returns why the
        table should be re-measured, once a window shows drift, else None."""
        entry = self._entries.get(rows)
        if entry is None or self.remeasures_left <= 0:
            return None
        self._times[rows].append(seconds)
        if accepted:
            self._accepted[rows].append(sum(accepted) / len(accepted))
        if len(self._times[rows]) < self.window:
            return None
        reason = self._drift(entry, self._times[rows], self._accepted[rows])
        self._times[rows], self._accepted[rows] = [], []
        if reason is not None:
            self.remeasures_left -= 1
            self.window *= 2
        return reason

    def _drift(self, entry: BudgetEntry, times: list[float], accepted: list[float]) -> str | None:
        shape = None if entry.tree is None else (entry.tree.max_nodes, entry.tree.max_depth)
        label = "none" if shape is None else f"{shape[0]},{shape[1]}"
        what = "no drafting" if shape is None else f"{shape[0]} nodes/depth {shape[1]}"
        calibrated = entry.step_s.get(label)
        observed = statistics.median(times)
        reasons = []
        if entry.noise > self.noise_limit:
            reasons.append(f"its calibration's step times varied by ±{entry.noise:.0%}")
        if calibrated and not (1 / (1 + self.tolerance) <= observed / calibrated <= 1 + self.tolerance):
            reasons.append(f"steps take {observed * 1e3:.1f} ms, calibrated {calibrated * 1e3:.1f} ms")
        tau = self.table.tau.get(shape) if shape is not None else None
        if tau and accepted:
            seen = statistics.mean(accepted)
            if abs(seen - tau) > self.tolerance * tau:
                reasons.append(f"{seen:.2f} tokens accepted per step, calibrated {tau:.2f}")
        if not reasons:
            return None
        return f"at batch {entry.batch_size} ({what}) " + " and ".join(reasons) + f" over {len(times)} steps"
