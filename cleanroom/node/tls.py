"""Server-side TLS: the SSL context and how the client certificate reaches the ASGI app.

The server requires a client certificate and trusts only pinned peer certificates plus the
node's own (used by the local operator). When a peer is pinned while the node runs, its
certificate is added to the live context (``node.toml`` is re-checked on every ClientHello,
through the SNI callback, so the new peer's first handshake already succeeds); removal
cannot be undone in OpenSSL's store, so authorisation is decided per request by exact
fingerprint (a removed peer gets 403).

uvicorn does not put the client certificate into the ASGI scope.
``ClientCertHttpToolsProtocol`` (passed to uvicorn as ``http=``; ``ClientCertH11Protocol``
is its pure-Python twin) reads it from the connection's ``ssl_object`` once per connection
and wraps the app so every request scope carries the ASGI TLS extension
(``scope["extensions"]["tls"]["client_cert_chain"]``) and the certificate's SHA-256
fingerprint under ``scope["cleanroom.client_fingerprint"]``.
This module decides nothing about authorisation; see ``cleanroom.node.deps``.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import ssl
from collections.abc import Iterable
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from cleanroom.node.config import NodeConfig
from cleanroom.node.context import NodeContext

FINGERPRINT_KEY = "cleanroom.client_fingerprint"
log = logging.getLogger("cleanroom.node")
_TLS13 = 0x0304
COALESCE_BYTES = 65536


def server_ssl_context(ctx: NodeContext) -> ssl.SSLContext:
    """TLS 1.3 only, client certificate required, trust = own cert + pinned peers."""
    sslctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    sslctx.minimum_version = ssl.TLSVersion.TLSv1_3
    sslctx.load_cert_chain(str(ctx.identity.cert_path), str(ctx.identity.key_path))
    sslctx.verify_mode = ssl.CERT_REQUIRED
    _trust(sslctx, [ctx.identity.cert_pem, *(p.cert_pem for p in ctx.peers())])

    def added(old: NodeConfig, new: NodeConfig) -> None:
        before = {p.fingerprint for p in old.peers}
        _trust(sslctx, [p.cert_pem for p in new.peers if p.fingerprint not in before])

    ctx.on_config_change(added)

    def on_client_hello(_sock: object, _server_name: str | None, _ctx: ssl.SSLContext) -> None:
        # Runs for every ClientHello, before the client certificate is verified: pick up
        # peers pinned since the last request so that their very first handshake succeeds.
        try:
            ctx.reload_if_changed()
        except Exception:  # never abort a handshake because of a reload problem
            log.exception("configuration reload failed")

    sslctx.sni_callback = on_client_hello
    return sslctx


def _trust(sslctx: ssl.SSLContext, pems: Iterable[bytes]) -> None:
    data = "".join(p.decode("ascii") for p in pems)
    if data:
        sslctx.load_verify_locations(cadata=data)


def _with_client_cert(transport: asyncio.Transport, inner: Any) -> Any:
    """``inner`` (the ASGI app) wrapped so each request scope carries the client certificate."""
    ssl_object = transport.get_extra_info("ssl_object")
    der: bytes | None = None
    if ssl_object is not None:
        der = ssl_object.getpeercert(True)
    fingerprint = hashlib.sha256(der).hexdigest() if der else None
    tls: dict[str, Any] = {
        "server_cert": None,
        "client_cert_chain": [ssl.DER_cert_to_PEM_cert(der)] if der else [],
        "client_cert_name": None,
        "client_cert_error": None,
        "tls_version": _TLS13 if ssl_object is not None else None,
        "cipher_suite": None,
    }

    async def app(scope: Any, receive: Any, send: Any) -> None:
        scope.setdefault("extensions", {})["tls"] = tls
        scope[FINGERPRINT_KEY] = fingerprint
        await inner(scope, receive, send)

    return app


class ClientCertH11Protocol(H11Protocol):
    """uvicorn's h11 protocol, plus the verified client certificate in every request scope."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.app = _with_client_cert(transport, self.app)


class CoalescingTransport:
    """A transport whose writes of one event-loop turn leave as one ``write``.

    uvicorn writes a response's status line and headers, then its body, as two calls; on a
    TLS transport each call is a TLS record and a ``send`` syscall of its own. Writes are
    joined here and handed to the real transport at the end of the turn (``call_soon``),
    or at once when they reach ``COALESCE_BYTES`` (so a large body meets flow control as
    before) and before a close or ``write_eof``.
    Everything else is the wrapped transport's.
    """

    def __init__(self, inner: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._inner = inner
        self._loop = loop
        self._pending: list[bytes] = []
        self._size = 0

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not data:
            return
        if not self._pending:
            self._loop.call_soon(self.flush)
        self._pending.append(bytes(data))
        self._size += len(data)
        if self._size >= COALESCE_BYTES:  # large writes go now, so flow control sees them
            self.flush()

    def writelines(self, lines: Iterable[bytes | bytearray | memoryview]) -> None:
        for data in lines:
            self.write(data)

    def flush(self) -> None:
        if not self._pending:
            return
        data = self._pending[0] if len(self._pending) == 1 else b"".join(self._pending)
        self._pending, self._size = [], 0
        if not self._inner.is_closing():
            self._inner.write(data)

    def close(self) -> None:
        self.flush()
        self._inner.close()

    def write_eof(self) -> None:
        self.flush()
        self._inner.write_eof()

    def get_write_buffer_size(self) -> int:
        return self._inner.get_write_buffer_size() + self._size

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


class ClientCertHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol (C parser), plus the client certificate per request, and
    a response's header and body writes joined into one TLS write
    (:class:`CoalescingTransport`)."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(
            CoalescingTransport(transport, asyncio.get_running_loop())  # type: ignore[arg-type]
        )
        self.app = _with_client_cert(transport, self.app)
