"""Stage 1 of the demo target: supervised pretraining of the CLIP vision tower on scene attributes.

Why: trained end to end from scratch through the captioning loss, the tiny ViT's features grew
without bound while the language model learnt to ignore the image (greedy captions collapsed to one
caption for every image; 0.35-0.5 attribute accuracy after hundreds of steps). Real LLaVA starts
from a pretrained CLIP; this stage plays that role cheaply. Linear heads read the feature LLaVA
uses (`hidden_states[vision_feature_layer]`: CLS token and mean of the patch tokens) and classify
count, size, color, shape, background and position (None for several shapes). The heads are
thrown away; only the tower's weights are kept.

Contract: `pretrain_vision(tower, pixels, truths, ...)` trains `tower` in place and returns a
history of (step, loss) and the held-out accuracy per attribute; batches are a pure function of
(seed, step).
"""
from __future__ import annotations


import torch
import torch.nn.functional as F

from training import synthetic
from training.schedule import warmup_cosine

LABELS: dict[str, list] = {
    "count": [1, 2, 3], "size": list(synthetic.SIZES), "color": list(synthetic.COLORS),
    "shape": list(synthetic.SHAPES), "background": list(synthetic.BACKGROUNDS),
    "position": [None, *synthetic.POSITIONS],
}


def label_tensor(truths: list[dict]) -> torch.Tensor:
    """[N, A] class index per attribute (A = len(LABELS))."""
    return torch.tensor([[LABELS[k].index(t[k]) for k in LABELS] for t in truths])


def features(tower, pixel_values: torch.Tensor, layer: int = -1) -> torch.Tensor:
    """[B, 2 * D]: CLS token and mean patch token of hidden_states[layer]."""
    hidden = tower(pixel_values, output_hidden_states=True).hidden_states[layer]  # [B, 1 + P, D]
    return torch.cat([hidden[:, 0], hidden[:, 1:].mean(1)], -1)


def pretrain_vision(tower, pixels: torch.Tensor, truths: list[dict], eval_pixels: torch.Tensor,
                    eval_truths: list[dict], *, steps: int = 1500, batch_size: int = 128, lr: float = 1e-3,
                    seed: int = 0, layer: int = -1, progress: bool = True, log_every: int = 50) -> dict:
    """Train `tower` (a CLIPVisionModel) with linear attribute heads; pixels [N, 3, H, W]."""
    from tqdm import tqdm

    labels = label_tensor(truths)  # [N, A]
    dim = tower.config.hidden_size
    torch.manual_seed(seed)
    heads = torch.nn.ModuleList(torch.nn.Linear(2 * dim, len(v)) for v in LABELS.values())
    params = list(tower.parameters()) + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.05)
    tower.train()
    history = []
    window = []
    for step in tqdm(range(steps), desc="vision", disable=not progress, mininterval=5):
        for group in opt.param_groups:  # warmup over 50 steps; cosine over the whole run
            group["lr"] = warmup_cosine(step, peak=lr, total=steps, warmup=50, floor=0.05, decay_start=0)
        g = torch.Generator().manual_seed(seed * 7_919 + step)
        idx = torch.randint(len(pixels), (batch_size,), generator=g)
        feats = features(tower, pixels[idx], layer)  # [B, 2D]
        loss = sum(F.cross_entropy(h(feats), labels[idx, a]) for a, h in enumerate(heads))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        window.append(loss.item())
        if (step + 1) % log_every == 0:
            history.append({"step": step + 1, "loss": round(sum(window) / len(window), 5)})
            window = []
    tower.eval()
    with torch.no_grad():
        feats = torch.cat([features(tower, eval_pixels[i:i + 256], layer) for i in range(0, len(eval_pixels), 256)])
        eval_labels = label_tensor(eval_truths)
        accuracy = {k: (h(feats).argmax(-1) == eval_labels[:, a]).float().mean().item()
                    for a, (k, h) in enumerate(zip(LABELS, heads))}
    return {"history": history, "heldout_accuracy": accuracy}
