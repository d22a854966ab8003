"""The static-shape step phases (decoding/graphs.py): buckets, refusals, and the compiled graphs.

The phases' exactness uncompiled ("static") is proven by the lossless suites, which run every
case in both engines (test_greedy_lossless, test_engine, test_sampling_lossless). Here both
phases are compiled with fullgraph=True (a graph break fails the test) on a tiny pair, and the
compiled step must give the eager step's tokens exactly: greedy (= the target's own generate)
and sampled (same seeds, same tokens), with every step's work inside the two graphs.
"""
from __future__ import annotations

import pytest
import torch

from decoding import ModelPairError, SpeculativeDecoder, TreeConfig
from decoding.graphs import batch_bucket, graph_blocker, length_bucket, pending_bucket, step_graphs
from decoding.profiling import StepProfiler
from decoding.testing import make_tiny_llava
from tests.helpers import perturbed_copy, random_batch, target_greedy


def test_buckets():
    assert [batch_bucket(n, 128) for n in (1, 2, 3, 5, 9, 100, 128)] == [1, 2, 4, 8, 16, 128, 128]
    assert batch_bucket(5, 6) == 6 and batch_bucket(3, 3) == 3          # never more rows than the pool has
    assert batch_bucket(129, 1000) == 256
    assert [length_bucket(n, 1000) for n in (0, 1, 64, 65, 130)] == [64, 64, 64, 128, 192]
    assert length_bucket(450, 400) == 400
    assert [pending_bucket(n) for n in (0, 1, 2, 3, 5, 8, 9)] == [1, 1, 2, 4, 8, 8, 16]


def test_compile_setting_and_refusals():
    target = make_tiny_llava(seed=0)
    assert step_graphs("off", target, target) is None
    assert step_graphs("auto", target, target) is None          # a CPU: the eager engine (docs/benchmarks.md)
    assert step_graphs("static", target, target).mode is None
    assert step_graphs("on", target, target).mode == "default"
    with pytest.raises(ValueError, match="compile must be one of"):
        step_graphs("fast", target, target)
    windowed = make_tiny_llava(seed=0, text="mistral", sliding_window=6)
    assert "sliding-window" in graph_blocker(windowed)
    with pytest.raises(ModelPairError, match="sliding-window"):
        SpeculativeDecoder(windowed, windowed, compile="on")
    assert step_graphs("auto", windowed, windowed) is None


@pytest.fixture(scope="module")
def pair():
    target = make_tiny_llava(seed=11, vocab_size=64, image_token_id=63, hidden_size=32, initializer_range=0.3)
    draft = perturbed_copy(target, 0.3, seed=2)
    ids, mask, pixels = random_batch(target, 3, [2, 11, 6], seed=5)
    return target, draft, ids, mask, pixels


TREE = TreeConfig(top_k=2, frontier=2, max_depth=3, max_nodes=6)


@pytest.fixture(scope="module")
def compiled(pair):
    """One compiled decoder for the module's tests (its graphs compile once: tens of seconds here)."""
    target, draft, *_ = pair
    return SpeculativeDecoder(target, draft, TREE, compile="on")


def test_compiled_phases_equal_eager(pair, compiled):
    """fullgraph=True on CPU for both phases; compiled greedy = eager greedy = target generate, and
    sampled rows equal the eager engine's with the same seeds. Rows finish at different steps, so
    the batch shrinks and other buckets are compiled too."""
    target, draft, ids, mask, pixels = pair
    eager = SpeculativeDecoder(target, draft, TREE)
    max_new = 12
    expected = target_greedy(target, ids, mask, pixels, max_new, None)
    got = compiled.generate(ids, mask, pixels, max_new_tokens=max_new, eos_token_id=[])
    assert got.sequences == expected == eager.generate(ids, mask, pixels, max_new_tokens=max_new,
                                                       eos_token_id=[]).sequences
    assert any(a > 1 for st in got.stats for a in st.accepted_lengths)              # drafts were accepted
    assert {key[0] for key, *_ in compiled.graphs.compile_s} == {"draft", "verify"}
    seeds = [101, 202, 303]
    opts = dict(max_new_tokens=max_new, temperature=0.8, top_p=0.9, top_k=0, eos_token_id=[], seeds=seeds)
    assert compiled.generate(ids, mask, pixels, **opts).sequences == eager.generate(ids, mask, pixels, **opts).sequences


def test_compiled_step_runs_inside_two_graphs(pair, compiled):
    """Per step: two graph launches (draft, verify), one host read, and next to no ops outside them
    (counted by the TorchDispatchMode profiler: the same on every machine)."""
    target, draft, ids, mask, pixels = pair
    decoder = compiled
    engine = decoder.engine(max_new_tokens=40, eos_token_id=[])
    engine.add(ids, mask, pixels)
    engine.step()                                   # compiles (or reuses the graphs compiled above)
    with StepProfiler(decoder) as prof:
        engine.step()
    report = prof.report()
    assert report["other"]["graphs"] == 2
    assert report["syncs_per_step"] == 1
    assert report["other"]["ops"] <= 8, report["other"]["top_ops"]
    assert report["draft_forward"]["ops"] == report["verify_forward"]["ops"] == 0
    eager = SpeculativeDecoder(target, draft, TREE, compile="off").engine(max_new_tokens=40, eos_token_id=[])
    eager.add(ids, mask, pixels)
    eager.step()
    with StepProfiler(decoder) as prof:
        eager.step()
    assert prof.report()["other"]["ops"] > 50        # the same step op by op


def test_static_rows_beyond_the_active_ones_are_inert():
    """A step at a bucket computes free slots too (3 rows at bucket 4); they must not change the
    active rows' tokens, the pools' lengths or the host's."""
    target = make_tiny_llava(seed=3)
    draft = perturbed_copy(target, 0.3, seed=4)
    ids, mask, pixels = random_batch(target, 3, [4, 9, 1], seed=9)
    engine = SpeculativeDecoder(target, draft, TREE, compile="static").engine(max_new_tokens=9, eos_token_id=[],
                                                                               max_rows=8)
    engine.add(ids, mask, pixels)
    engine.step()
    for pool in (engine._tpool, engine._dpool):
        assert pool.lengths[3:].eq(0).all()
        assert pool.lengths.tolist() == pool.host_lengths
    done = {}
    while engine.active:
        done.update((r.key, r.tokens) for r in engine.step().finished)
    assert [done[b] for b in range(3)] == target_greedy(target, ids, mask, pixels, 9, None)
    assert torch.equal(engine._state.active, torch.zeros_like(engine._state.active))


def test_a_grown_pool_compiles_each_phase_once_for_all_smaller_buckets(pair):
    """A phase recompiled when rows finished after the pool grew: traced with the bucket equal to
    the pool's rows, its graph guarded `pool rows == B` (the slice's contiguity check), so every
    smaller bucket compiled it again (21-27 s per phase on a CPU, mid-run). The compiled engine
    keeps a spare pool row (graphs.spare_rows): after the grown pool's first compiles, the
    batch shrinking compiles nothing."""
    from torch._dynamo.callback import callback_handler

    from decoding.graphs import spare_rows

    target, draft, ids, mask, pixels = pair
    decoder = SpeculativeDecoder(target, draft, TREE, compile="on")
    assert spare_rows(decoder.graphs) == 1
    engine = decoder.engine(max_new_tokens=40, eos_token_id=[])
    engine.add(ids[:1], mask[:1], pixels[:1])
    engine.step()                                   # batch 1, a pool of 1 + 1 rows
    engine.add(ids[1:], mask[1:], pixels[1:])       # the pool grows (3 slots + 1)
    for _ in range(3):
        engine.step()                               # recompiles with the rows symbolic
    assert engine._tpool.rows == len(engine._slots) + 1
    compiles = []
    callback = callback_handler.register_start_callback(lambda *args: compiles.append(args))
    try:
        engine._release([0])                        # one row done: the bucket shrinks to 2
        engine._condense()
        for _ in range(2):
            engine.step()
    finally:
        callback_handler.start_callbacks.remove(callback)
    assert not compiles, "a smaller bucket recompiled a phase"
