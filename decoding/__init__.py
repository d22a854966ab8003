"""Lossless dynamic-tree speculative decoding for LLaVA (pure torch + transformers; no Ray).

    from decoding import SpeculativeDecoder, TreeConfig
    decoder = SpeculativeDecoder(target, draft, tree=TreeConfig())
    result = decoder.generate(input_ids, attention_mask, pixel_values, max_new_tokens=64)
"""
from .decoder import SpeculativeDecoder
from .errors import InputError, ModelPairError, SpecDecodeError
from .stats import GenerationResult, RowStats
from .tree import DraftTree, TreeConfig

__all__ = ["SpeculativeDecoder", "TreeConfig", "GenerationResult", "RowStats", "DraftTree",
           "SpecDecodeError", "InputError", "ModelPairError"]
