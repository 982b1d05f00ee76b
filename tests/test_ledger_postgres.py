"""The ledger on a real PostgreSQL server (a throw-away cluster started by the fixture).

Skipped when PostgreSQL binaries (initdb, pg_ctl) or the psycopg driver are missing.
The server listens on 127.0.0.1 on a free port, in a temporary directory, and is stopped
at the end of the module.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import create_engine, text
from sqlalchemy.engine import Engine

from cleanroom.ledger import Ledger, LedgerStore, ProblemKind, digest, event, verify_store

pytest.importorskip("psycopg")
INITDB = shutil.which("initdb")
PG_CTL = shutil.which("pg_ctl")
pytestmark = pytest.mark.skipif(not (INITDB and PG_CTL), reason="PostgreSQL not installed")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _run_as_pg(cmd: list[str]) -> None:
    if os.geteuid() == 0:  # PostgreSQL refuses to run as root
        cmd = ["su", "postgres", "-s", "/bin/sh", "-c", " ".join(cmd)]
    subprocess.run(cmd, check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def pg_engine() -> Iterator[Engine]:
    tmp = Path(tempfile.mkdtemp(prefix="ledger-pg-"))
    if os.geteuid() == 0:
        shutil.chown(tmp, "postgres")
    data, port = tmp / "data", _free_port()
    try:
        _run_as_pg([str(INITDB), "-D", str(data), "-A", "trust", "-U", "postgres"])
        _run_as_pg([str(PG_CTL), "-D", str(data), "-w", "-l", str(tmp / "log"), "-o",
                    f"'-p {port} -k {tmp} -c listen_addresses=127.0.0.1'", "start"])
    except (subprocess.CalledProcessError, KeyError, OSError) as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        pytest.skip(f"cannot start a PostgreSQL cluster: {exc}")
    engine = create_engine(f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres")
    try:
        yield engine
    finally:
        engine.dispose()
        _run_as_pg([str(PG_CTL), "-D", str(data), "-m", "immediate", "stop"])
        shutil.rmtree(tmp, ignore_errors=True)


def test_ledger_on_postgres(pg_engine: Engine) -> None:
    key = Ed25519PrivateKey.generate()
    led = Ledger(pg_engine, "cleanroom/pg", key)
    evs = [event("message_sent", query_id="q-pg", session_id="s-1", protocol="ecdh_psi",
                 peer="media_x" if i % 2 else "dealer", round="r1", digest=digest(b"%d" % i),
                 size=i) for i in range(300)]
    assert led.append_many(evs[:150])[0] == 0
    led.checkpoint()
    led.append_many(evs[150:])
    led.checkpoint()
    assert led.verify(deep=True).ok
    assert len(led.entries(peer="media_x", limit=1000)) == 150
    assert led.entries(peer="media%") == []
    again = Ledger(pg_engine, "cleanroom/pg", key)
    assert again.root() == led.root()

    with pg_engine.begin() as c:
        c.execute(text("DELETE FROM ledger_entry WHERE idx = 170"))
    rep = verify_store(LedgerStore(pg_engine, create=False), "cleanroom/pg", [led.verifier])
    first = rep.first_problem
    assert first is not None and first.kind is ProblemKind.DELETED and first.index == 170
