"""LLaVA-NeXT and LLaVA-OneVision targets (any-resolution tiling): lossless with drafts of their
family and with text-only drafts, rows of different image sizes in one batch.

Images of different sizes become different token counts (NeXT 10-24 tokens here: the base tile,
the best grid's tiles unpadded, a newline per row of patches); a batch mixes them, so rows'
prompts differ in length through their images as well as their text. Greedy output must equal
the target's own generate(do_sample=False) in fp32, token for token, on both step paths; the
sampling chi-square runs for a NeXT pair.
"""
from __future__ import annotations

import copy
import functools
import random

import numpy as np
import pytest
import torch
from PIL import Image

from decoding import InputError, ModelPairError, SpeculativeDecoder, TreeConfig
from decoding.families import adapter
from decoding.models import check_pair_configs, image_tokens_per_image
from decoding.testing import make_tiny_anyres, make_tiny_llava, text_model_of, tiny_anyres_config, tiny_anyres_inputs
from tests.decoding.test_sampling_lossless import ALPHA, chi_square_p, exact_joint, speculative_counts
from tests.helpers import target_greedy

IMAGE_TOKEN = 95
SIZES = [(16, 16), (20, 40), (40, 18), (33, 33), (8, 30), (64, 20), (17, 16), (25, 50)]   # (height, width)


@functools.lru_cache(maxsize=None)
def target_model(family: str, seed: int):
    return make_tiny_anyres(family, seed=seed, image_token_id=IMAGE_TOKEN)


@functools.lru_cache(maxsize=None)
def draft_model(family: str, kind: str, seed: int):
    target = target_model(family, seed)
    if kind == "perturbed":        # same family, close to the target (it computes its own image features)
        draft = copy.deepcopy(target)
        g = torch.Generator().manual_seed(seed + 7)
        with torch.no_grad():
            for p in adapter(draft).text_model(draft).parameters():
                p.add_(0.3 * p.std() * torch.randn(p.shape, generator=g))
        return draft
    if kind == "small":            # same family, one layer, other weights
        return make_tiny_anyres(family, seed=seed + 50, num_layers=1, image_token_id=IMAGE_TOKEN)
    if kind == "text":             # the target's language model alone, vocabulary without the image token
        return text_model_of(target, vocab_size=IMAGE_TOKEN)
    raise ValueError(kind)


def batch_of(model, sizes, text_lengths, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    images = [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for h, w in sizes]
    prompts = []
    for n in text_lengths:
        words = [f"w{int(i)}" for i in rng.integers(1, 80, n)]
        split = int(rng.integers(0, n + 1))
        prompts.append(" ".join(words[:split] + ["<image>"] + words[split:]))
    return tiny_anyres_inputs(model, images, prompts)


def make_cases(n: int = 16):
    rng = random.Random(5)
    cases = []
    for i in range(n):
        family = ["llava_next", "llava_onevision"][i % 2]
        kind = ["perturbed", "text", "small", "text"][(i // 2) % 4]
        batch = rng.choice([2, 3, 5])
        sizes = SIZES[:2] + rng.sample(SIZES[2:], batch - 2)    # 10 and 14 image tokens at least
        rng.shuffle(sizes)
        lengths = [rng.choice([1, 3, 8, 20]) for _ in range(batch)]
        tree = TreeConfig(top_k=rng.choice([1, 2, 4]), frontier=rng.choice([1, 2]), max_depth=rng.choice([1, 3, 5]),
                          max_nodes=rng.choice([2, 8, 24]), threshold=0.0)
        max_new = rng.choice([2, 9, 20])
        cases.append(pytest.param(dict(family=family, kind=kind, seed=i % 2, sizes=sizes, lengths=lengths, tree=tree,
                                       max_new=max_new, data_seed=i, eos=rng.choice([False, True])),
                                  id=f"case{i}-{family}-{kind}-b{batch}"))
    return cases


@pytest.mark.parametrize("compile", ["off", "static"])
@pytest.mark.parametrize("case", make_cases())
def test_anyres_greedy_equals_target_generate(case, compile):
    target = target_model(case["family"], case["seed"])
    draft = draft_model(case["family"], case["kind"], case["seed"])
    enc = batch_of(target, case["sizes"], case["lengths"], case["data_seed"])
    counts = (enc["input_ids"] == IMAGE_TOKEN).sum(-1)
    assert len(set(counts.tolist())) > 1          # image sizes really give different token counts
    ids, mask, pixels, sizes = enc["input_ids"], enc["attention_mask"], enc["pixel_values"], enc["image_sizes"]
    eos = None
    if case["eos"]:
        free = target_greedy(target, ids, mask, pixels, 8, None, image_sizes=sizes)[0]
        eos = free[4]
    expected = target_greedy(target, ids, mask, pixels, case["max_new"], eos, image_sizes=sizes)
    decoder = SpeculativeDecoder(target, draft, tree=case["tree"], compile=compile)
    assert decoder.text_draft == (case["kind"] == "text") and not decoder.shared_vision
    result = decoder.generate(ids, mask, pixels, max_new_tokens=case["max_new"],
                              eos_token_id=[] if eos is None else eos, image_sizes=sizes)
    assert result.sequences == expected
    for seq, st in zip(result.sequences, result.stats):
        assert st.new_tokens == len(seq) == 1 + sum(st.accepted_lengths)


def test_a_row_decodes_the_same_alone_and_in_a_mixed_batch():
    target = target_model("llava_next", 0)
    decoder = SpeculativeDecoder(target, draft_model("llava_next", "text", 0))
    enc = batch_of(target, SIZES[:4], [3, 1, 9, 4], seed=3)
    batched = decoder.generate(enc["input_ids"], enc["attention_mask"], enc["pixel_values"], max_new_tokens=12,
                               eos_token_id=[], image_sizes=enc["image_sizes"]).sequences
    for b in range(4):
        n = int(enc["attention_mask"][b].sum())
        alone = decoder.generate(enc["input_ids"][b:b + 1, -n:], enc["attention_mask"][b:b + 1, -n:],
                                 enc["pixel_values"][b:b + 1], max_new_tokens=12, eos_token_id=[],
                                 image_sizes=enc["image_sizes"][b:b + 1]).sequences[0]
        assert alone == batched[b]


def test_next_sampling_keeps_the_target_distribution():
    """A NeXT pair with an 8-token vocabulary: 20,000 continuations of 3 tokens; the joint
    (t1, t2, t3) follows the target's own (chi-square p > 0.001, as test_sampling_lossless)."""
    from tests.decoding import test_sampling_lossless as sl

    target = make_tiny_anyres("llava_next", seed=3, vocab_size=sl.V, image_token_id=sl.V - 1, hidden_size=32,
                              initializer_range=0.5)
    draft = copy.deepcopy(target)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in adapter(draft).text_model(draft).parameters():
            p.add_(0.5 * p.std() * torch.randn(p.shape, generator=g))
    rng = np.random.default_rng(0)
    enc = tiny_anyres_inputs(target, [Image.fromarray(rng.integers(0, 255, (20, 40, 3), dtype=np.uint8))],
                             ["w1 <image>"], vocab_size=sl.V)
    ids, mask, pixels, sizes = enc["input_ids"], enc["attention_mask"], enc["pixel_values"], enc["image_sizes"]
    counts, accepted = speculative_counts((target, draft, ids, mask, pixels), 0.7, 1.0, image_sizes=sizes)
    assert 0 < sum(a == 1 for a in accepted) < len(accepted) and sum(a == 2 for a in accepted) > 0
    p = chi_square_p(counts, exact_joint(target, ids, mask, pixels, 0.7, 1.0, image_sizes=sizes))
    assert p > ALPHA, f"NeXT samples differ from the target's distribution (chi-square p={p:.2e})"


def test_bad_anyres_inputs_get_clear_errors():
    target = target_model("llava_next", 0)
    decoder = SpeculativeDecoder(target, draft_model("llava_next", "text", 0))
    enc = batch_of(target, SIZES[:2], [3, 4], seed=1)
    ids, mask, pixels, sizes = enc["input_ids"], enc["attention_mask"], enc["pixel_values"], enc["image_sizes"]
    with pytest.raises(InputError, match="image_sizes"):
        decoder.generate(ids, mask, pixels, max_new_tokens=2)
    with pytest.raises(InputError, match=r"tiles, C, H, W"):
        decoder.generate(ids, mask, pixels[:, 0], max_new_tokens=2, image_sizes=sizes)
    # Images in another order than the rows': the totals agree (the model's own check passes), the rows do not.
    assert sizes[0].tolist() != sizes[1].tolist()
    with pytest.raises(InputError, match="row 0 has 10 image tokens but its image"):
        decoder.generate(ids, mask, pixels.flip(0), max_new_tokens=2, image_sizes=sizes.flip(0))
    with pytest.raises(InputError, match="row 1 has 14 image tokens but its image"):   # one image missing
        decoder.generate(ids, mask, pixels[:1], max_new_tokens=2, image_sizes=sizes[:1])


def test_pair_checks_across_families():
    next_cfg, onevision_cfg = tiny_anyres_config("llava_next"), tiny_anyres_config("llava_onevision")
    check_pair_configs(next_cfg, tiny_anyres_config("llava_next", num_layers=1))                  # accepted
    with pytest.raises(ModelPairError, match="of the target's family"):
        check_pair_configs(next_cfg, make_tiny_llava().config)
    with pytest.raises(ModelPairError, match="of the target's family"):
        check_pair_configs(onevision_cfg, next_cfg)
    other_grid = tiny_anyres_config("llava_next")
    other_grid.image_grid_pinpoints = [[16, 32], [32, 16]]
    with pytest.raises(ModelPairError, match="image_grid_pinpoints"):
        check_pair_configs(next_cfg, other_grid)
    # The KV planner's bound holds for every size the tests use.
    target = target_model("llava_next", 0)
    enc = batch_of(target, SIZES, [1] * len(SIZES), seed=0)
    assert int((enc["input_ids"] == IMAGE_TOKEN).sum(-1).max()) <= image_tokens_per_image(target)
