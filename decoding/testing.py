"""Tiny random LLaVA models and a matching processor, built in code (no downloads).

Used by the test-suite, the quick benchmark and pipeline tests. Everything here is real
transformers machinery (`LlavaForConditionalGeneration`, `LlavaProcessor`, a fast tokenizer);
only the sizes are tiny and the weights random.
"""
from __future__ import annotations

import copy
from pathlib import Path

import torch
from transformers import (
    CLIPVisionConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
)

TEXT_CONFIG_DEFAULTS = {
    "llama": dict(model_type="llama"),
    "mistral": dict(model_type="mistral", sliding_window=None),
    "qwen2": dict(model_type="qwen2", use_sliding_window=False),
}

# Word-level vocabulary of the tiny processor; ids 0..3 are special.
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>"]
IMAGE_TOKEN = "<image>"


def tiny_llava_config(
    *,
    text: str = "llama",
    vocab_size: int = 96,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int | None = None,
    image_size: int = 16,
    patch_size: int = 8,
    vision_feature_select_strategy: str = "default",
    image_token_id: int | None = None,
    initializer_range: float = 0.2,
    **text_overrides,
) -> LlavaConfig:
    """A LlavaConfig small enough to run hundreds of generations per minute on one CPU core.

    `initializer_range` is larger than usual so that logits are well spread: with the 0.02 of
    real checkpoints a random model's top-2 logits are often within float rounding, and an
    fp32 equality test would then measure noise instead of the decoder.
    """
    if text not in TEXT_CONFIG_DEFAULTS:
        raise ValueError(f"text must be one of {sorted(TEXT_CONFIG_DEFAULTS)}, got {text!r}")
    image_token_id = vocab_size - 1 if image_token_id is None else image_token_id
    text_config = dict(TEXT_CONFIG_DEFAULTS[text])
    text_config.update(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads or num_heads,
        max_position_embeddings=2048,
        initializer_range=initializer_range,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    text_config.update(text_overrides)
    vision_config = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=image_size,
        patch_size=patch_size,
        projection_dim=32,
    )
    config = LlavaConfig(
        vision_config=vision_config.to_dict(),
        text_config=text_config,
        image_token_id=image_token_id,
        vision_feature_select_strategy=vision_feature_select_strategy,
        vision_feature_layer=-2,
        projector_hidden_act="gelu",
        image_seq_length=image_tokens_per_image(image_size, patch_size, vision_feature_select_strategy),
    )
    config.initializer_range = initializer_range
    return config


def image_tokens_per_image(image_size: int, patch_size: int, strategy: str) -> int:
    patches = (image_size // patch_size) ** 2
    return patches if strategy == "default" else patches + 1


def make_tiny_llava(seed: int = 0, dtype: torch.dtype = torch.float32, **config_kwargs) -> LlavaForConditionalGeneration:
    """A random tiny LLaVA in eval mode; the same seed and config give the same weights."""
    config = tiny_llava_config(**config_kwargs)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    return _generation_ids(model, config.text_config).to(dtype).eval()


def make_tiny_text_model(seed: int = 0, dtype: torch.dtype = torch.float32, **config_kwargs):
    """A random tiny text-only model (Llama/Mistral/Qwen2ForCausalLM, by `text`) of the text config
    `tiny_llava_config` would build: the same special ids, so it drafts for a tiny LLaVA. Its
    vocabulary (`vocab_size`) may stop below the target's image token (a prefix of the target's)."""
    from .families import model_class

    text = tiny_llava_config(**config_kwargs).text_config
    torch.manual_seed(seed)
    model = model_class(text)(text)
    return _generation_ids(model, text).to(dtype).eval()


def text_model_of(llava, vocab_size: int | None = None):
    """A text-only *ForCausalLM holding `llava`'s language model and LM head (its first `vocab_size`
    rows; all by default): the natural text-only draft of a LLaVA, and a start for distilling one."""
    from .families import model_class

    text = copy.deepcopy(llava.config.text_config)
    vocab = vocab_size or text.vocab_size
    text.vocab_size = vocab
    model = model_class(text)(text)
    state = {f"model.{k}": v for k, v in llava.model.language_model.state_dict().items()}
    state["model.embed_tokens.weight"] = state["model.embed_tokens.weight"][:vocab]
    state["lm_head.weight"] = llava.lm_head.weight[:vocab]
    model.load_state_dict({k: v.detach().clone() for k, v in state.items()}, strict=True)
    return _generation_ids(model, text).to(next(llava.parameters()).dtype).eval()


def _generation_ids(model, text_config):
    for name in ("eos_token_id", "pad_token_id", "bos_token_id"):
        setattr(model.generation_config, name, getattr(text_config, name))
    return model


def make_tiny_processor(vocab_size: int = 96, image_size: int = 16, patch_size: int = 8,
                        vision_feature_select_strategy: str = "default"):
    """A real LlavaProcessor: word-level fast tokenizer (ids match `tiny_llava_config`) + CLIP image processor."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlavaProcessor, PreTrainedTokenizerFast
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    words = [f"w{i}" for i in range(vocab_size - len(SPECIAL_TOKENS) - 1)]
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + words + [IMAGE_TOKEN])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
        extra_special_tokens={"image_token": IMAGE_TOKEN},
        padding_side="left",
    )
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
    )
    chat_template = (
        "{% for message in messages %}{% for part in message['content'] %}"
        "{% if part['type'] == 'image' %}<image> {% else %}{{ part['text'] }} {% endif %}"
        "{% endfor %}{% endfor %}{% if add_generation_prompt %}w0{% endif %}"
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy=vision_feature_select_strategy,
        num_additional_image_tokens=1,
        chat_template=chat_template,
    )


def save_tiny_pair(directory: str | Path, target_seed: int = 0, draft_seed: int = 1,
                   draft_layers: int = 1, **config_kwargs) -> tuple[Path, Path]:
    """Save a tiny target and a tiny draft (with processors) under `directory`/{target,draft}."""
    directory = Path(directory)
    processor = make_tiny_processor(**{k: v for k, v in config_kwargs.items()
                                      if k in ("vocab_size", "image_size", "patch_size",
                                               "vision_feature_select_strategy")})
    paths = []
    for name, seed, layers in (("target", target_seed, config_kwargs.pop("num_layers", 2)),
                               ("draft", draft_seed, draft_layers)):
        model = make_tiny_llava(seed=seed, num_layers=layers, **config_kwargs)
        path = directory / name
        model.save_pretrained(path, safe_serialization=True)
        processor.save_pretrained(path)
        paths.append(path)
    return paths[0], paths[1]


# -- any-resolution families (LLaVA-NeXT, LLaVA-OneVision) ---------------------------------------
# Tiles of 16x16 px (2x2 patches of 8 px); an image is resized onto the best of these grids.
TINY_GRID_PINPOINTS = [[16, 32], [32, 16], [32, 32]]
ANYRES_FAMILIES = ("llava_next", "llava_onevision")


def tiny_anyres_config(family: str = "llava_next", *, text: str | None = None, **kwargs):
    """A LlavaNextConfig (CLIP tower, LLaMA text by default) or a LlavaOnevisionConfig (SigLIP tower,
    Qwen2 text by default, as the real ones) of `tiny_llava_config`'s sizes, any-resolution tiling
    over TINY_GRID_PINPOINTS. kwargs: tiny_llava_config's."""
    from transformers import LlavaNextConfig, LlavaOnevisionConfig, SiglipVisionConfig

    if family not in ANYRES_FAMILIES:
        raise ValueError(f"family must be one of {ANYRES_FAMILIES}, got {family!r}")
    onevision = family == "llava_onevision"
    base = tiny_llava_config(text=text or ("qwen2" if onevision else "llama"), **kwargs)
    common = dict(text_config=base.text_config.to_dict(), image_token_id=base.image_token_id,
                  image_grid_pinpoints=TINY_GRID_PINPOINTS, vision_feature_layer=-2,
                  projector_hidden_act="gelu")
    if onevision:
        v = base.vision_config
        vision = SiglipVisionConfig(hidden_size=v.hidden_size, intermediate_size=v.intermediate_size,
                                    num_hidden_layers=v.num_hidden_layers, num_attention_heads=v.num_attention_heads,
                                    image_size=v.image_size, patch_size=v.patch_size, vision_use_head=False)
        config = LlavaOnevisionConfig(vision_config=vision.to_dict(), vision_feature_select_strategy="full",
                                      video_token_id=base.text_config.vocab_size + 1, **common)
    else:
        config = LlavaNextConfig(vision_config=base.vision_config.to_dict(),
                                 vision_feature_select_strategy=base.vision_feature_select_strategy, **common)
    config.initializer_range = base.initializer_range
    return config


def make_tiny_anyres(family: str = "llava_next", seed: int = 0, dtype: torch.dtype = torch.float32, **kwargs):
    """A random tiny LlavaNext/LlavaOnevisionForConditionalGeneration in eval mode (deterministic per seed)."""
    from .families import model_class

    config = tiny_anyres_config(family, **kwargs)
    torch.manual_seed(seed)
    model = model_class(config)(config)
    return _generation_ids(model, config.text_config).to(dtype).eval()


def make_tiny_next_processor(vocab_size: int = 96):
    """The real LlavaNextProcessor over the tiny tokenizer: it tiles each image by its size and
    expands `<image>` to that image's token count (and returns image_sizes)."""
    tiny = make_tiny_processor(vocab_size=vocab_size)
    tokenizer, template = tiny.tokenizer, tiny.chat_template
    from transformers import LlavaNextProcessor
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    image_processor = LlavaNextImageProcessorPil(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16},
                                                 image_grid_pinpoints=TINY_GRID_PINPOINTS)
    return LlavaNextProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=8,
                              vision_feature_select_strategy="default", num_additional_image_tokens=1,
                              chat_template=template)


def tiny_anyres_inputs(model, images, prompts: list[str], vocab_size: int = 96) -> dict:
    """Left-padded inputs for a tiny any-resolution model, one image per row: input_ids and
    attention_mask with each `<image>` expanded to its image's token count, pixel_values
    [N, tiles, C, H, W] and image_sizes [N, 2].

    NeXT: the real LlavaNextProcessor. OneVision: its real image processor for pixels and sizes;
    the token count per image is the model's own (its get_image_features on those pixels),
    because LlavaOnevisionProcessor cannot be built without torchvision (its video processor)."""
    family = model.config.model_type
    if family == "llava_next":
        return dict(make_tiny_next_processor(vocab_size)(images=images, text=prompts, return_tensors="pt",
                                                         padding=True))
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil)

    pixels = LlavaOnevisionImageProcessorPil(size={"height": 16, "width": 16},
                                             image_grid_pinpoints=TINY_GRID_PINPOINTS)(images, return_tensors="pt")
    cfg = model.config
    with torch.no_grad():
        features = model.model.get_image_features(
            pixels["pixel_values"], pixels["image_sizes"], vision_feature_layer=cfg.vision_feature_layer,
            vision_feature_select_strategy=cfg.vision_feature_select_strategy,
            vision_aspect_ratio=cfg.vision_aspect_ratio).pooler_output
    counts = [f.shape[0] for f in features]
    tokenizer = make_tiny_processor(vocab_size=vocab_size).tokenizer
    texts = [p.replace(IMAGE_TOKEN, " ".join([IMAGE_TOKEN] * n), 1) for p, n in zip(prompts, counts)]
    enc = tokenizer(texts, return_tensors="pt", padding=True)
    return dict(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                pixel_values=pixels["pixel_values"], image_sizes=pixels["image_sizes"])


def save_tiny_next_pair(directory: str | Path, draft: str = "next", target_seed: int = 0,
                        draft_seed: int = 1) -> tuple[Path, Path]:
    """Save a tiny LLaVA-NeXT target (with its LlavaNextProcessor) and a draft under
    `directory`/{target,draft}: draft "next" (a one-layer NeXT with the same processor) or "text"
    (the target's language model as a LlamaForCausalLM, with the tokenizer)."""
    directory = Path(directory)
    processor = make_tiny_next_processor()
    target = make_tiny_anyres("llava_next", seed=target_seed, image_token_id=95)
    target.save_pretrained(directory / "target", safe_serialization=True)
    processor.save_pretrained(directory / "target")
    if draft == "text":
        text_model_of(target, vocab_size=95).save_pretrained(directory / "draft", safe_serialization=True)
        processor.tokenizer.save_pretrained(directory / "draft")
    elif draft == "next":
        make_tiny_anyres("llava_next", seed=draft_seed, num_layers=1, image_token_id=95).save_pretrained(
            directory / "draft", safe_serialization=True)
        processor.save_pretrained(directory / "draft")
    else:
        raise ValueError(f"draft must be 'next' or 'text', got {draft!r}")
    return directory / "target", directory / "draft"
