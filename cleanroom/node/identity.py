"""A node's identity: one Ed25519 key and its self-signed X.509 certificate.

The same key authenticates the node in TLS 1.3 (client and server certificates) and
signs its ledger checkpoints, so a partner who pinned the certificate also knows the key
that signs the node's notes. Peers are recognised by the SHA-256 fingerprint of their
DER certificate, compared exactly; names inside certificates are never trusted.

Files (under ``NODE_DIR/identity/``): ``node.key`` (PKCS#8 PEM, mode 0600) and
``node.pem``. Creating an identity never overwrites an existing one.
This module must not send keys anywhere or log them.
"""

from __future__ import annotations

import base64
import datetime
import functools
import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from cleanroom.errors import CleanroomError, ConfigError

IDENTITY_SUBDIR = "identity"
KEY_FILE = "node.key"
CERT_FILE = "node.pem"
CERT_VALIDITY_DAYS = 3650
_HEX64 = re.compile(r"[0-9a-f]{64}")


class IdentityExistsError(CleanroomError):
    """``node init`` found an identity already in place and left it alone."""


def fingerprint_der(der: bytes) -> str:
    """SHA-256 of a DER certificate, as 64 lowercase hex digits."""
    return hashlib.sha256(der).hexdigest()


def load_cert_pem(pem: bytes, *, source: str = "certificate") -> x509.Certificate:
    """Parse one PEM certificate; raise :class:`ConfigError` naming ``source`` if it is not."""
    try:
        return x509.load_pem_x509_certificate(pem)
    except ValueError:
        raise ConfigError(f"{source}: not a PEM X.509 certificate") from None


def cert_fingerprint(cert: x509.Certificate) -> str:
    return fingerprint_der(cert.public_bytes(serialization.Encoding.DER))


def normalize_fingerprint(text: str) -> str:
    """Accept ``sha256:AB:CD...``, grouped or plain hex; return 64 lowercase hex digits."""
    s = text.strip().lower()
    if s.startswith("sha256:"):
        s = s[len("sha256:") :]
    s = re.sub(r"[\s:]", "", s)
    if not _HEX64.fullmatch(s):
        raise ValueError("a certificate fingerprint is 64 hex digits (SHA-256 of the DER cert)")
    return s


def format_fingerprint(fp: str) -> str:
    """Grouped form for reading aloud or comparing by eye: ``AB:CD:...``."""
    return ":".join(fp[i : i + 2] for i in range(0, len(fp), 2)).upper()


def ed25519_public_key(
    cert: x509.Certificate, *, source: str = "certificate"
) -> ed25519.Ed25519PublicKey:
    """The Ed25519 key inside a node certificate (raises :class:`ConfigError` otherwise)."""
    key = cert.public_key()
    if not isinstance(key, ed25519.Ed25519PublicKey):
        raise ConfigError(f"{source}: not a cleanroom node certificate (key is not Ed25519)")
    return key


def public_key_b64(key: ed25519.Ed25519PublicKey) -> str:
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return base64.b64encode(raw).decode("ascii")


@dataclass(frozen=True)
class NodeIdentity:
    """The node's key and certificate, loaded from ``NODE_DIR/identity``."""

    key_path: Path
    cert_path: Path
    cert_pem: bytes
    certificate: x509.Certificate

    @functools.cached_property
    def cert_der(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.DER)

    @functools.cached_property
    def fingerprint(self) -> str:
        """SHA-256 of the DER certificate (64 lowercase hex digits)."""
        return fingerprint_der(self.cert_der)

    @property
    def public_key(self) -> ed25519.Ed25519PublicKey:
        return ed25519_public_key(self.certificate, source=str(self.cert_path))

    @property
    def public_key_b64(self) -> str:
        """The raw 32-byte Ed25519 public key, base64 (the form signed notes use)."""
        return public_key_b64(self.public_key)

    def signing_key(self) -> ed25519.Ed25519PrivateKey:
        """The node's private key, for signing ledger checkpoints. Keep it in this process."""
        try:
            key = serialization.load_pem_private_key(self.key_path.read_bytes(), password=None)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{self.key_path}: cannot load the node key ({exc})") from None
        if not isinstance(key, ed25519.Ed25519PrivateKey):
            raise ConfigError(f"{self.key_path}: the node key is not Ed25519")
        return key

    @staticmethod
    def paths(node_dir: Path) -> tuple[Path, Path]:
        folder = Path(node_dir) / IDENTITY_SUBDIR
        return folder / KEY_FILE, folder / CERT_FILE

    @classmethod
    def load(cls, node_dir: Path) -> NodeIdentity:
        """Load and cross-check the key and certificate in ``node_dir``."""
        key_path, cert_path = cls.paths(node_dir)
        for p in (key_path, cert_path):
            if not p.is_file():
                raise ConfigError(f"{p}: missing; run `cleanroom node init` for this directory")
        pem = cert_path.read_bytes()
        cert = load_cert_pem(pem, source=str(cert_path))
        ident = cls(key_path=key_path, cert_path=cert_path, cert_pem=pem, certificate=cert)
        mode = key_path.stat().st_mode & 0o777
        if mode & 0o077:
            raise ConfigError(
                f"{key_path}: private key is readable by others (mode {mode:o}); "
                f"run chmod 600 {key_path}"
            )
        if ident.signing_key().public_key() != ident.public_key:
            raise ConfigError(f"{key_path}: key does not match certificate {cert_path}")
        return ident

    @classmethod
    def create(cls, node_dir: Path, *, name: str, party: str) -> NodeIdentity:
        """Generate a new key and certificate; refuse if either file already exists."""
        key_path, cert_path = cls.paths(node_dir)
        for p in (key_path, cert_path):
            if p.exists():
                raise IdentityExistsError(
                    f"{p} already exists: this directory already has a node identity; "
                    "`cleanroom node init` never overwrites one (use another --dir, or delete "
                    "the directory deliberately to start over)"
                )
        key_path.parent.mkdir(parents=True, exist_ok=True)
        os.chmod(key_path.parent, 0o700)
        key = ed25519.Ed25519PrivateKey.generate()
        cert = _self_signed(key, name=name, party=party)
        key_pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        cert_pem = cert.public_bytes(serialization.Encoding.PEM)
        _write_new(key_path, key_pem, 0o600)
        _write_new(cert_path, cert_pem, 0o644)
        return cls(key_path=key_path, cert_path=cert_path, cert_pem=cert_pem, certificate=cert)


def _self_signed(key: ed25519.Ed25519PrivateKey, *, name: str, party: str) -> x509.Certificate:
    pub = key.public_key()
    # A key-derived attribute keeps subjects unique, so two pinned peers that chose the same
    # name do not shadow each other in the TLS trust store (which looks anchors up by subject).
    key_id = hashlib.sha256(
        pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    ).hexdigest()[:32]
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, name),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, party),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "cleanroom node"),
            x509.NameAttribute(NameOID.SERIAL_NUMBER, key_id),
        ]
    )
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(pub)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=10))
        .not_valid_after(now + datetime.timedelta(days=CERT_VALIDITY_DAYS))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(pub), critical=False)
        .sign(key, None)
    )


def _write_new(path: Path, data: bytes, mode: int) -> None:
    """Create ``path`` exclusively with ``mode`` from the start (no window of wider access)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.chmod(path, mode)
