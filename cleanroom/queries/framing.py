"""Envelope for runner-level session messages: ``magic(4) || version(1) || kind(1) || body``.

Runners that carry several message kinds on one lifecycle session (train_lead_model,
lead_score) tag each message with their own four-byte magic so a message of one runner
can never be taken for another's. Parsing failures are the peer's fault and raise
:class:`~protocols.errors.RemoteProtocolError` (a 4xx at the API). No I/O here.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from protocols.errors import RemoteProtocolError

_HEAD = struct.Struct(">4sBB")


@dataclass(frozen=True)
class Framing:
    magic: bytes
    version: int
    label: str  # for error messages, e.g. "vlr session"
    what: str  # e.g. "lead-model"

    def frame(self, kind: int, payload: bytes) -> bytes:
        return _HEAD.pack(self.magic, self.version, kind) + payload

    def unframe(self, data: bytes) -> tuple[int, bytes]:
        if len(data) < _HEAD.size:
            raise RemoteProtocolError(f"{self.label}: truncated frame")
        magic, version, kind = _HEAD.unpack_from(data)
        if magic != self.magic or version != self.version:
            raise RemoteProtocolError(f"{self.label}: not a {self.what} frame")
        return kind, data[_HEAD.size :]
