"""Setting a node up on disk: ``init_node``, ``add_peer``, ``remove_peer``.

The CLI (``cleanroom node init`` / ``node peer add|remove``) and the test fixtures call
these. They write only inside the node directory, never overwrite an identity, and
validate the resulting ``node.toml`` before it replaces the old one. No network access.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from cryptography.x509.oid import NameOID

from cleanroom.errors import CleanroomError, ConfigError, InputError
from cleanroom.node.config import (
    CONFIG_FILE,
    NAME_RE,
    PARTIES,
    NodeConfig,
    PeerConfig,
    check_peer_url,
    parse_listen,
    read_raw,
    write_raw,
)
from cleanroom.node.context import write_operator_token
from cleanroom.node.identity import (
    IdentityExistsError,
    NodeIdentity,
    cert_fingerprint,
    ed25519_public_key,
    load_cert_pem,
    normalize_fingerprint,
)

POLICY_FILE = "policy.toml"
TOKEN_FILE = "operator.token"
PEERS_SUBDIR = "peers"
DEFAULT_LISTEN = "0.0.0.0:8443"


def default_policy_source(party: str) -> Path | None:
    """``parties/policies/<party>.toml`` shipped with the engine, if it exists."""
    import parties

    path = Path(parties.__file__).resolve().parent / "policies" / f"{party}.toml"
    return path if path.is_file() else None


def init_node(
    node_dir: Path,
    *,
    name: str,
    party: str,
    listen: str = DEFAULT_LISTEN,
    public_url: str | None = None,
    database_url: str | None = None,
) -> NodeConfig:
    """Create identity, operator token, default policy and ``node.toml`` in ``node_dir``."""
    if not NAME_RE.fullmatch(name):
        raise InputError(f"node name {name!r}: use lowercase letters, digits, '-' and '_'")
    if party not in PARTIES:
        raise InputError(f"party {party!r}: must be one of {', '.join(PARTIES)}")
    try:
        parse_listen(listen)
        if public_url is not None:
            check_peer_url(public_url)
    except ValueError as exc:
        raise InputError(str(exc)) from None
    node_dir = Path(node_dir)
    config_path = node_dir / CONFIG_FILE
    if config_path.exists():
        raise IdentityExistsError(
            f"{config_path} already exists: {node_dir} is already a node directory; "
            "`cleanroom node init` never overwrites a node (use another --dir)"
        )
    node_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(node_dir, 0o700)
    NodeIdentity.create(node_dir, name=name, party=party)
    token_path = node_dir / TOKEN_FILE
    if not token_path.exists():
        write_operator_token(token_path)
    node: dict[str, object] = {
        "name": name,
        "party": party,
        "listen": listen,
        "database_url": database_url or "sqlite:///node.db",
        "data_dir": "data",
        "operator_token_file": TOKEN_FILE,
    }
    if public_url:
        node["public_url"] = public_url
    source = default_policy_source(party)
    if source is not None:
        target = node_dir / POLICY_FILE
        if not target.exists():
            shutil.copyfile(source, target)
        node["policy_file"] = POLICY_FILE
    (node_dir / "data").mkdir(exist_ok=True)
    return write_raw(node_dir, {"node": node})


def add_peer(
    node_dir: Path,
    *,
    name: str,
    url: str,
    cert_file: Path,
    party: str | None = None,
    fingerprint: str | None = None,
) -> PeerConfig:
    """Pin a partner's certificate under ``name``. With ``fingerprint`` (received out of
    band), refuse a certificate that does not match it."""
    node_dir = Path(node_dir)
    config = NodeConfig.load(node_dir)
    if not NAME_RE.fullmatch(name):
        raise InputError(f"peer name {name!r}: use lowercase letters, digits, '-' and '_'")
    try:
        url = check_peer_url(url)
    except ValueError as exc:
        raise InputError(f"--url: {exc}") from None
    try:
        pem = Path(cert_file).read_bytes()
    except OSError as exc:
        raise InputError(f"cannot read certificate ({exc.strerror})", file=str(cert_file)) from None
    try:
        cert = load_cert_pem(pem, source=str(cert_file))
        ed25519_public_key(cert, source=str(cert_file))
    except ConfigError as exc:
        raise InputError(str(exc)) from None
    fp = cert_fingerprint(cert)
    if fingerprint is not None:
        try:
            expected = normalize_fingerprint(fingerprint)
        except ValueError as exc:
            raise InputError(f"--fingerprint: {exc}") from None
        if expected != fp:
            raise InputError(
                "the certificate's fingerprint does not match the one you were given; "
                "do not pin it",
                file=str(cert_file),
            )
    if fp == NodeIdentity.load(node_dir).fingerprint:
        raise InputError("this is this node's own certificate, not a peer's", file=str(cert_file))
    for p in config.peers:
        if p.name == name:
            raise CleanroomError(f"a peer named {name!r} is already pinned; remove it first")
        if p.fingerprint == fp:
            raise CleanroomError(f"this certificate is already pinned as peer {p.name!r}")
    if party is None:
        ou = cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)
        value = ou[0].value if ou else None
        party = value if isinstance(value, str) and value in PARTIES else None
    elif party not in PARTIES:
        raise InputError(f"party {party!r}: must be one of {', '.join(PARTIES)}")
    peers_dir = node_dir / PEERS_SUBDIR
    peers_dir.mkdir(exist_ok=True)
    rel = f"{PEERS_SUBDIR}/{name}.pem"
    (node_dir / rel).write_bytes(pem)
    raw = read_raw(node_dir)
    entry: dict[str, str] = {"name": name, "url": url, "cert": rel, "fingerprint": fp}
    if party:
        entry["party"] = party
    raw.setdefault("peers", []).append(entry)
    return write_raw(node_dir, raw).peer(name)


def remove_peer(node_dir: Path, name: str) -> None:
    """Unpin a peer; a running node refuses it from its next request on."""
    node_dir = Path(node_dir)
    config = NodeConfig.load(node_dir)
    peer = config.peer(name)
    raw = read_raw(node_dir)
    raw["peers"] = [p for p in raw.get("peers", []) if p.get("name") != name]
    if not raw["peers"]:
        del raw["peers"]
    write_raw(node_dir, raw)
    if peer.cert_path.is_file() and peer.cert_path.parent == node_dir.resolve() / PEERS_SUBDIR:
        peer.cert_path.unlink()
