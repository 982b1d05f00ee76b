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

import math
import multiprocessing
import os
import struct
import threading
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from typing import Any

from protocols.errors import RemoteProtocolError
from protocols.psi import Mode, PsiRequester, PsiResponder, RequesterResult, Step
from protocols.psi.states import State

BATCH_MAGIC = b"CRPB"
BATCH_VERSION = 1
_BATCH_HEAD = struct.Struct(">4sB3sI")
_LEN = struct.Struct(">I")
MAX_BATCH_MESSAGES = 256

#: distinct items per bucket (one pool job); 8192 points = 256 KiB per direction
ITEMS_PER_BUCKET = 8192
#: buckets per session message: keeps a message a few MiB at most
BUCKETS_PER_MESSAGE = 8

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


def _submit(pool: ProcessPoolExecutor | None, step: Step) -> Future[Any]:
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
    """How a session is cut: buckets of about ``items_per_bucket`` distinct items, sent
    ``buckets_per_message`` at a time, at least ``min_messages`` bucket messages."""

    items_per_bucket: int = ITEMS_PER_BUCKET
    buckets_per_message: int = BUCKETS_PER_MESSAGE
    min_messages: int = 2

    def bucket_count(self, distinct_items: int) -> int:
        by_size = math.ceil(max(1, distinct_items) / self.items_per_bucket)
        return max(self.min_messages, min(65536, by_size))

    def per_message(self, bucket_count: int) -> int:
        return max(1, min(self.buckets_per_message, bucket_count // self.min_messages))


def new_requester(
    items: Sequence[bytes],
    *,
    mode: Mode,
    session_id: bytes,
    want_labels: bool = False,
    streaming: Streaming = Streaming(),
) -> PsiRequester:
    return PsiRequester(items, mode=mode, bucket_count=streaming.bucket_count(len(set(items))),
                        session_id=session_id, want_labels=want_labels)


def run_requester(
    channel: Any,
    role: PsiRequester,
    *,
    check_alive: Callable[[], None] = lambda: None,
    streaming: Streaming = Streaming(),
    pool: ProcessPoolExecutor | bool | None = True,
) -> RequesterResult:
    """Run ``role`` to completion over ``channel``; return its result.

    ``pool=True`` uses :func:`worker_pool`; ``None``/``False`` runs the jobs inline.
    """
    workers = worker_pool() if pool is True else (pool or None)
    reply = channel.exchange(role.start(), round="hello")
    role.handle(reply)
    buckets = role.pending_buckets()
    per = streaming.per_message(role.bucket_count)
    batches = [buckets[i : i + per] for i in range(0, len(buckets), per)]
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
    the first message is the plain HELLO, every later one a batch of REQUESTs."""

    def __init__(self, role: PsiResponder, *, pool: ProcessPoolExecutor | bool | None = True
                 ) -> None:
        self.role = role
        self.role.start()
        self._pool = worker_pool() if pool is True else (pool or None)

    def handle(self, message: bytes) -> bytes:
        if self.role.state is State.IDLE:
            return self.role.handle(message) or b""
        if self.role.state is State.ERROR:
            raise RemoteProtocolError("the session already failed", status_hint=409)
        try:
            inner = decode_batch(message)
        except RemoteProtocolError as exc:
            self.role.fail(exc)
        steps = [self.role.receive(m) for m in inner]
        futures = [(s, _submit(self._pool, s)) for s in steps]
        replies: list[bytes] = []
        for step, fut in futures:
            try:
                output = fut.result()
            except RemoteProtocolError as exc:
                for _, f in futures:
                    f.cancel()
                self.role.fail(exc)
            reply = self.role.complete(step, output)
            if reply is not None:
                replies.append(reply)
        return encode_batch(replies)

    @property
    def finished(self) -> bool:
        return self.role.finished
