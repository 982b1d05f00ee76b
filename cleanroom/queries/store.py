"""Persistence of the query lifecycle: rows, state transitions, usage, results, outbox.

Every state change goes through :func:`transition`, which checks the move against
:data:`cleanroom.queries.states.TRANSITIONS` under one process-wide lock and commits it
with its history entry, so concurrent drivers, peer calls and the ticker never overwrite
each other. :class:`DbUsage` implements :class:`cleanroom.policy.Usage` over the
``query_usage`` table. Times are aware UTC datetimes throughout.

This module does no network I/O and holds no dataset rows.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import func
from sqlmodel import Session, col, select

from cleanroom.errors import CleanroomError, ConfigError
from cleanroom.node.context import NodeContext
from cleanroom.policy import Policy, QuerySpec, load_policy, parse_spec
from cleanroom.queries.states import TERMINAL, State, allowed
from cleanroom.queries.tables import (
    QueryDecisionRow,
    QueryOutboxRow,
    QueryResultRow,
    QueryRow,
    QueryUsageRow,
)

STATE_LOCK = threading.RLock()  # one writer of query states per process
DECISION_LOCK = threading.Lock()  # decide + reserve usage atomically


class QueryNotFound(CleanroomError):
    """No query with this id at this node."""


class TransitionRefused(CleanroomError):
    """A state change that the lifecycle table does not allow (e.g. cancel after completion)."""


def utcnow() -> datetime:
    return datetime.now(UTC)


def aware(dt: datetime) -> datetime:
    """``dt`` in UTC; a naive value is taken to be UTC already."""
    return dt.astimezone(UTC) if dt.tzinfo else dt.replace(tzinfo=UTC)


def iso(dt: datetime | None) -> str | None:
    return None if dt is None else aware(dt).isoformat().replace("+00:00", "Z")


# --- policy ----------------------------------------------------------------------------------

_policy_cache: dict[Path, tuple[tuple[int, int], Policy]] = {}
_policy_lock = threading.Lock()


def node_policy(ctx: NodeContext) -> Policy:
    """The node's policy file, re-read when it changes; no file = an empty (deny-all) policy."""
    path = ctx.config.policy_file
    if path is None:
        return Policy(version=1)
    try:
        st = path.stat()
    except OSError as exc:
        raise ConfigError(f"cannot read policy file {path}: {exc.strerror}") from None
    stamp = (st.st_mtime_ns, st.st_size)
    with _policy_lock:
        hit = _policy_cache.get(path)
        if hit is not None and hit[0] == stamp:
            return hit[1]
    policy = load_policy(path)
    with _policy_lock:
        _policy_cache[path] = (stamp, policy)
    return policy


# --- rows ------------------------------------------------------------------------------------


def get_query(ctx: NodeContext, query_id: str) -> QueryRow:
    with ctx.session() as s:
        row = s.get(QueryRow, query_id)
    if row is None:
        raise QueryNotFound(f"no query {query_id!r} at this node")
    return row


def find_query(ctx: NodeContext, query_id: str) -> QueryRow | None:
    with ctx.session() as s:
        return s.get(QueryRow, query_id)


def spec_of(row: QueryRow) -> QuerySpec:
    return parse_spec(row.spec_json, source=f"query {row.id}")


def list_queries(
    ctx: NodeContext, *, state: str | None = None, limit: int = 100, offset: int = 0
) -> list[QueryRow]:
    with ctx.session() as s:
        stmt = select(QueryRow)
        if state:
            stmt = stmt.where(QueryRow.state == state)
        stmt = stmt.order_by(col(QueryRow.created_at).desc()).offset(offset).limit(limit)
        return list(s.exec(stmt).all())


def active_queries(ctx: NodeContext) -> list[QueryRow]:
    with ctx.session() as s:
        stmt = select(QueryRow).where(col(QueryRow.state).not_in([t.value for t in TERMINAL]))
        return list(s.exec(stmt).all())


def insert_query(ctx: NodeContext, row: QueryRow, *extra: Any) -> None:
    """Store a new query (and rows that belong with it) in one transaction."""
    row.history = [{"state": row.state, "at": iso(row.created_at)}]
    with STATE_LOCK, ctx.session() as s:
        s.add(row)
        for item in extra:
            s.add(item)


def transition(
    ctx: NodeContext,
    query_id: str,
    new: State,
    *,
    expect: Iterable[State] | None = None,
    extra: Sequence[Any] = (),
    **fields: Any,
) -> QueryRow:
    """Move ``query_id`` to ``new`` if the lifecycle allows it (and, with ``expect``, only
    from those states); set ``fields`` and add ``extra`` rows in the same transaction.

    Raises :class:`TransitionRefused` naming the current state otherwise.
    """
    with STATE_LOCK, ctx.session() as s:
        row = s.get(QueryRow, query_id)
        if row is None:
            raise QueryNotFound(f"no query {query_id!r} at this node")
        old = State(row.state)
        if (expect is not None and old not in set(expect)) or not allowed(row.role, old, new):
            raise TransitionRefused(
                f"query {query_id} is {old.value}; it cannot become {new.value}"
            )
        now = utcnow()
        row.state = new.value
        row.updated_at = now
        for key, value in fields.items():
            setattr(row, key, value)
        row.history = [*row.history, {"state": new.value, "at": iso(now)}]
        s.add(row)
        for item in extra:
            s.add(item)
        s.flush()
        s.refresh(row)
        return row


def update_fields(ctx: NodeContext, query_id: str, **fields: Any) -> None:
    with STATE_LOCK, ctx.session() as s:
        row = s.get(QueryRow, query_id)
        if row is None:
            raise QueryNotFound(f"no query {query_id!r} at this node")
        for key, value in fields.items():
            setattr(row, key, value)
        s.add(row)


def add_session_count(ctx: NodeContext, query_id: str, opened: int, done: int) -> None:
    with STATE_LOCK, ctx.session() as s:
        row = s.get(QueryRow, query_id)
        if row is None:
            return
        row.open_sessions = max(0, row.open_sessions + opened)
        row.sessions_done += done
        s.add(row)


# --- decisions -------------------------------------------------------------------------------


def add_decision(ctx: NodeContext, row: QueryDecisionRow) -> None:
    with STATE_LOCK, ctx.session() as s:
        s.add(row)


def decisions(ctx: NodeContext, query_id: str) -> list[QueryDecisionRow]:
    with ctx.session() as s:
        stmt = (
            select(QueryDecisionRow)
            .where(QueryDecisionRow.query_id == query_id)
            .order_by(col(QueryDecisionRow.id))
        )
        return list(s.exec(stmt).all())


def latest_decisions(ctx: NodeContext, query_id: str) -> dict[str, QueryDecisionRow]:
    out: dict[str, QueryDecisionRow] = {}
    for d in decisions(ctx, query_id):
        out[d.party] = d
    return out


# --- usage -----------------------------------------------------------------------------------


class DbUsage:
    """:class:`cleanroom.policy.Usage` over ``query_usage``.

    A query counts against a partner's rate limit from the moment this node approved it
    (whatever happened later). Epsilon counts while reserved (approved, noise not applied
    yet) and once charged (noise applied); a reservation is released when the query ends
    without applying noise.
    """

    def __init__(self, ctx: NodeContext) -> None:
        self.ctx = ctx

    def queries_since(self, partner: str, since: datetime) -> int:
        with self.ctx.session() as s:
            stmt = select(func.count()).select_from(QueryUsageRow).where(
                QueryUsageRow.partner == partner, QueryUsageRow.counted_at >= aware(since)
            )
            return int(s.exec(stmt).one())

    def epsilon_spent_since(self, partner: str, since: datetime) -> float:
        cutoff = aware(since)
        total = 0.0
        with self.ctx.session() as s:
            rows = s.exec(select(QueryUsageRow).where(QueryUsageRow.partner == partner)).all()
        for r in rows:
            if r.epsilon_charged is not None:
                if r.charged_at is not None and aware(r.charged_at) >= cutoff:
                    total += r.epsilon_charged
            elif not r.released and aware(r.counted_at) >= cutoff:
                total += r.epsilon_reserved
        return total


def usage_rows(query_id: str, partners: Iterable[str], epsilon: float) -> list[QueryUsageRow]:
    now = utcnow()
    return [
        QueryUsageRow(query_id=query_id, partner=p, counted_at=now, epsilon_reserved=epsilon)
        for p in partners
    ]


def settle_usage(ctx: NodeContext, query_id: str, *, charge: bool) -> float:
    """Charge (noise applied) or release (no noise applied) the query's reservations.

    Returns the epsilon charged per partner (0.0 when released or without noise).
    """
    charged = 0.0
    with STATE_LOCK, ctx.session() as s:
        rows = s.exec(select(QueryUsageRow).where(QueryUsageRow.query_id == query_id)).all()
        for r in rows:
            if r.epsilon_charged is not None or r.released:
                continue
            if charge and r.epsilon_reserved > 0:
                r.epsilon_charged = r.epsilon_reserved
                r.charged_at = utcnow()
                charged = r.epsilon_reserved
            else:
                r.released = True
            s.add(r)
    return charged


def usage_summary(ctx: NodeContext, partner: str, hours: float, days: float) -> dict[str, Any]:
    usage = DbUsage(ctx)
    now = utcnow()
    return {
        "partner": partner,
        "queries": usage.queries_since(partner, now - timedelta(hours=hours)),
        "window_hours": hours,
        "epsilon_spent": usage.epsilon_spent_since(partner, now - timedelta(days=days)),
        "window_days": days,
    }


# --- results ---------------------------------------------------------------------------------


def get_result(ctx: NodeContext, query_id: str) -> QueryResultRow | None:
    with ctx.session() as s:
        return s.get(QueryResultRow, query_id)


def store_result(ctx: NodeContext, row: QueryResultRow) -> None:
    with STATE_LOCK, ctx.session() as s:
        if s.get(QueryResultRow, row.query_id) is None:
            s.add(row)


def delete_result(ctx: NodeContext, query_id: str) -> None:
    with STATE_LOCK, ctx.session() as s:
        r = s.get(QueryResultRow, query_id)
        if r is not None:
            s.delete(r)


# --- outbox ----------------------------------------------------------------------------------


def outbox_item(query_id: str, peer: str, kind: str, payload: dict[str, Any]) -> QueryOutboxRow:
    now = utcnow()
    return QueryOutboxRow(
        query_id=query_id,
        peer=peer,
        kind=kind,
        payload=json.dumps(payload, sort_keys=True),
        next_attempt_at=now,
        created_at=now,
    )


def add_outbox(ctx: NodeContext, items: Iterable[QueryOutboxRow]) -> None:
    with STATE_LOCK, ctx.session() as s:
        for item in items:
            s.add(item)


def due_outbox(ctx: NodeContext, limit: int = 50) -> list[QueryOutboxRow]:
    with ctx.session() as s:
        stmt = (
            select(QueryOutboxRow)
            .where(QueryOutboxRow.done == False, QueryOutboxRow.next_attempt_at <= utcnow())  # noqa: E712
            .order_by(col(QueryOutboxRow.id))
            .limit(limit)
        )
        return list(s.exec(stmt).all())


def finish_outbox(ctx: NodeContext, item_id: int, *, ok: bool, error: str | None = None) -> None:
    with STATE_LOCK, ctx.session() as s:
        item = s.get(QueryOutboxRow, item_id)
        if item is None:
            return
        if ok:
            item.done = True
        else:
            item.attempts += 1
            delay = min(60.0, 0.5 * 2 ** min(item.attempts, 7))
            item.next_attempt_at = utcnow() + timedelta(seconds=delay)
            item.last_error = (error or "")[:500]
            if item.attempts >= 40:
                item.done = True  # give up; the error stays visible on the row
        s.add(item)


def pending_outbox(ctx: NodeContext, query_id: str) -> list[QueryOutboxRow]:
    with ctx.session() as s:
        stmt = select(QueryOutboxRow).where(
            QueryOutboxRow.query_id == query_id,
            QueryOutboxRow.done == False,  # noqa: E712
        )
        return list(s.exec(stmt).all())


def session_for(ctx: NodeContext) -> Session:
    """A plain session (callers manage commit) for read-only multi-table views."""
    return Session(ctx.engine, expire_on_commit=False)
