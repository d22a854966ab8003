"""Scale benchmark (not a test): a dry run over millions of rows, the driver SIGKILLed at about
half, then `resume`. Results go to docs/benchmarks.md, "Ten million rows".

    python scripts/bench_scale.py --rows 10000000 --shards 200 --batch-size 16
    python scripts/bench_scale.py --rows 1000000 --shards 20 --batch-size 16 --s3   # on a moto S3 server

What it does:
1. writes ROWS rows of tiny valid PNGs (a pool of 64 distinct 8x8 images, stored uncompressed and
   without dictionary encoding, so every row costs its bytes) in SHARDS Parquet shards with row
   groups of 10,000 rows, ids unique; every 100,000th image is corrupt (an error row);
2. `specllava caption --dry-run` as a driver process (it starts a private local Ray, whose
   processes share the driver's fate); SIGKILL when half the rows are committed;
3. `specllava resume` (a new private Ray); times its first new commit;
4. `specllava query OUT "select status, count(*) from captions group by 1"` (wall time of the
   whole command, process start included), then count(*) and count(distinct id) over the table.
It samples each driver's peak RSS (VmHWM from /proc every 0.5 s), counts the objects under the
output, and prints one JSON object.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipeline.progress import CommittedRows  # noqa: E402

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def png_pool(n: int = 64) -> list[bytes]:
    from PIL import Image

    pool = []
    for i in range(n):
        buf = io.BytesIO()
        Image.new("RGB", (8, 8), (i * 4 % 256, i * 7 % 256, i * 13 % 256)).save(buf, format="PNG")
        pool.append(buf.getvalue())
    return pool


def write_dataset(fs, root: str, rows: int, shards: int) -> int:
    """Shards of (id, image); returns the bytes written."""
    pool = png_pool()
    per = -(-rows // shards)
    total = 0
    fs.create_dir(root, recursive=True)
    for s in range(shards):
        lo, hi = s * per, min(rows, (s + 1) * per)
        if lo >= hi:
            break
        ids = pa.array([f"{s:05d}-{i:09d}" for i in range(lo, hi)], pa.string())
        images = pa.array([b"not a png" if i % 100_000 == 99_999 else pool[i % len(pool)] for i in range(lo, hi)],
                          pa.binary())
        path = f"{root}/shard-{s:05d}.parquet"
        pq.write_table(pa.table({"id": ids, "image": images}), path, filesystem=fs, row_group_size=10_000,
                       use_dictionary=False, compression={"id": "snappy", "image": "none"})
        total += fs.get_file_info(path).size
    return total


class PeakRss(threading.Thread):
    """Peak resident memory of one process (VmHWM), sampled every 0.5 s until it exits."""

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.pid, self.peak_kib, self._stop = pid, 0, threading.Event()

    def run(self):
        while not self._stop.wait(0.5):
            try:
                with open(f"/proc/{self.pid}/status") as f:
                    for line in f:
                        if line.startswith("VmHWM:"):
                            self.peak_kib = max(self.peak_kib, int(line.split()[1]))
            except (OSError, ValueError):
                return

    def stop(self) -> None:
        self._stop.set()


def count_objects(fs, root: str) -> dict:
    infos = [e for e in fs.get_file_info(pafs.FileSelector(root, recursive=True)) if e.type == pafs.FileType.File]
    units = [e for e in infos if os.path.basename(e.path).startswith("unit-")]
    return {"objects": len(infos), "unit_files": len(units)}


def specllava(*argv: str) -> list[str]:
    return [sys.executable, "-m", "jobs.cli", *argv]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=10_000_000)
    p.add_argument("--shards", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--kill-at", type=float, default=0.5, help="fraction of rows committed when the driver dies")
    p.add_argument("--s3", action="store_true", help="input and output on a moto S3 server on 127.0.0.1")
    p.add_argument("--work", default=None, help="work dir (default: a temp dir, removed at the end)")
    p.add_argument("--keep", action="store_true")
    args = p.parse_args()

    work = Path(args.work or tempfile.mkdtemp(prefix="bench-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    report: dict = {"rows": args.rows, "shards": args.shards, "batch_size": args.batch_size, "s3": args.s3}
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
    moto = None
    try:
        extra: list[str] = []
        if args.s3:
            env.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1",
                       AWS_EC2_METADATA_DISABLED="true")
            os.environ.update({k: env[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                                   "AWS_DEFAULT_REGION", "AWS_EC2_METADATA_DISABLED")})
            port = free_port()
            moto = subprocess.Popen([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            endpoint = f"http://127.0.0.1:{port}"
            time.sleep(3)
            from workers.storage import s3_filesystem
            fs = s3_filesystem(endpoint)
            fs.create_dir("bench")
            in_root, out_root = "bench/in", "bench/out"
            input_uri, output_uri = "s3://bench/in", "s3://bench/out"
            extra = ["--s3-endpoint", endpoint]
        else:
            fs = pafs.LocalFileSystem()
            in_root, out_root = str(work / "in"), str(work / "out")
            input_uri, output_uri = in_root, out_root

        t = time.time()
        report["input_bytes"] = write_dataset(fs, in_root, args.rows, args.shards)
        report["dataset_s"] = round(time.time() - t, 1)
        print(f"dataset: {args.rows:,} rows, {report['input_bytes'] / 1e6:.0f} MB in {report['dataset_s']}s",
              file=sys.stderr)

        common = extra
        counter = CommittedRows(output_uri, extra[1] if extra else None)

        # 1. first run, killed at about half
        t0 = time.time()
        first = subprocess.Popen(specllava("caption", "--input", input_uri, "--output", output_uri, "--dry-run",
                                           "--batch-size", str(args.batch_size), "--progress-every", "30", *common),
                                 stdout=open(work / "first.log", "wb"), stderr=subprocess.STDOUT, env=env,
                                 cwd=ROOT)
        rss1 = PeakRss(first.pid)
        rss1.start()
        target = int(args.kill_at * args.rows)
        first_commit = None
        while True:
            done = counter.count()
            if done and first_commit is None:
                first_commit = time.time() - t0
            if done >= target:
                break
            if first.poll() is not None:
                raise RuntimeError(f"the first run ended before the kill (rc {first.returncode}); see {work}/first.log")
            time.sleep(1)
        first.send_signal(signal.SIGKILL)
        first.wait()
        rss1.stop()
        killed_s = time.time() - t0
        time.sleep(3)
        at_kill = counter.count()
        report["first_run"] = {"killed_after_s": round(killed_s, 1), "rows_committed": at_kill,
                               "rows_per_s": round(at_kill / killed_s, 1), "first_commit_s": round(first_commit, 1),
                               "driver_peak_rss_mb": round(rss1.peak_kib / 1024, 1)}
        print(f"first run: killed after {killed_s:.0f}s with {at_kill:,} rows committed", file=sys.stderr)

        # 2. resume
        units_before = count_objects(fs, out_root)["unit_files"]
        t1 = time.time()
        resume = subprocess.Popen(specllava("resume", output_uri, "--progress-every", "30", *common),
                                  stdout=open(work / "resume.log", "wb"), stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        rss2 = PeakRss(resume.pid)
        rss2.start()
        first_new = None
        while resume.poll() is None:
            if first_new is None and count_objects(fs, f"{out_root}/data")["unit_files"] > units_before:
                first_new = time.time() - t1
            time.sleep(1)
        rss2.stop()
        resume_s = time.time() - t1
        if resume.returncode != 0:
            raise RuntimeError(f"resume failed (rc {resume.returncode}); see {work}/resume.log")
        with fs.open_input_stream(f"{out_root}/_run.json") as stream:
            manifest = json.loads(stream.read())
        last = manifest["runs"][-1]
        report["resume"] = {"wall_s": round(resume_s, 1), "first_new_commit_s": first_new,
                            "rows_committed": last["rows"], "rows_per_s": round(last["rows"] / resume_s, 1),
                            "input_bytes_read": last["input_bytes_read"],
                            "input_bytes_read_share": round(last["input_bytes_read"] / manifest["input"]["bytes"], 3),
                            "driver_peak_rss_mb": round(rss2.peak_kib / 1024, 1)}
        report["table"] = manifest["counts"]
        report["status"] = manifest["status"]
        objects = count_objects(fs, out_root)
        report["objects"] = {**objects, "per_1m_rows": round(objects["objects"] / (args.rows / 1e6), 1)}
        print(f"resume: {resume_s:.0f}s, status {manifest['status']}", file=sys.stderr)

        # 3. query
        t2 = time.time()
        q = subprocess.run(specllava("query", output_uri, "select status, count(*) as n from captions group by 1 "
                                     "order by 1", *extra), capture_output=True, text=True, env=env, cwd=ROOT)
        report["query"] = {"wall_s": round(time.time() - t2, 2), "rc": q.returncode, "out": q.stdout.strip()}
        # exactly once, checked independently of the run's own counts
        q = subprocess.run(specllava("query", output_uri, "select count(*) as n, count(distinct id) as ids "
                                     "from captions", "--format", "json", *extra),
                           capture_output=True, text=True, env=env, cwd=ROOT)
        report["exactly_once"] = json.loads(q.stdout)[0] if q.returncode == 0 else q.stderr[-500:]
        print(json.dumps(report, indent=1))
        return 0
    finally:
        if moto is not None:
            moto.terminate()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
