"""Issue 6, item 6: bad model directories are refused with a clear error, never executed.

Each bad draft is a copy of the tiny draft with one thing wrong: pickle-only weights (a pickle
that would run a command if anything unpickled it), remote code asked for by config.json or by
tokenizer_config.json (a module that would leave a sentinel file if imported), another
vocabulary, the same vocabulary size with other ids, other special tokens. Refused both in
decoding/ (loader, pair checks) and by `specllava caption` (exit 2, one line, before the input
is read and before Ray is touched), for local dirs and an s3:// prefix.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from decoding import ModelPairError
from tests.pipeline_helpers import cli, png_bytes

EXPECTED = {
    "pickle-only": "pickle weights pytorch_model.bin",
    "remote-code": "config.json asks for remote code",
    "tokenizer-remote-code": "tokenizer_config.json asks for remote code",
    "other-vocab": "vocabulary (96) and draft vocabulary (400)",
    "permuted-tokenizer": "tokenizer differs",
    "other-special-tokens": "eos_token_id differs",
}


class _RunsCommand:
    """Unpickling this runs `touch SENTINEL` (what a hostile pytorch_model.bin does)."""

    def __init__(self, sentinel: str):
        self.sentinel = sentinel

    def __reduce__(self):
        return os.system, (f"touch {self.sentinel}",)


def _edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


@pytest.fixture(scope="module")
def bad_models(tmp_path_factory, tiny_pair):
    """{case: draft dir}, and the sentinel file any executed model code would create."""
    import pickle

    from decoding.testing import make_tiny_llava, make_tiny_processor

    root = tmp_path_factory.mktemp("bad-models")
    sentinel = root / "CODE-RAN"
    evil = f"import pathlib\npathlib.Path({str(sentinel)!r}).touch()\n"
    dirs = {}
    for case in EXPECTED:
        path = root / case
        if case == "other-vocab":
            make_tiny_llava(seed=3, vocab_size=400, num_layers=1).save_pretrained(path)
            make_tiny_processor(vocab_size=400).save_pretrained(path)
        else:
            shutil.copytree(tiny_pair[1], path)
        dirs[case] = path
    (dirs["pickle-only"] / "model.safetensors").unlink()
    (dirs["pickle-only"] / "pytorch_model.bin").write_bytes(pickle.dumps(_RunsCommand(str(sentinel))))
    _edit_json(dirs["remote-code"] / "config.json", auto_map={"AutoModelForImageTextToText": "evil.EvilModel"})
    (dirs["remote-code"] / "evil.py").write_text(evil)
    _edit_json(dirs["tokenizer-remote-code"] / "tokenizer_config.json",
               auto_map={"AutoTokenizer": ["evil.EvilTokenizer", None]})
    (dirs["tokenizer-remote-code"] / "evil.py").write_text(evil)
    tokenizer = json.loads((dirs["permuted-tokenizer"] / "tokenizer.json").read_text())
    vocab = tokenizer["model"]["vocab"]
    vocab["w0"], vocab["w1"] = vocab["w1"], vocab["w0"]  # same size and specials, other ids
    (dirs["permuted-tokenizer"] / "tokenizer.json").write_text(json.dumps(tokenizer))
    _edit_json(dirs["other-special-tokens"] / "tokenizer_config.json", eos_token="w5")
    return dirs, sentinel


# --- decoding/: the loader and the pair checks -------------------------------------------------

def test_loader_refuses_pickle_and_remote_code_without_running_them(bad_models):
    from decoding.loading import load_model

    dirs, sentinel = bad_models
    for case in ("pickle-only", "remote-code", "tokenizer-remote-code"):
        with pytest.raises(ModelPairError, match=EXPECTED[case]):
            load_model(dirs[case])
    assert not sentinel.exists()


def test_decoder_refuses_a_draft_with_another_vocabulary(bad_models, tiny_pair):
    from decoding import SpeculativeDecoder
    from decoding.loading import load_model

    target = load_model(tiny_pair[0])
    with pytest.raises(ModelPairError, match="draft must share the target's tokenizer"):
        SpeculativeDecoder(target, load_model(bad_models[0]["other-vocab"]))
    SpeculativeDecoder(target, load_model(tiny_pair[1]))  # control: the real pair is accepted


def test_tokenizer_check_refuses_other_ids_and_other_special_tokens(bad_models, tiny_pair):
    from transformers import AutoTokenizer

    from decoding.models import check_tokenizers

    target = AutoTokenizer.from_pretrained(tiny_pair[0])
    check_tokenizers(target, AutoTokenizer.from_pretrained(tiny_pair[1]))  # control: same tokenizer
    for case in ("permuted-tokenizer", "other-special-tokens"):
        with pytest.raises(ModelPairError, match=EXPECTED[case]):
            check_tokenizers(target, AutoTokenizer.from_pretrained(bad_models[0][case]))


def test_config_pair_check_refuses_other_special_token_ids(tiny_pair):
    from transformers import AutoConfig

    from decoding.models import check_pair_configs

    target, draft = AutoConfig.from_pretrained(tiny_pair[0]), AutoConfig.from_pretrained(tiny_pair[1])
    check_pair_configs(target, draft)  # control
    draft.text_config.eos_token_id = 5
    with pytest.raises(ModelPairError, match="eos_token_id differs"):
        check_pair_configs(target, draft)
    draft.text_config.eos_token_id = target.text_config.eos_token_id
    draft.image_token_id = 4
    with pytest.raises(ModelPairError, match="image token id differs"):
        check_pair_configs(target, draft)


# --- the CLI: exit 2, one line, before any reading or Ray ---------------------------------------

@pytest.fixture
def no_work(monkeypatch):
    """Fail the test if the run gets as far as reading the input or starting Ray."""
    import pipeline.run

    def forbidden(*args, **kwargs):
        raise AssertionError("the run went past its pre-flight checks")

    monkeypatch.setattr(pipeline.run, "scan_input", forbidden)
    monkeypatch.setattr(pipeline.run, "ensure_ray", forbidden)


def _input_dir(tmp_path: Path) -> Path:
    src = tmp_path / "in"
    src.mkdir()
    pq.write_table(pa.table({"id": ["a", "b"], "image": [png_bytes(1), png_bytes(2)]}), src / "a.parquet")
    return src


@pytest.mark.parametrize("case", sorted(EXPECTED))
def test_cli_refuses_bad_draft_before_any_work(case, bad_models, tiny_pair, tmp_path, capsys, no_work):
    dirs, sentinel = bad_models
    output = tmp_path / "out"
    rc = cli(["caption", "--input", str(_input_dir(tmp_path)), "--output", str(output),
              "--target", tiny_pair[0], "--draft", str(dirs[case])])
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert err.startswith("specllava: error:") and "\n" not in err and EXPECTED[case] in err, err
    assert not output.exists(), "nothing may be written for a refused run"
    assert not sentinel.exists()


def test_cli_refuses_remote_code_target_on_s3(s3, bad_models, tiny_pair, tmp_path, capsys, no_work,
                                              monkeypatch):
    """An s3:// model prefix gets the same checks (listing + small files only)."""
    import pyarrow.fs as pafs

    monkeypatch.setenv("SPECLLAVA_MODEL_CACHE", str(tmp_path / "cache"))
    fs = s3.filesystem()
    bucket = s3.make_bucket("bad-models")
    for name, local in (("evil", bad_models[0]["remote-code"]), ("draft", Path(tiny_pair[1]))):
        pafs.copy_files(str(local), f"bad-models/{name}", source_filesystem=pafs.LocalFileSystem(),
                        destination_filesystem=fs)
    args = ["caption", "--input", str(_input_dir(tmp_path)), "--output", str(tmp_path / "out"),
            "--draft", f"{bucket}/draft", "--s3-endpoint", s3.endpoint]
    assert cli([*args, "--target", f"{bucket}/evil"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "--target s3://bad-models/evil: config.json asks for remote code" in err, err
    assert not bad_models[1].exists() and not (tmp_path / "out").exists()


def test_preflight_accepts_the_real_pair(tiny_pair):
    from pipeline.preflight import check_models

    check_models(*tiny_pair)  # the control of every refusal above
