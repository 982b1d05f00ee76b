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
identifiers as bytes (a list, or :class:`~protocols.psi.items.PackedItems`: one buffer, no
Python object per item); they never appear in any message, only curve points do.

Memory: a role keeps the caller's items as they are (a list is packed once) and, after the
handshake, one int32 index per item (the partition). A bucket's items become ``bytes``
only while its job is built, and repeats are removed per bucket then (equal items always
share a bucket), so no set or dict of all items ever exists.
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
from protocols.psi.items import PackedItems, as_packed
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


def _check_items(items: Sequence[bytes] | PackedItems) -> PackedItems:
    """``items`` packed (a :class:`PackedItems` is taken as it is, a list packed once)."""
    if isinstance(items, PackedItems):
        return items
    out = items if isinstance(items, list) else list(items)
    if not set(map(type, out)) <= {bytes}:  # the usual case, checked without a Python loop
        for i, item in enumerate(out):
            if not isinstance(item, bytes):
                raise LocalProtocolError(f"item {i} is {type(item).__name__}, expected bytes")
    return as_packed(out)


def _distinct(items: list[bytes]) -> tuple[list[bytes], np.ndarray | None]:
    """A bucket's items without repeats (first-seen order) and, if there were repeats, the
    distinct index of every input item (``None`` when all are distinct)."""
    first = dict.fromkeys(items)
    if len(first) == len(items):
        return items, None
    index: dict[bytes, int] = {}
    inverse = np.fromiter((index.setdefault(x, len(index)) for x in items), dtype=np.int64,
                          count=len(items))
    return list(index), inverse


# --- requester -------------------------------------------------------------------------


class PsiRequester(_Role):
    """The party that asks and receives the result (intersection or cardinality)."""

    role = Role.REQUESTER

    def __init__(
        self,
        items: Sequence[bytes] | PackedItems,
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
        items: Sequence[bytes] | PackedItems,
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
        items: Sequence[bytes] | PackedItems,
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
        # The items as given; after the handshake, the input positions of each bucket's
        # items (int32 per item). A bucket's distinct items exist as bytes only from its
        # prepare_request() to the end of its job; in intersection mode the bucket keeps
        # its positions (and, with repeats, each item's distinct index) until finished.
        self._items: PackedItems | None = _check_items(items)
        self._groups: list[np.ndarray] = []
        self._sizes = [0] * bucket_count
        self._inverse: dict[int, np.ndarray] = {}
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
            assert self._items is not None
            self._groups = ecdh.partition_groups(self._items, key, self.bucket_count)
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
            if msg.peer_count != self._sizes[b]:
                self._remote(f"RESPONSE for bucket {b} re-blinds {msg.peer_count} points, "
                             f"{self._sizes[b]} were sent")
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
        assert self._items is not None
        items, inverse = _distinct(self._items.take(self._groups[bucket]))
        self._sizes[bucket] = len(items)
        if inverse is not None:
            self._inverse[bucket] = inverse
        if self.mode is not Mode.INTERSECTION:
            self._groups[bucket] = self._groups[bucket][:0]  # positions are not needed
        if len(self._requested) == self.bucket_count:
            self._items = None  # every bucket has its items: drop the input
        job = BlindJob(bucket, self._scalar, self._dst, tuple(items))
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
            if not isinstance(output, bytes) or len(output) != 32 * self._sizes[b]:
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
        if self.mode is Mode.INTERSECTION and output:
            group = self._groups[b]
            inverse = self._inverse.pop(b, None)
            ll = self._label_len
            own = np.fromiter((o for o, _ in output), dtype=np.int64, count=len(output))
            if inverse is None:  # no repeats: distinct index = place in the group
                positions = group[own].tolist()
                self._matched.extend(positions)
                if ll:
                    for p, (_, their_pos) in zip(positions, output, strict=True):
                        self._labels[p] = step.labels[their_pos * ll : (their_pos + 1) * ll]
            else:  # every input position whose item is a matched distinct item
                their = dict(output)
                hit = np.flatnonzero(np.isin(inverse, own))
                for p, d in zip(group[hit].tolist(), inverse[hit].tolist(), strict=True):
                    self._matched.append(p)
                    if ll:
                        t = their[d]
                        self._labels[p] = step.labels[t * ll : (t + 1) * ll]
        self._inverse.pop(b, None)
        self._groups[b] = self._groups[b][:0]  # bounded memory: the bucket is finished
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
        items: Sequence[bytes] | PackedItems,
        *,
        labels: Sequence[bytes] | bytes | None = None,
        allowed_modes: frozenset[Mode] = frozenset({Mode.INTERSECTION, Mode.CARDINALITY}),
        expected_session_id: bytes | None = None,
        max_bucket_count: int = MAX_BUCKETS,
    ) -> None:
        self._init(items, labels, allowed_modes, expected_session_id, max_bucket_count,
                   ecdh.new_scalar(), ecdh.random_nonce())

    @classmethod
    def _with_randomness(
        cls,
        items: Sequence[bytes] | PackedItems,
        *,
        scalar: bytes,
        nonce: bytes,
        labels: Sequence[bytes] | bytes | None = None,
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
        items: Sequence[bytes] | PackedItems,
        labels: Sequence[bytes] | bytes | None,
        allowed_modes: frozenset[Mode],
        expected_session_id: bytes | None,
        max_bucket_count: int,
        scalar: bytes,
        nonce: bytes,
    ) -> None:
        super().__init__()
        checked = _check_items(items)
        self._label_len = 0
        # labels packed: item i's label is _labels[i * label_len : (i + 1) * label_len]; a
        # repeated item sends the label of its first occurrence
        self._labels = np.empty(0, dtype=np.uint8)
        if labels is not None:
            self._label_len, self._labels = _pack_labels(labels, len(checked))
        self._items: PackedItems | None = checked
        self._groups: list[np.ndarray] = []
        self._sizes: dict[int, int] = {}
        self._label_rows: dict[int, np.ndarray] = {}
        self._allowed = frozenset(allowed_modes)
        self._expected_sid = expected_session_id
        self._max_buckets = max_bucket_count
        self._scalar = scalar
        self._nonce = nonce
        self.mode = Mode.INTERSECTION
        self.bucket_count = 0
        self._send_labels = False
        self._dst = b""
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
        if len(self._groups) != self.bucket_count:
            assert self._items is not None
            self._groups = ecdh.partition_groups(self._items, self._bucket_key,
                                                 self.bucket_count)

    def _bucket_items(self, bucket: int) -> list[bytes]:
        """The bucket's distinct items as bytes (first-seen order); keeps the input row of
        each one's first occurrence until the bucket is answered (for its labels)."""
        self.prepare_buckets()
        assert self._items is not None
        group = self._groups[bucket]
        items, inverse = _distinct(self._items.take(group))
        self._sizes[bucket] = len(items)
        if self._send_labels:
            if inverse is None:
                self._label_rows[bucket] = group
            else:  # first occurrence of each distinct index
                _, first = np.unique(inverse, return_index=True)
                self._label_rows[bucket] = group[first]
        return items

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
            self._groups = []  # partitioned by prepare_buckets(), after the ACK is out
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
            job: AnswerJob | ReblindJob
            if b in self._own:
                job = ReblindJob(b, self._scalar, msg.points, shuffle_peer=shuffle)
            else:
                job = AnswerJob(b, self._scalar, self._dst, tuple(self._bucket_items(b)),
                                msg.points, shuffle_peer=shuffle)
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
        rows = self._label_rows.pop(b, None)
        if self._send_labels:
            ll = self._label_len
            assert rows is not None
            order = rows[np.asarray(perm, dtype=np.int64)].astype(np.int64)
            labels = self._labels.reshape(-1, ll)[order].tobytes()
        self._answered.add(b)
        self._sizes.pop(b, None)
        self._groups[b] = self._groups[b][:0]  # bounded memory: the bucket is finished
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
        self._own_started.add(bucket)
        return OwnJob(bucket, self._scalar, self._dst, tuple(self._bucket_items(bucket)))

    def provide_own(self, bucket: int, output: object) -> None:
        """Store the output of :meth:`own_job` until the bucket's REQUEST is answered."""
        if bucket not in self._own_started or bucket in self._own or bucket in self._accepted:
            raise LocalProtocolError(f"bucket {bucket} is not awaiting its own half")
        n = self._sizes.get(bucket, -1)
        if not (isinstance(output, tuple) and len(output) == 2 and isinstance(output[0], bytes)
                and len(output[0]) == 32 * n and len(output[1]) == n):
            raise LocalProtocolError("own job output must be (points, permutation) of the bucket")
        self._own[bucket] = (output[0], list(output[1]))

    @property
    def result(self) -> ResponderResult:
        if not self.finished:
            raise LocalProtocolError("the result exists only once every bucket is answered")
        return ResponderResult(self.mode, sum(self._their_sizes), tuple(self._their_sizes))


def _pack_labels(labels: Sequence[bytes] | bytes, n: int) -> tuple[int, np.ndarray]:
    """``(label_len, labels as one uint8 array)``: a list of ``n`` equal-length labels, or
    ``n`` labels already concatenated into one ``bytes``."""
    if isinstance(labels, bytes | bytearray | memoryview):
        size = len(labels)
        if n == 0:
            if size:
                raise LocalProtocolError("labels given for no items")
            return 1, np.empty(0, dtype=np.uint8)
        if size % n or not 0 < size // n <= MAX_LABEL_BYTES:
            raise LocalProtocolError(f"labels must all have one length in 1..{MAX_LABEL_BYTES}")
        return size // n, np.frombuffer(labels, dtype=np.uint8)
    labels = labels if isinstance(labels, list) else list(labels)
    if len(labels) != n:
        raise LocalProtocolError(f"{len(labels)} labels for {n} items")
    lengths = set(map(len, labels))
    if len(lengths) > 1 or (lengths and not 0 < min(lengths) <= MAX_LABEL_BYTES):
        raise LocalProtocolError(f"labels must all have one length in 1..{MAX_LABEL_BYTES}")
    if not set(map(type, labels)) <= {bytes}:
        raise LocalProtocolError("labels must be bytes")
    return (lengths.pop() if lengths else 1), np.frombuffer(b"".join(labels), dtype=np.uint8)
