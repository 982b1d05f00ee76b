"""Core endpoints: health, node and peer information, and the peer link probe.

``/v1/health`` answers any authenticated TLS client. ``/v1/node`` and ``/v1/peers`` are for
the operator. Under ``/v1/peer/``: ``whoami`` (which pinned name the caller has here),
``identity`` (this node's certificate and Ed25519 key) and ``probe`` (upload or download
bytes to check a link and its throughput: digests and sizes only, no data of the node).
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.responses import StreamingResponse

from cleanroom import __version__
from cleanroom.node.context import NodeContext
from cleanroom.node.deps import CurrentPeer, NodeContextDep, OperatorAuth
from cleanroom.node.identity import format_fingerprint
from cleanroom.storage.db import redact_url

_PROBE_BLOCK = bytes(64 * 1024)


def node_summary(ctx: NodeContext) -> dict[str, Any]:
    cfg = ctx.config
    return {
        "name": cfg.name,
        "party": cfg.party,
        "listen": cfg.listen,
        "public_url": cfg.public_url,
        "certificate": str(ctx.identity.cert_path),
        "fingerprint": ctx.identity.fingerprint,
        "fingerprint_grouped": format_fingerprint(ctx.identity.fingerprint),
        "public_key_ed25519": ctx.identity.public_key_b64,
        "database_url": redact_url(cfg.database_url),
        "data_dir": str(cfg.data_dir),
        "policy_file": str(cfg.policy_file) if cfg.policy_file else None,
        "limits": {
            "max_request_bytes": cfg.limits.max_request_bytes,
            "max_upload_bytes": cfg.limits.max_upload_bytes,
            "peer_timeout_seconds": cfg.limits.peer_timeout_seconds,
            "peer_retries": cfg.limits.peer_retries,
        },
        "peers": [peer_summary(p) for p in cfg.peers],
    }


def peer_summary(p: Any) -> dict[str, Any]:
    return {
        "name": p.name,
        "party": p.party,
        "url": p.url,
        "certificate": str(p.cert_path),
        "fingerprint": p.fingerprint,
    }


def routers(ctx: NodeContext) -> list[APIRouter]:
    open_router = APIRouter(prefix="/v1", tags=["health"])
    operator = APIRouter(prefix="/v1", tags=["node (operator)"])
    peer = APIRouter(prefix="/v1/peer", tags=["peer (mutual TLS, pinned peers only)"])

    @open_router.get("/health", summary="Liveness; any authenticated TLS client")
    def health(ctx: NodeContextDep) -> dict[str, str]:
        return {
            "status": "ok",
            "node": ctx.config.name,
            "party": ctx.config.party,
            "version": __version__,
        }

    @operator.get("/node", summary="This node's identity, settings and pinned peers")
    def node_info(_op: OperatorAuth, ctx: NodeContextDep) -> dict[str, Any]:
        return node_summary(ctx)

    @operator.get("/peers", summary="Pinned peers")
    def peers(_op: OperatorAuth, ctx: NodeContextDep) -> list[dict[str, Any]]:
        return [peer_summary(p) for p in ctx.peers()]

    @peer.get("/whoami", summary="The name under which this node pinned the caller")
    def whoami(caller: CurrentPeer, ctx: NodeContextDep) -> dict[str, Any]:
        return {"you": caller.name, "node": ctx.config.name, "party": ctx.config.party}

    @peer.get("/identity", summary="This node's certificate and checkpoint-signing key")
    def identity(_caller: CurrentPeer, ctx: NodeContextDep) -> dict[str, Any]:
        return {
            "name": ctx.config.name,
            "party": ctx.config.party,
            "fingerprint": ctx.identity.fingerprint,
            "public_key_ed25519": ctx.identity.public_key_b64,
            "certificate": ctx.identity.cert_pem.decode("ascii"),
        }

    @peer.post("/probe", summary="Upload probe: returns the size and SHA-256 of the body")
    async def probe_upload(_caller: CurrentPeer, request: Request) -> dict[str, Any]:
        h = hashlib.sha256()
        n = 0
        async for chunk in request.stream():
            h.update(chunk)
            n += len(chunk)
        return {"bytes": n, "sha256": h.hexdigest()}

    @peer.get("/probe", summary="Download probe: streams the given number of zero bytes")
    def probe_download(
        _caller: CurrentPeer,
        ctx: NodeContextDep,
        size: int = Query(..., alias="bytes", ge=0),
    ) -> StreamingResponse:
        if size > ctx.config.limits.max_request_bytes:
            raise HTTPException(
                413, f"at most {ctx.config.limits.max_request_bytes} bytes per probe"
            )

        async def body() -> AsyncIterator[bytes]:
            left = size
            while left > 0:
                block = _PROBE_BLOCK[: min(left, len(_PROBE_BLOCK))]
                left -= len(block)
                yield block

        return StreamingResponse(
            body(),
            media_type="application/octet-stream",
            headers={"Content-Length": str(size)},
        )

    return [open_router, operator, peer]
