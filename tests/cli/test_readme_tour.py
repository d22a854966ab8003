"""The README's 5-minute tour runs as written, so the docs cannot rot.

The tour's ```bash block is taken from README.md and run by bash, changed only where a test
must: the venv's bin dir goes on PATH instead of `source .venv/bin/activate`, the moto server
gets a free port instead of 9000 (every 9000 in the block), the "Ctrl-C it halfway" caption is
sent SIGINT once its first unit is committed (with the fault drills' SPECLLAVA_DRILL_BATCH_DELAY
pacing the actors, so that lands mid-run on any machine), and the work happens in a temp dir. Everything
else (commands, flags, the S3 bucket and prefixes, the hint the interrupted run prints) is the
README's; a command that fails fails the test (`set -e`).
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
  kill -INT $pid
  local rc=0; wait $pid || rc=$?
  echo "interrupted caption exited $rc"
}}
# moto answers only once it listens: wait for it after the line that starts it
wait_for_moto() {{ for _ in $(seq 100); do python -c "import socket; socket.create_connection(('127.0.0.1', {port}), 0.2)" 2>/dev/null && return; sleep 0.2; done; exit 1; }}
"""
    script = "\n".join(lines)
    script = re.sub(r"(moto_server [^\n]*&)", r"\1\nwait_for_moto", script, count=1)
    return preamble + script + "\n"


def test_the_readme_tour_runs_as_written(tmp_path):
    port = free_ports(1)[0]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "RAY_ADDRESS"))}
    env["SPECLLAVA_DRILL_BATCH_DELAY"] = "0.6"   # a batch of 8 rows per 0.6 s: 4 units of 50 over ~15 s
    script = tour_script(port, tmp_path)
    (tmp_path / "tour.sh").write_text(script)
    proc = subprocess.run(["bash", str(tmp_path / "tour.sh")], cwd=REPO_ROOT, env=env, capture_output=True,
                          text=True, timeout=900)
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
    assert (tmp_path / "accepted.png").stat().st_size > 1000
