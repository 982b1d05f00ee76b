"""Database tables of the joint query lifecycle (registered through ``TABLE_MODULES``).

- ``query``: one row per query this node takes part in (``role`` requester or
  counterparty): the canonical spec, its state, deadline, and why it ended.
- ``query_decision``: every party's signed decision this node holds (its own, and at the
  requester the counterparties'); the latest row per party counts.
- ``query_usage``: what this node allowed each partner (rate limits) and the privacy
  budget reserved or charged; :class:`cleanroom.queries.store.DbUsage` reads it.
- ``query_result``: a result at its receiver (or, when the computing node is not the
  receiver, until it has been delivered).
- ``query_outbox``: messages to peers that must arrive even across restarts (late
  decisions, cancellations, outcomes, results), retried by the node's ticker.

Rows hold names, digests, counts and states only, except ``query_result.payload`` (an
aggregate result, at the receiver). Nothing here does network I/O.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, Column, Text
from sqlmodel import Field, SQLModel


class QueryRow(SQLModel, table=True):
    __tablename__ = "query"

    id: str = Field(primary_key=True, max_length=64)
    role: str = Field(max_length=16)  # requester | counterparty
    requester: str = Field(index=True, max_length=64)
    query_type: str = Field(max_length=32)
    purpose: str = Field(max_length=64)
    receiver: str = Field(max_length=64)
    spec_json: str = Field(sa_column=Column(Text, nullable=False))
    spec_digest: str = Field(max_length=80)
    proposal_signature: str | None = Field(default=None, max_length=200)
    state: str = Field(index=True, max_length=16)
    created_at: datetime
    updated_at: datetime
    deadline_at: datetime = Field(index=True)
    error_code: str | None = Field(default=None, max_length=64)
    error_rule: str | None = Field(default=None, max_length=200)
    error_field: str | None = Field(default=None, max_length=200)
    error_party: str | None = Field(default=None, max_length=64)
    error_message: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    open_sessions: int = 0
    sessions_done: int = 0
    result_digest: str | None = Field(default=None, max_length=80)
    result_rows: int | None = None
    epsilon: float = 0.0
    history: list[dict[str, Any]] = Field(default_factory=list, sa_column=Column(JSON))


class QueryDecisionRow(SQLModel, table=True):
    __tablename__ = "query_decision"

    id: int | None = Field(default=None, primary_key=True)
    query_id: str = Field(index=True, max_length=64)
    party: str = Field(max_length=64)
    outcome: str = Field(max_length=16)  # approved | denied | held
    rule: str = Field(default="", max_length=200)
    field: str = Field(default="", max_length=200)
    reason: str = Field(default="", sa_column=Column(Text, nullable=False))
    decided_by: str = Field(default="policy", max_length=16)  # policy | operator
    min_intersection_size: int | None = None
    min_intersection_rule: str | None = Field(default=None, max_length=200)
    min_group_size: int | None = None
    min_group_rule: str | None = Field(default=None, max_length=200)
    signature: str = Field(default="", max_length=200)
    decided_at: datetime


class QueryUsageRow(SQLModel, table=True):
    __tablename__ = "query_usage"

    id: int | None = Field(default=None, primary_key=True)
    query_id: str = Field(index=True, max_length=64)
    partner: str = Field(index=True, max_length=64)
    counted_at: datetime = Field(index=True)
    epsilon_reserved: float = 0.0
    epsilon_charged: float | None = None
    charged_at: datetime | None = None
    released: bool = False


class QueryResultRow(SQLModel, table=True):
    __tablename__ = "query_result"

    query_id: str = Field(primary_key=True, max_length=64)
    receiver: str = Field(max_length=64)
    payload: str = Field(sa_column=Column(Text, nullable=False))
    salt: str = Field(max_length=64)  # hex; digest = sha256(salt || payload)
    digest: str = Field(max_length=80)
    rows: int = 0
    epsilon: float = 0.0
    created_at: datetime


class QueryOutboxRow(SQLModel, table=True):
    __tablename__ = "query_outbox"

    id: int | None = Field(default=None, primary_key=True)
    query_id: str = Field(index=True, max_length=64)
    peer: str = Field(max_length=64)
    kind: str = Field(max_length=16)  # decision | cancel | outcome | result
    payload: str = Field(sa_column=Column(Text, nullable=False))
    attempts: int = 0
    next_attempt_at: datetime = Field(index=True)
    created_at: datetime
    done: bool = Field(default=False, index=True)
    last_error: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
