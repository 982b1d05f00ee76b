"""Typed, versioned wire messages of the anonymous query (labeled PSI), and their bytes.

Same 32-byte header as the ECDH PSI (:data:`protocols.psi.messages.HEADER`, big-endian)
with its own magic::

    offset size field
    0      4    magic       b"CRLQ"
    4      1    version     1
    5      1    type        1 EVAL_REQUEST, 2 EVAL_RESPONSE, 3 BUCKET_REQUEST,
                            4 BUCKET_RESPONSE, 5 TABLE_REQUEST, 6 TABLE_RESPONSE
    6      1    round       the type's round: 1, 2, 3, 4, 1, 2
    7      1    flags       0
    8      16   session_id
    24     4    bucket      unused: 0xFFFFFFFF (bucket ids travel in the body)
    28     4    body_len    exact length of the body

Bodies are documented on each class. Decoding is strict: anything not well formed
raises :class:`~protocols.errors.RemoteProtocolError` (400; 413 above a size limit;
409 for a type carrying the wrong round). Only blinded or evaluated curve points, counts,
bucket ids, table metadata and encrypted table rows appear here: never an identifier, a
hash of one or an OPRF output. No I/O.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from enum import IntEnum

from protocols.errors import RemoteProtocolError
from protocols.labeled_psi import oprf
from protocols.psi.messages import HEADER, NO_BUCKET, SESSION_ID_BYTES

MAGIC = b"CRLQ"
VERSION = 1
POINT_BYTES = oprf.POINT_BYTES
MAX_POINTS_PER_REQUEST = 1 << 20
MAX_BUCKETS_PER_REQUEST = 1 << 12
MAX_BLOB_BYTES = (1 << 32) - 1

_EVAL_REQ = struct.Struct(">BBHI")
_TABLE_INFO = struct.Struct(">16sIIQIHHI")
_BUCKET_REQ = struct.Struct(">II")
_TABLE_REQ = struct.Struct(">16sI")

__all__ = [
    "MAGIC",
    "SESSION_ID_BYTES",
    "BucketRequest",
    "BucketResponse",
    "EvalRequest",
    "EvalResponse",
    "Message",
    "Mode",
    "MsgType",
    "TableInfo",
    "TableRequest",
    "TableResponse",
    "decode",
]


class MsgType(IntEnum):
    EVAL_REQUEST = 1
    EVAL_RESPONSE = 2
    BUCKET_REQUEST = 3
    BUCKET_RESPONSE = 4
    TABLE_REQUEST = 5
    TABLE_RESPONSE = 6


ROUND_OF: dict[MsgType, int] = {
    MsgType.EVAL_REQUEST: 1,
    MsgType.EVAL_RESPONSE: 2,
    MsgType.BUCKET_REQUEST: 3,
    MsgType.BUCKET_RESPONSE: 4,
    MsgType.TABLE_REQUEST: 1,
    MsgType.TABLE_RESPONSE: 2,
}


class Mode(IntEnum):
    """Online mode of a session."""

    BATCH = 1  # OPRF evaluations only; lookups in a downloaded table
    REALTIME = 2  # OPRF evaluations, then one bucket per tag
    DOWNLOAD = 3  # table or delta download (no evaluations)


class Suite(IntEnum):
    X25519_ELL2_NU_HKDF_SHA512_AES256GCM = 1


def _header(kind: MsgType, session_id: bytes, body: bytes) -> bytes:
    return HEADER.pack(MAGIC, VERSION, kind, ROUND_OF[kind], 0, session_id, NO_BUCKET,
                       len(body)) + body


@dataclass(frozen=True)
class TableInfo:
    """Public metadata of the table version a session uses (36 bytes on the wire)::

    table_id 16 | version u32 | bucket_count u32 | entry_count u64 | min_bucket_size u32
    | label_size u16 | reserved u16 (0) | max_evaluations u32 (left in this session's budget;
    0xFFFFFFFF = no limit)
    """

    table_id: bytes
    version: int
    bucket_count: int
    entry_count: int
    min_bucket_size: int
    label_size: int
    evaluations_left: int = 0xFFFFFFFF

    def pack(self) -> bytes:
        return _TABLE_INFO.pack(self.table_id, self.version, self.bucket_count,
                                self.entry_count, self.min_bucket_size, self.label_size, 0,
                                self.evaluations_left)


@dataclass(frozen=True)
class EvalRequest:
    """Round 1, querier -> owner. Body::

    mode u8 (1 batch, 2 real-time) | suite u8 (1) | reserved u16 (0) | count u32
    | count x 32-byte X25519 u-coordinates  (r·H(x), blinded)
    """

    session_id: bytes
    mode: Mode
    points: bytes = field(repr=False)
    suite: Suite = Suite.X25519_ELL2_NU_HKDF_SHA512_AES256GCM

    @property
    def count(self) -> int:
        return len(self.points) // POINT_BYTES

    def to_bytes(self) -> bytes:
        body = _EVAL_REQ.pack(self.mode, self.suite, 0, self.count) + self.points
        return _header(MsgType.EVAL_REQUEST, self.session_id, body)


@dataclass(frozen=True)
class EvalResponse:
    """Round 2, owner -> querier. Body::

    TableInfo (36 bytes) | count u32 | count x 32-byte u-coordinates (k·r·H(x), same order)
    """

    session_id: bytes
    info: TableInfo
    points: bytes = field(repr=False)

    @property
    def count(self) -> int:
        return len(self.points) // POINT_BYTES

    def to_bytes(self) -> bytes:
        body = self.info.pack() + self.count.to_bytes(4, "big") + self.points
        return _header(MsgType.EVAL_RESPONSE, self.session_id, body)


@dataclass(frozen=True)
class BucketRequest:
    """Round 3 (real-time), querier -> owner. Body::

    version u32 | count u32 | count x bucket id u32 (strictly ascending)
    """

    session_id: bytes
    version: int
    buckets: tuple[int, ...]

    def to_bytes(self) -> bytes:
        body = _BUCKET_REQ.pack(self.version, len(self.buckets)) + b"".join(
            b.to_bytes(4, "big") for b in self.buckets
        )
        return _header(MsgType.BUCKET_REQUEST, self.session_id, body)


@dataclass(frozen=True)
class BucketResponse:
    """Round 4 (real-time), owner -> querier. Body::

    count u32 | count x (blob_len u32 | BUCKET blob, see protocols.labeled_psi.table)
    """

    session_id: bytes
    blobs: tuple[bytes, ...] = field(repr=False)

    def to_bytes(self) -> bytes:
        parts = [len(self.blobs).to_bytes(4, "big")]
        for blob in self.blobs:
            parts.append(len(blob).to_bytes(4, "big"))
            parts.append(blob)
        return _header(MsgType.BUCKET_RESPONSE, self.session_id, b"".join(parts))


@dataclass(frozen=True)
class TableRequest:
    """Round 1 (download), querier -> owner. Body (20 bytes)::

    table_id 16 (zeros: none held) | have_version u32 (0: none held)
    """

    session_id: bytes
    table_id: bytes
    have_version: int

    def to_bytes(self) -> bytes:
        return _header(MsgType.TABLE_REQUEST, self.session_id,
                       _TABLE_REQ.pack(self.table_id, self.have_version))


@dataclass(frozen=True)
class TableResponse:
    """Round 2 (download), owner -> querier. Body: one TABLE or DELTA blob."""

    session_id: bytes
    blob: bytes = field(repr=False)

    def to_bytes(self) -> bytes:
        return _header(MsgType.TABLE_RESPONSE, self.session_id, self.blob)


Message = EvalRequest | EvalResponse | BucketRequest | BucketResponse | TableRequest | TableResponse


def _fail(reason: str, status: int = 400) -> RemoteProtocolError:
    return RemoteProtocolError(f"malformed anonymous-query message: {reason}", status_hint=status)


def _points(body: memoryview, offset: int, what: str) -> bytes:
    if len(body) < offset + 4:
        raise _fail(f"truncated {what} body")
    count = int.from_bytes(body[offset : offset + 4], "big")
    if count > MAX_POINTS_PER_REQUEST:
        raise _fail(f"{count} points in one {what} exceed {MAX_POINTS_PER_REQUEST}", 413)
    if len(body) != offset + 4 + count * POINT_BYTES:
        raise _fail(f"{what} announces {count} points but carries "
                    f"{len(body) - offset - 4} bytes")
    return bytes(body[offset + 4 :])


def decode(data: bytes, *, max_bytes: int = MAX_BLOB_BYTES) -> Message:
    """Parse one message; RemoteProtocolError on anything not well formed."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise _fail("message is not bytes")
    if not isinstance(data, bytes):
        data = bytes(data)
    if len(data) > max_bytes:
        raise _fail(f"message of {len(data)} bytes exceeds {max_bytes}", 413)
    if len(data) < HEADER.size:
        raise _fail(f"truncated header ({len(data)} of {HEADER.size} bytes)")
    magic, version, kind, rnd, flags, sid, bucket, body_len = HEADER.unpack_from(data)
    if magic != MAGIC:
        raise _fail("bad magic")
    if version != VERSION:
        raise _fail(f"unsupported version {version}")
    try:
        mtype = MsgType(kind)
    except ValueError:
        raise _fail(f"unknown message type {kind}") from None
    if rnd != ROUND_OF[mtype]:
        raise RemoteProtocolError(
            f"message type {mtype.name} carries round {rnd}, expected {ROUND_OF[mtype]}",
            status_hint=409)
    if flags != 0:
        raise _fail("reserved flags set")
    if bucket != NO_BUCKET:
        raise _fail("header bucket field must be 0xFFFFFFFF")
    if body_len != len(data) - HEADER.size:
        raise _fail(f"body length {body_len} but {len(data) - HEADER.size} bytes follow")
    body = memoryview(data)[HEADER.size :]  # slices below copy only what they keep
    if mtype is MsgType.EVAL_REQUEST:
        if len(body) < _EVAL_REQ.size:
            raise _fail("truncated EVAL_REQUEST body")
        mode_v, suite_v, reserved, _count = _EVAL_REQ.unpack_from(body)
        if reserved:
            raise _fail("reserved bytes set")
        if mode_v not in (Mode.BATCH, Mode.REALTIME):
            raise _fail(f"EVAL_REQUEST mode {mode_v} is not batch or real-time")
        try:
            suite = Suite(suite_v)
        except ValueError:
            raise _fail(f"unknown suite {suite_v}") from None
        points = _points(body, _EVAL_REQ.size - 4, "EVAL_REQUEST")
        if not points:
            raise _fail("EVAL_REQUEST carries no points")
        return EvalRequest(sid, Mode(mode_v), points, suite)
    if mtype is MsgType.EVAL_RESPONSE:
        if len(body) < _TABLE_INFO.size:
            raise _fail("truncated EVAL_RESPONSE body")
        tid, ver, bcount, ecount, minb, lsize, reserved, left = _TABLE_INFO.unpack_from(body)
        if reserved:
            raise _fail("reserved bytes set")
        if ver < 1 or bcount < 1 or minb < 1 or not 1 <= lsize <= oprf.MAX_LABEL_SIZE:
            raise _fail("table info out of range")
        if bcount > max(ecount, 1):
            raise _fail("table info announces more buckets than entries")
        info = TableInfo(tid, ver, bcount, ecount, minb, lsize, left)
        return EvalResponse(sid, info, _points(body, _TABLE_INFO.size, "EVAL_RESPONSE"))
    if mtype is MsgType.BUCKET_REQUEST:
        if len(body) < _BUCKET_REQ.size:
            raise _fail("truncated BUCKET_REQUEST body")
        ver, count = _BUCKET_REQ.unpack_from(body)
        if count == 0:
            raise _fail("BUCKET_REQUEST asks for no bucket")
        if count > MAX_BUCKETS_PER_REQUEST:
            raise _fail(f"{count} buckets in one request exceed {MAX_BUCKETS_PER_REQUEST}", 413)
        if len(body) != _BUCKET_REQ.size + 4 * count:
            raise _fail(f"BUCKET_REQUEST announces {count} buckets, carries "
                        f"{len(body) - _BUCKET_REQ.size} bytes")
        ids = struct.unpack_from(f">{count}I", body, _BUCKET_REQ.size)
        if any(b >= a for a, b in zip(ids[1:], ids, strict=False)):
            raise _fail("bucket ids are not strictly ascending")
        return BucketRequest(sid, ver, tuple(ids))
    if mtype is MsgType.BUCKET_RESPONSE:
        if len(body) < 4:
            raise _fail("truncated BUCKET_RESPONSE body")
        count = int.from_bytes(body[:4], "big")
        if count > MAX_BUCKETS_PER_REQUEST:
            raise _fail("too many buckets in one response", 413)
        blobs: list[bytes] = []
        pos = 4
        for _ in range(count):
            if len(body) < pos + 4:
                raise _fail("truncated BUCKET_RESPONSE body")
            n = int.from_bytes(body[pos : pos + 4], "big")
            if len(body) < pos + 4 + n:
                raise _fail("truncated bucket blob")
            blobs.append(bytes(body[pos + 4 : pos + 4 + n]))
            pos += 4 + n
        if pos != len(body):
            raise _fail("trailing bytes after the last bucket")
        return BucketResponse(sid, tuple(blobs))
    if mtype is MsgType.TABLE_REQUEST:
        if len(body) != _TABLE_REQ.size:
            raise _fail(f"TABLE_REQUEST body must be {_TABLE_REQ.size} bytes")
        tid, have = _TABLE_REQ.unpack(body)
        if (tid == bytes(16)) != (have == 0):
            raise _fail("TABLE_REQUEST names a table without a version or the reverse")
        return TableRequest(sid, tid, have)
    if not body:
        raise _fail("empty TABLE_RESPONSE")
    return TableResponse(sid, bytes(body))
