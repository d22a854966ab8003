"""Model families: all the decoder knows of each kind of model, one small class per family.

The engine, tree, verify, cache and graph code name no family: they ask a model's adapter
(`adapter(model)`) for its text config, its text model's modules (the lean forward), how a
prompt with images is prefilled, and what the pair checks compare.

    family           transformers class                        images
    llava            LlavaForConditionalGeneration (1.5 kind)  a fixed token count per image; pixel_values [N, C, H, W]
    llava_next       LlavaNextForConditionalGeneration (v1.6)  any-resolution tiles: the count depends on the image's size
                                                               (+ a newline token per row of patches); pixel_values
                                                               [N, tiles, C, H, W] and image_sizes [N, 2] (height, width)
    llava_onevision  LlavaOnevisionForConditionalGeneration    as NeXT, with OneVision's packing (Qwen2 + SigLIP)
    text             Llama/Mistral/Qwen2ForCausalLM            none: a text-only draft. It sees each row's prompt without
                                                               its image tokens, at its own positions (`text_prompt`)

A draft is of the target's family (same vision input settings: both expand an image to the
same tokens) or `text`. Images go to the target's prefill as that family's processor made them.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .errors import InputError, ModelPairError

SUPPORTED_TEXT_MODELS = ("llama", "mistral", "qwen2")


class Family:
    """A multimodal LLaVA family (subclasses say what differs). Methods take a model or config."""

    model_types: tuple[str, ...] = ()
    class_name = ""
    multimodal = True
    anyres = False          # images become tiles of the image's size (pixel_values [N, tiles, C, H, W] + image_sizes)
    # config fields a same-family draft must share with the target (image token counts depend on them)
    vision_fields: tuple[str, ...] = ("vision_feature_select_strategy",)

    def text_config(self, config):
        return config.text_config

    def text_model(self, model):
        """The decoder stack (embed_tokens, layers, norm, rotary_emb) the lean forward calls."""
        return model.model.language_model

    def image_token_id(self, config) -> int | None:
        return config.image_token_id

    def model_class(self, config):
        """The transformers class that loads a checkpoint of this config (no Auto* guessing)."""
        import transformers

        return getattr(transformers, self.class_name)

    def check_config(self, config, role: str) -> None:
        kind = self.text_config(config).model_type
        if kind not in SUPPORTED_TEXT_MODELS:
            raise ModelPairError(f"{role} text model {kind!r} is not supported; supported: "
                                 f"{', '.join(SUPPORTED_TEXT_MODELS)}")

    def vision_signature(self, config) -> dict:
        """What decides how many tokens an image becomes (a same-family draft must match it)."""
        vision = config.vision_config
        sig = {name: getattr(config, name, None) for name in self.vision_fields}
        sig.update(image_size=vision.image_size, patch_size=vision.patch_size)
        return sig

    def vision_kwargs(self, pixel_values: Tensor | None, image_sizes: Tensor | None, dtype: torch.dtype) -> dict:
        """The keyword arguments a prefill forward takes for the images."""
        if pixel_values is None:
            return {}
        kwargs = {"pixel_values": pixel_values.to(dtype)}
        if image_sizes is not None:
            kwargs["image_sizes"] = image_sizes
        return kwargs

    def check_images(self, config, image_tokens: Tensor, pixel_values: Tensor | None,
                     image_sizes: Tensor | None) -> None:
        """Raise InputError for images that do not fit this family. image_tokens: [B] per row."""
        raise NotImplementedError

    def encode_images(self, model, pixel_values: Tensor, image_sizes: Tensor | None, image_tokens: list[int]):
        """`mm_encoder_outputs` for the model's forward, or None to let the forward encode them."""
        return None


class LlavaFamily(Family):
    model_types = ("llava",)
    class_name = "LlavaForConditionalGeneration"

    def tokens_per_image(self, config) -> int:
        vision = config.vision_config
        patches = (vision.image_size // vision.patch_size) ** 2
        return patches + (1 if config.vision_feature_select_strategy == "full" else 0)

    def max_image_tokens(self, config) -> int:
        return self.tokens_per_image(config)

    def check_images(self, config, image_tokens, pixel_values, image_sizes) -> None:
        if not isinstance(pixel_values, Tensor) or pixel_values.dim() != 4:
            raise InputError(f"pixel_values must be a 4D tensor [num_images, C, H, W], got "
                             f"{tuple(getattr(pixel_values, 'shape', ()))}")
        vision = config.vision_config
        if tuple(pixel_values.shape[1:]) != (vision.num_channels, vision.image_size, vision.image_size):
            raise InputError(f"pixel_values images must be {vision.num_channels}x{vision.image_size}x"
                             f"{vision.image_size} for this target, got {tuple(pixel_values.shape[1:])}")
        per_image = self.tokens_per_image(config)
        bad = image_tokens % per_image != 0
        if bool(bad.any()):
            row = int(torch.nonzero(bad)[0])
            raise InputError(f"row {row} has {int(image_tokens[row])} image tokens, not a multiple of the "
                             f"{per_image} tokens one image expands to (was the prompt processed by the "
                             "target's processor?)")
        images = int(image_tokens.sum()) // per_image
        if images != pixel_values.shape[0]:
            raise InputError(f"input_ids hold image tokens for {images} image(s) but pixel_values has "
                             f"{pixel_values.shape[0]} (batch of {image_tokens.shape[0]} rows)")


class LlavaNextFamily(Family):
    model_types = ("llava_next",)
    anyres = True
    class_name = "LlavaNextForConditionalGeneration"
    vision_fields = ("vision_feature_select_strategy", "image_grid_pinpoints")

    def max_image_tokens(self, config) -> int:
        """An upper bound on one image's tokens (for KV planning): the patches of the largest tile
        grid, a newline per patch row, the base image and its extra tokens."""
        vision = config.vision_config
        ps, side = vision.patch_size, vision.image_size // vision.patch_size
        return max((h // ps) * (w // ps) + h // ps for h, w in config.image_grid_pinpoints) + side * side + 2

    def check_images(self, config, image_tokens, pixel_values, image_sizes) -> None:
        if not isinstance(pixel_values, Tensor) or pixel_values.dim() != 5:
            raise InputError(f"{self.class_name} takes pixel_values [num_images, tiles, C, H, W] (its "
                             f"processor's output), got {tuple(getattr(pixel_values, 'shape', ()))}")
        if not isinstance(image_sizes, Tensor) or tuple(image_sizes.shape) != (pixel_values.shape[0], 2):
            raise InputError(f"{self.class_name} needs image_sizes [num_images, 2] (height, width; the "
                             f"processor's output) for {pixel_values.shape[0]} image(s), got "
                             f"{tuple(getattr(image_sizes, 'shape', ())) if image_sizes is not None else None}")
        vision = config.vision_config
        if tuple(pixel_values.shape[2:]) != (vision.num_channels, vision.image_size, vision.image_size):
            raise InputError(f"pixel_values tiles must be {vision.num_channels}x{vision.image_size}x"
                             f"{vision.image_size} for this target, got {tuple(pixel_values.shape[2:])}")
        if bool((image_tokens > 0).sum() == 0):
            raise InputError("pixel_values given but input_ids hold no image tokens")

    def encode_images(self, model, pixel_values: Tensor, image_sizes: Tensor, image_tokens: list[int]) -> dict:
        """`mm_encoder_outputs` for the model's forward: its own image features (one vision pass,
        as its forward would run it), after checking that each row's image tokens are exactly
        its images' features (the model itself only checks the batch's total, so images given
        in another order than the rows' would land in the wrong rows). image_tokens: per row."""
        cfg = model.config
        kwargs = {"vision_aspect_ratio": cfg.vision_aspect_ratio} if hasattr(cfg, "vision_aspect_ratio") else {}
        out = model.model.get_image_features(
            pixel_values.to(next(model.parameters()).dtype), image_sizes, vision_feature_layer=cfg.vision_feature_layer,
            vision_feature_select_strategy=cfg.vision_feature_select_strategy, return_dict=True, **kwargs)
        lengths = [int(f.shape[0]) for f in out.pooler_output]
        image = 0
        for row, want in enumerate(image_tokens):
            got = 0
            while got < want and image < len(lengths):
                got += lengths[image]
                image += 1
            if got != want:
                raise InputError(f"row {row} has {want} image tokens but its image(s) give {got} features "
                                 f"(images make {lengths} tokens at image_sizes {image_sizes.tolist()}): give one "
                                 "image per <image> in row order, with the processor's image_sizes")
        if image != len(lengths):
            raise InputError(f"{len(lengths)} images given but the rows' image tokens take {image}")
        return {"image": out}


class LlavaOnevisionFamily(LlavaNextFamily):
    model_types = ("llava_onevision",)
    class_name = "LlavaOnevisionForConditionalGeneration"
    vision_fields = ("vision_feature_select_strategy", "image_grid_pinpoints", "vision_aspect_ratio")


class TextFamily(Family):
    model_types = SUPPORTED_TEXT_MODELS
    multimodal = False
    vision_fields = ()
    CLASS_NAMES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}

    def text_config(self, config):
        return config

    def text_model(self, model):
        return model.model

    def image_token_id(self, config) -> int | None:
        return None

    def model_class(self, config):
        import transformers

        return getattr(transformers, self.CLASS_NAMES[config.model_type])


FAMILIES = (LlavaFamily(), LlavaNextFamily(), LlavaOnevisionFamily(), TextFamily())
_BY_TYPE = {t: f for f in FAMILIES for t in f.model_types}


def adapter(model_or_config) -> Family:
    """The family of a model or a config (ModelPairError for any other kind)."""
    config = getattr(model_or_config, "config", model_or_config)
    family = _BY_TYPE.get(getattr(config, "model_type", None))
    if family is None:
        kinds = ", ".join(f.class_name or "/".join(TextFamily.CLASS_NAMES.values()) for f in FAMILIES)
        raise ModelPairError(f"model_type {getattr(config, 'model_type', None)!r} is not supported; supported: {kinds}")
    return family


def model_class(config):
    """The transformers class that loads a checkpoint of this config (no Auto* guessing, no remote code)."""
    return adapter(config).model_class(config)


def text_prompt(input_ids: Tensor, attention_mask: Tensor, image_token_id: int) -> tuple[Tensor, Tensor]:
    """What a text-only draft sees of a batch: each row's tokens without its image tokens,
    left-padded again (pad id 0, masked). input_ids/attention_mask: [B, T] -> [B, T'] (T' <= T)."""
    keep = attention_mask.bool() & (input_ids != image_token_id)                    # [B, T]
    counts = keep.sum(-1)                                                            # [B]
    if bool((counts == 0).any()):
        row = int(torch.nonzero(counts == 0)[0])
        raise InputError(f"row {row} has no text tokens besides its image: a text-only draft needs at "
                         "least one (the chat template's tokens)")
    width = int(counts.max())
    # A stable sort puts the kept tokens last in their order: left padding, then the row's text.
    order = torch.sort(keep.long(), dim=-1, stable=True).indices[:, -width:]
    ids = input_ids.gather(1, order)
    mask = keep.gather(1, order).long()
    return ids.masked_fill(mask == 0, 0), mask
