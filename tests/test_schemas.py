"""Party table schemas: loading validates and names the file, column and first bad row."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cleanroom.errors import InputError
from parties.schemas import SCHEMAS, load_table, validate_frame

LEADS_CSV = """lead_id,phone,email,device_id,city,source_channel,intended_series,created_at
L1,013812345678,A@B.CN,,Beijing,website,AX3,2024-03-01 10:00:00
L2,+86 138 1234 5679,,ABCDEF0123456789,Shanghai,app,EV6,2024-03-02T11:00:00
L3,138-1234-5670,x@y.com,,Wuhan,referral,AX5,2024-03-03
"""


def _write(tmp_path: Path, text: str, name: str = "leads.csv") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_every_table_declares_columns_and_id_kinds() -> None:
    assert {t.split("/")[0] for t in SCHEMAS} == {"oem", "media", "dealer", "ground_truth"}
    assert SCHEMAS["oem/leads"].id_columns == {
        "phone": "phone", "email": "email", "device_id": "device_id"}
    assert SCHEMAS["media/users"].id_columns["device_id_2"] == "device_id"
    assert SCHEMAS["dealer/activity"].id_columns == {"phone": "phone"}
    for schema in SCHEMAS.values():
        assert len(schema.arrow_schema()) == len(schema.columns)


def test_valid_csv_loads_with_identifiers_as_text(tmp_path: Path) -> None:
    frame = load_table(_write(tmp_path, LEADS_CSV), "oem/leads")
    assert frame.phone.tolist()[0] == "013812345678"  # leading zero kept: read as text
    assert frame.phone.dtype == "string"
    assert frame.email.isna().tolist() == [False, True, False]
    assert str(frame.created_at.dtype).startswith("datetime64")
    assert frame.created_at.iloc[2] == pd.Timestamp("2024-03-03")


def test_missing_column_names_file_and_column(tmp_path: Path) -> None:
    path = _write(tmp_path, LEADS_CSV.replace(",city", ",town"))
    with pytest.raises(InputError) as exc:
        load_table(path, "oem/leads")
    assert exc.value.file == str(path) and exc.value.column == "city"
    assert "missing column" in str(exc.value) and str(path) in str(exc.value)


@pytest.mark.parametrize(
    ("table", "text", "column", "row", "needle"),
    [
        ("oem/crm", "lead_id,previous_owner,service_visits,prior_brand,household_cars\n"
         "L1,true,2,none,1\nL2,false,3,german,0\nL3,false,three,german,0\n",
         "service_visits", 3, "expected an integer"),
        ("oem/crm", "lead_id,previous_owner,service_visits,prior_brand,household_cars\n"
         "L1,true,2.5,none,1\n", "service_visits", 1, "expected an integer"),
        ("oem/crm", "lead_id,previous_owner,service_visits,prior_brand,household_cars\n"
         "L1,true,2,none,1\nL2,maybe,3,german,0\n", "previous_owner", 2, "true or false"),
        ("oem/crm", "lead_id,previous_owner,service_visits,prior_brand,household_cars\n"
         "L1,true,2,none,1\nL2,no,-1,german,0\n", "service_visits", 2, "below the minimum"),
        ("oem/crm", "lead_id,previous_owner,service_visits,prior_brand,household_cars\n"
         "L1,true,2,none,1\nL2,no,1,tesla,0\n", "prior_brand", 2, "not allowed"),
        ("oem/crm", "lead_id,previous_owner,service_visits,prior_brand,household_cars\n"
         "L1,true,2,none,1\nL1,no,1,german,0\n", "lead_id", 2, "repeated key"),
        ("oem/stores", "store_id,dealer_id,name,city,lat,lon\nS1,D1,a,Beijing,39.9,116.4\n"
         "S2,D1,b,Beijing,,116.4\n", "lat", 2, "empty value in a required column"),
        ("oem/stores", "store_id,dealer_id,name,city,lat,lon\nS1,D1,a,Beijing,95,116.4\n",
         "lat", 1, "above the maximum"),
        ("oem/leads", LEADS_CSV.replace("2024-03-03", "yesterday"), "created_at", 3,
         "date-time"),
        ("dealer/inventory", "store_id,series,units\nS1,AX3,4\nS1,AX5,x\n", "units", 2,
         "expected an integer"),
    ],
)
def test_bad_values_name_file_column_and_row(
    tmp_path: Path, table: str, text: str, column: str, row: int, needle: str
) -> None:
    path = _write(tmp_path, text, "t.csv")
    with pytest.raises(InputError) as exc:
        load_table(path, table)
    err = exc.value
    assert (err.file, err.column, err.row) == (str(path), column, row)
    assert needle in str(err)
    assert f"row {row}" in str(err) and f"column {column!r}" in str(err)


def test_parquet_wrong_types_are_caught(tmp_path: Path) -> None:
    path = tmp_path / "beh.parquet"
    cols = SCHEMAS["media/behaviour"].column_names
    data = {c: pa.array([1, 2, 3]) for c in cols}
    data["user_id"] = pa.array(["u1", "u2", "u3"])
    data["price_checks"] = pa.array(["1", "2", "lots"])
    pq.write_table(pa.table(data), path)
    with pytest.raises(InputError) as exc:
        load_table(path, "media/behaviour")
    assert (exc.value.column, exc.value.row) == ("price_checks", 3)

    data["price_checks"] = pa.array([1, 2, 3])
    data["user_id"] = pa.array([1.5, 2.5, 3.5])
    pq.write_table(pa.table(data), path)
    with pytest.raises(InputError, match="expected text") as exc:
        load_table(path, "media/behaviour")
    assert exc.value.column == "user_id"


def test_parquet_numeric_phones_become_text(tmp_path: Path) -> None:
    path = tmp_path / "act.parquet"
    pq.write_table(pa.table({
        "record_id": ["R1", "R2"], "phone": pa.array([13812345678, None], pa.int64()),
        "store_id": ["S1", "S1"], "visits": [1, 2], "test_drives": [0, 1],
        "prior_orders": [0, 0],
        "last_visit_at": pa.array([0, 86400], pa.timestamp("s")),
    }), path)
    frame = load_table(path, "dealer/activity")
    assert frame.phone.tolist() == ["13812345678", pd.NA]
    assert frame.visits.dtype == "int64"


def test_unreadable_and_unknown(tmp_path: Path) -> None:
    bad = tmp_path / "x.parquet"
    bad.write_bytes(b"not parquet at all")
    with pytest.raises(InputError, match="cannot read file") as exc:
        load_table(bad, "oem/leads")
    assert exc.value.file == str(bad)
    with pytest.raises(InputError, match="unknown table"):
        load_table(bad, "oem/nope")
    with pytest.raises(InputError, match="file not found"):
        load_table(tmp_path / "missing.csv", "oem/leads")
    with pytest.raises(InputError, match="unsupported file type"):
        load_table(_write(tmp_path, "a", "x.txt"), "oem/leads")
    with pytest.raises(InputError, match="not found"):
        load_table(tmp_path, "oem/leads")  # a dataset directory without the table


def test_validate_frame_directly() -> None:
    frame = pd.DataFrame({"lead_id": ["L1", "L2"], "converted": [True, "x"]})
    with pytest.raises(InputError) as exc:
        validate_frame(frame, "oem/labels", "labels.parquet")
    assert (exc.value.file, exc.value.column, exc.value.row) == ("labels.parquet", "converted", 2)
    ok = validate_frame(pd.DataFrame({"lead_id": ["L1"], "converted": [1], "extra": [0]}),
                        "oem/labels", "f")
    assert list(ok.columns) == ["lead_id", "converted"] and ok.converted.dtype == bool
