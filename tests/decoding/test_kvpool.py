"""The engine's slot-pool KV cache (decoding/kvpool.py) and its memory plan (decoding/capacity.py).

- KVPool's operations against a plain reference: prompts stored left-aligned, a commit moving
  exactly the kept block slots to each row's own end, reads stopping at head + block.
- In the engine: the buffers are allocated once (the same storage across finishes and joins),
  every row's cache length is its prompt plus its own tokens (no holes), the occupied slots stay
  a prefix (rows move down into freed slots), and a step reads the device once (a
  TorchDispatchMode count, greedy and sampling).
- The planner on the meta device for llava-1.5-7b / -13b shapes in bf16 on 80 GB.
"""
import pytest
import torch

from decoding import SpeculativeDecoder, TreeConfig
from decoding.capacity import plan_capacity, tree_room
from decoding.errors import CapacityError
from decoding.kvpool import KVPool, KVShape
from decoding.profiling import StepProfiler
from tests.decoding.test_greedy_lossless import draft_model, target_model
from tests.helpers import random_batch, target_greedy

SHAPE = KVShape(layers=2, kv_heads=2, head_dim=4, dtype=torch.float32)


def kv(b, s, seed, h=2, d=4):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, h, s, d, generator=g), torch.randn(b, h, s, d, generator=g)


def test_write_prompt_left_aligns_rows_in_their_slots():
    pool = KVPool(SHAPE, rows=4, length=12, device="cpu")
    layers = [kv(2, 5, i) for i in range(SHAPE.layers)]
    pool.write_prompt(torch.tensor([3, 1]), layers, pad=torch.tensor([2, 0]), lengths=[3, 5])
    assert pool.lengths.tolist() == [0, 5, 0, 3] and pool.host_lengths == [0, 5, 0, 3]
    for i, (k, v) in enumerate(layers):
        assert torch.equal(pool.kv[2 * i, 3, :, :3], k[0, :, 2:]) and torch.equal(pool.kv[2 * i + 1, 1, :, :5], v[1])
    assert not pool.kv[:, 0].any() and not pool.kv[:, 2].any()        # other slots untouched


def test_block_write_read_and_commit_match_a_reference():
    pool = KVPool(SHAPE, rows=3, length=16, device="cpu")
    pool.write_prompt(torch.tensor([0, 1, 2]), [kv(3, 6, i) for i in range(2)], pad=torch.tensor([0, 2, 3]),
                      lengths=[6, 4, 3])
    head = pool.head(3)
    assert head == 6
    cache = pool.begin(3, head)
    block_k, block_v = kv(3, 4, 7)
    before = pool.kv.clone()
    keys, values = cache.layers[1].update(block_k, block_v)
    assert keys.shape[2] == head + 4 and torch.equal(keys[:, :, head:], block_k)   # reads stop at the block
    src = torch.tensor([[0, 2, 3], [0, 1, 0], [0, 3, 0]])
    count = torch.tensor([3, 2, 1])
    pool.commit(3, head, src, count)
    assert pool.lengths.tolist() == [9, 6, 4]
    for b, (n, start) in enumerate(zip(count.tolist(), [6, 4, 3])):
        kept = block_k[b][:, src[b, :n]]
        assert torch.equal(pool.kv[2, b, :, start: start + n], kept)                  # layer 1's keys
        assert torch.equal(pool.kv[2, b, :, :start], before[2, b, :, :start])         # committed ones unmoved


def test_engine_buffers_are_allocated_once_and_rows_have_no_holes():
    target = target_model("llama", "default", 1)
    draft = draft_model("perturbed", "llama", "default", 1)
    ids, mask, pixels = random_batch(target, 6, [2, 27, 9, 14, 4, 11], seed=21)
    decoder = SpeculativeDecoder(target, draft, TreeConfig())
    prompt = ids.shape[1]
    engine = decoder.engine(max_new_tokens=16, eos_token_id=[], max_rows=4, max_length=prompt + 16 + 40)
    engine.add(ids[:3], mask[:3], pixels[:3], keys=[0, 1, 2])
    tgt, drf = engine._tpool, engine._dpool
    storage = (tgt.kv.data_ptr(), drf.kv.data_ptr())
    done, joined = {}, False
    while engine.active or not joined:
        if not joined and len(done) >= 1:
            assert engine.can_admit(1, prompt)
            engine.add(ids[3:4], mask[3:4], pixels[3:4], keys=[3])      # joins a freed slot
            joined = True
        for row in engine.step().finished:
            done[row.key] = row
        for s, row in enumerate(engine._slots):                       # no holes: prompt + own tokens
            if row is not None:
                n_prompt = int(mask[row.key].sum())
                assert tgt.host_lengths[s] == tgt.lengths[s].item() == n_prompt + len(row.outputs) - 1
        assert (tgt.kv.data_ptr(), drf.kv.data_ptr()) == storage and tgt.rows == 4
        occupied = [s for s, row in enumerate(engine._slots) if row is not None]
        assert occupied == list(range(engine.active))        # condensed: a step computes active rows only
    for b in range(4):
        assert done[b].tokens == target_greedy(target, ids[b:b + 1], mask[b:b + 1], pixels[b:b + 1], 16, None)[0]


def test_planned_engine_refuses_rows_it_cannot_hold():
    target = target_model("llama", "default", 1)
    draft = draft_model("perturbed", "llama", "default", 1)
    ids, mask, pixels = random_batch(target, 3, [4, 4, 4], seed=3)
    engine = SpeculativeDecoder(target, draft).engine(max_new_tokens=8, eos_token_id=[], max_rows=2,
                                                      max_length=ids.shape[1] + 8 + 40)
    assert not engine.can_admit(3, ids.shape[1]) and engine.can_admit(2, ids.shape[1])
    with pytest.raises(CapacityError, match="can_admit"):
        engine.add(ids, mask, pixels)
    assert not engine.can_admit(1, ids.shape[1] + 40)          # too long for the planned length


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_a_step_reads_the_device_once(temperature):
    target = target_model("qwen2", "default", 2)
    draft = draft_model("perturbed", "qwen2", "default", 2)
    ids, mask, pixels = random_batch(target, 4, seed=5)
    decoder = SpeculativeDecoder(target, draft, TreeConfig(threshold=0.1))
    engine = decoder.engine(max_new_tokens=40, eos_token_id=[], temperature=temperature)
    engine.add(ids, mask, pixels, seeds=[1, 2, 3, 4] if temperature else None)
    engine.step()
    with StepProfiler(decoder) as prof:
        for _ in range(3):
            engine.step()
    report = prof.report(steps=3)
    assert report["syncs_per_step"] == 1, report
    assert report["draft_forward"]["forwards"] == TreeConfig().max_depth and report["verify_forward"]["forwards"] == 1


def test_profiler_counts_syncs_it_is_shown():
    """Negative control: a .item() and a bool() inside the profiled region are two syncs."""
    decoder = SpeculativeDecoder(target_model("llama", "default", 0), draft_model("perturbed", "llama", "default", 0))
    with StepProfiler(decoder) as prof:
        t = torch.arange(4)
        t.sum().item()
        bool(t.any())
        t.tolist()
    assert prof.report()["syncs_per_step"] == 3


def meta_llava(hidden, layers, heads, intermediate, vocab=32064):
    """A llava-1.5-shaped model on the meta device (no memory): CLIP ViT-L/14-336 + a LLaMA."""
    from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration

    vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                              num_attention_heads=16, image_size=336, patch_size=14, projection_dim=768)
    text = dict(model_type="llama", hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=heads, vocab_size=vocab, max_position_embeddings=4096)
    config = LlavaConfig(vision_config=vision.to_dict(), text_config=text, image_token_id=32000)
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(config).to(torch.bfloat16)
    return model


def test_planner_for_llava_1_5_7b_and_13b_in_bf16_on_80_gb():
    draft = meta_llava(hidden=512, layers=8, heads=8, intermediate=2048)        # LLaVA-68M-like draft
    trees = [TreeConfig()]
    prompt, new = 576 + 24, 256      # 576 image tokens + a short instruction; 256 new tokens
    plans = {}
    for name, (hidden, layers, heads, inter) in {"7b": (4096, 32, 32, 11008), "13b": (5120, 40, 40, 13824)}.items():
        target = meta_llava(hidden, layers, heads, inter)
        weights = sum(p.numel() * p.element_size() for m in (target, draft) for p in m.parameters())
        budget = int((80 * 2 ** 30 - weights) * 0.9)
        plans[name] = plan_capacity(KVShape.of(target), KVShape.of(draft), trees, prompt, new, budget, 32064)
        assert plans[name].length == prompt + new + tree_room(trees)[0]
        assert plans[name].rows * plans[name].bytes_per_row <= budget
        # A compiled engine's spare pool row (graphs.spare_rows) comes out of the same budget.
        spared = plan_capacity(KVShape.of(target), KVShape.of(draft), trees, prompt, new, budget, 32064,
                               spare_rows=1)
        kv_row = (spared.length * KVShape.of(target).bytes_per_token
                  + (prompt + new + tree_room(trees)[1]) * KVShape.of(draft).bytes_per_token)
        assert spared.rows * spared.bytes_per_row + kv_row <= budget
        assert plans[name].rows - 1 <= spared.rows <= plans[name].rows
    assert plans["7b"].rows >= 128, plans["7b"].describe()
    assert 60 <= plans["13b"].rows < 128, plans["13b"].describe()    # 13B at batch 128 does not fit
    print(plans["7b"].describe(), "|", plans["13b"].describe())
