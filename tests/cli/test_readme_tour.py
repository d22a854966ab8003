"""The README's 5-minute tour and its Ray-jobs section run as written, so the docs cannot rot.

The tour's ```bash block is taken from README.md and run by bash, changed only where a test
must: the venv's bin dir goes on PATH instead of `source .venv/bin/activate`, the moto server
gets a free port instead of 9000 (every 9000 in the block), the "Ctrl-C it halfway" caption is
sent SIGINT once its first unit is committed (with the fault drills' SPECLLAVA_DRILL_BATCH_DELAY
pacing the actors and SPECLLAVA_DRILL_PAUSE_FILE holding them from then on until it has exited,
so that lands mid-run on any machine), and the work happens in a temp dir. Everything
else (commands, flags, the S3 bucket and prefixes, the hint the interrupted run prints) is the
README's; a command that fails fails the test (`set -e`).

The Ray-jobs block then runs in the same shell (its jobs read the tour's dataset), changed as
little: `ray start --head` is a real head the test starts on loopback ports (tests/ray_head.py;
its address exported as RAY_API_SERVER_ADDRESS, which `submit` reads), `raysubmit_XXXX` is the
id `submit` printed last, `logs --follow` is Ctrl-C'd (SIGINT) once a progress line shows a
commit, and the job's actors are held from then on (SPECLLAVA_DRILL_PAUSE_FILE) until after
`stop`, so that `stop` meets a running job on a machine of any speed, and the id `resume --submit` prints is followed to
its end before the table is checked.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from tests import REPO_ROOT
from tests.ray_head import free_ports

README = (REPO_ROOT / "README.md").read_text()


def readme_block(heading: str) -> str:
    """The first ```bash block after `heading`."""
    start = README.index(heading)
    match = re.search(r"```bash\n(.*?)\n```", README[start:], re.S)
    assert match, f"no bash block after {heading!r}"
    return match.group(1)


def jobs_script(dashboard: str) -> str:
    block = readme_block("### As Ray jobs")
    assert "raysubmit_XXXX" in block and block.startswith("ray start --head")
    # The jobs' actors hold after their batch while this file exists (workers/drill.py); the test
    # creates it once the followed log shows a commit, so `status` and `stop` meet a running job on
    # any machine, and removes it after the stop.
    # A slower pace for the jobs than the tour's (submit passes the shell's drill variables on): the
    # followed log's progress lines come every 10 s, and the first to show a commit must come
    # before the job's end.
    lines = ["export SPECLLAVA_DRILL_PAUSE_FILE=$PWD/hold-the-job   # the test: passed to the jobs by submit",
             "export SPECLLAVA_DRILL_BATCH_DELAY=1.5   # the test: 25 batches of 8 rows, ~40 s a job"]
    for line in block.splitlines():
        command = line.split("  #")[0].rstrip()          # the README's end-of-line comments
        if command.startswith("ray start --head"):
            lines.append(f"export RAY_API_SERVER_ADDRESS={dashboard}   # the test's head")
        elif command.startswith("specllava submit"):
            lines.append(f"JOB=$({command} | tail -n 1); echo submitted $JOB")
        elif "--follow" in command:
            lines.append("interrupt_after_logged_commit " + command.replace("raysubmit_XXXX", "$JOB"))
        elif command.startswith("specllava stop"):
            lines.append(command.replace("raysubmit_XXXX", "$JOB"))
            lines.append("rm -f $SPECLLAVA_DRILL_PAUSE_FILE   # the test: the resumed job runs unpaused")
        elif command.startswith("specllava resume") and "--submit" in command:
            lines.append(f"JOB2=$({command} | tail -n 1); echo resumed as $JOB2")
        else:
            lines.append(command.replace("raysubmit_XXXX", "$JOB"))
    lines.append("specllava logs $JOB2 --follow > resumed-job.log 2>&1   # the test: wait for the resumed job")
    lines.append("specllava logs $JOB > stopped-job.log 2>&1   # the test: the stopped job's whole log")
    lines.append("specllava query s3://tour/captions2 \"SELECT status, count(*) AS n, count(DISTINCT id) AS ids "
                 "FROM captions GROUP BY status\" $S3 --format json")
    return "\n".join(lines) + "\n"


def tour_script(port: int, work: Path) -> str:
    block = readme_block("## A 5-minute tour")
    assert "source .venv/bin/activate" in block and "9000" in block and "specllava caption" in block
    lines = []
    for line in block.replace("9000", str(port)).splitlines():
        if line.strip() == "source .venv/bin/activate":
            line = f"export PATH={Path(sys.executable).parent}:$PATH"
        elif line.startswith("specllava caption "):
            line = f"interrupt_after_first_commit {line}"
        lines.append(line)
    preamble = f"""set -euo pipefail
cd {work}
trap 'kill $(jobs -p) 2>/dev/null || true' EXIT
# The tour's "Ctrl-C it halfway": SIGINT to the caption once its first unit is committed.
# (set -m: a script's background job would otherwise start with SIGINT ignored, as bash does)
interrupt_after_first_commit() {{
  set -m
  "$@" > caption.log 2>&1 &
  local pid=$!
  set +m
  until python -c "import pyarrow.fs as f, sys; fs = f.S3FileSystem(endpoint_override='http://127.0.0.1:{port}', scheme='http'); sys.exit(not [i for i in fs.get_file_info(f.FileSelector('tour/captions/data', allow_not_found=True)) if i.base_name.startswith('unit-')])"; do
    kill -0 $pid 2>/dev/null || {{ echo "caption ended before its first commit"; cat caption.log; exit 1; }}
    sleep 0.5
  done
  touch "$SPECLLAVA_DRILL_PAUSE_FILE"   # its actors hold from their next batch on: the Ctrl-C lands mid-run
  # Ctrl-C, and once more if the first did not stop it within 30 s (seen once on a loaded box);
  # then give up loudly rather than hang
  local tries
  for tries in 1 2; do
    kill -INT $pid 2>/dev/null || true
    for _ in $(seq 60); do kill -0 $pid 2>/dev/null || break; sleep 0.5; done
    kill -0 $pid 2>/dev/null || break
    echo "caption still running 30 s after Ctrl-C number $tries"
  done
  if kill -0 $pid 2>/dev/null; then kill -9 $pid; rm -f "$SPECLLAVA_DRILL_PAUSE_FILE"; exit 1; fi
  local rc=0; wait $pid || rc=$?
  rm -f "$SPECLLAVA_DRILL_PAUSE_FILE"
  echo "interrupted caption exited $rc"
}}
# The Ctrl-C on `logs --follow`: SIGINT once a progress line shows a committed row.
interrupt_after_logged_commit() {{
  set -m
  "$@" > follow.log 2>&1 &
  local pid=$!
  set +m
  until grep -qE "progress: [1-9][0-9]*/" follow.log; do
    kill -0 $pid 2>/dev/null || {{ echo "logs --follow ended before a commit"; cat follow.log; exit 1; }}
    sleep 0.5
  done
  touch "$SPECLLAVA_DRILL_PAUSE_FILE"   # the job's actors hold from their next batch on
  kill -INT $pid
  for _ in $(seq 60); do kill -0 $pid 2>/dev/null || break; sleep 0.5; done
  if kill -0 $pid 2>/dev/null; then echo "logs --follow ignored Ctrl-C for 30 s"; kill -9 $pid; exit 1; fi
  wait $pid || true
}}
# moto answers only once it listens: wait for it after the line that starts it
wait_for_moto() {{ for _ in $(seq 100); do python -c "import socket; socket.create_connection(('127.0.0.1', {port}), 0.2)" 2>/dev/null && return; sleep 0.2; done; exit 1; }}
"""
    # The test's own check after the tour: the interrupted run is in _run.json with its wall time and rows.
    lines.append(f"python -c \"import json, pyarrow.fs as f; fs = f.S3FileSystem(endpoint_override='http://127.0.0.1:{port}', "
                 "scheme='http'); print('runs:', json.dumps([{k: r.get(k) for k in ('status', 'rows', 'wall_s')} "
                 "for r in json.load(fs.open_input_stream('tour/captions/_run.json'))['runs']]))\"")
    script = "\n".join(lines)
    script = re.sub(r"(moto_server [^\n]*&)", r"\1\nwait_for_moto", script, count=1)
    return preamble + script + "\n"


def test_the_readme_tour_and_ray_jobs_run_as_written(tmp_path):
    from tests.ray_head import ray_head

    port = free_ports(1)[0]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "RAY_ADDRESS", "RAY_API_SERVER"))}
    env["SPECLLAVA_DRILL_BATCH_DELAY"] = "0.6"   # a batch of 8 rows per 0.6 s: 4 units of 50 over ~15 s
    # The caption's actors hold while this file exists (workers/drill.py): the test creates it when
    # the first unit is committed, so the Ctrl-C lands mid-run however slow the poll is (a loaded
    # CI box once let the caption finish first), and removes it once the caption has exited.
    env["SPECLLAVA_DRILL_PAUSE_FILE"] = str(tmp_path / "hold-the-job")
    # The head's jobs: the tour's fake credentials (the tour exports them in its shell). Their pace and
    # pause file are the submitting shell's (jobs_script), which submit passes to the job.
    # RAY_JOB_STOP_WAIT_TIME_S: Ray's job supervisor SIGKILLs a stopped job 3 s after its SIGTERM by
    # default; a loaded 2-core box can need longer to record the run and print the resume line.
    head_env = dict(env, AWS_ACCESS_KEY_ID="demo", AWS_SECRET_ACCESS_KEY="demo", AWS_DEFAULT_REGION="us-east-1",
                    RAY_JOB_STOP_WAIT_TIME_S="30")
    with ray_head(tmp_path, num_cpus=4, env=head_env) as head:
        script = tour_script(port, tmp_path) + jobs_script(head.dashboard_address)
        (tmp_path / "tour.sh").write_text(script)
        proc = subprocess.run(["bash", str(tmp_path / "tour.sh")], cwd=REPO_ROOT, env=env, capture_output=True,
                              text=True, timeout=1200)
    out = proc.stdout + proc.stderr
    caption_log = (tmp_path / "caption.log").read_text() if (tmp_path / "caption.log").exists() else ""
    assert proc.returncode == 0, out[-4000:] + "\n--- caption.log ---\n" + caption_log[-3000:]
    # The interrupted run stopped with the pasteable hint the tour's next line is.
    rc = int(re.search(r"interrupted caption exited (\d+)", out).group(1))
    assert rc != 0, caption_log[-2000:]
    assert f"specllava resume s3://tour/captions --s3-endpoint http://127.0.0.1:{port}" in caption_log
    # The resume finished the table: 200 ok rows, each id once (the query's own output).
    assert re.search(r"ok\s+200", out), out[-3000:]
    assert "mean_accepted" in out
    # The interrupted run is recorded with what it did (stats counts its wall time), then the resume.
    import json
    runs = json.loads(re.search(r"^runs: (.*)$", out, re.M).group(1))
    assert [r["status"] for r in runs] == ["interrupted", "finished"], runs
    assert runs[0]["wall_s"] > 0 and runs[0]["rows"] >= 50 and runs[0]["rows"] + runs[1]["rows"] >= 200, runs
    assert (tmp_path / "accepted.png").stat().st_size > 1000
    # The jobs: the first was stopped mid-run (its logs showed a commit), the resumed job finished
    # the table: 200 ok rows, 200 distinct ids.
    assert re.search(r"submitted raysubmit_\w+", out) and re.search(r"resumed as raysubmit_\w+", out), out[-3000:]
    assert "progress: " in (tmp_path / "follow.log").read_text()
    assert re.search(r'"status": "ok",\s*"n": 200,\s*"ids": 200', out), out[-3000:]
    # The console carries our lines only: none of Ray's native core lines (pipeline/console.py), and
    # the stopped job says it was stopped, without a native stack dump.
    stopped = (tmp_path / "stopped-job.log").read_text()
    resumed = (tmp_path / "resumed-job.log").read_text()
    for name, text in (("tour", out), ("caption.log", caption_log), ("stopped", stopped), ("resumed", resumed)):
        assert "core_worker.cc" not in text and "max_restarts > 0" not in text, f"{name}: " + text[-3000:]
    assert "stopped by SIGTERM" in stopped and "SIGTERM received" not in stopped and "PC: @" not in stopped, stopped
