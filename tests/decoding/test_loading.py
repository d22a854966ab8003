"""Model loading: safetensors only, never remote code, clear errors."""
import json

import pytest
import torch

from decoding import ModelPairError
from decoding import loading
from decoding.loading import check_model_dir, load_model, parse_dtype, weights_device_map
from decoding.testing import make_tiny_llava


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = tmp_path_factory.mktemp("model")
    make_tiny_llava(seed=0).save_pretrained(path, safe_serialization=True)
    return path


def test_loads_safetensors(saved):
    model = load_model(saved, "fp32")
    assert not model.training and next(model.parameters()).dtype == torch.float32


def test_missing_dir(tmp_path):
    with pytest.raises(ModelPairError, match="no config.json"):
        check_model_dir(tmp_path / "nope")


def test_pickle_only_refused(saved, tmp_path):
    (tmp_path / "config.json").write_text((saved / "config.json").read_text())
    (tmp_path / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(ModelPairError, match="pickle weights pytorch_model.bin"):
        check_model_dir(tmp_path)


def test_remote_code_refused(saved, tmp_path):
    config = json.loads((saved / "config.json").read_text())
    config["auto_map"] = {"AutoModel": "evil.Model"}
    (tmp_path / "config.json").write_text(json.dumps(config))
    for f in saved.glob("*.safetensors"):
        (tmp_path / f.name).write_bytes(f.read_bytes())
    with pytest.raises(ModelPairError, match="remote code"):
        check_model_dir(tmp_path)


def test_parse_dtype():
    assert parse_dtype("bf16") is torch.bfloat16
    with pytest.raises(ValueError, match="unknown dtype"):
        parse_dtype("int4")


def test_auto_dtype_is_bf16_on_cuda_fp32_elsewhere():
    # Only names and torch.device objects: nothing here needs a GPU.
    assert parse_dtype("auto", "cuda") is torch.bfloat16
    assert parse_dtype("auto", torch.device("cuda", 1)) is torch.bfloat16
    assert parse_dtype("auto", "cpu") is torch.float32
    assert parse_dtype("auto") is torch.float32
    assert parse_dtype("auto", "meta") is torch.float32
    for name, dtype in (("float16", torch.float16), ("fp16", torch.float16), ("float32", torch.float32),
                        ("bfloat16", torch.bfloat16)):
        assert parse_dtype(name, "cuda") is dtype and parse_dtype(name, "cpu") is dtype  # explicit wins
    assert parse_dtype(torch.float16, "cpu") is torch.float16


def test_device_map_names_one_device():
    assert weights_device_map("cpu") == {"": torch.device("cpu")}
    assert weights_device_map(torch.device("cuda", 1)) == {"": torch.device("cuda", 1)}


def _spy_from_pretrained(monkeypatch):
    from transformers import LlavaForConditionalGeneration

    calls = []
    original = LlavaForConditionalGeneration.from_pretrained

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(LlavaForConditionalGeneration, "from_pretrained", spy)
    return calls


def test_loads_straight_to_device_in_dtype(saved, monkeypatch):
    """bf16 on cpu: every weight is bf16 on cpu as loaded, equal to the saved weights cast to bf16,
    and the loader asked from_pretrained for the device (device_map) and the dtype: no
    load-then-move (Module.to is never called on the model)."""
    calls = _spy_from_pretrained(monkeypatch)
    moves = []
    original_to = torch.nn.Module.to

    def to(self, *args, **kwargs):
        moves.append((type(self).__name__, args, kwargs))
        return original_to(self, *args, **kwargs)

    monkeypatch.setattr(torch.nn.Module, "to", to)
    model = load_model(saved, "bfloat16", "cpu")
    assert len(calls) == 1
    kwargs = calls[0]
    assert kwargs["device_map"] == {"": torch.device("cpu")} and kwargs["dtype"] is torch.bfloat16
    assert kwargs["use_safetensors"] is True and kwargs["trust_remote_code"] is False
    assert not moves, moves
    assert not model.training
    params = dict(model.named_parameters())
    assert params and all(p.dtype == torch.bfloat16 and p.device.type == "cpu" for p in params.values())
    assert all(b.device.type == "cpu" for b in model.buffers())
    # The saved model (make_tiny_llava is deterministic per seed), cast to bf16 after the fact.
    expected = make_tiny_llava(seed=0).to(torch.bfloat16).state_dict()
    state = model.state_dict()
    assert state.keys() == expected.keys()
    for name, value in expected.items():
        assert state[name].dtype == value.dtype and torch.equal(state[name], value), name


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_same_model_as_load_then_move(saved, dtype):
    """On a CPU the direct load gives exactly what from_pretrained-then-.to(cpu) gave before."""
    from transformers import LlavaForConditionalGeneration

    model = load_model(saved, dtype, "cpu")
    before = LlavaForConditionalGeneration.from_pretrained(
        saved, use_safetensors=True, trust_remote_code=False, dtype=parse_dtype(dtype)).to("cpu").eval()
    a, b = model.state_dict(), before.state_dict()
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name
    ids = torch.tensor([[1, 5, 7, 9]])
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, before(input_ids=ids).logits)
