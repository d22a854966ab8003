"""Draft distillation (Spec-LLaVA style): train a small draft LLaVA on a target's own outputs.

`specllava distill` (jobs/distill.py) is the command; this module is the library it calls:

    result = distill(DistillConfig(target=..., output=..., steps=1500), images)

Contract
- The draft reuses the target's vision tower (weights copied, frozen), vision feature settings,
  tokenizer and processor; its projector and LLaMA-style language model (layers, hidden, heads,
  intermediate) are new and trained.
- Teacher data: the target greedily captions each image (prompt); the target's top-k (topk, all
  of a small vocabulary) log-probabilities at every caption position are cached in
  `<work_dir>/teacher.safetensors`. Training minimises KL(target || draft) over those positions.
- Resumable: `<work_dir>/checkpoint` (safetensors + JSON, see training/checkpoint.py); call again
  with the same config to continue. Batches are a pure function of (seed, step).
- The last `heldout_images` images are never trained on; at the end `distill` returns (and
  writes to `<output>/distill_stats.json`) acceptance statistics on them (training/acceptance.py)
  and the draft/target per-token decode cost at batch 1.
- Weights are only read as safetensors; no remote code, no pickle. Problems the caller can fix
  raise `DistillError` with a one-line message.
"""
from __future__ import annotations

import copy
import json
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F


class DistillError(ValueError):
    """A problem the caller can fix (missing target, too few images, bad sizes): one line."""


@dataclass(frozen=True)
class DistillConfig:
    """What `distill` needs; the defaults are the CLI's (see `specllava distill --help`)."""
    target: str                       # target model directory (save_pretrained, safetensors)
    output: str                       # where the draft (and its processor) is saved
    work_dir: str | None = None       # teacher cache + checkpoints (default: OUTPUT-work)
    layers: int = 1
    hidden: int = 128
    heads: int = 2
    intermediate: int | None = None   # MLP width (default 3 * hidden)
    steps: int = 1500
    batch_size: int = 32
    lr: float = 2e-3
    warmup: int = 50
    heldout_images: int = 200
    prompt: str | None = None         # default: the demo's prompt
    max_new_tokens: int = 32
    ignore_eos: bool = False          # teacher captions run to max_new_tokens past EOS (as a throughput bench decodes)
    tie_embeddings: bool = False      # the draft's lm_head is its input embedding matrix (half the bytes)
    embed_init: str = "random"        # "pca": the draft's embeddings start as the target's projected on
                                      # their top `hidden` principal components
    topk: int = 64                    # target log-probs kept per position
    seed: int = 0
    device: str = "cpu"
    teacher_dtype: str = "float32"
    save_dtype: str = "float16"
    threads: int | None = None        # torch CPU threads
    checkpoint_every: int = 100
    quiet: bool = False               # no progress bars
    text_only: bool = False           # a text-only draft (*ForCausalLM): it sees the prompt without image tokens
    images_label: str = ""            # where the images came from (part of the teacher cache key)


def draft_config(target_config, *, layers: int, hidden: int, heads: int, intermediate: int,
                 tie_embeddings: bool = False):
    """The target's LlavaConfig with a smaller text model (same vocab, special ids, vision settings)."""
    if hidden % heads:
        raise ValueError(f"--hidden {hidden} is not divisible by --heads {heads}")
    d = target_config.to_dict()
    d["text_config"].update(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                            num_key_value_heads=heads, intermediate_size=intermediate, head_dim=hidden // heads,
                            tie_word_embeddings=tie_embeddings)
    d["tie_word_embeddings"] = tie_embeddings
    for key in ("layer_types", "sliding_window", "max_window_layers"):
        d["text_config"].pop(key, None)
    return type(target_config).from_dict(d)


def pca_embeddings(weight: torch.Tensor, dim: int) -> torch.Tensor:
    """[V, H] -> [V, dim]: the rows, centred, on their top `dim` principal directions (rescaled to
    the original per-entry spread), a starting point that keeps which tokens are alike."""
    w = weight.detach().float()
    centred = w - w.mean(0, keepdim=True)
    _, _, v = torch.linalg.svd(centred, full_matrices=False)  # v [H, H]
    out = centred @ v[:dim].T  # [V, dim]
    return out * (w.std() / out.std().clamp(min=1e-12))


def build_draft(target, *, layers: int, hidden: int, heads: int, intermediate: int, seed: int = 0,
                tie_embeddings: bool = False, embed_init: str = "random", text_only: bool = False):
    """A new draft whose vision tower is a frozen copy of the target's; text_only: a *ForCausalLM
    of the same text config (no vision at all: it drafts from the prompt's text, families.py)."""
    from decoding.families import adapter, model_class

    if embed_init not in ("random", "pca"):
        raise DistillError(f"--embed-init must be random or pca, got {embed_init!r}")
    torch.manual_seed(seed)
    config = draft_config(target.config, layers=layers, hidden=hidden, heads=heads, intermediate=intermediate,
                          tie_embeddings=tie_embeddings)
    if text_only:
        config = config.text_config
    draft = model_class(config)(config).float()
    lm, target_lm = adapter(draft).text_model(draft), adapter(target).text_model(target)
    if embed_init == "pca":
        emb = pca_embeddings(target_lm.embed_tokens.weight, hidden)
        with torch.no_grad():
            lm.embed_tokens.weight.copy_(emb)
            if not tie_embeddings:
                draft.lm_head.weight.copy_(emb)
    if tie_embeddings:
        draft.lm_head.weight = lm.embed_tokens.weight
    if not text_only:
        draft.model.vision_tower.load_state_dict(target.model.vision_tower.state_dict())
        draft.model.vision_tower.requires_grad_(False)
    draft.generation_config = copy.deepcopy(target.generation_config)
    return draft


def _encode(processor, images: list[bytes]) -> torch.Tensor:
    from training.demo_model import encode_images
    return encode_images(processor, images)  # [N, 3, H, W]


@torch.no_grad()
def teacher_data(target, processor, images: list[bytes], prompt_ids: list[int], *, max_new_tokens: int,
                 topk: int, pad_id: int, eos_id: int, batch_size: int = 32, progress: bool = True,
                 ignore_eos: bool = False) -> dict:
    """Greedy target captions and the target's top-k log-probs at each caption position.

    Returns captions [N, C] (padded with -1; C = max caption length incl. EOS),
    topk_logprobs [N, C, K] float32 and topk_ids [N, C, K] int64. The log-probs are the logits
    `generate` computed for each new token (no second pass over the captions). With `ignore_eos`
    every caption is max_new_tokens long: EOS is decoded like any other token.
    """
    from tqdm import tqdm

    device, dtype = next(target.parameters()).device, next(target.parameters()).dtype
    P, K = len(prompt_ids), min(topk, target.config.text_config.vocab_size)
    caps, lps, idxs = [], [], []
    for i in tqdm(range(0, len(images), batch_size), desc="teacher", disable=not progress, mininterval=5):
        pix = _encode(processor, images[i:i + batch_size]).to(device, dtype)  # [B, 3, H, W]
        ids = torch.tensor([prompt_ids] * len(pix), device=device)  # [B, P]
        out = target.generate(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pix,
                              do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=[] if ignore_eos else eos_id,
                              pad_token_id=pad_id, return_dict_in_generate=True, output_logits=True)
        gen = out.sequences[:, P:].tolist()
        rows = gen if ignore_eos else [g[:g.index(eos_id) + 1] if eos_id in g else g for g in gen]
        logp = torch.stack(out.logits, 1).float().log_softmax(-1)  # [B, C, V]: step j's logits predict caption[j]
        del out
        top = logp.topk(K, dim=-1)
        for b, r in enumerate(rows):
            caps.append(r)
        lps.append(top.values.cpu())
        idxs.append(top.indices.cpu())
    C = max(len(r) for r in caps)
    captions = torch.full((len(caps), C), -1, dtype=torch.long)
    for n, r in enumerate(caps):
        captions[n, :len(r)] = torch.tensor(r)
    pad3 = lambda t: F.pad(t, (0, 0, 0, C - t.shape[1]))  # noqa: E731 - pad the C axis
    return {"captions": captions, "topk_logprobs": torch.cat([pad3(t) for t in lps]),
            "topk_ids": torch.cat([pad3(t) for t in idxs])}


def kl_loss(draft_logits: torch.Tensor, topk_logprobs: torch.Tensor, topk_ids: torch.Tensor,
            valid: torch.Tensor) -> torch.Tensor:
    """KL(p || q) over the target's top-k support (renormalised), mean over valid positions.

    draft_logits [B, C, V]; topk_logprobs, topk_ids [B, C, K]; valid [B, C] bool.
    """
    logq = draft_logits.float().log_softmax(-1).gather(-1, topk_ids)  # [B, C, K]
    logp = topk_logprobs - topk_logprobs.logsumexp(-1, keepdim=True)  # [B, C, K]
    kl = (logp.exp() * (logp - logq)).sum(-1)  # [B, C]
    return (kl * valid).sum() / valid.sum().clamp(min=1)


def draft_logits_at_captions(draft, prompt_ids: list[int], captions: torch.Tensor, pixel_values: torch.Tensor | None,
                             pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Draft logits predicting each caption token: captions [B, C] (-1 padded) -> ([B, C, V], valid [B, C]).
    pixel_values None: a text-only draft (prompt_ids are then its prompt, without image tokens)."""
    P, (B, C) = len(prompt_ids), captions.shape
    valid = captions >= 0  # [B, C]
    ids = torch.cat([torch.tensor(prompt_ids).expand(B, P), captions.clamp(min=0)], 1)  # [B, P + C]
    ids = torch.where(torch.cat([torch.ones(B, P, dtype=torch.bool), valid], 1), ids, pad_id)
    mask = torch.cat([torch.ones(B, P, dtype=torch.long), valid.long()], 1)  # right padding
    device = next(draft.parameters()).device
    vision = {} if pixel_values is None else {"pixel_values": pixel_values.to(device)}
    logits = draft(input_ids=ids.to(device), attention_mask=mask.to(device), **vision).logits  # [B, P + C, V]
    return logits[:, P - 1:P - 1 + C], valid.to(device)


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def check_target(path: str) -> None:
    """DistillError unless `path` looks like a save_pretrained model directory."""
    if not (Path(path) / "config.json").exists():
        raise DistillError(f"--target {path} has no config.json (expected a save_pretrained directory)")


def distill(cfg: DistillConfig, images: list[bytes]) -> dict:
    """Distil a draft from `cfg.target` on `images` (encoded image bytes); returns the statistics
    written to `<output>/distill_stats.json`. Raises DistillError for problems the caller can fix."""
    from safetensors.torch import load_file, save_file
    from tqdm import tqdm
    from transformers import AutoProcessor

    from decoding import ModelPairError
    from decoding.loading import load_model
    from training import acceptance, checkpoint, demo_model
    from training.schedule import optimizer_step, warmup_cosine

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    check_target(cfg.target)
    if cfg.steps < 1 or cfg.batch_size < 1 or cfg.heldout_images < 0:
        raise DistillError("--steps and --batch-size must be >= 1, --heldout-images >= 0")
    device = torch.device(cfg.device)
    work = Path(cfg.work_dir or f"{cfg.output.rstrip('/')}-work")
    work.mkdir(parents=True, exist_ok=True)
    try:   # safetensors only; refuses remote code and pickle-only dirs
        target = load_model(cfg.target, getattr(torch, cfg.teacher_dtype), device)
    except ModelPairError as exc:
        raise DistillError(str(exc)) from None
    processor = AutoProcessor.from_pretrained(cfg.target)
    tok = processor.tokenizer
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
    eos_id = tok.eos_token_id
    if len(images) <= cfg.heldout_images:
        raise DistillError(f"--images has {len(images)} rows, not more than --heldout-images {cfg.heldout_images}")
    train_images, heldout_images = images[:len(images) - cfg.heldout_images], images[len(images) - cfg.heldout_images:]
    prompt_ids = demo_model.prompt_ids(processor, cfg.prompt or demo_model.DEFAULT_PROMPT)

    # 1. Teacher data (cached; the meta must match to be reused).
    meta = {"target": str(Path(cfg.target).resolve()), "images": cfg.images_label, "n": len(train_images),
            "prompt_ids": prompt_ids, "topk": cfg.topk, "max_new_tokens": cfg.max_new_tokens,
            "ignore_eos": cfg.ignore_eos}
    cache_path, meta_path = work / "teacher.safetensors", work / "teacher.json"
    if cache_path.exists() and meta_path.exists() and json.loads(meta_path.read_text()) == meta:
        teacher = load_file(str(cache_path))
        _log(f"teacher cache: {cache_path}")
    else:
        t0 = time.time()
        teacher = teacher_data(target, processor, train_images, prompt_ids, max_new_tokens=cfg.max_new_tokens,
                               topk=cfg.topk, pad_id=pad_id, eos_id=eos_id, progress=not cfg.quiet,
                               ignore_eos=cfg.ignore_eos)
        save_file(teacher, str(cache_path))
        meta_path.write_text(json.dumps(meta))
        _log(f"teacher: {len(train_images)} captions + top-{cfg.topk} log-probs in {time.time() - t0:.0f}s")

    # 2. Draft and optimizer (+ resume).
    draft = build_draft(target, layers=cfg.layers, hidden=cfg.hidden, heads=cfg.heads,
                        intermediate=cfg.intermediate or 3 * cfg.hidden, seed=cfg.seed,
                        tie_embeddings=cfg.tie_embeddings, embed_init=cfg.embed_init,
                        text_only=cfg.text_only).to(device)
    # What the draft sees: a text-only draft gets the prompt without its image tokens, and no pixels.
    image_id = target.config.image_token_id
    draft_prompt = [t for t in prompt_ids if t != image_id] if cfg.text_only else prompt_ids

    def draft_pixels(pix):
        return None if cfg.text_only else pix

    trainable = [p for p in draft.parameters() if p.requires_grad]
    n_text = demo_model.text_parameters(draft)
    _log(f"draft: {n_text / 1e6:.2f}M text parameters, {sum(p.numel() for p in trainable) / 1e6:.2f}M trainable")
    optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.0)
    state = checkpoint.load(work / "checkpoint", draft, optimizer) or {"step": 0, "history": [], "train_seconds": 0.0}
    if state["step"]:
        _log(f"resumed from {work / 'checkpoint'} at step {state['step']}")

    # 3. Train: KL(target || draft) on the target's captions.
    draft.train()
    if not cfg.text_only:
        draft.model.vision_tower.eval()
    tick, window = time.time(), []
    bar = tqdm(range(state["step"], cfg.steps), initial=state["step"], total=cfg.steps, desc="distill",
               disable=cfg.quiet, mininterval=5)
    for step in bar:
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
        idx = torch.randint(len(train_images), (cfg.batch_size,), generator=g)
        pix = _encode(processor, [train_images[i] for i in idx.tolist()])  # [B, 3, H, W]
        logits, valid = draft_logits_at_captions(draft, draft_prompt, teacher["captions"][idx], draft_pixels(pix),
                                                 pad_id)
        loss = kl_loss(logits, teacher["topk_logprobs"][idx].to(device), teacher["topk_ids"][idx].to(device), valid)
        window.append(optimizer_step(optimizer, trainable, loss,
                                     warmup_cosine(step, peak=cfg.lr, total=cfg.steps, warmup=cfg.warmup, floor=0.05)))
        done = step + 1
        if done % 10 == 0 or done == cfg.steps:
            state["history"].append({"step": done, "kl": round(sum(window) / len(window), 5)})
            bar.set_postfix(kl=f"{state['history'][-1]['kl']:.4f}")
            window = []
        if done % cfg.checkpoint_every == 0 or done == cfg.steps:
            tick = checkpoint.save_step(work / "checkpoint", draft, optimizer, state, done, tick)
    bar.close()
    draft.eval()

    # 4. Save, then measure on held-out images.
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    copy.deepcopy(draft).to(getattr(torch, cfg.save_dtype)).save_pretrained(out)
    (processor.tokenizer if cfg.text_only else processor).save_pretrained(out)
    stats = {"draft_kind": "text-only" if cfg.text_only else "llava","steps": state["step"], "train_seconds": round(state["train_seconds"], 1),
             "draft_text_parameters": n_text, "history": state["history"]}
    if heldout_images:
        held = teacher_data(target, processor, heldout_images, prompt_ids, max_new_tokens=cfg.max_new_tokens,
                            topk=cfg.topk, pad_id=pad_id, eos_id=eos_id, progress=False, ignore_eos=cfg.ignore_eos)
        pix = _encode(processor, heldout_images)
        with torch.no_grad():
            logits, valid = draft_logits_at_captions(draft, draft_prompt, held["captions"], draft_pixels(pix), pad_id)
            stats["heldout_kl"] = kl_loss(logits, held["topk_logprobs"].to(device), held["topk_ids"].to(device),
                                          valid).item()
        seqs = [draft_prompt + [t for t in row if t >= 0] for row in held["captions"].tolist()]
        stats["acceptance"] = acceptance.agreement(target, draft, seqs, len(draft_prompt), draft_pixels(pix), pad_id)
        stats["heldout_images"] = len(heldout_images)
        one = torch.tensor([prompt_ids], device=device)
        dt = next(target.parameters()).dtype
        # Interleaved repeats, median of each: one run alone is noisy on a shared CPU.
        runs = [(acceptance.decode_ms(target, one, pix[:1].to(device, dt), steps=100),
                 acceptance.decode_ms(draft, torch.tensor([draft_prompt], device=device),
                                      None if cfg.text_only else pix[:1].to(device), steps=100)) for _ in range(3)]
        t_ms, d_ms = (statistics.median(x) for x in zip(*runs))
        stats["decode_ms"] = {"target": round(t_ms, 3), "draft": round(d_ms, 3), "ratio": round(d_ms / t_ms, 4),
                              "device": str(device), "threads": torch.get_num_threads()}
    (out / "distill_stats.json").write_text(json.dumps(stats, indent=1))
    return stats
