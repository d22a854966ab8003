"""scripts/half_precision.py: the JSON report of a quick bf16 run with its float32 control, and the
gap scoring that tells a near tie from a bug on hand-made differences."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "half_precision.py"


def load_script():
    spec = importlib.util.spec_from_file_location("half_precision", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quick_bf16_report_and_exact_fp32_control():
    out = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--dtype", "bfloat16", "--images", "4",
                          "--batch-size", "2", "--max-new-tokens", "8", "--control-fp32", "--threads", "1",
                          "--device", "cpu", "--json"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 1, out.stdout[-2000:]   # exactly one JSON object on stdout
    report = json.loads(lines[0])
    assert report["dtype"] == "bfloat16" and report["settings"]["batch_size"] == 2
    for part, dtype in (("half", "bfloat16"), ("control_fp32", "float32")):
        result = report[part]
        assert result["dtype"] == dtype and len(result["reference"]) == 4
        assert set(result["vs_reference"]) == {"generate_batched", "speculative_batch1", "speculative_batched"}
        for method, r in result["vs_reference"].items():
            assert r["batch_size"] == (1 if method == "speculative_batch1" else 2)
            assert r["rows"] == 4 and 0 <= r["rows_differ"] <= 4 and len(r["differences"]) == r["rows_differ"]
            assert 0.0 <= r["rows_differ_fraction"] <= 1.0 and 0.0 <= r["match_rate"] <= 1.0
            for d in r["differences"]:
                assert 0 <= d["position"] < 8
                if "top2_gap" in d:
                    assert d["top2_gap"] >= 0 and d["top2_gap_fp32"] >= 0 and d["rank"] >= 0
            g = r["gaps"]
            assert g["near_ties"] + g["suspects"] == g["scored"] <= r["rows_differ"]
    control = report["control_fp32"]
    assert control["exact"]
    for method in ("speculative_batch1", "speculative_batched"):
        r = control["vs_reference"][method]
        assert r["rows_differ"] == 0 and r["match_rate"] == 1.0
    assert 0.0 <= control["half_reference_vs_fp32_reference"]["match_rate"] <= 1.0


def test_first_difference():
    hp = load_script()
    assert hp.first_difference([1, 2, 3], [1, 2, 3]) is None
    assert hp.first_difference([1, 2, 3], [1, 5, 3]) == 1
    assert hp.first_difference([1, 2, 3], [1, 2]) == 2
    assert hp.near_tie_default(torch.bfloat16) == 0.125


def test_gap_scorer_tells_a_near_tie_from_a_bug():
    """On the reference context the recomputed target picks the reference token (rank 0), so a
    row switched to the runner-up is a near tie under a loose threshold, and a row switched to
    the least likely token is a suspect under any threshold."""
    from jobs.bench import encode, make_inputs, quick_pair

    hp = load_script()
    target, _, processor = quick_pair()
    text, images = make_inputs(processor, 2)
    rows = [encode(processor, text, [image], "cpu", torch.float32) for image in images]
    with torch.no_grad():
        reference = [target.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, max_new_tokens=4,
                                     do_sample=False, eos_token_id=[])[0, ids.shape[1]:].tolist()
                     for ids, mask, pixels in rows]
    prompts = [(ids, pixels) for ids, _, pixels in rows]
    gaps = hp.gap_scorer(target, target, prompts, reference)
    pos = 2
    logits = hp.logits_at(target, prompts[0], reference[0][:pos])
    assert int(logits.argmax()) == reference[0][pos]
    runner_up = int(logits.argsort(descending=True)[1])
    least = int(hp.logits_at(target, prompts[1], reference[1][:1]).argmin())
    got = [list(r) for r in reference]
    got[0][pos], got[1][1] = runner_up, least
    loose = hp.compare(reference, got, gaps, near_tie=1e9)
    first, second = loose["differences"]
    assert (first["row"], first["position"], first["rank"], first["near_tie"]) == (0, pos, 1, True)
    assert first["top2_gap"] == first["top2_gap_fp32"] and first["max_logit_error"] == 0.0
    assert (second["row"], second["position"], second["near_tie"]) == (1, 1, False)
    assert second["rank"] >= 2
    assert loose["gaps"]["near_ties"] == 1 and loose["gaps"]["suspects"] == 1
    assert loose["rows_differ_fraction"] == 1.0 and loose["match_rate"] == 0.75
    strict = hp.compare(reference, got, gaps, near_tie=0.0)
    assert strict["gaps"]["suspects"] == 2
