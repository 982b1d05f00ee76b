"""C2SP signed notes, tlog checkpoints and tlog cosignatures (Ed25519).

Formats (written from c2sp.org/signed-note, c2sp.org/tlog-checkpoint and
c2sp.org/tlog-cosignature):

- A **signed note** is UTF-8 text ending in a newline, a blank line, then one or more
  signature lines ``"\u2014 <key name> <base64(4-byte key id || signature)>\\n"``. The signed
  text includes its final newline but not the blank line. No ASCII control characters
  other than newline anywhere; key names non-empty, no spaces, no ``+``.
- Ed25519 note signatures (type ``0x01``) sign the note text; key id =
  ``SHA-256(name || 0x0A || 0x01 || pubkey)[:4]``.
- A **checkpoint** is a note whose text is ``origin\\n<tree size>\\n<base64 root>\\n``
  (optional extension lines after; this module writes none and keeps any it reads).
- A **cosignature** (type ``0x04``) is a note signature whose bytes are
  ``key id || u64 big-endian timestamp || Ed25519 signature`` over
  ``"cosignature/v1\\ntime <t>\\n" || checkpoint text``; key id =
  ``SHA-256(name || 0x0A || 0x04 || pubkey)[:4]``.
- A **verifier key** (vkey) is ``<name>+<hex key id>+<base64(type || pubkey)>``.

Every verification failure raises :class:`~cleanroom.ledger.errors.VerificationError`
(opaque); malformed input to *parsing* helpers raises it too, never another exception.
This module does no I/O; keys come in as ``cryptography`` Ed25519 objects.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from cleanroom.ledger.errors import VerificationError

SIG_ED25519 = 0x01
SIG_COSIGNATURE_V1 = 0x04
EM_DASH = "\u2014"
MAX_SIGNATURES = 100
MAX_NOTE_BYTES = 1 << 20
_MAX_TIMESTAMP = 2**63 - 1
_SIZE_RE = re.compile(r"0|[1-9][0-9]{0,19}")
_B64_RE = re.compile(r"[A-Za-z0-9+/]*={0,2}")


def _raw_public(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(Encoding.Raw, PublicFormat.Raw)


def _check_name(name: str) -> None:
    if not name or any(c.isspace() for c in name) or "+" in name or any(
        ord(c) < 0x20 for c in name
    ):
        raise ValueError(f"invalid key name {name!r}: non-empty, no spaces, no '+'")


def key_id(name: str, sig_type: int, public_key: Ed25519PublicKey | bytes) -> bytes:
    """``SHA-256(name || 0x0A || sig_type || pubkey)[:4]``."""
    raw = public_key if isinstance(public_key, bytes) else _raw_public(public_key)
    return hashlib.sha256(name.encode("utf-8") + b"\n" + bytes([sig_type]) + raw).digest()[:4]


def _b64decode(text: str) -> bytes:
    if not _B64_RE.fullmatch(text) or len(text) % 4:
        raise VerificationError()
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise VerificationError() from None


# --- keys ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class NoteSigner:
    """A named Ed25519 key signing notes with signature type ``sig_type``."""

    name: str
    private_key: Ed25519PrivateKey
    sig_type: int = SIG_ED25519

    def __post_init__(self) -> None:
        _check_name(self.name)
        if self.sig_type not in (SIG_ED25519, SIG_COSIGNATURE_V1):
            raise ValueError("only Ed25519 (0x01) and cosignature/v1 (0x04) are supported")

    @property
    def key_id(self) -> bytes:
        return key_id(self.name, self.sig_type, self.private_key.public_key())

    def verifier(self) -> NoteVerifier:
        return NoteVerifier(self.name, self.private_key.public_key(), self.sig_type)


@dataclass(frozen=True)
class NoteVerifier:
    """A trusted (name, Ed25519 public key, signature type)."""

    name: str
    public_key: Ed25519PublicKey
    sig_type: int = SIG_ED25519

    def __post_init__(self) -> None:
        _check_name(self.name)
        if self.sig_type not in (SIG_ED25519, SIG_COSIGNATURE_V1):
            raise ValueError("only Ed25519 (0x01) and cosignature/v1 (0x04) are supported")

    @property
    def key_id(self) -> bytes:
        return key_id(self.name, self.sig_type, self.public_key)

    def vkey(self) -> str:
        """Encode as a C2SP verifier key ``name+hexid+base64(type||pubkey)``."""
        material = bytes([self.sig_type]) + _raw_public(self.public_key)
        return f"{self.name}+{self.key_id.hex()}+{base64.b64encode(material).decode()}"

    @classmethod
    def from_vkey(cls, vkey: str) -> NoteVerifier:
        """Parse a verifier key; raises :class:`VerificationError` if malformed."""
        parts = vkey.split("+", 2)
        if len(parts) != 3 or not re.fullmatch(r"[0-9a-f]{8}", parts[1]):
            raise VerificationError()
        material = _b64decode(parts[2])
        if len(material) != 33 or material[0] not in (SIG_ED25519, SIG_COSIGNATURE_V1):
            raise VerificationError()
        try:
            v = cls(parts[0], Ed25519PublicKey.from_public_bytes(material[1:]), material[0])
        except ValueError:
            raise VerificationError() from None
        if v.key_id.hex() != parts[1]:
            raise VerificationError()
        return v


# --- notes --------------------------------------------------------------------------------


@dataclass(frozen=True)
class NoteSignature:
    """One parsed signature line: key name, key id, and the bytes after the key id."""

    name: str
    key_id: bytes
    sig: bytes

    def line(self) -> str:
        b64 = base64.b64encode(self.key_id + self.sig).decode("ascii")
        return f"{EM_DASH} {self.name} {b64}\n"


@dataclass(frozen=True)
class Note:
    """A parsed signed note: the signed text (with its final newline) and its signatures."""

    text: str
    signatures: tuple[NoteSignature, ...]

    def to_bytes(self) -> bytes:
        return (self.text + "\n" + "".join(s.line() for s in self.signatures)).encode("utf-8")


def _check_text(text: str) -> None:
    if not text.endswith("\n") or any(ord(c) < 0x20 and c != "\n" for c in text):
        raise ValueError("note text must end in a newline and contain no control characters")


def parse_note(data: bytes) -> Note:
    """Parse a signed note (syntax only; signatures are *not* verified here)."""
    if len(data) > MAX_NOTE_BYTES:
        raise VerificationError()
    try:
        s = data.decode("utf-8")
    except UnicodeDecodeError:
        raise VerificationError() from None
    if any(ord(c) < 0x20 and c != "\n" for c in s):
        raise VerificationError()
    split = s.rfind("\n\n")
    if split < 0 or not s.endswith("\n"):
        raise VerificationError()
    text, sig_block = s[: split + 1], s[split + 2 :]
    lines = sig_block.split("\n")[:-1]
    if not lines or len(lines) > MAX_SIGNATURES:
        raise VerificationError()
    sigs: list[NoteSignature] = []
    for line in lines:
        if not line.startswith(EM_DASH + " "):
            raise VerificationError()
        fields = line[2:].split(" ")
        if len(fields) != 2 or not fields[0] or "+" in fields[0]:
            raise VerificationError()
        raw = _b64decode(fields[1])
        if len(raw) < 5:
            raise VerificationError()
        sigs.append(NoteSignature(fields[0], raw[:4], raw[4:]))
    return Note(text, tuple(sigs))


def sign_note(text: str, signers: Iterable[NoteSigner]) -> bytes:
    """Sign ``text`` with Ed25519 (type 0x01) signers and return the note bytes."""
    _check_text(text)
    sigs = []
    for signer in signers:
        if signer.sig_type != SIG_ED25519:
            raise ValueError("use cosign_checkpoint for cosignatures")
        sig = signer.private_key.sign(text.encode("utf-8"))
        sigs.append(NoteSignature(signer.name, signer.key_id, sig))
    if not sigs:
        raise ValueError("a signed note needs at least one signature")
    return Note(text, tuple(sigs)).to_bytes()


def add_signatures(note: bytes, lines: Sequence[NoteSignature]) -> bytes:
    """Append signature lines (e.g. cosignatures) to a note, skipping exact duplicates."""
    parsed = parse_note(note)
    existing = set(parsed.signatures)
    extra = tuple(s for s in lines if s not in existing)
    return Note(parsed.text, parsed.signatures + extra).to_bytes()


def open_note(data: bytes, verifiers: Sequence[NoteVerifier]) -> Note:
    """Verify a note against trusted Ed25519 (0x01) verifiers; return it if one verifies.

    Per the spec: signatures from unknown keys are ignored; a signature from a known
    key that fails rejects the whole note; at least one known signature must verify.
    """
    note = parse_note(data)
    known = {(v.name, v.key_id): v for v in verifiers if v.sig_type == SIG_ED25519}
    ok = False
    msg = note.text.encode("utf-8")
    for s in note.signatures:
        v = known.get((s.name, s.key_id))
        if v is None:
            continue
        try:
            v.public_key.verify(s.sig, msg)
        except InvalidSignature:
            raise VerificationError() from None
        ok = True
    if not ok:
        raise VerificationError()
    return note


# --- checkpoints --------------------------------------------------------------------------


@dataclass(frozen=True)
class Checkpoint:
    """The body of a C2SP checkpoint: origin, tree size, root hash (+ extension lines)."""

    origin: str
    size: int
    root: bytes
    extensions: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.origin or "\n" in self.origin or any(ord(c) < 0x20 for c in self.origin):
            raise ValueError("checkpoint origin must be a non-empty single line")
        if not 0 <= self.size <= _MAX_TIMESTAMP or len(self.root) != 32:
            raise ValueError("checkpoint needs a size >= 0 and a 32-byte root")

    def text(self) -> str:
        lines = [self.origin, str(self.size), base64.b64encode(self.root).decode("ascii")]
        lines += list(self.extensions)
        return "\n".join(lines) + "\n"

    @classmethod
    def from_text(cls, text: str) -> Checkpoint:
        """Parse checkpoint text; raises :class:`VerificationError` if malformed."""
        if not text.endswith("\n"):
            raise VerificationError()
        lines = text[:-1].split("\n")
        if len(lines) < 3 or any(not ln for ln in lines):
            raise VerificationError()
        if not _SIZE_RE.fullmatch(lines[1]):
            raise VerificationError()
        root = _b64decode(lines[2])
        try:
            return cls(lines[0], int(lines[1]), root, tuple(lines[3:]))
        except ValueError:
            raise VerificationError() from None


def sign_checkpoint(cp: Checkpoint, signer: NoteSigner) -> bytes:
    """Sign a checkpoint as a note. The key name should equal the origin."""
    return sign_note(cp.text(), [signer])


def open_checkpoint(
    note: bytes, verifiers: Sequence[NoteVerifier], *, origin: str | None = None
) -> tuple[Checkpoint, Note]:
    """Verify a signed checkpoint; optionally require its origin. Opaque failures."""
    parsed = open_note(note, verifiers)
    cp = Checkpoint.from_text(parsed.text)
    if origin is not None and cp.origin != origin:
        raise VerificationError()
    return cp, parsed


# --- cosignatures -------------------------------------------------------------------------


def cosignature_message(checkpoint_text: str, timestamp: int) -> bytes:
    """The bytes an Ed25519 cosignature/v1 signs."""
    return f"cosignature/v1\ntime {timestamp}\n".encode() + checkpoint_text.encode("utf-8")


@dataclass(frozen=True)
class Cosignature:
    """A decoded cosignature/v1 line: cosigner name, key id, timestamp, Ed25519 signature."""

    name: str
    key_id: bytes
    timestamp: int
    signature: bytes

    def note_signature(self) -> NoteSignature:
        return NoteSignature(self.name, self.key_id,
                             struct.pack(">Q", self.timestamp) + self.signature)

    def line(self) -> str:
        return self.note_signature().line()

    @classmethod
    def from_note_signature(cls, s: NoteSignature) -> Cosignature:
        if len(s.sig) != 8 + 64:
            raise VerificationError()
        (ts,) = struct.unpack(">Q", s.sig[:8])
        if ts > _MAX_TIMESTAMP:
            raise VerificationError()
        return cls(s.name, s.key_id, ts, s.sig[8:])


def cosign_checkpoint(checkpoint_text: str, signer: NoteSigner, timestamp: int) -> Cosignature:
    """Produce a cosignature/v1 over ``checkpoint_text`` (the note text, final newline
    included) at POSIX time ``timestamp`` with a signer of type 0x04."""
    if signer.sig_type != SIG_COSIGNATURE_V1:
        raise ValueError("cosigning needs a NoteSigner with sig_type=0x04")
    if not 0 <= timestamp <= _MAX_TIMESTAMP:
        raise ValueError("timestamp out of range")
    _check_text(checkpoint_text)
    sig = signer.private_key.sign(cosignature_message(checkpoint_text, timestamp))
    return Cosignature(signer.name, signer.key_id, timestamp, sig)


def verify_cosignature(checkpoint_text: str, cosig: Cosignature, verifier: NoteVerifier) -> None:
    """Check one cosignature against a trusted type-0x04 verifier. Opaque failures."""
    if (
        verifier.sig_type != SIG_COSIGNATURE_V1
        or cosig.name != verifier.name
        or cosig.key_id != verifier.key_id
    ):
        raise VerificationError()
    try:
        verifier.public_key.verify(
            cosig.signature, cosignature_message(checkpoint_text, cosig.timestamp)
        )
    except InvalidSignature:
        raise VerificationError() from None


def find_cosignatures(note: bytes, verifiers: Sequence[NoteVerifier]) -> list[Cosignature]:
    """Return the verified cosignatures in ``note`` from the given type-0x04 verifiers.

    Lines from unknown keys are ignored; a line from a known key that fails to verify
    raises :class:`VerificationError`.
    """
    parsed = parse_note(note)
    known = {(v.name, v.key_id): v for v in verifiers if v.sig_type == SIG_COSIGNATURE_V1}
    out = []
    for s in parsed.signatures:
        v = known.get((s.name, s.key_id))
        if v is None:
            continue
        cos = Cosignature.from_note_signature(s)
        verify_cosignature(parsed.text, cos, v)
        out.append(cos)
    return out
