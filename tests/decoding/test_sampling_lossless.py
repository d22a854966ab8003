"""Sampling is lossless: speculative samples follow the target's own distribution.

Test: a tiny-vocabulary pair (V = 8; the draft is a perturbed copy of the target, so drafts are
accepted often but not always). For each setting (temperature 1.0, 0.7, and 0.7 with top_p 0.9)
we draw 20,000 continuations of 3 new tokens with the decoder (the first token comes from the
prefill, tokens 2-3 from one verify step over a depth-2 tree with 2 branches per node) and
compare the joint distribution of (t1, t2, t3) with the exact target distribution, computed
from target logits with an independent temperature/top-p implementation. Pearson chi-square
over the 512 cells (cells with expected count < 5 merged); the test requires p > 0.001.
Negative controls show the test has power: samples from the draft's own distribution, and
target samples at the wrong temperature, are both rejected at p < 0.001.
"""
from __future__ import annotations

import math

import pytest
import torch

from decoding import SpeculativeDecoder, TreeConfig
from decoding.testing import make_tiny_llava
from tests.helpers import perturbed_copy, random_batch

V = 8
N_SAMPLES = 20_000
CHUNK = 2_500
ALPHA = 1e-3


@pytest.fixture(scope="module")
def pair():
    target = make_tiny_llava(seed=3, vocab_size=V, image_token_id=V - 1, hidden_size=32, initializer_range=0.5)
    draft = perturbed_copy(target, 0.5, seed=0)
    ids, mask, pixels = random_batch(target, 1, [3], seed=0)
    return target, draft, ids, mask, pixels


def warp(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """Independent temperature + nucleus filter: keep the most likely tokens until their mass reaches top_p."""
    probs = torch.softmax(logits.double() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        before = sorted_p.cumsum(-1) - sorted_p            # mass strictly before each token
        keep_sorted = before < top_p
        keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
        probs = torch.where(keep, probs, torch.zeros_like(probs))
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def exact_joint(model, ids, mask, pixels, temperature, top_p, **vision) -> torch.Tensor:
    """P(t1, t2, t3) of `model`'s own sampling, as a [V, V, V] tensor.

    Generated tokens may equal the image token id, so the continuations are fed through the
    prompt's cache rather than re-processed with the image. vision: e.g. image_sizes (NeXT).
    """
    from transformers import DynamicCache
    with torch.no_grad():
        cache = DynamicCache()
        first = model(input_ids=ids, attention_mask=mask, pixel_values=pixels, cache=cache, use_cache=True, **vision)
        cache.batch_repeat_interleave(V * V)
        t12 = torch.cartesian_prod(torch.arange(V), torch.arange(V))             # [V*V, 2]
        attn = torch.ones(V * V, ids.shape[1] + 2, dtype=torch.long)
        logits = model(input_ids=t12, attention_mask=attn, cache=cache, use_cache=True).logits  # [V*V, 2, V]
    p1 = warp(first.logits[0, -1], temperature, top_p)                            # [V]
    p = warp(logits, temperature, top_p)
    p2 = p[:, 0].reshape(V, V, V)[:, 0]                                           # [t1, t2]
    p3 = p[:, 1].reshape(V, V, V)                                                 # [t1, t2, t3]
    return p1[:, None, None] * p2[:, :, None] * p3


def chi_square_p(counts: torch.Tensor, probs: torch.Tensor) -> float:
    counts, expected = counts.flatten().double(), probs.flatten() * counts.sum()
    small = expected < 5
    obs = torch.cat([counts[~small], counts[small].sum().view(1)])
    exp = torch.cat([expected[~small], expected[small].sum().view(1)])
    obs, exp = obs[exp > 0], exp[exp > 0]
    stat = float(((obs - exp) ** 2 / exp).sum())
    k = len(obs) - 1
    # Wilson-Hilferty approximation of the chi-square survival function.
    z = ((stat / k) ** (1 / 3) - (1 - 2 / (9 * k))) / math.sqrt(2 / (9 * k))
    return 0.5 * math.erfc(z / math.sqrt(2))


def speculative_counts(pair, temperature, top_p, seed=0, compile="off", image_sizes=None):
    target, draft, ids, mask, pixels = pair
    decoder = SpeculativeDecoder(target, draft, TreeConfig(top_k=2, frontier=2, max_depth=3, max_nodes=6,
                                                           threshold=0.0), compile=compile)
    gen = torch.Generator().manual_seed(seed)
    counts = torch.zeros(V, V, V, dtype=torch.long)
    accepted = []
    for _ in range(N_SAMPLES // CHUNK):
        sizes = None if image_sizes is None else image_sizes.expand(CHUNK, -1)
        res = decoder.generate(ids.expand(CHUNK, -1), mask.expand(CHUNK, -1), pixels.expand(CHUNK, *pixels.shape[1:]),
                               max_new_tokens=3, temperature=temperature, top_p=top_p, eos_token_id=[],
                               generator=gen, image_sizes=sizes)
        seqs = torch.tensor(res.sequences)
        counts.view(-1).index_add_(0, seqs[:, 0] * V * V + seqs[:, 1] * V + seqs[:, 2],
                                   torch.ones(CHUNK, dtype=torch.long))
        accepted += [a for st in res.stats for a in st.accepted_lengths]
    return counts, accepted


@pytest.mark.parametrize("temperature,top_p,compile", [(1.0, 1.0, "off"), (0.7, 1.0, "off"), (0.7, 0.9, "off"),
                                                       (0.7, 0.9, "static")])
def test_joint_distribution_matches_target(pair, temperature, top_p, compile):
    """compile "static": the static-shape step phases (graphs.py), uncompiled."""
    target, draft, ids, mask, pixels = pair
    counts, accepted = speculative_counts(pair, temperature, top_p, compile=compile)
    assert int(counts.sum()) == N_SAMPLES
    # the verify step really exercised acceptance and rejection
    assert 0 < sum(a == 1 for a in accepted) < len(accepted)
    assert sum(a == 2 for a in accepted) > 0
    exact = exact_joint(target, ids, mask, pixels, temperature, top_p)
    assert abs(float(exact.sum()) - 1) < 1e-9
    p = chi_square_p(counts, exact)
    assert p > ALPHA, f"speculative samples differ from the target's distribution (chi-square p={p:.2e})"


def test_chi_square_has_power(pair):
    """Negative controls: the same test rejects a wrong distribution."""
    target, draft, ids, mask, pixels = pair
    gen = torch.Generator().manual_seed(1)
    exact = exact_joint(target, ids, mask, pixels, 1.0, 1.0)
    draft_joint = exact_joint(draft, ids, mask, pixels, 1.0, 1.0)
    draws = torch.multinomial(draft_joint.flatten().float(), N_SAMPLES, replacement=True, generator=gen)
    counts = torch.bincount(draws, minlength=V ** 3).view(V, V, V)
    assert chi_square_p(counts, exact) < ALPHA
    wrong_t = exact_joint(target, ids, mask, pixels, 0.85, 1.0)
    draws = torch.multinomial(wrong_t.flatten().float(), N_SAMPLES, replacement=True, generator=gen)
    counts = torch.bincount(draws, minlength=V ** 3).view(V, V, V)
    assert chi_square_p(counts, exact) < ALPHA
    # and accepts exact draws from the target itself
    draws = torch.multinomial(exact.flatten().float(), N_SAMPLES, replacement=True, generator=gen)
    counts = torch.bincount(draws, minlength=V ** 3).view(V, V, V)
    assert chi_square_p(counts, exact) > ALPHA


# -- top_k: the cut `generate` applies by default (50 when the generation config leaves it unset) ----

V_WIDE = 64       # wider than 50, so the default top_k removes tokens
N_WIDE = 40_000


@pytest.fixture(scope="module")
def wide_pair():
    target = make_tiny_llava(seed=8, vocab_size=V_WIDE, image_token_id=V_WIDE - 1, hidden_size=32,
                             initializer_range=0.15)
    target.generation_config.top_k = None           # generate falls back to transformers' 50
    draft = perturbed_copy(target, 0.3, seed=2)
    ids, mask, pixels = random_batch(target, 1, [4], seed=1)
    return target, draft, ids, mask, pixels


def exact_pair_joint(model, ids, mask, pixels, temperature, top_k) -> torch.Tensor:
    """P(t1, t2) under temperature + top-k (independent implementation), [V, V]."""
    from transformers import DynamicCache

    def warp_k(logits):
        logits = logits.double() / temperature
        if top_k:
            kth = logits.topk(top_k, dim=-1).values[..., -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        return torch.softmax(logits, dim=-1)

    with torch.no_grad():
        cache = DynamicCache()
        first = model(input_ids=ids, attention_mask=mask, pixel_values=pixels, cache=cache, use_cache=True)
        cache.batch_repeat_interleave(V_WIDE)
        attn = torch.ones(V_WIDE, ids.shape[1] + 1, dtype=torch.long)
        second = model(input_ids=torch.arange(V_WIDE).unsqueeze(1), attention_mask=attn, cache=cache,
                       use_cache=True).logits[:, -1]
    return warp_k(first.logits[0, -1])[:, None] * warp_k(second)


def test_default_top_k_cut_is_applied(wide_pair):
    """Speculative samples follow temperature + top_k=50 (what generate applies by default); the
    same test rejects the distribution without the cut, so the cut really matters here."""
    target, draft, ids, mask, pixels = wide_pair
    decoder = SpeculativeDecoder(target, draft, TreeConfig(top_k=3, frontier=2, max_depth=1, max_nodes=3,
                                                           threshold=0.0))
    gen = torch.Generator().manual_seed(5)
    counts = torch.zeros(V_WIDE, V_WIDE, dtype=torch.long)
    for _ in range(N_WIDE // CHUNK):
        res = decoder.generate(ids.expand(CHUNK, -1), mask.expand(CHUNK, -1), pixels.expand(CHUNK, -1, -1, -1),
                               max_new_tokens=2, temperature=1.5, eos_token_id=[], generator=gen)
        seqs = torch.tensor(res.sequences)
        counts.view(-1).index_add_(0, seqs[:, 0] * V_WIDE + seqs[:, 1], torch.ones(CHUNK, dtype=torch.long))
    with_cut = exact_pair_joint(target, ids, mask, pixels, 1.5, 50)
    without_cut = exact_pair_joint(target, ids, mask, pixels, 1.5, 0)
    assert float(without_cut[with_cut == 0].sum()) > 0.02          # the cut removes real mass
    assert int(counts[with_cut == 0].sum()) == 0                    # nothing outside the top 50
    p = chi_square_p(counts, with_cut)
    assert p > ALPHA, f"samples differ from temperature + top_k=50 (chi-square p={p:.2e})"
    # negative control: the uncut distribution is rejected by the same test on the same samples
    assert chi_square_p(counts, without_cut) < ALPHA
