"""Dataset ingest: validation errors name file/column/row, and no failure loses a version."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import RunningNode, make_node, node_command, run_node_cli

from cleanroom.errors import InputError
from cleanroom.node.datasets import add_dataset, datasets, load_dataset
from cleanroom.storage.datasets import DATASETS_SUBDIR

GOOD = (
    "phone,email,device_id,age,city\n"
    "138 0013 8000, A@Example.com ,ABCDEF01-2345-6789,30,sh\n"
    "+86 139-0000-0000,not-an-email,,41,bj\n"
    "12345,x@y.org,0000000000000000,,gz\n"
)


@pytest.fixture
def node(tmp_path: Path) -> RunningNode:
    return make_node(tmp_path, "oem", "oem")


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def _current(node: RunningNode) -> tuple[int, pd.DataFrame]:
    ctx = node.context()
    (info,) = datasets(ctx)
    return info.version, load_dataset(ctx, info.name, verify=True)


def _stored_files(node: RunningNode, name: str) -> list[str]:
    folder = node.dir / "data" / DATASETS_SUBDIR / name
    return sorted(p.name for p in folder.iterdir() if p.name != ".lock")


def test_ingest_normalises_and_counts(node: RunningNode, tmp_path: Path) -> None:
    ctx = node.context()
    report = add_dataset(ctx, "leads", _write(tmp_path / "a.csv", GOOD), "phone,email,device_id")
    assert report.version == 1 and report.rows == 3
    counts = {r["column"]: (r["valid"], r["missing"], r["invalid"]) for r in report.id_report}
    assert counts == {"phone": (2, 0, 1), "email": (2, 0, 1), "device_id": (1, 1, 1)}
    df = load_dataset(ctx, "leads")
    assert df["phone"].tolist()[:2] == ["+8613800138000", "+8613900000000"]
    assert df["email"].iloc[0] == "a@example.com"
    assert df["device_id"].iloc[0] == "abcdef0123456789"
    assert pd.isna(df["phone"].iloc[2])
    (info,) = datasets(ctx)
    types = {c["name"]: (c["type"], c["id_kind"]) for c in info.columns}
    assert types["age"] == ("int64", None) and types["phone"] == ("string", "phone")


def test_parquet_input_and_explicit_kinds(node: RunningNode, tmp_path: Path) -> None:
    src = tmp_path / "u.parquet"
    pq.write_table(
        pa.table({"mobile": [13800138000, 13900000000], "mail": ["a@b.co", "B@C.CO"]}), src
    )
    report = add_dataset(node.context(), "users", src, "mobile:phone,mail:email")
    assert [r["valid"] for r in report.id_report] == [2, 2]
    assert load_dataset(node.context(), "users")["mobile"].tolist() == [
        "+8613800138000",
        "+8613900000000",
    ]


@pytest.mark.parametrize(
    ("text", "ids", "column", "row", "words"),
    [
        ("phone,age\n" + "13800138000,1\n" * 10 + "13800138001,old\n", "phone", "age", 12, "mixed"),
        ("phone,age\n13800138000,1\n13800138001,2,3\n", "phone", None, 3, "3 fields"),
        ("phone,age\n13800138000,1\n", "phone,email", "email", None, "not in the file"),
        ("phone,age\n", "phone", None, None, "no data rows"),
        ("email,age\nnobody,1\nnothing,2\n", "email", "email", None, "valid email"),
        ("phone,phone\n1,2\n", "phone", "phone", None, "twice"),
    ],
)
def test_bad_file_is_refused_and_previous_version_kept(
    node: RunningNode,
    tmp_path: Path,
    text: str,
    ids: str,
    column: str | None,
    row: int | None,
    words: str,
) -> None:
    ctx = node.context()
    add_dataset(ctx, "leads", _write(tmp_path / "good.csv", GOOD), "phone,email,device_id")
    before = _current(node)
    files = _stored_files(node, "leads")
    bad = _write(tmp_path / "bad.csv", text)
    with pytest.raises(InputError) as info:
        add_dataset(ctx, "leads", bad, ids)
    err = info.value
    assert err.file == str(bad) and err.column == column and err.row == row
    assert words in str(err)
    assert "13800138001" not in str(err)  # errors never quote cell values
    version, frame = _current(node)
    assert version == before[0] and frame.equals(before[1])
    assert _stored_files(node, "leads") == files


def test_cli_bad_column_gives_clear_error(node: RunningNode, tmp_path: Path) -> None:
    good = _write(tmp_path / "good.csv", GOOD)
    ok = run_node_cli(
        "dataset",
        "add",
        "--dir",
        str(node.dir),
        "--name",
        "leads",
        "--file",
        str(good),
        "--id-columns",
        "phone,email,device_id",
    )
    assert ok.returncode == 0, ok.stderr
    assert "valid" in ok.stdout and "invalid" in ok.stdout
    bad = _write(tmp_path / "bad.csv", "phone,age\n" + "13800138000,1\n" * 20 + "1,x\n")
    result = run_node_cli(
        "dataset",
        "add",
        "--dir",
        str(node.dir),
        "--name",
        "leads",
        "--file",
        str(bad),
        "--id-columns",
        "phone",
    )
    assert result.returncode == 2
    assert f"file {bad}, column 'age', row 22" in result.stderr
    assert "Traceback" not in result.stderr
    listing = run_node_cli("dataset", "list", "--dir", str(node.dir))
    assert "leads  version 1 of 1  3 rows" in listing.stdout


@pytest.mark.parametrize("step", ["before_rename", "after_rename"])
def test_crash_inside_ingest_keeps_previous_version(
    node: RunningNode, tmp_path: Path, step: str
) -> None:
    ctx = node.context()
    add_dataset(ctx, "leads", _write(tmp_path / "good.csv", GOOD), "phone,email,device_id")
    before = _current(node)
    other = _write(tmp_path / "other.csv", "phone,city\n13700000000,sz\n")
    result = run_node_cli(
        "dataset",
        "add",
        "--dir",
        str(node.dir),
        "--name",
        "leads",
        "--file",
        str(other),
        "--id-columns",
        "phone",
        env={"CLEANROOM_INGEST_CRASH_AT": step},
    )
    assert result.returncode == -signal.SIGKILL
    version, frame = _current(node)
    assert version == before[0] and frame.equals(before[1])
    # the next ingest removes the leftovers and succeeds
    report = add_dataset(ctx, "leads", other, "phone")
    assert report.version == 2 and report.previous_version == 1
    assert len(_stored_files(node, "leads")) == 2


def test_kill_9_during_ingest_keeps_previous_version(node: RunningNode, tmp_path: Path) -> None:
    ctx = node.context()
    add_dataset(ctx, "leads", _write(tmp_path / "good.csv", GOOD), "phone,email,device_id")
    before = _current(node)
    big = tmp_path / "big.csv"
    with big.open("w") as f:
        f.write("phone,email,device_id,score\n")
        for i in range(300_000):
            f.write(f"1380013{i % 10000:04d},u{i}@example.com,dev{i:016d},{i % 97}\n")
    proc = subprocess.Popen(
        node_command(
            "dataset",
            "add",
            "--dir",
            str(node.dir),
            "--name",
            "leads",
            "--file",
            str(big),
            "--id-columns",
            "phone,email,device_id",
        ),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    # Kill it while it writes the new version's file (the riskiest moment).
    folder = node.dir / "data" / DATASETS_SUBDIR / "leads"
    deadline = time.monotonic() + 60
    while not any(p.name.startswith(".tmp-") for p in folder.iterdir()):
        assert proc.poll() is None, "ingest finished before it could be interrupted"
        assert time.monotonic() < deadline
        time.sleep(0.002)
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait(10) == -signal.SIGKILL
    version, frame = _current(node)
    assert version == before[0] and frame.equals(before[1])


def test_operator_upload_streams_and_ingests(
    three_nodes: dict[str, RunningNode], tmp_path: Path
) -> None:
    dealer = three_nodes["dealer"]
    block = GOOD.encode()
    with dealer.operator_client() as client:
        report = client.upload(
            "/v1/datasets/visits/versions",
            iter([block[:20], block[20:]]),
            params={"id_columns": "phone,email", "filename": "visits.csv"},
        )
        assert report["rows"] == 3 and report["dataset"] == "visits"
        listed = {d["name"]: d for d in client.get_json("/v1/datasets")}
    assert listed["visits"]["id_report"][0]["valid"] == 2
    # nothing of the rows is in the listing
    assert "13800138000" not in str(listed) and "example.com" not in str(listed).lower()


def test_a_table_without_identifier_columns_is_stored_as_is(tmp_path: Path) -> None:
    """Store lists, inventory and features keyed by a local row id have no identifiers."""
    from cleanroom.storage.datasets import ingest_file, read_dataset
    from cleanroom.storage.db import engine_for, init_db

    engine = engine_for(f"sqlite:///{tmp_path / 'node.db'}")
    init_db(engine)
    src = tmp_path / "inventory.csv"
    src.write_text("store_id,series,units\nS0001,AX3,4\nS0002,EV6,0\n")
    report = ingest_file(engine, tmp_path / "data", "inventory", src, "")
    assert (report.rows, report.id_report) == (2, [])
    table = read_dataset(engine, tmp_path / "data", "inventory")
    assert table.column("units").to_pylist() == [4, 0]
