"""Named exceptions of the decoder. All derive from ValueError so callers may catch broadly."""


class SpecDecodeError(ValueError):
    """Base class of every error the speculative decoder raises on purpose."""


class InputError(SpecDecodeError):
    """The inputs of `SpeculativeDecoder.generate` are malformed (shapes, padding, image tokens, options)."""


class ModelPairError(SpecDecodeError):
    """The target and draft cannot decode together (tokenizer, device, architecture, attention backend)."""


class CapacityError(SpecDecodeError):
    """Rows were added beyond what the engine's KV plan holds (decoding/capacity.py); callers admit
    rows only when `SpeculativeEngine.can_admit` says they fit."""
