"""Error paths of ``cleanroom synth``: clear messages, non-zero exits, nothing half-written."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest

from cleanroom.cli import main
from cleanroom.errors import InputError
from cleanroom.synth import SynthConfig, generate


def _run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    code = main(["synth", *args])
    return code, capsys.readouterr().err


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--leads", "0"], "--leads must be a whole number >= 1"),
        (["--leads", "-5"], "--leads must be a whole number >= 1"),
        (["--leads", "10", "--media-overlap", "1.5"], "--media-overlap must be a fraction"),
        (["--leads", "10", "--dealer-overlap", "-0.1"], "--dealer-overlap must be a fraction"),
        (["--leads", "10", "--media-overlap", "nan"], "--media-overlap must be a fraction"),
        (["--leads", "10", "--media-users", "-1"], "--media-users must be a whole number"),
        (["--leads", "1000", "--media-users", "100"], "--media-users 100 is too small"),
        (["--leads", "10", "--seed", "-3"], "--seed must be a whole number"),
    ],
)
def test_bad_arguments_give_a_clear_error_and_write_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], needle: str
) -> None:
    out = tmp_path / "out"
    code, err = _run(capsys, "--out", str(out), *args)
    assert code != 0
    assert needle in err and err.startswith("cleanroom synth: error:")
    assert "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("args", [["--leads", "many"], ["--leads", "10", "--seed", "x"],
                                  ["--leads", "10", "--media-overlap", "half"], []])
def test_unparseable_arguments_exit_non_zero(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["synth", "--out", str(tmp_path / "o"), *args])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "synth" in err and "error" in err
    assert not (tmp_path / "o").exists()


def test_non_empty_out_is_refused_and_left_alone(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, err = _run(capsys, "--out", str(out), "--leads", "20")
    assert code != 0
    assert f"file {out}" in err and "not empty" in err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert (out / "keep.txt").read_text() == "mine"


def test_out_that_is_a_file_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "afile"
    out.write_text("x")
    code, err = _run(capsys, "--out", str(out), "--leads", "20")
    assert code != 0 and "not a directory" in err
    assert out.read_text() == "x"


def test_an_empty_out_directory_is_used(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "empty"
    out.mkdir()
    assert main(["synth", "--out", str(out), "--leads", "30"]) == 0
    assert (out / "oem" / "leads.parquet").is_file()
    assert pq.read_table(out / "oem" / "leads.parquet").num_rows == 30


@pytest.mark.parametrize("pre_existing", [False, True])
def test_a_failure_while_writing_leaves_nothing_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, pre_existing: bool
) -> None:
    """Fault injection: the disk 'fills up' on the fifth table written."""
    out = tmp_path / "out"
    if pre_existing:
        out.mkdir()
    real = pq.write_table
    calls = {"n": 0}

    def failing_write(table: object, where: object, *a: object, **kw: object) -> None:
        calls["n"] += 1
        if calls["n"] == 5:
            raise OSError(28, "No space left on device")
        real(table, where, *a, **kw)

    monkeypatch.setattr(pq, "write_table", failing_write)
    with pytest.raises(OSError):
        generate(out, SynthConfig(leads=50))
    assert calls["n"] == 5
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == (["out"] if pre_existing else [])
    if pre_existing:
        assert list(out.iterdir()) == []


def test_config_is_validated_from_python_too(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="--leads"):
        generate(tmp_path / "x", SynthConfig(leads=0))
    with pytest.raises(InputError, match="train_fraction"):
        generate(tmp_path / "x", SynthConfig(leads=10, train_fraction=1.0))
    assert not (tmp_path / "x").exists()


def test_edge_sizes_and_overlaps(tmp_path: Path) -> None:
    for i, cfg in enumerate([
        SynthConfig(leads=1),
        SynthConfig(leads=40, media_users=0, media_overlap=0.0),
        SynthConfig(leads=40, media_overlap=1.0, dealer_overlap=1.0),
        SynthConfig(leads=40, dealer_overlap=0.0),
    ]):
        summary = generate(tmp_path / str(i), cfg)
        assert summary.rows["oem/leads"] == cfg.leads
        assert "rows:" in summary.format()
        assert summary.as_dict()["rows"] == summary.rows
