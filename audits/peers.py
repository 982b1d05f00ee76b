"""Fetching a peer's ledger checkpoint and consistency proof over the node transport.

:func:`transport_fetcher` returns a :data:`~audits.verify.FetchPeerCheckpoint` that calls
each pinned peer with :class:`cleanroom.transport.PeerClient` (mutual TLS, this node's
certificate and key, the peer's pinned certificate; imported only when a fetch happens).
It speaks the node's peer ledger API (:mod:`cleanroom.node.api_ledger`):

- ``GET /v1/peer/ledger/checkpoint?old=N`` -> ``{"note": "<signed note text>",
  "consistency": ["<base64 hash>", ...] | null, ...}``; when the proof is missing the
  fetcher asks ``GET /v1/peer/ledger/consistency?old=N&new=M`` -> ``{"old": N, "new": M,
  "proof": [...]}``;
- ``GET /v1/peer/ledger/witnessed?origin=<our origin>`` -> ``{"note": "<signed note>" |
  null}``: the last checkpoint of the *caller's* log that the peer cosigned. The node does
  not serve this yet; a 404 only skips that cross-check (see the module docstring of
  :mod:`audits.verify` for what it adds).

A 404 on the checkpoint endpoint means the peer runs a node without the ledger API:
``peer X does not serve ledger checkpoints``. Every failure is a
:class:`~cleanroom.errors.CleanroomError` naming the peer and the call. This module only
reads from peers; it sends no entry and no data.
"""

from __future__ import annotations

import base64
import binascii
from typing import Any

from audits.verify import FetchPeerCheckpoint, PeerLedgerReply, PeerLedgerRequest
from cleanroom.errors import CleanroomError
from cleanroom.node.config import NodeConfig
from cleanroom.node.identity import NodeIdentity

CHECKPOINT_PATH = "/v1/peer/ledger/checkpoint"
CONSISTENCY_PATH = "/v1/peer/ledger/consistency"
WITNESSED_PATH = "/v1/peer/ledger/witnessed"


class PeerLedgerError(CleanroomError):
    """A peer could not give its ledger checkpoint or proof."""


def _note(peer: str, path: str, data: Any, *, optional: bool = False) -> bytes | None:
    value = data.get("note") if isinstance(data, dict) else None
    if value is None and optional and isinstance(data, dict):
        return None
    if not isinstance(value, str) or not value:
        raise PeerLedgerError(f"peer {peer!r}: GET {path}: reply has no 'note' text")
    return value.encode("utf-8")


def _hashes(peer: str, path: str, items: Any) -> list[bytes]:
    if not isinstance(items, list):
        raise PeerLedgerError(f"peer {peer!r}: GET {path}: the proof is not a list")
    out: list[bytes] = []
    for i, item in enumerate(items):
        try:
            h = base64.b64decode(item, validate=True) if isinstance(item, str) else b""
        except (binascii.Error, ValueError):
            h = b""
        if len(h) != 32:
            raise PeerLedgerError(f"peer {peer!r}: GET {path}: proof[{i}] is not a base64 "
                                  "SHA-256 hash")
        out.append(h)
    return out


def _proof(peer: str, data: Any, old: int, new: int) -> list[bytes]:
    if not isinstance(data, dict) or data.get("old") != old or data.get("new") != new:
        raise PeerLedgerError(f"peer {peer!r}: GET {CONSISTENCY_PATH}: reply is not a proof "
                              f"from size {old} to {new}")
    return _hashes(peer, CONSISTENCY_PATH, data.get("proof"))


def transport_fetcher(config: NodeConfig) -> FetchPeerCheckpoint:
    """A fetch function over mutual TLS for the pinned peers of ``config``."""
    key_path, cert_path = NodeIdentity.paths(config.node_dir)

    def fetch(req: PeerLedgerRequest) -> PeerLedgerReply:
        from cleanroom.ledger.note import Checkpoint, parse_note
        from cleanroom.transport import PeerCallError, PeerClient

        peer = req.peer
        name = peer.name
        limits = config.limits
        try:
            client = PeerClient(
                peer_name=name, base_url=peer.url, peer_cert_pem=peer.cert_pem,
                peer_fingerprint=peer.fingerprint, own_cert_path=cert_path,
                own_key_path=key_path, timeout=limits.peer_timeout_seconds,
                retries=limits.peer_retries, max_response_bytes=limits.max_request_bytes)
        except (OSError, ValueError) as exc:
            raise PeerLedgerError(f"peer {name!r}: cannot set up TLS ({exc})") from None
        with client:
            try:
                first = client.get_json(CHECKPOINT_PATH, params={"old": str(req.old_size)})
                note = _note(name, CHECKPOINT_PATH, first)
            except PeerCallError as exc:
                if exc.status == 404:
                    raise PeerLedgerError(
                        f"peer {name} does not serve ledger checkpoints (GET "
                        f"{CHECKPOINT_PATH} returned 404)") from None
                raise
            except ValueError:
                raise PeerLedgerError(f"peer {name!r}: GET {CHECKPOINT_PATH}: reply is not "
                                      "JSON") from None
            assert note is not None
            try:
                new = Checkpoint.from_text(parse_note(note).text).size
            except CleanroomError:
                raise PeerLedgerError(f"peer {name!r}: GET {CHECKPOINT_PATH}: not a signed "
                                      "checkpoint") from None
            proof: list[bytes] = []
            given = first.get("consistency") if isinstance(first, dict) else None
            if given is not None:
                proof = _hashes(name, CHECKPOINT_PATH, given)
            elif 0 < req.old_size < new:
                params = {"old": str(req.old_size), "new": str(new)}
                try:
                    proof = _proof(name, client.get_json(CONSISTENCY_PATH, params=params),
                                   req.old_size, new)
                except ValueError:
                    raise PeerLedgerError(f"peer {name!r}: GET {CONSISTENCY_PATH}: reply is "
                                          "not JSON") from None
            witnessed: bytes | None = None
            try:
                data = client.get_json(WITNESSED_PATH, params={"origin": req.our_origin})
                witnessed = _note(name, WITNESSED_PATH, data, optional=True)
            except PeerCallError as exc:
                if exc.status != 404:
                    raise
            except ValueError:
                raise PeerLedgerError(f"peer {name!r}: GET {WITNESSED_PATH}: reply is not "
                                      "JSON") from None
        return PeerLedgerReply(note, proof, witnessed)

    return fetch
