"""Train the demo target LLaVA from scratch on synthetic caption shards (teacher forcing).

    python -m training.train_demo --data runs/data/train --eval-data runs/data/heldout \
        --output assets/demo-pair/target --work-dir runs/train_demo --steps 900

Contract
- Builds the processor and the ~16M-parameter LLaMA target of training/demo_model.py.
  Stage 1 (--vision-steps): the CLIP tower is pretrained on the scene attributes (see
  training/vision_pretrain.py for why). Stage 2 (--steps): every weight is trained with AdamW on caption
  tokens only (the tower at --vision-lr-scale of the learning rate).
- Batches are a pure function of (seed, step), so a run killed at any point and restarted with the
  same arguments resumes from `<work-dir>/checkpoint` (safetensors + JSON) and makes the same model.
- At the end: greedy captions on held-out images are scored (attribute accuracy), and the model
  (in --save-dtype), processor, `train_log.json` (loss curve) and `eval.json` go to --output.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from decoding.dtypes import DTYPE_NAMES, canonical_dtype
from training.schedule import warmup_cosine


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="training shards (dir or s3:// URI)")
    p.add_argument("--eval-data", required=True, help="held-out shards")
    p.add_argument("--output", required=True)
    p.add_argument("--work-dir", default="runs/train_demo", help="checkpoints live here")
    p.add_argument("--steps", type=int, default=900)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-train-images", type=int, default=None)
    p.add_argument("--eval-every", type=int, default=150)
    p.add_argument("--eval-images", type=int, default=96, help="images for the periodic evals")
    p.add_argument("--final-eval-images", type=int, default=500)
    p.add_argument("--checkpoint-every", type=int, default=50)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--save-dtype", type=canonical_dtype, choices=list(DTYPE_NAMES), default="float16")
    p.add_argument("--device", default="cpu")
    p.add_argument("--vision-steps", type=int, default=2000, help="stage 1: attribute pretraining of the tower")
    p.add_argument("--vision-lr", type=float, default=1.5e-3)
    p.add_argument("--vision-batch-size", type=int, default=128)
    p.add_argument("--vision-lr-scale", type=float, default=0.1,
                   help="stage 2 learning rate of the vision tower, as a fraction of --lr")
    p.add_argument("--text-size", default=None, metavar="HIDDEN,LAYERS,INTERMEDIATE,HEADS",
                   help="override the text model size (e.g. 128,2,384,2 for a fast vision warm-up stage)")
    return p.parse_args(argv)


def lr_at(step: int, args) -> float:
    """Linear warmup, then cosine decay to 10% of --lr at --steps."""
    return warmup_cosine(step, peak=args.lr, total=args.steps, warmup=args.warmup, floor=0.1)


def load_split(processor, path: str, limit: int | None):
    from training import demo_model, synthetic

    table = synthetic.read_rows(path, limit=limit)
    pixels = demo_model.encode_images(processor, table.column("image").to_pylist())  # [N, 3, H, W]
    truths = table.drop_columns(["image"]).to_pylist()
    return pixels, truths


def pretrain_tower(model, pixels, truths, eval_pixels, eval_truths, args, work: Path) -> dict:
    """Stage 1 (training/vision_pretrain.py), cached in <work-dir>/vision.safetensors + vision.json."""
    from safetensors.torch import load_file, save_file

    from training.vision_pretrain import pretrain_vision

    tower = model.model.vision_tower
    weights, report = work / "vision.safetensors", work / "vision.json"
    if weights.exists() and report.exists():
        tower.load_state_dict(load_file(str(weights)))
        print(f"vision stage: reused {weights}", flush=True)
        return json.loads(report.read_text())
    if args.vision_steps <= 0:
        return {}
    start = time.time()
    result = pretrain_vision(tower, pixels, truths, eval_pixels, eval_truths, steps=args.vision_steps,
                             batch_size=args.vision_batch_size, lr=args.vision_lr, seed=args.seed,
                             layer=model.config.vision_feature_layer)
    result["seconds"] = round(time.time() - start, 1)
    work.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tower.state_dict().items()}, str(weights))
    report.write_text(json.dumps(result))
    print(f"vision stage: held-out attribute accuracy {result['heldout_accuracy']} ({result['seconds']}s)", flush=True)
    return result


def main(argv=None) -> int:
    from tqdm import tqdm

    from training import checkpoint, demo_model, synthetic

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    work = Path(args.work_dir)
    processor = demo_model.build_processor()
    t0 = time.time()
    pixels, truths = load_split(processor, args.data, args.max_train_images)
    captions = demo_model.encode_captions(processor.tokenizer, [t["caption"] for t in truths])
    eval_pixels, eval_truths = load_split(processor, args.eval_data, args.final_eval_images)
    prompts = [demo_model.prompt_ids(processor, p) for p in synthetic.PROMPTS]
    print(f"data: {len(captions)} train / {len(eval_truths)} held-out images ({time.time() - t0:.0f}s)", flush=True)

    if args.text_size:
        hidden, layers, intermediate, heads = map(int, args.text_size.split(","))
        config = demo_model.llava_config(hidden=hidden, layers=layers, intermediate=intermediate, heads=heads)
    else:
        config = demo_model.target_config()
    model = demo_model.build_model(config, seed=args.seed).to(device)
    print(f"target: {demo_model.text_parameters(model) / 1e6:.2f}M text parameters, "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M in all", flush=True)
    vision_report = pretrain_tower(model, pixels, truths, eval_pixels, eval_truths, args, work)
    tower = set(id(p) for p in model.model.vision_tower.parameters())
    groups = [{"params": [p for p in model.parameters() if id(p) not in tower], "scale": 1.0},
              {"params": list(model.model.vision_tower.parameters()), "scale": args.vision_lr_scale}]
    optimizer = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95), weight_decay=0.01)
    state = checkpoint.load(work / "checkpoint", model, optimizer) or {"step": 0, "history": [], "evals": [],
                                                                        "train_seconds": 0.0}
    if state["step"]:
        print(f"resumed from {work / 'checkpoint'} at step {state['step']}", flush=True)

    model.train()
    bar = tqdm(range(state["step"], args.steps), initial=state["step"], total=args.steps, desc="train",
               mininterval=5)
    window: list[float] = []
    tick = time.time()
    for step in bar:
        g = torch.Generator().manual_seed(args.seed * 1_000_003 + step)
        idx = torch.randint(len(captions), (args.batch_size,), generator=g).tolist()
        which = torch.randint(len(prompts), (args.batch_size,), generator=g).tolist()
        batch = demo_model.make_batch([prompts[w] for w in which], [captions[i] for i in idx], pixels[idx])
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, args) * group["scale"]
        out = model(input_ids=batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device),
                    pixel_values=batch.pixel_values.to(device), labels=batch.labels.to(device))
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        window.append(out.loss.item())
        done = step + 1
        if done % 10 == 0:
            state["history"].append({"step": done, "loss": round(sum(window) / len(window), 5),
                                     "lr": lr_at(step, args)})
            bar.set_postfix(loss=f"{state['history'][-1]['loss']:.4f}")
            window = []
        if done % args.eval_every == 0 or done == args.steps:
            model.eval()
            n = args.eval_images
            metrics = demo_model.evaluate(model, processor, eval_pixels[:n], eval_truths[:n])
            model.train()
            state["evals"].append({"step": done, "attribute_accuracy": metrics["attribute_accuracy"],
                                   "exact_match": metrics["exact_match"], "images": n})
            print(f"\nstep {done}: attribute accuracy {metrics['attribute_accuracy']:.3f} on {n} held-out "
                  f"images; e.g. {metrics['samples'][0]!r}", flush=True)
        if done % args.checkpoint_every == 0 or done == args.steps:
            tick = checkpoint.save_step(work / "checkpoint", model, optimizer, state, done, tick)
    bar.close()

    model.eval()
    t1 = time.time()
    metrics = demo_model.evaluate(model, processor, eval_pixels, eval_truths)
    metrics["eval_seconds"] = round(time.time() - t1, 1)
    print(json.dumps({k: v for k, v in metrics.items() if k != "samples"}, indent=1), flush=True)
    out_dir = Path(args.output)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.to(getattr(torch, args.save_dtype)).save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    (out_dir / "train_log.json").write_text(json.dumps(
        {"args": vars(args), "train_seconds": round(state["train_seconds"], 1), "history": state["history"],
         "evals": state["evals"], "vision_stage": vision_report}, indent=1))
    (out_dir / "eval.json").write_text(json.dumps(metrics, indent=1))
    print(f"saved {out_dir} ({args.save_dtype}); trained {state['train_seconds'] / 60:.1f} min", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
