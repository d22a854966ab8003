"""Offline draft-vs-target agreement statistics and per-token decode cost.

Contract
- `agreement(target, draft, sequences, prompt_len, pixel_values)` teacher-forces the target's own
  greedy captions through the draft. Because greedy verification accepts a draft token only while
  every earlier token equals the target's, the draft's prediction at each accepted position is
  conditioned on exactly this prefix, so the statistics equal what a greedy chain decoder sees:
  * `top1`: fraction of caption positions where draft argmax == target token;
  * `top3`: fraction where the target token is in the draft's top 3 (what a width-3 tree can catch);
  * `tau[k]`: mean tokens per target forward of a greedy chain of depth k (accepted + 1 bonus).
- `decode_ms(model, input_ids, pixel_values)` is the median latency of one cached decode step
  (batch 1, one new token) after a prefill: the per-token cost a decoder pays.
"""
from __future__ import annotations

import statistics
import time

import torch


def chain_tau(matches: list[bool], depth: int) -> float:
    """Tokens per target forward for a greedy chain of `depth` drafted tokens over one sequence.

    matches[i] says whether the draft's argmax at caption position i equals the target token.
    """
    pos = forwards = 0
    while pos < len(matches):
        run = 0
        while run < depth and pos + run < len(matches) and matches[pos + run]:
            run += 1
        pos += run + 1  # accepted tokens + the target's bonus token
        forwards += 1
    return len(matches) / max(forwards, 1)


@torch.no_grad()
def agreement(target, draft, sequences: list[list[int]], prompt_len: int, pixel_values: torch.Tensor,
              pad_id: int, depths: tuple[int, ...] = (1, 2, 4, 8), batch_size: int = 32) -> dict:
    """sequences: prompt + target greedy caption (+ EOS) per image; pixel_values [N, 3, H, W], or
    None for a text-only draft (then the sequences' prompts are its prompts, without image tokens)."""
    top1 = top3 = total = 0
    per_row: list[list[bool]] = []
    device = next(draft.parameters()).device
    for i in range(0, len(sequences), batch_size):
        rows = sequences[i:i + batch_size]
        T = max(len(r) for r in rows)
        ids = torch.full((len(rows), T), pad_id, dtype=torch.long)  # [B, T] right padded
        mask = torch.zeros_like(ids)
        for b, r in enumerate(rows):
            ids[b, :len(r)] = torch.tensor(r)
            mask[b, :len(r)] = 1
        vision = {} if pixel_values is None else {
            "pixel_values": pixel_values[i:i + batch_size].to(device, next(draft.parameters()).dtype)}
        logits = draft(input_ids=ids.to(device), attention_mask=mask.to(device), **vision).logits
        top = logits.topk(3, dim=-1).indices.cpu()  # [B, T, 3]
        for b, r in enumerate(rows):
            n = len(r) - prompt_len  # caption tokens; the logit at t predicts token t + 1
            pred = top[b, prompt_len - 1:prompt_len - 1 + n]  # [n, 3]
            truth = torch.tensor(r[prompt_len:])  # [n]
            hit1 = (pred[:, 0] == truth).tolist()
            per_row.append(hit1)
            top1 += sum(hit1)
            top3 += int((pred == truth[:, None]).any(-1).sum())
            total += n
    del target  # the target's tokens are the sequences themselves (greedy); kept for a clear call site
    taus = {k: statistics.fmean(chain_tau(m, k) for m in per_row) for k in depths}
    return {"positions": total, "top1": top1 / max(total, 1), "top3": top3 / max(total, 1),
            "tau": {str(k): round(v, 3) for k, v in taus.items()},
            "mean_caption_tokens": total / max(len(per_row), 1)}


@torch.no_grad()
def decode_ms(model, input_ids: torch.Tensor, pixel_values: torch.Tensor | None, steps: int = 40,
              warmup: int = 5) -> float:
    """Median ms of one batch-1 cached decode step; input_ids [1, T], pixel_values [1, 3, H, W]
    (None: a text-only model)."""
    from transformers import DynamicCache

    from decoding.models import text_config

    text = text_config(model)
    cache = DynamicCache(config=text)
    vision = {} if pixel_values is None else {"pixel_values": pixel_values}
    out = model(input_ids=input_ids, cache=cache, use_cache=True, **vision)
    token = out.logits[:, -1:].argmax(-1)  # [1, 1]
    times = []
    for i in range(warmup + steps):
        start = time.perf_counter()
        out = model(input_ids=token, cache=out.past_key_values, use_cache=True)
        token = out.logits[:, -1:].argmax(-1)
        if i >= warmup:
            times.append(time.perf_counter() - start)
        if input_ids.shape[1] + i + 2 >= text.max_position_embeddings:
            break
    return 1000 * statistics.median(times)
