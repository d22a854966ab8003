"""Load a LLaVA checkpoint safely: safetensors only, never remote code.

A model directory that needs remote code (`auto_map` in config.json) or only ships pickle
weights (`*.bin`, `*.pt`) is refused with a clear error instead of being executed/unpickled.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import LlavaForConditionalGeneration

from .errors import ModelPairError

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; use one of fp32, bf16, fp16")
    return DTYPES[name]


def check_model_dir(path: str | Path) -> Path:
    """Refuse directories that are missing, need remote code, or only hold pickle weights."""
    path = Path(path)
    config = path / "config.json"
    if not config.is_file():
        raise ModelPairError(f"{path}: not a model directory (no config.json)")
    try:
        data = json.loads(config.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelPairError(f"{path}/config.json is unreadable: {exc}") from None
    if "auto_map" in data or any("auto_map" in (v or {}) for v in data.values() if isinstance(v, dict)):
        raise ModelPairError(f"{path}: config.json asks for remote code (auto_map); refusing to run code "
                             "from a model directory")
    if not any(path.glob("*.safetensors")):
        pickles = sorted(p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
        hint = f" (found pickle weights {', '.join(pickles)}; convert them to safetensors)" if pickles else ""
        raise ModelPairError(f"{path}: no *.safetensors weights{hint}")
    return path


def load_llava(path: str | Path, dtype: str | torch.dtype = "fp32", device: str | torch.device = "cpu"):
    """LlavaForConditionalGeneration from a local directory, in eval mode, on `device`."""
    path = check_model_dir(path)
    model = LlavaForConditionalGeneration.from_pretrained(
        path, use_safetensors=True, trust_remote_code=False, dtype=parse_dtype(dtype))
    return model.to(device).eval()
