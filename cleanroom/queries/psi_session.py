"""Driving bucketed ECDH PSI sessions (:mod:`protocols.psi`) through a query's session channel.

Shared by every query type that matches identities (``match``, ``segment_stats``):

- :func:`run_requester` drives a :class:`~protocols.psi.PsiRequester` over a
  :class:`~cleanroom.queries.runners.SessionChannel`: the HELLO alone, then the buckets
  *streamed* in batches (several REQUEST messages framed in one session message, never
  the whole set in one message), with the per-bucket crypto (blind, finish) running in
  this node's process pool while the previous batch is on the wire;
- :class:`PsiSessionResponder` is the counterparty's
  :class:`~cleanroom.queries.runners.SessionResponder`: it checks each framed REQUEST with
  the role object (replays, wrong rounds, foreign sessions and malformed bytes raise
  :class:`~protocols.errors.RemoteProtocolError`, which the API turns into a 4xx) and runs
  the answer jobs of one batch in parallel in the pool;
- :func:`worker_pool` is the node's process pool (``CLEANROOM_PSI_WORKERS``, default 2;
  spawned workers, because a node process has threads). Jobs are the picklable per-bucket
  jobs of :mod:`protocols.psi.roles`; the pool only ever sees curve points, scalars and
  the node's own items, never a peer's identifiers (it never has any).

Batch framing (``CRPB``): ``magic(4) version(1) reserved(3)=0 count(4)`` then ``count``
times ``length(4) message``; big-endian, strict (trailing bytes, zero or too many
messages, lengths past the end: 400). Only protocol messages are framed; nothing here
reads, logs or sends identifiers. This module must not open sockets or touch ledgers or
query states (the channel does that).
"""

from __future__ import annotations

import functools
import math
import multiprocessing
import os
import struct
import threading
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, Future, InvalidStateError, ProcessPoolExecutor
from dataclasses import dataclass
from typing import Any

from protocols.errors import RemoteProtocolError
from protocols.psi import Mode, PsiRequester, PsiResponder, RequesterResult, Step
from protocols.psi.items import PackedItems, count_distinct
from protocols.psi.messages import HEADER
from protocols.psi.states import State

BATCH_MAGIC = b"CRPB"
BATCH_VERSION = 1
_BATCH_HEAD = struct.Struct(">4sB3sI")
_LEN = struct.Struct(">I")
MAX_BATCH_MESSAGES = 256

#: most distinct items per bucket (one pool job); 8192 points = 256 KiB per direction
ITEMS_PER_BUCKET = 8192
#: fewest items per bucket: below that, per-job and per-message costs show
MIN_ITEMS_PER_BUCKET = 1024
#: buckets per session message: keeps a message a few MiB at most
BUCKETS_PER_MESSAGE = 8
#: the responder blinds its own half of at most this many buckets ahead of the requests
OWN_LOOKAHEAD = 2 * BUCKETS_PER_MESSAGE

# --- the node's process pool ---------------------------------------------------------------------

_pool: ProcessPoolExecutor | None = None
_pool_pid = 0
_pool_lock = threading.Lock()


def pool_size() -> int:
    raw = os.environ.get("CLEANROOM_PSI_WORKERS", "2")
    try:
        n = int(raw)
    except ValueError:
        n = 2
    return max(0, min(n, 64))


def worker_pool() -> ProcessPoolExecutor | None:
    """This process's PSI worker pool (``None`` when ``CLEANROOM_PSI_WORKERS=0``: inline)."""
    global _pool, _pool_pid
    size = pool_size()
    if size == 0:
        return None
    with _pool_lock:
        if _pool is None or _pool_pid != os.getpid():
            _pool = ProcessPoolExecutor(size, mp_context=multiprocessing.get_context("spawn"))
            _pool_pid = os.getpid()
        return _pool


def shutdown_pool() -> None:
    global _pool
    with _pool_lock:
        if _pool is not None and _pool_pid == os.getpid():
            _pool.shutdown(wait=False, cancel_futures=True)
        _pool = None


def _submit(pool: Executor | None, step: Step) -> Future[Any]:
    job = step.job
    assert job is not None
    if pool is None:
        fut: Future[Any] = Future()
        try:
            fut.set_result(job.run())
        except BaseException as exc:
            fut.set_exception(exc)
        return fut
    return pool.submit(job.run)


# --- batch framing -------------------------------------------------------------------------------


def encode_batch(messages: Sequence[bytes]) -> bytes:
    if not 1 <= len(messages) <= MAX_BATCH_MESSAGES:
        raise ValueError(f"a batch holds 1..{MAX_BATCH_MESSAGES} messages")
    parts = [_BATCH_HEAD.pack(BATCH_MAGIC, BATCH_VERSION, b"\0\0\0", len(messages))]
    for m in messages:
        parts.append(_LEN.pack(len(m)))
        parts.append(m)
    return b"".join(parts)


def decode_batch(data: bytes) -> list[bytes]:
    """Strict inverse of :func:`encode_batch`; anything else is the peer's error (400)."""
    if len(data) < _BATCH_HEAD.size:
        raise RemoteProtocolError("batch: truncated header")
    magic, version, reserved, count = _BATCH_HEAD.unpack_from(data, 0)
    if magic != BATCH_MAGIC:
        raise RemoteProtocolError("batch: bad magic (expected a batch of PSI messages)")
    if version != BATCH_VERSION or reserved != b"\0\0\0":
        raise RemoteProtocolError(f"batch: unsupported version {version}")
    if not 1 <= count <= MAX_BATCH_MESSAGES:
        raise RemoteProtocolError(f"batch: {count} messages, allowed 1..{MAX_BATCH_MESSAGES}")
    out: list[bytes] = []
    pos = _BATCH_HEAD.size
    mv = memoryview(data)
    for _ in range(count):
        if pos + _LEN.size > len(data):
            raise RemoteProtocolError("batch: truncated message length")
        (n,) = _LEN.unpack_from(data, pos)
        pos += _LEN.size
        if pos + n > len(data):
            raise RemoteProtocolError("batch: truncated message")
        out.append(bytes(mv[pos : pos + n]))
        pos += n
    if pos != len(data):
        raise RemoteProtocolError("batch: trailing bytes")
    return out


# --- requester -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Streaming:
    """How a session is cut.

    Buckets hold ``items_per_bucket`` distinct items at most, and fewer (down to
    ``min_items_per_bucket``) for small sets so that there are at least ``min_buckets``;
    the count is even, so two workers get equal shares. Messages carry an even number of
    buckets, up to ``buckets_per_message``, and a session has at least ``min_messages``
    of them when the bucket count allows, so both parties' pools overlap (the first and
    the last message cannot).
    """

    items_per_bucket: int = ITEMS_PER_BUCKET
    buckets_per_message: int = BUCKETS_PER_MESSAGE
    min_messages: int = 4
    min_items_per_bucket: int = MIN_ITEMS_PER_BUCKET
    min_buckets: int = 16

    def bucket_count(self, distinct_items: int) -> int:
        n = max(1, distinct_items)
        size = max(min(self.items_per_bucket, self.min_items_per_bucket),
                   min(self.items_per_bucket, math.ceil(n / self.min_buckets)))
        count = math.ceil(n / size)
        count += count % 2
        return max(2, min(65536, count))

    def per_message(self, bucket_count: int) -> int:
        per = min(self.buckets_per_message, bucket_count // max(1, self.min_messages))
        per -= per % 2
        return max(1, per)

    def batches(self, buckets: Sequence[int]) -> list[list[int]]:
        """``buckets`` cut into messages of :meth:`per_message` buckets each (last: rest)."""
        per = self.per_message(len(buckets))
        return [list(buckets[i : i + per]) for i in range(0, len(buckets), per)]


def new_requester(
    items: Sequence[bytes] | PackedItems,
    *,
    mode: Mode,
    session_id: bytes,
    want_labels: bool = False,
    streaming: Streaming = Streaming(),
) -> PsiRequester:
    """A requester over ``items`` with buckets sized by its distinct-item count
    (:func:`~protocols.psi.items.count_distinct`: 8 bytes per item, no set of items)."""
    return PsiRequester(items, mode=mode,
                        bucket_count=streaming.bucket_count(count_distinct(items)),
                        session_id=session_id, want_labels=want_labels)


def run_requester(
    channel: Any,
    role: PsiRequester,
    *,
    check_alive: Callable[[], None] = lambda: None,
    streaming: Streaming = Streaming(),
    pool: Executor | bool | None = True,
) -> RequesterResult:
    """Run ``role`` to completion over ``channel``; return its result.

    ``pool=True`` uses :func:`worker_pool`; ``None``/``False`` runs the jobs inline; any
    other :class:`~concurrent.futures.Executor` runs them there (the jobs are pure, so a
    thread pool gives the same results, which tests use).
    """
    workers = worker_pool() if pool is True else (pool or None)
    reply = channel.exchange(role.start(), round="hello")
    role.handle(reply)
    batches = streaming.batches(role.pending_buckets())
    blinding: deque[list[tuple[Step, Future[Any]]]] = deque()
    finishing: deque[tuple[Step, Future[Any]]] = deque()

    def submit_blind(batch: list[int]) -> None:
        steps = [role.prepare_request(b) for b in batch]
        blinding.append([(s, _submit(workers, s)) for s in steps])

    def complete_finished(block: bool) -> None:
        while finishing and (block or finishing[0][1].done()):
            step, fut = finishing.popleft()
            try:
                output = fut.result()
            except RemoteProtocolError as exc:
                role.fail(exc)
            role.complete(step, output)

    upcoming = deque(batches)
    for _ in range(min(2, len(upcoming))):  # one batch on the wire, the next one blinding
        submit_blind(upcoming.popleft())
    try:
        while blinding:
            check_alive()
            requests = [role.complete(s, f.result()) for s, f in blinding.popleft()]
            if upcoming:
                submit_blind(upcoming.popleft())
            reply = channel.exchange(encode_batch([r for r in requests if r is not None]),
                                     round="buckets")
            for message in decode_batch(reply):
                step = role.receive(message)
                finishing.append((step, _submit(workers, step)))
            complete_finished(block=False)
        complete_finished(block=True)
    finally:
        for group in blinding:
            for _, f in group:
                f.cancel()
        for _, f in finishing:
            f.cancel()
    return role.result


# --- responder -----------------------------------------------------------------------------------


class PsiSessionResponder:
    """A :class:`~cleanroom.queries.runners.SessionResponder` over a :class:`PsiResponder`:
    the first message is the plain HELLO, every later one a batch of REQUESTs.

    Right after the HELLO it returns the ACK and, in a background thread, partitions its
    own items (while the requester partitions its own) and starts blinding its own buckets
    in the pool (the own half of each answer needs nothing from the requester); the next
    message waits for that thread. Own buckets go in bucket order, at most
    ``lookahead`` buckets ahead of the requests received and at most one job per worker
    at a time (so a batch's re-blinding jobs never queue behind many own jobs). A
    REQUEST whose own half is ready costs one re-blinding job.
    """

    def __init__(self, role: PsiResponder, *, pool: Executor | bool | None = True,
                 lookahead: int = OWN_LOOKAHEAD) -> None:
        self.role = role
        self.role.start()
        self._pool = worker_pool() if pool is True else (pool or None)
        self._lookahead = max(0, lookahead) if self._pool is not None else 0
        self._slots = max(1, getattr(self._pool, "_max_workers", 1))
        self._lock = threading.Lock()
        self._own: dict[int, Future[Any]] = {}
        self._queued: deque[tuple[int, Any]] = deque()
        self._in_flight = 0
        self._next_own = 0
        self._seen = 0
        self._prep: threading.Thread | None = None
        self._prep_error: BaseException | None = None

    # own halves ahead of the requests

    def _top_up(self) -> None:
        role = self.role
        limit = min(role.bucket_count, self._seen + self._lookahead)
        while self._next_own < limit:
            b = self._next_own
            self._next_own += 1
            if b in self._own or not role.awaits_own(b):
                continue
            fut: Future[Any] = Future()
            self._own[b] = fut
            with self._lock:
                self._queued.append((b, role.own_job(b)))
        self._launch()

    def _launch(self) -> None:
        assert self._pool is not None or not self._queued
        while True:
            with self._lock:
                if not self._queued or self._in_flight >= self._slots:
                    return
                b, job = self._queued.popleft()
                self._in_flight += 1
                target = self._own[b]
            assert self._pool is not None
            inner = self._pool.submit(job.run)
            inner.add_done_callback(functools.partial(self._landed, target=target))

    def _landed(self, inner: Future[Any], *, target: Future[Any]) -> None:
        with self._lock:
            self._in_flight -= 1
        try:
            if inner.cancelled():
                target.cancel()
            elif (exc := inner.exception()) is not None:
                target.set_exception(exc)
            else:
                target.set_result(inner.result())
        except InvalidStateError:  # cancelled meanwhile: the session failed or ended
            pass
        self._launch()

    def _cancel_own(self) -> None:
        with self._lock:
            self._queued.clear()
        for fut in self._own.values():
            fut.cancel()
        self._own.clear()

    def _use_own(self, message: bytes) -> None:
        """If ``message``'s bucket has its own half under way, wait for it and hand it over."""
        if len(message) < HEADER.size:
            return  # the role object rejects it
        bucket = HEADER.unpack_from(message)[6]
        fut = self._own.pop(bucket, None)
        if fut is None:
            return
        with self._lock:  # not started yet: run it with the request instead
            for i, (b, _) in enumerate(self._queued):
                if b == bucket:
                    del self._queued[i]
                    return
        try:
            output = fut.result()
        except RemoteProtocolError as exc:
            self._cancel_own()
            self.role.fail(exc)
        self.role.provide_own(bucket, output)

    def _prepare(self) -> None:
        try:
            self.role.prepare_buckets()
            self._top_up()
        except BaseException as exc:  # handed to the next handle() call
            self._prep_error = exc

    def _join_prep(self) -> None:
        if self._prep is not None:
            self._prep.join()
            self._prep = None
        if self._prep_error is not None:
            exc, self._prep_error = self._prep_error, None
            raise exc

    def handle(self, message: bytes) -> bytes:
        self._join_prep()
        if self.role.state is State.IDLE:
            ack = self.role.handle(message) or b""
            if self._pool is not None:
                # The ACK goes out now; the own partition and the first own jobs start
                # while the requester partitions its items (the next handle() joins).
                self._prep = threading.Thread(target=self._prepare, name="psi-own-buckets",
                                              daemon=True)
                self._prep.start()
            return ack
        if self.role.state is State.ERROR:
            raise RemoteProtocolError("the session already failed", status_hint=409)
        try:
            inner = decode_batch(message)
        except RemoteProtocolError as exc:
            self._cancel_own()
            self.role.fail(exc)
        try:
            steps = []
            for m in inner:
                self._use_own(m)
                steps.append(self.role.receive(m))
        except RemoteProtocolError:
            self._cancel_own()
            raise
        futures = [(s, _submit(self._pool, s)) for s in steps]
        self._seen += len(steps)
        self._top_up()
        replies: list[bytes] = []
        for step, fut in futures:
            try:
                output = fut.result()
            except RemoteProtocolError as exc:
                for _, f in futures:
                    f.cancel()
                self._cancel_own()
                self.role.fail(exc)
            reply = self.role.complete(step, output)
            if reply is not None:
                replies.append(reply)
        return encode_batch(replies)

    @property
    def finished(self) -> bool:
        return self.role.finished
