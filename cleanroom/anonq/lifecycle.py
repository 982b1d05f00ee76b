"""The anonymous query (labeled PSI) driven through a joint query's session channel.

The query lifecycle (:mod:`cleanroom.queries`) opens sessions between nodes, moves their
bytes and records a digest and size of every message in both ledgers; this module puts
the labeled-PSI role objects on both ends of such a session:

- owner side: :func:`open_owner_session` returns an :class:`OwnerSessionResponder`, the
  lifecycle's ``SessionResponder`` over one :class:`~protocols.labeled_psi.AnonymousQueryOwner`
  session, bound to the lifecycle's 16-byte protocol session id, serving the table the
  node *published* (the same :class:`~cleanroom.anonq.tables.ServingSource` and the same
  per-partner evaluation budget as the peer endpoints of :mod:`cleanroom.anonq.api`),
  restricted to the modes the approved query allows;
- querier side: :func:`download_table` (TABLE_REQUEST -> the whole table, or a delta
  onto the copy the querier holds), :func:`lookup_batch_sessions` (one EVAL session per
  chunk, lookups in the downloaded table) and :func:`lookup_realtime_sessions` (EVAL then
  BUCKETS per chunk), each over channels the caller opens (one lifecycle session per
  labeled-PSI session).

One labeled-PSI session is one lifecycle session: download is one round trip, batch one,
real-time two; the responder is ``finished`` when its owner object is. Round names in the
ledgers: ``table_request``, ``eval_request``, ``bucket_request``.

This module must not open sockets, write ledger entries or touch query states (the
channel does); identifiers stay inside the querier objects, only blinded points, bucket
ids, table bytes and encrypted labels cross. It logs nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager
from typing import Protocol

from cleanroom.anonq import tables
from cleanroom.errors import CleanroomError
from protocols.errors import RemoteProtocolError
from protocols.labeled_psi import (
    AnonymousQuerier,
    AnonymousQueryOwner,
    EvaluationBudget,
    Mode,
    Table,
    oprf,
)
from protocols.labeled_psi.messages import MAX_BUCKETS_PER_REQUEST, TableRequest, decode
from protocols.labeled_psi.roles import EvaluateJob

#: identifiers per batch-mode EVAL session (8192 points = 256 KiB each way)
BATCH_CHUNK = 8192
#: identifiers per real-time session (one BUCKET_REQUEST names at most this many buckets)
REALTIME_CHUNK = 1024
#: evaluate requests of at least this many points in two threads (X25519 frees the GIL)
PARALLEL_EVAL_MIN = 2048
#: points accepted in one EVAL request at the owner
MAX_POINTS = 1 << 16

ROUND_TABLE = "table_request"
ROUND_EVAL = "eval_request"
ROUND_BUCKETS = "bucket_request"


class AnonQuerySessionError(CleanroomError):
    """A labeled-PSI session through the lifecycle could not run; names peer and table."""


class Channel(Protocol):
    """The requester's end of one lifecycle session (see ``cleanroom.queries.runners``)."""

    @property
    def protocol_session_id(self) -> bytes: ...

    def exchange(self, message: bytes, *, round: str) -> bytes: ...


OpenChannel = Callable[[], AbstractContextManager[Channel]]


# --- owner ---------------------------------------------------------------------------------


def _evaluate(key: bytes, points: bytes) -> bytes:
    n = len(points) // 32
    if n < PARALLEL_EVAL_MIN:
        return oprf.evaluate_job(key, points)
    half = (n // 2) * 32
    with ThreadPoolExecutor(2) as pool:
        a = pool.submit(oprf.evaluate_job, key, points[:half])
        b = pool.submit(oprf.evaluate_job, key, points[half:])
        return a.result() + b.result()


class OwnerSessionResponder:
    """One labeled-PSI session at the owner as a lifecycle ``SessionResponder``.

    ``handle(message)`` runs the owner object (its checks raise
    :class:`~protocols.errors.RemoteProtocolError`, which the node turns into the hinted
    4xx); the OPRF evaluation runs here, in two threads for large requests.
    """

    def __init__(self, role: AnonymousQueryOwner, source: tables.ServingSource) -> None:
        self.role = role
        self._source = source

    def handle(self, message: bytes) -> bytes:
        step = self.role.receive(self._full_if_not_kept(message))
        if not isinstance(step.job, EvaluateJob):
            return step.reply or b""
        try:
            output = _evaluate(self._source.key, step.job.points)
        except RemoteProtocolError as exc:
            self.role.fail(exc)
        return self.role.complete(step, output) or b""

    @property
    def finished(self) -> bool:
        return self.role.finished

    def _full_if_not_kept(self, message: bytes) -> bytes:
        """A TABLE_REQUEST naming a version of this table no longer kept asks for the whole
        table instead (the peer endpoint answers 409 and the querier asks again; here a
        protocol error would end the query)."""
        try:
            msg = decode(message)
        except RemoteProtocolError:
            return message  # the role object refuses it
        if not isinstance(msg, TableRequest):
            return message
        cur = self._source.current
        kept = set(self._source.meta.retained) | {cur.version}
        if (msg.table_id == cur.table_id and 1 <= msg.have_version < cur.version
                and msg.have_version not in kept):
            return TableRequest(msg.session_id, bytes(16), 0).to_bytes()
        return message


def open_owner_session(
    source: tables.ServingSource,
    *,
    peer: str,
    session_id: bytes,
    modes: frozenset[Mode],
    budget: EvaluationBudget | None = None,
) -> OwnerSessionResponder:
    """A responder for one session of ``peer`` against ``source`` in one of ``modes``.

    ``budget`` is the partner's :class:`~protocols.labeled_psi.EvaluationBudget` for this
    table (shared with the peer endpoints); ``session_id`` the lifecycle's protocol
    session id, so messages of another session or query are refused (409).
    """
    role = AnonymousQueryOwner(
        source, querier_id=peer, session_id=session_id, budget=budget,
        allowed_modes=modes, max_points=MAX_POINTS,
        max_buckets=MAX_BUCKETS_PER_REQUEST)
    return OwnerSessionResponder(role, source)


# --- querier -------------------------------------------------------------------------------


def _chunks(n: int, size: int) -> list[tuple[int, int]]:
    return [(start, min(n, start + size)) for start in range(0, n, size)]


def download_table(open_channel: OpenChannel, have: Table | None, *,
                   max_entries: int = 1 << 31) -> Table:
    """The owner's current table: a delta onto ``have`` or, without it, the whole table."""
    with open_channel() as ch:
        q = AnonymousQuerier.download(have, session_id=ch.protocol_session_id,
                                      max_entries=max_entries)
        q.handle(ch.exchange(q.start(), round=ROUND_TABLE))
        return q.table


def lookup_batch_sessions(
    open_channel: OpenChannel,
    identifiers: Sequence[bytes],
    table: Table,
    *,
    chunk: int = BATCH_CHUNK,
    check_alive: Callable[[], None] | None = None,
) -> dict[int, bytes]:
    """Labels of ``identifiers`` (position -> label, present ones only), batch mode.

    One EVAL session per ``chunk`` identifiers; the owner learns how many evaluations
    each session asked for, nothing else. Raises RemoteProtocolError if the owner now
    evaluates for another table than ``table`` (download it again).
    """
    out: dict[int, bytes] = {}
    for start, stop in _chunks(len(identifiers), chunk):
        if check_alive is not None:
            check_alive()
        with open_channel() as ch:
            q = AnonymousQuerier.batch(identifiers[start:stop], table,
                                       session_id=ch.protocol_session_id)
            q.handle(ch.exchange(q.start(), round=ROUND_EVAL))
            out.update({start + p: lab for p, lab in q.result.labels.items()})
    return out


def lookup_realtime_sessions(
    open_channel: OpenChannel,
    identifiers: Sequence[bytes],
    *,
    min_anonymity: int,
    chunk: int = REALTIME_CHUNK,
    check_alive: Callable[[], None] | None = None,
) -> tuple[dict[int, bytes], int]:
    """Labels of ``identifiers``, real-time mode, and the smallest bucket fetched.

    Per ``chunk`` identifiers one session: EVAL, then the buckets of the tags; the owner
    learns the bucket ids. Each session refuses (403) an owner whose announced buckets are
    smaller than ``min_anonymity`` entries.
    """
    if not 1 <= chunk <= MAX_BUCKETS_PER_REQUEST:
        raise AnonQuerySessionError(f"real-time chunk must be 1..{MAX_BUCKETS_PER_REQUEST}")
    out: dict[int, bytes] = {}
    smallest = 0
    for start, stop in _chunks(len(identifiers), chunk):
        if check_alive is not None:
            check_alive()
        with open_channel() as ch:
            q = AnonymousQuerier.realtime(identifiers[start:stop],
                                          session_id=ch.protocol_session_id,
                                          min_anonymity=min_anonymity)
            breq = q.handle(ch.exchange(q.start(), round=ROUND_EVAL))
            if breq is None:
                raise AnonQuerySessionError("the real-time session ended before its buckets")
            q.handle(ch.exchange(breq, round=ROUND_BUCKETS))
            res = q.result
            out.update({start + p: lab for p, lab in res.labels.items()})
            if res.bucket_sizes:
                low = min(res.bucket_sizes)
                smallest = low if smallest == 0 else min(smallest, low)
    return out, smallest
