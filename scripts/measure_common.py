"""What the demo-pair measurement scripts share: device/dtype/threads options and model loading."""
from __future__ import annotations

import argparse

import torch


def add_measure_args(ap: argparse.ArgumentParser, batch_sizes: str) -> None:
    ap.add_argument("--batch-sizes", default=batch_sizes)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--threads", type=int, default=None)


def setup(args) -> tuple[torch.device, torch.dtype, list[int]]:
    """Apply --threads; return the device, dtype and batch sizes the options name."""
    from decoding.loading import parse_dtype

    if args.threads:
        torch.set_num_threads(args.threads)
    return torch.device(args.device), parse_dtype(args.dtype), [int(b) for b in args.batch_sizes.split(",")]


def load_demo(role: str, device, dtype):
    """The demo pair's target or draft on device, in dtype."""
    from decoding.loading import load_model
    from jobs.common import DEMO_PAIR

    return load_model(str(DEMO_PAIR / role), dtype, device)
