"""Training checkpoints without pickle: safetensors for tensors, JSON for everything else.

Contract
- `save(directory, model, optimizer, state)` writes `model.safetensors`, `optimizer.safetensors`
  and `state.json` (written last, via a temp file and rename: a checkpoint is complete iff its
  state.json exists and names the files' step).
- `load(directory, model, optimizer)` restores them in place and returns the state dict, or None
  when there is no complete checkpoint. Only safetensors/JSON are read, never pickle.
- Supports optimizers whose per-parameter state is tensors (AdamW: step, exp_avg, exp_avg_sq).
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def _atomic_save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    tmp = path.with_name("." + path.name + ".tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp))
    os.replace(tmp, path)


def save(directory: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    _atomic_save_tensors(trainable, directory / "model.safetensors")
    opt = optimizer.state_dict()
    tensors = {f"{i}.{k}": (v if torch.is_tensor(v) else torch.tensor(v))
               for i, s in opt["state"].items() for k, v in s.items()}
    _atomic_save_tensors(tensors, directory / "optimizer.safetensors")
    groups = [{k: v for k, v in g.items()} for g in opt["param_groups"]]
    payload = dict(state, param_groups=groups, trainable=sorted(trainable))
    tmp = directory / ".state.json.tmp"
    tmp.write_text(json.dumps(payload, indent=1))
    os.replace(tmp, directory / "state.json")


def save_step(directory: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict,
              step: int, tick: float) -> float:
    """Save a training checkpoint at `step`, adding the time since `tick` to state["train_seconds"].

    Returns the new tick (now), so callers time only training between checkpoints.
    """
    now = time.time()
    state["train_seconds"] += now - tick
    state["step"] = step
    save(directory, model, optimizer, state)
    return now


def load(directory: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict | None:
    directory = Path(directory)
    if not (directory / "state.json").exists():
        return None
    payload = json.loads((directory / "state.json").read_text())
    weights = load_file(str(directory / "model.safetensors"))
    missing = set(payload["trainable"]) - set(weights)
    if missing:
        raise ValueError(f"checkpoint {directory} lacks {sorted(missing)[:3]}")
    result = model.load_state_dict(weights, strict=False)
    if result.unexpected_keys:
        raise ValueError(f"checkpoint {directory} does not match the model: {result.unexpected_keys[:3]}")
    flat = load_file(str(directory / "optimizer.safetensors"))
    opt_state: dict[int, dict] = {}
    for key, value in flat.items():
        index, name = key.split(".", 1)
        opt_state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": opt_state, "param_groups": payload.pop("param_groups")})
    payload.pop("trainable")
    return payload
