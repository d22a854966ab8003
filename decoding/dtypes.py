"""The one vocabulary of dtype names (every --dtype flag, CaptionConfig.dtype, load_model), torch-free:
torch's spelling, with the short forms accepted as aliases; `auto` lets the device decide."""
from __future__ import annotations

DTYPE_NAMES = ("float32", "bfloat16", "float16")
DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
AUTO = "auto"  # bfloat16 on CUDA, float32 elsewhere


def canonical_dtype(name: str) -> str:
    """"auto" or one of DTYPE_NAMES, from any accepted spelling; ValueError for anything else."""
    name = DTYPE_ALIASES.get(name, name)
    if name != AUTO and name not in DTYPE_NAMES:
        raise ValueError(f"unknown dtype {name!r}; use one of auto, {', '.join(DTYPE_NAMES)} "
                         f"(or {', '.join(DTYPE_ALIASES)})")
    return name
