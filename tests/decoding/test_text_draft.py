"""Text-only drafts (families.TextFamily) for a LLaVA target: lossless, and what they see.

A *ForCausalLM whose vocabulary is a prefix of the target's drafts for a LLaVA: it prefills each
row's prompt without the image tokens (its own positions), the target's stay as they are. Greedy
output must equal the target's own generate(do_sample=False) in fp32, token for token, on
random cases (batch 1-8, very different prompt lengths, tree shapes, EOS inside trees, both
step paths); sampling must keep the target's distribution (chi-square, as test_sampling_lossless).
"""
from __future__ import annotations

import functools
import random

import pytest
import torch

from decoding import ModelPairError, SpeculativeDecoder, TreeConfig
from decoding.families import text_prompt
from decoding.models import check_pair_configs, check_tokenizers
from decoding.testing import make_tiny_llava, make_tiny_processor, make_tiny_text_model, text_model_of
from tests.decoding.test_sampling_lossless import ALPHA, V, chi_square_p, exact_joint, speculative_counts
from tests.helpers import perturbed_copy, random_batch, target_greedy

IMAGE_TOKEN = 95


@functools.lru_cache(maxsize=None)
def target_model(text: str, seed: int):
    kv = 2 if text in ("mistral", "qwen2") else None
    return make_tiny_llava(seed=seed, text=text, num_kv_heads=kv, image_token_id=IMAGE_TOKEN)


@functools.lru_cache(maxsize=None)
def text_draft(kind: str, text: str, seed: int):
    target = target_model(text, seed)
    if kind == "own_lm":          # the target's own language model, alone: blind to the image
        return text_model_of(target)
    if kind == "own_lm_prefix":   # the same without the image token's row: vocabulary 95 of the target's 96
        return text_model_of(target, vocab_size=IMAGE_TOKEN)
    if kind == "random":          # another architecture than the target's, one layer
        other = {"llama": "qwen2", "mistral": "llama", "qwen2": "mistral"}[text]
        return make_tiny_text_model(seed=seed + 300, text=other, num_layers=1, vocab_size=IMAGE_TOKEN)
    raise ValueError(kind)


def make_cases(n: int = 24):
    rng = random.Random(77)
    cases = []
    for i in range(n):
        text = ["llama", "mistral", "qwen2"][i % 3]
        kind = ["own_lm", "own_lm_prefix", "random"][(i // 3) % 3]
        batch = rng.choice([1, 2, 3, 5, 8])
        lengths = [rng.choice([1, 2, 4, 9, 17, 30]) for _ in range(batch)]
        tree = TreeConfig(top_k=rng.choice([1, 2, 4]), frontier=rng.choice([1, 2, 4]),
                          max_depth=rng.choice([1, 2, 4, 6]), max_nodes=rng.choice([1, 4, 12, 32]),
                          threshold=rng.choice([0.0, 0.01]))
        max_new = rng.choice([1, 2, 7, 16, 29])
        eos_mode = rng.choice(["none", "inside", "inside"])
        cases.append(pytest.param(dict(text=text, kind=kind, seed=i % 2, batch=batch, lengths=lengths, tree=tree,
                                       max_new=max_new, eos_mode=eos_mode, data_seed=100 + i),
                                  id=f"case{i}-{text}-{kind}-b{batch}"))
    return cases


@pytest.mark.parametrize("compile", ["off", "static"])
@pytest.mark.parametrize("case", make_cases())
def test_text_draft_greedy_equals_target_generate(case, compile):
    target = target_model(case["text"], case["seed"])
    draft = text_draft(case["kind"], case["text"], case["seed"])
    ids, mask, pixels = random_batch(target, case["batch"], case["lengths"], seed=case["data_seed"])
    eos = None
    if case["eos_mode"] == "inside":
        free = target_greedy(target, ids, mask, pixels, max(case["max_new"], 8), None)[0]
        eos = free[min(len(free) - 1, 4)]
    expected = target_greedy(target, ids, mask, pixels, case["max_new"], eos)
    decoder = SpeculativeDecoder(target, draft, tree=case["tree"], compile=compile)
    assert decoder.text_draft and not decoder.shared_vision
    result = decoder.generate(ids, mask, pixels, max_new_tokens=case["max_new"],
                              eos_token_id=[] if eos is None else eos)
    assert result.sequences == expected
    for seq, st in zip(result.sequences, result.stats):
        assert st.new_tokens == len(seq) == 1 + sum(st.accepted_lengths)
        assert all(1 <= a <= case["tree"].max_depth + 1 for a in st.accepted_lengths)


def test_the_draft_sees_the_prompt_without_image_tokens():
    """After `add`, the draft's cache holds each row's text tokens only (its own positions 0..n-1),
    the target's the whole prompt; and the draft's cache equals a plain prefill of the text."""
    target = target_model("llama", 0)
    draft = text_draft("own_lm", "llama", 0)
    ids, mask, pixels = random_batch(target, 3, [4, 11, 1], seed=3)
    engine = SpeculativeDecoder(target, draft).engine(max_new_tokens=8)
    engine.add(ids, mask, pixels)
    images = (ids == IMAGE_TOKEN).sum(-1)
    assert torch.equal(engine._tpool.lengths[:3], mask.sum(-1))
    assert torch.equal(engine._dpool.lengths[:3], mask.sum(-1) - images)
    assert bool((images > 0).all())
    for b in range(3):
        text = ids[b][mask[b].bool() & (ids[b] != IMAGE_TOKEN)]
        with torch.no_grad():
            out = draft(input_ids=text[None], use_cache=True)
        keys = out.past_key_values.layers[0].keys[0]                 # [H, n, d]
        assert torch.allclose(engine._dpool.kv[0, b, :, : len(text)], keys, atol=1e-6)


def test_text_prompt_drops_image_tokens_and_left_pads_again():
    ids = torch.tensor([[0, 0, 1, 9, 9, 5], [1, 7, 9, 9, 6, 8]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    got_ids, got_mask = text_prompt(ids, mask, image_token_id=9)
    assert got_ids.tolist() == [[0, 0, 1, 5], [1, 7, 6, 8]]
    assert got_mask.tolist() == [[0, 0, 1, 1], [1, 1, 1, 1]]


def test_a_row_of_only_image_tokens_is_refused_clearly():
    from decoding import InputError

    with pytest.raises(InputError, match="no text tokens"):
        text_prompt(torch.tensor([[9, 9]]), torch.tensor([[1, 1]]), image_token_id=9)


def test_pair_checks_for_text_drafts():
    target = target_model("llama", 0)
    check_pair_configs(target.config, text_draft("own_lm_prefix", "llama", 0).config)   # accepted
    other_eos = make_tiny_text_model(seed=1, eos_token_id=3)
    with pytest.raises(ModelPairError, match="eos_token_id differs"):
        check_pair_configs(target.config, other_eos.config)
    with pytest.raises(ModelPairError, match="more than embedding padding"):
        check_pair_configs(target.config, make_tiny_text_model(seed=1, vocab_size=1024).config)
    with pytest.raises(ModelPairError, match="target must be a LLaVA"):
        check_pair_configs(other_eos.config, target.config)
    with pytest.raises(ModelPairError, match="not supported"):
        check_pair_configs(target.config, make_tiny_llava(seed=1).config.vision_config)


def test_tokenizer_prefix_check():
    """A text draft's tokenizer may lack the target's added tokens (its image token) but no id
    may mean another token."""
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models, pre_tokenizers

    target = make_tiny_processor().tokenizer
    vocab = {t: i for t, i in target.get_vocab().items() if t != "<image>"}

    def tok(v):
        backend = Tokenizer(models.WordLevel(vocab=v, unk_token="<unk>"))
        backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                       unk_token="<unk>", pad_token="<pad>")

    check_tokenizers(target, tok(vocab), text_draft=True)                  # a prefix: accepted
    with pytest.raises(ModelPairError):                                    # without text_draft: must be equal
        check_tokenizers(target, tok(vocab))
    swapped = dict(vocab, w0=vocab["w1"], w1=vocab["w0"])
    with pytest.raises(ModelPairError, match="not a prefix"):
        check_tokenizers(target, tok(swapped), text_draft=True)


def test_text_draft_sampling_keeps_the_target_distribution():
    """20,000 continuations of 3 tokens with a text draft (the target's own language model,
    perturbed): the joint (t1, t2, t3) follows the target's (chi-square p > 0.001)."""
    target = make_tiny_llava(seed=3, vocab_size=V, image_token_id=V - 1, hidden_size=32, initializer_range=0.5)
    draft = text_model_of(perturbed_copy(target, 0.5, seed=0))
    ids, mask, pixels = random_batch(target, 1, [3], seed=0)
    counts, accepted = speculative_counts((target, draft, ids, mask, pixels), 0.7, 0.9)
    assert 0 < sum(a == 1 for a in accepted) < len(accepted) and sum(a == 2 for a in accepted) > 0
    p = chi_square_p(counts, exact_joint(target, ids, mask, pixels, 0.7, 0.9))
    assert p > ALPHA, f"text-draft samples differ from the target's distribution (chi-square p={p:.2e})"
