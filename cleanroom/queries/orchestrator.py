"""The joint query lifecycle at one node: submit, decide, propose, approve, run, deliver.

Requester side: :func:`submit` stores the query (``submitted``) and hands it to a driver
thread (:func:`kick`), which checks this node's policy (``held`` / ``denied`` /
``proposed``), sends the signed proposal to each counterparty, collects their signed
decisions (``approved`` when all approved), runs the query type's :class:`Runner`
(``running``), stores or delivers the result to the receiver and tells every
counterparty the outcome (``completed``; else ``failed``). :func:`cancel` and the
deadline (``timed_out``) stop it from any active state.

Counterparty side: :func:`on_proposal` verifies the requester's signature, decides by
this node's policy (``approved`` / ``denied`` / ``held`` for :func:`approve` /
:func:`deny`) and answers with a signed decision; :func:`on_message` carries protocol
messages of a session to the runner's responder; :func:`on_outcome` / :func:`on_cancel`
end the query.

Every transition is recorded in this node's ledger with :func:`cleanroom.node.audit.record`
(names, digests, sizes and counts only). Messages that must reach a peer even across a
restart (late decisions, cancellations, outcomes, results for another receiver) go
through the durable outbox, delivered by :func:`tick`. :func:`recover` applies
:data:`cleanroom.queries.states.ON_RESTART` at startup.

This module moves protocol bytes and JSON between nodes; it never reads dataset rows
(runners do, at their own node) and never logs payloads.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import secrets
import threading
import weakref
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from cleanroom.errors import CleanroomError, InputError
from cleanroom.ledger import EntrySchemaError, Event, digest, event, find_raw_looking, new_id
from cleanroom.node.context import NodeContext
from cleanroom.policy import Decision, QuerySpec, decide, parse_spec
from cleanroom.queries import signing
from cleanroom.queries.runners import (
    CounterpartyRun,
    QueryAborted,
    QueryFailure,
    RequesterRun,
    SessionResponder,
    SpecRefused,
    Threshold,
    get_runner,
    protocol_session_id,
)
from cleanroom.queries.states import ACTIVE, TERMINAL, State
from cleanroom.queries.store import (
    DECISION_LOCK,
    DbUsage,
    QueryNotFound,
    TransitionRefused,
    active_queries,
    add_decision,
    add_session_count,
    aware,
    due_outbox,
    find_query,
    finish_outbox,
    get_query,
    insert_query,
    iso,
    latest_decisions,
    node_policy,
    outbox_item,
    settle_usage,
    spec_of,
    store_result,
    transition,
    usage_rows,
    utcnow,
)
from cleanroom.queries.tables import QueryDecisionRow, QueryOutboxRow, QueryResultRow, QueryRow
from cleanroom.transport import PeerCallError
from protocols.errors import ProtocolError, RemoteProtocolError

log = logging.getLogger("cleanroom.queries")

TIMEOUT_ENV = "CLEANROOM_QUERY_TIMEOUT_SECONDS"
CRASH_ENV = "CLEANROOM_QUERY_CRASH_POINT"  # tests: SIGKILL this process at a named point
DEFAULT_TIMEOUT_SECONDS = 3600
DRIVER_THREADS = 8
PROPOSAL_RETRY_SECONDS = 2.0
QUERY_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,63}")
PEER_QUERIES = "/v1/peer/queries"


class PeerRefused(CleanroomError):
    """A peer request this node refuses (wrong caller, bad signature, wrong state)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


# --- per-node runtime ---------------------------------------------------------------------


@dataclass
class _Live:
    responder: SessionResponder
    peer: str
    protocol: str
    lock: threading.Lock = field(default_factory=threading.Lock)
    sent: int = 0
    received: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0


@dataclass
class _Runtime:
    executor: ThreadPoolExecutor
    lock: threading.Lock = field(default_factory=threading.Lock)
    active: set[str] = field(default_factory=set)
    again: set[str] = field(default_factory=set)
    sessions: dict[tuple[str, str], _Live] = field(default_factory=dict)
    proposal_retry: dict[str, datetime] = field(default_factory=dict)
    witness_pending: bool = False
    witness_running: bool = False
    closed: bool = False


_runtimes: weakref.WeakKeyDictionary[NodeContext, _Runtime] = weakref.WeakKeyDictionary()
_runtimes_lock = threading.Lock()


def runtime(ctx: NodeContext) -> _Runtime:
    with _runtimes_lock:
        rt = _runtimes.get(ctx)
        if rt is None:
            rt = _Runtime(ThreadPoolExecutor(DRIVER_THREADS, thread_name_prefix="query"))
            _runtimes[ctx] = rt
        return rt


def shutdown(ctx: NodeContext) -> None:
    with _runtimes_lock:
        rt = _runtimes.pop(ctx, None)
    if rt is not None:
        rt.closed = True
        rt.executor.shutdown(wait=False, cancel_futures=True)


def _crash_point(step: str) -> None:
    if os.environ.get(CRASH_ENV) == step:
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


# --- ledger --------------------------------------------------------------------------------

_NAME_OK = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/\-]{0,127}")


def ledger_name(text: str | None) -> str | None:
    """A rule or field name in the ledger's name alphabet (globs spelled out)."""
    if not text:
        return None
    out = text.replace("*", "_any_").replace("?", "_one_")
    out = re.sub(r"[^A-Za-z0-9._:/\-]", "_", out)[:128]
    if not _NAME_OK.fullmatch(out) or find_raw_looking(out):
        return "redacted:" + hashlib.sha256(text.encode()).hexdigest()[:16]
    return out


def _record(ctx: NodeContext, *events: Event | None) -> None:
    evs = [e for e in events if e is not None]
    if not evs:
        return
    from cleanroom.node.audit import record

    try:
        record(ctx, *evs)
    except CleanroomError as exc:
        log.error("could not record %d ledger event(s): %s", len(evs), exc)


def _ev(event_type: str, **fields: Any) -> Event | None:
    try:
        return event(event_type, **{k: v for k, v in fields.items() if v is not None})
    except EntrySchemaError as exc:
        log.error("ledger event %s not recorded: %s", event_type, exc)
        return None


def _decision_event(query_id: str, d: dict[str, Any], *, peer: str | None = None) -> Event | None:
    return _ev(
        "policy_decision",
        query_id=query_id,
        party=d["party"],
        peer=peer,
        decision=d["outcome"],
        rule_id=ledger_name(d.get("rule")) or "all_rules_passed",
        field=ledger_name(d.get("field")),
    )


def _human_event(query_id: str, outcome: str, *, peer: str | None = None) -> Event | None:
    return _ev("human_approval", query_id=query_id, approver="operator", decision=outcome,
               peer=peer)


# --- helpers --------------------------------------------------------------------------------


def _me(ctx: NodeContext) -> str:
    return ctx.config.name


def _timeout(spec: QuerySpec) -> int:
    if spec.params.timeout_seconds is not None:
        return spec.params.timeout_seconds
    try:
        return max(1, int(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_SECONDS)))
    except ValueError:
        return DEFAULT_TIMEOUT_SECONDS


def _parse_time(text: str) -> datetime:
    return aware(datetime.fromisoformat(text.replace("Z", "+00:00")))


def _decision_dict(
    ctx: NodeContext,
    query_id: str,
    spec: QuerySpec,
    d: Decision,
    *,
    decided_by: str = "policy",
    dry_run: bool = False,
) -> dict[str, Any]:
    """This node's signed decision about ``spec`` (with the thresholds it imposes)."""
    policy = node_policy(ctx)
    me = _me(ctx)
    partners = spec.counterparties if me == spec.requester else [spec.requester]
    mi = max((policy.min_intersection_rule(p) for p in partners), key=lambda t: t[0])
    mg = max((policy.min_group_rule(p) for p in partners), key=lambda t: t[0])
    body: dict[str, Any] = {
        "query_id": query_id,
        "spec_digest": signing.spec_digest(spec.canonical_bytes()),
        "party": me,
        "outcome": d.outcome,
        "rule": d.rule,
        "field": d.field,
        "reason": d.reason,
        "decided_by": decided_by,
        "min_intersection_size": mi[0],
        "min_intersection_rule": mi[1],
        "min_group_size": mg[0],
        "min_group_rule": mg[1],
        "dry_run": dry_run,
    }
    body["signature"] = signing.sign(ctx.identity.signing_key(), signing.decision_message(body))
    return body


def _decision_row(d: dict[str, Any]) -> QueryDecisionRow:
    return QueryDecisionRow(
        query_id=d["query_id"],
        party=d["party"],
        outcome=d["outcome"],
        rule=d.get("rule") or "",
        field=d.get("field") or "",
        reason=d.get("reason") or "",
        decided_by=d.get("decided_by") or "policy",
        min_intersection_size=d.get("min_intersection_size"),
        min_intersection_rule=d.get("min_intersection_rule"),
        min_group_size=d.get("min_group_size"),
        min_group_rule=d.get("min_group_rule"),
        signature=d.get("signature") or "",
        decided_at=utcnow(),
    )


def _decide(ctx: NodeContext, spec: QuerySpec, usage: Any) -> Decision:
    """Policy first, then whether this node can run the type at all."""
    d = decide(node_policy(ctx), spec, _me(ctx), usage, utcnow())
    if d.outcome == "denied":
        return d
    runner = get_runner(spec.type)
    if runner is None:
        return Decision("denied", "spec.type", "type",
                        f"query type {spec.type} is not supported by this node")
    try:
        runner.validate(spec, _me(ctx))
    except SpecRefused as exc:
        return Decision("denied", exc.rule, exc.field, exc.reason)
    return d


def _partners(ctx: NodeContext, spec: QuerySpec) -> list[str]:
    return list(spec.counterparties) if _me(ctx) == spec.requester else [spec.requester]


def _epsilon(spec: QuerySpec) -> float:
    return spec.params.noise.epsilon if spec.params.noise is not None else 0.0


# --- views ----------------------------------------------------------------------------------


def view(ctx: NodeContext, row: QueryRow, *, detail: bool = True) -> dict[str, Any]:
    spec = json.loads(row.spec_json)
    out: dict[str, Any] = {
        "id": row.id,
        "role": row.role,
        "state": row.state,
        "type": row.query_type,
        "requester": row.requester,
        "counterparties": spec.get("counterparties", []),
        "receiver": row.receiver,
        "purpose": row.purpose,
        "spec_digest": row.spec_digest,
        "created_at": iso(row.created_at),
        "updated_at": iso(row.updated_at),
        "deadline_at": iso(row.deadline_at),
        "error": None,
        "result": None,
    }
    if row.error_code or row.error_rule:
        out["error"] = {
            "code": row.error_code,
            "rule": row.error_rule,
            "field": row.error_field,
            "party": row.error_party,
            "message": row.error_message,
        }
    if row.result_digest:
        out["result"] = {"digest": row.result_digest, "rows": row.result_rows,
                         "here": row.receiver == _me(ctx)}
    if detail:
        out["spec"] = spec
        out["history"] = row.history
        out["decisions"] = [
            {
                "party": d.party,
                "outcome": d.outcome,
                "rule": d.rule,
                "field": d.field,
                "reason": d.reason,
                "decided_by": d.decided_by,
                "decided_at": iso(d.decided_at),
            }
            for d in latest_decisions(ctx, row.id).values()
        ]
    return out


# --- requester: submit and dry run ----------------------------------------------------------


def _check_submittable(ctx: NodeContext, spec: QuerySpec) -> None:
    me = _me(ctx)
    if spec.requester != me:
        raise InputError(f"field 'requester': this node is {me!r}, not {spec.requester!r}")
    pinned = {p.name for p in ctx.peers()}
    for i, cp in enumerate(spec.counterparties):
        if cp not in pinned:
            raise InputError(f"field 'counterparties.{i}': {cp!r} is not a pinned peer")
    runner = get_runner(spec.type)
    if runner is None:
        raise InputError(f"field 'type': query type {spec.type} has no runner on this node")


def dry_run(ctx: NodeContext, spec: QuerySpec) -> dict[str, Any]:
    """Would ``spec`` pass every party's policy? Asks each counterparty; records nothing."""
    _check_submittable(ctx, spec)
    qid = new_id("q")
    own = _decide(ctx, spec, DbUsage(ctx))
    results = [{"party": _me(ctx), **own.as_dict()}]
    deadline = iso(utcnow() + timedelta(seconds=60)) or ""
    for cp in spec.counterparties:
        try:
            d = _send_proposal(ctx, qid, spec, cp, dry_run=True, deadline=deadline)
            results.append({"party": cp, "outcome": d["outcome"], "rule": d["rule"],
                            "field": d["field"], "reason": d["reason"]})
        except CleanroomError as exc:
            results.append({"party": cp, "outcome": "unreachable", "rule": "", "field": "",
                            "reason": str(exc)})
    return {
        "dry_run": True,
        "would_pass": all(r["outcome"] == "approved" for r in results),
        "needs_approval": [r["party"] for r in results if r["outcome"] == "held"],
        "decisions": results,
    }


def submit(ctx: NodeContext, spec: QuerySpec) -> QueryRow:
    """Store a new query as ``submitted``, record it and start driving it."""
    _check_submittable(ctx, spec)
    now = utcnow()
    canonical = spec.canonical_bytes()
    row = QueryRow(
        id=new_id("q"),
        role="requester",
        requester=spec.requester,
        query_type=spec.type,
        purpose=spec.purpose,
        receiver=spec.receiver,
        spec_json=canonical.decode(),
        spec_digest=signing.spec_digest(canonical),
        state=State.SUBMITTED.value,
        created_at=now,
        updated_at=now,
        deadline_at=now + timedelta(seconds=_timeout(spec)),
        epsilon=_epsilon(spec),
    )
    insert_query(ctx, row)
    _record(ctx, _proposed_event(row, spec))
    kick(ctx, row.id)
    return row


def _proposed_event(row: QueryRow, spec: QuerySpec) -> Event | None:
    return _ev(
        "query_proposed",
        query_id=row.id,
        query_type=spec.type,
        requester=spec.requester,
        counterparties=list(spec.counterparties),
        purpose=ledger_name(spec.purpose),
        spec_digest=row.spec_digest,
        receiver=spec.receiver,
    )


# --- requester: the driver ---------------------------------------------------------------------


def kick(ctx: NodeContext, query_id: str) -> None:
    """Make sure a driver thread works on ``query_id`` (at most one per query)."""
    rt = runtime(ctx)
    with rt.lock:
        if rt.closed:
            return
        if query_id in rt.active:
            rt.again.add(query_id)
            return
        rt.active.add(query_id)
    try:
        rt.executor.submit(_drive_loop, ctx, query_id)
    except RuntimeError:  # executor shut down
        with rt.lock:
            rt.active.discard(query_id)


def _drive_loop(ctx: NodeContext, query_id: str) -> None:
    rt = runtime(ctx)
    while True:
        try:
            drive(ctx, query_id)
        except Exception:
            log.exception("driver of query %s failed", query_id)
            _fail(ctx, query_id, "internal_error", "internal error; see the node log",
                  stage="driver")
        with rt.lock:
            if query_id in rt.again and not rt.closed:
                rt.again.discard(query_id)
                continue
            rt.active.discard(query_id)
            return


def drive(ctx: NodeContext, query_id: str) -> None:
    """Move a requester query forward as far as it can go now."""
    while True:
        row = find_query(ctx, query_id)
        if row is None or row.role != "requester":
            return
        state = State(row.state)
        if state is State.SUBMITTED:
            _own_decision(ctx, row)
        elif state is State.PROPOSED:
            _propose(ctx, row)
            _evaluate(ctx, query_id)
        elif state is State.APPROVED:
            _run(ctx, query_id)
        else:
            return
        after = find_query(ctx, query_id)
        if after is None or after.state == state.value:
            return


def _own_decision(ctx: NodeContext, row: QueryRow, *, operator: str | None = None) -> None:
    spec = spec_of(row)
    with DECISION_LOCK:
        d = _decide(ctx, spec, DbUsage(ctx))
        if operator == "approve" and d.outcome == "held":
            d = Decision("approved", d.rule, d.field, "approved by this node's operator")
        body = _decision_dict(ctx, row.id, spec, d, decided_by="operator" if operator else "policy")
        drow = _decision_row(body)
        try:
            if d.outcome == "approved":
                transition(ctx, row.id, State.PROPOSED,
                           extra=[drow, *usage_rows(row.id, spec.counterparties, _epsilon(spec))])
            elif d.outcome == "held":
                transition(ctx, row.id, State.HELD, extra=[drow])
            else:
                transition(ctx, row.id, State.DENIED, extra=[drow], error_code="policy_denied",
                           error_rule=f"{_me(ctx)}:{d.rule}", error_field=d.field,
                           error_party=_me(ctx), error_message=d.reason)
        except TransitionRefused:
            return
    _record(
        ctx,
        _human_event(row.id, "approved" if d.outcome == "approved" else "denied")
        if operator else None,
        _decision_event(row.id, body),
    )


def _proposal_body(ctx: NodeContext, query_id: str, spec: QuerySpec, dry_run: bool,
                   deadline: str) -> dict[str, Any]:
    canonical = spec.canonical_bytes()
    sig = signing.sign(ctx.identity.signing_key(),
                       signing.proposal_message(query_id, canonical, dry_run, deadline))
    return {"query_id": query_id, "spec": json.loads(canonical), "dry_run": dry_run,
            "deadline": deadline, "signature": sig}


def _send_proposal(ctx: NodeContext, query_id: str, spec: QuerySpec, peer: str, *,
                   dry_run: bool, deadline: str) -> dict[str, Any]:
    body = _proposal_body(ctx, query_id, spec, dry_run, deadline)
    with ctx.peer_client(peer, retries=0) as client:
        reply = client.post_json(PEER_QUERIES, body)
    return _check_decision(ctx, query_id, spec, peer, reply, dry_run=dry_run)


def _check_decision(ctx: NodeContext, query_id: str, spec: QuerySpec, peer: str, d: Any, *,
                    dry_run: bool = False) -> dict[str, Any]:
    if not isinstance(d, dict) or d.get("party") != peer or d.get("query_id") != query_id:
        raise PeerRefused(400, f"peer {peer}: malformed decision")
    if d.get("spec_digest") != signing.spec_digest(spec.canonical_bytes()):
        raise PeerRefused(409, f"peer {peer}: decision is about another spec")
    if d.get("outcome") not in ("approved", "denied", "held") or bool(d.get("dry_run")) != dry_run:
        raise PeerRefused(400, f"peer {peer}: malformed decision")
    signing.verify(ctx.peer_public_key(peer), signing.decision_message(d), str(d.get("signature")))
    return d


def _propose(ctx: NodeContext, row: QueryRow) -> None:
    spec = spec_of(row)
    have = latest_decisions(ctx, row.id)
    rt = runtime(ctx)
    for cp in spec.counterparties:
        if cp in have:
            continue
        try:
            d = _send_proposal(ctx, row.id, spec, cp, dry_run=False,
                               deadline=iso(row.deadline_at) or "")
        except PeerCallError as exc:
            if exc.status is not None and 400 <= exc.status < 500:
                _fail(ctx, row.id, "proposal_refused", str(exc), peer=cp, stage="proposed")
                return
            log.info("query %s: proposal to %s not delivered yet: %s", row.id, cp, exc.reason)
            with rt.lock:
                rt.proposal_retry[row.id] = utcnow() + timedelta(seconds=PROPOSAL_RETRY_SECONDS)
            continue
        except (PeerRefused, signing.BadSignature) as exc:
            _fail(ctx, row.id, "bad_decision", str(exc), peer=cp, stage="proposed")
            return
        _store_peer_decision(ctx, row.id, d)


def _store_peer_decision(ctx: NodeContext, query_id: str, d: dict[str, Any]) -> None:
    add_decision(ctx, _decision_row(d))
    _record(
        ctx,
        _human_event(query_id, d["outcome"], peer=d["party"])
        if d.get("decided_by") == "operator" and d["outcome"] != "held" else None,
        _decision_event(query_id, d, peer=d["party"]),
    )


def _evaluate(ctx: NodeContext, query_id: str) -> None:
    row = find_query(ctx, query_id)
    if row is None or row.state != State.PROPOSED.value:
        return
    spec = spec_of(row)
    have = latest_decisions(ctx, query_id)
    for cp in spec.counterparties:
        d = have.get(cp)
        if d is not None and d.outcome == "denied":
            try:
                transition(
                    ctx, query_id, State.DENIED, expect=[State.PROPOSED],
                    extra=_notify(spec, "cancel", {"reason_code": "denied_by_peer"},
                                  query_id, exclude={cp}),
                    error_code="policy_denied", error_rule=f"{cp}:{d.rule}",
                    error_field=d.field, error_party=cp, error_message=d.reason,
                )
            except TransitionRefused:
                return
            settle_usage(ctx, query_id, charge=False)
            return
    if all(cp in have and have[cp].outcome == "approved" for cp in spec.counterparties):
        try:
            transition(ctx, query_id, State.APPROVED, expect=[State.PROPOSED])
        except TransitionRefused:
            return


def _notify(spec: QuerySpec, kind: str, payload: dict[str, Any], query_id: str, *,
            exclude: set[str] | frozenset[str] = frozenset()) -> list[QueryOutboxRow]:
    return [outbox_item(query_id, cp, kind, payload) for cp in spec.counterparties
            if cp not in exclude]


def _thresholds(ctx: NodeContext, row: QueryRow, spec: QuerySpec) -> tuple[Threshold, Threshold]:
    policy = node_policy(ctx)
    me = _me(ctx)
    inter: list[Threshold] = []
    group: list[Threshold] = []
    for cp in spec.counterparties:
        v, r = policy.min_intersection_rule(cp)
        inter.append(Threshold(v, f"{me}:{r}"))
        v, r = policy.min_group_rule(cp)
        group.append(Threshold(v, f"{me}:{r}"))
    for party, d in latest_decisions(ctx, row.id).items():
        if party == me:
            continue
        if d.min_intersection_size:
            inter.append(Threshold(d.min_intersection_size,
                                   f"{party}:{d.min_intersection_rule or 'limits'}"))
        if d.min_group_size:
            group.append(Threshold(d.min_group_size, f"{party}:{d.min_group_rule or 'limits'}"))
    if spec.params.min_intersection_size:
        inter.append(Threshold(spec.params.min_intersection_size,
                               "spec:params.min_intersection_size"))
    if spec.params.min_group_size:
        group.append(Threshold(spec.params.min_group_size, "spec:params.min_group_size"))
    best_i = max(inter, key=lambda t: t.value)
    best_g = max(group, key=lambda t: t.value)
    return best_i, best_g


class _Channel:
    """The requester's end of one session: POSTs protocol bytes, records digests/sizes."""

    def __init__(self, ctx: NodeContext, query_id: str, peer: str, protocol: str,
                 alive: Callable[[], None]) -> None:
        self.ctx = ctx
        self.query_id = query_id
        self.peer = peer
        self.protocol = protocol
        self.session_id = new_id("s")
        self.alive = alive
        self.sent = self.received = self.bytes_sent = self.bytes_received = 0
        self._client = ctx.peer_client(peer, retries=0)
        self._path = f"{PEER_QUERIES}/{query_id}/sessions/{self.session_id}/messages"

    @property
    def protocol_session_id(self) -> bytes:
        return protocol_session_id(self.query_id, self.session_id)

    def exchange(self, message: bytes, *, round: str) -> bytes:
        self.alive()
        response = self._client.request(
            "POST", self._path, content=message,
            params={"protocol": self.protocol, "round": round},
            headers={"Content-Type": "application/octet-stream"}, idempotent=False,
        )
        reply = response.content
        self.sent += 1
        self.bytes_sent += len(message)
        common = {"query_id": self.query_id, "session_id": self.session_id,
                  "protocol": self.protocol, "peer": self.peer, "round": ledger_name(round)}
        events = [_ev("message_sent", **common, digest=digest(message), size=len(message))]
        if reply:
            self.received += 1
            self.bytes_received += len(reply)
            events.append(_ev("message_received", **common, digest=digest(reply),
                              size=len(reply)))
        _record(self.ctx, *events)
        _crash_point("after_first_message")
        return reply

    def close(self) -> None:
        self._client.close()


@contextmanager
def _session(ctx: NodeContext, query_id: str, peer: str, protocol: str,
             alive: Callable[[], None]) -> Iterator[_Channel]:
    ch = _Channel(ctx, query_id, peer, protocol, alive)
    _record(ctx, _ev("session_started", query_id=query_id, session_id=ch.session_id,
                     protocol=protocol, peer=peer, role="requester"))
    outcome = "failed"
    try:
        yield ch
        outcome = "ok"
    except QueryAborted:
        outcome = "cancelled"
        raise
    finally:
        ch.close()
        _record(ctx, _ev("session_ended", query_id=query_id, session_id=ch.session_id,
                         protocol=protocol, peer=peer, outcome=outcome,
                         messages_sent=ch.sent, messages_received=ch.received,
                         bytes_sent=ch.bytes_sent, bytes_received=ch.bytes_received))


def _alive_check(ctx: NodeContext, query_id: str) -> Callable[[], None]:
    def check() -> None:
        row = find_query(ctx, query_id)
        if row is None or row.state != State.RUNNING.value:
            raise QueryAborted(f"query {query_id} is no longer running")
        if aware(row.deadline_at) < utcnow():
            raise QueryAborted(f"query {query_id} passed its deadline")

    return check


def _result_digest(salt: bytes, payload: dict[str, Any]) -> tuple[str, bytes]:
    data = json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()
    return digest(salt + data), data


def _run(ctx: NodeContext, query_id: str) -> None:
    try:
        row = transition(ctx, query_id, State.RUNNING, expect=[State.APPROVED])
    except TransitionRefused:
        return
    spec = spec_of(row)
    runner = get_runner(spec.type)
    me = _me(ctx)
    alive = _alive_check(ctx, query_id)
    try:
        if runner is None:
            raise QueryFailure("unsupported_type", f"no runner for {spec.type}")
        inter, group = _thresholds(ctx, row, spec)
        run = RequesterRun(
            ctx=ctx, query_id=query_id, spec=spec, policy=node_policy(ctx),
            min_intersection=inter, min_group=group,
            open_session=lambda peer, protocol, _name: _session(ctx, query_id, peer, protocol,
                                                                alive),
            check_alive=alive,
        )
        _crash_point("running")
        result = runner.run(run)
        alive()
    except QueryAborted:
        return
    except QueryFailure as exc:
        _fail(ctx, query_id, exc.code, str(exc), rule=exc.rule, field=exc.field,
              party=exc.party, peer=exc.peer, stage="running")
        return
    except PeerCallError as exc:
        _fail(ctx, query_id, "peer_error", str(exc), peer=exc.peer, stage="running")
        return
    except ProtocolError as exc:
        _fail(ctx, query_id, "protocol_error", str(exc), stage="running")
        return
    except CleanroomError as exc:
        _fail(ctx, query_id, "error", str(exc), stage="running")
        return
    salt = secrets.token_bytes(32)
    result_digest, data = _result_digest(salt, result.payload)
    outcome = {"state": "completed", "result_digest": result_digest, "rows": result.rows,
               "epsilon": result.epsilon, "receiver": spec.receiver}
    extra: list[Any] = _notify(spec, "outcome", outcome, query_id)
    result_row = QueryResultRow(query_id=query_id, receiver=spec.receiver, payload=data.decode(),
                                salt=salt.hex(), digest=result_digest, rows=result.rows,
                                epsilon=result.epsilon, created_at=utcnow())
    if spec.receiver == me:
        extra.append(result_row)
    else:
        extra.append(outbox_item(query_id, spec.receiver, "result", {
            "payload": result.payload, "salt": salt.hex(), "digest": result_digest,
            "rows": result.rows, "epsilon": result.epsilon}))
    try:
        transition(ctx, query_id, State.COMPLETED, expect=[State.RUNNING], extra=extra,
                   result_digest=result_digest, result_rows=result.rows)
    except TransitionRefused:
        return  # cancelled or timed out at the last moment: the result is dropped
    settle_usage(ctx, query_id, charge=result.epsilon > 0)
    _record(ctx, _ev("result_delivered", query_id=query_id, receiver=spec.receiver,
                     digest=result_digest, rows=result.rows, size=len(data),
                     epsilon_milli=round(result.epsilon * 1000) if result.epsilon else None))
    witness_soon(ctx)


def _fail(
    ctx: NodeContext,
    query_id: str,
    code: str,
    message: str,
    *,
    rule: str | None = None,
    field: str | None = None,
    party: str | None = None,
    peer: str | None = None,
    stage: str | None = None,
    state: State = State.FAILED,
) -> bool:
    """End an active query as failed (or timed out); tell counterparties; record it."""
    row = find_query(ctx, query_id)
    if row is None or State(row.state) in TERMINAL:
        return False
    spec = spec_of(row)
    extra: list[Any] = []
    if row.role == "requester":
        extra = _notify(spec, "outcome", {"state": state.value, "error_code": code,
                                          "rule": rule, "field": field, "party": party},
                        query_id)
    try:
        transition(ctx, query_id, state, extra=extra, error_code=code, error_rule=rule,
                   error_field=field, error_party=party, error_message=message[:2000])
    except TransitionRefused:
        return False
    charge = row.role == "counterparty" and row.sessions_done > 0 and state is State.TIMED_OUT
    settle_usage(ctx, query_id, charge=charge and row.epsilon > 0)
    _record(
        ctx,
        _ev("policy_decision", query_id=query_id, party=party or _me(ctx), decision="denied",
            rule_id=ledger_name(rule), field=ledger_name(field)) if rule else None,
        _ev("query_failed", query_id=query_id, error_code=ledger_name(code) or "error",
            stage=ledger_name(stage), peer=peer),
    )
    return True


# --- operator actions (both roles) --------------------------------------------------------------


def cancel(ctx: NodeContext, query_id: str) -> QueryRow:
    row = get_query(ctx, query_id)
    if row.role != "requester":
        raise TransitionRefused(
            f"query {query_id} was requested by {row.requester}; only the requester cancels "
            "(deny it if it is held here)"
        )
    spec = spec_of(row)
    new = transition(ctx, query_id, State.CANCELLED,
                     extra=_notify(spec, "cancel", {"reason_code": "operator"}, query_id),
                     error_code="cancelled", error_party=_me(ctx),
                     error_message="cancelled by the requester's operator")
    settle_usage(ctx, query_id, charge=False)
    _record(ctx, _ev("query_cancelled", query_id=query_id, by=_me(ctx), reason_code="operator"))
    return new


def approve(ctx: NodeContext, query_id: str) -> QueryRow:
    row = get_query(ctx, query_id)
    if row.state != State.HELD.value:
        raise TransitionRefused(f"query {query_id} is {row.state}, not held")
    if row.role == "requester":
        _own_decision(ctx, row, operator="approve")
        kick(ctx, query_id)
        return get_query(ctx, query_id)
    spec = spec_of(row)
    with DECISION_LOCK:
        d = _decide(ctx, spec, DbUsage(ctx))
        if d.outcome == "held":
            d = Decision("approved", d.rule, d.field, "approved by this node's operator")
        body = _decision_dict(ctx, query_id, spec, d, decided_by="operator")
        out = [outbox_item(query_id, spec.requester, "decision", body)]
        if d.outcome == "approved":
            new = transition(ctx, query_id, State.APPROVED, expect=[State.HELD],
                             extra=[_decision_row(body), *out,
                                    *usage_rows(query_id, [spec.requester], _epsilon(spec))])
        else:
            new = transition(ctx, query_id, State.DENIED, expect=[State.HELD],
                             extra=[_decision_row(body), *out], error_code="policy_denied",
                             error_rule=f"{_me(ctx)}:{d.rule}", error_field=d.field,
                             error_party=_me(ctx), error_message=d.reason)
    _record(ctx, _human_event(query_id, "approved"), _decision_event(query_id, body))
    return new


def deny(ctx: NodeContext, query_id: str) -> QueryRow:
    row = get_query(ctx, query_id)
    if row.state != State.HELD.value:
        raise TransitionRefused(f"query {query_id} is {row.state}, not held")
    spec = spec_of(row)
    partner = spec.counterparties[0] if row.role == "requester" else spec.requester
    d = Decision("denied", f"partners.{partner}.manual_approval", "type",
                 "denied by this node's operator")
    body = _decision_dict(ctx, query_id, spec, d, decided_by="operator")
    extra: list[Any] = [_decision_row(body)]
    if row.role == "counterparty":
        extra.append(outbox_item(query_id, spec.requester, "decision", body))
    new = transition(ctx, query_id, State.DENIED, expect=[State.HELD], extra=extra,
                     error_code="policy_denied", error_rule=f"{_me(ctx)}:{d.rule}",
                     error_field=d.field, error_party=_me(ctx), error_message=d.reason)
    _record(ctx, _human_event(query_id, "denied"), _decision_event(query_id, body))
    return new


# --- counterparty: peer handlers ------------------------------------------------------------------


def on_proposal(ctx: NodeContext, peer: str, body: Any) -> dict[str, Any]:
    """A signed proposal from ``peer``: decide, store (unless dry run), answer signed."""
    if not isinstance(body, dict):
        raise PeerRefused(400, "a proposal is a JSON object")
    qid = body.get("query_id")
    if not isinstance(qid, str) or not QUERY_ID.fullmatch(qid):
        raise PeerRefused(400, "field 'query_id': not a query id")
    raw_spec = body.get("spec")
    spec = parse_spec(raw_spec if isinstance(raw_spec, dict) else b"null", source="proposal")
    dry = body.get("dry_run") is True
    deadline_text = body.get("deadline")
    if not isinstance(deadline_text, str):
        raise PeerRefused(400, "field 'deadline': missing")
    try:
        deadline = _parse_time(deadline_text)
    except ValueError:
        raise PeerRefused(400, "field 'deadline': not an ISO 8601 time") from None
    if spec.requester != peer:
        raise PeerRefused(403, f"the proposal names requester {spec.requester}, but {peer} sent it")
    if _me(ctx) not in spec.counterparties:
        raise PeerRefused(400, f"this node ({_me(ctx)}) is not a counterparty of the query")
    canonical = spec.canonical_bytes()
    try:
        signing.verify(ctx.peer_public_key(peer),
                       signing.proposal_message(qid, canonical, dry, deadline_text),
                       str(body.get("signature")))
    except signing.BadSignature:
        raise PeerRefused(403, "the proposal's signature does not verify") from None
    if dry:
        return _decision_dict(ctx, qid, spec, _decide(ctx, spec, DbUsage(ctx)), dry_run=True)
    if deadline <= utcnow():
        raise PeerRefused(409, "the proposal's deadline has passed")
    digest_ = signing.spec_digest(canonical)
    with DECISION_LOCK:
        existing = find_query(ctx, qid)
        if existing is not None:
            if existing.spec_digest != digest_ or existing.requester != peer:
                raise PeerRefused(409, f"query {qid} exists here with another spec")
            mine = latest_decisions(ctx, qid).get(_me(ctx))
            if mine is None:
                raise PeerRefused(409, f"query {qid} has no decision here")
            return _wire_decision(mine, qid, digest_)
        d = _decide(ctx, spec, DbUsage(ctx))
        decision = _decision_dict(ctx, qid, spec, d)
        now = utcnow()
        state = {"approved": State.APPROVED, "held": State.HELD, "denied": State.DENIED}[d.outcome]
        row = QueryRow(
            id=qid, role="counterparty", requester=peer, query_type=spec.type,
            purpose=spec.purpose, receiver=spec.receiver, spec_json=canonical.decode(),
            spec_digest=digest_, proposal_signature=str(body.get("signature")),
            state=state.value, created_at=now, updated_at=now, deadline_at=deadline,
            epsilon=_epsilon(spec),
        )
        if state is State.DENIED:
            row.error_code = "policy_denied"
            row.error_rule = f"{_me(ctx)}:{d.rule}"
            row.error_field = d.field
            row.error_party = _me(ctx)
            row.error_message = d.reason
        extra: list[Any] = [_decision_row(decision)]
        if state is State.APPROVED:
            extra.extend(usage_rows(qid, [peer], _epsilon(spec)))
        insert_query(ctx, row, *extra)
    _record(ctx, _proposed_event(row, spec), _decision_event(qid, decision))
    return decision


def _wire_decision(d: QueryDecisionRow, qid: str, spec_digest: str) -> dict[str, Any]:
    return {
        "query_id": qid, "spec_digest": spec_digest, "party": d.party, "outcome": d.outcome,
        "rule": d.rule, "field": d.field, "reason": d.reason, "decided_by": d.decided_by,
        "min_intersection_size": d.min_intersection_size,
        "min_intersection_rule": d.min_intersection_rule,
        "min_group_size": d.min_group_size, "min_group_rule": d.min_group_rule,
        "dry_run": False, "signature": d.signature,
    }


def _own_row(ctx: NodeContext, peer: str, query_id: str, role: str) -> QueryRow:
    row = find_query(ctx, query_id)
    if row is None:
        raise PeerRefused(404, f"no query {query_id} at this node")
    spec = spec_of(row)
    if row.role != role or peer not in spec.parties:
        raise PeerRefused(403, f"{peer} has no part in query {query_id} here")
    return row


def on_decision(ctx: NodeContext, peer: str, query_id: str, body: Any) -> dict[str, Any]:
    """A counterparty's late (operator) decision arrives at the requester."""
    row = _own_row(ctx, peer, query_id, "requester")
    spec = spec_of(row)
    if peer not in spec.counterparties:
        raise PeerRefused(403, f"{peer} is not a counterparty of query {query_id}")
    try:
        d = _check_decision(ctx, query_id, spec, peer, body)
    except signing.BadSignature:
        raise PeerRefused(403, "the decision's signature does not verify") from None
    current = latest_decisions(ctx, query_id).get(peer)
    if current is not None and current.signature == d["signature"]:
        return {"state": row.state}
    _store_peer_decision(ctx, query_id, d)
    _evaluate(ctx, query_id)
    after = get_query(ctx, query_id)
    if after.state == State.APPROVED.value:
        kick(ctx, query_id)
    return {"state": after.state}


def on_cancel(ctx: NodeContext, peer: str, query_id: str, body: Any) -> dict[str, Any]:
    row = _own_row(ctx, peer, query_id, "counterparty")
    if peer != row.requester:
        raise PeerRefused(403, "only the requester cancels a query")
    reason = body.get("reason_code") if isinstance(body, dict) else None
    if State(row.state) in TERMINAL:
        return {"state": row.state}
    try:
        new = transition(ctx, query_id, State.CANCELLED, error_code="cancelled",
                         error_party=peer, error_message=f"cancelled by {peer}")
    except TransitionRefused:
        return {"state": get_query(ctx, query_id).state}
    _drop_sessions(ctx, query_id)
    settle_usage(ctx, query_id, charge=False)
    _record(ctx, _ev("query_cancelled", query_id=query_id, by=peer, peer=peer,
                     reason_code=ledger_name(reason if isinstance(reason, str) else None)))
    return {"state": new.state}


def on_outcome(ctx: NodeContext, peer: str, query_id: str, body: Any) -> dict[str, Any]:
    row = _own_row(ctx, peer, query_id, "counterparty")
    if peer != row.requester or not isinstance(body, dict):
        raise PeerRefused(403, "only the requester reports the outcome")
    if State(row.state) in TERMINAL:
        return {"state": row.state}
    state = body.get("state")
    if state == "completed":
        rdigest = body.get("result_digest")
        rows = body.get("rows")
        eps = body.get("epsilon") or 0.0
        if not isinstance(rdigest, str) or not isinstance(rows, int) or rows < 0:
            raise PeerRefused(400, "a completed outcome needs result_digest and rows")
        if not isinstance(eps, int | float) or abs(float(eps) - row.epsilon) > 1e-9:
            raise PeerRefused(409, "the reported epsilon differs from the approved spec")
        try:
            transition(ctx, query_id, State.COMPLETED, result_digest=rdigest, result_rows=rows)
        except TransitionRefused:
            return {"state": get_query(ctx, query_id).state}
        settle_usage(ctx, query_id, charge=row.epsilon > 0)
        _record(ctx, _ev("result_delivered", query_id=query_id, receiver=row.receiver,
                         digest=rdigest, rows=rows,
                         epsilon_milli=round(row.epsilon * 1000) if row.epsilon else None))
        return {"state": State.COMPLETED.value}
    if state in ("failed", "timed_out"):
        raw_code = body.get("error_code")
        code = raw_code if isinstance(raw_code, str) else "failed"
        rule = body.get("rule") if isinstance(body.get("rule"), str) else None
        fld = body.get("field") if isinstance(body.get("field"), str) else None
        party = body.get("party") if isinstance(body.get("party"), str) else None
        _drop_sessions(ctx, query_id)
        _fail(ctx, query_id, code, f"reported by the requester {peer}: {code}", rule=rule,
              field=fld, party=party, peer=peer, stage="requester",
              state=State.TIMED_OUT if state == "timed_out" else State.FAILED)
        return {"state": get_query(ctx, query_id).state}
    raise PeerRefused(400, "field 'state': expected completed, failed or timed_out")


def _drop_sessions(ctx: NodeContext, query_id: str) -> None:
    rt = runtime(ctx)
    with rt.lock:
        for key in [k for k in rt.sessions if k[0] == query_id]:
            rt.sessions.pop(key, None)


def on_message(ctx: NodeContext, peer: str, query_id: str, session_id: str, protocol: str,
               round_name: str, message: bytes) -> bytes:
    """One protocol message of a session, at the counterparty: the responder's reply."""
    if not QUERY_ID.fullmatch(session_id):
        raise PeerRefused(400, "not a session id")
    row = _own_row(ctx, peer, query_id, "counterparty")
    if peer != row.requester:
        raise PeerRefused(403, "only the requester opens sessions")
    if row.state not in (State.APPROVED.value, State.RUNNING.value):
        raise PeerRefused(409, f"query {query_id} is {row.state} here")
    if aware(row.deadline_at) < utcnow():
        raise PeerRefused(409, f"query {query_id} passed its deadline")
    rt = runtime(ctx)
    key = (query_id, session_id)
    with rt.lock:
        live = rt.sessions.get(key)
    if live is None:
        live = _open_live(ctx, row, session_id, protocol, peer)
    if live.protocol != protocol:
        raise PeerRefused(409, f"session {session_id} runs {live.protocol}, not {protocol}")
    common = {"query_id": query_id, "session_id": session_id, "protocol": protocol,
              "peer": peer, "round": ledger_name(round_name) or "message"}
    with live.lock:
        try:
            reply = live.responder.handle(message)
        except (RemoteProtocolError, ProtocolError) as exc:
            _end_live(ctx, query_id, session_id, live, "failed")
            _fail(ctx, query_id, "protocol_error", str(exc), peer=peer, stage="session")
            raise
        except QueryFailure as exc:
            _end_live(ctx, query_id, session_id, live, "failed")
            _fail(ctx, query_id, exc.code, str(exc), field=exc.field, peer=peer, stage="session")
            raise PeerRefused(409, str(exc)) from None
        live.received += 1
        live.bytes_received += len(message)
        events = [_ev("message_received", **common, digest=digest(message), size=len(message))]
        if reply:
            live.sent += 1
            live.bytes_sent += len(reply)
            events.append(_ev("message_sent", **common, digest=digest(reply), size=len(reply)))
        _record(ctx, *events)
        _crash_point("responder_message")
        if live.responder.finished:
            _end_live(ctx, query_id, session_id, live, "ok")
    return reply


def _open_live(ctx: NodeContext, row: QueryRow, session_id: str, protocol: str,
               peer: str) -> _Live:
    spec = spec_of(row)
    runner = get_runner(spec.type)
    if runner is None:
        raise PeerRefused(409, f"no runner for {spec.type}")
    if not QUERY_ID.fullmatch(protocol):
        raise PeerRefused(400, "not a protocol name")
    run = CounterpartyRun(ctx=ctx, query_id=row.id, spec=spec, policy=node_policy(ctx))
    try:
        responder = runner.open_responder(run, session_id, protocol, peer)
    except QueryFailure as exc:
        _fail(ctx, row.id, exc.code, str(exc), field=exc.field, peer=peer, stage="session")
        raise PeerRefused(409, str(exc)) from None
    live = _Live(responder, peer, protocol)
    rt = runtime(ctx)
    with rt.lock:
        existing = rt.sessions.get((row.id, session_id))
        if existing is not None:
            return existing
        rt.sessions[(row.id, session_id)] = live
    if row.state == State.APPROVED.value:
        with suppress(TransitionRefused):
            transition(ctx, row.id, State.RUNNING, expect=[State.APPROVED])
    add_session_count(ctx, row.id, 1, 0)
    _record(ctx, _ev("session_started", query_id=row.id, session_id=session_id,
                     protocol=protocol, peer=peer, role="responder"))
    return live


def _end_live(ctx: NodeContext, query_id: str, session_id: str, live: _Live, outcome: str) -> None:
    rt = runtime(ctx)
    with rt.lock:
        rt.sessions.pop((query_id, session_id), None)
    add_session_count(ctx, query_id, -1, 1 if outcome == "ok" else 0)
    _record(ctx, _ev("session_ended", query_id=query_id, session_id=session_id,
                     protocol=live.protocol, peer=live.peer, outcome=outcome,
                     messages_sent=live.sent, messages_received=live.received,
                     bytes_sent=live.bytes_sent, bytes_received=live.bytes_received))


def on_result(ctx: NodeContext, peer: str, query_id: str, body: Any) -> dict[str, Any]:
    """A result computed elsewhere, delivered to this node as the receiver."""
    row = _own_row(ctx, peer, query_id, "counterparty")
    if row.receiver != _me(ctx) or peer != row.requester or not isinstance(body, dict):
        raise PeerRefused(403, f"the result of query {query_id} is not addressed to this node")
    payload, salt = body.get("payload"), body.get("salt")
    if not isinstance(payload, dict) or not isinstance(salt, str):
        raise PeerRefused(400, "a result needs payload and salt")
    try:
        rdigest, data = _result_digest(bytes.fromhex(salt), payload)
    except ValueError:
        raise PeerRefused(400, "field 'salt': not hex") from None
    if rdigest != body.get("digest"):
        raise PeerRefused(400, "the result does not match its digest")
    store_result(ctx, QueryResultRow(
        query_id=query_id, receiver=_me(ctx), payload=data.decode(), salt=salt, digest=rdigest,
        rows=int(body.get("rows") or 0), epsilon=float(body.get("epsilon") or 0.0),
        created_at=utcnow()))
    return {"stored": True, "digest": rdigest}


def result_for_peer(ctx: NodeContext, peer: str, query_id: str) -> QueryResultRow:
    row = find_query(ctx, query_id)
    if row is None:
        raise PeerRefused(404, f"no query {query_id} at this node")
    if row.receiver != peer:
        raise PeerRefused(403, f"the result of query {query_id} is addressed to "
                               f"{row.receiver}, not to {peer}")
    from cleanroom.queries.store import get_result

    res = get_result(ctx, query_id)
    if res is None:
        raise PeerRefused(404, f"no result of query {query_id} is held at this node")
    return res


# --- ticker: deadlines, outbox, proposal retries ---------------------------------------------


def tick(ctx: NodeContext) -> None:
    """Time out overdue queries, deliver due outbox messages, retry unanswered proposals."""
    now = utcnow()
    rt = runtime(ctx)
    for row in active_queries(ctx):
        if aware(row.deadline_at) < now:
            stage = row.state
            if row.role == "counterparty":
                _drop_sessions(ctx, row.id)
            _fail(ctx, row.id, "timed_out", "the query's deadline passed", stage=stage,
                  state=State.TIMED_OUT)
        elif row.role == "requester" and row.state == State.PROPOSED.value:
            with rt.lock:
                due = rt.proposal_retry.get(row.id)
                ready = due is not None and due <= now
                if ready:
                    rt.proposal_retry.pop(row.id, None)
            if ready:
                kick(ctx, row.id)
    for item in due_outbox(ctx):
        _deliver(ctx, item)


_OUTBOX_PATHS = {"decision": "decision", "cancel": "cancel", "outcome": "outcome",
                 "result": "result"}


def _deliver(ctx: NodeContext, item: QueryOutboxRow) -> None:
    assert item.id is not None
    path = f"{PEER_QUERIES}/{item.query_id}/{_OUTBOX_PATHS[item.kind]}"
    try:
        with ctx.peer_client(item.peer, retries=0, timeout=15.0) as client:
            client.post_json(path, json.loads(item.payload))
    except PeerCallError as exc:
        if exc.status in (403, 404, 409) and item.kind in ("cancel", "outcome"):
            finish_outbox(ctx, item.id, ok=True)  # the peer has no live copy to update
            return
        finish_outbox(ctx, item.id, ok=False, error=str(exc))
        return
    except CleanroomError as exc:
        finish_outbox(ctx, item.id, ok=False, error=str(exc))
        return
    finish_outbox(ctx, item.id, ok=True)


# --- restart ------------------------------------------------------------------------------------


def recover(ctx: NodeContext) -> dict[str, int]:
    """Apply the restart rules to every active query; returns counts per action."""
    counts = {"resumed": 0, "failed": 0, "kept": 0}
    for row in active_queries(ctx):
        state = State(row.state)
        if row.role == "requester":
            if state is State.RUNNING:
                _fail(ctx, row.id, "node_restarted",
                      "the requester restarted while sessions were running", stage="running")
                counts["failed"] += 1
            elif state in (State.SUBMITTED, State.PROPOSED, State.APPROVED):
                kick(ctx, row.id)
                counts["resumed"] += 1
            else:
                counts["kept"] += 1
        else:
            if state is State.RUNNING and row.open_sessions > 0:
                _fail(ctx, row.id, "node_restarted",
                      "this node restarted while a session was open", stage="running")
                counts["failed"] += 1
            else:
                if row.open_sessions:
                    from cleanroom.queries.store import update_fields

                    update_fields(ctx, row.id, open_sessions=0)
                counts["kept"] += 1
    return counts


# --- witnessing after completed queries -----------------------------------------------------


def witness_soon(ctx: NodeContext) -> None:
    """Run a witnessing round in the background; rounds asked for meanwhile coalesce."""
    rt = runtime(ctx)
    with rt.lock:
        rt.witness_pending = True
        if rt.witness_running or rt.closed:
            return
        rt.witness_running = True
    threading.Thread(target=_witness_loop, args=(ctx,), name="query-witness", daemon=True).start()


def _witness_loop(ctx: NodeContext) -> None:
    rt = runtime(ctx)
    while True:
        with rt.lock:
            if not rt.witness_pending or rt.closed:
                rt.witness_running = False
                return
            rt.witness_pending = False
        try:
            from cleanroom.node.witness_service import witness_round

            witness_round(ctx)
        except Exception:
            log.warning("witnessing after a query failed", exc_info=True)


def is_active(state: str) -> bool:
    return State(state) in ACTIVE


__all__ = [
    "PeerRefused",
    "QueryNotFound",
    "approve",
    "cancel",
    "deny",
    "dry_run",
    "kick",
    "on_cancel",
    "on_decision",
    "on_message",
    "on_outcome",
    "on_proposal",
    "on_result",
    "recover",
    "result_for_peer",
    "submit",
    "tick",
    "view",
]
