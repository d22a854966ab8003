"""`specllava submit/status/logs/stop/list` and `resume --submit` against a real Ray head.

The module fixture starts a head with tests/ray_head.py (`ray start --head --block` on loopback
ports with its own temp dir, 4 logical CPUs), waits for its dashboard, and stops exactly that
head afterwards (never `ray stop`, which would kill every Ray on the machine). Jobs read and
write the session's moto S3.
"""
from __future__ import annotations

import json
import os
import shlex
import time

import pyarrow as pa
import pytest

from jobs.cli import main
from tests.pipeline_helpers import batch_delay, png_bytes, processed_inputs, reference_captions, write_shard

pytestmark = pytest.mark.slow
# Recognisable fake credentials: the head's (its jobs read S3 with them) and the submitter's.
HEAD_SECRET = "HEAD-FAKE-SECRET-7f3a91"
SUBMITTER_SECRET = "SUBMITTER-FAKE-SECRET-c24e08"


@pytest.fixture(scope="module")
def ray_head(s3, tmp_path_factory):
    """Dashboard address of a fresh Ray head (the s3 fixture's fake credentials are in its env)."""
    from tests.ray_head import ray_head as start_head

    env = dict(os.environ, AWS_SECRET_ACCESS_KEY=HEAD_SECRET, AWS_SESSION_TOKEN=HEAD_SECRET + "-token")
    with start_head(tmp_path_factory.mktemp("ray-head"), num_cpus=4, env=env) as head:
        yield head.dashboard_address


def _write_input(s3, bucket: str, shards: int, rows: int, seed: int) -> tuple[str, dict]:
    fs = s3.filesystem()
    uri = s3.make_bucket(bucket)
    images = {}
    for shard in range(shards):
        ids = [f"{bucket}-{shard}-{i:02d}" for i in range(rows)]
        data = [png_bytes(seed + shard * 100 + i) for i in range(rows)]
        images.update(zip(ids, data))
        write_shard(fs, f"{bucket}/in/{shard}.parquet", pa.table({"id": ids, "image": data}))
    return uri, images


def _cli_out(capsys, argv) -> tuple[int, str, str]:
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _wait_status(capsys, address: str, job: str, states, timeout_s: float = 420) -> str:
    deadline = time.time() + timeout_s
    while True:
        code, out, err = _cli_out(capsys, ["status", job, "--address", address])
        assert code == 0, err
        status = out.strip()
        assert status in {"PENDING", "RUNNING", "SUCCEEDED", "FAILED", "STOPPED"}, status
        if status in states:
            return status
        assert time.time() < deadline, f"job {job} still {status}"
        time.sleep(2)


def _query_json(capsys, output: str, endpoint: str, sql: str) -> list[dict]:
    code, out, err = _cli_out(capsys, ["query", output, sql, "--s3-endpoint", endpoint, "--format", "json"])
    assert code == 0, err
    return json.loads(out)


def _caption_flags(s3, tiny_pair, bucket_uri: str, output: str) -> list[str]:
    return ["--input", f"{bucket_uri}/in", "--output", output, "--target", tiny_pair[0], "--draft", tiny_pair[1],
            "--s3-endpoint", s3.endpoint, "--batch-size", "4", "--max-new-tokens", "8", "--stage-cpus", "0.25",
            "--cpus-per-actor", "0.5", "--progress-every", "1", "--commit-rows", "4"]


def test_submit_caption_job_logs_and_query(s3, tiny_pair, ray_head, capsys, monkeypatch):
    bucket_uri, images = _write_input(s3, "jobs-a", shards=2, rows=6, seed=500)
    output = f"{bucket_uri}/out"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SUBMITTER_SECRET)  # moto accepts any credentials
    code, out, err = _cli_out(capsys, ["submit", *_caption_flags(s3, tiny_pair, bucket_uri, output),
                                       "--address", ray_head])
    assert code == 0, err
    job = out.strip().splitlines()[-1]
    assert job.startswith("raysubmit_") and f"specllava logs {job} --follow" in err
    assert f"dashboard: {ray_head.rstrip('/')}/#/jobs/{job}" in err
    assert _wait_status(capsys, ray_head, job, {"SUCCEEDED", "FAILED", "STOPPED"}) == "SUCCEEDED", \
        _cli_out(capsys, ["logs", job, "--address", ray_head])[1][-3000:]

    code, logs, _ = _cli_out(capsys, ["logs", job, "--address", ray_head])
    assert code == 0 and "progress: " in logs and "table 12/12 ids (12 ok, 0 error)" in logs
    code, followed, _ = _cli_out(capsys, ["logs", job, "--follow", "--address", ray_head])  # ended: returns
    assert code == 0 and "table 12/12 ids" in followed
    # Credentials never travel with the job nor reach its log.
    from ray.job_submission import JobSubmissionClient
    info = JobSubmissionClient(ray_head).get_job_info(job)
    sent = json.dumps({"entrypoint": info.entrypoint, "runtime_env": info.runtime_env, "metadata": info.metadata})
    assert info.runtime_env["env_vars"] == {"PYTHONUNBUFFERED": "1", "SPECLLAVA_JOB_DASHBOARD": ray_head}
    for secret in (SUBMITTER_SECRET, HEAD_SECRET):
        assert secret not in sent and secret not in logs and secret not in out + err

    rows = _query_json(capsys, output, s3.endpoint, "SELECT id, status, caption FROM captions ORDER BY id")
    assert [r["id"] for r in rows] == sorted(images) and {r["status"] for r in rows} == {"ok"}
    # Lossless through the job path too: the target's own greedy captions.
    from workers.preprocess import Preprocessor
    refs = reference_captions(tiny_pair[0], processed_inputs(Preprocessor(tiny_pair[0]), images), 8)
    assert {r["id"]: r["caption"] for r in rows} == refs

    code, out, _ = _cli_out(capsys, ["list", "--address", ray_head])
    line = next(l for l in out.splitlines() if l.startswith(job))
    assert line.split()[1:2] == ["SUCCEEDED"] and output in line


def test_stop_then_resume_as_a_job(s3, tiny_pair, ray_head, capsys):
    from pipeline.progress import CommittedRows

    bucket_uri, images = _write_input(s3, "jobs-b", shards=3, rows=8, seed=900)
    output = f"{bucket_uri}/out"
    with batch_delay(1.5):  # travels to the job's actors as a drill variable (workers/drill.py)
        code, out, err = _cli_out(capsys, ["submit", *_caption_flags(s3, tiny_pair, bucket_uri, output),
                                           "--address", ray_head])
    assert code == 0, err
    job = out.strip().splitlines()[-1]
    committed = CommittedRows(output, s3.endpoint)
    deadline = time.time() + 420
    while committed.count() < 4:
        assert time.time() < deadline, "the job made no progress"
        status = _cli_out(capsys, ["status", job, "--address", ray_head])[1].strip()
        assert status in {"PENDING", "RUNNING"}, _cli_out(capsys, ["logs", job, "--address", ray_head])[1][-3000:]
        time.sleep(1)
    code, out, err = _cli_out(capsys, ["stop", job, "--address", ray_head])
    assert code == 0 and out.strip().splitlines()[0] == f"job {job}: STOPPED", (out, err)
    # The printed next step is pasted as is (plus --wait): it carries --submit, the endpoint, the head.
    hint = out.strip().splitlines()[-1].split(": ", 1)[1]
    argv = shlex.split(hint)
    assert argv[:4] == ["specllava", "resume", output, "--submit"] and s3.endpoint in argv and ray_head in argv
    done_at_stop = committed.count()
    assert done_at_stop < len(images), "the stop must land mid-run"

    fs = s3.filesystem()
    with fs.open_input_stream("jobs-b/out/_run.json") as stream:
        manifest = json.loads(stream.read())
    # Ray's driver turns SIGTERM into SystemExit(15) and run_caption records it (measured: "failed",
    # "SystemExit: 15"); "running" only if Ray's SIGKILL came before the manifest write.
    assert manifest["runs"][-1]["status"] in {"failed", "running"}, manifest["runs"][-1]

    code, out, err = _cli_out(capsys, argv[1:] + ["--wait"])
    assert code == 0, err
    resume_job = out.strip().splitlines()[-1]
    rows = _query_json(capsys, output, s3.endpoint,
                       "SELECT id, count(*) AS n, min(status) AS status FROM captions GROUP BY id ORDER BY id")
    assert [r["id"] for r in rows] == sorted(images)
    assert all(r["n"] == 1 and r["status"] == "ok" for r in rows)
    code, out, _ = _cli_out(capsys, ["stats", output, "--s3-endpoint", s3.endpoint, "--json"])
    stats = json.loads(out)
    assert stats["rows"] == stats["unique_ids"] == stats["input_rows"] == len(images)
    assert stats["status"] == "finished" and stats["runs"] == 2
    # Resuming a finished output: "nothing to do", exit 0, in seconds, and no run recorded.
    started = time.monotonic()
    code, out, _ = _cli_out(capsys, ["resume", output, "--s3-endpoint", s3.endpoint])
    assert code == 0 and "nothing to do" in out and f"{len(images)}/{len(images)} ids" in out, out
    assert time.monotonic() - started < 3.0
    code, out, _ = _cli_out(capsys, ["stats", output, "--s3-endpoint", s3.endpoint, "--json"])
    assert json.loads(out)["runs"] == 2
    code, out, _ = _cli_out(capsys, ["list", "--address", ray_head])
    statuses = {l.split()[0]: l.split()[1] for l in out.splitlines()[2:]}
    assert statuses[job] == "STOPPED" and statuses[resume_job] == "SUCCEEDED"


@pytest.mark.parametrize("argv, message", [
    (["status", "raysubmit_doesnotexist"], "no job 'raysubmit_doesnotexist'"),
    (["logs", "raysubmit_doesnotexist"], "no job 'raysubmit_doesnotexist'"),
    (["stop", "raysubmit_doesnotexist"], "no job 'raysubmit_doesnotexist'"),
    (["submit", "--input", "x", "--output", "y", "--actors", "two"], "--actors takes N or MIN,MAX"),
    (["submit", "--input", "x", "--output", "y", "--working-dir", "/"], "is not the specllava project"),
])
def test_job_command_errors_exit_2(ray_head, capsys, argv, message):
    code, _, err = _cli_out(capsys, [*argv, "--address", ray_head])
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and message in lines[0], err


def test_unreachable_address_exits_2(capsys):
    from tests.ray_head import free_ports

    address = f"http://127.0.0.1:{free_ports(1)[0]}"
    for argv in (["list"], ["status", "x"], ["submit", "--input", "x", "--output", "y"]):
        code, _, err = _cli_out(capsys, [*argv, "--address", address])
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and "cannot reach the Ray dashboard" in lines[0], err
