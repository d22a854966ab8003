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


def test_unknown_subcommand_exits_2():
    with pytest.raises(SystemExit) as exc:
        main(["no-such-command"])
    assert exc.value.code == 2


def test_help_lists_commands(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for name in ("caption", "resume", "make-dataset", "distill", "bench", "demo"):
        assert name in out
