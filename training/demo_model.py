"""The demo captioning model: tokenizer, processor, target config, data tensors and evaluation.

Contract
- `build_tokenizer()` makes a real word-level fast tokenizer with the `tokenizers` library, trained
  (WordLevelTrainer) on every word of the synthetic caption language; ids 0..4 are
  <pad> <s> </s> <unk> <image>. `build_processor()` wraps it in a `LlavaProcessor` (left padding,
  a USER/ASSISTANT chat template, a 64x64 CLIP image processor). Both save/load with
  `save_pretrained` / `from_pretrained` and need no network.
- `target_config()` is the demo target: CLIP vision tower (64 px, 16 px patches -> 16 image tokens)
  and a LLaMA text model of about 16M parameters.
- `encode_images`, `encode_captions`, `prompt_ids` and `make_batch` turn Parquet rows (see
  training/synthetic.py) into teacher-forcing batches; `greedy_captions` and `evaluate` score a model's
  greedy captions attribute by attribute against the ground truth.
"""
from __future__ import annotations

import io
from dataclasses import dataclass

import torch
from PIL import Image

from training import synthetic

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>", "<image>"]
PAD_ID, BOS_ID, EOS_ID, UNK_ID, IMAGE_ID = range(5)
CHAT_WORDS = ["user", "assistant", ":"]
IMAGE_SIZE, PATCH_SIZE = 64, 16
IMAGE_TOKENS = (IMAGE_SIZE // PATCH_SIZE) ** 2  # "default" strategy drops CLS
DEFAULT_PROMPT = synthetic.PROMPTS[0]
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: {% else %}ASSISTANT: {% endif %}"
    "{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image> {% else %}{{ part['text'] }} {% endif %}"
    "{% endfor %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def build_tokenizer():
    """A word-level `PreTrainedTokenizerFast` over the caption language (lowercases, splits punctuation)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel(unk_token="<unk>"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(special_tokens=SPECIAL_TOKENS, min_frequency=1)
    corpus = synthetic.vocabulary() + CHAT_WORDS
    backend.train_from_iterator([" ".join(corpus)], trainer=trainer)
    assert [backend.token_to_id(t) for t in SPECIAL_TOKENS] == list(range(5)), "special ids moved"
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B",
                                                           special_tokens=[("<s>", BOS_ID)])
    backend.decoder = decoders.WordPiece(prefix="##")  # joins words with single spaces
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        pad_token="<pad>", extra_special_tokens={"image_token": "<image>"}, padding_side="left",
        model_max_length=256,
    )


def build_processor():
    from transformers import LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
    )
    return LlavaProcessor(
        image_processor=image_processor, tokenizer=build_tokenizer(), patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default", num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
    )


def llava_config(*, hidden: int, layers: int, intermediate: int, heads: int, vocab_size: int = 64,
                 vision: dict | None = None):
    """A LlavaConfig with a LLaMA text model over our tokenizer and the demo's CLIP vision tower."""
    from transformers import CLIPVisionConfig, LlavaConfig

    vision = vision or CLIPVisionConfig(
        hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
        image_size=IMAGE_SIZE, patch_size=PATCH_SIZE, projection_dim=128,
    ).to_dict()
    text = dict(
        model_type="llama", vocab_size=vocab_size, hidden_size=hidden, intermediate_size=intermediate,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
        max_position_embeddings=256, pad_token_id=PAD_ID, bos_token_id=BOS_ID, eos_token_id=EOS_ID,
        tie_word_embeddings=False,
    )
    return LlavaConfig(vision_config=vision, text_config=text, image_token_id=IMAGE_ID,
                       vision_feature_select_strategy="default", vision_feature_layer=-1,
                       projector_hidden_act="gelu", image_seq_length=IMAGE_TOKENS)


def target_config():
    return llava_config(hidden=384, layers=9, intermediate=1024, heads=6)


def build_model(config, seed: int = 0):
    from transformers import LlavaForConditionalGeneration

    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    gen = model.generation_config
    gen.eos_token_id, gen.pad_token_id, gen.bos_token_id = EOS_ID, PAD_ID, BOS_ID
    gen.do_sample, gen.max_new_tokens = False, 32
    return model


def text_parameters(model) -> int:
    """Parameters of the text model and LM head, a tied embedding/LM-head matrix counted once."""
    from decoding.families import adapter

    params = {id(p): p for p in [*adapter(model).text_model(model).parameters(), model.lm_head.weight]}
    return sum(p.numel() for p in params.values())


def encode_images(processor, images: list[bytes], batch_size: int = 512) -> torch.Tensor:
    """PNG/JPEG bytes -> pixel values [N, 3, H, W] float32."""
    out = []
    for i in range(0, len(images), batch_size):
        pil = [Image.open(io.BytesIO(b)).convert("RGB") for b in images[i:i + batch_size]]
        out.append(processor.image_processor(pil, return_tensors="pt")["pixel_values"])
    return torch.cat(out)


def prompt_ids(processor, prompt: str = DEFAULT_PROMPT) -> list[int]:
    """Token ids of the chat prompt for one image (image tokens expanded), ending in 'ASSISTANT:'."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    dummy = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE))
    return processor(text=text, images=dummy, return_tensors="pt")["input_ids"][0].tolist()


def encode_captions(tokenizer, captions: list[str]) -> list[list[int]]:
    """Caption token ids, each ending in </s>."""
    ids = tokenizer(captions, add_special_tokens=False)["input_ids"]
    return [x + [EOS_ID] for x in ids]


@dataclass(frozen=True)
class Batch:
    input_ids: torch.Tensor       # [B, T] right padded with PAD_ID
    attention_mask: torch.Tensor  # [B, T]
    labels: torch.Tensor          # [B, T] caption tokens, -100 on prompt and padding
    pixel_values: torch.Tensor    # [B, 3, H, W]


def make_batch(prompts: list[list[int]], captions: list[list[int]], pixel_values: torch.Tensor) -> Batch:
    """Teacher-forcing batch: prompt + caption per row, loss on the caption (and its </s>) only."""
    lengths = [len(p) + len(c) for p, c in zip(prompts, captions)]
    B, T = len(prompts), max(lengths)
    ids = torch.full((B, T), PAD_ID, dtype=torch.long)
    labels = torch.full((B, T), -100, dtype=torch.long)
    mask = torch.zeros((B, T), dtype=torch.long)
    for b, (p, c) in enumerate(zip(prompts, captions)):
        ids[b, :len(p) + len(c)] = torch.tensor(p + c)
        labels[b, len(p):len(p) + len(c)] = torch.tensor(c)
        mask[b, :len(p) + len(c)] = 1
    return Batch(ids, mask, labels, pixel_values)


@torch.no_grad()
def greedy_captions(model, processor, pixel_values: torch.Tensor, prompt: str = DEFAULT_PROMPT,
                    batch_size: int = 64, max_new_tokens: int = 32) -> list[list[int]]:
    """Greedy caption token ids (without EOS and padding) per image; pixel_values [N, 3, H, W].
    EOS and padding are the tokenizer's (</s> and <pad> for the demo's)."""
    ids = prompt_ids(processor, prompt)
    tok = processor.tokenizer
    eos_id, pad_id = tok.eos_token_id, tok.pad_token_id
    dtype = next(model.parameters()).dtype
    out: list[list[int]] = []
    for i in range(0, len(pixel_values), batch_size):
        pix = pixel_values[i:i + batch_size].to(model.device, dtype)  # [B, 3, H, W]
        input_ids = torch.tensor([ids] * len(pix), device=model.device)  # [B, T]
        gen = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                             pixel_values=pix, do_sample=False, max_new_tokens=max_new_tokens,
                             eos_token_id=eos_id, pad_token_id=pad_id)
        for row in gen[:, input_ids.shape[1]:].tolist():
            out.append([t for t in row[:row.index(eos_id)] if t != pad_id] if eos_id in row
                       else [t for t in row if t != pad_id])
    return out


def evaluate(model, processor, pixel_values: torch.Tensor, truths: list[dict], batch_size: int = 64,
             prompt: str = DEFAULT_PROMPT) -> dict:
    """Greedy-caption the images and score attributes against `truths` (rows of the dataset)."""
    token_ids = greedy_captions(model, processor, pixel_values, prompt=prompt, batch_size=batch_size)
    texts = processor.tokenizer.batch_decode(token_ids, skip_special_tokens=True)
    correct = total = exact = 0
    per_attr: dict[str, list[int]] = {k: [0, 0] for k in synthetic.ATTRIBUTES}
    for text, truth in zip(texts, truths):
        pred = synthetic.parse_caption(text)
        c, t = synthetic.attribute_accuracy(pred, truth)
        correct, total, exact = correct + c, total + t, exact + (c == t)
        for k in synthetic.ATTRIBUTES:
            if k != "position" or truth.get("count") == 1:
                per_attr[k][0] += pred.get(k) == truth.get(k)
                per_attr[k][1] += 1
    return dict(attribute_accuracy=correct / max(total, 1), exact_match=exact / max(len(texts), 1),
                per_attribute={k: round(a / max(n, 1), 4) for k, (a, n) in per_attr.items()},
                images=len(texts), samples=texts[:8],
                mean_caption_tokens=sum(len(t) for t in token_ids) / max(len(token_ids), 1))


def main(argv=None) -> int:
    """`python -m training.demo_model --model DIR --data SHARDS [--images N]`: attribute accuracy of a saved model."""
    import argparse
    import json
    import time

    from decoding.dtypes import DTYPE_NAMES, canonical_dtype

    from transformers import AutoProcessor, LlavaForConditionalGeneration

    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--images", type=int, default=500)
    p.add_argument("--dtype", type=canonical_dtype, choices=list(DTYPE_NAMES), default="float32")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    processor = AutoProcessor.from_pretrained(args.model)
    model = LlavaForConditionalGeneration.from_pretrained(args.model, use_safetensors=True,
                                                          dtype=getattr(torch, args.dtype)).eval()
    table = synthetic.read_rows(args.data, limit=args.images)
    pixels = encode_images(processor, table.column("image").to_pylist())
    start = time.time()
    metrics = evaluate(model, processor, pixels, table.drop_columns(["image"]).to_pylist())
    metrics.update(seconds=round(time.time() - start, 1), dtype=args.dtype, model=args.model)
    print(json.dumps(metrics, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
