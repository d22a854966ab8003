"""Shared helpers for decoder tests: random LLaVA batches and the target's own greedy reference."""
from __future__ import annotations

import torch

from decoding.models import image_tokens_per_image
from decoding.stats import cut_after_eos


def random_batch(model, batch: int, lengths: list[int] | None = None, seed: int = 0,
                 with_image: bool = True, pad_id: int = 0):
    """Left-padded input_ids/attention_mask with one expanded image per row, plus pixel_values.

    lengths: text tokens per row (image tokens come on top); rows differ -> real left padding.
    """
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    lengths = lengths or [int(torch.randint(1, 12, (1,), generator=g)) for _ in range(batch)]
    n_img = image_tokens_per_image(model) if with_image else 0
    vocab_top = cfg.image_token_id  # text tokens below the image token id
    rows = []
    for n in lengths:
        text = torch.randint(3, vocab_top, (n,), generator=g)
        split = int(torch.randint(0, n + 1, (1,), generator=g))
        image = torch.full((n_img,), cfg.image_token_id)
        rows.append(torch.cat([torch.tensor([1]), text[:split], image, text[split:]]))
    T = max(len(r) for r in rows)
    ids = torch.full((batch, T), pad_id, dtype=torch.long)
    mask = torch.zeros(batch, T, dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, T - len(r):] = r
        mask[b, T - len(r):] = 1
    pixels = None
    if with_image:
        v = cfg.vision_config
        pixels = torch.randn(batch, v.num_channels, v.image_size, v.image_size, generator=g)
    return ids, mask, pixels


def target_greedy(model, ids, mask, pixels, max_new_tokens: int, eos: int | list[int] | None,
                  image_sizes=None) -> list[list[int]]:
    """The target's own `generate(do_sample=False)`, cut after the first EOS (EOS kept); eos None = no EOS.
    image_sizes: [N, 2] for any-resolution targets (NeXT, OneVision)."""
    kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                  eos_token_id=eos, pad_token_id=0)
    if pixels is not None:
        kwargs["pixel_values"] = pixels.to(next(model.parameters()).dtype)
    if image_sizes is not None:
        kwargs["image_sizes"] = image_sizes
    with torch.no_grad():
        out = model.generate(**kwargs)[:, ids.shape[1]:].tolist()
    eos_set = set() if eos is None else ({eos} if isinstance(eos, int) else set(eos))
    return cut_after_eos(out, eos_set)


def perturbed_copy(model, scale: float, seed: int):
    """A draft for tests: a copy of `model` whose text-model weights get Gaussian noise of `scale`
    times each tensor's std (close to the target: long accepted paths with real rejections)."""
    import copy

    draft = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in draft.model.language_model.parameters():
            p.add_(scale * p.std() * torch.randn(p.shape, generator=g))
    return draft
