"""The prefill's in-place KV cache (decoding/cache.py): SlotLayer appends equal the concatenating
reference, written into the preallocated buffer. The engine's pool: test_kvpool.py."""

import torch

from decoding.cache import SlotLayer


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
