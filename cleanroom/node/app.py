"""The node's FastAPI application and the one place subsystems plug their routers in.

To add endpoints, write a module with ``def routers(ctx: NodeContext) -> list[APIRouter]``
and add its dotted name to :data:`ROUTER_MODULES`. Peer endpoints go under ``/v1/peer/``
(use the ``CurrentPeer`` dependency), operator endpoints under ``/v1/`` (``OperatorAuth``).
A module may also define ``async def on_startup(ctx)`` / ``async def on_shutdown(ctx)``,
and ``def direct_routes(ctx) -> list[DirectRoute]``: hot peer endpoints (many small
requests a second) that :class:`NodeGuard` serves itself, skipping FastAPI's routing,
dependency solving and middleware (about half of a small request's server CPU). A direct
endpoint is ``async def endpoint(request, caller, **path_params) -> Response`` for a pinned
peer ``caller``; it gets the same request id, access rules, body limit and error mapping
(:func:`error_response`) as every other endpoint, but no OpenAPI entry (docs/api.md lists
them), and its successful requests are counted in the access log's periodic summary
(:class:`AccessSummary`) instead of one line each.

Every request passes :class:`NodeGuard` first: it assigns the request id (taken from a
well-formed ``X-Request-ID`` or generated, echoed on the response), applies the access
rules of :mod:`cleanroom.node.deps`, enforces the request body limit (413) and writes one
access log line (request id, caller, method, path, status: no query strings, headers or
bodies; direct routes: one summary line per interval for their 2xx/3xx requests, one line
each for the rest). Errors are JSON ``{"error": {"code", "message", "request_id", ...}}``;
bad input is a 4xx, never a 500.
"""

from __future__ import annotations

import importlib
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import BaseRoute, Match

from cleanroom import __version__
from cleanroom.errors import CleanroomError, ConfigError, InputError
from cleanroom.node.config import PeerConfig
from cleanroom.node.context import NodeContext
from cleanroom.node.deps import (
    BODY_LIMIT_ATTR,
    CALLER_KEY,
    REQUEST_ID_KEY,
    Denied,
    Operator,
    authorize,
)
from cleanroom.transport import REQUEST_ID_HEADER, PeerCallError

# Modules that contribute routers, in order. Add yours here.
ROUTER_MODULES: tuple[str, ...] = (
    "cleanroom.node.api_core",
    "cleanroom.node.api_datasets",
    "cleanroom.node.api_ledger",
    "cleanroom.queries.api",
    "cleanroom.anonq.api",
    "cleanroom.node.api_openmined",
)

log = logging.getLogger("cleanroom.node")
access_log = logging.getLogger("cleanroom.node.access")

_RID = re.compile(r"[A-Za-z0-9._-]{8,128}")
Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class _BodyTooLarge(Exception):
    pass


def error_body(status: int, code: str, message: str, rid: str, **extra: Any) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, "request_id": rid, **extra}}


@dataclass(frozen=True)
class DirectRoute:
    """A peer endpoint :class:`NodeGuard` serves without FastAPI (see the module docstring).

    ``path`` is a template such as ``/v1/peer/anonq/tables/{name}/eval``: each ``{param}``
    matches one path segment and is passed to ``endpoint`` by keyword."""

    method: str
    path: str
    endpoint: Callable[..., Awaitable[Response]]
    body_limit: int
    summary: str = ""

    def pattern(self) -> re.Pattern[str]:
        if not self.path.startswith("/v1/peer/"):
            raise ValueError(f"direct route {self.path}: only peer endpoints can be direct")
        parts = re.split(r"\{([A-Za-z_][A-Za-z0-9_]*)\}", self.path)
        regex = "".join(
            re.escape(p) if i % 2 == 0 else f"(?P<{p}>[^/]+)" for i, p in enumerate(parts)
        )
        return re.compile(regex)


class AccessSummary:
    """The access log of direct routes' successful requests: counted per (caller, method,
    path, status) and written as one ``access summary`` line per ``interval`` seconds
    (when a request ends after the interval, and at shutdown), with each key's count and
    mean and maximum duration. At DEBUG level every request also gets its own line.
    Real-time lookups run at hundreds of requests a second: a line each would be most of
    the log (a benchmark node wrote 31 MB in two minutes) and a write syscall each
    (~25 µs of CPU, and the event loop gives up the GIL for it). Failures keep their own
    line (:class:`NodeGuard`), and the ledger records every session."""

    def __init__(self, interval: float = 10.0) -> None:
        self.interval = interval
        self._since = time.monotonic()
        self._counts: dict[tuple[str, str, str, int], list[float]] = {}

    def add(self, caller: str, method: str, path: str, status: int, ms: float) -> None:
        key = (caller, method, path, status)
        hit = self._counts.get(key)
        if hit is None:
            self._counts[key] = [1, ms, ms]
        else:
            hit[0] += 1
            hit[1] += ms
            if ms > hit[2]:
                hit[2] = ms
        if time.monotonic() - self._since >= self.interval:
            self.flush()

    def flush(self) -> None:
        """Write the summary line of what was counted so far (nothing if nothing was)."""
        now = time.monotonic()
        counts, self._counts = self._counts, {}
        seconds, self._since = now - self._since, now
        if not counts:
            return
        parts = [
            f"{caller} {method} {path} {status} x{int(n)} (mean {total / n:.1f}ms, "
            f"max {worst:.1f}ms)"
            for (caller, method, path, status), (n, total, worst) in sorted(counts.items())
        ]
        access_log.info("access summary, %d requests in %.1fs: %s",
                        int(sum(v[0] for v in counts.values())), seconds, "; ".join(parts))


class NodeGuard:
    """Request id, access control, body size limit and access log, as plain ASGI."""

    def __init__(self, app: ASGIApp, ctx: NodeContext, large_routes: list[tuple[BaseRoute, int]],
                 direct_routes: Sequence[DirectRoute] = (),
                 summary: AccessSummary | None = None):
        self.app = app
        self.ctx = ctx
        self.large_routes = large_routes
        self.summary = summary if summary is not None else AccessSummary()
        self.direct: dict[str, list[tuple[re.Pattern[str], DirectRoute]]] = {}
        for route in direct_routes:
            self.direct.setdefault(route.method.upper(), []).append((route.pattern(), route))

    def _direct_for(self, scope: Scope) -> tuple[DirectRoute, dict[str, str]] | None:
        for pattern, route in self.direct.get(scope.get("method", ""), ()):
            m = pattern.fullmatch(scope.get("path", ""))
            if m is not None:
                return route, m.groupdict()
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        rid = _request_id(scope)
        scope[REQUEST_ID_KEY] = rid
        self.ctx.reload_if_changed()
        caller = authorize(self.ctx, scope)
        scope[CALLER_KEY] = caller
        status_box = [0]
        response_started = [False]
        direct: tuple[DirectRoute, dict[str, str]] | None = None

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                response_started[0] = True
                status_box[0] = message["status"]
                headers = list(message.get("headers", []))
                headers.append((REQUEST_ID_HEADER.lower().encode(), rid.encode()))
                message["headers"] = headers
            await send(message)

        try:
            if isinstance(caller, Denied):
                await _send_json(
                    send_with_id,
                    caller.status,
                    error_body(caller.status, caller.code, caller.message, rid),
                )
                return
            direct = self._direct_for(scope)
            limit = direct[0].body_limit if direct is not None else self._limit_for(scope)
            declared = _content_length(scope)
            if declared is not None and declared > limit:
                await _send_json(send_with_id, 413, _too_large(limit, rid))
                return
            exceeded = [False]
            received = [0]

            async def limited_receive() -> Message:
                message = await receive()
                if message["type"] == "http.request":
                    received[0] += len(message.get("body", b""))
                    if received[0] > limit:
                        exceeded[0] = True
                        raise _BodyTooLarge
                return message

            async def guarded_send(message: Message) -> None:
                if exceeded[0]:
                    return  # the app's reply to a truncated body is replaced by the 413
                await send_with_id(message)

            try:
                if direct is not None:
                    await _serve_direct(direct[0], direct[1], scope, limited_receive,
                                        guarded_send)
                else:
                    await self.app(scope, limited_receive, guarded_send)
            except Exception:
                if not exceeded[0]:
                    raise
            if exceeded[0] and not response_started[0]:
                await _send_json(send_with_id, 413, _too_large(limit, rid))
        finally:
            ms = (time.perf_counter() - started) * 1000
            status = status_box[0]
            who = _caller_label(caller)
            method, path = scope.get("method", "-"), scope.get("path", "-")
            if direct is not None and 200 <= status < 400:
                self.summary.add(who, method, path, status, ms)
                level = logging.DEBUG  # the summary holds it; one line each only at DEBUG
            else:
                level = logging.INFO
            if access_log.isEnabledFor(level):
                access_log.log(level, "%s %s %s %s %d %.1fms", rid, who, method, path,
                               status, ms)

    def _limit_for(self, scope: Scope) -> int:
        limits = self.ctx.config.limits
        for route, limit in self.large_routes:
            match, _ = route.matches(scope)
            if match == Match.FULL:
                return limit
        return limits.max_request_bytes


def _request_id(scope: Scope) -> str:
    for key, value in scope.get("headers", []):
        if key == REQUEST_ID_HEADER.lower().encode():
            text = value.decode("latin-1")
            if _RID.fullmatch(text):
                return text
            break
    return uuid.uuid4().hex


def _content_length(scope: Scope) -> int | None:
    for key, value in scope.get("headers", []):
        if key == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


def _too_large(limit: int, rid: str) -> dict[str, Any]:
    return error_body(
        413, "too_large", f"request body exceeds this endpoint's limit of {limit} bytes", rid
    )


def _caller_label(caller: object) -> str:
    if isinstance(caller, PeerConfig):
        return f"peer:{caller.name}"
    if isinstance(caller, Operator):
        return "operator"
    if isinstance(caller, Denied):
        return f"denied:{caller.code}"
    return "client"


async def _send_json(send: Send, status: int, body: dict[str, Any]) -> None:
    import json

    data = json.dumps(body).encode("utf-8")
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(data)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": data})


def _rid(request: Request) -> str:
    rid: str = request.scope.get(REQUEST_ID_KEY, "")
    return rid


def error_response(rid: str, exc: Exception) -> JSONResponse:
    """The JSON error reply for ``exc``: bad input 400, refusals 409, HTTP errors as raised,
    validation 422, a peer's failure 502; anything unexpected 500 (logged)."""
    if isinstance(exc, InputError):
        extra = {k: v for k, v in (("column", exc.column), ("row", exc.row)) if v is not None}
        return JSONResponse(error_body(400, "input_error", str(exc), rid, **extra),
                            status_code=400)
    if isinstance(exc, PeerCallError):
        return JSONResponse(error_body(502, "peer_call_failed", str(exc), rid, peer=exc.peer),
                            status_code=502)
    if isinstance(exc, ConfigError):
        log.error("configuration problem while serving %s: %s", rid, exc)
        return JSONResponse(
            error_body(500, "node_config", "node configuration problem; see the node log", rid),
            status_code=500,
        )
    if isinstance(exc, CleanroomError):
        return JSONResponse(error_body(409, "refused", str(exc), rid), status_code=409)
    if isinstance(exc, StarletteHTTPException):
        code = {401: "unauthorized", 403: "forbidden", 404: "not_found", 405: "bad_method"}.get(
            exc.status_code, f"http_{exc.status_code}"
        )
        return JSONResponse(
            error_body(exc.status_code, code, str(exc.detail), rid),
            status_code=exc.status_code,
            headers=getattr(exc, "headers", None),
        )
    if isinstance(exc, RequestValidationError):
        problems = []
        for err in exc.errors()[:10]:
            loc = ".".join(str(x) for x in err.get("loc", ()))
            problems.append(f"{loc}: {err.get('msg', 'invalid')}")
        return JSONResponse(
            error_body(422, "invalid_request", "; ".join(problems) or "invalid request", rid),
            status_code=422,
        )
    log.error("unexpected error in request %s", rid, exc_info=exc)
    return JSONResponse(
        error_body(500, "internal", "internal error; see the node log", rid), status_code=500
    )


def _install_error_handlers(app: FastAPI) -> None:
    async def handler(request: Request, exc: Exception) -> JSONResponse:
        return error_response(_rid(request), exc)

    for kind in (InputError, PeerCallError, ConfigError, CleanroomError,
                 StarletteHTTPException, RequestValidationError, Exception):
        app.add_exception_handler(kind, handler)


async def _serve_direct(route: DirectRoute, params: dict[str, str], scope: Scope,
                        receive: Receive, send: Send) -> None:
    request = Request(scope, receive)
    caller = scope.get(CALLER_KEY)
    try:
        if not isinstance(caller, PeerConfig):  # authorize() already refused others
            raise StarletteHTTPException(403, "peer endpoints are for pinned peers only")
        response = await route.endpoint(request, caller, **params)
    except _BodyTooLarge:
        raise
    except Exception as exc:
        response = error_response(scope.get(REQUEST_ID_KEY, ""), exc)
    await response(scope, receive, send)


def create_app(ctx: NodeContext) -> FastAPI:
    """Build the node's app: all registered routers behind :class:`NodeGuard`."""
    modules = [importlib.import_module(name) for name in ROUTER_MODULES]
    summary = AccessSummary()

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        for m in modules:
            hook = getattr(m, "on_startup", None)
            if hook is not None:
                await hook(ctx)
        yield
        summary.flush()
        for m in reversed(modules):
            hook = getattr(m, "on_shutdown", None)
            if hook is not None:
                await hook(ctx)

    app = FastAPI(
        title=f"cleanroom node {ctx.config.name} ({ctx.config.party})",
        version=__version__,
        description=(
            "Operator API of one clean-room node (`/v1/...`, own certificate plus "
            "`Authorization: Bearer <operator token>`) and the peer API (`/v1/peer/...`, "
            "pinned peers over mutual TLS). No endpoint returns dataset rows to peers."
        ),
        lifespan=lifespan,
    )
    app.state.node_context = ctx
    for m in modules:
        for router in m.routers(ctx):
            app.include_router(router)
    _install_error_handlers(app)
    large: list[tuple[BaseRoute, int]] = []
    for route in app.routes:
        marker = getattr(getattr(route, "endpoint", None), BODY_LIMIT_ATTR, None)
        if marker is not None:
            limit = ctx.config.limits.max_upload_bytes if marker == "upload" else int(marker)
            large.append((route, limit))
    direct: list[DirectRoute] = []
    for m in modules:
        hook = getattr(m, "direct_routes", None)
        if hook is not None:
            direct.extend(hook(ctx))
    app.add_middleware(NodeGuard, ctx=ctx, large_routes=large, direct_routes=direct,
                       summary=summary)
    return app
