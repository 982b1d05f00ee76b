"""``cleanroom node start``: run the node's HTTPS service on uvicorn until SIGTERM/SIGINT.

The listening socket is bound before anything else starts, so a taken port or a bad
address fails at once with a message naming the address. SIGTERM stops accepting new
connections, lets running requests finish (up to 10 s) and exits with status 0.
This module wires things together; it holds no request logic.
"""

from __future__ import annotations

import errno
import logging
import signal
import socket
import sys
from pathlib import Path
from types import FrameType

import uvicorn

from cleanroom.errors import CleanroomError
from cleanroom.node.app import create_app
from cleanroom.node.context import NodeContext
from cleanroom.node.tls import ClientCertHttpToolsProtocol, server_ssl_context

log = logging.getLogger("cleanroom.node")
GRACEFUL_SECONDS = 10


def bind_listen(host: str, port: int, *, config_path: Path | None = None) -> socket.socket:
    """Bind and listen on ``host:port`` or raise :class:`CleanroomError` naming it."""
    shown = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP explicitly: asyncio sets TCP_NODELAY on accepted connections only when
    # the listening socket says it is TCP; with protocol 0 every small reply waited ~40 ms
    # for the client's delayed ACK (Nagle).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(1024)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            reason = "the address is already in use (another node or program listens there)"
        elif exc.errno == errno.EADDRNOTAVAIL:
            reason = "this host has no such address"
        elif exc.errno == errno.EACCES:
            reason = "permission denied (ports below 1024 need privileges)"
        else:
            reason = exc.strerror or str(exc)
        where = f"; change [node] listen in {config_path}" if config_path else ""
        raise CleanroomError(f"cannot listen on {shown}: {reason}{where}") from None
    return sock


class _NodeServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, ctx: NodeContext) -> None:
        super().__init__(config)
        self.ctx = ctx

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        if not self.should_exit:
            cfg = self.ctx.config
            log.info(
                "node %s (%s) listening on https://%s, fingerprint %s, %d pinned peer(s)",
                cfg.name,
                cfg.party,
                cfg.listen,
                self.ctx.identity.fingerprint,
                len(cfg.peers),
            )

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        super().handle_exit(sig, frame)
        if sig == signal.SIGTERM:
            # A graceful stop on SIGTERM is a normal exit: do not re-raise it afterwards.
            self._captured_signals = [s for s in self._captured_signals if s != signal.SIGTERM]
            log.info("SIGTERM received: finishing running requests, then stopping")


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def serve(node_dir: Path, *, log_level: str = "info") -> int:
    """Run the node in ``node_dir`` in the foreground; return the exit status."""
    _setup_logging(log_level)
    ctx = NodeContext.open(Path(node_dir))
    sock = bind_listen(ctx.config.listen_host, ctx.config.listen_port, config_path=ctx.config.path)
    try:
        app = create_app(ctx)
        sslctx = server_ssl_context(ctx)
        config = uvicorn.Config(
            app,
            http=ClientCertHttpToolsProtocol,
            loop="uvloop",
            ssl_context_factory=lambda _cfg, _default: sslctx,
            lifespan="on",
            access_log=False,
            log_config=None,
            log_level=log_level,
            proxy_headers=False,
            server_header=False,
            timeout_graceful_shutdown=GRACEFUL_SECONDS,
        )
        server = _NodeServer(config, ctx)
        server.run(sockets=[sock])
    except OSError as exc:
        raise CleanroomError(f"node stopped: {exc}") from None
    finally:
        sock.close()
        ctx.engine.dispose()
    log.info("node %s stopped", ctx.config.name)
    return 0
