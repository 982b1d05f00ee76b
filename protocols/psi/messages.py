"""Typed, versioned wire messages of the bucketed ECDH PSI protocol, and their byte format.

Every message is a fixed 32-byte header followed by a body; all integers are big-endian.

Header::

    offset size field
    0      4    magic       b"CRPS"
    4      1    version     1
    5      1    type        1 HELLO, 2 HELLO_ACK, 3 REQUEST, 4 RESPONSE
    6      1    round       must equal the type's round (1..4)
    7      1    flags       0 (reserved; anything else is rejected)
    8      16   session_id
    24     4    bucket      bucket id (0xFFFFFFFF for HELLO / HELLO_ACK)
    28     4    body_len    exact length of the body that follows

Bodies are documented on each class. Decoding is strict: wrong magic, version, type,
round, flags, lengths, reserved bytes or trailing data raise
:class:`~protocols.errors.RemoteProtocolError` (status 400). No pickle, no variable-length
integers. This module does no I/O and never sees raw identifiers (only curve points).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum

from protocols.errors import RemoteProtocolError

MAGIC = b"CRPS"
VERSION = 1
NO_BUCKET = 0xFFFFFFFF
SESSION_ID_BYTES = 16
NONCE_BYTES = 32
POINT_BYTES = 32
MAX_BUCKETS = 1 << 16
MAX_POINTS_PER_MESSAGE = 1 << 22
MAX_LABEL_BYTES = 32

HEADER = struct.Struct(">4sBBBB16sII")
_HELLO = struct.Struct(">BBBBI32s")
_RESPONSE_HEAD = struct.Struct(">IIB3s")


class MsgType(IntEnum):
    HELLO = 1
    HELLO_ACK = 2
    REQUEST = 3
    RESPONSE = 4


ROUND_OF: dict[MsgType, int] = {
    MsgType.HELLO: 1,
    MsgType.HELLO_ACK: 2,
    MsgType.REQUEST: 3,
    MsgType.RESPONSE: 4,
}


class Mode(IntEnum):
    """What the requester learns: its matched items, or only their number."""

    INTERSECTION = 1
    CARDINALITY = 2


class Suite(IntEnum):
    """Group and hash-to-curve suite."""

    X25519_ELL2_NU_SHA512 = 1


def _header(kind: MsgType, session_id: bytes, bucket: int, body: bytes) -> bytes:
    head = HEADER.pack(MAGIC, VERSION, kind, ROUND_OF[kind], 0, session_id, bucket, len(body))
    return head + body


@dataclass(frozen=True)
class Hello:
    """Round 1, requester -> responder. Body (40 bytes)::

    mode u8 | suite u8 | want_labels u8 | reserved u8 (0) | bucket_count u32 | nonce 32
    """

    session_id: bytes
    mode: Mode
    suite: Suite
    want_labels: bool
    bucket_count: int
    nonce: bytes

    def to_bytes(self) -> bytes:
        body = _HELLO.pack(
            self.mode, self.suite, int(self.want_labels), 0, self.bucket_count, self.nonce
        )
        return _header(MsgType.HELLO, self.session_id, NO_BUCKET, body)


@dataclass(frozen=True)
class HelloAck:
    """Round 2, responder -> requester: accepts the parameters. Body (40 bytes)::

    mode u8 | suite u8 | label_len u8 | reserved u8 (0) | bucket_count u32 | nonce 32

    ``label_len`` is 0 (no labels) or the byte length of each responder label.
    """

    session_id: bytes
    mode: Mode
    suite: Suite
    label_len: int
    bucket_count: int
    nonce: bytes

    def to_bytes(self) -> bytes:
        body = _HELLO.pack(self.mode, self.suite, self.label_len, 0, self.bucket_count, self.nonce)
        return _header(MsgType.HELLO_ACK, self.session_id, NO_BUCKET, body)


@dataclass(frozen=True)
class Request:
    """Round 3, requester -> responder, one per bucket. Body::

    count u32 | count x 32-byte u-coordinates  (a·H(x) for the bucket's distinct items)
    """

    session_id: bytes
    bucket: int
    points: bytes

    @property
    def count(self) -> int:
        return len(self.points) // POINT_BYTES

    def to_bytes(self) -> bytes:
        body = self.count.to_bytes(4, "big") + self.points
        return _header(MsgType.REQUEST, self.session_id, self.bucket, body)


@dataclass(frozen=True)
class Response:
    """Round 4, responder -> requester, one per bucket. Body::

    peer_count u32 | own_count u32 | label_len u8 | reserved 3 bytes (0)
    | peer_count x 32  b·(a·H(x)), in request order (intersection) or shuffled (cardinality)
    | own_count x 32   b·H(y), shuffled
    | own_count x label_len  labels aligned with the own list (only if negotiated)
    """

    session_id: bytes
    bucket: int
    peer_points: bytes
    own_points: bytes
    label_len: int
    labels: bytes

    @property
    def peer_count(self) -> int:
        return len(self.peer_points) // POINT_BYTES

    @property
    def own_count(self) -> int:
        return len(self.own_points) // POINT_BYTES

    def to_bytes(self) -> bytes:
        head = _RESPONSE_HEAD.pack(self.peer_count, self.own_count, self.label_len, bytes(3))
        body = head + self.peer_points + self.own_points + self.labels
        return _header(MsgType.RESPONSE, self.session_id, self.bucket, body)


Message = Hello | HelloAck | Request | Response


def _fail(reason: str) -> RemoteProtocolError:
    return RemoteProtocolError(f"malformed PSI message: {reason}", status_hint=400)


def peek_type(data: bytes) -> MsgType:
    """Message type from a header, validated (used by role objects before full decoding)."""
    if len(data) < HEADER.size:
        raise _fail(f"truncated header ({len(data)} of {HEADER.size} bytes)")
    magic, version, kind, rnd, flags, _sid, _bucket, body_len = HEADER.unpack_from(data)
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
            status_hint=409,
        )
    if flags != 0:
        raise _fail("reserved flags set")
    if body_len != len(data) - HEADER.size:
        raise _fail(f"body length {body_len} but {len(data) - HEADER.size} bytes follow")
    return mtype


def decode(data: bytes) -> Message:
    """Parse one message; raise RemoteProtocolError (400/409) on anything not well formed."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise _fail("message is not bytes")
    data = bytes(data)
    mtype = peek_type(data)
    _m, _v, _k, _r, _f, sid, bucket, _len = HEADER.unpack_from(data)
    body = data[HEADER.size :]
    if mtype in (MsgType.HELLO, MsgType.HELLO_ACK):
        if bucket != NO_BUCKET:
            raise _fail("handshake message carries a bucket id")
        if len(body) != _HELLO.size:
            raise _fail(f"{mtype.name} body must be {_HELLO.size} bytes")
        mode_v, suite_v, third, reserved, bucket_count, nonce = _HELLO.unpack(body)
        if reserved != 0:
            raise _fail("reserved byte set")
        try:
            mode, suite = Mode(mode_v), Suite(suite_v)
        except ValueError:
            raise _fail("unknown mode or suite") from None
        if not 1 <= bucket_count <= MAX_BUCKETS:
            raise _fail(f"bucket_count {bucket_count} outside 1..{MAX_BUCKETS}")
        if mtype is MsgType.HELLO:
            if third not in (0, 1):
                raise _fail("want_labels must be 0 or 1")
            return Hello(sid, mode, suite, bool(third), bucket_count, nonce)
        if third > MAX_LABEL_BYTES:
            raise _fail(f"label_len {third} above {MAX_LABEL_BYTES}")
        return HelloAck(sid, mode, suite, third, bucket_count, nonce)
    if bucket >= MAX_BUCKETS:
        raise _fail("bucket id out of range")
    if mtype is MsgType.REQUEST:
        if len(body) < 4:
            raise _fail("truncated REQUEST body")
        count = int.from_bytes(body[:4], "big")
        if count > MAX_POINTS_PER_MESSAGE:
            raise _fail("too many points in one message")
        if len(body) != 4 + count * POINT_BYTES:
            raise _fail(f"REQUEST announces {count} points but carries {len(body) - 4} bytes")
        return Request(sid, bucket, body[4:])
    if len(body) < _RESPONSE_HEAD.size:
        raise _fail("truncated RESPONSE body")
    peer_count, own_count, label_len, reserved3 = _RESPONSE_HEAD.unpack_from(body)
    if reserved3 != bytes(3):
        raise _fail("reserved bytes set")
    if peer_count > MAX_POINTS_PER_MESSAGE or own_count > MAX_POINTS_PER_MESSAGE:
        raise _fail("too many points in one message")
    if label_len > MAX_LABEL_BYTES:
        raise _fail(f"label_len {label_len} above {MAX_LABEL_BYTES}")
    expected = _RESPONSE_HEAD.size + (peer_count + own_count) * POINT_BYTES + own_count * label_len
    if len(body) != expected:
        raise _fail(f"RESPONSE body is {len(body)} bytes, its counts say {expected}")
    o1 = _RESPONSE_HEAD.size
    o2 = o1 + peer_count * POINT_BYTES
    o3 = o2 + own_count * POINT_BYTES
    return Response(sid, bucket, body[o1:o2], body[o2:o3], label_len, body[o3:])
