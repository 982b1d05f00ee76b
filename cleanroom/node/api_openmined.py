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
"""

from __future__ import annotations

import secrets
import threading
import time
from dataclasses import dataclass

from fastapi import APIRouter, HTTPException, Query, Request, Response
from starlette.concurrency import run_in_threadpool

from cleanroom.errors import CleanroomError
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


@dataclass
class _Session:
    peer: str
    key: bytes
    reveal: bool
    created: float


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
    sid = "om-" + secrets.token_hex(12)
    now = time.monotonic()
    with _lock:
        for old in [s for s, v in _sessions.items() if now - v.created > SESSION_TTL_SECONDS]:
            release_worker_server(_sessions.pop(old).key)
        if len(_sessions) >= MAX_SESSIONS:
            raise HTTPException(429, "too many open openmined-psi sessions; retry later")
        _sessions[sid] = _Session(peer, server.key, server.reveal_intersection, now)
    return sid, data


def _answer(peer: str, sid: str, body: bytes) -> bytes:
    with _lock:
        sess = _sessions.get(sid)
        if sess is None or sess.peer != peer:
            raise HTTPException(404, "no such openmined-psi session for this peer")
        del _sessions[sid]  # one request per session: a replay finds nothing
    server = worker_server(sess.key, reveal_intersection=sess.reveal)
    try:
        return server.process_request(body)
    finally:
        release_worker_server(sess.key)


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
    async def request(session: str, request: Request, caller: CurrentPeer) -> Response:
        body = await request.body()
        try:
            data = await run_in_threadpool(_answer, caller.name, session, body)
        except ProtocolError as exc:
            raise HTTPException(400, f"openmined-psi: {exc}") from None
        return Response(data, media_type="application/x-protobuf")

    return [router]


async def on_shutdown(ctx: NodeContext) -> None:
    """Stop the node's PSI worker processes (shared with the query runners)."""
    shutdown_pool()
