"""Typed, versioned wire messages of the vertical LR and lead-grading protocols.

One envelope for every message; all integers big-endian::

    offset size field
    0      4    magic       b"CRVL"
    4      1    version     1
    5      1    type        MsgType
    6      1    sender      Party
    7      1    recipient   Party
    8      16   session_id
    24     4    seq         epoch (training), batch id (grading) or 0 (setup)
    28     2    parts       number of parts that follow
    then   parts x (len u32 | bytes)

What each part holds is documented on :class:`MsgType`. Paillier ciphertexts inside parts
use the Paillier layer's bytes format (re-randomised, checksummed, bound to a context made
from the envelope fields, see :func:`context`), so a ciphertext lifted from one message and
put into another is rejected. Decoding is strict: anything malformed raises
:class:`~protocols.errors.RemoteProtocolError` (400). No pickle; no I/O here.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum

from protocols.errors import RemoteProtocolError

MAGIC = b"CRVL"
VERSION = 1
SESSION_ID_BYTES = 16
MAX_PARTS = 64
MAX_PART_BYTES = 1 << 30
_HEAD = struct.Struct(">4sBBBB16sIH")


class Party(IntEnum):
    GUEST = 1  # the OEM: labels, CRM features
    MEDIA = 2  # host: behaviour features; key holder in strict grading
    DEALER = 3  # host: visit features


class MsgType(IntEnum):
    """Message types and their parts.

    Training (:mod:`protocols.vertical_lr.training`):

    * ``KEYS`` (setup): [config digest 32, Paillier public key, X25519 public key or b""]
    * ``ROWS`` (setup, host -> exponent holder): [packed encrypted rows, under the sender's key]
    * ``MASKED`` (setup, exponent holder -> row owner): [masked packed Gram block under the
      row owner's key, exponent holder's share under its own key]
    * ``SHARE`` (setup, row owner -> exponent holder): [row owner's share under its own key]
    * ``CONTROL`` (guest -> hosts, before every epoch): [u8 action (1 go, 2 stop), u32 best
      check]
    * ``CROSS`` (epoch, host -> aggregator): [u8 beneficiary Party, cross term under the
      beneficiary's key]
    * ``AGG`` (epoch, aggregator -> beneficiary): [sum of cross terms under its key]
    * ``VAL`` (eval epochs, host -> guest): [validation partial scores + cancelling mask,
      u64 each]
    * ``READY`` (setup, host -> guest): [] the host's setup is complete

    Grading (:mod:`protocols.vertical_lr.scoring`):

    * ``BLIND`` (OEM -> key holder): [u32 values, u16 slot bits, packed blinded comparisons]
    * ``SIGNS`` (key holder -> OEM): [bitmap, one bit per value]
    """

    KEYS = 1
    ROWS = 2
    MASKED = 3
    SHARE = 4
    CONTROL = 5
    CROSS = 6
    AGG = 7
    VAL = 8
    READY = 9
    BLIND = 20
    SIGNS = 21


@dataclass(frozen=True)
class Message:
    type: MsgType
    sender: Party
    recipient: Party
    session_id: bytes
    seq: int
    parts: tuple[bytes, ...]

    def to_bytes(self) -> bytes:
        if len(self.session_id) != SESSION_ID_BYTES:
            raise ValueError("session_id must be 16 bytes")
        out = [_HEAD.pack(MAGIC, VERSION, self.type, self.sender, self.recipient,
                          self.session_id, self.seq, len(self.parts))]
        for p in self.parts:
            out.append(len(p).to_bytes(4, "big"))
            out.append(p)
        return b"".join(out)

    def context(self, index: int) -> bytes:
        return context(self.type, self.sender, self.recipient, self.session_id, self.seq, index)


def context(mtype: MsgType, sender: Party, recipient: Party, session_id: bytes, seq: int,
            index: int) -> bytes:
    """Context bytes bound into Paillier vectors carried in part ``index`` of a message."""
    return (b"vlr/v1" + bytes([mtype, sender, recipient]) + session_id
            + seq.to_bytes(4, "big") + index.to_bytes(2, "big"))


def _fail(reason: str) -> RemoteProtocolError:
    return RemoteProtocolError(f"malformed vertical-LR message: {reason}", status_hint=400)


def decode(data: bytes) -> Message:
    """Parse and validate an envelope (not the parts' contents)."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise _fail("expected bytes")
    raw = bytes(data)
    if len(raw) < _HEAD.size:
        raise _fail(f"truncated header ({len(raw)} bytes)")
    magic, version, mtype, sender, recipient, sid, seq, nparts = _HEAD.unpack_from(raw)
    if magic != MAGIC:
        raise _fail("bad magic")
    if version != VERSION:
        raise _fail(f"unsupported version {version}")
    try:
        kind = MsgType(mtype)
        src, dst = Party(sender), Party(recipient)
    except ValueError:
        raise _fail("unknown message type or party") from None
    if src == dst:
        raise _fail("sender equals recipient")
    if nparts > MAX_PARTS:
        raise _fail(f"too many parts ({nparts})")
    pos = _HEAD.size
    parts: list[bytes] = []
    for i in range(nparts):
        if pos + 4 > len(raw):
            raise _fail(f"part {i}: truncated length")
        size = int.from_bytes(raw[pos : pos + 4], "big")
        pos += 4
        if size > MAX_PART_BYTES or pos + size > len(raw):
            raise _fail(f"part {i}: truncated")
        parts.append(raw[pos : pos + size])
        pos += size
    if pos != len(raw):
        raise _fail(f"{len(raw) - pos} trailing bytes")
    return Message(kind, src, dst, sid, seq, tuple(parts))


def u8(part: bytes, field: str) -> int:
    if len(part) != 1:
        raise _fail(f"{field}: expected 1 byte")
    return part[0]


def u32(part: bytes, field: str) -> int:
    if len(part) != 4:
        raise _fail(f"{field}: expected 4 bytes")
    return int.from_bytes(part, "big")
