"""Sans-I/O role objects of the anonymous query: :class:`AnonymousQuerier` (one session of
a querier) and :class:`AnonymousQueryOwner` (one session at the owner), plus the owner's
:class:`EvaluationBudget` (evaluations per querier and per session).

Sessions (one object per session and role, like :mod:`protocols.psi.roles`):

- batch: ``EVAL_REQUEST`` -> ``EVAL_RESPONSE``; the querier unblinds and looks up in a
  table it downloaded before (the owner learns the number of evaluations);
- real-time: ``EVAL_REQUEST`` -> ``EVAL_RESPONSE`` -> ``BUCKET_REQUEST`` ->
  ``BUCKET_RESPONSE`` (the owner also learns the bucket ids);
- download: ``TABLE_REQUEST`` -> ``TABLE_RESPONSE`` (full table, or a delta from the
  version the querier holds).

Two ways to drive an object: serial (``start()`` on the querier, then ``handle(message)
-> reply | None`` on both sides), or split so the X25519 work runs in a worker process:
``step = role.receive(message)`` (cheap checks), ``output = step.job.run()`` (pure,
picklable), ``role.complete(step, output) -> reply | None``; the querier's first message
is ``role.prepare_start()`` then ``complete``. Every message is checked against the
transition table in :mod:`protocols.labeled_psi.states`: malformed, truncated, replayed,
foreign-session or wrong-round input moves the object to ``ERROR`` and raises
:class:`~protocols.errors.RemoteProtocolError` (400/409; 413 oversized; 429 over budget;
403 mode not allowed). Misuse by the caller raises :class:`LocalProtocolError`.

Identifiers are normalised bytes (kind-tagged, e.g. :func:`protocols.psi.multikey.encode_item`);
they never leave the querier object, only blinded points do. Objects are not thread-safe.
"""

from __future__ import annotations

import os
import secrets
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NoReturn

from protocols.errors import LocalProtocolError, RemoteProtocolError
from protocols.labeled_psi import oprf
from protocols.labeled_psi.messages import (
    MAX_BUCKETS_PER_REQUEST,
    MAX_POINTS_PER_REQUEST,
    SESSION_ID_BYTES,
    BucketRequest,
    BucketResponse,
    EvalRequest,
    EvalResponse,
    Message,
    Mode,
    TableInfo,
    TableRequest,
    TableResponse,
    decode,
)
from protocols.labeled_psi.states import Event, Role, State, next_state
from protocols.labeled_psi.table import (
    DEFAULT_MAX_ENTRIES,
    DEFAULT_MIN_BUCKET_SIZE,
    Bucket,
    Delta,
    OwnerTable,
    Table,
    bucket_of,
)

NO_LIMIT = 0xFFFFFFFF

# --- jobs ------------------------------------------------------------------------------


@dataclass(frozen=True)
class BlindJob:
    """Querier: blind the distinct identifiers (and padding) with ``r``."""

    r: bytes = field(repr=False)
    identifiers: tuple[bytes, ...] = field(repr=False)

    def run(self) -> bytes:
        return oprf.blind_job(self.r, self.identifiers)


@dataclass(frozen=True)
class EvaluateJob:
    """Owner: one X25519 per received point."""

    key: bytes = field(repr=False)
    points: bytes = field(repr=False)

    def run(self) -> bytes:
        return oprf.evaluate_job(self.key, self.points)


@dataclass(frozen=True)
class UnblindJob:
    """Querier: unblind with ``s`` and derive ``(tag, label key)`` per point."""

    s: bytes = field(repr=False)
    table_id: bytes
    points: bytes = field(repr=False)

    def run(self) -> list[tuple[bytes, bytes]]:
        return oprf.unblind_derive_job(self.s, self.table_id, self.points)


Job = BlindJob | EvaluateJob | UnblindJob


@dataclass(frozen=True)
class Step:
    """One accepted unit of work; ``job`` is ``None`` when nothing heavy is left."""

    event: Event
    job: Job | None
    reply: bytes | None = None


# --- budget ----------------------------------------------------------------------------


class EvaluationBudget:
    """Counts OPRF evaluations per querier and per session; refuses beyond the limits.

    The node decides the window (e.g. one budget object per day, or ``reset()`` on a
    timer) and the limits from policy; this object only counts. A request that would go
    over a limit is refused whole (nothing is charged) with RemoteProtocolError 429.
    """

    def __init__(self, *, per_querier: int | None = None, per_session: int | None = None) -> None:
        for name, v in (("per_querier", per_querier), ("per_session", per_session)):
            if v is not None and v < 0:
                raise LocalProtocolError(f"{name} must be non-negative")
        self.per_querier = per_querier
        self.per_session = per_session
        self._by_querier: dict[str, int] = {}
        self._by_session: dict[bytes, int] = {}

    def used(self, querier_id: str) -> int:
        return self._by_querier.get(querier_id, 0)

    def remaining(self, querier_id: str, session_id: bytes) -> int | None:
        """Evaluations still allowed, or ``None`` without limits."""
        left: list[int] = []
        if self.per_querier is not None:
            left.append(self.per_querier - self.used(querier_id))
        if self.per_session is not None:
            left.append(self.per_session - self._by_session.get(session_id, 0))
        return max(0, min(left)) if left else None

    def charge(self, querier_id: str, session_id: bytes, count: int) -> None:
        left = self.remaining(querier_id, session_id)
        if left is not None and count > left:
            raise RemoteProtocolError(
                f"evaluation limit reached: {count} asked, {left} left for this querier/session",
                status_hint=429)
        self._by_querier[querier_id] = self.used(querier_id) + count
        self._by_session[session_id] = self._by_session.get(session_id, 0) + count

    def reset(self, querier_id: str | None = None) -> None:
        """Start a new window for one querier (or everyone)."""
        if querier_id is None:
            self._by_querier.clear()
            self._by_session.clear()
        else:
            self._by_querier.pop(querier_id, None)


# --- results ---------------------------------------------------------------------------


@dataclass(frozen=True)
class QueryResult:
    """What the querier learned in an evaluation session.

    ``labels`` maps a position in the querier's input to the label of that identifier (only
    identifiers present in the table). ``info`` is the owner's table metadata at session
    time; ``table_version`` is the version the lookups used (the local table in batch mode,
    which may be older than ``info.version``: then download a delta). ``bucket_sizes`` are
    the sizes of the buckets fetched in real-time mode (the anonymity sets).
    """

    mode: Mode
    labels: dict[int, bytes]
    info: TableInfo
    table_version: int
    evaluations: int
    buckets: tuple[int, ...] = ()
    bucket_sizes: tuple[int, ...] = ()

    @property
    def stale(self) -> bool:
        return self.table_version != self.info.version


@dataclass(frozen=True)
class OwnerObservation:
    """Everything the owner learns in a session (no identifier, tag or OPRF output)."""

    mode: Mode | None = None
    evaluations: int = 0
    buckets: tuple[int, ...] = ()
    have_version: int | None = None
    table_version: int | None = None
    sent_delta: bool = False


# --- shared machinery ------------------------------------------------------------------


class _Role(ABC):
    role: Role

    def __init__(self, session_id: bytes | None) -> None:
        self._state = State.IDLE
        self._pending = False
        sid = session_id if session_id is not None else secrets.token_bytes(SESSION_ID_BYTES)
        if len(sid) != SESSION_ID_BYTES:
            raise LocalProtocolError(f"session_id must be {SESSION_ID_BYTES} bytes")
        self.session_id = sid

    @property
    def state(self) -> State:
        return self._state

    @property
    def finished(self) -> bool:
        return self._state is State.DONE and not self._pending

    def _move(self, event: Event, *, remote: bool) -> None:
        nxt = next_state(self.role, self._state, event)
        if nxt is None:
            msg = f"{self.role.value}: '{event.value}' is not allowed in state {self._state.value}"
            if remote:
                self.fail(RemoteProtocolError(f"wrong round: {msg}", status_hint=409))
            raise LocalProtocolError(msg)
        self._state = nxt

    def fail(self, exc: RemoteProtocolError) -> NoReturn:
        """Move to ERROR and raise ``exc`` (also for errors raised by a job in a worker)."""
        self._state = State.ERROR
        raise exc

    def _remote(self, message: str, status: int = 400) -> NoReturn:
        self.fail(RemoteProtocolError(message, status_hint=status))

    def _decode(self, data: bytes) -> Message:
        if self._state is State.ERROR:
            raise LocalProtocolError(f"{self.role.value} is in ERROR; start a new session")
        try:
            msg = decode(data)
        except RemoteProtocolError as exc:
            self.fail(exc)
        if msg.session_id != self.session_id:
            self._remote("message belongs to another session", 409)
        return msg

    @abstractmethod
    def receive(self, data: bytes) -> Step:
        """Check one incoming message and return the work it needs."""

    @abstractmethod
    def complete(self, step: Step, output: object) -> bytes | None:
        """Apply the output of a step's job; return the reply, if any."""

    def handle(self, data: bytes) -> bytes | None:
        """Serial driver: receive, run the job here, complete."""
        step = self.receive(data)
        if step.job is None:
            return step.reply
        try:
            output = step.job.run()
        except RemoteProtocolError as exc:
            self.fail(exc)
        return self.complete(step, output)


# --- owner -----------------------------------------------------------------------------


class AnonymousQueryOwner(_Role):
    """One session at the data owner. The node creates one per incoming session, naming
    the authenticated querier (for the budget) and the session id it approved."""

    role = Role.OWNER

    def __init__(
        self,
        source: OwnerTable,
        *,
        querier_id: str,
        session_id: bytes,
        budget: EvaluationBudget | None = None,
        allowed_modes: frozenset[Mode] = frozenset(Mode),
        max_points: int = MAX_POINTS_PER_REQUEST,
        max_buckets: int = MAX_BUCKETS_PER_REQUEST,
    ) -> None:
        super().__init__(session_id)
        self._source = source
        self.querier_id = querier_id
        self._budget = budget
        self._allowed = frozenset(allowed_modes)
        self._max_points = max_points
        self._max_buckets = max_buckets
        self._table: Table | None = None
        self._pending = False
        self.observed = OwnerObservation()

    def receive(self, data: bytes) -> Step:
        msg = self._decode(data)
        if isinstance(msg, EvalRequest):
            event = (Event.ANSWER_EVAL_BATCH if msg.mode is Mode.BATCH
                     else Event.ANSWER_EVAL_REALTIME)
            self._move(event, remote=True)
            if msg.mode not in self._allowed:
                self._remote(f"mode {msg.mode.name.lower()} is not allowed by policy", 403)
            if msg.count > self._max_points:
                self._remote(f"{msg.count} points exceed the limit {self._max_points}", 413)
            try:
                oprf.ecdh.check_points(msg.points)
                if self._budget is not None:
                    self._budget.charge(self.querier_id, self.session_id, msg.count)
            except RemoteProtocolError as exc:
                self.fail(exc)
            self._table = self._source.current  # pinned for the whole session
            self._pending = True
            self.observed = OwnerObservation(mode=msg.mode, evaluations=msg.count,
                                             table_version=self._table.version)
            return Step(event, EvaluateJob(self._source.key, msg.points))
        if isinstance(msg, BucketRequest):
            self._move(Event.ANSWER_BUCKETS, remote=True)
            table = self._table
            assert table is not None
            if msg.version != table.version:
                self._remote(f"BUCKET_REQUEST for version {msg.version}, session uses "
                             f"{table.version}", 409)
            if len(msg.buckets) > min(self.observed.evaluations, self._max_buckets):
                self._remote(f"{len(msg.buckets)} buckets asked after "
                             f"{self.observed.evaluations} evaluations")
            if msg.buckets[-1] >= table.bucket_count:
                self._remote(f"bucket {msg.buckets[-1]} outside 0..{table.bucket_count - 1}")
            self.observed = OwnerObservation(
                mode=self.observed.mode, evaluations=self.observed.evaluations,
                buckets=msg.buckets, table_version=table.version)
            blobs = tuple(table.bucket(b).to_bytes() for b in msg.buckets)
            return Step(Event.ANSWER_BUCKETS, None, BucketResponse(self.session_id, blobs)
                        .to_bytes())
        if isinstance(msg, TableRequest):
            self._move(Event.ANSWER_TABLE, remote=True)
            if Mode.DOWNLOAD not in self._allowed:
                self._remote("table download is not allowed by policy", 403)
            cur = self._source.current
            same = msg.table_id == cur.table_id and msg.have_version >= 1
            if same and msg.have_version > cur.version:
                self._remote(f"querier claims version {msg.have_version}, newest is "
                             f"{cur.version}", 409)
            blob = (self._source.delta_since(msg.have_version).to_bytes() if same
                    else cur.to_bytes())
            self.observed = OwnerObservation(mode=Mode.DOWNLOAD, have_version=msg.have_version,
                                             table_version=cur.version, sent_delta=same)
            return Step(Event.ANSWER_TABLE, None, TableResponse(self.session_id, blob).to_bytes())
        self._remote(f"an owner does not accept {type(msg).__name__}", 409)

    def complete(self, step: Step, output: object) -> bytes | None:
        if step.event not in (Event.ANSWER_EVAL_BATCH, Event.ANSWER_EVAL_REALTIME) or not (
            self._pending
        ):
            raise LocalProtocolError("step has nothing to complete")
        table = self._table
        if table is None or not isinstance(output, bytes):
            raise LocalProtocolError("evaluation output must be packed points")
        if len(output) != 32 * self.observed.evaluations:
            raise LocalProtocolError("evaluation output does not match the request")
        self._pending = False
        left = NO_LIMIT
        if self._budget is not None:
            rem = self._budget.remaining(self.querier_id, self.session_id)
            left = NO_LIMIT if rem is None else min(rem, NO_LIMIT - 1)
        info = TableInfo(table.table_id, table.version, table.bucket_count, table.entry_count,
                         table.min_bucket_size, table.label_size, left)
        return EvalResponse(self.session_id, info, output).to_bytes()


# --- querier ---------------------------------------------------------------------------


class AnonymousQuerier(_Role):
    """One session of a querier. Build it with :meth:`batch`, :meth:`realtime` or
    :meth:`download`; the constructor is internal."""

    role = Role.QUERIER

    def __init__(
        self,
        mode: Mode,
        identifiers: Sequence[bytes],
        *,
        table: Table | None,
        session_id: bytes | None,
        pad_to: int | None,
        min_anonymity: int,
        max_entries: int,
        blinding: tuple[bytes, bytes] | None = None,
    ) -> None:
        super().__init__(session_id)
        self.mode = mode
        self._table = table
        self._min_anonymity = min_anonymity
        self._max_entries = max_entries
        self._positions: dict[bytes, list[int]] = {}
        for i, x in enumerate(identifiers):
            if not isinstance(x, bytes) or not x:
                raise LocalProtocolError(f"identifier {i} is not non-empty bytes")
            self._positions.setdefault(x, []).append(i)
        unique = list(self._positions)
        if mode is not Mode.DOWNLOAD:
            if not unique:
                raise LocalProtocolError("no identifiers to query")
            if len(unique) > MAX_POINTS_PER_REQUEST:
                raise LocalProtocolError(f"at most {MAX_POINTS_PER_REQUEST} identifiers")
            if pad_to is not None:
                if pad_to < len(unique) or pad_to > MAX_POINTS_PER_REQUEST:
                    raise LocalProtocolError(f"pad_to {pad_to} is below {len(unique)} "
                                             "distinct identifiers or above the limit")
                # Dummies: fresh random identifiers (never in any table); in real-time mode
                # their tags also pick uniformly random buckets, so padding covers buckets.
                unique += [b"\x00pad" + os.urandom(28) for _ in range(pad_to - len(unique))]
        self._real = len(self._positions)
        self._unique = unique
        self._r, self._s = blinding if blinding is not None else oprf.new_blinding_pair()
        self._info: TableInfo | None = None
        self._pairs: list[tuple[bytes, bytes]] = []
        self._requested: tuple[int, ...] = ()
        self._result: QueryResult | None = None
        self._pending = False
        self._downloaded: Table | None = None

    @classmethod
    def batch(
        cls, identifiers: Sequence[bytes], table: Table, *, session_id: bytes | None = None,
        pad_to: int | None = None,
    ) -> AnonymousQuerier:
        """Evaluate the identifiers, then look up locally in ``table`` (downloaded before)."""
        return cls(Mode.BATCH, identifiers, table=table, session_id=session_id, pad_to=pad_to,
                   min_anonymity=1, max_entries=DEFAULT_MAX_ENTRIES)

    @classmethod
    def realtime(
        cls, identifiers: Sequence[bytes], *, session_id: bytes | None = None,
        pad_to: int | None = None, min_anonymity: int = DEFAULT_MIN_BUCKET_SIZE,
        max_bucket_entries: int = 1 << 20,
    ) -> AnonymousQuerier:
        """Evaluate, then fetch the bucket of each tag. Refuses (403) an owner whose
        announced minimum bucket size is below ``min_anonymity``."""
        return cls(Mode.REALTIME, identifiers, table=None, session_id=session_id,
                   pad_to=pad_to, min_anonymity=min_anonymity, max_entries=max_bucket_entries)

    @classmethod
    def download(
        cls, have: Table | None = None, *, session_id: bytes | None = None,
        max_entries: int = DEFAULT_MAX_ENTRIES,
    ) -> AnonymousQuerier:
        """Fetch the owner's current table, or a delta from ``have``."""
        return cls(Mode.DOWNLOAD, (), table=have, session_id=session_id, pad_to=None,
                   min_anonymity=1, max_entries=max_entries)

    # -- sending --

    def prepare_start(self) -> Step:
        """First message as a step: the blinding job (EVAL) or a ready TABLE_REQUEST."""
        if self._state is not State.IDLE:
            raise LocalProtocolError("the session has already started")
        if self.mode is Mode.DOWNLOAD:
            have = self._table
            req = TableRequest(self.session_id, have.table_id if have else bytes(16),
                               have.version if have else 0)
            self._move(Event.SEND_TABLE_REQUEST, remote=False)
            return Step(Event.SEND_TABLE_REQUEST, None, req.to_bytes())
        return Step(Event.SEND_EVAL, BlindJob(self._r, tuple(self._unique)))

    def start(self) -> bytes:
        """Serial driver: the first message of the session."""
        step = self.prepare_start()
        if step.job is None:
            assert step.reply is not None
            return step.reply
        reply = self.complete(step, step.job.run())
        assert reply is not None
        return reply

    # -- receiving --

    def receive(self, data: bytes) -> Step:
        msg = self._decode(data)
        if isinstance(msg, EvalResponse):
            event = (Event.RECV_EVAL_BATCH if self.mode is Mode.BATCH
                     else Event.RECV_EVAL_REALTIME)
            self._move(event, remote=True)
            if msg.count != len(self._unique):
                self._remote(f"EVAL_RESPONSE carries {msg.count} points, {len(self._unique)} "
                             "were sent")
            info = msg.info
            if self.mode is Mode.BATCH:
                assert self._table is not None
                if info.table_id != self._table.table_id:
                    self._remote("the owner evaluates for another table: download it first", 409)
            elif (info.min_bucket_size < self._min_anonymity
                  or info.entry_count < self._min_anonymity * info.bucket_count):
                self._remote(f"the owner's buckets are below this querier's anonymity floor "
                             f"of {self._min_anonymity} entries", 403)
            try:
                oprf.ecdh.check_points(msg.points)
            except RemoteProtocolError as exc:
                self.fail(exc)
            self._info = info
            self._pending = True
            return Step(event, UnblindJob(self._s, info.table_id, msg.points))
        if isinstance(msg, BucketResponse):
            self._move(Event.RECV_BUCKETS, remote=True)
            self._finish_buckets(msg)
            return Step(Event.RECV_BUCKETS, None)
        if isinstance(msg, TableResponse):
            self._move(Event.RECV_TABLE, remote=True)
            self._finish_download(msg.blob)
            return Step(Event.RECV_TABLE, None)
        self._remote(f"a querier does not accept {type(msg).__name__}", 409)

    def complete(self, step: Step, output: object) -> bytes | None:
        if step.event is Event.SEND_EVAL:
            if not isinstance(output, bytes) or len(output) != 32 * len(self._unique):
                raise LocalProtocolError("blind job output does not match the identifiers")
            self._move(Event.SEND_EVAL, remote=False)
            return EvalRequest(self.session_id, self.mode, output).to_bytes()
        if step.event not in (Event.RECV_EVAL_BATCH, Event.RECV_EVAL_REALTIME) or not (
            self._pending
        ):
            raise LocalProtocolError("step has nothing to complete")
        if not isinstance(output, list) or len(output) != len(self._unique):
            raise LocalProtocolError("unblind job output does not match the identifiers")
        info = self._info
        assert info is not None
        self._pending = False
        self._pairs = output
        if self.mode is Mode.BATCH:
            assert self._table is not None
            labels = self._table.open(output[: self._real])
            self._result = QueryResult(Mode.BATCH, self._spread(labels), info,
                                       self._table.version, len(self._unique))
            return None
        self._requested = tuple(sorted({bucket_of(t, info.bucket_count) for t, _ in output}))
        self._move(Event.SEND_BUCKETS, remote=False)
        return BucketRequest(self.session_id, info.version, self._requested).to_bytes()

    def _spread(self, labels: Sequence[bytes | None]) -> dict[int, bytes]:
        out: dict[int, bytes] = {}
        for x, label in zip(self._unique, labels, strict=False):
            if label is not None:
                for p in self._positions[x]:
                    out[p] = label
        return out

    def _finish_buckets(self, msg: BucketResponse) -> None:
        info = self._info
        assert info is not None
        if len(msg.blobs) != len(self._requested):
            self._remote(f"{len(msg.blobs)} buckets returned, {len(self._requested)} asked")
        buckets: dict[int, Bucket] = {}
        try:
            for want, blob in zip(self._requested, msg.blobs, strict=True):
                b = Bucket.from_bytes(blob, max_entries=self._max_entries)
                if (b.table_id, b.version, b.bucket_count, b.bucket_id, b.label_size) != (
                    info.table_id, info.version, info.bucket_count, want, info.label_size,
                ):
                    self._remote(f"bucket {want} does not belong to the announced table version")
                if len(b.rows) < min(info.min_bucket_size, info.entry_count):
                    self._remote(f"bucket {want} is smaller than the announced minimum")
                buckets[want] = b
            labels: list[bytes | None] = []
            for tag, key in self._pairs[: self._real]:
                labels.extend(buckets[bucket_of(tag, info.bucket_count)].open([(tag, key)]))
        except RemoteProtocolError as exc:
            self.fail(exc)
        self._result = QueryResult(
            Mode.REALTIME, self._spread(labels), info, info.version, len(self._unique),
            self._requested, tuple(len(buckets[b].rows) for b in self._requested))

    def _finish_download(self, blob: bytes) -> None:
        try:
            if blob[4:6] == bytes([1, 2]):  # format version 1, kind DELTA
                if self._table is None:
                    self._remote("a delta was sent but no table is held", 409)
                delta = Delta.from_bytes(blob, max_entries=self._max_entries)
                self._downloaded = self._table.apply(delta)
            else:
                self._downloaded = Table.from_bytes(blob, max_entries=self._max_entries)
        except RemoteProtocolError as exc:
            self.fail(exc)

    # -- results --

    @property
    def result(self) -> QueryResult:
        if self._result is None or not self.finished:
            raise LocalProtocolError("no result: the evaluation session is not finished")
        return self._result

    @property
    def table(self) -> Table:
        """The table after a download session (full table or local table plus delta)."""
        if self._downloaded is None or not self.finished:
            raise LocalProtocolError("no table: the download session is not finished")
        return self._downloaded
