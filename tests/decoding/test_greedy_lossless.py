"""Greedy speculative output == the target's own generate(do_sample=False), token for token, fp32.

60 random cases: seeds, batch 1-8, prompt lengths (very different within a batch), tree configs,
text models (LLaMA, Mistral and Qwen2 with GQA), both vision_feature_select_strategy values,
draft kinds (the target itself, a perturbed copy that shares the vision tower, an unrelated
random draft, a draft with a padded vocabulary), EOS inside a tree and max_new_tokens reached
inside a tree.
"""
from __future__ import annotations

import copy
import functools
import random

import pytest
import torch

from decoding import SpeculativeDecoder, TreeConfig
from decoding.testing import make_tiny_llava
from tests.helpers import random_batch, target_greedy

IMAGE_TOKEN = 95


@functools.lru_cache(maxsize=None)
def target_model(text: str, strategy: str, seed: int):
    kv = 2 if text in ("mistral", "qwen2") else None      # GQA for Mistral and Qwen2
    return make_tiny_llava(seed=seed, text=text, vision_feature_select_strategy=strategy, num_kv_heads=kv,
                           image_token_id=IMAGE_TOKEN)


@functools.lru_cache(maxsize=None)
def draft_model(kind: str, text: str, strategy: str, seed: int):
    target = target_model(text, strategy, seed)
    if kind == "self":
        return target
    if kind == "perturbed":   # close to the target: long accepted paths with real rejections
        draft = copy.deepcopy(target)
        g = torch.Generator().manual_seed(seed + 7)
        with torch.no_grad():
            for name, p in draft.model.language_model.named_parameters():
                p.add_(0.3 * p.std() * torch.randn(p.shape, generator=g))
        draft.model.vision_tower = target.model.vision_tower   # shared vision tower
        return draft
    if kind == "random":
        return make_tiny_llava(seed=seed + 100, text="llama", num_layers=1, vision_feature_select_strategy=strategy,
                               image_token_id=IMAGE_TOKEN)
    if kind == "padded_vocab":  # target vocab 96, draft embedding padded to 128
        return make_tiny_llava(seed=seed + 200, text="llama", num_layers=1, vocab_size=128,
                               vision_feature_select_strategy=strategy, image_token_id=IMAGE_TOKEN)
    raise ValueError(kind)


def make_cases(n: int = 60):
    rng = random.Random(1234)
    cases = []
    for i in range(n):
        text = ["llama", "mistral", "qwen2"][i % 3]
        strategy = ["default", "full"][(i // 3) % 2]
        kind = ["perturbed", "random", "self", "padded_vocab", "perturbed"][i % 5]
        batch = rng.choice([1, 2, 3, 5, 8])
        lengths = [rng.choice([1, 2, 4, 9, 17, 30]) for _ in range(batch)]
        tree = TreeConfig(top_k=rng.choice([1, 2, 4, 6]), frontier=rng.choice([1, 2, 4]),
                          max_depth=rng.choice([1, 2, 4, 6, 8]), max_nodes=rng.choice([1, 4, 12, 32]),
                          threshold=rng.choice([0.0, 0.01, 0.1]))
        max_new = rng.choice([1, 2, 7, 16, 29])
        eos_mode = rng.choice(["none", "inside", "inside", "list"])
        cases.append(pytest.param(dict(text=text, strategy=strategy, kind=kind, seed=i % 4, batch=batch,
                                       lengths=lengths, tree=tree, max_new=max_new, eos_mode=eos_mode,
                                       data_seed=i), id=f"case{i}-{text}-{strategy}-{kind}-b{batch}"))
    return cases


def pick_eos(target, ids, mask, pixels, mode, max_new):
    """'inside': a token the target emits a few steps in, so EOS lands inside a draft tree."""
    if mode == "none":
        return None
    free = target_greedy(target, ids, mask, pixels, max_new_tokens=max(max_new, 8), eos=None)[0]
    token = free[min(len(free) - 1, 4)]
    return token if mode == "inside" else [token, 2]


@pytest.mark.parametrize("compile", ["off", "static"])
@pytest.mark.parametrize("case", make_cases())
def test_greedy_equals_target_generate(case, compile):
    """compile: the engine's eager step ("off") and the static-shape phases of graphs.py run
    uncompiled ("static"; tests/decoding/test_graphs.py runs them compiled)."""
    target = target_model(case["text"], case["strategy"], case["seed"])
    draft = draft_model(case["kind"], case["text"], case["strategy"], case["seed"])
    ids, mask, pixels = random_batch(target, case["batch"], case["lengths"], seed=case["data_seed"])
    eos = pick_eos(target, ids, mask, pixels, case["eos_mode"], case["max_new"])
    expected = target_greedy(target, ids, mask, pixels, case["max_new"], eos)
    decoder = SpeculativeDecoder(target, draft, tree=case["tree"], compile=compile)
    result = decoder.generate(ids, mask, pixels, max_new_tokens=case["max_new"],
                              eos_token_id=[] if eos is None else eos)
    assert result.sequences == expected
    for seq, st in zip(result.sequences, result.stats):
        assert st.new_tokens == len(seq) == 1 + sum(st.accepted_lengths)
        assert st.target_forwards == 1 + len(st.accepted_lengths)
        assert all(1 <= a <= case["tree"].max_depth + 1 for a in st.accepted_lengths)
        assert all(n <= case["tree"].max_nodes for n in st.tree_nodes)


@pytest.mark.parametrize("text", ["llama", "mistral", "qwen2"])
def test_self_draft_accepts_full_depth(text):
    """Draft == target: every step that is not cut by max_new_tokens accepts max_depth + 1."""
    target = target_model(text, "default", 0)
    tree = TreeConfig(top_k=3, frontier=2, max_depth=5, max_nodes=12, threshold=0.0)
    ids, mask, pixels = random_batch(target, 4, [3, 20, 7, 1], seed=5)
    max_new = 1 + 6 * 4 + 3
    result = SpeculativeDecoder(target, target, tree=tree).generate(ids, mask, pixels, max_new_tokens=max_new,
                                                                   eos_token_id=[])
    assert result.sequences == target_greedy(target, ids, mask, pixels, max_new, None)
    for st in result.stats:
        assert st.accepted_lengths == [6, 6, 6, 6, 3]


def test_row_output_does_not_depend_on_its_batch():
    target = target_model("llama", "default", 1)
    draft = draft_model("perturbed", "llama", "default", 1)
    ids, mask, pixels = random_batch(target, 6, [1, 25, 3, 12, 8, 30], seed=11)
    decoder = SpeculativeDecoder(target, draft, tree=TreeConfig())
    batched = decoder.generate(ids, mask, pixels, max_new_tokens=24, eos_token_id=[]).sequences
    for b in range(6):
        n = int(mask[b].sum())
        alone = decoder.generate(ids[b:b + 1, -n:], mask[b:b + 1, -n:], pixels[b:b + 1], max_new_tokens=24,
                                 eos_token_id=[]).sequences[0]
        assert alone == batched[b]


def test_finished_rows_stop_costing_work():
    target = target_model("llama", "default", 2)
    draft = draft_model("perturbed", "llama", "default", 2)
    ids, mask, pixels = random_batch(target, 3, [4, 4, 4], seed=3)
    free = target_greedy(target, ids, mask, pixels, 30, None)
    eos = free[0][2]   # row 0 stops after 3 tokens
    result = SpeculativeDecoder(target, draft).generate(ids, mask, pixels, max_new_tokens=30, eos_token_id=eos)
    assert result.sequences == target_greedy(target, ids, mask, pixels, 30, eos)
    short = result.stats[0]
    longest = max(result.stats, key=lambda s: s.new_tokens)
    assert short.new_tokens == 3 and longest.new_tokens > short.new_tokens + 8   # the case really happens
    assert short.target_forwards < longest.target_forwards
    assert short.draft_forwards < longest.draft_forwards


def test_text_only_rows():
    target = target_model("llama", "default", 0)
    draft = draft_model("perturbed", "llama", "default", 0)
    ids, mask, _ = random_batch(target, 3, [5, 1, 9], seed=2, with_image=False)
    result = SpeculativeDecoder(target, draft).generate(ids, mask, None, max_new_tokens=12, eos_token_id=[])
    assert result.sequences == target_greedy(target, ids, mask, None, 12, None)


def test_shared_vision_tower_runs_once():
    target = target_model("llama", "default", 3)
    draft = draft_model("perturbed", "llama", "default", 3)
    decoder = SpeculativeDecoder(target, draft)
    assert decoder.shared_vision
    calls = []
    handle = target.model.vision_tower.register_forward_hook(lambda *a: calls.append(1))
    try:
        ids, mask, pixels = random_batch(target, 2, [3, 4], seed=1)
        decoder.generate(ids, mask, pixels, max_new_tokens=4)
    finally:
        handle.remove()
    assert len(calls) == 1
    assert not SpeculativeDecoder(target, draft_model("random", "llama", "default", 3)).shared_vision


def test_sliding_window_mistral():
    """A Mistral text model with a sliding window shorter than the sequence stays lossless."""
    target = make_tiny_llava(seed=4, text="mistral", sliding_window=6, num_kv_heads=2, image_token_id=IMAGE_TOKEN)
    target.config._attn_implementation = "sdpa"
    ids, mask, pixels = random_batch(target, 3, [2, 9, 15], seed=4)
    draft = copy.deepcopy(target)
    result = SpeculativeDecoder(target, draft, TreeConfig(max_depth=4)).generate(ids, mask, pixels,
                                                                                max_new_tokens=20)
    assert result.sequences == target_greedy(target, ids, mask, pixels, 20, 2)
