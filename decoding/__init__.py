"""Lossless dynamic-tree speculative decoding for LLaVA (pure torch + transformers; no Ray).

    from decoding import SpeculativeDecoder, TreeConfig
    decoder = SpeculativeDecoder(target, draft, tree=TreeConfig())
    result = decoder.generate(input_ids, attention_mask, pixel_values, max_new_tokens=64)

The names below are imported on first use, so a torch-free submodule (`decoding.dtypes`) costs
no torch import: the CLI's --help and job commands stay fast.
"""
from importlib import import_module

_EXPORTS = {"SpeculativeDecoder": ".decoder", "TreeConfig": ".tree", "DraftTree": ".tree",
            "GenerationResult": ".stats", "RowStats": ".stats", "SpecDecodeError": ".errors",
            "InputError": ".errors", "ModelPairError": ".errors"}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'decoding' has no attribute {name!r}")
    value = getattr(import_module(_EXPORTS[name], __name__), name)
    globals()[name] = value
    return value
