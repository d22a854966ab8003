"""Model loading: safetensors only, never remote code, clear errors."""
import json

import pytest
import torch

from decoding import ModelPairError
from decoding.loading import check_model_dir, load_llava, parse_dtype
from decoding.testing import make_tiny_llava


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = tmp_path_factory.mktemp("model")
    make_tiny_llava(seed=0).save_pretrained(path, safe_serialization=True)
    return path


def test_loads_safetensors(saved):
    model = load_llava(saved, "fp32")
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
