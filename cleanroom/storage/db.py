"""One database setup for every kind of node state (datasets, queries, approvals, ledger...).

All tables are :class:`sqlmodel.SQLModel` classes on the one shared ``SQLModel.metadata``.
A subsystem that adds tables lists its module in :data:`TABLE_MODULES`; :func:`init_db`
imports those modules so that their tables exist before ``create_all`` runs. URLs are
SQLAlchemy URLs throughout: the SQLite default and a PostgreSQL URL
(``postgresql+psycopg://user@host/db``) take the same code path. Only connection setup
is dialect-aware (SQLite pragmas); no query here or in the table modules may use
dialect-specific SQL.

This module must not create tables itself, log URLs with passwords, or hold rows.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import ArgumentError
from sqlmodel import Session, SQLModel, create_engine

from cleanroom.errors import ConfigError

# Modules whose import registers tables on SQLModel.metadata. Add yours here.
TABLE_MODULES: tuple[str, ...] = (
    "cleanroom.storage.datasets",
    "cleanroom.ledger.store",
    "cleanroom.queries.tables",
)

DEFAULT_SQLITE_FILE = "node.db"


def default_database_url(node_dir: Path) -> str:
    """The SQLite database inside ``node_dir`` (an absolute URL)."""
    return f"sqlite:///{(Path(node_dir).resolve() / DEFAULT_SQLITE_FILE).as_posix()}"


def resolve_database_url(url: str, node_dir: Path) -> str:
    """Make a relative SQLite file path relative to ``node_dir``; other URLs are unchanged.

    Raises :class:`ValueError` if ``url`` is not an SQLAlchemy URL.
    """
    try:
        parsed = make_url(url)
    except ArgumentError as exc:
        raise ValueError(f"not a database URL ({exc})") from None
    if parsed.get_backend_name() == "sqlite":
        db = parsed.database
        if db and db != ":memory:" and not db.startswith("file:") and not Path(db).is_absolute():
            parsed = parsed.set(database=(Path(node_dir).resolve() / db).as_posix())
    return parsed.render_as_string(hide_password=False)


def redact_url(url: str) -> str:
    """The URL with any password hidden, for messages and logs."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return "<invalid database URL>"


def engine_for(url: str, *, echo: bool = False) -> Engine:
    """An engine for ``url``. SQLite gets WAL, foreign keys and a busy timeout.

    Raises :class:`~cleanroom.errors.ConfigError` if the URL or its driver is unusable.
    """
    try:
        parsed = make_url(url)
    except ArgumentError as exc:
        raise ConfigError(f"database URL is not valid: {exc}") from None
    kwargs: dict[str, Any] = {"echo": echo, "pool_pre_ping": True}
    is_sqlite = parsed.get_backend_name() == "sqlite"
    if is_sqlite:
        kwargs["connect_args"] = {"check_same_thread": False, "timeout": 30}
    try:
        engine = create_engine(url, **kwargs)
    except (ArgumentError, ImportError, ModuleNotFoundError) as exc:
        raise ConfigError(
            f"cannot open database {redact_url(url)}: {exc} (is the database driver installed?)"
        ) from None
    if is_sqlite:

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
            cur = dbapi_conn.cursor()
            if parsed.database not in (None, "", ":memory:"):
                cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA synchronous=FULL")
            cur.close()

    return engine


def import_table_modules() -> None:
    """Import every module in :data:`TABLE_MODULES` so their tables are registered."""
    for name in TABLE_MODULES:
        importlib.import_module(name)


def init_db(engine: Engine) -> None:
    """Create every registered table that does not exist yet (safe to call repeatedly)."""
    import_table_modules()
    SQLModel.metadata.create_all(engine)


@contextmanager
def session_scope(engine: Engine) -> Iterator[Session]:
    """A session that commits when the block succeeds and rolls back when it raises."""
    with Session(engine, expire_on_commit=False) as session:
        try:
            yield session
            session.commit()
        except BaseException:
            session.rollback()
            raise
