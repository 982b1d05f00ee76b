"""Policy, rate limits, evaluation budgets and ledger records for the anonymous query.

At the owner's node, before any protocol work:

- :func:`check_partner`: the caller must have a rule ``partners.<peer>`` in this node's
  policy whose ``query_types`` allow the table's query type (``store_recommendation`` or
  ``lead_score``); otherwise :class:`Refused` (403) naming the rule;
- :class:`RateLimiter`: ``partners.<peer>.rate_limit`` (``max_queries`` per ``per_hours``)
  counts anonymous-query sessions (one per evaluation or download request; the bucket
  request of a real-time session belongs to its session); over it, 429 naming the rule;
- :class:`Budgets`: one :class:`protocols.labeled_psi.EvaluationBudget` per table and
  partner per window (the partner's rate-limit window, 24 h without one), limit from the
  table's ``evaluation_budget``; over it, the protocol's 429.

:class:`SessionRecorder` writes every session to the owner's ledger through
:func:`cleanroom.node.audit.record`: ``session_started``, one ``message_received`` /
``message_sent`` per protocol message (round name, SHA-256 digest, size) and
``session_ended``. Entries queued while a commit runs go in the next single atomic
commit (group commit, submission order kept); :meth:`SessionRecorder.submit` returns a
future that resolves once a batch is durable, and the endpoints decide which replies
wait for it (a session's opening entries before the reply that lets the querier open
labels; see docs/protocols/anonymous-query.md, "Durability rule"). Entries hold ids,
digests, sizes and counts only: never identifiers, points, tags or labels; this module
must not log entry contents.
Counters live in memory: a node restart starts new windows.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

from cleanroom.errors import CleanroomError
from cleanroom.ledger import Event, digest, event, find_raw_looking, new_id
from cleanroom.node.context import NodeContext
from cleanroom.policy import Policy, load_policy
from protocols.labeled_psi import EvaluationBudget

ALLOWED_QUERY_TYPES = ("store_recommendation", "lead_score")
DEFAULT_WINDOW_HOURS = 24.0
MAX_BACKLOG_EVENTS = 20_000
MAX_BATCH_EVENTS = 5_000
log = logging.getLogger("cleanroom.anonq")


class Refused(CleanroomError):
    """A request refused by policy; ``status`` is the HTTP status, ``rule`` the rule id."""

    def __init__(self, status: int, code: str, rule: str, message: str) -> None:
        super().__init__(f"{message} (rule {rule})")
        self.status = status
        self.code = code
        self.rule = rule


# --- policy ------------------------------------------------------------------------------

_policy_cache: dict[Path, tuple[tuple[int, int], Policy]] = {}
_policy_lock = threading.Lock()


def node_policy(ctx: NodeContext) -> Policy:
    """The node's policy (re-read when the file changes); no policy file = deny all."""
    path = ctx.config.policy_file
    if path is None:
        return Policy(version=1)
    st = path.stat()
    stamp = (st.st_mtime_ns, st.st_size)
    with _policy_lock:
        hit = _policy_cache.get(path)
        if hit is not None and hit[0] == stamp:
            return hit[1]
    policy = load_policy(path)
    with _policy_lock:
        _policy_cache[path] = (stamp, policy)
    return policy


def check_partner(policy: Policy, peer: str, query_type: str) -> None:
    """Refuse (403) a peer without a partner rule allowing ``query_type``."""
    rule = policy.partners.get(peer)
    if rule is None:
        raise Refused(403, "policy_denied", f"partners.{peer}",
                      f"this node's policy has no partner rule for {peer!r}")
    if query_type not in ALLOWED_QUERY_TYPES or query_type not in rule.query_types:
        raise Refused(403, "policy_denied", f"partners.{peer}.query_types",
                      f"partner {peer!r} may not run {query_type!r} against this table")


def check_public_columns(
    policy: Policy, peer: str, dataset: str, columns: Sequence[str]
) -> None:
    """Refuse unless ``peer`` is a partner and every column's uses include ``public``."""
    if peer not in policy.partners:
        raise Refused(403, "policy_denied", f"partners.{peer}",
                      f"this node's policy has no partner rule for {peer!r}")
    rule = policy.datasets.get(dataset)
    if rule is None:
        raise Refused(403, "policy_denied", f"datasets.{dataset}",
                      f"dataset {dataset!r} has no rule in this node's policy")
    for column in columns:
        found = rule.uses_of(column)
        if found is None:
            raise Refused(403, "policy_denied", f"datasets.{dataset}.columns",
                          f"column {column!r} of {dataset!r} has no allowed use")
        key, uses = found
        if "public" not in uses:
            raise Refused(403, "policy_denied", f"datasets.{dataset}.columns.{key}",
                          f"column {column!r} of {dataset!r} is not public")


# --- rate limit and budgets ----------------------------------------------------------------


def _window(policy: Policy, peer: str, now: float) -> tuple[int, float]:
    rule = policy.partners.get(peer)
    hours = rule.rate_limit.per_hours if rule and rule.rate_limit else DEFAULT_WINDOW_HOURS
    seconds = hours * 3600.0
    return math.floor(now / seconds), seconds


class RateLimiter:
    """Sessions per partner per fixed window of ``rate_limit.per_hours``."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: dict[str, tuple[int, int]] = {}

    def charge(self, policy: Policy, peer: str, now: float | None = None) -> None:
        rule = policy.partners.get(peer)
        if rule is None or rule.rate_limit is None:
            return
        limit = rule.rate_limit
        window, _ = _window(policy, peer, time.time() if now is None else now)
        with self._lock:
            w, n = self._counts.get(peer, (window, 0))
            if w != window:
                n = 0
            if n >= limit.max_queries:
                raise Refused(429, "rate_limited", f"partners.{peer}.rate_limit",
                              f"partner {peer!r} reached {limit.max_queries} sessions per "
                              f"{limit.per_hours:g} h")
            self._counts[peer] = (window, n + 1)


class Budgets:
    """One evaluation budget per (table, partner), renewed every window."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._budgets: dict[tuple[str, str], tuple[int, int, EvaluationBudget]] = {}

    def get(self, policy: Policy, table: str, peer: str, limit: int) -> EvaluationBudget:
        window, _ = _window(policy, peer, time.time())
        with self._lock:
            hit = self._budgets.get((table, peer))
            if hit is None or hit[0] != window or hit[1] != limit:
                hit = (window, limit, EvaluationBudget(per_querier=limit))
                self._budgets[(table, peer)] = hit
            return hit[2]


# --- ledger --------------------------------------------------------------------------------


def session_label(session_id: bytes) -> str:
    """The ledger id of a protocol session id (base32; never looks like a device id)."""
    text = "s-" + base64.b32encode(session_id).decode("ascii").rstrip("=").lower()
    return text if not find_raw_looking(text) else "s-" + digest(session_id)[7:19] + "-z"


def query_label(given: str | None) -> str:
    """The lifecycle query id sent by the querier, if well formed, else a fresh one."""
    if given and len(given) <= 64 and given.replace("-", "").replace("_", "").isalnum() \
            and not find_raw_looking(given):
        return given
    return new_id("aq")


@dataclass
class _Pending:
    events: list[Event]
    future: Future[None]


class SessionRecorder:
    """Group commit of session entries into the node's ledger (one writer thread).

    :meth:`submit` queues one atomic batch of entries and returns a future that resolves
    once they are durable (the writer's commit returned) or fails with
    :class:`CleanroomError`. The writer thread takes everything queued, appends it in one
    atomic durable commit (at most ``max_batch_events`` entries per commit; a submitted
    batch is never split) and resolves the futures; if that commit fails, it retries the
    batches one by one so one bad batch does not fail the others. Batches reach the ledger
    in submission order. :meth:`close` writes everything still queued, then stops.

    Crash semantics: a future that resolved means its entries are in the ledger; entries
    whose future had not resolved when the process died may be missing, never partly
    written. ``backlog`` counts queued entries; callers that do not wait for their
    entries should wait anyway when :attr:`backlogged` (bounded loss on a crash).
    """

    def __init__(self, ctx: NodeContext | None = None, *,
                 writer: Callable[[Sequence[Event]], object] | None = None,
                 max_backlog: int = MAX_BACKLOG_EVENTS,
                 max_batch_events: int = MAX_BATCH_EVENTS) -> None:
        if writer is None:
            if ctx is None:
                raise ValueError("SessionRecorder needs a node context or a writer")
            node = ctx

            def writer(events: Sequence[Event]) -> object:
                from cleanroom.node.audit import record

                return record(node, *events)

        self._write = writer
        self.max_backlog = max_backlog
        self.max_batch_events = max_batch_events
        self._lock = threading.Condition()
        self._queue: deque[_Pending] = deque()
        self._backlog = 0
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="anonq-ledger", daemon=True)
        self._thread.start()

    @property
    def backlog(self) -> int:
        """Entries queued and not yet durable."""
        return self._backlog

    @property
    def backlogged(self) -> bool:
        return self._backlog > self.max_backlog

    def submit(self, events: Sequence[Event]) -> Future[None]:
        """Queue ``events`` as one atomic batch; the future resolves once they are durable."""
        fut: Future[None] = Future()
        fut.set_running_or_notify_cancel()  # cannot be cancelled: it resolves when written
        item = _Pending(list(events), fut)
        with self._lock:
            if self._stop:
                fut.set_exception(CleanroomError("the ledger recorder is stopped"))
                return fut
            self._queue.append(item)
            self._backlog += len(item.events)
            self._lock.notify()
        return fut

    def record(self, events: Sequence[Event], timeout: float = 30.0) -> None:
        """Append ``events`` atomically; return once they are durable (raise otherwise)."""
        wait_durable(self.submit(events), timeout)

    async def record_async(self, events: Sequence[Event]) -> None:
        """:meth:`record` for the event loop: no worker thread waits meanwhile."""
        await durable(self.submit(events))

    def _take(self) -> list[_Pending] | None:
        with self._lock:
            while not self._queue and not self._stop:
                self._lock.wait()
            if not self._queue:
                return None  # stopped and drained
            batch = [self._queue.popleft()]
            n = len(batch[0].events)
            while self._queue and n + len(self._queue[0].events) <= self.max_batch_events:
                item = self._queue.popleft()
                n += len(item.events)
                batch.append(item)
            return batch

    def _run(self) -> None:
        while True:
            batch = self._take()
            if batch is None:
                return
            errors: list[BaseException | None] = [None] * len(batch)
            try:
                self._write([e for item in batch for e in item.events])
            except Exception as exc:  # one bad batch: retry its items one by one
                if len(batch) == 1:
                    errors[0] = exc
                else:
                    log.warning("ledger batch of %d session(s) failed; retrying singly: %s",
                                len(batch), type(exc).__name__)
                    for i, item in enumerate(batch):
                        try:
                            self._write(item.events)
                        except Exception as one:
                            errors[i] = one
            with self._lock:
                self._backlog -= sum(len(item.events) for item in batch)
            for item, err in zip(batch, errors, strict=True):
                if err is None:
                    item.future.set_result(None)
                else:
                    item.future.set_exception(
                        CleanroomError(f"the ledger refused the session entries: {err}"))

    def close(self, timeout: float = 30.0) -> None:
        """Write everything queued, then stop (later :meth:`submit` calls fail)."""
        with self._lock:
            self._stop = True
            self._lock.notify()
        self._thread.join(timeout)


def wait_durable(fut: Future[None], timeout: float = 30.0) -> None:
    """Block until a :meth:`SessionRecorder.submit` future resolves; raise if it failed."""
    try:
        fut.result(timeout)
    except TimeoutError:
        raise CleanroomError("the ledger did not record the session in time") from None


async def durable(fut: Future[None]) -> None:
    """Await a :meth:`SessionRecorder.submit` future on the event loop (no thread hop)."""
    await asyncio.wrap_future(fut)


def message_events(
    query_id: str, session: str, peer: str, received: tuple[str, bytes] | None,
    sent: tuple[str, bytes] | None,
) -> list[Event]:
    """``message_received`` / ``message_sent`` entries: round name, digest and size only."""
    out: list[Event] = []
    common: dict[str, object] = {"query_id": query_id, "session_id": session,
                                 "protocol": "labeled_psi", "peer": peer}
    if received is not None:
        out.append(Event("message_received", {**common, "round": received[0],
                                              "digest": digest(received[1]),
                                              "size": len(received[1])}))
    if sent is not None:
        out.append(Event("message_sent", {**common, "round": sent[0], "digest": digest(sent[1]),
                                          "size": len(sent[1])}))
    return out


def started(query_id: str, session: str, peer: str) -> Event:
    return event("session_started", query_id=query_id, session_id=session,
                 protocol="labeled_psi", peer=peer, role="owner")


def ended(query_id: str, session: str, peer: str, outcome: str, *, received: int = 0,
          sent: int = 0, bytes_received: int = 0, bytes_sent: int = 0) -> Event:
    return event("session_ended", query_id=query_id, session_id=session,
                 protocol="labeled_psi", peer=peer, outcome=outcome,
                 messages_received=received, messages_sent=sent,
                 bytes_received=bytes_received, bytes_sent=bytes_sent)
