"""Load a checkpoint safely: safetensors only, never remote code.

The class comes from config.json's model_type (families.model_class: the LLaVA families and the
text-only drafts), never from an Auto* class that could pick remote code.

A model directory that needs remote code (`auto_map` in config.json) or only ships pickle
weights (`*.bin`, `*.pt`) is refused with a clear error instead of being executed/unpickled.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from .dtypes import AUTO, DTYPE_NAMES, canonical_dtype
from .errors import ModelPairError

DTYPES = {name: getattr(torch, name) for name in DTYPE_NAMES}  # names: decoding/dtypes.py


def parse_dtype(name: str | torch.dtype, device: str | torch.device | None = None) -> torch.dtype:
    """A torch dtype from a name; "auto" is bfloat16 on a CUDA `device` (what llava-1.5 runs in),
    float32 otherwise. An explicit name always wins."""
    if isinstance(name, torch.dtype):
        return name
    name = canonical_dtype(name)
    if name == AUTO:
        return torch.bfloat16 if device is not None and torch.device(device).type == "cuda" else torch.float32
    return DTYPES[name]


# JSON files transformers reads from a model directory; any of them can ask for remote code.
CONFIG_FILES = ("config.json", "generation_config.json", "tokenizer_config.json", "processor_config.json",
                "preprocessor_config.json", "image_processor_config.json")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


def _asks_for_remote_code(data) -> bool:
    """True when a config (or a sub-config one level down, e.g. text_config) has an auto_map."""
    if not isinstance(data, dict):
        return False
    return "auto_map" in data or any(isinstance(v, dict) and "auto_map" in v for v in data.values())


def check_no_remote_code(path: str | Path, where: str | None = None) -> None:
    """Refuse a directory whose config, tokenizer or processor files name remote code (auto_map).

    `where` names the directory in messages (e.g. the s3:// prefix a local copy came from).
    """
    path = Path(path)
    where = where or str(path)
    for name in CONFIG_FILES:
        file = path / name
        if not file.is_file():
            continue
        try:
            data = json.loads(file.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ModelPairError(f"{where}/{name} is unreadable: {exc}") from None
        if _asks_for_remote_code(data):
            raise ModelPairError(f"{where}: {name} asks for remote code (auto_map); refusing to run code "
                                 "from a model directory")


def check_weight_files(names: list[str], where: str) -> None:
    """Refuse a file listing with no *.safetensors weights (pickles are never unpickled)."""
    if not any(n.endswith(".safetensors") for n in names):
        pickles = sorted(n for n in names if n.endswith(PICKLE_SUFFIXES))
        hint = f" (found pickle weights {', '.join(pickles)}; convert them to safetensors)" if pickles else ""
        raise ModelPairError(f"{where}: no *.safetensors weights{hint}")


def check_model_dir(path: str | Path) -> Path:
    """Refuse directories that are missing, need remote code, or only hold pickle weights."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise ModelPairError(f"{path}: not a model directory (no config.json)")
    check_no_remote_code(path)
    check_weight_files([p.name for p in path.iterdir()], str(path))
    return path


def weights_device_map(device: str | torch.device) -> dict:
    """The `device_map` that puts the whole model on `device`: {"": device}. A CUDA device without
    an index means the current one (what `.to("cuda")` means; transformers would read "cuda" as
    cuda:$LOCAL_RANK)."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return {"": device}


def load_model(path: str | Path, dtype: str | torch.dtype = "float32", device: str | torch.device = "cpu"):
    """A LLaVA (llava, llava_next, llava_onevision) or a text-only draft (llama, mistral, qwen2)
    from a local directory, in eval mode, on `device`.

    The weights go straight to `device` in `dtype`: transformers builds the model on the meta
    device and reads the safetensors tensor by tensor onto the `device_map` (needs `accelerate`),
    so no full copy of the model is ever held in host memory and nothing is moved afterwards.
    """
    from transformers import AutoConfig

    from .families import model_class

    path = check_model_dir(path)
    # Safe: check_model_dir refused any auto_map, and remote code stays off.
    config = AutoConfig.from_pretrained(path, trust_remote_code=False)
    model = model_class(config).from_pretrained(
        path, use_safetensors=True, trust_remote_code=False, dtype=parse_dtype(dtype, device),
        device_map=weights_device_map(device))
    return model.eval()
