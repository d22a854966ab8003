"""ContinuousBatcher: batches of different caption lengths share one running batch, rows join as
others finish, each batch comes back complete and exact; a model error fails the batches in
flight and the next batch decodes normally."""
from __future__ import annotations

import asyncio

import pytest

from decoding import SpeculativeDecoder, TreeConfig
from tests.decoding.test_greedy_lossless import draft_model, target_model
from tests.helpers import random_batch, target_greedy
from workers.batcher import ContinuousBatcher, RowRequest


@pytest.fixture(scope="module")
def pair():
    target = target_model("llama", "default", 2)
    draft = draft_model("perturbed", "llama", "default", 2)
    ids, mask, pixels = random_batch(target, 10, [3, 19, 7, 1, 12, 5, 25, 9, 2, 14], seed=8)
    free = target_greedy(target, ids, mask, pixels, 24, None)
    eos = free[0][2]  # a token some rows emit early: lengths then differ widely
    expected = target_greedy(target, ids, mask, pixels, 24, eos)
    requests = []
    for b in range(10):
        n = int(mask[b].sum())
        requests.append(RowRequest(ids[b, -n:].numpy(), pixels[b:b + 1]))
    return target, draft, eos, requests, expected


def make_batcher(pair, max_rows, **kwargs):
    target, draft, eos, _, _ = pair
    engine = SpeculativeDecoder(target, draft, TreeConfig()).engine(max_new_tokens=24, eos_token_id=eos)
    return ContinuousBatcher(engine, max_rows=max_rows, record_history=True, **kwargs)


def test_batches_share_a_full_running_batch_and_stay_exact(pair):
    _, _, _, requests, expected = pair
    lengths = [len(e) for e in expected]
    assert min(lengths) <= 3 and max(lengths) >= 20          # the case really has mixed lengths
    batcher = make_batcher(pair, max_rows=4, admit_min_free=1)
    try:
        groups = [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]
        futures = [batcher.submit([requests[i] for i in g]) for g in groups]
        results = [f.result(timeout=300) for f in futures]
    finally:
        batcher.close()
    for g, res in zip(groups, results):
        assert [r.tokens for r in res] == [expected[i] for i in g]        # complete, in input order
        assert all(r.decode_s > 0 and r.stats.new_tokens == len(r.tokens) for r in res)
    st = batcher.stats
    assert st.max_active == 4 and st.admitted_rows == 10
    assert st.admissions > len(groups)               # rows joined the running batch mid-flight
    # while rows remained queued, the running batch stayed full (a freed slot is refilled next step)
    assert st.history[:5] == [4] * 5


def test_one_batch_at_a_time_only_shrinks(pair):
    _, _, _, requests, expected = pair
    batcher = make_batcher(pair, max_rows=4)
    try:
        res = batcher.submit(requests[:4]).result(timeout=300)
    finally:
        batcher.close()
    assert [r.tokens for r in res] == expected[:4]
    history = batcher.stats.history
    assert history == sorted(history, reverse=True) and history[0] == 4 and history[-1] < 4


def test_a_batch_returns_only_when_its_last_row_is_done(pair):
    _, _, _, requests, expected = pair
    short, long = min(range(10), key=lambda i: len(expected[i])), max(range(10), key=lambda i: len(expected[i]))
    batcher = make_batcher(pair, max_rows=2)
    try:
        res = batcher.submit([requests[short], requests[long]]).result(timeout=300)
    finally:
        batcher.close()
    assert [r.tokens for r in res] == [expected[short], expected[long]]
    assert res[0].decode_s < res[1].decode_s     # the short row finished first, yet came back with the long one


def test_model_error_fails_batches_in_flight_then_recovers(pair):
    _, _, _, requests, expected = pair
    batcher = make_batcher(pair, max_rows=3)
    original = type(batcher.engine).step
    calls = {"n": 0}

    def flaky(self):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("CUDA out of memory (simulated)")
        return original(self)

    try:
        type(batcher.engine).step = flaky
        first = batcher.submit(requests[:2])
        second = batcher.submit(requests[2:5])
        for f in (first, second):
            with pytest.raises(RuntimeError, match="out of memory"):
                f.result(timeout=300)
        type(batcher.engine).step = original
        again = batcher.submit(requests[:3]).result(timeout=300)
    finally:
        type(batcher.engine).step = original
        batcher.close()
    assert [r.tokens for r in again] == expected[:3]


def test_empty_batch_and_closed_batcher(pair):
    batcher = make_batcher(pair, max_rows=2)
    assert batcher.submit([]).result(timeout=5) == []
    batcher.close()
    with pytest.raises(RuntimeError, match="closed"):
        batcher.submit(pair[3][:1])


def test_async_callers_wait_together(pair):
    """The form Ray Data uses: several coroutines await their batch on one event loop."""
    _, _, _, requests, expected = pair
    batcher = make_batcher(pair, max_rows=3)

    async def one(group):
        return await asyncio.wrap_future(batcher.submit([requests[i] for i in group]))

    async def main():
        return await asyncio.gather(one([0, 1]), one([2, 3, 4]), one([5]))

    try:
        results = asyncio.run(asyncio.wait_for(main(), timeout=300))
    finally:
        batcher.close()
    assert [[r.tokens for r in res] for res in results] == [expected[0:2], expected[2:5], expected[5:6]]

