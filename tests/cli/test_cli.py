"""CLI argument errors exit 2 with a one-line message (no traceback)."""
import pytest

from jobs.cli import main


def test_demo_missing_model_dir(tmp_path, capsys):
    assert main(["demo", "--workdir", str(tmp_path), "--target", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is not a model directory" in err[0]


def test_demo_bad_counts(tmp_path, capsys):
    assert main(["demo", "--workdir", str(tmp_path), "--num-images", "0"]) == 2
    assert "--num-images" in capsys.readouterr().err


def test_bench_missing_pair(tmp_path, capsys):
    assert main(["bench", "--target", str(tmp_path / "nope")]) == 2
    assert "--target" in capsys.readouterr().err


def _one_line_error(capsys, argv) -> str:
    assert main(argv) == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and not captured.out, captured   # no usage block, nothing on stdout
    return err[0]


def test_unknown_subcommand_exits_2(capsys):
    line = _one_line_error(capsys, ["no-such-command"])
    assert line.startswith("specllava: error: unknown command 'no-such-command'")
    assert "did you mean caption?" in _one_line_error(capsys, ["captoin"])


CAPTION = ["caption", "--input", "in", "--output", "out"]


def test_every_parser_refuses_abbreviations():
    from jobs.cli import build_parser, subcommands
    parser = build_parser()
    assert parser.allow_abbrev is False
    for name, sub in subcommands(parser).items():
        assert sub.allow_abbrev is False, name


@pytest.mark.parametrize("argv, expected", [
    (CAPTION + ["--max-new-token", "32"],
     "specllava: error: unknown option --max-new-token; did you mean --max-new-tokens?"),
    (CAPTION + ["--max-new=32"], "unknown option --max-new; did you mean --max-new-tokens?"),
    (["bench", "--quick", "--batch-size", "2"], "unknown option --batch-size; did you mean --batch-sizes?"),
    (["query", "out", "SELECT 1", "--formt", "csv", "--max-widht", "3"],
     "unknown options --formt (did you mean --format?), --max-widht (did you mean --max-width?)"),
    (["demo", "--zzz"], "specllava: error: unknown option --zzz"),
    (["query", "out", "SELECT 1", "extra"], "unexpected argument 'extra'"),
])
def test_unknown_options_name_the_flag_and_suggest(capsys, argv, expected):
    line = _one_line_error(capsys, argv)
    assert line.endswith(expected), line
    if "did you mean" not in expected:
        assert "did you mean" not in line


@pytest.mark.parametrize("argv, expected", [
    (CAPTION + ["--batch-size", "0"], "specllava: error: --batch-size must be >= 1, got 0"),
    (CAPTION + ["--batch-size", "x"], "--batch-size must be an integer >= 1, got 'x'"),
    (CAPTION + ["--max-new-tokens", "-3"], "--max-new-tokens must be >= 1, got -3"),
    (CAPTION + ["--commit-rows", "0"], "--commit-rows must be >= 1, got 0"),
    (CAPTION + ["--top-p", "1.5"], "--top-p must be in (0, 1], got 1.5"),
    (CAPTION + ["--top-k", "-1"], "--top-k must be >= 0, got -1"),
    (CAPTION + ["--temperature", "nan"], "--temperature must be >= 0, got nan"),
    (CAPTION + ["--tree-threshold", "1"], "--tree-threshold must be in [0, 1), got 1"),
    (CAPTION + ["--tree-nodes", "0"], "--tree-nodes must be >= 1, got 0"),
    (CAPTION + ["--stage-cpus", "0"], "--stage-cpus must be > 0, got 0"),
    (CAPTION + ["--seed", "x"], "--seed must be an integer, got 'x'"),
    (CAPTION + ["--tree-budget", "autp"], "--tree-budget: invalid choice 'autp' (choose from auto, off); "
                                          "did you mean auto?"),
    (["submit", "--input", "in", "--output", "out", "--batch-size", "0"],
     "specllava: error: --batch-size must be >= 1, got 0"),
    (["make-dataset", "--num-images", "4", "--output", "x", "--image-size", "8"],
     "--image-size must be in [32, 1024], got 8"),
    (["bench", "--rounds", "0"], "--rounds must be >= 1, got 0"),
    (["distill", "--lr", "0"], "--lr must be > 0, got 0"),
    (["query", "out", "SELECT 1", "--max-width", "-1"], "--max-width must be >= 0, got -1"),
    (["caption", "--input", "in"], "the following arguments are required: --output"),
])
def test_option_value_errors_name_the_flag(capsys, argv, expected):
    line = _one_line_error(capsys, argv)
    assert line.endswith(expected), line
    assert "batch_size" not in line


def test_help_lists_commands(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for name in ("caption", "resume", "make-dataset", "distill", "bench", "demo"):
        assert name in out


def test_resume_hints_can_be_pasted(monkeypatch):
    """The `specllava resume ...` a run prints carries what the run used (endpoint, --submit and
    the dashboard for a Ray job) and never credentials; quoted for a shell."""
    from jobs.caption import hint
    from jobs.common import JOB_DASHBOARD_ENV
    from jobs.common import public_endpoint, resume_hint
    from pipeline.config import CaptionConfig

    assert public_endpoint("http://AKIA:s3cret@127.0.0.1:9000") == "http://127.0.0.1:9000"
    assert public_endpoint("127.0.0.1:9000") == "127.0.0.1:9000" and public_endpoint(None) is None
    assert resume_hint("/data/my out") == "specllava resume '/data/my out'"
    assert (resume_hint("s3://b/out", "http://k:s@h:9000", submit=True, address="http://head:8265")
            == "specllava resume s3://b/out --submit --s3-endpoint http://h:9000 --address http://head:8265")
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)
    assert resume_hint("s3://b/out", submit=True, address="http://127.0.0.1:8265") == \
        "specllava resume s3://b/out --submit"  # the default dashboard is left out

    config = CaptionConfig(input="s3://b/in", output="s3://b/out", target=None, draft=None, dry_run=True,
                           s3_endpoint="http://127.0.0.1:9000")
    monkeypatch.delenv(JOB_DASHBOARD_ENV, raising=False)
    assert hint(config) == "specllava resume s3://b/out --s3-endpoint http://127.0.0.1:9000"
    monkeypatch.setenv(JOB_DASHBOARD_ENV, "http://10.0.0.1:8265")  # the driver of a Ray job
    assert hint(config) == ("specllava resume s3://b/out --submit --s3-endpoint http://127.0.0.1:9000 "
                            "--address http://10.0.0.1:8265")
