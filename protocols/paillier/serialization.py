"""Documented JSON and compact bytes formats for Paillier keys and ciphertext vectors.

Never pickle: keys and vectors refuse it. Both formats carry the same fields; the bytes form
is the canonical one and the JSON form's ``sha256`` is the digest of the equivalent bytes,
so a JSON document and its bytes twin verify identically. The layout is specified in
docs/protocols/paillier.md; summary (all integers big-endian):

    magic "CRPA" | version u8 (=1) | kind u8 | body | sha256(all preceding bytes) (32 bytes)

    kind 1 public key   body: len u16 | n
    kind 2 private key  body: len u16 | n | len u16 | p | len u16 | q        (SECRET)
    kind 3 vector       body: key_id 16 | frac_bits u16 | len u16 | context | count u32
                              | width u16 | count x width-byte ciphertexts
    kind 4 packed       body: key_id 16 | frac_bits u16 | len u16 | context | value_bits u16
                              | headroom_bits u16 | slots u16 | weight u64 | values u32
                              | count u32 | width u16 | count x width-byte ciphertexts

``context`` is caller-chosen bytes (e.g. session id and round) bound into the digest; a
loader given ``expected_context`` rejects a vector made for another session or round. The
digest detects corruption and naive tampering; it is not a signature: authenticity comes
from the authenticated transport (mutual TLS) and signed protocol messages.

Vectors leave through :meth:`for_transport` (re-randomised) unless ``rerandomize=False``.

Loading never trusts its input: every length, range, key id and ciphertext is checked and
any failure raises :class:`PaillierFormatError` (or :class:`PaillierKeyMismatchError`) that
names the field; no secret material is echoed. This module does no file or network I/O.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
from typing import Any

from protocols.paillier.errors import (
    KeySizeError,
    PaillierFormatError,
    PaillierKeyMismatchError,
)
from protocols.paillier.keys import KEY_ID_BYTES, PrivateKey, PublicKey
from protocols.paillier.packing import PackedVector, PackingLayout
from protocols.paillier.vector import EncryptedVector

MAGIC = b"CRPA"
VERSION = 1
KIND_PUBLIC_KEY = 1
KIND_PRIVATE_KEY = 2
KIND_VECTOR = 3
KIND_PACKED = 4
_KIND_NAMES = {
    KIND_PUBLIC_KEY: "public-key",
    KIND_PRIVATE_KEY: "private-key",
    KIND_VECTOR: "ciphertext-vector",
    KIND_PACKED: "packed-vector",
}
_COMMON_FIELDS = {"format", "version", "kind", "sha256"}
_JSON_FIELDS = {
    KIND_PUBLIC_KEY: _COMMON_FIELDS | {"n", "key_id"},
    KIND_PRIVATE_KEY: _COMMON_FIELDS | {"warning", "n", "p", "q", "key_id"},
    KIND_VECTOR: _COMMON_FIELDS | {"key_id", "frac_bits", "context", "ciphertexts"},
    KIND_PACKED: _COMMON_FIELDS
    | {"key_id", "frac_bits", "context", "packing", "weight", "values", "ciphertexts"},
}
JSON_FORMAT = "cleanroom-paillier"
_DIGEST = 32
_MAX_BIGINT_BYTES = 4096  # 32768-bit numbers; far above any key we accept

Serialisable = PublicKey | PrivateKey | EncryptedVector | PackedVector


# -- primitive writers/readers -------------------------------------------------------------
def _u(v: int, size: int, field: str) -> bytes:
    if not 0 <= v < 1 << (8 * size):
        raise PaillierFormatError(f"value does not fit {size} bytes", field=field)
    return v.to_bytes(size, "big")


def _bigint(v: int, field: str) -> bytes:
    raw = int(v).to_bytes((int(v).bit_length() + 7) // 8 or 1, "big")
    return _u(len(raw), 2, field) + raw


class _Reader:
    def __init__(self, data: bytes, what: str) -> None:
        self.data = data
        self.pos = 0
        self.what = what

    def raw(self, size: int, field: str) -> bytes:
        if size < 0 or self.pos + size > len(self.data):
            raise PaillierFormatError(f"{self.what}: truncated", field=field)
        out = self.data[self.pos : self.pos + size]
        self.pos += size
        return out

    def uint(self, size: int, field: str) -> int:
        return int.from_bytes(self.raw(size, field), "big")

    def bigint(self, field: str) -> int:
        size = self.uint(2, field)
        if size == 0 or size > _MAX_BIGINT_BYTES:
            raise PaillierFormatError(f"{self.what}: bad length {size}", field=field)
        raw = self.raw(size, field)
        if size > 1 and raw[0] == 0:
            raise PaillierFormatError(f"{self.what}: non-minimal integer", field=field)
        return int.from_bytes(raw, "big")

    def done(self) -> None:
        if self.pos != len(self.data):
            raise PaillierFormatError(
                f"{self.what}: {len(self.data) - self.pos} unexpected trailing bytes",
                field="length",
            )


def _width(pk: PublicKey) -> int:
    return (pk.nsquare.bit_length() + 7) // 8


# -- body builders (shared by both formats) ------------------------------------------------
def _public_body(n: int) -> bytes:
    return _bigint(n, "n")


def _private_body(n: int, p: int, q: int) -> bytes:
    return _bigint(n, "n") + _bigint(p, "p") + _bigint(q, "q")


def _vector_body(key_id: bytes, frac_bits: int, context: bytes, cts: list[int],
                 width: int) -> bytes:
    parts = [key_id, _u(frac_bits, 2, "frac_bits"), _u(len(context), 2, "context"), context,
             _u(len(cts), 4, "count"), _u(width, 2, "width")]
    parts.extend(int(c).to_bytes(width, "big") for c in cts)
    return b"".join(parts)


def _packed_body(key_id: bytes, frac_bits: int, context: bytes, layout: PackingLayout,
                 weight: int, values: int, cts: list[int], width: int) -> bytes:
    parts = [key_id, _u(frac_bits, 2, "frac_bits"), _u(len(context), 2, "context"), context,
             _u(layout.value_bits, 2, "value_bits"), _u(layout.headroom_bits, 2,
                                                         "headroom_bits"),
             _u(layout.slots, 2, "slots"), _u(weight, 8, "weight"), _u(values, 4, "values"),
             _u(len(cts), 4, "count"), _u(width, 2, "width")]
    parts.extend(int(c).to_bytes(width, "big") for c in cts)
    return b"".join(parts)


def _frame(kind: int, body: bytes) -> bytes:
    head = MAGIC + bytes([VERSION, kind]) + body
    return head + hashlib.sha256(head).digest()


def _body_of(obj: Serialisable, context: bytes, rerandomize: bool) -> tuple[int, bytes]:
    if not isinstance(context, bytes):
        raise TypeError("context must be bytes")
    if isinstance(obj, PublicKey):
        return KIND_PUBLIC_KEY, _public_body(obj.n)
    if isinstance(obj, PrivateKey):
        return KIND_PRIVATE_KEY, _private_body(obj.public_key.n, obj.p, obj.q)
    if isinstance(obj, EncryptedVector):
        v = obj.for_transport() if rerandomize else obj
        pk = v.public_key
        return KIND_VECTOR, _vector_body(pk.key_id, v.frac_bits, context, v.ciphertexts,
                                         _width(pk))
    if isinstance(obj, PackedVector):
        pv = obj.for_transport() if rerandomize else obj
        pk = pv.public_key
        return KIND_PACKED, _packed_body(pk.key_id, pv.frac_bits, context, pv.layout,
                                         pv.weight, pv.count, pv.ciphertexts, _width(pk))
    raise TypeError(f"cannot serialise {type(obj).__name__}")


# -- public writers ------------------------------------------------------------------------
def to_bytes(obj: Serialisable, *, context: bytes = b"", rerandomize: bool = True) -> bytes:
    """Compact bytes. Vectors are re-randomised first unless ``rerandomize=False``.

    WARNING: for a :class:`PrivateKey` the output is the secret key in clear.
    """
    kind, body = _body_of(obj, context, rerandomize)
    return _frame(kind, body)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64int(v: int, width: int | None = None) -> str:
    size = width if width is not None else (int(v).bit_length() + 7) // 8 or 1
    return _b64(int(v).to_bytes(size, "big"))


def to_json(obj: Serialisable, *, context: bytes = b"", rerandomize: bool = True) -> str:
    """JSON text with the same content as :func:`to_bytes` (integers as base64url).

    WARNING: for a :class:`PrivateKey` the output is the secret key in clear.
    """
    if isinstance(obj, EncryptedVector | PackedVector) and rerandomize:
        obj = obj.for_transport()
    kind, body = _body_of(obj, context, False)
    digest = hashlib.sha256(MAGIC + bytes([VERSION, kind]) + body).hexdigest()
    doc: dict[str, Any] = {"format": JSON_FORMAT, "version": VERSION,
                           "kind": _KIND_NAMES[kind]}
    if isinstance(obj, PublicKey):
        doc.update(n=_b64int(obj.n), key_id=obj.key_id.hex())
    elif isinstance(obj, PrivateKey):
        doc.update(
            warning="SECRET Paillier private key: never send it to a peer or log it",
            n=_b64int(obj.public_key.n), p=_b64int(obj.p), q=_b64int(obj.q),
            key_id=obj.public_key.key_id.hex(),
        )
    else:
        pk = obj.public_key
        w = _width(pk)
        doc.update(key_id=pk.key_id.hex(), frac_bits=obj.frac_bits, context=_b64(context))
        if isinstance(obj, PackedVector):
            doc.update(
                packing={"value_bits": obj.layout.value_bits,
                         "headroom_bits": obj.layout.headroom_bits,
                         "slots": obj.layout.slots},
                weight=obj.weight, values=obj.count,
            )
        doc["ciphertexts"] = [_b64int(c, w) for c in obj.ciphertexts]
    doc["sha256"] = digest
    return json.dumps(doc, separators=(",", ":"))


# -- parsing -------------------------------------------------------------------------------
def _unframe(data: bytes, expect_kind: int) -> _Reader:
    what = _KIND_NAMES[expect_kind]
    if len(data) < len(MAGIC) + 2 + _DIGEST:
        raise PaillierFormatError(f"{what}: too short", field="length")
    if data[:4] != MAGIC:
        raise PaillierFormatError(f"{what}: not a cleanroom Paillier encoding", field="magic")
    if data[4] != VERSION:
        raise PaillierFormatError(f"{what}: unsupported version {data[4]}", field="version")
    if data[5] != expect_kind:
        got = _KIND_NAMES.get(data[5], f"unknown kind {data[5]}")
        raise PaillierFormatError(f"expected a {what}, got {got}", field="kind")
    head, digest = data[:-_DIGEST], data[-_DIGEST:]
    if not hmac.compare_digest(hashlib.sha256(head).digest(), digest):
        raise PaillierFormatError(f"{what}: checksum mismatch (corrupted or altered)",
                                  field="sha256")
    return _Reader(head[6:], what)


def _public_key_from_n(n: int) -> PublicKey:
    try:
        return PublicKey(n)
    except KeySizeError as exc:
        raise PaillierFormatError(str(exc), field="n") from exc


def _check_context(context: bytes, expected: bytes | None) -> None:
    if expected is not None and not hmac.compare_digest(context, expected):
        raise PaillierFormatError("vector was made for another session or round",
                                  field="context", status_hint=409)


def _check_key(key_id: bytes, public_key: PublicKey) -> None:
    if not hmac.compare_digest(key_id, public_key.key_id):
        raise PaillierKeyMismatchError(
            f"ciphertexts are under key {key_id.hex()}, expected {public_key.key_id.hex()}",
            field="key_id",
        )


def _read_cts(r: _Reader, public_key: PublicKey) -> list[int]:
    count = r.uint(4, "count")
    width = r.uint(2, "width")
    if width != _width(public_key):
        raise PaillierFormatError(f"ciphertext width {width} does not match the key",
                                  field="width")
    remaining = len(r.data) - r.pos
    if count * width != remaining:
        raise PaillierFormatError(
            f"declared {count} ciphertexts of {width} bytes but {remaining} bytes remain",
            field="count",
        )
    raw = r.raw(count * width, "ciphertexts")
    return [int.from_bytes(raw[i * width : (i + 1) * width], "big") for i in range(count)]


def _parse_json(text: str | bytes, expect_kind: int) -> dict[str, Any]:
    what = _KIND_NAMES[expect_kind]
    try:
        doc = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise PaillierFormatError(f"{what}: not valid JSON ({exc.__class__.__name__})",
                                  field="json") from exc
    if not isinstance(doc, dict):
        raise PaillierFormatError(f"{what}: JSON must be an object", field="json")
    if doc.get("format") != JSON_FORMAT:
        raise PaillierFormatError(f"{what}: not a cleanroom Paillier document", field="format")
    version = doc.get("version")
    if type(version) is not int or version != VERSION:  # JSON true == 1 in Python: refuse it
        raise PaillierFormatError(f"{what}: unsupported version", field="version")
    if doc.get("kind") != what:
        raise PaillierFormatError(f"expected a {what}, got {str(doc.get('kind'))[:40]!r}",
                                  field="kind")
    unknown = sorted(str(k)[:40] for k in doc if k not in _JSON_FIELDS[expect_kind])
    if unknown:
        raise PaillierFormatError(f"{what}: unexpected field", field=unknown[0])
    return doc


def _get(doc: dict[str, Any], name: str, typ: type) -> Any:
    if name not in doc:
        raise PaillierFormatError("missing", field=name)
    v = doc[name]
    if typ is int and (isinstance(v, bool) or not isinstance(v, int)):
        raise PaillierFormatError("must be an integer", field=name)
    if not isinstance(v, typ):
        raise PaillierFormatError(f"must be a {typ.__name__}", field=name)
    return v


def _unb64(s: Any, field: str) -> bytes:
    if not isinstance(s, str):
        raise PaillierFormatError("must be a base64url string", field=field)
    try:
        return base64.b64decode(s + "=" * (-len(s) % 4), altchars=b"-_", validate=True)
    except (binascii.Error, ValueError) as exc:
        raise PaillierFormatError("invalid base64url", field=field) from exc


def _json_int(doc: dict[str, Any], name: str) -> int:
    raw = _unb64(_get(doc, name, str), name)
    if not raw or len(raw) > _MAX_BIGINT_BYTES:
        raise PaillierFormatError("bad integer length", field=name)
    return int.from_bytes(raw, "big")


def _verify_json_digest(doc: dict[str, Any], kind: int, body: bytes) -> None:
    given = _get(doc, "sha256", str)
    want = hashlib.sha256(MAGIC + bytes([VERSION, kind]) + body).hexdigest()
    if not hmac.compare_digest(given.lower().encode("utf-8", "replace"), want.encode()):
        raise PaillierFormatError(f"{_KIND_NAMES[kind]}: checksum mismatch "
                                  "(corrupted or altered)", field="sha256")


def _json_cts(doc: dict[str, Any], width: int) -> list[int]:
    items = _get(doc, "ciphertexts", list)
    out = []
    for i, s in enumerate(items):
        raw = _unb64(s, f"ciphertexts[{i}]")
        if len(raw) != width:
            raise PaillierFormatError(f"must be {width} bytes", field=f"ciphertexts[{i}]")
        out.append(int.from_bytes(raw, "big"))
    return out


def _classify(data: bytes | str) -> tuple[bool, bytes]:
    """(is_json, raw bytes). JSON starts with "{"; bytes start with the magic."""
    if isinstance(data, str):
        try:
            return True, data.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise PaillierFormatError("not valid UTF-8 text", field="json") from exc
    if not isinstance(data, bytes | bytearray | memoryview):
        raise PaillierFormatError("expected bytes or str", field="data")
    raw = bytes(data)
    return raw[:1] == b"{", raw


# -- public loaders ------------------------------------------------------------------------
def load_public_key(data: bytes | str) -> PublicKey:
    """A public key from :func:`to_bytes` or :func:`to_json` output."""
    is_json, raw = _classify(data)
    if is_json:
        doc = _parse_json(raw, KIND_PUBLIC_KEY)
        n = _json_int(doc, "n")
        _verify_json_digest(doc, KIND_PUBLIC_KEY, _public_body(n))
        pk = _public_key_from_n(n)
        if _get(doc, "key_id", str) != pk.key_id.hex():
            raise PaillierFormatError("key_id does not match n", field="key_id")
        return pk
    r = _unframe(raw, KIND_PUBLIC_KEY)
    n = r.bigint("n")
    r.done()
    return _public_key_from_n(n)


def load_private_key(data: bytes | str) -> PrivateKey:
    """A private key (SECRET: only ever load your own key from your own storage)."""
    is_json, raw = _classify(data)
    if is_json:
        doc = _parse_json(raw, KIND_PRIVATE_KEY)
        n, p, q = _json_int(doc, "n"), _json_int(doc, "p"), _json_int(doc, "q")
        _verify_json_digest(doc, KIND_PRIVATE_KEY, _private_body(n, p, q))
    else:
        r = _unframe(raw, KIND_PRIVATE_KEY)
        n, p, q = r.bigint("n"), r.bigint("p"), r.bigint("q")
        r.done()
    pk = _public_key_from_n(n)
    if is_json and _get(doc, "key_id", str) != pk.key_id.hex():
        raise PaillierFormatError("key_id does not match n", field="key_id")
    return PrivateKey(pk, p, q)


def load_vector(
    data: bytes | str, public_key: PublicKey, *, expected_context: bytes | None = None
) -> EncryptedVector:
    """A ciphertext vector, checked against ``public_key`` (and ``expected_context``)."""
    width = _width(public_key)
    is_json, raw = _classify(data)
    if is_json:
        doc = _parse_json(raw, KIND_VECTOR)
        key_id = bytes.fromhex(_get(doc, "key_id", str)) if _is_hex(doc.get("key_id")) else b""
        if len(key_id) != KEY_ID_BYTES:
            raise PaillierFormatError("must be 32 hex digits", field="key_id")
        frac_bits = _get(doc, "frac_bits", int)
        context = _unb64(_get(doc, "context", str), "context")
        cts = _json_cts(doc, width)
        _verify_json_digest(doc, KIND_VECTOR,
                            _vector_body(key_id, frac_bits, context, cts, width))
    else:
        r = _unframe(raw, KIND_VECTOR)
        key_id = r.raw(KEY_ID_BYTES, "key_id")
        frac_bits = r.uint(2, "frac_bits")
        context = r.raw(r.uint(2, "context"), "context")
        cts = _read_cts(r, public_key)
        r.done()
    _check_key(key_id, public_key)
    _check_context(context, expected_context)
    return EncryptedVector(public_key, cts, frac_bits)


def load_packed(
    data: bytes | str, public_key: PublicKey, *, expected_context: bytes | None = None
) -> PackedVector:
    """A packed ciphertext vector, checked against ``public_key`` (and ``expected_context``)."""
    width = _width(public_key)
    is_json, raw = _classify(data)
    if is_json:
        doc = _parse_json(raw, KIND_PACKED)
        key_id = bytes.fromhex(_get(doc, "key_id", str)) if _is_hex(doc.get("key_id")) else b""
        if len(key_id) != KEY_ID_BYTES:
            raise PaillierFormatError("must be 32 hex digits", field="key_id")
        frac_bits = _get(doc, "frac_bits", int)
        context = _unb64(_get(doc, "context", str), "context")
        packing = _get(doc, "packing", dict)
        layout = PackingLayout(_get(packing, "value_bits", int),
                               _get(packing, "headroom_bits", int), _get(packing, "slots", int))
        weight = _get(doc, "weight", int)
        values = _get(doc, "values", int)
        cts = _json_cts(doc, width)
        _verify_json_digest(doc, KIND_PACKED, _packed_body(key_id, frac_bits, context, layout,
                                                           weight, values, cts, width))
    else:
        r = _unframe(raw, KIND_PACKED)
        key_id = r.raw(KEY_ID_BYTES, "key_id")
        frac_bits = r.uint(2, "frac_bits")
        context = r.raw(r.uint(2, "context"), "context")
        layout = PackingLayout(r.uint(2, "value_bits"), r.uint(2, "headroom_bits"),
                               r.uint(2, "slots"))
        weight = r.uint(8, "weight")
        values = r.uint(4, "values")
        cts = _read_cts(r, public_key)
        r.done()
    _check_key(key_id, public_key)
    _check_context(context, expected_context)
    return PackedVector(public_key, cts, layout=layout, count=values, weight=weight,
                        frac_bits=frac_bits)


def _is_hex(v: Any) -> bool:
    if not isinstance(v, str) or len(v) != 2 * KEY_ID_BYTES:
        return False
    try:
        bytes.fromhex(v)
    except ValueError:
        return False
    return True
