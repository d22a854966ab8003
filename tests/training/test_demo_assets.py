"""Demo tokenizer/processor, draft distillation on a tiny random target, and the shipped demo pair."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from training import demo_model, synthetic
from jobs.cli import main
from tests import REPO_ROOT

DEMO = REPO_ROOT / "assets" / "demo-pair"


@pytest.fixture(scope="module")
def processor():
    return demo_model.build_processor()


def test_processor_round_trip(tmp_path, processor):
    from transformers import AutoProcessor

    processor.save_pretrained(tmp_path)
    loaded = AutoProcessor.from_pretrained(tmp_path)
    assert type(loaded).__name__ == "LlavaProcessor" and loaded.tokenizer.padding_side == "left"
    text = "there are three small purple diamonds on a striped background"
    ids = loaded.tokenizer(text, add_special_tokens=False)["input_ids"]
    assert demo_model.UNK_ID not in ids and len(ids) == len(text.split())
    assert loaded.tokenizer.decode(ids) == text
    prompt = demo_model.prompt_ids(loaded)
    assert prompt == demo_model.prompt_ids(processor)
    assert prompt[0] == demo_model.BOS_ID and prompt.count(demo_model.IMAGE_ID) == demo_model.IMAGE_TOKENS
    assert loaded.tokenizer.decode(prompt[-2:]) == "assistant :"


def test_make_batch_masks_the_prompt():
    batch = demo_model.make_batch([[1, 5, 6], [1, 5]], [[7, 2], [8, 9, 2]], torch.zeros(2, 3, 64, 64))
    assert batch.input_ids.tolist() == [[1, 5, 6, 7, 2], [1, 5, 8, 9, 2]]
    assert batch.labels.tolist() == [[-100, -100, -100, 7, 2], [-100, -100, 8, 9, 2]]


def _tiny_target(path: Path, processor) -> None:
    config = demo_model.llava_config(hidden=64, layers=2, intermediate=128, heads=2)
    config.text_config.initializer_range = 0.1  # peaked target distributions, far from the draft's
    model = demo_model.build_model(config, seed=0)
    model.save_pretrained(path)
    processor.save_pretrained(path)


def test_distill_reduces_kl_and_resumes(tmp_path, processor, capsys):
    _tiny_target(tmp_path / "target", processor)
    synthetic.write_shards(40, 20, str(tmp_path / "images"), seed=5)
    args = ["distill", "--target", str(tmp_path / "target"), "--images", str(tmp_path / "images"),
            "--output", str(tmp_path / "draft"), "--heldout-images", "8", "--batch-size", "8",
            "--hidden", "32", "--heads", "2", "--lr", "3e-3", "--warmup", "5", "--max-new-tokens", "8",
            "--checkpoint-every", "15", "--device", "cpu", "--quiet"]
    assert main(args + ["--steps", "30"]) == 0
    first = json.loads((tmp_path / "draft" / "distill_stats.json").read_text())
    kl = [h["kl"] for h in first["history"]]
    assert kl[-1] < 0.7 * kl[0], kl
    assert 0 <= first["acceptance"]["top1"] <= 1 and first["acceptance"]["tau"]["4"] >= 1
    assert first["decode_ms"]["draft"] > 0
    capsys.readouterr()
    assert main(args + ["--steps", "35"]) == 0  # resumes from the step-30 checkpoint, reuses teacher cache
    err = capsys.readouterr().err
    assert "resumed from" in err and "teacher cache" in err
    second = json.loads((tmp_path / "draft" / "distill_stats.json").read_text())
    assert second["history"][:len(first["history"])] == first["history"] and second["steps"] == 35

    from transformers import LlavaForConditionalGeneration
    target = LlavaForConditionalGeneration.from_pretrained(tmp_path / "target", use_safetensors=True)
    draft = LlavaForConditionalGeneration.from_pretrained(tmp_path / "draft", use_safetensors=True)
    for (name, a), b in zip(target.model.vision_tower.state_dict().items(),
                            draft.model.vision_tower.state_dict().values()):
        assert torch.equal(a.half().float(), b.float()), name  # the draft's vision tower is the target's


def test_distill_text_only_draft_trains_and_decodes_losslessly(tmp_path, processor):
    """`distill --text-only`: a LlamaForCausalLM draft (no vision) trained on the target's captions
    from the prompt's text alone; it loads with load_model, passes the pair checks (its tokenizer
    is the target's) and decodes exactly the target's greedy captions."""
    from transformers import AutoTokenizer

    from decoding import SpeculativeDecoder
    from decoding.loading import load_model
    from decoding.models import check_tokenizers
    from tests.helpers import target_greedy

    _tiny_target(tmp_path / "target", processor)
    synthetic.write_shards(24, 12, str(tmp_path / "images"), seed=6)
    assert main(["distill", "--target", str(tmp_path / "target"), "--images", str(tmp_path / "images"),
                 "--output", str(tmp_path / "draft"), "--heldout-images", "6", "--batch-size", "8", "--hidden", "32",
                 "--heads", "2", "--lr", "3e-3", "--warmup", "5", "--max-new-tokens", "8", "--steps", "30",
                 "--device", "cpu", "--quiet", "--text-only"]) == 0
    stats = json.loads((tmp_path / "draft" / "distill_stats.json").read_text())
    kl = [h["kl"] for h in stats["history"]]
    assert stats["draft_kind"] == "text-only" and kl[-1] < 0.8 * kl[0], kl
    target, draft = load_model(tmp_path / "target"), load_model(tmp_path / "draft", "float32")
    assert type(draft).__name__ == "LlamaForCausalLM" and not hasattr(draft.model, "vision_tower")
    check_tokenizers(processor.tokenizer, AutoTokenizer.from_pretrained(tmp_path / "draft"), text_draft=True)
    ids = torch.tensor([demo_model.prompt_ids(processor)] * 3)
    mask = torch.ones_like(ids)
    pixels = torch.randn(3, 3, target.config.vision_config.image_size, target.config.vision_config.image_size)
    result = SpeculativeDecoder(target, draft).generate(ids, mask, pixels, max_new_tokens=10, eos_token_id=[])
    assert result.sequences == target_greedy(target, ids, mask, pixels, 10, None)


def test_distill_user_errors(tmp_path, capsys):
    assert main(["distill", "--target", str(tmp_path / "nope"), "--images", str(tmp_path),
                 "--output", str(tmp_path / "d")]) == 2
    assert "config.json" in capsys.readouterr().err


@pytest.mark.skipif(not (DEMO / "target" / "model.safetensors").exists(), reason="demo pair not built")
def test_demo_pair_loads_offline_and_captions(monkeypatch):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    proc = AutoProcessor.from_pretrained(DEMO / "target", local_files_only=True)
    target = LlavaForConditionalGeneration.from_pretrained(
        DEMO / "target", use_safetensors=True, local_files_only=True, dtype=torch.float32).eval()
    draft = LlavaForConditionalGeneration.from_pretrained(
        DEMO / "draft", use_safetensors=True, local_files_only=True, dtype=torch.float32).eval()
    assert demo_model.text_parameters(target) >= 15_000_000
    assert draft.config.text_config.vocab_size == target.config.text_config.vocab_size
    rows = [synthetic.make_example(1, i) for i in range(900, 916)]  # the held-out seed
    pixels = demo_model.encode_images(proc, [r["image"] for r in rows])
    metrics = demo_model.evaluate(target, proc, pixels, rows)
    assert metrics["attribute_accuracy"] >= 0.8, metrics
    assert all(synthetic.parse_caption(s)["shape"] for s in metrics["samples"]), metrics["samples"]
    draft_metrics = demo_model.evaluate(draft, proc, pixels[:4], rows[:4])
    assert draft_metrics["mean_caption_tokens"] > 3  # the draft writes captions of its own too


def test_vision_pretraining_reduces_loss(processor):
    from training.vision_pretrain import label_tensor, pretrain_vision

    rows = [synthetic.make_example(2, i) for i in range(48)]
    pixels = demo_model.encode_images(processor, [r["image"] for r in rows])
    labels = label_tensor(rows)
    assert labels.shape == (48, 6) and labels.min() >= 0
    from transformers import CLIPVisionConfig
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                              image_size=demo_model.IMAGE_SIZE, patch_size=demo_model.PATCH_SIZE).to_dict()
    model = demo_model.build_model(demo_model.llava_config(hidden=32, layers=1, intermediate=64, heads=2,
                                                           vision=vision))
    result = pretrain_vision(model.model.vision_tower, pixels, rows, pixels[:16], rows[:16], steps=20,
                             batch_size=16, lr=3e-3, progress=False, log_every=5)
    assert result["history"][-1]["loss"] < result["history"][0]["loss"]
    assert set(result["heldout_accuracy"]) == {"count", "size", "color", "shape", "background", "position"}


@pytest.mark.skipif(not (DEMO / "draft" / "config.json").exists(), reason="demo pair not built")
def test_demo_pair_speculative_captions_equal_target_greedy():
    """Through the decoder, the demo pair's greedy captions are the target's own, token for token (fp32)."""
    from transformers import AutoProcessor

    from decoding import SpeculativeDecoder
    from decoding.loading import load_model
    from jobs.bench import encode, make_inputs
    from tests.helpers import target_greedy

    target = load_model(DEMO / "target", "fp32")
    draft = load_model(DEMO / "draft", "fp32")
    processor = AutoProcessor.from_pretrained(DEMO / "target")
    text, images = make_inputs(processor, 8)
    ids, mask, pixels = encode(processor, text, images, "cpu", torch.float32)
    result = SpeculativeDecoder(target, draft).generate(ids, mask, pixels, max_new_tokens=32)
    eos = target.generation_config.eos_token_id
    assert result.sequences == target_greedy(target, ids, mask, pixels, 32, eos)
    assert sum(st.mean_accepted for st in result.stats) / 8 > 2.0   # the distilled draft is really accepted
