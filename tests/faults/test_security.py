"""Issue 6, Security: credentials never leak; weights only through safetensors; no remote code.

- A driver process run with a recognisable fake AWS secret and session token (moto accepts any
  credentials) captions a URI column that includes S3 errors (a missing bucket, a missing
  object), then two runs fail on S3 errors (an input prefix that does not exist, an unreachable
  endpoint). Neither the secret nor the token may appear in the driver's stdout/stderr, in any
  object under the output (_run.json, data, checkpoint), in the error column, or in any file of
  the Ray session's log directory (the workers' logs and the driver's own Ray logs).
- The preprocess stage, holding the secret itself, turns S3 errors into error rows without it.
- Static guard: no Python source in the repository calls a pickle loader (torch.load,
  pickle.load[s], ...), turns trust_remote_code on, or loads a model with from_pretrained
  without use_safetensors=True; and the loader really passes use_safetensors=True.
"""
from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pytest

from tests import REPO_ROOT
from tests.pipeline_helpers import CLI_SUBPROCESS, png_bytes, write_shard

SECRET = "SpecLlavaFakeSecret0x7c1d5e"
TOKEN = "SpecLlavaFakeToken0x2b9f04"
LEAKS = (SECRET.encode(), TOKEN.encode())


def _secret_env() -> dict:
    env = os.environ.copy()
    env.update(AWS_ACCESS_KEY_ID="AKIASPECLLAVAFAKE", AWS_SECRET_ACCESS_KEY=SECRET, AWS_SESSION_TOKEN=TOKEN)
    return env


def _assert_clean(where: str, data: bytes | str) -> None:
    data = data.encode() if isinstance(data, str) else data
    for leak in LEAKS:
        assert leak not in data, f"credential leaked into {where}"


def _ray_logs_dir() -> Path:
    import ray._private.worker as worker

    return Path(worker._global_node.get_logs_dir_path())


def test_credentials_never_reach_logs_manifest_or_error_columns(s3, ray_address, tiny_pair):
    fs = s3.filesystem()
    bucket = s3.make_bucket("secret-run")
    uris = {}
    for i in range(3):
        with fs.open_output_stream(f"secret-run/img/{i}.png") as stream:
            stream.write(png_bytes(900 + i))
        uris[f"good-{i}"] = f"{bucket}/img/{i}.png"
    uris["missing-object"] = f"{bucket}/img/not-there.png"
    uris["missing-bucket"] = "s3://no-such-bucket-secret/x.png"
    write_shard(fs, "secret-run/in/a.parquet", pa.table({"id": list(uris), "url": list(uris.values())}))

    def driver(*args: str) -> subprocess.CompletedProcess:
        cmd = [sys.executable, *CLI_SUBPROCESS, "caption", "--target", tiny_pair[0], "--draft", tiny_pair[1],
               "--address", ray_address, "--image-uri-column", "url", "--batch-size", "4",
               "--max-new-tokens", "8", "--stage-cpus", "0.25", "--cpus-per-actor", "0.5", *args]
        with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_secret_env(),
                              cwd=REPO_ROOT) as proc:
            stdout, stderr = proc.communicate(timeout=600)
        _assert_clean(f"the output of `specllava caption {' '.join(args)}`", stdout + stderr)
        return subprocess.CompletedProcess(proc.pid, proc.returncode, stdout, stderr)  # args: the pid

    run = driver("--input", f"{bucket}/in", "--output", f"{bucket}/out", "--s3-endpoint", s3.endpoint)
    assert run.returncode == 0, run.stderr.decode()[-3000:]
    assert b"rows decoded this run" in run.stdout  # the stream checked above is the real report

    missing_input = driver("--input", f"{bucket}/nothing-here", "--output", f"{bucket}/out2",
                           "--s3-endpoint", s3.endpoint)
    assert missing_input.returncode == 2 and b"input not found" in missing_input.stderr
    unreachable = driver("--input", f"{bucket}/in", "--output", f"{bucket}/out3",
                         "--s3-endpoint", "http://127.0.0.1:1")
    assert unreachable.returncode == 2 and b"Could not connect" in unreachable.stderr

    objects = [e.path for e in fs.get_file_info(pafs.FileSelector("secret-run/out", recursive=True))
               if e.type == pafs.FileType.File]
    assert "secret-run/out/_run.json" in objects and any("/data/" in p for p in objects)
    for path in objects:
        with fs.open_input_stream(path) as stream:
            _assert_clean(path, stream.read())
    import pyarrow.dataset as pads
    rows = {r["id"]: r for r in pads.dataset("secret-run/out/data", filesystem=fs, format="parquet")
            .to_table().to_pylist()}
    assert sorted(rows) == sorted(uris)
    assert rows["missing-bucket"]["status"] == rows["missing-object"]["status"] == "error"
    _assert_clean("the output table", repr(sorted(rows.items())))

    logs = [p for p in _ray_logs_dir().rglob("*") if p.is_file()]
    # The driver's own Ray log (it held the secret) is among the files checked, next to the workers'.
    assert any(p.name.startswith("python-core-driver-") and p.name.endswith(f"_{run.args}.log") for p in logs)
    assert any(p.name.startswith("worker-") for p in logs)
    for path in logs:
        _assert_clean(str(path), path.read_bytes())


def test_preprocess_errors_from_s3_do_not_carry_credentials(s3, tiny_pair, monkeypatch):
    """The stage that fetches URIs holds the secret itself; its S3 errors still do not show it."""
    from workers.preprocess import Preprocessor

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("AWS_SESSION_TOKEN", TOKEN)
    uris = ["s3://no-such-bucket-secret/x.png", "s3://secret-run/img/not-there.png"]
    table = pa.table({"id": ["a", "b"], "url": uris})
    for endpoint in (s3.endpoint, "http://127.0.0.1:1"):  # S3 answers with an error / no S3 at all
        out = Preprocessor(tiny_pair[0], image_column=None, image_uri_column="url", s3_endpoint=endpoint)(table)
        errors = out.column("error").to_pylist()
        assert out.column("status").to_pylist() == ["error", "error"] and all(errors), errors
        _assert_clean(f"error column via {endpoint}", repr(errors))


@pytest.mark.parametrize("option", ["--input", "--output", "--target", "--draft"])
def test_credentials_in_a_path_are_refused_without_echoing_them(tmp_path, tiny_pair, capsys, option):
    """pyarrow accepts s3://KEY:SECRET@bucket/...; the CLI refuses it before using the path and
    does not repeat it (it would otherwise be echoed in errors and stored in _run.json)."""
    from tests.pipeline_helpers import cli

    args = {"--input": str(tmp_path / "in"), "--output": str(tmp_path / "out"), "--target": tiny_pair[0],
            "--draft": tiny_pair[1]}
    args[option] = f"s3://AKIASPECLLAVAFAKE:{SECRET}@some-bucket/path"
    rc = cli(["caption", *[part for item in args.items() for part in item]])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and f"{option} must not contain credentials" in err and "\n" not in err, err
    _assert_clean("the error message", err)
    assert not (tmp_path / "out").exists()


# --- static guard ---------------------------------------------------------------------------------

PICKLE_LOADERS = {"torch.load", "pickle.load", "pickle.loads", "cPickle.load", "cPickle.loads", "dill.load",
                  "dill.loads", "cloudpickle.load", "cloudpickle.loads", "joblib.load", "pd.read_pickle",
                  "pandas.read_pickle", "torch.serialization.load"}
MODEL_CLASS = re.compile(r"(ForConditionalGeneration|ForCausalLM|^AutoModel|Model)$")


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


def unsafe_loads(source: str, filename: str = "<source>") -> list[str]:
    """Every place in `source` that could unpickle, run remote code, or load non-safetensors weights."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        where = f"{filename}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.ImportFrom) and node.module in ("pickle", "torch", "dill", "cloudpickle", "joblib"):
            found += [f"{where} imports {node.module}.{a.name}" for a in node.names if a.name in ("load", "loads")]
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func)
        keywords = {k.arg: k.value for k in node.keywords if k.arg}
        if name in PICKLE_LOADERS:
            found.append(f"{where} calls {name}")
        if name.endswith(("np.load", "numpy.load")) and "allow_pickle" in keywords:
            found.append(f"{where} calls {name} with allow_pickle")
        remote = keywords.get("trust_remote_code")
        if remote is not None and not (isinstance(remote, ast.Constant) and remote.value is False):
            found.append(f"{where} passes trust_remote_code other than False")
        if name.endswith(".from_pretrained") and MODEL_CLASS.search(name.rsplit(".", 2)[-2]):
            safe = keywords.get("use_safetensors")
            if not (isinstance(safe, ast.Constant) and safe.value is True):
                found.append(f"{where} loads {name.rsplit('.', 1)[0]} without use_safetensors=True")
    return found


def _python_sources() -> list[Path]:
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "*.py"], cwd=REPO_ROOT,
                            capture_output=True, text=True, check=True).stdout.split()
    return [REPO_ROOT / p for p in listed if (REPO_ROOT / p).is_file()]


def test_static_guard_finds_what_it_looks_for():
    bad = ("import torch, pickle\nfrom pickle import loads\n"
           "torch.load('w.pt')\npickle.loads(b'')\nnp.load('a.npy', allow_pickle=True)\n"
           "AutoTokenizer.from_pretrained('x', trust_remote_code" "=True)\n"  # split: the text scan reads this file
           "LlavaForConditionalGeneration.from_pretrained('x')\n"
           "AutoModelForCausalLM.from_pretrained('x', use_safetensors=False)\n")
    assert len(unsafe_loads(bad)) == 7
    good = ("LlavaForConditionalGeneration.from_pretrained('x', use_safetensors=True, trust_remote_code=False)\n"
            "AutoProcessor.from_pretrained('x')\njson.load(f)\n")
    assert unsafe_loads(good) == []


def test_no_source_unpickles_or_runs_remote_code():
    sources = _python_sources()
    assert len(sources) > 50 and any(p.name == "loading.py" for p in sources)
    found = []
    for path in sources:
        text = path.read_text()
        found += unsafe_loads(text, str(path.relative_to(REPO_ROOT)))
        # Also outside calls (a dict of kwargs, a string passed on): the literal setting.
        if re.search(r"trust_remote_code\s*[=:]\s*True|['\"]trust_remote_code['\"]\s*:\s*True", text):
            found.append(f"{path.relative_to(REPO_ROOT)} sets trust_remote_code True")
    assert not found, found


def test_loader_passes_use_safetensors_and_no_remote_code(tiny_pair, monkeypatch):
    import decoding.loading as loading
    from tests.decoding.test_loading import _spy_from_pretrained

    calls = _spy_from_pretrained(monkeypatch)
    loading.load_model(tiny_pair[0])
    assert len(calls) == 1
    assert calls[0]["use_safetensors"] is True and calls[0]["trust_remote_code"] is False
