"""Sans-I/O role objects of the bucketed ECDH PSI protocol: :class:`PsiRequester` and
:class:`PsiResponder`.

A role object turns received bytes into state changes and replies; the caller owns the
transport. It checks every message against the one transition table in
:mod:`protocols.psi.states` and its per-bucket bookkeeping: anything malformed, truncated,
replayed, from another session or from the wrong round moves it to ``ERROR`` and raises
:class:`~protocols.errors.RemoteProtocolError`; calling it wrongly raises
:class:`~protocols.errors.LocalProtocolError`.

Two ways to drive it:

- serial: ``start()``, then ``handle(message) -> reply | None`` for every message
  received, plus ``requests()`` on the requester once the handshake is done;
- parallel: every bucket step is split in three so the heavy crypto can run in a worker
  process: ``step = role.receive(message)`` (cheap checks, in the caller's process),
  ``output = step.job.run()`` (pure, picklable, in any process), then
  ``role.complete(step, output) -> reply | None``. The requester's outgoing bucket
  requests are steps too: ``role.prepare_request(bucket)``. If ``job.run()`` raises
  :class:`RemoteProtocolError`, pass it to ``role.fail(exc)``. The responder's own half
  of a bucket can run ahead of its REQUEST: ``job = role.own_job(bucket)``, then
  ``role.provide_own(bucket, job.run())``; the REQUEST's step then carries only the
  re-blinding of the requester's points (:class:`ReblindJob`). The responder's HELLO_ACK
  does not wait for its partition: :meth:`PsiResponder.prepare_buckets` runs it (lazily,
  or early from a driver that wants it to overlap with the requester's).

Steps for different buckets may complete in any order; a bucket is accepted once.
Role objects are not thread-safe: one thread drives one object. Items are the normalised
identifiers as bytes; they never appear in any message, only curve points do.
"""

from __future__ import annotations

import secrets
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import NoReturn

import numpy as np

from protocols.errors import LocalProtocolError, RemoteProtocolError
from protocols.psi import ecdh
from protocols.psi.messages import (
    MAX_BUCKETS,
    MAX_LABEL_BYTES,
    SESSION_ID_BYTES,
    Hello,
    HelloAck,
    Mode,
    Request,
    Response,
    Suite,
    decode,
)
from protocols.psi.states import Event, Role, State, next_state

# --- jobs: pure work a worker process can run ------------------------------------------


@dataclass(frozen=True)
class BlindJob:
    """Requester: blind the bucket's distinct items (round 3)."""

    bucket: int
    scalar: bytes = field(repr=False)
    dst: bytes
    items: tuple[bytes, ...] = field(repr=False)

    def run(self) -> bytes:
        return ecdh.requester_blind_job(self.scalar, self.dst, self.items)


@dataclass(frozen=True)
class AnswerJob:
    """Responder: re-blind the requester's points and blind its own bucket (round 4)."""

    bucket: int
    scalar: bytes = field(repr=False)
    dst: bytes
    own_items: tuple[bytes, ...] = field(repr=False)
    peer_points: bytes = field(repr=False)
    shuffle_peer: bool

    def run(self) -> tuple[bytes, bytes, list[int]]:
        return ecdh.responder_bucket_job(
            self.scalar, self.dst, self.own_items, self.peer_points, self.shuffle_peer
        )


@dataclass(frozen=True)
class OwnJob:
    """Responder: blind and shuffle its own bucket (round 4, own half). Needs nothing from
    the requester, so a driver may run it before the bucket's REQUEST arrives."""

    bucket: int
    scalar: bytes = field(repr=False)
    dst: bytes
    own_items: tuple[bytes, ...] = field(repr=False)

    def run(self) -> tuple[bytes, list[int]]:
        return ecdh.responder_own_job(self.scalar, self.dst, self.own_items)


@dataclass(frozen=True)
class ReblindJob:
    """Responder: re-blind the requester's points (round 4, peer half) when the own half
    was already provided with :meth:`PsiResponder.provide_own`."""

    bucket: int
    scalar: bytes = field(repr=False)
    peer_points: bytes = field(repr=False)
    shuffle_peer: bool

    def run(self) -> bytes:
        return ecdh.responder_reblind_job(self.scalar, self.peer_points, self.shuffle_peer)


@dataclass(frozen=True)
class FinishJob:
    """Requester: re-blind the responder's points and find equal pairs (after round 4).

    Output: ``(own_position, responder_position)`` for every match.
    """

    bucket: int
    scalar: bytes = field(repr=False)
    double_own: bytes = field(repr=False)
    responder_points: bytes = field(repr=False)

    def run(self) -> list[tuple[int, int]]:
        theirs = ecdh.requester_finish_job(self.scalar, self.responder_points)
        where = {theirs[i : i + 32]: i // 32 for i in range(0, len(theirs), 32)}
        own = self.double_own
        get = where.get
        pairs: list[tuple[int, int]] = []
        for i in range(0, len(own), 32):
            j = get(own[i : i + 32])
            if j is not None:
                pairs.append((i // 32, j))
        return pairs


@dataclass(frozen=True)
class Step:
    """One accepted unit of work; ``job`` is ``None`` for handshake steps."""

    event: Event
    bucket: int
    job: BlindJob | AnswerJob | ReblindJob | FinishJob | None
    reply: bytes | None = None
    labels: bytes = b""


# --- results ---------------------------------------------------------------------------


@dataclass(frozen=True)
class RequesterResult:
    """What the requester learned.

    ``cardinality`` counts distinct matched identifiers. In intersection mode
    ``matched_indices`` are the positions (in the requester's own input) of every item
    whose identifier the responder also holds, and ``labels`` maps such a position to the
    responder's label for it when labels were negotiated. In cardinality mode both are
    ``None``. The sizes are the responder's distinct-item counts, which the protocol
    reveals.
    """

    mode: Mode
    cardinality: int
    matched_indices: tuple[int, ...] | None
    labels: dict[int, bytes] | None
    responder_size: int
    responder_bucket_sizes: tuple[int, ...]


@dataclass(frozen=True)
class ResponderResult:
    """What the responder learned: the requester's distinct-item count, per bucket."""

    mode: Mode
    requester_size: int
    requester_bucket_sizes: tuple[int, ...]


# --- shared machinery ------------------------------------------------------------------


class _Role(ABC):
    role: Role

    def __init__(self) -> None:
        self._state = State.IDLE
        self.session_id = b""

    @property
    def state(self) -> State:
        return self._state

    @property
    def finished(self) -> bool:
        return self._state is State.DONE

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

    def _decode(self, data: bytes) -> Hello | HelloAck | Request | Response:
        if self._state is State.ERROR:
            raise LocalProtocolError(f"{self.role.value} is in ERROR; start a new session")
        try:
            msg = decode(data)
        except RemoteProtocolError as exc:
            self.fail(exc)
        if self.session_id and msg.session_id != self.session_id:
            self._remote("message belongs to another session", 409)
        return msg

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

    @abstractmethod
    def receive(self, data: bytes) -> Step:
        """Check one incoming message and return the work it needs."""

    @abstractmethod
    def complete(self, step: Step, output: object) -> bytes | None:
        """Apply the output of a step's job; return the reply, if any."""


def _check_items(items: Sequence[bytes]) -> list[bytes]:
    """``items`` as a list of bytes (the caller's list itself, not a copy: it is only read)."""
    out = items if isinstance(items, list) else list(items)
    if set(map(type, out)) <= {bytes}:  # the usual case, checked without a Python loop
        return out
    for i, item in enumerate(out):
        if not isinstance(item, bytes):
            raise LocalProtocolError(f"item {i} is {type(item).__name__}, expected bytes")
    return out


# --- requester -------------------------------------------------------------------------


class PsiRequester(_Role):
    """The party that asks and receives the result (intersection or cardinality)."""

    role = Role.REQUESTER

    def __init__(
        self,
        items: Sequence[bytes],
        *,
        mode: Mode = Mode.INTERSECTION,
        bucket_count: int = 1,
        session_id: bytes | None = None,
        want_labels: bool = False,
    ) -> None:
        self._init(items, mode, bucket_count, session_id, want_labels, ecdh.new_scalar(),
                   ecdh.random_nonce())

    @classmethod
    def _with_randomness(
        cls,
        items: Sequence[bytes],
        *,
        scalar: bytes,
        nonce: bytes,
        mode: Mode = Mode.INTERSECTION,
        bucket_count: int = 1,
        session_id: bytes | None = None,
        want_labels: bool = False,
    ) -> PsiRequester:
        """TESTS ONLY: pin the secret scalar and nonce. Reusing a scalar links sessions."""
        obj = cls.__new__(cls)
        obj._init(items, mode, bucket_count, session_id, want_labels, scalar, nonce)
        return obj

    def _init(
        self,
        items: Sequence[bytes],
        mode: Mode,
        bucket_count: int,
        session_id: bytes | None,
        want_labels: bool,
        scalar: bytes,
        nonce: bytes,
    ) -> None:
        super().__init__()
        if not 1 <= bucket_count <= MAX_BUCKETS:
            raise LocalProtocolError(f"bucket_count must be 1..{MAX_BUCKETS}")
        if want_labels and mode is not Mode.INTERSECTION:
            raise LocalProtocolError("labels are only available in intersection mode")
        sid = session_id if session_id is not None else secrets.token_bytes(SESSION_ID_BYTES)
        if len(sid) != SESSION_ID_BYTES:
            raise LocalProtocolError(f"session_id must be {SESSION_ID_BYTES} bytes")
        self.session_id = sid
        self.mode = Mode(mode)
        self.bucket_count = bucket_count
        self.want_labels = want_labels
        self._scalar = scalar
        self._nonce = nonce
        self._dst = ecdh.h2c_dst(sid)
        checked = _check_items(items)
        # Distinct items in first-seen order. In intersection mode the result needs every
        # input position of a matched item: without repeats that is the item's index in
        # the distinct list, kept per bucket as an int64 array (8 bytes per item); with
        # repeats, a dict item -> positions.
        distinct = dict.fromkeys(checked)
        self._positions: dict[bytes, list[int]] | None = None
        if len(distinct) == len(checked):
            self._distinct = checked
        else:
            self._distinct = list(distinct)
            if self.mode is Mode.INTERSECTION:
                self._positions = {}
                for i, item in enumerate(checked):
                    self._positions.setdefault(item, []).append(i)
        del distinct
        self._bucket_pos: list[np.ndarray] = []
        self._buckets: list[list[bytes]] = []
        self._label_len = 0
        self._requested: set[int] = set()
        self._sent: set[int] = set()
        self._responded: set[int] = set()
        self._done: set[int] = set()
        self._matched: list[int] = []
        self._labels: dict[int, bytes] = {}
        self._cardinality = 0
        self._their_sizes = [0] * bucket_count

    def start(self) -> bytes:
        """Round 1: the HELLO that opens the session."""
        self._move(Event.SEND_HELLO, remote=False)
        return Hello(
            self.session_id, self.mode, Suite.X25519_ELL2_NU_SHA512, self.want_labels,
            self.bucket_count, self._nonce,
        ).to_bytes()

    def receive(self, data: bytes) -> Step:
        msg = self._decode(data)
        if isinstance(msg, HelloAck):
            self._move(Event.RECV_HELLO_ACK, remote=True)
            if (msg.mode, msg.suite, msg.bucket_count) != (
                self.mode, Suite.X25519_ELL2_NU_SHA512, self.bucket_count,
            ):
                self._remote("HELLO_ACK does not echo the proposed mode, suite and buckets")
            if msg.label_len and not self.want_labels:
                self._remote("HELLO_ACK offers labels that were not asked for")
            self._label_len = msg.label_len
            key = ecdh.derive_bucket_key(self.session_id, self._nonce, msg.nonce)
            groups = ecdh.partition_groups(self._distinct, key, self.bucket_count)
            self._buckets = ecdh.partition_items(self._distinct, key, self.bucket_count, groups)
            if self.mode is Mode.INTERSECTION and self._positions is None:
                self._bucket_pos = groups
            self._distinct = []  # the buckets hold the items now
            return Step(Event.RECV_HELLO_ACK, -1, None)
        if isinstance(msg, Response):
            self._move(Event.RECV_RESPONSE, remote=True)
            b = msg.bucket
            if b >= self.bucket_count:
                self._remote(f"RESPONSE for bucket {b}, session has {self.bucket_count}")
            if b not in self._sent:
                self._remote(f"RESPONSE for bucket {b} that was not requested", 409)
            if b in self._responded:
                self._remote(f"replayed RESPONSE for bucket {b}", 409)
            if msg.peer_count != len(self._buckets[b]):
                self._remote(f"RESPONSE for bucket {b} re-blinds {msg.peer_count} points, "
                             f"{len(self._buckets[b])} were sent")
            if msg.label_len != self._label_len:
                self._remote("RESPONSE label length differs from the negotiated one")
            try:
                ecdh.check_points(msg.own_points)
            except RemoteProtocolError as exc:
                self.fail(exc)
            self._responded.add(b)
            self._their_sizes[b] = msg.own_count
            job = FinishJob(b, self._scalar, msg.peer_points, msg.own_points)
            return Step(Event.RECV_RESPONSE, b, job, labels=msg.labels)
        self._remote(f"a requester does not accept {type(msg).__name__}", 409)

    def prepare_request(self, bucket: int) -> Step:
        """Round 3 for one bucket: returns the step whose job blinds the bucket's items."""
        if self._state is not State.EXCHANGING:
            raise LocalProtocolError(f"no requests in state {self._state.value}")
        if not 0 <= bucket < self.bucket_count:
            raise LocalProtocolError(f"bucket {bucket} outside 0..{self.bucket_count - 1}")
        if bucket in self._requested:
            raise LocalProtocolError(f"bucket {bucket} was already prepared")
        self._requested.add(bucket)
        job = BlindJob(bucket, self._scalar, self._dst, tuple(self._buckets[bucket]))
        return Step(Event.SEND_REQUEST, bucket, job)

    def pending_buckets(self) -> list[int]:
        return [b for b in range(self.bucket_count) if b not in self._requested]

    def requests(self) -> Iterator[bytes]:
        """Serial driver: the REQUEST of every bucket not yet prepared."""
        for b in self.pending_buckets():
            step = self.prepare_request(b)
            assert step.job is not None
            reply = self.complete(step, step.job.run())
            assert reply is not None
            yield reply

    def complete(self, step: Step, output: object) -> bytes | None:
        if self._state is not State.EXCHANGING:
            raise LocalProtocolError(f"cannot complete a step in state {self._state.value}")
        b = step.bucket
        if step.event is Event.SEND_REQUEST:
            if not isinstance(output, bytes) or len(output) != 32 * len(self._buckets[b]):
                raise LocalProtocolError("blind job output does not match the bucket")
            self._move(Event.SEND_REQUEST, remote=False)
            self._sent.add(b)
            return Request(self.session_id, b, output).to_bytes()
        if step.event is not Event.RECV_RESPONSE or b in self._done:
            raise LocalProtocolError("step is not a pending response")
        if not isinstance(output, list):
            raise LocalProtocolError("finish job output must be a list of pairs")
        self._done.add(b)
        self._cardinality += len(output)
        if self.mode is Mode.INTERSECTION:
            items = self._buckets[b]
            ll = self._label_len
            where = self._positions
            pos = self._bucket_pos[b] if where is None else np.empty(0, dtype=np.int64)
            for own_pos, their_pos in output:
                positions = where[items[own_pos]] if where is not None else [int(pos[own_pos])]
                self._matched.extend(positions)
                if ll:
                    label = step.labels[their_pos * ll : (their_pos + 1) * ll]
                    for p in positions:
                        self._labels[p] = label
        self._buckets[b] = []  # bounded memory: the bucket is finished
        if self._bucket_pos:
            self._bucket_pos[b] = self._bucket_pos[b][:0]
        if len(self._done) == self.bucket_count:
            self._move(Event.LAST_BUCKET, remote=False)
        return None

    @property
    def result(self) -> RequesterResult:
        if not self.finished:
            raise LocalProtocolError("the result exists only once every bucket is finished")
        intersection = self.mode is Mode.INTERSECTION
        return RequesterResult(
            mode=self.mode,
            cardinality=self._cardinality,
            matched_indices=tuple(sorted(self._matched)) if intersection else None,
            labels=dict(self._labels) if intersection and self._label_len else None,
            responder_size=sum(self._their_sizes),
            responder_bucket_sizes=tuple(self._their_sizes),
        )


# --- responder -------------------------------------------------------------------------


class PsiResponder(_Role):
    """The party that answers; learns only the requester's set size per bucket.

    ``allowed_modes`` is the node's policy for this partner; ``labels`` (one per item, all
    the same length) are returned to the requester for matched items when it asks for
    them in intersection mode (multi-key matching uses them as record pseudonyms).
    """

    role = Role.RESPONDER

    def __init__(
        self,
        items: Sequence[bytes],
        *,
        labels: Sequence[bytes] | None = None,
        allowed_modes: frozenset[Mode] = frozenset({Mode.INTERSECTION, Mode.CARDINALITY}),
        expected_session_id: bytes | None = None,
        max_bucket_count: int = MAX_BUCKETS,
    ) -> None:
        self._init(items, labels, allowed_modes, expected_session_id, max_bucket_count,
                   ecdh.new_scalar(), ecdh.random_nonce())

    @classmethod
    def _with_randomness(
        cls,
        items: Sequence[bytes],
        *,
        scalar: bytes,
        nonce: bytes,
        labels: Sequence[bytes] | None = None,
        allowed_modes: frozenset[Mode] = frozenset({Mode.INTERSECTION, Mode.CARDINALITY}),
        expected_session_id: bytes | None = None,
        max_bucket_count: int = MAX_BUCKETS,
    ) -> PsiResponder:
        """TESTS ONLY: pin the secret scalar and nonce. Reusing a scalar links sessions."""
        obj = cls.__new__(cls)
        obj._init(items, labels, allowed_modes, expected_session_id, max_bucket_count,
                  scalar, nonce)
        return obj

    def _init(
        self,
        items: Sequence[bytes],
        labels: Sequence[bytes] | None,
        allowed_modes: frozenset[Mode],
        expected_session_id: bytes | None,
        max_bucket_count: int,
        scalar: bytes,
        nonce: bytes,
    ) -> None:
        super().__init__()
        checked = _check_items(items)
        self._label_len = 0
        self._first_label: dict[bytes, bytes] = {}
        if labels is not None:
            labels = list(labels)
            if len(labels) != len(checked):
                raise LocalProtocolError(f"{len(labels)} labels for {len(checked)} items")
            lengths = {len(x) for x in labels}
            if len(lengths) > 1 or (lengths and not 0 < min(lengths) <= MAX_LABEL_BYTES):
                raise LocalProtocolError(f"labels must all have one length in 1..{MAX_LABEL_BYTES}")
            self._label_len = lengths.pop() if lengths else 1
            for item, label in zip(checked, labels, strict=True):
                self._first_label.setdefault(item, label)
        self._unique = list(dict.fromkeys(checked))
        self._allowed = frozenset(allowed_modes)
        self._expected_sid = expected_session_id
        self._max_buckets = max_bucket_count
        self._scalar = scalar
        self._nonce = nonce
        self.mode = Mode.INTERSECTION
        self.bucket_count = 0
        self._send_labels = False
        self._dst = b""
        self._buckets: list[list[bytes]] = []
        self._accepted: set[int] = set()
        self._answered: set[int] = set()
        self._their_sizes: list[int] = []
        self._own_started: set[int] = set()
        self._own: dict[int, tuple[bytes, list[int]]] = {}
        self._bucket_key = b""

    def prepare_buckets(self) -> None:
        """Partition the own items into the session's buckets (once; needs the HELLO).

        Every method that needs the buckets calls it; a driver may call it right after
        sending the HELLO_ACK, so that the requester's partitioning and this one overlap.
        """
        if not self._bucket_key:
            raise LocalProtocolError("buckets exist only after the HELLO")
        if len(self._buckets) != self.bucket_count:
            self._buckets = ecdh.partition_items(self._unique, self._bucket_key,
                                                 self.bucket_count)

    def start(self) -> None:
        """The responder waits for HELLO; nothing to send."""
        if self._state is not State.IDLE:
            raise LocalProtocolError("start() is only valid before the handshake")

    def receive(self, data: bytes) -> Step:
        msg = self._decode(data)
        if isinstance(msg, Hello):
            self._move(Event.RECV_HELLO, remote=True)
            if self._expected_sid is not None and msg.session_id != self._expected_sid:
                self._remote("HELLO for a session that was not approved", 409)
            if msg.mode not in self._allowed:
                self._remote(f"mode {msg.mode.name.lower()} is not allowed by policy", 403)
            if msg.bucket_count > self._max_buckets:
                self._remote(f"bucket_count {msg.bucket_count} above the limit {self._max_buckets}")
            if msg.want_labels and msg.mode is not Mode.INTERSECTION:
                self._remote("labels asked for outside intersection mode")
            self.session_id = msg.session_id
            self.mode = msg.mode
            self.bucket_count = msg.bucket_count
            self._send_labels = msg.want_labels and self._label_len > 0
            self._dst = ecdh.h2c_dst(msg.session_id)
            self._their_sizes = [0] * msg.bucket_count
            self._bucket_key = ecdh.derive_bucket_key(msg.session_id, msg.nonce, self._nonce)
            self._buckets = []  # partitioned by prepare_buckets(), after the ACK is out
            ack = HelloAck(
                msg.session_id, msg.mode, msg.suite,
                self._label_len if self._send_labels else 0, msg.bucket_count, self._nonce,
            )
            return Step(Event.RECV_HELLO, -1, None, reply=ack.to_bytes())
        if isinstance(msg, Request):
            self._move(Event.RECV_REQUEST, remote=True)
            b = msg.bucket
            if b >= self.bucket_count:
                self._remote(f"REQUEST for bucket {b}, session has {self.bucket_count}")
            if b in self._accepted:
                self._remote(f"replayed REQUEST for bucket {b}", 409)
            try:
                ecdh.check_points(msg.points)
            except RemoteProtocolError as exc:
                self.fail(exc)
            self._accepted.add(b)
            self._their_sizes[b] = msg.count
            shuffle = self.mode is Mode.CARDINALITY
            self.prepare_buckets()
            job: AnswerJob | ReblindJob
            if b in self._own:
                job = ReblindJob(b, self._scalar, msg.points, shuffle_peer=shuffle)
            else:
                job = AnswerJob(b, self._scalar, self._dst, tuple(self._buckets[b]), msg.points,
                                shuffle_peer=shuffle)
            return Step(Event.RECV_REQUEST, b, job)
        self._remote(f"a responder does not accept {type(msg).__name__}", 409)

    def complete(self, step: Step, output: object) -> bytes | None:
        if self._state is not State.EXCHANGING or step.event is not Event.RECV_REQUEST:
            raise LocalProtocolError("step is not a pending request")
        b = step.bucket
        if b in self._answered or b not in self._accepted:
            raise LocalProtocolError(f"bucket {b} is not awaiting an answer")
        if isinstance(step.job, ReblindJob):
            if not isinstance(output, bytes) or b not in self._own:
                raise LocalProtocolError("re-blind job output must be bytes, own half provided")
            double = output
            own, perm = self._own.pop(b)
        elif isinstance(output, tuple) and len(output) == 3:
            double, own, perm = output
            self._own.pop(b, None)
        else:
            raise LocalProtocolError("answer job output must be (peer, own, permutation)")
        labels = b""
        ll = 0
        if self._send_labels:
            ll = self._label_len
            items = self._buckets[b]
            labels = b"".join([self._first_label[items[j]] for j in perm])
        self._answered.add(b)
        self._buckets[b] = []
        reply = Response(self.session_id, b, double, own, ll, labels).to_bytes()
        if len(self._answered) == self.bucket_count:
            self._move(Event.LAST_BUCKET, remote=False)
        return reply

    def awaits_own(self, bucket: int) -> bool:
        """Whether :meth:`own_job` may still be called for ``bucket``."""
        return (self._state is State.EXCHANGING and 0 <= bucket < self.bucket_count
                and bucket not in self._own_started and bucket not in self._accepted)

    def own_job(self, bucket: int) -> OwnJob:
        """The own half of ``bucket``'s answer, to run before its REQUEST arrives."""
        if self._state is not State.EXCHANGING:
            raise LocalProtocolError(f"no own jobs in state {self._state.value}")
        if not 0 <= bucket < self.bucket_count:
            raise LocalProtocolError(f"bucket {bucket} outside 0..{self.bucket_count - 1}")
        if bucket in self._own_started or bucket in self._accepted:
            raise LocalProtocolError(f"bucket {bucket} already has its own half")
        self.prepare_buckets()
        self._own_started.add(bucket)
        return OwnJob(bucket, self._scalar, self._dst, tuple(self._buckets[bucket]))

    def provide_own(self, bucket: int, output: object) -> None:
        """Store the output of :meth:`own_job` until the bucket's REQUEST is answered."""
        if bucket not in self._own_started or bucket in self._own or bucket in self._accepted:
            raise LocalProtocolError(f"bucket {bucket} is not awaiting its own half")
        n = len(self._buckets[bucket])
        if not (isinstance(output, tuple) and len(output) == 2 and isinstance(output[0], bytes)
                and len(output[0]) == 32 * n and len(output[1]) == n):
            raise LocalProtocolError("own job output must be (points, permutation) of the bucket")
        self._own[bucket] = (output[0], list(output[1]))

    @property
    def result(self) -> ResponderResult:
        if not self.finished:
            raise LocalProtocolError("the result exists only once every bucket is answered")
        return ResponderResult(self.mode, sum(self._their_sizes), tuple(self._their_sizes))
