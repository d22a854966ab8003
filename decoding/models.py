"""Model-facing helpers: pair checks, prefill (with shared image features) and masked forwards.

This is the only module that calls the models. Dimensions: B rows, T prompt tokens, Q query
tokens of one forward, V vocabulary.
"""
from __future__ import annotations

import torch
from torch import Tensor
from transformers.modeling_outputs import BaseModelOutputWithPooling

from .cache import HOLE, KVState, SlotCache
from .errors import InputError, ModelPairError
from .families import SUPPORTED_TEXT_MODELS, LlavaFamily, adapter  # noqa: F401 (SUPPORTED_TEXT_MODELS re-exported)
from .lean import lean_forward, supports_lean

# Draft and target vocabularies may differ by embedding padding (e.g. 32000 vs 32064);
# anything larger means different tokenizers.
MAX_VOCAB_PADDING = 256


def text_config(model):
    return adapter(model).text_config(model.config)


def vocab_size(model) -> int:
    return model.get_output_embeddings().weight.shape[0]


def model_device(model) -> torch.device:
    return next(model.parameters()).device


def model_dtype(model) -> torch.dtype:
    return next(model.parameters()).dtype


def sliding_window(model) -> tuple[int | None, tuple[str, ...] | None]:
    """(window, per-layer kinds) of the text model; window None when attention is full everywhere.

    HF's sliding mask lets a query see keys whose distance is < window.
    """
    cfg = text_config(model)
    window = getattr(cfg, "sliding_window", None)
    if cfg.model_type == "qwen2" and not getattr(cfg, "use_sliding_window", False):
        window = None
    if window is None:
        return None, None
    kinds = getattr(cfg, "layer_types", None)
    if kinds and "full_attention" in kinds:
        return int(window), tuple(kinds)
    return int(window), None


def image_tokens_per_image(model_or_config) -> int:
    """Tokens one image expands to (llava-1.5 kind; for any-resolution families an upper bound)."""
    config = getattr(model_or_config, "config", model_or_config)
    return adapter(config).max_image_tokens(config)


def check_pair_configs(target_config, draft_config) -> None:
    """Raise ModelPairError when two configs cannot decode together (no weights needed: the
    pipeline runs this on config.json files before it starts any actor). The target is a LLaVA of
    a supported family (families.py); the draft is of the same family or a text-only model."""
    families = {}
    for role, config in (("target", target_config), ("draft", draft_config)):
        families[role] = adapter(config)
        families[role].check_config(config, role)
    tf, df = families["target"], families["draft"]
    if not tf.multimodal:
        raise ModelPairError(f"target is a text-only {target_config.model_type!r} model; the target must be a "
                             "LLaVA (llava, llava_next or llava_onevision)")
    if df.multimodal and df is not tf:
        raise ModelPairError(f"draft is a {df.class_name} but the target a {tf.class_name}: a draft must be of "
                             "the target's family (same image tokens) or a text-only model")
    t_text, d_text = tf.text_config(target_config), df.text_config(draft_config)
    vt, vd = t_text.vocab_size, d_text.vocab_size
    if abs(vt - vd) > MAX_VOCAB_PADDING:
        raise ModelPairError(f"target vocabulary ({vt}) and draft vocabulary ({vd}) differ by more than "
                             "embedding padding: the draft must share the target's tokenizer")
    if df.multimodal and tf.image_token_id(target_config) != df.image_token_id(draft_config):
        raise ModelPairError(f"image token id differs (target {tf.image_token_id(target_config)}, draft "
                             f"{df.image_token_id(draft_config)}): the draft must share the target's tokenizer")
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        t, d = getattr(t_text, name, None), getattr(d_text, name, None)
        if name == "pad_token_id" and not df.multimodal:
            continue   # a text draft never sees padding (its prompt is built unpadded per row)
        if t is not None and d is not None and t != d:
            raise ModelPairError(f"{name} differs (target {t}, draft {d}): the draft must share the "
                                 "target's tokenizer")
    if df.multimodal:
        ts, ds = tf.vision_signature(target_config), df.vision_signature(draft_config)
        if ts != ds:
            diff = ", ".join(f"{k} {ts[k]!r} vs {ds[k]!r}" for k in ts if ts[k] != ds.get(k))
            raise ModelPairError(f"target and draft expand images differently ({diff}); the draft must use "
                                 "the same vision input settings as the target, or be a text-only model")


def check_tokenizers(target_tokenizer, draft_tokenizer, text_draft: bool = False) -> None:
    """Raise ModelPairError unless both tokenizers map every token, special ones included, to
    the same id: a draft proposing ids that mean other words to the target accepts nothing
    useful at best and, with another special-token layout, stops or pads at the wrong place.

    text_draft: the draft is a text-only model; its vocabulary may be a prefix of the target's
    (a LLaVA adds its image token, sometimes a pad token): every draft token must have the
    target's id, and bos/eos/unk must agree."""
    tv, dv = target_tokenizer.get_vocab(), draft_tokenizer.get_vocab()
    if text_draft:
        wrong = sorted((tok for tok, i in dv.items() if tv.get(tok) != i), key=lambda t: dv[t])
        if wrong:
            token = wrong[0]
            raise ModelPairError(f"the text draft's tokenizer is not a prefix of the target's ({len(wrong)} of its "
                                 f"{len(dv)} tokens differ; e.g. {token!r} is id {tv.get(token)} in the target, "
                                 f"{dv[token]} in the draft): the draft must share the target's tokenizer")
        for name in ("bos_token_id", "eos_token_id", "unk_token_id"):
            t, d = getattr(target_tokenizer, name, None), getattr(draft_tokenizer, name, None)
            if t != d:
                raise ModelPairError(f"special token {name} differs (target {t}, draft {d}): the draft must "
                                     "share the target's tokenizer")
        return
    if tv != dv:
        diff = sorted(set(tv.items()) ^ set(dv.items()), key=lambda kv: (kv[1], kv[0]))
        token = diff[0][0]
        raise ModelPairError(f"the draft's tokenizer differs from the target's ({len(tv)} vs {len(dv)} tokens; "
                             f"e.g. {token!r} is id {tv.get(token)} in the target, {dv.get(token)} in the "
                             "draft): the draft must share the target's tokenizer")
    for name in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id"):
        t, d = getattr(target_tokenizer, name, None), getattr(draft_tokenizer, name, None)
        if t != d:
            raise ModelPairError(f"special token {name} differs (target {t}, draft {d}): the draft must "
                                 "share the target's tokenizer")
    ts, ds = sorted(target_tokenizer.all_special_ids), sorted(draft_tokenizer.all_special_ids)
    if ts != ds:
        raise ModelPairError(f"special tokens differ (target ids {ts}, draft ids {ds}): the draft must share "
                             "the target's tokenizer")


def check_pair(target, draft) -> None:
    """Raise ModelPairError when target and draft cannot decode together."""
    check_pair_configs(target.config, draft.config)
    for role, model in (("target", target), ("draft", draft)):
        attn = getattr(text_config(model), "_attn_implementation", None) or "sdpa"
        if attn not in ("sdpa", "eager"):
            raise ModelPairError(f"{role} uses attn_implementation={attn!r}; tree verification needs a "
                                 "custom 4D mask: load with attn_implementation='sdpa' or 'eager'")
        if model.training:
            raise ModelPairError(f"{role} is in training mode; call .eval() first")
    if model_device(target) != model_device(draft):
        raise ModelPairError(f"target is on {model_device(target)} but draft is on {model_device(draft)}; "
                             "move both to the same device")
    vt, vd = vocab_size(target), vocab_size(draft)
    if abs(vt - vd) > MAX_VOCAB_PADDING:
        raise ModelPairError(f"target vocabulary ({vt}) and draft vocabulary ({vd}) differ by more than "
                             "embedding padding: the draft must share the target's tokenizer")


def shares_vision_tower(target, draft) -> bool:
    """True when the draft's vision tower is the target's (same module or identical weights)
    and both select the same features, so image features can be computed once. Only for llava-1.5
    pairs (the other families pack features per image size inside their own forward)."""
    if not (isinstance(adapter(target), LlavaFamily) and adapter(draft) is adapter(target)):
        return False
    if (target.config.vision_feature_layer != draft.config.vision_feature_layer
            or target.config.vision_feature_select_strategy != draft.config.vision_feature_select_strategy):
        return False
    tv, dv = target.model.vision_tower, draft.model.vision_tower
    if tv is dv:
        return True
    t_state, d_state = tv.state_dict(), dv.state_dict()
    if t_state.keys() != d_state.keys():
        return False
    return all(t_state[k].shape == d_state[k].shape and t_state[k].dtype == d_state[k].dtype
               and (t_state[k].data_ptr() == d_state[k].data_ptr() or torch.equal(t_state[k], d_state[k]))
               for k in t_state)


def vision_hidden_states(model, pixel_values: Tensor) -> tuple[Tensor, ...]:
    """Hidden states of the vision tower, computed once and shared when the towers are identical."""
    tower = model.model.vision_tower
    pixel_values = pixel_values.to(model_device(model), model_dtype(model))
    return tower(pixel_values, output_hidden_states=True, return_dict=True).hidden_states


def project_image_features(model, hidden_states: tuple[Tensor, ...]) -> dict:
    """`mm_encoder_outputs` for LlavaModel.forward, from shared vision hidden states
    (same selection and projection as LlavaModel.get_image_features)."""
    layer = model.config.vision_feature_layer
    layers = [layer] if isinstance(layer, int) else list(layer)
    selected = [hidden_states[i] for i in layers]
    if model.config.vision_feature_select_strategy == "default":
        selected = [h[:, 1:] for h in selected]
    features = selected[0] if len(selected) == 1 else torch.cat(selected, dim=-1)
    features = model.model.multi_modal_projector(features.to(model_dtype(model)))
    return {"image": BaseModelOutputWithPooling(pooler_output=list(features))}


def prefill(model, input_ids: Tensor, attention_mask: Tensor, pixel_values: Tensor | None,
            mm_encoder_outputs: dict | None = None, spare: int = 0,
            image_sizes: Tensor | None = None) -> tuple[KVState, Tensor]:
    """One forward over the prompt, exactly as `generate` does it (2D mask, positions from the
    mask; images as the model's family takes them, families.py). The cache keeps `spare` free
    slots per layer after the prompt (cache.SlotLayer). Returns the cache state and the logits at
    the last position, [B, V]."""
    positions = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)
    if mm_encoder_outputs is not None:
        kwargs = {"mm_encoder_outputs": mm_encoder_outputs}
    else:
        kwargs = adapter(model).vision_kwargs(pixel_values, image_sizes, model_dtype(model))
    cache = SlotCache(spare)
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions,
                cache=cache, use_cache=True, logits_to_keep=1, **kwargs)
    window, kinds = sliding_window(model)
    state = KVState(cache, positions.masked_fill(attention_mask == 0, HOLE), window=window, layer_kinds=kinds)
    return state, out.logits[:, -1, :]


def forward_block(model, state: KVState, tokens: Tensor, positions: Tensor, extra_vis: Tensor,
                  query_valid: Tensor, lean: bool = False) -> Tensor:
    """Forward Q tokens per row over the cache with an explicit visibility pattern.

    tokens, positions, query_valid: [B, Q]; extra_vis: [B, Q, S - committed + Q] bool (see
    KVState.attention_mask). Appends Q slots to the cache. Returns logits [B, Q, V].
    lean=True uses decoding/lean.py instead of the transformers forward (the draft always when
    supported; the target only when `lean_is_exact` holds for it).
    """
    vmax = model.get_input_embeddings().weight.shape[0]
    tokens = torch.where(tokens < vmax, tokens, torch.zeros_like(tokens))  # padded-vocab ids the model lacks
    mask = state.attention_mask(positions, extra_vis, model_dtype(model))
    logits = model_forward(model, state.cache, tokens, positions, mask, lean)
    state.appended(positions, query_valid)
    return logits


def model_forward(model, cache, tokens: Tensor, positions: Tensor, mask, lean: bool,
                  keep: Tensor | None = None) -> Tensor:
    """The one place a step calls a model (profiling.StepProfiler hooks it): logits [B, Q, V], or
    [B, 1, V] at position keep[b] of each row when `keep` ([B] long) is given."""
    if lean:
        return lean_forward(model, cache, tokens, positions, mask, keep)
    logits = model(input_ids=tokens, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True).logits
    if keep is not None:
        logits = logits.gather(1, keep.view(-1, 1, 1).expand(-1, 1, logits.shape[-1]))
    return logits


@torch.no_grad()
def lean_is_exact(model) -> bool:
    """True when the lean forward (lean.py) gives this model's transformers forward's logits and
    cache bit for bit on a probe: two rows (one left-padded), a tree-shaped block of 3 tokens.

    The decoder verifies with the lean forward only then (it skips transformers' per-layer
    overhead); a difference on the probe (another device, dtype or kernel choice) keeps the
    transformers forward. The probe is one shape: it shows both paths run the same ops, not
    every shape; the lossless tests (fp32, token for token against `generate`) run with it."""
    if not supports_lean(model):
        return False
    device = model_device(model)
    vocab = min(vocab_size(model), model.get_input_embeddings().weight.shape[0])
    g = torch.Generator().manual_seed(0)

    def ids(shape):
        t = torch.randint(0, vocab, shape, generator=g)
        image = adapter(model).image_token_id(model.config)
        return (t if image is None else t.masked_fill(t == image, 0)).to(device)

    prompt, tokens = ids((2, 6)), ids((2, 3))
    mask = torch.ones_like(prompt)
    mask[1, :2] = 0
    vis = torch.tensor([[1, 0, 0], [1, 1, 0], [1, 0, 1]], dtype=torch.bool, device=device).expand(2, 3, 3)
    valid = torch.ones(2, 3, dtype=torch.bool, device=device)
    results = []
    for lean in (False, True):
        state, _ = prefill(model, prompt, mask, None)
        positions = state.lengths.unsqueeze(1) + torch.tensor([0, 1, 1], device=device)
        logits = forward_block(model, state, tokens, positions, vis, valid, lean=lean)
        results.append((logits, [(layer.keys, layer.values) for layer in state.cache.layers]))
    (hf, hf_cache), (lean_logits, lean_cache) = results
    return torch.equal(hf, lean_logits) and all(torch.equal(a, c) and torch.equal(b, d)
                                                for (a, b), (c, d) in zip(hf_cache, lean_cache))


def validate_inputs(target, input_ids: Tensor, attention_mask: Tensor, pixel_values: Tensor | None,
                    image_sizes: Tensor | None = None) -> Tensor:
    """Raise InputError for malformed generate() inputs; return each row's image tokens, [B]."""
    if not isinstance(input_ids, Tensor) or input_ids.dim() != 2:
        raise InputError(f"input_ids must be a 2D tensor [B, T], got {getattr(input_ids, 'shape', type(input_ids))}")
    if input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
        raise InputError(f"input_ids is empty: shape {tuple(input_ids.shape)}")
    if input_ids.dtype not in (torch.long, torch.int32, torch.int64):
        raise InputError(f"input_ids must hold integer token ids, got {input_ids.dtype}")
    if not isinstance(attention_mask, Tensor) or attention_mask.shape != input_ids.shape:
        raise InputError(f"attention_mask must have the shape of input_ids {tuple(input_ids.shape)}, got "
                         f"{tuple(getattr(attention_mask, 'shape', ()))}")
    mask = attention_mask.bool()
    if not bool(mask[:, -1].all()):
        raise InputError("input_ids must be left-padded (the processor with padding_side='left'): "
                         "some rows end with padding")
    if bool((mask[:, 1:].long() < mask[:, :-1].long()).any()):
        raise InputError("attention_mask has holes: each row must be left padding followed by tokens")
    family = adapter(target)
    n_tokens = ((input_ids == family.image_token_id(target.config)) & mask).sum(-1)  # [B]
    if pixel_values is None:
        if bool((n_tokens > 0).any()):
            raise InputError("input_ids contain image tokens but pixel_values is None")
        return n_tokens
    family.check_images(target.config, n_tokens, pixel_values, image_sizes)
    return n_tokens
