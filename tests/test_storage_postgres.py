"""Node storage on a real PostgreSQL server: the same code path as the SQLite default."""

from __future__ import annotations

from pathlib import Path

import pytest
from pgserver import pgserver_required
from sqlalchemy.engine import Engine

from cleanroom.errors import InputError
from cleanroom.storage.datasets import ingest_file, list_datasets, read_dataset
from cleanroom.storage.db import init_db

pytestmark = pgserver_required()


def test_dataset_versions_on_postgres(pg_engine: Engine, tmp_path: Path) -> None:
    init_db(pg_engine)
    data = tmp_path / "data"
    first = tmp_path / "visits.csv"
    first.write_text("phone,visits\n+86 138-0013-8000,2\n13900139000,1\n")
    report = ingest_file(pg_engine, data, "pg_visits", first, "phone")
    assert report.rows == 2
    second = tmp_path / "visits2.csv"
    second.write_text("phone,visits\n13800138000,5\n")
    assert ingest_file(pg_engine, data, "pg_visits", second, "phone").version == report.version + 1
    bad = tmp_path / "bad.csv"
    bad.write_text("mobile,visits\n13800138000,5\n")
    with pytest.raises(InputError):
        ingest_file(pg_engine, data, "pg_visits", bad, "phone")
    table = read_dataset(pg_engine, data, "pg_visits")
    assert table.column("phone").to_pylist() == ["+8613800138000"]
    assert "pg_visits" in {d.name for d in list_datasets(pg_engine)}
