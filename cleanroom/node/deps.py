"""Who is calling, and the dependencies routers use: ``NodeContextDep``, ``CurrentPeer``,
``OperatorAuth``, ``DbSession``, ``RequestId``.

Access rules (checked by the app's guard middleware for every request, and again by these
dependencies, so a router cannot forget them):

- ``/v1/health``: any client that completed the TLS handshake (own cert or a pinned peer).
- ``/v1/peer/...``: only a currently pinned peer (exact certificate fingerprint); 403 else.
- everything else (``/v1/...``, ``/docs``, ``/openapi.json``): the operator, i.e. the node's
  own certificate; 403 for peers. ``/v1/...`` also needs ``Authorization: Bearer <token>``
  (401 if missing or wrong); the docs pages need only the certificate.

This module must not read request bodies or log header values (the token is a secret).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, MutableMapping
from dataclasses import dataclass
from typing import Annotated, Any, Literal, TypeVar

from fastapi import Depends, HTTPException, Request
from sqlmodel import Session

from cleanroom.node.config import PeerConfig
from cleanroom.node.context import NodeContext
from cleanroom.node.tls import FINGERPRINT_KEY

HEALTH_PATH = "/v1/health"
PEER_PREFIX = "/v1/peer/"
API_PREFIX = "/v1/"
REQUEST_ID_KEY = "cleanroom.request_id"
CALLER_KEY = "cleanroom.caller"
BODY_LIMIT_ATTR = "__cleanroom_body_limit__"

Zone = Literal["open", "peer", "operator"]


@dataclass(frozen=True)
class Operator:
    """The local operator (own certificate + operator token)."""

    request_id: str


@dataclass(frozen=True)
class Denied:
    status: int
    code: str
    message: str


def zone_of(path: str) -> Zone:
    if path == HEALTH_PATH:
        return "open"
    if path.startswith(PEER_PREFIX) or path == PEER_PREFIX.rstrip("/"):
        return "peer"
    return "operator"


def bearer_token(headers: list[tuple[bytes, bytes]]) -> str | None:
    for key, value in headers:
        if key == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
            return None
    return None


def authorize(
    ctx: NodeContext, scope: MutableMapping[str, Any]
) -> PeerConfig | Operator | Denied | None:
    """Decide a request: the caller (peer or operator), ``None`` for open paths, or Denied."""
    path: str = scope.get("path", "")
    fingerprint: str | None = scope.get(FINGERPRINT_KEY)
    rid: str = scope.get(REQUEST_ID_KEY, "")
    zone = zone_of(path)
    if fingerprint is None:
        return Denied(401, "no_client_certificate", "a client certificate is required")
    own = ctx.is_own_certificate(fingerprint)
    peer = None if own else ctx.peer_by_fingerprint(fingerprint)
    if zone == "open":
        if own or peer is not None:
            return None
        return Denied(403, "not_pinned", "this certificate is not pinned by this node")
    if zone == "peer":
        if peer is not None:
            return peer
        if own:
            return Denied(403, "not_a_peer", "peer endpoints are for pinned peers, not operators")
        return Denied(403, "not_pinned", "this certificate is not pinned as a peer of this node")
    if not own:
        return Denied(
            403, "operator_only", "operator endpoints are refused to peers and other clients"
        )
    if path.startswith(API_PREFIX) and not ctx.check_operator_token(
        bearer_token(scope.get("headers", []))
    ):
        return Denied(401, "bad_token", "missing or wrong operator token (Authorization: Bearer)")
    return Operator(request_id=rid)


# --- dependencies -------------------------------------------------------------------------------
# The non-blocking ones are ``async def``: FastAPI runs a plain ``def`` dependency in a worker
# thread, a hop that cost more than the whole check on every request.


async def get_node_context(request: Request) -> NodeContext:
    ctx: NodeContext = request.app.state.node_context
    return ctx


NodeContextDep = Annotated[NodeContext, Depends(get_node_context)]


async def get_request_id(request: Request) -> str:
    rid: str = request.scope.get(REQUEST_ID_KEY, "")
    return rid


RequestId = Annotated[str, Depends(get_request_id)]


def _decide(request: Request, ctx: NodeContext) -> PeerConfig | Operator | None:
    caller = request.scope.get(CALLER_KEY)
    if caller is None or isinstance(caller, Denied):
        caller = authorize(ctx, request.scope)
    if isinstance(caller, Denied):
        raise HTTPException(caller.status, caller.message)
    return caller


async def current_peer(request: Request, ctx: NodeContextDep) -> PeerConfig:
    """The pinned peer making this request (403 for anyone else)."""
    caller = _decide(request, ctx)
    if not isinstance(caller, PeerConfig):
        raise HTTPException(403, "peer endpoints are for pinned peers only")
    # Re-check against the live configuration: a peer removed meanwhile is refused.
    if ctx.peer_by_fingerprint(caller.fingerprint) is None:
        raise HTTPException(403, "this certificate is no longer pinned as a peer")
    return caller


CurrentPeer = Annotated[PeerConfig, Depends(current_peer)]


async def operator_auth(request: Request, ctx: NodeContextDep) -> Operator:
    """The local operator (own certificate and operator token), else 401/403."""
    caller = _decide(request, ctx)
    if not isinstance(caller, Operator):
        raise HTTPException(403, "operator endpoints are refused to peers")
    return caller


OperatorAuth = Annotated[Operator, Depends(operator_auth)]


def db_session(ctx: NodeContextDep) -> Iterator[Session]:
    """A session per request: committed if the endpoint returns, rolled back if it raises."""
    with ctx.session() as s:
        yield s


DbSession = Annotated[Session, Depends(db_session)]

F = TypeVar("F", bound=Callable[..., Any])


def body_limit(limit: int | Literal["upload"]) -> Callable[[F], F]:
    """Mark an endpoint as accepting bodies up to ``limit`` bytes (``"upload"``: the node's
    ``limits.max_upload_bytes``) instead of ``limits.max_request_bytes``."""

    def mark(fn: F) -> F:
        setattr(fn, BODY_LIMIT_ATTR, limit)
        return fn

    return mark
