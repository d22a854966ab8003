"""Bad input and bad model pairs get a clear, named error; half precision runs and is reported."""
from __future__ import annotations

import copy
import functools

import pytest
import torch

from decoding import InputError, ModelPairError, SpeculativeDecoder, TreeConfig
from decoding.testing import make_tiny_llava
from tests.helpers import random_batch, target_greedy


@functools.lru_cache(maxsize=None)
def pair():
    target = make_tiny_llava(seed=0, image_token_id=95)
    draft = make_tiny_llava(seed=1, num_layers=1, image_token_id=95)
    return target, draft


@pytest.fixture
def decoder():
    return SpeculativeDecoder(*pair())


@pytest.fixture
def batch():
    return random_batch(pair()[0], 2, [3, 5], seed=0)


def test_max_new_tokens_below_one(decoder, batch):
    with pytest.raises(InputError, match="max_new_tokens"):
        decoder.generate(*batch, max_new_tokens=0)


def test_negative_temperature(decoder, batch):
    with pytest.raises(InputError, match="temperature"):
        decoder.generate(*batch, temperature=-0.1)


@pytest.mark.parametrize("top_p", [0.0, 1.5])
def test_bad_top_p(decoder, batch, top_p):
    with pytest.raises(InputError, match="top_p"):
        decoder.generate(*batch, temperature=1.0, top_p=top_p)


def test_mask_shape_mismatch(decoder, batch):
    ids, mask, pixels = batch
    with pytest.raises(InputError, match="attention_mask"):
        decoder.generate(ids, mask[:, 1:], pixels)


def test_one_dimensional_ids(decoder, batch):
    ids, mask, pixels = batch
    with pytest.raises(InputError, match="2D"):
        decoder.generate(ids[0], mask[0], pixels)


def test_right_padding_rejected(decoder, batch):
    ids, mask, pixels = batch
    with pytest.raises(InputError, match="left-padded"):
        decoder.generate(ids.flip(1), mask.flip(1), pixels)


def test_image_tokens_without_images(decoder, batch):
    ids, mask, _ = batch
    with pytest.raises(InputError, match="pixel_values is None"):
        decoder.generate(ids, mask, None)


def test_image_count_mismatch(decoder, batch):
    ids, mask, pixels = batch
    with pytest.raises(InputError, match="image"):
        decoder.generate(ids, mask, pixels[:1])


def test_image_token_count_not_multiple(decoder, batch):
    ids, mask, pixels = batch
    ids = ids.clone()
    ids[0, -1] = 95   # one extra image token
    with pytest.raises(InputError, match="image tokens"):
        decoder.generate(ids, mask, pixels)


def test_wrong_image_size(decoder, batch):
    ids, mask, pixels = batch
    with pytest.raises(InputError, match="pixel_values"):
        decoder.generate(ids, mask, torch.randn(2, 3, 32, 32))


def test_tokenizer_mismatch():
    target, _ = pair()
    other = make_tiny_llava(seed=2, vocab_size=1000, image_token_id=95)
    with pytest.raises(ModelPairError, match="tokenizer"):
        SpeculativeDecoder(target, other)
    other = make_tiny_llava(seed=2, image_token_id=90)
    with pytest.raises(ModelPairError, match="image token"):
        SpeculativeDecoder(target, other)


def test_different_image_expansion():
    target, _ = pair()
    other = make_tiny_llava(seed=2, image_token_id=95, vision_feature_select_strategy="full")
    with pytest.raises(ModelPairError, match="expand images differently"):
        SpeculativeDecoder(target, other)


def test_models_on_different_devices():
    target, draft = pair()
    draft = copy.deepcopy(draft).to("meta")
    with pytest.raises(ModelPairError, match="same device"):
        SpeculativeDecoder(target, draft)


def test_training_mode_rejected():
    target, draft = pair()
    draft = copy.deepcopy(draft).train()
    with pytest.raises(ModelPairError, match="eval"):
        SpeculativeDecoder(target, draft)


def test_unsupported_attention_backend():
    target, draft = pair()
    draft = copy.deepcopy(draft)
    draft.config.text_config._attn_implementation = "flash_attention_2"
    with pytest.raises(ModelPairError, match="attn_implementation"):
        SpeculativeDecoder(target, draft)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_runs_and_mostly_matches(dtype):
    """Half precision is not bit-exact (a 1-token step and a k-token verify can flip near-ties),
    so here we only require that it runs and that most tokens match the target's own greedy."""
    target = make_tiny_llava(seed=0, image_token_id=95, dtype=dtype)
    draft = copy.deepcopy(target)
    ids, mask, pixels = random_batch(target, 3, [4, 8, 2], seed=1)
    pixels = pixels.to(dtype)
    result = SpeculativeDecoder(target, draft, TreeConfig()).generate(ids, mask, pixels, max_new_tokens=16,
                                                                     eos_token_id=[])
    expected = target_greedy(target, ids, mask, pixels, 16, None)
    matched = sum(a == b for got, exp in zip(result.sequences, expected) for a, b in zip(got, exp))
    assert all(len(s) == 16 for s in result.sequences)
    assert matched / 48 >= 0.5
