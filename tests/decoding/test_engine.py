"""The engine: rows join a running batch mid-flight and still get exactly their own output.

Greedy: every row equals the target's own generate(do_sample=False) for that row alone, fp32,
whatever rows it shared the batch with and whenever it joined. Sampling: a row's tokens depend
only on its seed: they equal plain autoregressive inverse-CDF sampling from the target with the
same per-position uniforms, computed here without the decoder.
"""
from __future__ import annotations

import copy
import random

import pytest
import torch

from decoding import SpeculativeDecoder, TreeConfig
from decoding.engine import default_top_k, row_seed
from decoding.testing import make_tiny_llava
from tests.decoding.test_greedy_lossless import draft_model, target_model
from tests.helpers import perturbed_copy, random_batch, target_greedy


def solo(ids, mask, pixels, b):
    n = int(mask[b].sum())
    return ids[b:b + 1, -n:], mask[b:b + 1, -n:], pixels[b:b + 1]


def run_waves(engine, waves, steps_between, on_join=None):
    """Add each wave after `steps_between[i]` steps; returns {key: FinishedRow}."""
    done = {}
    for wave, wait in zip(waves, steps_between):
        for _ in range(wait):
            if engine.active:
                done.update((r.key, r) for r in engine.step().finished)
        if on_join is not None:
            on_join(engine)
        ids, mask, pixels, keys, seeds = wave
        done.update((r.key, r) for r in engine.add(ids, mask, pixels, keys=keys, seeds=seeds))
    while engine.active:
        done.update((r.key, r) for r in engine.step().finished)
    return done


def wave_of(ids, mask, pixels, rows, seeds=None):
    """Rows `rows` of a random batch, re-padded as their own batch (as a caption actor would)."""
    parts = [solo(ids, mask, pixels, b) for b in rows]
    T = max(p[0].shape[1] for p in parts)
    w_ids = torch.zeros(len(rows), T, dtype=torch.long)
    w_mask = torch.zeros(len(rows), T, dtype=torch.long)
    for i, (r_ids, r_mask, _) in enumerate(parts):
        w_ids[i, T - r_ids.shape[1]:] = r_ids[0]
        w_mask[i, T - r_ids.shape[1]:] = 1
    return w_ids, w_mask, torch.cat([p[2] for p in parts]), list(rows), seeds


CASES = [pytest.param(seed, id=f"seed{seed}") for seed in range(8)]


@pytest.mark.parametrize("compile", ["off", "static"])
@pytest.mark.parametrize("seed", CASES)
def test_rows_joining_mid_flight_equal_their_solo_greedy_output(seed, compile):
    rng = random.Random(seed)
    text = ["llama", "qwen2", "mistral"][seed % 3]
    target = target_model(text, "default", seed % 4)
    draft = draft_model(["perturbed", "random"][seed % 2], text, "default", seed % 4)
    n = 9
    lengths = [rng.randint(1, 30) for _ in range(n)]
    ids, mask, pixels = random_batch(target, n, lengths, seed=seed)
    max_new = rng.randint(8, 30)
    # an EOS some rows hit early and others never (the target's own greedy output decides)
    free = target_greedy(target, ids, mask, pixels, max_new, None)
    eos = free[rng.randrange(n)][rng.randrange(3)]
    tree = TreeConfig(top_k=rng.randint(1, 4), frontier=rng.randint(1, 4), max_depth=rng.randint(1, 6),
                      max_nodes=rng.randint(1, 24), threshold=rng.choice([0.0, 0.05]))
    engine = SpeculativeDecoder(target, draft, tree, compile=compile).engine(max_new_tokens=max_new, eos_token_id=eos)
    order = list(range(n))
    rng.shuffle(order)
    cuts = sorted(rng.sample(range(1, n), 2))
    waves = [wave_of(ids, mask, pixels, order[a:b]) for a, b in zip([0] + cuts, cuts + [n])]
    done = run_waves(engine, waves, [0, rng.randint(1, 4), rng.randint(1, 4)])
    assert sorted(done) == list(range(n))
    for b in range(n):
        expected = target_greedy(target, *solo(ids, mask, pixels, b), max_new, eos)[0]
        assert done[b].tokens == expected, f"row {b} (wave order {order}, cuts {cuts})"
        st = done[b].stats
        assert st.new_tokens == len(expected) == 1 + sum(st.accepted_lengths)


def test_row_joins_while_others_are_at_different_depths():
    """Rows already running have produced different amounts and accepted different lengths when a
    new row joins; the newcomer and the runners all keep their exact output."""
    target = target_model("llama", "default", 1)
    draft = draft_model("perturbed", "llama", "default", 1)
    ids, mask, pixels = random_batch(target, 5, [2, 27, 9, 14, 4], seed=21)
    engine = SpeculativeDecoder(target, draft, TreeConfig()).engine(max_new_tokens=28, eos_token_id=[])
    seen = {}

    def record(e):
        if e.active:
            seen["produced"] = [len(row.outputs) for row in e.rows]
            seen["last_accepted"] = [row.stats.accepted_lengths[-1] for row in e.rows if row.stats.accepted_lengths]

    done = run_waves(engine, [wave_of(ids, mask, pixels, [0, 1, 2]), wave_of(ids, mask, pixels, [3]),
                              wave_of(ids, mask, pixels, [4])], [0, 3, 2], on_join=record)
    # the case really happens: at the last join the running rows stand at different lengths
    assert len(set(seen["produced"])) > 1 and len(set(seen["last_accepted"])) > 1
    for b in range(5):
        assert done[b].tokens == target_greedy(target, *solo(ids, mask, pixels, b), 28, None)[0]


def test_step_result_and_engine_lifecycle():
    target = target_model("llama", "default", 2)
    draft = draft_model("perturbed", "llama", "default", 2)
    ids, mask, pixels = random_batch(target, 3, [3, 8, 5], seed=2)
    engine = SpeculativeDecoder(target, draft).engine(max_new_tokens=12, eos_token_id=[])
    assert engine.active == 0 and engine.step().rows == 0
    assert engine.add(ids, mask, pixels, keys=["a", "b", "c"]) == []
    assert engine.active == 3 and engine.keys == ["a", "b", "c"]
    result = engine.step()
    assert result.rows == 3 and len(result.accepted) == 3 and all(1 <= a <= 7 for a in result.accepted)
    assert result.nodes > 0 and result.draft_forwards >= 1 and result.verify_s > 0 and result.draft_s > 0
    finished = []
    while engine.active:
        finished += engine.step().finished
    assert sorted(r.key for r in finished) == ["a", "b", "c"]
    assert all(len(r.tokens) == 12 for r in finished)


def test_first_token_can_finish_a_row_at_add():
    target = target_model("llama", "default", 3)
    draft = draft_model("perturbed", "llama", "default", 3)
    ids, mask, pixels = random_batch(target, 2, [3, 6], seed=4)
    first = target_greedy(target, ids, mask, pixels, 1, None)
    engine = SpeculativeDecoder(target, draft).engine(max_new_tokens=10, eos_token_id=first[0][0])
    done = engine.add(ids, mask, pixels, keys=["x", "y"])
    assert [r.key for r in done] == ["x"] and done[0].tokens == first[0]
    if first[1][0] != first[0][0]:
        assert engine.keys == ["y"]


# -- sampling: a row depends only on its seed ------------------------------------------------------

def warp(logits: torch.Tensor, temperature: float, top_p: float, top_k: int) -> torch.Tensor:
    """Independent temperature + top-k + nucleus (generate's order), float64."""
    logits = logits.double() / temperature
    if top_k:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        keep_sorted = (sorted_p.cumsum(-1) - sorted_p) < top_p
        keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
        probs = torch.where(keep, probs, torch.zeros_like(probs))
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def reference_sample(target, ids, mask, pixels, seed, max_new, temperature, top_p, top_k, eos):
    """Plain autoregressive sampling: token j = inverse CDF of the warped target distribution at
    uniform u_j, u = torch.rand(max_new) from Generator(seed). No decoder code involved."""
    from transformers import DynamicCache
    u = torch.rand(max_new, generator=torch.Generator().manual_seed(seed))
    out = []
    with torch.no_grad():
        cache = DynamicCache()
        logits = target(input_ids=ids, attention_mask=mask, pixel_values=pixels, cache=cache,
                        use_cache=True).logits[0, -1]
        attn = mask.clone()
        for j in range(max_new):
            probs = warp(logits, temperature, top_p, top_k)
            cdf = probs.cumsum(-1)
            token = int((cdf <= u[j].double() * cdf[-1]).sum().clamp(max=probs.shape[-1] - 1))
            out.append(token)
            if token in eos:
                break
            attn = torch.cat([attn, torch.ones(1, 1, dtype=attn.dtype)], 1)
            logits = target(input_ids=torch.tensor([[token]]), attention_mask=attn, cache=cache,
                            use_cache=True).logits[0, -1]
    return out


@pytest.mark.parametrize("compile", ["off", "static"])
@pytest.mark.parametrize("temperature,top_p,top_k", [(1.0, 1.0, 0), (0.8, 0.9, 0), (1.2, 1.0, 5), (0.7, 0.8, 20)])
def test_sampled_row_depends_only_on_its_seed(temperature, top_p, top_k, compile):
    V = 64
    target = make_tiny_llava(seed=5, vocab_size=V, image_token_id=V - 1, hidden_size=32, initializer_range=0.3)
    draft = perturbed_copy(target, 0.3, seed=1)
    n, max_new, eos = 6, 14, [2]
    ids, mask, pixels = random_batch(target, n, [1, 9, 4, 15, 3, 7], seed=3)
    seeds = [row_seed(1234, f"img-{b}") for b in range(n)]
    expected = [reference_sample(target, *solo(ids, mask, pixels, b), seeds[b], max_new, temperature, top_p,
                                 top_k, eos) for b in range(n)]
    assert len({tuple(e) for e in expected}) == n
    opts = dict(max_new_tokens=max_new, temperature=temperature, top_p=top_p, top_k=top_k, eos_token_id=eos)
    # one batch, default tree
    together = SpeculativeDecoder(target, draft, compile=compile).generate(ids, mask, pixels, seeds=seeds, **opts)
    assert together.sequences == expected
    assert any(len(st.accepted_lengths) < len(seq) - 1 for st, seq in zip(together.stats, expected))  # drafts accepted
    # another tree, rows joining in waves in another order
    engine = SpeculativeDecoder(target, draft, TreeConfig(top_k=2, frontier=2, max_depth=3, max_nodes=5),
                                compile=compile).engine(**opts)
    order = [4, 1, 5, 0, 3, 2]
    waves = [wave_of(ids, mask, pixels, order[:2], [seeds[b] for b in order[:2]]),
             wave_of(ids, mask, pixels, order[2:5], [seeds[b] for b in order[2:5]]),
             wave_of(ids, mask, pixels, order[5:], [seeds[b] for b in order[5:]])]
    done = run_waves(engine, waves, [0, 2, 1])
    assert [done[b].tokens for b in range(n)] == expected


def test_row_seed_is_stable_and_distinct():
    assert row_seed(7, "a") == row_seed(7, "a")
    assert len({row_seed(7, "a"), row_seed(8, "a"), row_seed(7, "b"), row_seed(7, 1)}) == 4
    assert 0 <= row_seed(0, "x") < 2 ** 63
    # golden value: a change here changes every seeded caption ever produced
    assert row_seed(0, "img-0") == 6046076771032746809


def test_default_top_k_is_what_generate_applies():
    target = make_tiny_llava(seed=0)
    target.generation_config.top_k = None
    assert default_top_k(target) == 50
    target.generation_config.top_k = 7
    assert default_top_k(target) == 7
    target.generation_config.top_k = 0
    assert default_top_k(target) == 0


@pytest.mark.parametrize("compile", ["off", "static"])
def test_budget_table_switching_shapes_and_skipping_drafts_stays_exact(compile):
    """The engine looks the tree up per active batch size; steps without drafting let the draft's
    backlog grow (fed once it reaches PENDING_CAP) and output stays the target's greedy output."""
    from decoding.budget import BudgetEntry, BudgetTable
    from decoding.engine import PENDING_CAP

    target = target_model("qwen2", "default", 2)
    draft = copy.deepcopy(target)   # a perfect draft: any error in the draft's state shows as lost acceptance
    ids, mask, pixels = random_batch(target, 8, [5, 17, 2, 9, 30, 4, 12, 7], seed=13)
    decoder = SpeculativeDecoder(target, draft, compile=compile)
    decoder.budget = BudgetTable(entries=[BudgetEntry(1, TreeConfig(threshold=0.0)), BudgetEntry(2, None),
                                          BudgetEntry(4, TreeConfig(max_nodes=1, max_depth=1)), BudgetEntry(6, None)])
    max_new = PENDING_CAP + 14
    engine = decoder.engine(max_new_tokens=max_new, eos_token_id=[])
    widths = []
    original = engine.step

    def watched():
        widths.append(max(engine._pending_host, default=0))
        return original()

    engine.step = watched
    done = run_waves(engine, [wave_of(ids, mask, pixels, [0, 1, 2, 3, 4, 5, 6]), wave_of(ids, mask, pixels, [7])],
                     [0, PENDING_CAP + 3])
    assert max(widths) >= PENDING_CAP        # the backlog really grew and was fed
    for b in range(8):
        assert done[b].tokens == target_greedy(target, *solo(ids, mask, pixels, b), max_new, None)[0], b
    # The late row had steps without drafting (one token each) while seven rows were active, then,
    # alone, tree steps that accept the full depth: its draft state survived the backlog.
    late = done[7].stats
    assert late.accepted_lengths[0] == 1 and late.tree_nodes[0] == 0
    full = [a for a, n in zip(late.accepted_lengths[:-1], late.tree_nodes[:-1]) if n > 1]
    assert full and all(a == TreeConfig().max_depth + 1 for a in full), late.accepted_lengths


@pytest.mark.parametrize("compile", ["off", "static"])
def test_a_budget_that_never_drafts_decodes_on_the_target_alone(compile):
    """A table of plain steps only (the bench's plain_engine): `generate` builds a target-only engine,
    no draft pool, no draft forward at all (its backlog past PENDING_CAP is dropped, not fed), and the
    output is the target's greedy output."""
    from decoding.budget import BudgetEntry, BudgetTable
    from decoding.engine import PENDING_CAP

    target, draft = target_model("llama", "default", 2), draft_model("perturbed", "llama", "default", 2)
    ids, mask, pixels = random_batch(target, 3, [6, 14, 3], seed=21)
    decoder = SpeculativeDecoder(target, draft, compile=compile)
    decoder.budget = BudgetTable(entries=[BudgetEntry(1, None)])
    assert not decoder.budget.drafts
    calls = []
    hook = draft.register_forward_hook(lambda *a: calls.append(1))
    try:
        max_new = PENDING_CAP + 9
        out = decoder.generate(ids, mask, pixels, max_new_tokens=max_new, eos_token_id=[])
    finally:
        hook.remove()
    assert calls == [] and all(s.draft_forwards == 0 for s in out.stats)
    assert out.sequences == target_greedy(target, ids, mask, pixels, max_new, None)
    engine = decoder.engine(max_new_tokens=4, drafting=False)
    engine.add(ids, mask, pixels)
    assert engine._dpool is None and engine.fresh().drafting is False


@pytest.mark.parametrize("compile", ["off", "static"])
def test_generate_reuses_its_pool_buffers_for_a_batch_of_the_same_size(compile):
    """The pools' buffers of one `generate` are kept for the next of the same size (zeroed: the static
    phases read masked slots past the rows' block, which must be finite), and dropped for another size."""
    target, draft = target_model("llama", "default", 2), draft_model("perturbed", "llama", "default", 2)
    decoder = SpeculativeDecoder(target, draft, TreeConfig(threshold=0.0), compile=compile)
    first = random_batch(target, 2, [9, 3], seed=1)
    second = random_batch(target, 2, [9, 3], seed=2)      # same size, other tokens and images; the short
                                                           # row reads (masked) slots it never wrote
    decoder.generate(*first, max_new_tokens=12)
    kept = decoder.kept[0]._buffer
    assert kept is not None
    kept.fill_(float("nan"))                               # garbage a reuse must not see
    out = decoder.generate(*second, max_new_tokens=12, eos_token_id=[])
    assert decoder.kept[0]._buffer is kept                 # the same buffer, used and kept again
    assert out.sequences == target_greedy(target, *second, 12, None)
    third = random_batch(target, 3, [4, 9, 2], seed=3)
    out = decoder.generate(*third, max_new_tokens=6, eos_token_id=[])
    assert decoder.kept[0]._buffer is not kept and decoder.kept[0]._buffer.shape[1] != kept.shape[1]
    assert out.sequences == target_greedy(target, *third, 6, None)


@pytest.mark.parametrize("compile", ["off", "static"])
@pytest.mark.parametrize("seed", [pytest.param(seed, id=f"seed{seed}") for seed in range(6)])
def test_generate_stream_equals_each_rows_target_greedy(seed, compile):
    """Continuous batching in process (`generate_stream`): rows of several left-padded batches go
    through fewer slots than rows, joining as others finish (at EOS or the token limit); every row
    equals the target's own greedy output, in input order."""
    from decoding.budget import BudgetEntry, BudgetTable

    rng = random.Random(100 + seed)
    text = ["llama", "qwen2", "mistral"][seed % 3]
    target = target_model(text, "default", seed % 4)
    draft = draft_model(["perturbed", "random"][seed % 2], text, "default", seed % 4)
    sizes = [rng.randint(1, 5) for _ in range(rng.randint(2, 3))]
    batches = [random_batch(target, n, [rng.randint(1, 20) for _ in range(n)], seed=seed * 10 + i)
               for i, n in enumerate(sizes)]
    max_new = rng.randint(6, 20)
    first = target_greedy(target, *batches[0], max_new, None)
    eos = first[0][rng.randrange(3)]
    decoder = SpeculativeDecoder(target, draft, TreeConfig(max_nodes=rng.randint(1, 12), max_depth=rng.randint(1, 5)),
                                 compile=compile)
    if seed % 2:   # a budget that changes the tree (or drafts nothing) as rows join and finish
        decoder.budget = BudgetTable(entries=[BudgetEntry(1, TreeConfig(max_nodes=8, max_depth=4)),
                                              BudgetEntry(2, None), BudgetEntry(3, TreeConfig(max_nodes=2, max_depth=2))])
    slots = rng.randint(1, 3)
    result = decoder.generate_stream(batches, slots, max_new_tokens=max_new, eos_token_id=eos)
    expected = [row for ids, mask, pixels in batches for row in target_greedy(target, ids, mask, pixels, max_new, eos)]
    assert result.sequences == expected, (sizes, slots)
    assert [st.new_tokens for st in result.stats] == [len(row) for row in expected]
    with pytest.raises(ValueError, match="slots"):
        decoder.generate_stream(batches, 0)
