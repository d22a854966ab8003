"""The lean draft forward (decoding/lean.py) gives the transformers forward's logits and cache."""

import pytest
import torch

from decoding.lean import supports_lean
from decoding.models import forward_block, prefill
from decoding.testing import make_tiny_llava


@pytest.mark.parametrize("text,kv,window", [("llama", None, None), ("mistral", 2, None), ("qwen2", 2, None),
                                            ("mistral", 2, 5)])
def test_lean_matches_transformers(text, kv, window):
    extra = {"sliding_window": window} if window else {}
    model = make_tiny_llava(seed=0, text=text, num_kv_heads=kv, image_token_id=95, **extra)
    assert supports_lean(model)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 90, (3, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    results = []
    for lean in (False, True):
        state, _ = prefill(model, ids, mask, None)
        q = 5
        tokens = torch.randint(3, 90, (3, q), generator=torch.Generator().manual_seed(1))
        positions = state.lengths[:, None] + torch.tensor([0, 1, 1, 2, 3])
        vis = torch.tensor([[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 0, 1, 0, 0], [1, 1, 0, 1, 0], [1, 1, 0, 1, 1]],
                           dtype=torch.bool).expand(3, q, q)
        with torch.no_grad():
            logits = forward_block(model, state, tokens, positions, vis, torch.ones(3, q, dtype=torch.bool), lean=lean)
        results.append((logits, [layer.keys.clone() for layer in state.cache.layers], state.slot_pos.clone()))
    (hf, hf_keys, hf_pos), (lean_logits, lean_keys, lean_pos) = results
    torch.testing.assert_close(lean_logits, hf, rtol=1e-5, atol=1e-5)
    for a, b in zip(hf_keys, lean_keys):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert torch.equal(hf_pos, lean_pos)


@pytest.mark.parametrize("text,kv", [("llama", None), ("qwen2", 2)])
def test_target_verifies_lean_only_when_bit_identical(text, kv, monkeypatch):
    """The decoder verifies with the lean forward when its probe finds it bit-identical to
    transformers'; a forward that differs in the last bit (negative control) keeps transformers."""
    import decoding.lean
    import decoding.models
    from decoding import SpeculativeDecoder
    from decoding.models import lean_is_exact

    target = make_tiny_llava(seed=0, text=text, num_kv_heads=kv, image_token_id=95)
    draft = make_tiny_llava(seed=1, text=text, num_kv_heads=kv, image_token_id=95)
    assert lean_is_exact(target)
    assert SpeculativeDecoder(target, draft).lean_target

    original = decoding.lean.lean_forward

    def off_by_an_ulp(*args, **kwargs):
        logits = original(*args, **kwargs)
        return torch.nextafter(logits, torch.full_like(logits, float("inf")))

    monkeypatch.setattr(decoding.models, "lean_forward", off_by_an_ulp)
    assert not lean_is_exact(target)
    assert not SpeculativeDecoder(target, draft).lean_target
