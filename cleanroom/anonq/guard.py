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
``session_ended``. Requests that arrive together are committed together (group commit),
and a request is answered only after its entries are durable. Entries hold ids,
digests, sizes and counts only: never identifiers, points, tags or labels.
Counters live in memory: a node restart starts new windows.
"""

from __future__ import annotations

import base64
import logging
import math
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cleanroom.errors import CleanroomError
from cleanroom.ledger import Event, digest, event, find_raw_looking, new_id
from cleanroom.node.context import NodeContext
from cleanroom.policy import Policy, load_policy
from protocols.labeled_psi import EvaluationBudget

ALLOWED_QUERY_TYPES = ("store_recommendation", "lead_score")
DEFAULT_WINDOW_HOURS = 24.0
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
    done: threading.Event
    error: BaseException | None = None


class SessionRecorder:
    """Group commit of session entries into the node's ledger (one writer thread)."""

    def __init__(self, ctx: NodeContext) -> None:
        self.ctx = ctx
        self._lock = threading.Condition()
        self._queue: list[_Pending] = []
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="anonq-ledger", daemon=True)
        self._thread.start()

    def record(self, events: Sequence[Event], timeout: float = 30.0) -> None:
        """Append ``events`` atomically; return once they are durable (raise otherwise)."""
        item = _Pending(list(events), threading.Event())
        with self._lock:
            if self._stop:
                raise CleanroomError("the ledger recorder is stopped")
            self._queue.append(item)
            self._lock.notify()
        if not item.done.wait(timeout):
            raise CleanroomError("the ledger did not record the session in time")
        if item.error is not None:
            raise CleanroomError(f"the ledger refused the session entries: {item.error}")

    def submit(self, events: Sequence[Event]) -> None:
        """Queue ``events`` without waiting (for bookkeeping such as expired sessions)."""
        with self._lock:
            if not self._stop:
                self._queue.append(_Pending(list(events), threading.Event()))
                self._lock.notify()

    def _run(self) -> None:
        from cleanroom.node.audit import record

        while True:
            with self._lock:
                while not self._queue and not self._stop:
                    self._lock.wait()
                batch, self._queue = self._queue, []
                if not batch and self._stop:
                    return
            try:
                record(self.ctx, *[e for item in batch for e in item.events])
            except Exception as exc:  # one bad batch: retry its items one by one
                log.warning("ledger batch of %d session(s) failed; retrying singly: %s",
                            len(batch), type(exc).__name__)
                for item in batch:
                    try:
                        record(self.ctx, *item.events)
                    except Exception as one:
                        item.error = one
            for item in batch:
                item.done.set()

    def close(self) -> None:
        with self._lock:
            self._stop = True
            self._lock.notify()
        self._thread.join(10.0)


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
