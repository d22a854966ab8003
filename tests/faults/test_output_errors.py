"""Issue 6, item 4: an output that cannot be written is a clear user error (exit 2, one line)
before any decoding starts, and refusing it writes nothing anywhere.

Cases: a missing bucket (refused, never created by accident), an output that is an S3 object,
a local output below a regular file, a local read-only directory (a probe write finds it even
as root, which ignores permission bits), an unreachable S3 endpoint. Controls: a writable S3
prefix and a new local directory pass and keep no probe object.
"""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from tests.pipeline_helpers import cli, png_bytes, write_shard


@pytest.fixture
def no_ray(monkeypatch):
    """Fail the test if the run starts Ray (decoding needs it); returns a switch that also
    forbids reading the input, for refusals the cheap early checks must make."""
    import pipeline.run

    def forbidden(*args, **kwargs):
        raise AssertionError("the run went past its pre-flight checks")

    monkeypatch.setattr(pipeline.run, "ensure_ray", forbidden)
    return lambda: monkeypatch.setattr(pipeline.run, "scan_input", forbidden)


def _caption(tiny_pair, input_uri: str, output: str, *extra) -> list[str]:
    return ["caption", "--input", input_uri, "--output", output, "--target", tiny_pair[0],
            "--draft", tiny_pair[1], *extra]


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("specllava: error:") and "\n" not in err, err
    return err


@pytest.fixture(scope="module")
def s3_input(s3):
    fs = s3.filesystem()
    bucket = s3.make_bucket("out-errors")
    write_shard(fs, "out-errors/in/a.parquet", pa.table({"id": ["a", "b"], "image": [png_bytes(1), png_bytes(2)]}))
    return bucket


def test_missing_output_bucket_is_refused_and_not_created(s3, s3_input, tiny_pair, capsys, no_ray):
    no_ray()
    rc = cli(_caption(tiny_pair, f"{s3_input}/in", "s3://no-such-out-bucket/captions",
                      "--s3-endpoint", s3.endpoint))
    assert rc == 2
    assert "output bucket 'no-such-out-bucket' does not exist" in _one_line_error(capsys)
    assert s3.filesystem().get_file_info("no-such-out-bucket").type == pafs.FileType.NotFound


def test_output_that_is_an_object_is_refused(s3, s3_input, tiny_pair, capsys, no_ray):
    no_ray()
    rc = cli(_caption(tiny_pair, f"{s3_input}/in", f"{s3_input}/in/a.parquet", "--s3-endpoint", s3.endpoint))
    assert rc == 2
    assert "is an object, not a prefix" in _one_line_error(capsys)


def test_unreachable_store_is_a_clear_error(s3_input, tmp_path, tiny_pair, capsys, no_ray):
    no_ray()
    rc = cli(_caption(tiny_pair, f"{s3_input}/in", f"{s3_input}/out", "--s3-endpoint", "http://127.0.0.1:1"))
    assert rc == 2
    assert "cannot read --input" in _one_line_error(capsys)  # the input is checked first
    # a reachable input with an unreachable output store
    local = _local_input(tmp_path)
    rc = cli(_caption(tiny_pair, local, f"{s3_input}/out", "--s3-endpoint", "http://127.0.0.1:1"))
    assert rc == 2
    assert "cannot reach --output" in _one_line_error(capsys)


def _local_input(tmp_path: Path) -> str:
    (tmp_path / "in").mkdir()
    pq.write_table(pa.table({"id": ["a"], "image": [png_bytes(3)]}), tmp_path / "in" / "a.parquet")
    return str(tmp_path / "in")


def test_local_output_below_a_file_is_refused(tmp_path, tiny_pair, capsys, no_ray):
    no_ray()
    (tmp_path / "blocker").write_text("a file where a directory should be")
    rc = cli(_caption(tiny_pair, _local_input(tmp_path), str(tmp_path / "blocker" / "out")))
    assert rc == 2
    assert "blocker is a file, not a directory" in _one_line_error(capsys)


@pytest.fixture
def read_only_dir(tmp_path):
    """A directory no one can create files in: mode 0555, or immutable (chattr +i) for root, who
    ignores permission bits. The test is skipped only if neither really blocks a write here."""
    path = tmp_path / "ro"
    path.mkdir()
    immutable = os.geteuid() == 0 and shutil.which("chattr") is not None
    if immutable:
        subprocess.run(["chattr", "+i", str(path)], check=False, capture_output=True)
    else:
        path.chmod(0o555)
    try:
        try:
            (path / "probe").write_text("x")
        except OSError:
            yield path
        else:
            pytest.skip("cannot make a read-only directory on this machine")
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", str(path)], check=False, capture_output=True)
        path.chmod(0o755)


def test_read_only_local_output_is_refused_before_decoding(tmp_path, read_only_dir, tiny_pair, capsys, no_ray):
    rc = cli(_caption(tiny_pair, _local_input(tmp_path), str(read_only_dir / "out")))
    assert rc == 2
    err = _one_line_error(capsys)
    assert "ro is not writable" in err or "cannot write to --output" in err, err
    assert not os.listdir(read_only_dir)


def test_probe_leaves_nothing_behind(s3, s3_input, tmp_path):
    from pipeline.preflight import check_output_writable

    check_output_writable(f"{s3_input}/fresh/out", s3.endpoint)
    fs = s3.filesystem()
    keys = [e.path for e in fs.get_file_info(pafs.FileSelector("out-errors", recursive=True))]
    assert not [k for k in keys if "_write_probe" in k], keys
    check_output_writable(str(tmp_path / "new" / "out"))
    assert os.listdir(tmp_path / "new" / "out") == []


def test_input_and_column_errors_come_before_models_and_ray(tmp_path, tiny_pair, capsys, no_ray, monkeypatch):
    """A wrong --input or image column is refused by the first, cheapest check: before the models
    are read, the output is touched or Ray starts; a missing column names the flag to pass."""
    import pipeline.preflight

    no_ray()
    monkeypatch.setattr(pipeline.preflight, "check_models", lambda *a, **k: pytest.fail("models read first"))
    output = tmp_path / "out"
    assert cli(_caption(tiny_pair, str(tmp_path / "nothing"), str(output))) == 2
    assert "input not found" in _one_line_error(capsys)
    (tmp_path / "in").mkdir()
    pq.write_table(pa.table({"key": ["a"], "jpeg": [png_bytes(1)], "link": ["s3://b/a.png"]}),
                   tmp_path / "in" / "a.parquet")
    assert cli(_caption(tiny_pair, str(tmp_path / "in"), str(output))) == 2
    err = _one_line_error(capsys)
    assert "no column 'id' (columns: key, jpeg, link); pass --id-column key or --id-column link" in err, err
    assert cli(_caption(tiny_pair, str(tmp_path / "in"), str(output), "--id-column", "key")) == 2
    err = _one_line_error(capsys)
    assert ("no column 'image' (columns: key, jpeg, link); pass --image-column jpeg (image bytes) or "
            "--image-uri-column link (image URIs)") in err, err
    assert not output.exists()


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux /proc (a directory nobody can write)")
def test_output_that_cannot_be_created_is_a_user_error(tmp_path, tiny_pair, capsys, no_ray):
    """Where even root cannot create a directory (/proc), the refusal is one line, exit 2: not a
    "run failed, recorded in _run.json" about a _run.json that cannot exist."""
    no_ray()
    (tmp_path / "in").mkdir()
    pq.write_table(pa.table({"id": ["a"], "image": [png_bytes(1)]}), tmp_path / "in" / "a.parquet")
    assert cli(_caption(tiny_pair, str(tmp_path / "in"), "/proc/specllava-out")) == 2
    err = _one_line_error(capsys)
    assert "--output /proc/specllava-out" in err and "_run.json" not in err, err
