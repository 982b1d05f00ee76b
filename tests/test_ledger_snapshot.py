"""Reading a ledger the node is writing: read-only stores and consistent snapshots.

- ``LedgerStore(engine, read_only=True)`` opens a read-only SQLite file that is *not* in
  WAL mode (no pragma, no DDL) and refuses writes;
- ``verify_store`` reads entries, checkpoints and cosignatures in one snapshot, so a
  checkpoint the writer signs between those reads is not reported as a truncation. A
  SQLAlchemy cursor hook makes the writer append and sign exactly between the reads
  (deterministic); a writer thread does it at random while verify runs repeatedly. Both
  on SQLite (WAL) and on PostgreSQL (REPEATABLE READ).
"""

from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pgserver import pgserver_required
from sqlalchemy import create_engine, event, text
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import OperationalError

from cleanroom.ledger import (
    Event,
    Ledger,
    LedgerStateError,
    LedgerStore,
    ProblemKind,
    digest,
    verify_store,
)
from cleanroom.ledger import event as ledger_event
from cleanroom.ledger.store import CheckpointRecord, LedgerSnapshot

ORIGIN = "cleanroom/oem"


def _msgs(n: int, start: int = 0) -> list[Event]:
    return [ledger_event("message_sent", query_id="q-snap0001", session_id="s-snap",
                         protocol="ecdh_psi", peer="media", round=f"r{i % 4}",
                         digest=digest(b"m%d" % i), size=100 + i,
                         ts_ms=1_714_521_600_000 + i) for i in range(start, start + n)]


def _ro_engine(path: Path) -> Engine:
    uri = quote(path.resolve().as_posix(), safe="/")
    return create_engine(f"sqlite:///file:{uri}?mode=ro&uri=true")


def _journal_mode(path: Path) -> str:
    con = sqlite3.connect(path)
    try:
        return str(con.execute("PRAGMA journal_mode").fetchone()[0])
    finally:
        con.close()


@pytest.fixture
def witnessed(tmp_path: Path) -> Iterator[tuple[Ledger, Ledger]]:
    """An OEM ledger with two checkpoints, the second cosigned by a media ledger."""
    oem = Ledger(create_engine(f"sqlite:///{tmp_path / 'oem.db'}"), ORIGIN,
                 Ed25519PrivateKey.generate())
    media = Ledger(create_engine(f"sqlite:///{tmp_path / 'media.db'}"), "cleanroom/media",
                   Ed25519PrivateKey.generate())
    oem.append_many(_msgs(30))
    oem.checkpoint()
    oem.append_many(_msgs(20, 30))
    cosigned = media.witness("media", oem.verifier, oem.checkpoint(), [])
    assert oem.record_cosignatures(cosigned, [media.witness_verifier]) == 1
    yield oem, media
    oem.store.engine.dispose()
    media.store.engine.dispose()


# ------------------------------------------------------------------ read-only opening


def test_read_only_store_opens_a_read_only_file_not_in_wal_mode(
    witnessed: tuple[Ledger, Ledger], tmp_path: Path,
) -> None:
    oem, media = witnessed
    db = tmp_path / "oem.db"
    oem.store.engine.dispose()
    con = sqlite3.connect(db)
    assert con.execute("PRAGMA journal_mode=DELETE").fetchone()[0] == "delete"
    con.close()
    os.chmod(db, 0o444)
    eng = _ro_engine(db)
    try:
        # what the audit tools used to do: the WAL pragma is a write and fails
        with pytest.raises(OperationalError, match="readonly"):
            LedgerStore(eng, create=False)
        store = LedgerStore(eng, read_only=True)
        rep = verify_store(store, ORIGIN, [oem.verifier], [media.witness_verifier])
        assert rep.ok, rep.summary()
        assert (rep.size, rep.checkpoints_checked, rep.cosignatures_checked) == (50, 2, 1)
        assert rep.root == oem.root()
        # a read-only store refuses every write, before touching the database
        with pytest.raises(LedgerStateError, match="read-only"):
            store.add_checkpoint(CheckpointRecord(ORIGIN, 1, bytes(32), b"x", 0))
        with pytest.raises(LedgerStateError, match="read-only"):
            store.append_rows([])
        with pytest.raises(ValueError, match="cannot create"):
            LedgerStore(eng, create=True, read_only=True)
    finally:
        eng.dispose()
    assert _journal_mode(db) == "delete" and not db.with_name("oem.db-wal").exists()


def test_snapshot_is_only_valid_inside_its_block(witnessed: tuple[Ledger, Ledger]) -> None:
    oem, _media = witnessed
    store = LedgerStore(oem.store.engine, read_only=True)
    with store.snapshot() as snap:
        assert isinstance(snap, LedgerSnapshot)
        with snap.snapshot() as inner:
            assert inner is snap
        assert snap.count() == 50 and [c.size for c in snap.checkpoints()] == [30, 50]
    with pytest.raises(LedgerStateError, match="after its `with` block"):
        snap.count()


# ------------------------------------------------------------------ a writer between the reads


def _between_reads_hook(engine: Engine, writer: Callable[[], None]) -> Callable[[], int]:
    """Run ``writer`` each time, right before ``engine`` reads the checkpoint table; i.e.
    after a verifier has read every entry. Returns a counter of the writes it made."""
    fired = [0]

    def before(conn: Any, cursor: Any, statement: str, *_a: Any) -> None:
        if "FROM ledger_checkpoint" in statement:
            writer()
            fired[0] += 1

    event.listen(engine, "before_cursor_execute", before)
    return lambda: fired[0]


def _grow(led: Ledger, n: int = 3) -> Callable[[], None]:
    def write() -> None:
        led.append_many(_msgs(n, led.size))
        led.checkpoint()
    return write


def _check_between_reads(led: Ledger, reader: Engine) -> None:
    before = led.size
    fired = _between_reads_hook(reader, _grow(led))
    store = LedgerStore(reader, read_only=True)
    # the race is real: separate reads see a checkpoint over entries they did not see
    n = sum(len(chunk) for chunk in store.iter_raw())
    assert max(c.size for c in store.checkpoints()) == n + 3 and fired() == 1
    # verify_store reads everything in one snapshot: no false truncation
    for _ in range(3):
        size = led.size
        rep = verify_store(store, led.origin, [led.verifier])
        assert rep.ok, rep.summary()
        assert rep.size == size and rep.root == led.root(size)
    assert fired() == 4 and led.size == before + 12
    assert not any(p.kind is ProblemKind.TRUNCATED for p in rep.problems)


def test_checkpoint_signed_between_reads_is_not_a_truncation(
    witnessed: tuple[Ledger, Ledger], tmp_path: Path,
) -> None:
    oem, _media = witnessed
    reader = _ro_engine(tmp_path / "oem.db")
    try:
        _check_between_reads(oem, reader)
    finally:
        reader.dispose()


def test_verify_while_a_writer_appends_checkpoints_and_cosigns(
    witnessed: tuple[Ledger, Ledger], tmp_path: Path,
) -> None:
    oem, media = witnessed
    stop = threading.Event()
    errors: list[BaseException] = []
    rounds = [0]

    def writer() -> None:
        try:
            while not stop.is_set():
                oem.append_many(_msgs(2, oem.size))
                note = oem.checkpoint()
                rounds[0] += 1
                if rounds[0] % 4 == 0:
                    cosigned = media.witness("media", oem.verifier, note,
                                             oem.consistency_proof(
                                                 media.peer_size(ORIGIN), oem.size))
                    oem.record_cosignatures(cosigned, [media.witness_verifier])
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    reader = _ro_engine(tmp_path / "oem.db")
    store = LedgerStore(reader, read_only=True)
    t = threading.Thread(target=writer, daemon=True)
    t.start()
    sizes: list[int] = []
    try:
        while (len(sizes) < 25 or rounds[0] < 25) and len(sizes) < 400 and not errors:
            rep = verify_store(store, ORIGIN, [oem.verifier], [media.witness_verifier])
            assert rep.ok, rep.summary()
            assert rep.checkpoints_checked >= 2 and rep.cosignatures_checked >= 1
            sizes.append(rep.size)
    finally:
        stop.set()
        t.join(30)
        reader.dispose()
    assert not errors, errors
    assert sizes == sorted(sizes) and sizes[-1] > 50 and rounds[0] >= 25
    assert oem.verify(witness_keys=[media.witness_verifier]).ok


# ------------------------------------------------------------------ PostgreSQL


@pytest.fixture
def pg_ledger_db(pg_engine: Engine) -> Iterator[Engine]:
    """A database of its own on the session's PostgreSQL cluster (dropped afterwards)."""
    name = "ledger_snapshot_test"
    admin = pg_engine.execution_options(isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.execute(text(f"DROP DATABASE IF EXISTS {name}"))
        c.execute(text(f"CREATE DATABASE {name}"))
    url = make_url(str(pg_engine.url.render_as_string(hide_password=False)))
    eng = create_engine(url.set(database=name))
    try:
        yield eng
    finally:
        eng.dispose()
        with admin.connect() as c:
            c.execute(text(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))


@pgserver_required()
def test_postgres_snapshot_is_repeatable_read(pg_ledger_db: Engine) -> None:
    led = Ledger(pg_ledger_db, "cleanroom/pg", Ed25519PrivateKey.generate())
    led.append_many(_msgs(40))
    led.checkpoint()
    reader = create_engine(pg_ledger_db.url,
                           execution_options={"postgresql_readonly": True})
    try:
        _check_between_reads(led, reader)
    finally:
        reader.dispose()
