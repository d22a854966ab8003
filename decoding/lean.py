"""A lean forward of a text model (LLaMA / Mistral / Qwen2, in a LLaVA or alone) over a cache (KVPool or KVState).

For a small draft on CPU, most of a transformers forward is per-layer Python overhead
(decorators, output capture, mask preparation, attention dispatch), not arithmetic. This
forward calls the model's own submodules (embeddings, rotary embedding, projections, norms,
MLPs, lm_head) directly and uses scaled_dot_product_attention with our mask, so the draft costs
what its arithmetic costs. The draft always uses it when supported (draft proposals never
affect what is accepted, only how much). The target's verify uses it only when
`models.lean_is_exact` finds it bit-identical to the transformers forward for that model on a
probe block (same ops in the same order: on the CPU in fp32 it is; a device whose kernels differ
there keeps the transformers forward). tests/decoding/test_lean.py checks both, with a negative
control; the lossless tests run the target through it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .families import adapter


LEAN_TEXT_MODELS = ("llama", "mistral", "qwen2")


def supports_lean(model) -> bool:
    family = adapter(model)
    text, lm = family.text_config(model.config), family.text_model(model)
    return (text.model_type in LEAN_TEXT_MODELS and hasattr(lm, "rotary_emb") and hasattr(lm, "layers")
            and all(hasattr(layer.self_attn, "q_proj") for layer in lm.layers))


def _rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def lean_forward(model, cache, tokens: Tensor, positions: Tensor, mask: Tensor | dict,
                 keep: Tensor | None = None) -> Tensor:
    """Logits [B, Q, V] for tokens [B, Q] at positions [B, Q]; appends Q slots to every cache layer.
    keep: [B] one position per row whose logits are wanted (then [B, 1, V]: the LM head runs on it only).

    mask: [B, 1, Q, S+Q] float (or a dict by layer kind): KVPool.block_mask, KVState.attention_mask.
    """
    family = adapter(model)
    lm = family.text_model(model)
    kinds = getattr(family.text_config(model.config), "layer_types", None)
    h = lm.embed_tokens(tokens)                                             # [B, Q, H]
    cos, sin = lm.rotary_emb(h, positions)
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)                           # [B, 1, Q, d]
    B, Q, _ = h.shape
    layers = cache.layers
    for i, layer in enumerate(lm.layers):
        attn = layer.self_attn
        x = layer.input_layernorm(h)
        q = attn.q_proj(x).view(B, Q, -1, attn.head_dim).transpose(1, 2)   # [B, Hq, Q, d]
        k = attn.k_proj(x).view(B, Q, -1, attn.head_dim).transpose(1, 2)   # [B, Hkv, Q, d]
        v = attn.v_proj(x).view(B, Q, -1, attn.head_dim).transpose(1, 2)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        keys, values = layers[i].update(k, v)                              # in place (kvpool.PoolLayer, cache.SlotLayer)
        m = mask if isinstance(mask, Tensor) else mask[kinds[i] if kinds else "full_attention"]
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=m, scale=attn.scaling,
                                             enable_gqa=q.shape[1] != k.shape[1])
        h = h + attn.o_proj(out.transpose(1, 2).reshape(B, Q, -1))
        h = h + layer.mlp(layer.post_attention_layernorm(h))
    if keep is not None:
        h = h.gather(1, keep.view(B, 1, 1).expand(B, 1, h.shape[-1]))
    return model.lm_head(lm.norm(h))
