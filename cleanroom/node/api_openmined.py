"""openmined-psi compatible peer endpoints: stock openmined-psi clients match against a node.

Two calls, both under ``/v1/peer/psi/openmined`` (mutual TLS, pinned peers only):

- ``POST /setup?dataset=&column=&reveal=intersection|cardinality&kind=gcs|bloom_filter|raw
  &client_set_size=&fpr=`` (empty body): the library's serialised ``ServerSetup`` over the
  node's normalised identifiers of ``dataset.column``; the session id comes back in the
  ``X-PSI-Session`` header;
- ``POST /{session}/request`` (body: a serialised openmined-psi ``Request``): the
  serialised ``Response``. Malformed protobuf, bad points or a ``reveal_intersection``
  flag that differs from the session's -> 400. A session answers one request.

Allowed only when the node's policy lets the calling partner run ``match`` with that
reveal mode, and the dataset's policy lets the column be a ``join_key``; otherwise 403
naming the rule. The library objects are not thread-safe: each worker thread gets its own
object for the session's key (:func:`protocols.psi.openmined.worker_server`). Items are
the normalised identifier strings as stored (``cleanroom.identity``): the client must
normalise the same way. Nothing raw is logged or returned besides the library's messages.

Every session is recorded in this node's ledger like any other peer session, through the
node's shared ledger writer (:func:`cleanroom.node.audit.record`), protocol
``openmined_psi``, with the session id as both ``query_id`` and ``session_id`` (the
session is not part of a lifecycle query): ``session_started``, then one
``message_received`` / ``message_sent`` per message (round, SHA-256 digest, size only:
``setup_request`` is the canonical JSON of the setup parameters, ``server_setup``,
``client_request``, ``server_response``) and ``session_ended`` (``ok``; ``failed`` for a
request the library rejects; ``cancelled`` for a session whose request never came within
``SESSION_TTL_SECONDS``). A message's entries are durable before the reply that answers it
leaves; if the ledger cannot record them the call fails with 503 and the session is
dropped. Refused calls (403/404/429) open no session and are not recorded. Never an
identifier, a point or a filter in an entry.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass

from fastapi import APIRouter, HTTPException, Query, Request, Response
from starlette.concurrency import run_in_threadpool

from cleanroom.errors import CleanroomError
from cleanroom.ledger import Event, digest, new_id
from cleanroom.node import audit
from cleanroom.node.context import NodeContext
from cleanroom.node.datasets import load_dataset
from cleanroom.node.deps import CurrentPeer, NodeContextDep, body_limit
from cleanroom.queries.psi_session import shutdown_pool
from cleanroom.queries.store import node_policy
from protocols.errors import ProtocolError
from protocols.psi.openmined import (
    OpenMinedServer,
    SetupKind,
    release_worker_server,
    worker_server,
)

SESSION_TTL_SECONDS = 600
MAX_SESSIONS = 64
PROTOCOL = "openmined_psi"
log = logging.getLogger("cleanroom.openmined")


@dataclass
class _Session:
    peer: str
    key: bytes
    reveal: bool
    created: float
    bytes_received: int = 0
    bytes_sent: int = 0


# --- ledger ------------------------------------------------------------------------------


def _common(sid: str, peer: str) -> dict[str, object]:
    return {"query_id": sid, "session_id": sid, "protocol": PROTOCOL, "peer": peer}


def _message(kind: str, sid: str, peer: str, round_name: str, data: bytes) -> Event:
    return Event(kind, {**_common(sid, peer), "round": round_name, "digest": digest(data),
                        "size": len(data)})


def _ended(sid: str, sess: _Session, outcome: str, *, received: int, sent: int) -> Event:
    return Event("session_ended", {**_common(sid, sess.peer), "outcome": outcome,
                                   "messages_received": received, "messages_sent": sent,
                                   "bytes_received": sess.bytes_received,
                                   "bytes_sent": sess.bytes_sent})


def _record(ctx: NodeContext, events: list[Event]) -> None:
    """Append ``events`` durably, or refuse the reply (503): no unrecorded session."""
    try:
        audit.record(ctx, *events)
    except CleanroomError as exc:
        log.error("openmined-psi session not recorded: %s", type(exc).__name__)
        raise HTTPException(503, "the ledger could not record the session; retry later"
                            ) from None


def _setup_params(dataset: str, column: str, reveal: str, kind: str, client_set_size: int,
                  fpr: float) -> bytes:
    """The setup request as the ledger digests it: canonical JSON of its parameters."""
    return json.dumps({"dataset": dataset, "column": column, "reveal": reveal, "kind": kind,
                       "client_set_size": client_set_size, "fpr": repr(fpr)},
                      sort_keys=True, separators=(",", ":")).encode()


_sessions: dict[str, _Session] = {}
_lock = threading.Lock()


def _allowed(ctx: NodeContext, peer: str, dataset: str, column: str, reveal: str) -> None:
    policy = node_policy(ctx)
    rule = policy.partners.get(peer)
    if rule is None or "match" not in rule.query_types:
        raise HTTPException(403, f"policy: partners.{peer}.query_types does not allow match")
    if reveal not in rule.psi_reveal:
        raise HTTPException(403, f"policy: partners.{peer}.psi_reveal does not allow {reveal}")
    ds = policy.datasets.get(dataset)
    found = ds.uses_of(column) if ds else None
    if found is None or "join_key" not in found[1]:
        raise HTTPException(403, f"policy: datasets.{dataset}.columns.{column} is not a "
                                 "join_key")


def _setup(ctx: NodeContext, peer: str, dataset: str, column: str, reveal: str, kind: str,
           client_set_size: int, fpr: float) -> tuple[str, bytes]:
    _allowed(ctx, peer, dataset, column, reveal)
    try:
        frame = load_dataset(ctx, dataset, columns=[column])
    except CleanroomError as exc:
        raise HTTPException(404, f"dataset {dataset}, column {column}: {exc}") from None
    items = sorted({str(v) for v in frame[column].dropna()})
    server = OpenMinedServer(reveal_intersection=reveal == "intersection")
    data = server.setup_message(items, client_set_size=client_set_size, fpr=fpr,
                                kind=SetupKind(kind))
    sid = new_id("om")  # base32: never looks like an identifier in the ledger
    now = time.monotonic()
    params = _setup_params(dataset, column, reveal, kind, client_set_size, fpr)
    sess = _Session(peer, server.key, server.reveal_intersection, now, len(params), len(data))
    expired: list[tuple[str, _Session]] = []
    with _lock:
        for old in [s for s, v in _sessions.items() if now - v.created > SESSION_TTL_SECONDS]:
            gone = _sessions.pop(old)
            release_worker_server(gone.key)
            expired.append((old, gone))
        full = len(_sessions) >= MAX_SESSIONS
        if not full:
            _sessions[sid] = sess
    events = [_ended(old, gone, "cancelled", received=1, sent=1) for old, gone in expired]
    if full:
        if events:
            _record(ctx, events)
        raise HTTPException(429, "too many open openmined-psi sessions; retry later")
    events += [
        Event("session_started", {**_common(sid, peer), "role": "server"}),
        _message("message_received", sid, peer, "setup_request", params),
        _message("message_sent", sid, peer, "server_setup", data),
    ]
    try:
        _record(ctx, events)
    except HTTPException:
        with _lock:
            _sessions.pop(sid, None)
        raise
    return sid, data


def _answer(ctx: NodeContext, peer: str, sid: str, body: bytes) -> bytes:
    with _lock:
        sess = _sessions.get(sid)
        if sess is None or sess.peer != peer:
            raise HTTPException(404, "no such openmined-psi session for this peer")
        del _sessions[sid]  # one request per session: a replay finds nothing
    sess.bytes_received += len(body)
    received = _message("message_received", sid, peer, "client_request", body)
    server = worker_server(sess.key, reveal_intersection=sess.reveal)
    try:
        reply = server.process_request(body)
    except ProtocolError:
        _record(ctx, [received, _ended(sid, sess, "failed", received=2, sent=1)])
        raise
    finally:
        release_worker_server(sess.key)
    sess.bytes_sent += len(reply)
    _record(ctx, [received, _message("message_sent", sid, peer, "server_response", reply),
                  _ended(sid, sess, "ok", received=2, sent=2)])
    return reply


def routers(ctx: NodeContext) -> list[APIRouter]:
    router = APIRouter(prefix="/v1/peer/psi/openmined", tags=["openmined-psi"])

    @router.post("/setup", summary="openmined-psi ServerSetup over one identifier column")
    async def setup(
        caller: CurrentPeer,
        ctx: NodeContextDep,
        dataset: str = Query(..., min_length=1, max_length=64),
        column: str = Query(..., min_length=1, max_length=64),
        reveal: str = Query("cardinality", pattern="^(intersection|cardinality)$"),
        kind: str = Query("gcs", pattern="^(gcs|bloom_filter|raw)$"),
        client_set_size: int = Query(..., ge=1, le=10_000_000),
        fpr: float = Query(1e-9, gt=0.0, lt=0.01),
    ) -> Response:
        sid, data = await run_in_threadpool(_setup, ctx, caller.name, dataset, column, reveal,
                                            kind, client_set_size, fpr)
        return Response(data, media_type="application/x-protobuf",
                        headers={"X-PSI-Session": sid})

    @router.post("/{session}/request", summary="openmined-psi Request -> Response")
    @body_limit("upload")
    async def request(session: str, request: Request, caller: CurrentPeer,
                      ctx: NodeContextDep) -> Response:
        body = await request.body()
        try:
            data = await run_in_threadpool(_answer, ctx, caller.name, session, body)
        except ProtocolError as exc:
            raise HTTPException(400, f"openmined-psi: {exc}") from None
        return Response(data, media_type="application/x-protobuf")

    return [router]


async def on_shutdown(ctx: NodeContext) -> None:
    """Stop the node's PSI worker processes (shared with the query runners)."""
    shutdown_pool()
