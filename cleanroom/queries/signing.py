"""Signed proposals and decisions between nodes (Ed25519, the node identity's key).

A proposal signs ``"cleanroom-query-proposal/v1"``, the query id, the spec's canonical
bytes (:meth:`QuerySpec.canonical_bytes`), the dry-run flag and the deadline. A decision
signs the query id, the spec digest, the deciding party, the outcome, the rule and field,
and the thresholds the party imposes. The message is canonical JSON of those fields; the
counterparty verifies proposals with the requester's pinned key, the requester verifies
decisions with each counterparty's pinned key. Verification failures are opaque.

No I/O here beyond what the caller passes in.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ed25519

from cleanroom.errors import CleanroomError

PROPOSAL_KIND = "cleanroom-query-proposal/v1"
DECISION_KIND = "cleanroom-query-decision/v1"


class BadSignature(CleanroomError):
    """A proposal or decision whose signature does not verify with the pinned key."""


def spec_digest(canonical_spec: bytes) -> str:
    return "sha256:" + hashlib.sha256(canonical_spec).hexdigest()


def _canonical(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode("utf-8")


def proposal_message(query_id: str, canonical_spec: bytes, dry_run: bool, deadline: str) -> bytes:
    return _canonical(
        {
            "kind": PROPOSAL_KIND,
            "query_id": query_id,
            "spec_digest": spec_digest(canonical_spec),
            "dry_run": dry_run,
            "deadline": deadline,
        }
    )


DECISION_FIELDS = (
    "query_id",
    "spec_digest",
    "party",
    "outcome",
    "rule",
    "field",
    "decided_by",
    "min_intersection_size",
    "min_intersection_rule",
    "min_group_size",
    "min_group_rule",
    "dry_run",
)


def decision_message(decision: dict[str, Any]) -> bytes:
    body = {k: decision.get(k) for k in DECISION_FIELDS}
    body["kind"] = DECISION_KIND
    return _canonical(body)


def sign(key: ed25519.Ed25519PrivateKey, message: bytes) -> str:
    return base64.b64encode(key.sign(message)).decode("ascii")


def verify(key: ed25519.Ed25519PublicKey, message: bytes, signature: str) -> None:
    try:
        raw = base64.b64decode(signature, validate=True)
        key.verify(raw, message)
    except (InvalidSignature, binascii.Error, ValueError, TypeError):
        raise BadSignature("signature does not verify with the pinned key") from None
