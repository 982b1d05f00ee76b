"""``NODE_DIR/node.toml``: the node's configuration, validated on every load.

Layout::

    [node]
    name = "oem"                      # this node's name, as partners pin it
    party = "oem"                     # oem | media | dealer
    listen = "0.0.0.0:8443"           # HOST:PORT the HTTPS service binds
    public_url = "https://oem.example.com:8443"   # optional: what partners connect to
    database_url = "sqlite:///node.db"  # SQLAlchemy URL; relative SQLite paths are in NODE_DIR
    data_dir = "data"                 # bulk data (Parquet), relative to NODE_DIR
    policy_file = "policy.toml"       # optional
    operator_token_file = "operator.token"

    [limits]                          # optional, defaults shown by `node show`
    max_request_bytes = 67108864
    max_upload_bytes = 4294967296
    peer_timeout_seconds = 60.0
    peer_retries = 2

    [ledger]                          # optional
    witness_interval_seconds = 300    # cross-party witnessing timer; 0 turns it off

    [[peers]]
    name = "media"
    party = "media"
    url = "https://media.example.com:8443"
    cert = "peers/media.pem"
    fingerprint = "<sha256 of the DER certificate, 64 hex digits>"

Every problem raises :class:`~cleanroom.errors.ConfigError` naming the file, the line (when
it can be found) and the key. This module reads and writes configuration only; it must not
open network connections or databases.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import tomli_w
from cryptography.hazmat.primitives.asymmetric import ed25519

from cleanroom.errors import ConfigError
from cleanroom.node.identity import (
    cert_fingerprint,
    ed25519_public_key,
    load_cert_pem,
    normalize_fingerprint,
)
from cleanroom.storage.db import resolve_database_url

CONFIG_FILE = "node.toml"
PARTIES: tuple[str, ...] = ("oem", "media", "dealer")
NAME_RE = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")

_NODE_KEYS = {
    "name",
    "party",
    "listen",
    "public_url",
    "database_url",
    "data_dir",
    "policy_file",
    "operator_token_file",
}
_PEER_KEYS = {"name", "party", "url", "cert", "fingerprint"}


@dataclass(frozen=True)
class Limits:
    """Size and time bounds for requests this node serves and calls it makes."""

    max_request_bytes: int = 64 * 1024 * 1024
    max_upload_bytes: int = 4 * 1024 * 1024 * 1024
    peer_timeout_seconds: float = 60.0
    peer_retries: int = 2


@dataclass(frozen=True)
class LedgerSettings:
    """Audit-ledger settings: how often this node witnesses its peers' ledgers."""

    witness_interval_seconds: float = 300.0


@dataclass(frozen=True)
class PeerConfig:
    """A pinned partner node: only a client presenting exactly this certificate is it."""

    name: str
    url: str
    cert_path: Path
    fingerprint: str
    party: str | None
    cert_pem: bytes = field(repr=False)

    def public_key(self) -> ed25519.Ed25519PublicKey:
        """The peer's Ed25519 key (it signs the peer's ledger checkpoints)."""
        return ed25519_public_key(load_cert_pem(self.cert_pem), source=str(self.cert_path))


@dataclass(frozen=True)
class NodeConfig:
    """A validated ``node.toml``. Paths are absolute; the database URL is resolved."""

    path: Path
    node_dir: Path
    name: str
    party: str
    listen_host: str
    listen_port: int
    public_url: str | None
    database_url: str
    data_dir: Path
    policy_file: Path | None
    operator_token_file: Path
    limits: Limits
    peers: tuple[PeerConfig, ...]
    ledger: LedgerSettings = field(default_factory=LedgerSettings)

    @property
    def listen(self) -> str:
        host = f"[{self.listen_host}]" if ":" in self.listen_host else self.listen_host
        return f"{host}:{self.listen_port}"

    def peer(self, name: str) -> PeerConfig:
        for p in self.peers:
            if p.name == name:
                return p
        known = ", ".join(p.name for p in self.peers) or "none"
        raise ConfigError(f"{self.path}: no peer named {name!r} (pinned peers: {known})")

    def peer_by_fingerprint(self, fingerprint: str) -> PeerConfig | None:
        for p in self.peers:
            if p.fingerprint == fingerprint:
                return p
        return None

    @classmethod
    def load(cls, node_dir: Path) -> NodeConfig:
        path = Path(node_dir) / CONFIG_FILE
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ConfigError(
                f"{path}: not found; run `cleanroom node init --dir {node_dir}` first"
            ) from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path}: cannot read ({exc})") from None
        return parse_config(text, path)


def parse_listen(value: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` for IPv6) -> (host, port). Raises ValueError."""
    host, sep, port_text = value.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"expected HOST:PORT with a port from 1 to 65535, got {value!r}")
    return host, int(port_text)


def check_peer_url(value: str) -> str:
    parts = urlsplit(value)
    if parts.scheme != "https" or not parts.hostname or parts.path not in ("", "/"):
        raise ValueError(f"expected https://HOST:PORT, got {value!r}")
    try:
        _ = parts.port
    except ValueError:
        raise ValueError(f"expected https://HOST:PORT, got {value!r}") from None
    return value.rstrip("/")


def _line_of(text: str, table: str, key: str, index: int = 0) -> int | None:
    """Best-effort line number of ``key`` in ``[table]`` (the ``index``-th ``[[table]]``)."""
    current = ""
    seen = -1
    for number, line in enumerate(text.splitlines(), start=1):
        s = line.strip()
        if s.startswith("[["):
            current = s.strip("[] ")
            if current == table:
                seen += 1
            continue
        if s.startswith("["):
            current = s.strip("[] ")
            seen = 0 if current == table else -1
            continue
        if current == table and seen == index and re.match(rf"{re.escape(key)}\s*=", s):
            return number
    return None


def parse_config(text: str, path: Path) -> NodeConfig:
    """Validate ``text`` (the contents of ``path``) into a :class:`NodeConfig`."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    node_dir = path.parent.resolve()

    def fail(table: str, key: str, message: str, index: int = 0) -> ConfigError:
        line = _line_of(text, table, key, index)
        where = f"line {line}: " if line else ""
        dotted = f"{table}[{index}].{key}" if table == "peers" else f"{table}.{key}"
        return ConfigError(f"{path}: {where}key {dotted!r}: {message}")

    unknown_top = set(raw) - {"node", "limits", "ledger", "peers"}
    if unknown_top:
        bad = sorted(unknown_top)[0]
        raise ConfigError(
            f"{path}: unknown top-level key {bad!r} (expected node, limits, ledger, peers)"
        )
    node = raw.get("node")
    if not isinstance(node, dict):
        raise ConfigError(f"{path}: missing the [node] table")
    for key in node:
        if key not in _NODE_KEYS:
            raise fail(
                "node", key, f"unknown key (expected one of {', '.join(sorted(_NODE_KEYS))})"
            )

    def text_value(key: str, *, required: bool, default: str | None = None) -> str | None:
        if key not in node:
            if required:
                raise ConfigError(f"{path}: [node]: required key {key!r} is missing")
            return default
        value = node[key]
        if not isinstance(value, str) or not value.strip():
            raise fail("node", key, "must be a non-empty string")
        return value

    name = text_value("name", required=True)
    assert name is not None
    if not NAME_RE.fullmatch(name):
        raise fail("node", "name", "use lowercase letters, digits, '-' and '_' (max 63)")
    party = text_value("party", required=True)
    if party not in PARTIES:
        raise fail("node", "party", f"must be one of {', '.join(PARTIES)} (got {party!r})")
    listen_text = text_value("listen", required=False, default="0.0.0.0:8443")
    assert listen_text is not None
    try:
        host, port = parse_listen(listen_text)
    except ValueError as exc:
        raise fail("node", "listen", str(exc)) from None
    public_url = text_value("public_url", required=False)
    if public_url is not None:
        try:
            public_url = check_peer_url(public_url)
        except ValueError as exc:
            raise fail("node", "public_url", str(exc)) from None
    db_text = text_value("database_url", required=False, default="sqlite:///node.db")
    assert db_text is not None
    try:
        database_url = resolve_database_url(db_text, node_dir)
    except ValueError as exc:
        raise fail("node", "database_url", str(exc)) from None
    data_dir = node_dir / (text_value("data_dir", required=False, default="data") or "data")
    policy_text = text_value("policy_file", required=False)
    policy_file = (node_dir / policy_text) if policy_text else None
    if policy_file is not None and not policy_file.is_file():
        raise fail("node", "policy_file", f"file {policy_file} does not exist")
    token_text = text_value("operator_token_file", required=False, default="operator.token")
    assert token_text is not None
    token_file = node_dir / token_text

    limits = _parse_limits(raw.get("limits", {}), path, fail)
    ledger = _parse_ledger(raw.get("ledger", {}), path, fail)
    peers = _parse_peers(raw.get("peers", []), path, node_dir, fail)
    return NodeConfig(
        path=path,
        node_dir=node_dir,
        name=name,
        party=party,
        listen_host=host,
        listen_port=port,
        public_url=public_url,
        database_url=database_url,
        data_dir=data_dir,
        policy_file=policy_file,
        operator_token_file=token_file,
        limits=limits,
        peers=peers,
        ledger=ledger,
    )


_Fail = Callable[..., ConfigError]


def _parse_limits(raw: Any, path: Path, fail: _Fail) -> Limits:
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: [limits] must be a table")
    defaults = Limits()
    values: dict[str, Any] = {}
    for key, value in raw.items():
        if not hasattr(defaults, key):
            raise fail("limits", key, "unknown key")
        want = type(getattr(defaults, key))
        ok = isinstance(value, int | float) if want is float else isinstance(value, int)
        if isinstance(value, bool) or not ok or value < (0 if key == "peer_retries" else 1):
            raise fail("limits", key, f"must be a positive {want.__name__}")
        values[key] = want(value)
    return Limits(**values)


def _parse_ledger(raw: Any, path: Path, fail: _Fail) -> LedgerSettings:
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: [ledger] must be a table")
    values: dict[str, float] = {}
    for key, value in raw.items():
        if key != "witness_interval_seconds":
            raise fail("ledger", key, "unknown key (expected witness_interval_seconds)")
        if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
            raise fail("ledger", key, "must be a number of seconds, 0 or more (0 = no timer)")
        values[key] = float(value)
    return LedgerSettings(**values)


def _parse_peers(raw: Any, path: Path, node_dir: Path, fail: _Fail) -> tuple[PeerConfig, ...]:
    if not isinstance(raw, list):
        raise ConfigError(f"{path}: 'peers' must be an array of tables ([[peers]])")
    out: list[PeerConfig] = []
    names: set[str] = set()
    for i, entry in enumerate(raw):
        if not isinstance(entry, dict):
            raise ConfigError(f"{path}: peers[{i}] must be a table")
        for key in entry:
            if key not in _PEER_KEYS:
                raise fail("peers", key, "unknown key", i)
        for key in ("name", "url", "cert", "fingerprint"):
            if not isinstance(entry.get(key), str) or not entry[key]:
                raise ConfigError(f"{path}: peers[{i}]: required string key {key!r} is missing")
        name = entry["name"]
        if not NAME_RE.fullmatch(name):
            raise fail("peers", "name", "use lowercase letters, digits, '-' and '_'", i)
        if name in names:
            raise fail("peers", "name", f"peer {name!r} is listed twice", i)
        names.add(name)
        party = entry.get("party")
        if party is not None and party not in PARTIES:
            raise fail("peers", "party", f"must be one of {', '.join(PARTIES)}", i)
        try:
            url = check_peer_url(entry["url"])
        except ValueError as exc:
            raise fail("peers", "url", str(exc), i) from None
        try:
            fingerprint = normalize_fingerprint(entry["fingerprint"])
        except ValueError as exc:
            raise fail("peers", "fingerprint", str(exc), i) from None
        cert_path = node_dir / entry["cert"]
        try:
            pem = cert_path.read_bytes()
        except OSError as exc:
            raise fail("peers", "cert", f"cannot read {cert_path} ({exc.strerror})", i) from None
        try:
            cert = load_cert_pem(pem, source=str(cert_path))
            ed25519_public_key(cert, source=str(cert_path))
        except ConfigError as exc:
            raise fail("peers", "cert", str(exc), i) from None
        if cert_fingerprint(cert) != fingerprint:
            raise fail(
                "peers",
                "fingerprint",
                f"does not match the certificate in {cert_path}; the file changed after pinning",
                i,
            )
        out.append(
            PeerConfig(
                name=name,
                url=url,
                cert_path=cert_path,
                fingerprint=fingerprint,
                party=party,
                cert_pem=pem,
            )
        )
    return tuple(out)


# --- writing ------------------------------------------------------------------------------


def read_raw(node_dir: Path) -> dict[str, Any]:
    """The TOML document as plain data, for editing (validated again on write)."""
    path = Path(node_dir) / CONFIG_FILE
    NodeConfig.load(node_dir)
    with path.open("rb") as f:
        return tomllib.load(f)


def write_raw(node_dir: Path, raw: dict[str, Any]) -> NodeConfig:
    """Validate ``raw`` and replace ``node.toml`` atomically; return the new config."""
    path = Path(node_dir) / CONFIG_FILE
    text = tomli_w.dumps(raw)
    config = parse_config(text, path)
    tmp = path.with_name(f".{CONFIG_FILE}.{os.getpid()}.tmp")
    with tmp.open("w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return config
