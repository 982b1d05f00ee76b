"""The OPRF and label crypto of labeled unbalanced PSI ("anonymous query"), as pure functions.

The OPRF is ``F_k(x) = X25519(k, H(x))`` where ``H`` is the RFC 9380 hash-to-curve of
:mod:`protocols.psi.h2c` (``curve25519_XMD:SHA-512_ELL2_NU_``, u-coordinate fast path) and
``k`` is the owner's clamped X25519 scalar. From ``F_k(x)`` both parties derive, with
HKDF-SHA-512 bound to the table id, a 16-byte lookup *tag* and a 32-byte AES-256-GCM key
that encrypts the label of ``x``.

Blinded evaluation under X25519 (the math, also in docs/protocols/anonymous-query.md):

- The curve group has order ``8·ℓ`` (``ℓ = 2^252 + 27742317777372353535851937790883648493``).
  ``H(x)`` is a curve point ``Q = Q_ℓ + T`` with ``Q_ℓ`` in the prime-order subgroup and
  ``T`` a torsion point of order dividing 8 (the NU encoding does not clear the cofactor).
- X25519 *clamps* every scalar: clears bits 0..2 and 255, sets bit 254. A clamped scalar
  is ``8·j`` with ``2^251 ≤ j < 2^252``, so it kills ``T``: ``F_k(x) = u([k]Q_ℓ)``.
- The querier draws one clamped ``r`` per request and sends ``P = X25519(r, H(x)) =
  u([r]Q_ℓ)``; the owner answers ``X25519(k, P) = u([k·r]Q_ℓ)``.
- To unblind, the querier needs a scalar ``s`` with ``s·r ≡ 1 (mod ℓ)`` that X25519
  will *not* change by clamping, i.e. ``s = 8·j`` with ``2^251 ≤ j < 2^252``. The
  candidate is ``j = r⁻¹·8⁻¹ mod ℓ``; since ``ℓ > 2^252`` there is exactly one
  representative of ``j`` below ``ℓ`` and it lies in ``[2^251, 2^252)`` for about half of
  all ``r``. :func:`new_blinding_pair` redraws ``r`` until it does (2 draws on average,
  each a modular inversion: microseconds). Then ``X25519(s, u([k·r]Q_ℓ)) = u([k]Q_ℓ) =
  F_k(x)``. Passing the plain inverse ``r⁻¹ mod ℓ`` to X25519 would be wrong: clamping
  would change it (the tests show this).
- The sign of ``y`` never matters: ``u([n]P) = u([n](-P))``.
- ``r`` is not uniform in ``Z_ℓ*`` (it is clamped and conditioned on ``s`` existing: about
  a quarter of the residues), exactly like the clamped scalars of ECDH PSI; hiding of the
  blinded points rests on DDH in the prime-order subgroup, not on perfect blinding.

Costs per identifier: owner 1 X25519 (evaluation; the table build also does the hash to
curve, 1 X25519, 2 HMAC-SHA-512 and 1 AES-GCM); querier 1 hash to curve + 2 X25519
(blind, unblind) + the KDF. Functions over packed 32-byte rows are picklable jobs a
process pool can run. Nothing here does I/O or keeps state; no raw identifier leaves the
functions that take it (only curve points, tags and ciphertexts are returned).
"""

from __future__ import annotations

import functools
import hashlib
import secrets
import struct
from collections.abc import Sequence

import gmpy2
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from protocols.errors import LocalProtocolError, RemoteProtocolError
from protocols.psi import ecdh, h2c

ELL = 2**252 + 27742317777372353535851937790883648493
"""Order of the prime-order subgroup of Curve25519."""

SUITE_NAME = "X25519-" + h2c.SUITE_ID + "-HKDF-SHA512-AES256GCM"
H2C_DST = b"CLEANROOM-LPSI-V1-" + h2c.SUITE_ID.encode()
TABLE_ID_BYTES = 16
TAG_BYTES = 16
AEAD_KEY_BYTES = 32
AEAD_OVERHEAD = 16
LEN_PREFIX_BYTES = 2
MAX_LABEL_SIZE = 4096
POINT_BYTES = ecdh.POINT_BYTES

_SALT_PREFIX = b"cleanroom-lpsi-v1 salt\x00"
_INFO = b"cleanroom-lpsi-v1 tag[0:16] key[32:64]\x00\x01"  # HKDF-Expand T(1), counter 1
_AD_PREFIX = b"cleanroom-lpsi-v1 label\x00"
_INV8 = int(gmpy2.invert(8, ELL))
_J_LOW = 1 << 251
_J_HIGH = 1 << 252
_IPAD = bytes(0x36 for _ in range(128))
_OPAD = bytes(0x5C for _ in range(128))
_IPAD_INT = int.from_bytes(_IPAD[:64], "big")
_OPAD_INT = int.from_bytes(_OPAD[:64], "big")
_IPAD_TAIL = _IPAD[64:]
_OPAD_TAIL = _OPAD[64:]
_VERSION = struct.Struct(">I")


# --- scalars ---------------------------------------------------------------------------


def clamp(scalar: int) -> int:
    """RFC 7748 clamping: what X25519 does to every scalar before using it."""
    return (scalar & ~7 & ((1 << 255) - 1)) | (1 << 254)


def is_clamped(scalar: bytes) -> bool:
    """True if X25519 uses ``scalar`` unchanged."""
    v = int.from_bytes(scalar, "little")
    return len(scalar) == 32 and clamp(v) == v


def new_oprf_key() -> bytes:
    """A fresh owner key: 32 random bytes, stored already clamped (what X25519 uses)."""
    return clamp(int.from_bytes(secrets.token_bytes(32), "little")).to_bytes(32, "little")


def unblinding_scalar(r: bytes) -> bytes | None:
    """The clamped ``s`` with ``s·r ≡ 1 (mod ℓ)``, or ``None`` if no clamped one exists."""
    rv = clamp(int.from_bytes(r, "little"))
    j = int(gmpy2.invert(rv, ELL)) * _INV8 % ELL
    if not _J_LOW <= j < _J_HIGH:
        return None
    return (8 * j).to_bytes(32, "little")


def new_blinding_pair() -> tuple[bytes, bytes]:
    """Fresh ``(r, s)``: clamped blinding scalar and its clamped inverse mod ℓ."""
    while True:
        r = clamp(int.from_bytes(secrets.token_bytes(32), "little")).to_bytes(32, "little")
        s = unblinding_scalar(r)
        if s is not None:
            return r, s


# --- OPRF ------------------------------------------------------------------------------


def hash_to_curve(identifiers: Sequence[bytes]) -> bytes:
    """Packed u-coordinates of ``H(x)`` (before cofactor clearing) for every identifier."""
    return h2c.encode_many(identifiers, H2C_DST)


def blind(r: bytes, identifiers: Sequence[bytes]) -> bytes:
    """Querier: ``X25519(r, H(x))`` for each identifier, packed."""
    return ecdh.scalarmult_packed(r, hash_to_curve(identifiers))


def evaluate(key: bytes, blinded: bytes) -> bytes:
    """Owner: ``X25519(k, P)`` for each received point, packed.

    Non-canonical encodings and points of small order raise RemoteProtocolError (400).
    Curve25519 is twist-secure and ``k`` is a multiple of 8, so a point on the twist or
    with a torsion component reveals nothing about ``k``.
    """
    ecdh.check_points(blinded)
    return ecdh.scalarmult_packed(key, blinded)


def unblind(s: bytes, evaluated: bytes) -> bytes:
    """Querier: ``X25519(s, k·r·Q) = F_k(x)`` for each evaluated point, packed."""
    ecdh.check_points(evaluated)
    return ecdh.scalarmult_packed(s, evaluated)


def oprf_direct(key: bytes, identifiers: Sequence[bytes]) -> bytes:
    """Owner (offline): ``F_k(x) = X25519(k, H(x))`` for each identifier, packed."""
    return ecdh.scalarmult_packed(key, hash_to_curve(identifiers))


# --- KDF -------------------------------------------------------------------------------


class TagDeriver:
    """HKDF-SHA-512 (RFC 5869) from ``F_k(x)`` to ``(tag, label key)`` for one table.

    ``salt = "cleanroom-lpsi-v1 salt\\0" || table_id``; ``PRK = HMAC(salt, F)``;
    ``OKM = T(1) = HMAC(PRK, info || 0x01)`` with an info string that names both outputs;
    ``tag = OKM[0:16]``, ``key = OKM[32:64]``. The HMAC pads of the salt are computed once
    per table; the result equals ``hmac``/HKDF from the standard library (tested).
    """

    def __init__(self, table_id: bytes) -> None:
        if len(table_id) != TABLE_ID_BYTES:
            raise LocalProtocolError(f"table_id must be {TABLE_ID_BYTES} bytes")
        self.table_id = table_id
        salt = (_SALT_PREFIX + table_id).ljust(128, b"\x00")
        self._inner = hashlib.sha512(bytes(a ^ b for a, b in zip(salt, _IPAD, strict=True)))
        self._outer = hashlib.sha512(bytes(a ^ b for a, b in zip(salt, _OPAD, strict=True)))

    def derive(self, output: bytes) -> tuple[bytes, bytes]:
        inner = self._inner.copy()
        inner.update(output)
        outer = self._outer.copy()
        outer.update(inner.digest())
        prk = int.from_bytes(outer.digest(), "big")
        sha512 = hashlib.sha512
        ipad = (prk ^ _IPAD_INT).to_bytes(64, "big") + _IPAD_TAIL
        opad = (prk ^ _OPAD_INT).to_bytes(64, "big") + _OPAD_TAIL
        okm = sha512(opad + sha512(ipad + _INFO).digest()).digest()
        return okm[:TAG_BYTES], okm[32:64]

    def derive_many(self, outputs: bytes) -> list[tuple[bytes, bytes]]:
        """``derive`` for every 32-byte row of ``outputs``."""
        mv = memoryview(outputs)
        return [self.derive(bytes(mv[i : i + 32])) for i in range(0, len(outputs), 32)]


@functools.lru_cache(maxsize=64)
def tag_deriver(table_id: bytes) -> TagDeriver:
    """The :class:`TagDeriver` of ``table_id``, built once (its HMAC pads cost more than a
    one-identifier lookup's derivation); it is immutable, so threads may share it."""
    return TagDeriver(table_id)


# --- labels ----------------------------------------------------------------------------


def associated_data(table_id: bytes, entry_version: int, tag: bytes) -> bytes:
    """AEAD associated data: binds the ciphertext to the table, its write version and tag."""
    return _AD_PREFIX + table_id + _VERSION.pack(entry_version) + tag


def _nonce(entry_version: int) -> bytes:
    # Unique per (key, version): a key belongs to one identifier of one table, and a table
    # writes an identifier's entry at most once per version (versions only increase).
    return _VERSION.pack(entry_version) + bytes(8)


def ciphertext_size(label_size: int) -> int:
    return LEN_PREFIX_BYTES + label_size + AEAD_OVERHEAD


def seal_label(
    key: bytes, table_id: bytes, entry_version: int, tag: bytes, label: bytes, label_size: int
) -> bytes:
    """AES-256-GCM of ``len u16 || label || zero padding`` (fixed size for every entry)."""
    if len(label) > label_size:
        raise LocalProtocolError(f"label of {len(label)} bytes exceeds label_size {label_size}")
    plain = len(label).to_bytes(2, "big") + label + bytes(label_size - len(label))
    return AESGCM(key).encrypt(
        _nonce(entry_version), plain, associated_data(table_id, entry_version, tag)
    )


def open_label(
    key: bytes, table_id: bytes, entry_version: int, tag: bytes, ciphertext: bytes
) -> bytes:
    """Decrypt one entry; RemoteProtocolError (400) if it does not authenticate."""
    try:
        plain = AESGCM(key).decrypt(
            _nonce(entry_version), ciphertext, associated_data(table_id, entry_version, tag)
        )
    except InvalidTag:
        raise RemoteProtocolError("a table entry does not authenticate") from None
    n = int.from_bytes(plain[:2], "big")
    if n > len(plain) - 2 or any(plain[2 + n :]):
        raise RemoteProtocolError("a table entry has a malformed label encoding")
    return plain[2 : 2 + n]


# --- worker entry points: pure, picklable arguments, packed results -------------------


def build_chunk_job(
    key: bytes,
    table_id: bytes,
    version: int,
    label_size: int,
    identifiers: Sequence[bytes],
    labels: Sequence[bytes],
) -> bytes:
    """Owner, offline: the table rows of one chunk, in input order, packed.

    Row: ``tag 16 || entry_version u32 || AES-GCM(label) (label_size + 18)``. One X25519
    per identifier; ``labels[i]`` is the label of ``identifiers[i]``.
    """
    if len(identifiers) != len(labels):
        raise LocalProtocolError("identifiers and labels differ in length")
    outputs = oprf_direct(key, identifiers)
    deriver = tag_deriver(table_id)
    derive = deriver.derive
    ver = _VERSION.pack(version)
    nonce = _nonce(version)
    prefix = _AD_PREFIX + table_id + ver
    pad_to = label_size
    rows: list[bytes] = []
    append = rows.append
    mv = memoryview(outputs)
    for i, label in enumerate(labels):
        tag, lkey = derive(bytes(mv[32 * i : 32 * i + 32]))
        n = len(label)
        if n > pad_to:
            raise LocalProtocolError(
                f"label of {n} bytes exceeds label_size {pad_to} (chunk row {i})"
            )
        plain = n.to_bytes(2, "big") + label + bytes(pad_to - n)
        append(tag + ver + AESGCM(lkey).encrypt(nonce, plain, prefix + tag))
    return b"".join(rows)


def evaluate_job(key: bytes, blinded: bytes) -> bytes:
    """Owner, online: the OPRF evaluation of one request (one X25519 per point)."""
    return evaluate(key, blinded)


def blind_job(r: bytes, identifiers: Sequence[bytes]) -> bytes:
    """Querier: blinded points for a list of identifiers."""
    return blind(r, identifiers)


def unblind_derive_job(
    s: bytes, table_id: bytes, evaluated: bytes
) -> list[tuple[bytes, bytes]]:
    """Querier: ``(tag, label key)`` for every evaluated point."""
    return tag_deriver(table_id).derive_many(unblind(s, evaluated))
