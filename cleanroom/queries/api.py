"""HTTP endpoints of the query lifecycle (listed in ``ROUTER_MODULES``).

Operator (own certificate + bearer token):

- ``POST /v1/queries`` (body: the spec; ``?dry_run=true`` only asks every party's policy)
- ``GET /v1/queries[?state=&limit=&offset=]``, ``GET /v1/queries/{id}``
- ``GET /v1/queries/{id}/result`` (only at the receiver; 403 elsewhere)
- ``POST /v1/queries/{id}/approve|deny|cancel``
- ``GET /v1/queries/usage?partner=P`` (queries allowed and epsilon spent for a partner)

Peer (pinned peers over mutual TLS):

- ``POST /v1/peer/queries`` signed proposal -> signed decision
- ``POST /v1/peer/queries/{id}/decision|cancel|outcome|result`` (JSON)
- ``POST /v1/peer/queries/{id}/sessions/{session}/messages?protocol=&round=`` protocol
  bytes in, protocol bytes out; :class:`~protocols.errors.RemoteProtocolError` becomes its
  status hint (4xx)
- ``GET /v1/peer/queries/{id}/result`` only for the result's receiver (403 for others)

Startup recovers queries (:func:`orchestrator.recover`) and starts the ticker (deadlines,
outbox, proposal retries); shutdown stops both. Handlers never log bodies.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from typing import Any

from fastapi import APIRouter, HTTPException, Query, Request, Response
from starlette.concurrency import run_in_threadpool

from cleanroom.errors import InputError
from cleanroom.node.context import NodeContext
from cleanroom.node.deps import CurrentPeer, NodeContextDep, OperatorAuth, body_limit
from cleanroom.policy import parse_spec
from cleanroom.queries import orchestrator as orch
from cleanroom.queries.states import State
from cleanroom.queries.store import (
    QueryNotFound,
    TransitionRefused,
    find_query,
    get_query,
    get_result,
    list_queries,
    usage_summary,
)
from protocols.errors import ProtocolError

log = logging.getLogger("cleanroom.queries.api")

TICK_SECONDS = 0.5
_tasks: dict[int, asyncio.Task[None]] = {}


def _refused(exc: orch.PeerRefused) -> HTTPException:
    return HTTPException(exc.status, str(exc))


def _not_found(exc: QueryNotFound) -> HTTPException:
    return HTTPException(404, str(exc))


async def _json(request: Request) -> Any:
    data = await request.body()
    try:
        return json.loads(data)
    except (ValueError, UnicodeDecodeError):
        raise HTTPException(400, "the request body is not valid JSON") from None


def routers(ctx: NodeContext) -> list[APIRouter]:
    op = APIRouter(prefix="/v1/queries", tags=["queries (operator)"])
    peer = APIRouter(prefix="/v1/peer/queries", tags=["queries (peer)"])

    @op.post("", status_code=201, summary="Submit a query spec (or ?dry_run=true)")
    async def submit(
        request: Request, _op: OperatorAuth, ctx: NodeContextDep, dry_run: bool = False
    ) -> dict[str, Any]:
        body = await _json(request)
        spec = parse_spec(body if isinstance(body, dict) else b"[]", source="request body")
        if dry_run:
            return await run_in_threadpool(orch.dry_run, ctx, spec)
        row = await run_in_threadpool(orch.submit, ctx, spec)
        return orch.view(ctx, row)

    @op.get("", summary="Queries at this node, newest first")
    def list_all(
        _op: OperatorAuth,
        ctx: NodeContextDep,
        state: str | None = Query(None),
        limit: int = Query(100, ge=1, le=1000),
        offset: int = Query(0, ge=0),
    ) -> list[dict[str, Any]]:
        if state is not None and state not in {s.value for s in State}:
            raise InputError(f"parameter 'state': {state!r} is not a query state")
        return [orch.view(ctx, r, detail=False)
                for r in list_queries(ctx, state=state, limit=limit, offset=offset)]

    @op.get("/usage", summary="Queries allowed and epsilon spent for a partner")
    def usage(
        _op: OperatorAuth,
        ctx: NodeContextDep,
        partner: str = Query(..., min_length=1, max_length=64),
        hours: float = Query(24.0, gt=0),
        days: float = Query(30.0, gt=0),
    ) -> dict[str, Any]:
        return usage_summary(ctx, partner, hours, days)

    @op.get("/{query_id}", summary="One query: state, decisions, history, error")
    def show(query_id: str, _op: OperatorAuth, ctx: NodeContextDep) -> dict[str, Any]:
        try:
            return orch.view(ctx, get_query(ctx, query_id))
        except QueryNotFound as exc:
            raise _not_found(exc) from None

    @op.get("/{query_id}/result", summary="The result (only at the receiver)")
    def result(query_id: str, _op: OperatorAuth, ctx: NodeContextDep) -> dict[str, Any]:
        row = find_query(ctx, query_id)
        if row is None:
            raise HTTPException(404, f"no query {query_id!r} at this node")
        if row.receiver != ctx.config.name:
            raise HTTPException(
                403, f"the result of query {query_id} is addressed to {row.receiver}"
            )
        res = get_result(ctx, query_id)
        if res is None:
            raise HTTPException(404, f"query {query_id} is {row.state}; no result here")
        return {"query_id": query_id, "receiver": res.receiver, "digest": res.digest,
                "salt": res.salt, "rows": res.rows, "epsilon": res.epsilon,
                "result": json.loads(res.payload)}

    def _action(name: str, fn: Any) -> None:
        @op.post(f"/{{query_id}}/{name}", summary=f"{name.capitalize()} a query")
        def action(query_id: str, _op: OperatorAuth, ctx: NodeContextDep) -> dict[str, Any]:
            try:
                row = fn(ctx, query_id)
            except QueryNotFound as exc:
                raise _not_found(exc) from None
            except TransitionRefused as exc:
                raise HTTPException(409, str(exc)) from None
            return orch.view(ctx, row)

        action.__name__ = f"query_{name}"

    _action("approve", orch.approve)
    _action("deny", orch.deny)
    _action("cancel", orch.cancel)

    # --- peer --------------------------------------------------------------------------------

    @peer.post("", summary="A signed proposal; answers with this node's signed decision")
    async def proposal(request: Request, caller: CurrentPeer,
                       ctx: NodeContextDep) -> dict[str, Any]:
        body = await _json(request)
        try:
            return await run_in_threadpool(orch.on_proposal, ctx, caller.name, body)
        except orch.PeerRefused as exc:
            raise _refused(exc) from None

    def _peer_json(name: str, fn: Any) -> None:
        @peer.post(f"/{{query_id}}/{name}", summary=f"Peer {name} for a query")
        async def handler(query_id: str, request: Request, caller: CurrentPeer,
                          ctx: NodeContextDep) -> dict[str, Any]:
            body = await _json(request)
            try:
                out: dict[str, Any] = await run_in_threadpool(fn, ctx, caller.name,
                                                              query_id, body)
                return out
            except orch.PeerRefused as exc:
                raise _refused(exc) from None

        handler.__name__ = f"peer_{name}"

    _peer_json("decision", orch.on_decision)
    _peer_json("cancel", orch.on_cancel)
    _peer_json("outcome", orch.on_outcome)
    _peer_json("result", orch.on_result)

    @peer.get("/{query_id}/result", summary="The result, for its receiver only")
    def peer_result(query_id: str, caller: CurrentPeer, ctx: NodeContextDep) -> dict[str, Any]:
        try:
            res = orch.result_for_peer(ctx, caller.name, query_id)
        except orch.PeerRefused as exc:
            raise _refused(exc) from None
        return {"query_id": query_id, "receiver": res.receiver, "digest": res.digest,
                "salt": res.salt, "rows": res.rows, "result": json.loads(res.payload)}

    @peer.post(
        "/{query_id}/sessions/{session_id}/messages",
        summary="One protocol message of a session (bytes in, bytes out)",
    )
    @body_limit("upload")
    async def message(
        query_id: str,
        session_id: str,
        request: Request,
        caller: CurrentPeer,
        ctx: NodeContextDep,
        protocol: str = Query(..., min_length=1, max_length=64),
        round: str = Query("message", min_length=1, max_length=64),
    ) -> Response:
        data = await request.body()
        try:
            reply = await run_in_threadpool(orch.on_message, ctx, caller.name, query_id,
                                            session_id, protocol, round, data)
        except orch.PeerRefused as exc:
            raise _refused(exc) from None
        except ProtocolError as exc:
            status = exc.status_hint if 400 <= exc.status_hint < 500 else 400
            raise HTTPException(status, f"protocol error: {exc}") from None
        return Response(content=reply, media_type="application/octet-stream")

    return [op, peer]


async def on_startup(ctx: NodeContext) -> None:
    counts = await asyncio.to_thread(orch.recover, ctx)
    if any(counts.values()):
        log.info("queries after restart: %s", counts)

    async def ticker() -> None:
        while True:
            await asyncio.sleep(TICK_SECONDS)
            try:
                await asyncio.to_thread(orch.tick, ctx)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("query ticker failed")

    _tasks[id(ctx)] = asyncio.get_running_loop().create_task(ticker())


async def on_shutdown(ctx: NodeContext) -> None:
    task = _tasks.pop(id(ctx), None)
    if task is not None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    orch.shutdown(ctx)
