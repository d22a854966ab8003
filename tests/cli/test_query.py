"""`specllava query` / `stats` over a hand-built output table, and `--config FILE.yaml` for every
subcommand (keys = option names, flags win, clear errors)."""
from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from jobs.cli import build_parser, main, subcommands
from tests import REPO_ROOT
from workers.schema import output_schema

ROWS = [  # id, caption, status, error, new_tokens, target_forwards, accepted_lengths
    ("a", "a red circle", "ok", None, 7, 3, [3, 3]),
    ("b", "two blue squares", "ok", None, 9, 5, [2, 2, 2, 2]),
    ("c", None, "error", "UnidentifiedImageError: cannot identify image file", None, None, None),
    ("d", "a green, tall triangle", "ok", None, 4, 4, [1, 1, 1]),
]


DRAFTED = {"a": 4, "b": 0, "d": 2}   # draft_tokens: b's 4 verify steps drafted nothing


def _output_table() -> pa.Table:
    schema = output_schema()
    cols = {name: [] for name in schema.names}
    for key, caption, status, error, new, fwd, acc in ROWS:
        row = dict(id=key, caption=caption, status=status, error=error, new_tokens=new, target_forwards=fwd,
                   mean_accepted=None if acc is None else sum(acc) / len(acc), accepted_lengths=acc,
                   draft_tokens=DRAFTED.get(key), tree_nodes_mean=None, decode_s=None)
        for name in schema.names:
            cols[name].append(row[name])
    return pa.Table.from_pydict(cols, schema=schema)


@pytest.fixture()
def output(tmp_path):
    (tmp_path / "data").mkdir()
    table = _output_table()
    pq.write_table(table.slice(0, 2), tmp_path / "data" / "unit-00000000.parquet")
    pq.write_table(table.slice(2), tmp_path / "data" / "unit-00000001.parquet")
    # Never part of the table: a commit in progress (hidden temporary), a file not named as a unit,
    # and anything outside data/.
    pq.write_table(table.slice(0, 1), tmp_path / "data" / ".unit-00000002.parquet.tmp77")
    pq.write_table(table.slice(0, 1), tmp_path / "data" / "orphan.parquet")
    pq.write_table(pa.table({"id": ["zzz"]}), tmp_path / "_plan.parquet")
    manifest = {"status": "finished", "input": {"rows": 4, "commit_rows": 2},
                "runs": [{"rows": 4, "new_tokens": 20, "wall_s": 2.0,
                          "tree_budget": [{"actor": "h:1", "device": "cpu", "budget": "batch>=1: 8 nodes/depth 4",
                                          "remeasures": [{"reason": "at batch 1 (2 nodes/depth 2) steps take 5.0 ms, "
                                                          "calibrated 9.0 ms over 64 steps",
                                                          "budget": "batch>=1: 8 nodes/depth 4", "seconds": 1.5}]}]},
                         {"status": "failed"}]}
    (tmp_path / "_run.json").write_text(json.dumps(manifest))
    return str(tmp_path)


def test_query_formats(output, capsys):
    sql = "SELECT id, status FROM captions ORDER BY id"
    assert main(["query", output, sql, "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows == [{"id": k, "status": s} for k, _, s, *_ in ROWS]
    assert main(["query", output, sql, "--format", "csv"]) == 0
    assert capsys.readouterr().out.splitlines() == ['"id","status"', '"a","ok"', '"b","ok"', '"c","error"',
                                                    '"d","ok"']
    assert main(["query", output, "SELECT status, count(*) AS n FROM captions GROUP BY status ORDER BY n"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["status", "n"] and out[2].split() == ["error", "1"] and out[3].split() == ["ok", "3"]
    assert out[-1] == "(2 rows)"
    assert main(["query", output, "SELECT caption FROM captions WHERE id = 'b'", "--max-width", "5",
                 "--format", "table"]) == 0
    assert capsys.readouterr().out.splitlines()[2] == "two …"
    assert main(["query", output, "SELECT id, accepted_lengths FROM captions WHERE id='a'", "--format", "jsonl"]) == 0
    assert json.loads(capsys.readouterr().out) == {"id": "a", "accepted_lengths": [3, 3]}


@pytest.mark.parametrize("argv, message", [
    (["query", "{missing}", "SELECT 1"], "has no output table"),
    (["query", "{output}", "SELEC oops"], "SQL error"),
    (["query", "{output}", "SELECT nope FROM captions"], "SQL error"),
    (["stats", "{missing}"], "has no output table"),
])
def test_query_errors_are_one_line(output, tmp_path, capsys, argv, message):
    argv = [a.format(output=output, missing=str(tmp_path / "nothing-here")) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


# --- query is read-only: nothing but the table `captions` -------------------------------------

@pytest.mark.parametrize("sql", [
    "COPY captions TO '{tmp}/leak.csv'",
    "COPY (SELECT * FROM captions) TO '{tmp}/leak.parquet' (FORMAT parquet)",
    "SELECT * FROM read_csv('/etc/passwd')",
    "SELECT * FROM read_parquet('{output}/_plan.parquet')",  # a file beside the table, not the table
    "INSTALL httpfs",
    "LOAD httpfs",
    "ATTACH '{tmp}/other.duckdb' AS other",
    "SET enable_external_access = true",
    "SET lock_configuration = false",
], ids=["copy", "copy-select", "read_csv", "read_parquet", "install", "load", "attach", "set-external",
        "unlock"])
def test_query_is_read_only(output, tmp_path, capsys, sql):
    tmp = tmp_path / "written"
    tmp.mkdir()
    assert main(["query", output, sql.format(tmp=tmp, output=output)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not allowed: `specllava query` is read-only" in err[0], err
    assert list(tmp.iterdir()) == []  # nothing written, nothing attached


def test_query_read_only_still_answers_selects(output, capsys):
    # After a refused statement (a fresh connection per command) and across several statements
    # of one command, SELECTs over `captions` work; an in-memory temp view is allowed.
    assert main(["query", output, "COPY captions TO '/tmp/never.csv'"]) == 2
    capsys.readouterr()
    assert main(["query", output, "CREATE TEMP VIEW okay AS SELECT id FROM captions WHERE status = 'ok'; "
                 "SELECT count(*) AS n, max(id) AS last FROM okay", "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out) == [{"n": 3, "last": "d"}]


def test_query_and_stats_read_only_on_s3(s3, capsys):
    fs = s3.filesystem()
    bucket = s3.make_bucket("query-read-only")
    table = _output_table()
    for unit, part in enumerate((table.slice(0, 2), table.slice(2))):
        with fs.open_output_stream(f"query-read-only/out/data/unit-{unit:08d}.parquet") as sink:
            pq.write_table(part, sink)
    out = f"{bucket}/out"
    assert main(["query", out, "SELECT id FROM captions WHERE status = 'ok' ORDER BY id", "--format", "json",
                 "--s3-endpoint", s3.endpoint]) == 0
    assert json.loads(capsys.readouterr().out) == [{"id": "a"}, {"id": "b"}, {"id": "d"}]
    assert main(["stats", out, "--json", "--s3-endpoint", s3.endpoint]) == 0
    assert json.loads(capsys.readouterr().out)["ok"] == 3
    assert main(["query", out, "SELECT * FROM read_csv('/etc/passwd')", "--s3-endpoint", s3.endpoint]) == 2
    assert "read-only" in capsys.readouterr().err


def test_stats_numbers_and_plot(output, tmp_path, capsys):
    plot = tmp_path / "acc.png"
    assert main(["stats", output, "--json", "--plot", str(plot)]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert (stats["rows"], stats["unique_ids"], stats["ok"], stats["error"]) == (4, 4, 3, 1)
    # (new tokens - one prefill token per ok row) / (target forwards - one prefill per ok row)
    assert stats["mean_accepted"] == round((20 - 3) / (12 - 3), 4)
    assert stats["accepted_histogram"] == {"1": 3, "2": 4, "3": 2}
    lengths = [len(c) for _, c, s, *_ in ROWS if s == "ok"]
    assert stats["caption_chars_mean"] == round(sum(lengths) / 3, 2)
    assert stats["caption_chars_median"] == sorted(lengths)[1]
    assert stats["tokens_per_s"] == 10.0 and stats["images_per_s"] == 2.0 and stats["runs"] == 2
    assert stats["top_errors"] == [{"error": ROWS[2][3], "rows": 1}]
    with Image.open(plot) as image:                      # the --plot PNG reads back, at a sane size
        image.load()
        assert image.format == "PNG" and 400 <= image.size[0] <= 2000 and 250 <= image.size[1] <= 1500
    assert main(["stats", output]) == 0
    text = capsys.readouterr().out
    assert "4 of 4 input rows (complete): 3 ok, 1 error" in text and "mean accepted   1.8889" in text
    assert stats["undrafted"] == 1
    assert "tree budget     run 1, actor h:1 (cpu): batch>=1: 8 nodes/depth 4" in text
    assert ("                measured again (1) because at batch 1 (2 nodes/depth 2) steps take 5.0 ms, calibrated "
            "9.0 ms over 64 steps: batch>=1: 8 nodes/depth 4") in text
    assert "drafting        1 of 3 ok rows were decoded by the target alone" in text


# --- --config FILE.yaml ------------------------------------------------------------------------

def test_every_subcommand_takes_config():
    for name, sub in subcommands(build_parser()).items():
        assert any("--config" in a.option_strings for a in sub._actions), name


def _demo_args(monkeypatch, argv):
    """Parse `argv` through main() but stop at the command's function, returning its args."""
    seen = {}
    import jobs.demo
    monkeypatch.setattr(jobs.demo, "run", lambda args: seen.setdefault("args", args) and 0)
    parser_main = main(argv)
    return parser_main, seen.get("args")


def test_config_values_are_defaults_and_flags_win(tmp_path, monkeypatch):
    cfg = tmp_path / "demo.yaml"
    cfg.write_text("num-images: 12\nbatch_size: 3\nmax-new-tokens: 5\nworkdir: /tmp/x\n")
    code, args = _demo_args(monkeypatch, ["demo", "--config", str(cfg), "--batch-size", "4"])
    assert code == 0
    assert (args.num_images, args.batch_size, args.max_new_tokens, args.workdir) == (12, 4, 5, "/tmp/x")


def test_config_can_give_required_options(tmp_path):
    from jobs.cli import apply_config
    cfg = tmp_path / "submit.yaml"
    cfg.write_text("input: s3://in/shards\noutput: s3://out/captions\nbatch-size: 16\ntree-depth: 5\n"
                   "address: http://127.0.0.1:1\nwait: true\n")
    parser = build_parser()
    argv = ["submit", "--config", str(cfg), "--output", "s3://out/other"]
    apply_config(parser, argv)
    args = parser.parse_args(argv)
    assert (args.input, args.output, args.batch_size, args.tree_depth, args.wait) == \
        ("s3://in/shards", "s3://out/other", 16, 5, True)
    with pytest.raises(SystemExit):  # without the file, --input is still required
        build_parser().parse_args(["submit", "--output", "x"])


@pytest.mark.parametrize("text, message", [
    ("num-imagez: 3\n", "unknown key 'num-imagez'"),
    ("num-images: lots\n", "num-images must be an integer >= 1, got 'lots'"),
    ("num-images: 0\n", "num-images must be >= 1, got 0"),
    ("[1, 2\n", "is not valid YAML"),
    ("- 1\n- 2\n", "must be a mapping"),
    ("show: [1, 2]\n", "takes a single value"),
])
def test_bad_config_is_one_line(tmp_path, capsys, text, message):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(text)
    assert main(["demo", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_missing_config_file(tmp_path, capsys):
    assert main(["query", "x", "SELECT 1", "--config", str(tmp_path / "nope.yaml")]) == 2
    assert "cannot read --config" in capsys.readouterr().err


def test_example_configs_parse():
    from jobs.cli import apply_config
    examples = sorted(REPO_ROOT.joinpath("jobs", "examples").glob("*.yaml"))
    assert examples
    for path in examples:
        command = path.stem.split("-")[0]
        parser = build_parser()
        positional = {"query": ["out", "SELECT 1"], "stats": ["out"], "resume": ["out"]}.get(command, [])
        argv = [command, *positional, "--config", str(path)]
        apply_config(parser, argv)
        parser.parse_args(argv)  # raises SystemExit on a missing required option


# --- progress lines (pipeline/progress.py) ---------------------------------------------------

def test_committed_rows_count_only_committed_units(output):
    from pathlib import Path

    from pipeline.progress import CommittedRows, progress_line

    counter = CommittedRows(output)
    assert counter.count() == 4 and counter.total() == 4  # units 0 and 1 of 2 rows; input rows from _run.json
    (Path(output) / "data" / "unit-00000001.parquet").unlink()
    assert counter.count() == 2  # the temporary and the foreign file are never counted
    assert progress_line(3, 4, 0.5) == "progress: 3/4 rows committed (75.0%), 0.5 rows/s this run, ETA 0m02s"
    assert progress_line(7, None, None) == "progress: 7 rows committed"
    # before a unit completes: the rows decoded so far, in the rate and the ETA
    assert progress_line(0, 200, 4.0, uncommitted=40) == ("progress: 0/200 rows committed (0.0%), 40 more decoded "
                                                          "(in units not yet complete), 4.0 rows/s this run, ETA 0m40s")


def test_run_progress_lines_and_stall_hint():
    """The run's own progress (pipeline/progress.py RunProgress): from the unit writer's counters,
    with ok/error and tau; after `stall_s` without a commit while rows remain, the line says so."""
    import time

    from pipeline.commit import RunCounters
    from pipeline.progress import RunProgress, progress_line

    assert progress_line(5, 10, 2.0, ok=4, error=1, mean_accepted=3.5, stalled="nothing committed for 3m00s") == \
        ("progress: 5/10 rows committed (50.0%), 2.0 rows/s this run, ETA 0m02s, this run 4 ok / 1 error, "
         "mean accepted 3.50; nothing committed for 3m00s")
    lines = []
    counters = RunCounters()
    with RunProgress(total=100, before=40, every_s=0.05, stall_s=0.3, log=lines.append) as progress:
        progress.watch(counters)
        time.sleep(0.15)
        counters.received = 6                      # decoded, its unit not complete yet
        time.sleep(0.15)
        counters.rows, counters.ok, counters.new_tokens, counters.target_forwards = 10, 8, 8 + 24, 8 + 8
        counters.received = 13
        time.sleep(0.6)
    assert lines[0].startswith("progress: 40/100 rows committed (40.0%)")
    later = [line for line in lines if line.startswith("progress: 50/100")]
    assert later and "this run 8 ok / 2 error" in later[0] and "mean accepted 3.00" in later[0]
    assert any("40/100 rows committed (40.0%), 6 more decoded" in line and "rows/s this run" in line for line in lines)
    assert "3 more decoded" in later[0]
    assert "nothing committed for" in lines[-1]          # no commit for longer than stall_s


def test_terminal_bar_ends_with_the_last_commits_counts(monkeypatch):
    """The bar's ok=/error= at close are the run's final counts (it used to show the tick before the
    last commit, one commit behind the summary line)."""
    import io
    import time

    import tqdm

    from pipeline.commit import RunCounters
    from pipeline.progress import RunProgress

    screen = io.StringIO()
    real = tqdm.tqdm
    monkeypatch.setattr(tqdm, "tqdm", lambda *a, **k: real(*a, **{**k, "file": screen, "mininterval": 0}))
    counters = RunCounters()
    with RunProgress(total=20, before=0, tty=True) as progress:
        progress.watch(counters)
        time.sleep(0.7)                                         # one tick at 0 rows
        counters.rows, counters.ok, counters.new_tokens, counters.target_forwards = 20, 19, 40, 20
    last = screen.getvalue().replace("\r", "\n").strip().splitlines()[-1]
    assert "20/20" in last and "ok=19" in last and "error=1" in last, last

