"""The in-place KV cache (decoding/cache.py): SlotLayer's operations equal the concatenating
reference they replace, and a step writes into the preallocated buffer instead of copying it."""

import torch

from decoding.cache import HOLE, SlotCache, SlotLayer
from decoding.models import prefill
from decoding.testing import make_tiny_llava


def kv(b, s, seed, h=2, d=4):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, h, s, d, generator=g), torch.randn(b, h, s, d, generator=g)


def test_update_appends_in_place_and_grows_geometrically():
    layer = SlotLayer()
    k0, v0 = kv(3, 5, 0)
    keys, values = layer.update(k0, v0)
    assert torch.equal(keys, k0) and torch.equal(values, v0) and layer.capacity == 5
    layer.reserve(20)
    ptr = layer._k.data_ptr()
    ref_k, ref_v = k0, v0
    for step in range(1, 6):                     # 5 + 3 * 5 = 20 slots: no reallocation
        k, v = kv(3, 3, step)
        keys, values = layer.update(k, v)
        ref_k, ref_v = torch.cat([ref_k, k], 2), torch.cat([ref_v, v], 2)
        assert torch.equal(keys, ref_k) and torch.equal(values, ref_v)
    assert layer._k.data_ptr() == ptr and layer.length == 20
    layer.update(*kv(3, 1, 9))                     # past capacity: grows, keeps the contents
    assert layer.capacity == 20 + SlotLayer.MIN_GROWTH and torch.equal(layer.keys[:, :, :20], ref_k)


def test_keep_tail_truncate_and_selects_match_the_reference():
    layer = SlotLayer()
    k, v = kv(2, 10, 1)
    layer.update(k, v)
    layer.reserve(16)
    index = torch.tensor([[0, 3, 5], [0, 1, 1]])          # relative to slot 4; duplicates allowed
    layer.keep_tail(4, index)
    expect = torch.cat([k[:, :, :4], k[:, :, 4:].gather(2, index.view(2, 1, 3, 1).expand(2, 2, 3, 4))], 2)
    assert layer.length == 7 and torch.equal(layer.keys, expect)
    layer.truncate(5)
    assert torch.equal(layer.keys, expect[:, :, :5])
    layer.select_rows(torch.tensor([1]))
    assert torch.equal(layer.keys, expect[1:, :, :5])
    layer.select_slots(torch.tensor([0, 2, 4]))
    assert torch.equal(layer.keys, expect[1:, :, [0, 2, 4]])


def test_merge_left_pads_with_zeros_and_keeps_spare_room():
    a, b = SlotLayer(), SlotLayer()
    ka, va = kv(2, 6, 2)
    kb, vb = kv(1, 3, 3)
    a.update(ka, va)
    a.reserve(10)
    b.update(kb, vb)
    a.merge(b, 6)
    assert a.length == 6 and a.capacity == 10 and a._k.shape[0] == 3
    assert torch.equal(a.keys[:2], ka) and torch.equal(a.values[:2], va)
    assert torch.equal(a.keys[2:, :, 3:], kb) and torch.equal(a.values[2:, :, 3:], vb)
    assert not a.keys[2:, :, :3].any() and not a.values[2:, :, :3].any()


def test_a_verify_step_writes_into_the_reserved_buffer():
    """prefill builds a SlotCache with spare room; a forward and the roll-forward copy nothing."""
    from decoding.models import forward_block

    model = make_tiny_llava(seed=0, image_token_id=95)
    ids = torch.randint(3, 90, (2, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    state, _ = prefill(model, ids, mask, None, spare=8)
    assert isinstance(state.cache, SlotCache) and all(isinstance(layer, SlotLayer) for layer in state.cache.layers)
    assert {layer.capacity for layer in state.cache.layers} == {7 + 8}
    ptrs = [layer._k.data_ptr() for layer in state.cache.layers]
    tokens = torch.randint(3, 90, (2, 3))
    positions = state.lengths[:, None] + torch.tensor([0, 1, 1])
    vis = torch.tensor([[1, 0, 0], [1, 1, 0], [1, 0, 1]], dtype=torch.bool).expand(2, 3, 3)
    with torch.no_grad():
        forward_block(model, state, tokens, positions, vis, torch.ones(2, 3, dtype=torch.bool))
    state.commit_tail(torch.tensor([[0, 2], [0, 1]]), torch.tensor([[True, True], [True, False]]))
    assert [layer._k.data_ptr() for layer in state.cache.layers] == ptrs
    assert state.slot_pos.shape[1] == 9 and all(layer.length == 9 for layer in state.cache.layers)
    assert state.slot_pos[1, -1] == HOLE and state.lengths.tolist() == [9, 6]


def test_rows_joining_reserve_a_bounded_room():
    """The engine preallocates room for the tokens to come and one tree, bounded by the nodes a
    tree can have (the budget calibration decodes with max_nodes=10**6)."""
    from decoding import SpeculativeDecoder, TreeConfig
    from decoding.engine import RESERVE_TOKENS

    target, draft = make_tiny_llava(seed=0, image_token_id=95), make_tiny_llava(seed=1, image_token_id=95)
    tree = TreeConfig(max_nodes=10 ** 6, max_depth=3)
    engine = SpeculativeDecoder(target, draft, tree).engine(max_new_tokens=10 ** 6, eos_token_id=[])
    ids = torch.randint(3, 90, (2, 7), generator=torch.Generator().manual_seed(0))
    engine.add(ids, torch.ones_like(ids), None)
    capacity = {layer.capacity for layer in engine._tgt.cache.layers}
    assert capacity == {7 + RESERVE_TOKENS + tree.max_candidates + 1}
