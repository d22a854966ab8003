"""GPU check: the demo-pair bench (bf16 and fp32, batch 1/8/32/64, with the budget table), the share
of a decode step that is not model compute (scripts/decode_breakdown.py), and target verify
latency on a LLaVA-1.5-7B-shaped model (transformers forward, and the lean one when it is
bit-identical there), and the prefill share of plain generate (scripts/prefill_share.py).

    python scripts/gpu_check.py --out gpu_check.json             # on a machine with one NVIDIA GPU
    python scripts/gpu_check.py --shape tiny --device cpu --out /tmp/g.json   # CPU smoke run

The 7B-shaped target has random weights (no download): CLIP ViT-L/14-336 vision tower
(576 image tokens) + a LLaMA-7B text model (4096 hidden, 32 layers, 32 heads, 11008 MLP,
vocab 32064). Verify latency is one forward of n tree tokens over a 600-token cached prefix,
for n = 1..128, at batch 1 and 8. Everything measured is written to one JSON file.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from decoding.budget import forward_latency  # noqa: E402
from decoding.models import lean_is_exact  # noqa: E402

SIZES = (1, 2, 4, 8, 16, 32, 48, 64, 96, 128)


def llava_7b_config(shape: str):
    from transformers import CLIPVisionConfig, LlavaConfig
    if shape == "7b":
        vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                  num_attention_heads=16, image_size=336, patch_size=14, projection_dim=768)
        text = dict(model_type="llama", vocab_size=32064, hidden_size=4096, intermediate_size=11008,
                    num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                    max_position_embeddings=4096)
    else:
        vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=2, image_size=28, patch_size=14, projection_dim=32)
        text = dict(model_type="llama", vocab_size=320, hidden_size=64, intermediate_size=128,
                    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=4096)
    return LlavaConfig(vision_config=vision.to_dict(), text_config=text, image_token_id=32000 if shape == "7b" else 300,
                       vision_feature_select_strategy="default", vision_feature_layer=-2)


def random_model(config, device, dtype):
    from transformers import LlavaForConditionalGeneration
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(config)
    model = model.to_empty(device=device).to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    return model.eval()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="gpu_check.json")
    ap.add_argument("--shape", choices=["7b", "tiny"], default="7b")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--skip-bench", action="store_true")
    args = ap.parse_args()
    report: dict = {"device": args.device, "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
    if args.device.startswith("cuda"):
        report["gpu"] = torch.cuda.get_device_name(0)
    report["torch"] = torch.__version__

    if not args.skip_bench:
        from jobs.cli import main as cli
        sizes = "1,2" if args.shape == "tiny" else "1,8,32,64"
        for dtype in ("bf16", "fp32"):   # bf16: the speed users get; fp32: match rate must be 1.0
            buf = io.StringIO()
            bench_args = ["bench", "--json", "--dtype", dtype, "--device", args.device, "--chart", "",
                          "--methods", "target_greedy,dynamic_tree", "--batch-sizes", sizes, "--rounds", "2"]
            if args.shape == "tiny":
                bench_args.append("--quick")
            with contextlib.redirect_stdout(buf):
                rc = cli(bench_args)
            report[f"bench_{dtype}"] = json.loads(buf.getvalue()) if rc == 0 else {"error": f"exit code {rc}"}
        import subprocess
        out = subprocess.run([sys.executable, str(Path(__file__).parent / "decode_breakdown.py"), "--device",
                              args.device, "--dtype", "bfloat16", "--batch-sizes", sizes, "--steps", "6"],
                             capture_output=True, text=True)
        report["step_breakdown_bf16"] = (json.loads(out.stdout.strip().splitlines()[-1]) if out.returncode == 0
                                         else {"error": out.stderr[-2000:]})
        # prefill share of plain generate (the Amdahl bound) and the cost of a Q-token verify vs Q steps
        out = subprocess.run([sys.executable, str(Path(__file__).parent / "prefill_share.py"), "--device",
                              args.device, "--dtype", "bfloat16", "--batch-sizes", sizes],
                             capture_output=True, text=True)
        report["prefill_share_bf16"] = (json.loads(out.stdout.strip().splitlines()[-1]) if out.returncode == 0
                                        else {"error": out.stderr[-2000:]})

    t0 = time.perf_counter()
    model = random_model(llava_7b_config(args.shape), args.device, torch.bfloat16)
    report["model_init_s"] = round(time.perf_counter() - t0, 1)
    report["params_b"] = round(sum(p.numel() for p in model.parameters()) / 1e9, 3)
    # would the decoder verify this target with the lean forward (bit-identical on this device)?
    report["lean_target_exact"] = lean_is_exact(model)
    report["verify_latency_ms"] = {}
    for lean in (False, True) if report["lean_target_exact"] else (False,):
        for batch in (1, 8):
            lat = forward_latency(model, sizes=SIZES, prefix_len=600, batch=batch, repeats=5, lean=lean)
            key = f"batch{batch}" + ("_lean" if lean else "")
            report["verify_latency_ms"][key] = {str(n): round(s * 1e3, 3) for n, s in lat.items()}
            print(f"{key}: " + ", ".join(f"{n}:{s * 1e3:.1f}ms" for n, s in lat.items()), file=sys.stderr)
    report["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
