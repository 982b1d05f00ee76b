"""Durable storage of the ledger through SQLAlchemy (SQLite by default, PostgreSQL too).

Tables (SQLModel, on the shared ``SQLModel.metadata`` so a node creates all its tables
at once; :func:`create_tables` creates only these):

- ``ledger_entry``: one row per entry: ``idx`` (the leaf index, primary key), ``leaf_hash``
  (32 bytes), ``body`` (canonical JSON bytes), and columns derived from the body for
  operator filters (``event_type``, ``ts_ms``, ``query_id``, ``parties``). The derived
  columns are conveniences; verification trusts only ``body``.
- ``ledger_checkpoint``: every checkpoint this node signed (full signed-note bytes).
- ``ledger_cosignature``: cosignatures peers returned over this node's checkpoints.
- ``ledger_peer_state``: per peer log, the last checkpoint this node cosigned (the
  witness's memory, used to refuse inconsistent or forked checkpoints).

Appends are transactions: a batch of entries commits entirely or not at all, so a crash
(even ``kill -9``) leaves a prefix of whole batches, which always verifies. SQLite is put
in WAL mode with ``synchronous=FULL`` (so a commit survives power loss); those pragmas are
applied only when the dialect is SQLite. The schema uses portable types only.

Readers: ``LedgerStore(engine, read_only=True)`` applies no pragma and creates nothing (an
auditor's read-only copy, even one not in WAL mode, opens) and refuses every write.
:meth:`LedgerStore.snapshot` reads entries, checkpoints, cosignatures and witness memory
in one read transaction, so a reader never mixes states while the node writes.

This module stores and loads bytes; it does not sign, verify or interpret entries.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

from sqlalchemy import (
    BigInteger,
    Column,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
    and_,
    event,
    func,
    insert,
    select,
)
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import IntegrityError
from sqlmodel import Field, SQLModel

from cleanroom.ledger.errors import LedgerStateError

_Big = BigInteger().with_variant(Integer(), "sqlite")


class LedgerEntryRow(SQLModel, table=True):
    """One ledger entry (table ``ledger_entry``)."""

    __tablename__ = "ledger_entry"

    idx: int = Field(sa_column=Column("idx", _Big, primary_key=True, autoincrement=False))
    leaf_hash: bytes = Field(sa_column=Column(LargeBinary(32), nullable=False))
    body: bytes = Field(sa_column=Column(LargeBinary, nullable=False))
    event_type: str = Field(sa_column=Column(String(64), nullable=False, index=True))
    ts_ms: int = Field(sa_column=Column(BigInteger, nullable=False, index=True))
    query_id: str | None = Field(
        default=None, sa_column=Column(String(128), nullable=True, index=True)
    )
    parties: str = Field(default="|", sa_column=Column(Text, nullable=False))


class LedgerCheckpointRow(SQLModel, table=True):
    """A checkpoint this node signed (table ``ledger_checkpoint``)."""

    __tablename__ = "ledger_checkpoint"
    __table_args__ = (UniqueConstraint("origin", "size", "root_hash", name="uq_ledger_cp"),)

    id: int | None = Field(default=None, sa_column=Column(_Big, primary_key=True))
    origin: str = Field(sa_column=Column(String(255), nullable=False))
    size: int = Field(sa_column=Column(BigInteger, nullable=False, index=True))
    root_hash: bytes = Field(sa_column=Column(LargeBinary(32), nullable=False))
    note: bytes = Field(sa_column=Column(LargeBinary, nullable=False))
    created_ms: int = Field(sa_column=Column(BigInteger, nullable=False))


class LedgerCosignatureRow(SQLModel, table=True):
    """A cosignature a peer returned over one of this node's checkpoints."""

    __tablename__ = "ledger_cosignature"
    __table_args__ = (
        UniqueConstraint("witness_name", "key_id", "size", "root_hash", "timestamp",
                         name="uq_ledger_cosig"),
    )

    id: int | None = Field(default=None, sa_column=Column(_Big, primary_key=True))
    origin: str = Field(sa_column=Column(String(255), nullable=False))
    size: int = Field(sa_column=Column(BigInteger, nullable=False, index=True))
    root_hash: bytes = Field(sa_column=Column(LargeBinary(32), nullable=False))
    checkpoint_text: str = Field(sa_column=Column(Text, nullable=False))
    witness_name: str = Field(sa_column=Column(String(255), nullable=False))
    key_id: bytes = Field(sa_column=Column(LargeBinary(4), nullable=False))
    timestamp: int = Field(sa_column=Column(BigInteger, nullable=False))
    signature: bytes = Field(sa_column=Column(LargeBinary(64), nullable=False))
    received_ms: int = Field(sa_column=Column(BigInteger, nullable=False))


class LedgerPeerStateRow(SQLModel, table=True):
    """The last checkpoint of a peer's log that this node cosigned (witness memory)."""

    __tablename__ = "ledger_peer_state"

    peer_origin: str = Field(sa_column=Column(String(255), primary_key=True))
    peer: str = Field(sa_column=Column(String(128), nullable=False))
    size: int = Field(sa_column=Column(BigInteger, nullable=False))
    root_hash: bytes = Field(sa_column=Column(LargeBinary(32), nullable=False))
    note: bytes = Field(sa_column=Column(LargeBinary, nullable=False))
    cosignature: str = Field(sa_column=Column(Text, nullable=False))
    cosigned_ms: int = Field(sa_column=Column(BigInteger, nullable=False))


LEDGER_TABLES = (
    LedgerEntryRow.__table__,  # type: ignore[attr-defined]
    LedgerCheckpointRow.__table__,  # type: ignore[attr-defined]
    LedgerCosignatureRow.__table__,  # type: ignore[attr-defined]
    LedgerPeerStateRow.__table__,  # type: ignore[attr-defined]
)
_E = LEDGER_TABLES[0]
_CP = LEDGER_TABLES[1]
_CS = LEDGER_TABLES[2]
_PS = LEDGER_TABLES[3]


def configure_sqlite(engine: Engine) -> None:
    """WAL + synchronous=FULL for SQLite engines (no-op for other dialects)."""
    if engine.dialect.name != "sqlite" or getattr(engine, "_cleanroom_ledger_pragmas", False):
        return

    def _on_connect(dbapi_conn: object, _record: object) -> None:
        cur = dbapi_conn.cursor()  # type: ignore[attr-defined]
        cur.execute("PRAGMA synchronous=FULL")
        cur.close()

    event.listen(engine, "connect", _on_connect)
    engine._cleanroom_ledger_pragmas = True  # type: ignore[attr-defined]
    if engine.url.database not in (None, "", ":memory:") and "mode=memory" not in str(
        engine.url
    ):
        with engine.connect() as conn:
            conn.exec_driver_sql("PRAGMA journal_mode=WAL")


def create_tables(engine: Engine) -> None:
    """Create the ledger tables (only those) if missing, and configure SQLite."""
    configure_sqlite(engine)
    SQLModel.metadata.create_all(engine, tables=list(LEDGER_TABLES))


_ENTRY_COLUMNS = ("idx", "leaf_hash", "body", "event_type", "ts_ms", "query_id", "parties")
_ROWS_PER_INSERT = 999 // len(_ENTRY_COLUMNS)  # SQLite's smallest host-parameter limit
_MARKERS = {"qmark": "?", "format": "%s", "pyformat": "%s"}


def _insert_entries(conn: Connection, payload: Sequence[Mapping[str, object]]) -> None:
    """Insert entry rows with multi-row ``INSERT ... VALUES`` statements.

    One statement per ``_ROWS_PER_INSERT`` rows instead of one database step per row: the
    SQLite driver releases and re-takes the GIL around every step, and in a busy node each
    re-take can wait for the event loop's thread (the group-commit writer of
    :mod:`cleanroom.anonq.guard` appends dozens of rows per commit). Drivers with another
    parameter style take SQLAlchemy's ``executemany``.
    """
    marker = _MARKERS.get(conn.dialect.paramstyle)
    if marker is None:
        conn.execute(insert(_E), list(payload))
        return
    one = "(" + ", ".join([marker] * len(_ENTRY_COLUMNS)) + ")"
    head = f"INSERT INTO {_E.name} ({', '.join(_ENTRY_COLUMNS)}) VALUES "
    for start in range(0, len(payload), _ROWS_PER_INSERT):
        chunk = payload[start:start + _ROWS_PER_INSERT]
        params = tuple(row[c] for row in chunk for c in _ENTRY_COLUMNS)
        conn.exec_driver_sql(head + ", ".join([one] * len(chunk)), params)


@dataclass(frozen=True)
class EntryRecord:
    """A row of ``ledger_entry`` as stored."""

    idx: int
    leaf_hash: bytes
    body: bytes


@dataclass(frozen=True)
class CheckpointRecord:
    origin: str
    size: int
    root_hash: bytes
    note: bytes
    created_ms: int


@dataclass(frozen=True)
class CosignatureRecord:
    origin: str
    size: int
    root_hash: bytes
    checkpoint_text: str
    witness_name: str
    key_id: bytes
    timestamp: int
    signature: bytes
    received_ms: int


@dataclass(frozen=True)
class PeerState:
    """What this node last cosigned for a peer log."""

    peer_origin: str
    peer: str
    size: int
    root_hash: bytes
    note: bytes
    cosignature: str
    cosigned_ms: int


@dataclass(frozen=True)
class EntryRow:
    """An entry ready to insert: bytes plus the derived filter columns."""

    idx: int
    leaf_hash: bytes
    body: bytes
    event_type: str
    ts_ms: int
    query_id: str | None
    parties: Sequence[str]


class LedgerStore:
    """Row-level access to the ledger tables. One writer per database.

    ``create`` (default: not ``read_only``) creates missing ledger tables and configures
    SQLite (WAL, ``synchronous=FULL``); ``create=False`` only configures SQLite.
    ``read_only=True`` touches nothing: no table creation and no pragma at all (so a
    read-only SQLite file that is not in WAL mode opens), and every write method raises
    :class:`LedgerStateError`.
    """

    def __init__(
        self, engine: Engine, *, create: bool | None = None, read_only: bool = False
    ) -> None:
        if create is None:
            create = not read_only
        if create and read_only:
            raise ValueError("a read-only ledger store cannot create tables")
        self.engine = engine
        self.read_only = read_only
        self._sqlite = engine.dialect.name == "sqlite"
        if create:
            create_tables(engine)
        elif not read_only:
            configure_sqlite(engine)

    @contextmanager
    def _connect(self) -> Iterator[Connection]:
        """A connection for one read (a snapshot hands out its own, held connection)."""
        with self.engine.connect() as conn:
            yield conn

    def _check_writable(self) -> None:
        if self.read_only:
            raise LedgerStateError("this ledger store was opened read-only; it cannot write")

    @contextmanager
    def snapshot(self) -> Iterator[LedgerSnapshot]:
        """Read one consistent state of all ledger tables.

        Every read through the yielded :class:`LedgerSnapshot` (entries, checkpoints,
        cosignatures, witness memory) goes through one connection inside one read
        transaction, so rows committed meanwhile by the writer are not seen: on SQLite a
        ``BEGIN`` read transaction (in WAL mode it reads a snapshot and never blocks the
        writer; in rollback-journal mode it holds a shared lock, so the writer waits);
        on other databases a ``REPEATABLE READ`` transaction (PostgreSQL, MySQL: one
        snapshot for the whole transaction). The snapshot is the state at the first read
        made through it. The transaction is rolled back at the end.
        A snapshot of a snapshot is the snapshot itself.
        """
        if isinstance(self, LedgerSnapshot):
            yield self
            return
        with self.engine.connect() as conn:
            if self._sqlite:
                # pysqlite opens no transaction for SELECTs by itself: begin one explicitly.
                conn.exec_driver_sql("BEGIN")
            else:
                conn.execution_options(isolation_level="REPEATABLE READ")
            try:
                yield LedgerSnapshot(self, conn)
            finally:
                conn.rollback()

    # --- entries --------------------------------------------------------------------------

    def append_rows(
        self, rows: Sequence[EntryRow], *, also: Callable[[Connection], None] | None = None
    ) -> None:
        """Insert ``rows`` in one transaction; all or nothing.

        ``also`` runs inside the same transaction (e.g. to update the witness memory
        together with the ``checkpoint_cosigned`` entry that records it).
        """
        self._check_writable()
        if not rows:
            return
        payload = [
            {
                "idx": r.idx,
                "leaf_hash": r.leaf_hash,
                "body": r.body,
                "event_type": r.event_type,
                "ts_ms": r.ts_ms,
                "query_id": r.query_id,
                "parties": "|" + "|".join(r.parties) + "|" if r.parties else "|",
            }
            for r in rows
        ]
        try:
            with self.engine.begin() as conn:
                _insert_entries(conn, payload)
                if also is not None:
                    also(conn)
        except IntegrityError as exc:
            raise LedgerStateError(
                f"ledger index {rows[0].idx} is already taken: another writer appended to "
                "this ledger; reopen it"
            ) from exc

    def count(self) -> int:
        with self._connect() as conn:
            return int(conn.execute(select(func.count()).select_from(_E)).scalar_one())

    def max_index(self) -> int | None:
        with self._connect() as conn:
            v = conn.execute(select(func.max(_E.c.idx))).scalar_one()
            return None if v is None else int(v)

    def leaf_hashes(self) -> tuple[bytes, int]:
        """All stored leaf hashes concatenated in index order, and the row count.

        Raises :class:`LedgerStateError` if indices are not exactly ``0 .. n-1``.
        """
        out = bytearray()
        n = 0
        with self._connect() as conn:
            res = conn.execute(
                select(_E.c.idx, _E.c.leaf_hash).order_by(_E.c.idx),
                execution_options={"stream_results": True, "yield_per": 50_000},
            )
            for idx, lh in res:
                if idx != n or len(lh) != 32:
                    raise LedgerStateError(
                        f"ledger_entry is not contiguous at index {n}: run "
                        "`cleanroom audit verify` to see what is wrong"
                    )
                out += lh
                n += 1
        return bytes(out), n

    def iter_entries(
        self, start: int = 0, batch: int = 50_000
    ) -> Iterator[EntryRecord]:
        """All rows from ``start`` in index order (streamed)."""
        with self._connect() as conn:
            res = conn.execute(
                select(_E.c.idx, _E.c.leaf_hash, _E.c.body)
                .where(_E.c.idx >= start)
                .order_by(_E.c.idx),
                execution_options={"stream_results": True, "yield_per": batch},
            )
            for idx, lh, body in res:
                yield EntryRecord(int(idx), bytes(lh), bytes(body))

    def iter_raw(self, batch: int = 50_000) -> Iterator[Sequence[tuple[int, bytes, bytes]]]:
        """All ``(idx, leaf_hash, body)`` rows in index order, in chunks (fast path)."""
        with self._connect() as conn:
            res = conn.execute(
                select(_E.c.idx, _E.c.leaf_hash, _E.c.body).order_by(_E.c.idx),
                execution_options={"stream_results": True, "yield_per": batch},
            )
            while True:
                chunk = res.fetchmany(batch)
                if not chunk:
                    break
                yield chunk

    def get_entry(self, idx: int) -> EntryRecord | None:
        with self._connect() as conn:
            row = conn.execute(
                select(_E.c.idx, _E.c.leaf_hash, _E.c.body).where(_E.c.idx == idx)
            ).first()
        return None if row is None else EntryRecord(int(row[0]), bytes(row[1]), bytes(row[2]))

    def query_entries(
        self,
        *,
        offset: int = 0,
        limit: int = 100,
        query_id: str | None = None,
        peer: str | None = None,
        event_type: str | Sequence[str] | None = None,
        since_ms: int | None = None,
        until_ms: int | None = None,
        max_index: int | None = None,
    ) -> list[EntryRecord]:
        """Filtered page of entries in index order (``until_ms`` exclusive)."""
        conds = []
        if query_id is not None:
            conds.append(_E.c.query_id == query_id)
        if peer is not None:
            conds.append(_E.c.parties.contains(f"|{peer}|", autoescape=True))
        if event_type is not None:
            types = [event_type] if isinstance(event_type, str) else list(event_type)
            conds.append(_E.c.event_type.in_(types))
        if since_ms is not None:
            conds.append(_E.c.ts_ms >= since_ms)
        if until_ms is not None:
            conds.append(_E.c.ts_ms < until_ms)
        if max_index is not None:
            conds.append(_E.c.idx < max_index)
        stmt = select(_E.c.idx, _E.c.leaf_hash, _E.c.body)
        if conds:
            stmt = stmt.where(and_(*conds))
        stmt = stmt.order_by(_E.c.idx).offset(offset).limit(limit)
        with self._connect() as conn:
            return [EntryRecord(int(i), bytes(h), bytes(b)) for i, h, b in conn.execute(stmt)]

    # --- checkpoints ------------------------------------------------------------------------

    def add_checkpoint(self, rec: CheckpointRecord) -> None:
        """Store a signed checkpoint; an identical (origin, size, root) one is kept as is."""
        self._check_writable()
        with self.engine.begin() as conn:
            exists = conn.execute(
                select(_CP.c.id).where(
                    _CP.c.origin == rec.origin,
                    _CP.c.size == rec.size,
                    _CP.c.root_hash == rec.root_hash,
                )
            ).first()
            if exists is None:
                conn.execute(
                    insert(_CP).values(
                        origin=rec.origin, size=rec.size, root_hash=rec.root_hash,
                        note=rec.note, created_ms=rec.created_ms,
                    )
                )

    def checkpoints(self) -> list[CheckpointRecord]:
        with self._connect() as conn:
            rows = conn.execute(
                select(_CP.c.origin, _CP.c.size, _CP.c.root_hash, _CP.c.note, _CP.c.created_ms)
                .order_by(_CP.c.size, _CP.c.id)
            ).all()
        return [CheckpointRecord(r[0], int(r[1]), bytes(r[2]), bytes(r[3]), int(r[4]))
                for r in rows]

    def latest_checkpoint(self) -> CheckpointRecord | None:
        with self._connect() as conn:
            r = conn.execute(
                select(_CP.c.origin, _CP.c.size, _CP.c.root_hash, _CP.c.note, _CP.c.created_ms)
                .order_by(_CP.c.size.desc(), _CP.c.id.desc())
                .limit(1)
            ).first()
        return None if r is None else CheckpointRecord(
            r[0], int(r[1]), bytes(r[2]), bytes(r[3]), int(r[4])
        )

    # --- cosignatures -------------------------------------------------------------------------

    def add_cosignatures(self, recs: Sequence[CosignatureRecord]) -> int:
        """Store cosignatures (duplicates ignored); returns how many were new."""
        self._check_writable()
        new = 0
        with self.engine.begin() as conn:
            for rec in recs:
                exists = conn.execute(
                    select(_CS.c.id).where(
                        _CS.c.witness_name == rec.witness_name,
                        _CS.c.key_id == rec.key_id,
                        _CS.c.size == rec.size,
                        _CS.c.root_hash == rec.root_hash,
                        _CS.c.timestamp == rec.timestamp,
                    )
                ).first()
                if exists is None:
                    conn.execute(insert(_CS).values(**rec.__dict__))
                    new += 1
        return new

    def cosignatures(self) -> list[CosignatureRecord]:
        with self._connect() as conn:
            rows = conn.execute(
                select(
                    _CS.c.origin, _CS.c.size, _CS.c.root_hash, _CS.c.checkpoint_text,
                    _CS.c.witness_name, _CS.c.key_id, _CS.c.timestamp, _CS.c.signature,
                    _CS.c.received_ms,
                ).order_by(_CS.c.size, _CS.c.id)
            ).all()
        return [
            CosignatureRecord(r[0], int(r[1]), bytes(r[2]), r[3], r[4], bytes(r[5]), int(r[6]),
                              bytes(r[7]), int(r[8]))
            for r in rows
        ]

    # --- witness memory -------------------------------------------------------------------------

    def peer_state(self, peer_origin: str) -> PeerState | None:
        with self._connect() as conn:
            r = conn.execute(select(_PS).where(_PS.c.peer_origin == peer_origin)).first()
        return None if r is None else _peer_state(r)

    def peer_states(self) -> list[PeerState]:
        with self._connect() as conn:
            rows = conn.execute(select(_PS).order_by(_PS.c.peer_origin)).all()
        return [_peer_state(r) for r in rows]

    def put_peer_state(self, st: PeerState, conn: Connection | None = None) -> None:
        """Insert or replace the witness memory for ``st.peer_origin`` (portable upsert)."""
        self._check_writable()
        if conn is None:
            with self.engine.begin() as c:
                self.put_peer_state(st, c)
            return
        conn.execute(_PS.delete().where(_PS.c.peer_origin == st.peer_origin))
        conn.execute(insert(_PS).values(**st.__dict__))


def _peer_state(r: object) -> PeerState:
    m = r._mapping  # type: ignore[attr-defined]
    return PeerState(
        m["peer_origin"], m["peer"], int(m["size"]), bytes(m["root_hash"]), bytes(m["note"]),
        m["cosignature"], int(m["cosigned_ms"]),
    )


class LedgerSnapshot(LedgerStore):
    """The read methods of a :class:`LedgerStore`, all on one connection in one read
    transaction (see :meth:`LedgerStore.snapshot`). Valid only inside that ``with``
    block; read-only."""

    def __init__(self, store: LedgerStore, conn: Connection) -> None:
        self.engine = store.engine
        self.read_only = True
        self._sqlite = store._sqlite
        self._conn = conn

    @contextmanager
    def _connect(self) -> Iterator[Connection]:
        if self._conn.closed:
            raise LedgerStateError("a ledger snapshot was used after its `with` block ended")
        yield self._conn
