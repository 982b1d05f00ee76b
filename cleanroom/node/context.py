"""``NodeContext``: everything a running node (or a CLI command on its directory) needs.

It holds the validated configuration (re-read when ``node.toml`` changes, so a peer removed
while the node runs loses access at once), the identity, the database engine and the data
directory, and builds :class:`~cleanroom.transport.PeerClient` objects for pinned peers.
Subsystems receive it in their router factories and through the ``NodeContextDep``
dependency. It must not hold request state or cache dataset rows.
"""

from __future__ import annotations

import hmac
import logging
import os
import secrets
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import ed25519
from sqlalchemy.engine import Engine
from sqlmodel import Session

from cleanroom.errors import CleanroomError, ConfigError
from cleanroom.node.config import CONFIG_FILE, NodeConfig, PeerConfig
from cleanroom.node.identity import NodeIdentity
from cleanroom.storage.db import engine_for, init_db, session_scope
from cleanroom.transport import PeerClient

log = logging.getLogger("cleanroom.node")

ConfigListener = Callable[[NodeConfig, NodeConfig], None]


def write_operator_token(path: Path) -> str:
    """Create a new random operator token file (mode 0600); refuse to overwrite one."""
    token = secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, (token + "\n").encode("ascii"))
    finally:
        os.close(fd)
    return token


def read_operator_token(path: Path) -> str:
    try:
        token = path.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read the operator token ({exc})") from None
    if len(token) < 32:
        raise ConfigError(f"{path}: operator token is missing or too short")
    return token


class NodeContext:
    """Configuration, identity, database and data directory of one node."""

    def __init__(self, config: NodeConfig, identity: NodeIdentity, engine: Engine) -> None:
        self._config = config
        self._config_file = str(config.node_dir / CONFIG_FILE)
        self.identity = identity
        self.engine = engine
        self._lock = threading.Lock()
        self._stamp = self._config_stamp()
        self._listeners: list[ConfigListener] = []

    @classmethod
    def open(cls, node_dir: Path, *, init_database: bool = True) -> NodeContext:
        """Load ``node_dir``; with ``init_database`` also create missing tables."""
        config = NodeConfig.load(Path(node_dir))
        identity = NodeIdentity.load(config.node_dir)
        engine = engine_for(config.database_url)
        if init_database:
            try:
                init_db(engine)
            except Exception as exc:
                from cleanroom.storage.db import redact_url

                raise ConfigError(
                    f"{config.path}: key 'node.database_url': cannot use database "
                    f"{redact_url(config.database_url)}: {exc.__class__.__name__}: {exc}"
                ) from None
        config.data_dir.mkdir(parents=True, exist_ok=True)
        return cls(config, identity, engine)

    # --- configuration ------------------------------------------------------------------------

    @property
    def config(self) -> NodeConfig:
        return self._config

    @property
    def node_dir(self) -> Path:
        return self._config.node_dir

    @property
    def data_dir(self) -> Path:
        return self._config.data_dir

    def _config_stamp(self) -> tuple[int, int] | None:
        try:
            st = os.stat(self._config_file)  # a plain string path: this runs per request
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size)

    def on_config_change(self, listener: ConfigListener) -> None:
        """Call ``listener(old, new)`` after ``node.toml`` was changed and re-read."""
        self._listeners.append(listener)

    def reload_if_changed(self) -> bool:
        """Re-read ``node.toml`` if it changed on disk; keep the old one if the new is bad."""
        stamp = self._config_stamp()
        if stamp == self._stamp:
            return False
        with self._lock:
            if stamp == self._stamp:
                return False
            self._stamp = stamp
            try:
                new = NodeConfig.load(self._config.node_dir)
            except ConfigError as exc:
                log.warning("configuration change ignored: %s", exc)
                return False
            old, self._config = self._config, new
        for listener in self._listeners:
            listener(old, new)
        log.info("configuration reloaded: %d pinned peer(s)", len(new.peers))
        return True

    # --- callers --------------------------------------------------------------------------------

    def peers(self) -> tuple[PeerConfig, ...]:
        return self._config.peers

    def peer(self, name: str) -> PeerConfig:
        return self._config.peer(name)

    def peer_by_fingerprint(self, fingerprint: str) -> PeerConfig | None:
        return self._config.peer_by_fingerprint(fingerprint)

    def is_own_certificate(self, fingerprint: str | None) -> bool:
        return fingerprint is not None and hmac.compare_digest(
            fingerprint, self.identity.fingerprint
        )

    def peer_public_key(self, name: str) -> ed25519.Ed25519PublicKey:
        """The Ed25519 key a pinned peer signs its ledger checkpoints with."""
        return self.peer(name).public_key()

    def operator_token(self) -> str:
        return read_operator_token(self._config.operator_token_file)

    def check_operator_token(self, presented: str | None) -> bool:
        if not presented:
            return False
        try:
            expected = self.operator_token()
        except ConfigError:
            return False
        return hmac.compare_digest(presented.encode("utf-8"), expected.encode("utf-8"))

    # --- resources ------------------------------------------------------------------------------

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A database session that commits on success and rolls back on error."""
        with session_scope(self.engine) as s:
            yield s

    def peer_client(self, name: str, **overrides: object) -> PeerClient:
        """A mutual-TLS client for pinned peer ``name`` with this node's limits."""
        peer = self.peer(name)
        limits = self._config.limits
        kwargs: dict[str, object] = {
            "timeout": limits.peer_timeout_seconds,
            "retries": limits.peer_retries,
            "max_request_bytes": limits.max_request_bytes,
            "max_response_bytes": limits.max_request_bytes,
        }
        kwargs.update(overrides)
        try:
            return PeerClient(
                peer_name=peer.name,
                base_url=peer.url,
                peer_cert_pem=peer.cert_pem,
                peer_fingerprint=peer.fingerprint,
                own_cert_path=self.identity.cert_path,
                own_key_path=self.identity.key_path,
                **kwargs,  # type: ignore[arg-type]
            )
        except (OSError, ValueError) as exc:
            raise CleanroomError(f"peer {name!r}: cannot set up TLS ({exc})") from None

    def operator_client(self, **overrides: object) -> PeerClient:
        """A client for this node's own operator API (own certificate plus the token)."""
        host = self._config.listen_host
        if host in ("0.0.0.0", "::", ""):
            host = "127.0.0.1" if host != "::" else "::1"
        shown = f"[{host}]" if ":" in host else host
        kwargs: dict[str, object] = {"timeout": self._config.limits.peer_timeout_seconds}
        kwargs.update(overrides)
        return PeerClient(
            peer_name=f"{self._config.name} (this node)",
            base_url=f"https://{shown}:{self._config.listen_port}",
            peer_cert_pem=self.identity.cert_pem,
            own_cert_path=self.identity.cert_path,
            own_key_path=self.identity.key_path,
            bearer_token=self.operator_token(),
            **kwargs,  # type: ignore[arg-type]
        )
