"""A throw-away PostgreSQL cluster for tests that prove the engine works on PostgreSQL.

``pg_engine`` (session scope) runs ``initdb`` and ``pg_ctl start`` in a temporary
directory, listening on 127.0.0.1 on a free port, and stops it at the end of the session.
Tests import the fixture from here and mark themselves with ``pgserver_required()``, which
skips them when the PostgreSQL binaries or the psycopg driver are missing.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine
from sqlalchemy.engine import Engine


def _find(tool: str) -> str | None:
    found = shutil.which(tool)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{tool}"))
    return candidates[-1] if candidates else None


INITDB, PG_CTL = _find("initdb"), _find("pg_ctl")


def pgserver_required() -> pytest.MarkDecorator:
    missing = [n for n, p in (("initdb", INITDB), ("pg_ctl", PG_CTL)) if not p]
    if importlib.util.find_spec("psycopg") is None:
        missing.append("psycopg")
    return pytest.mark.skipif(bool(missing), reason=f"PostgreSQL not available: {missing}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _run_as_pg(cmd: list[str]) -> None:
    if os.geteuid() == 0:  # PostgreSQL refuses to run as root
        cmd = ["su", "postgres", "-s", "/bin/sh", "-c", " ".join(cmd)]
    subprocess.run(cmd, check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    assert INITDB and PG_CTL
    tmp = Path(tempfile.mkdtemp(prefix="cleanroom-pg-"))
    if os.geteuid() == 0:
        shutil.chown(tmp, "postgres")
    data, port = tmp / "data", _free_port()
    try:
        _run_as_pg([INITDB, "-D", str(data), "-A", "trust", "-U", "postgres"])
        _run_as_pg([PG_CTL, "-D", str(data), "-w", "-l", str(tmp / "log"), "-o",
                    f"'-p {port} -k {tmp} -c listen_addresses=127.0.0.1'", "start"])
    except (subprocess.CalledProcessError, KeyError, OSError) as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        pytest.skip(f"cannot start a PostgreSQL cluster: {exc}")
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres"
    finally:
        _run_as_pg([PG_CTL, "-D", str(data), "-m", "immediate", "stop"])
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="session")
def pg_engine(pg_url: str) -> Iterator[Engine]:
    engine = create_engine(pg_url)
    try:
        yield engine
    finally:
        engine.dispose()
