"""Known-answer vectors (tests/vectors/ledger, provenance inside the file).

Separate from behaviour tests: these pin our encodings to other implementations
(Go sumdb/note, public transparency-log witnesses, certificate-transparency-go trees).
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from cleanroom.ledger.errors import VerificationError
from cleanroom.ledger.merkle import EMPTY_ROOT, MerkleTree
from cleanroom.ledger.note import (
    NoteSigner,
    NoteVerifier,
    find_cosignatures,
    open_note,
    parse_note,
    sign_note,
)

VECTORS: dict[str, Any] = json.loads(
    (Path(__file__).parent / "vectors" / "ledger" / "c2sp_rfc6962_vectors.json").read_text(
        encoding="utf-8"
    )
)


def test_rfc6962_roots() -> None:
    v = VECTORS["rfc6962_tree"]
    assert EMPTY_ROOT.hex() == v["empty_root_hex"]
    t = MerkleTree()
    for leaf, root in zip(v["leaves_hex"], v["roots_hex"], strict=True):
        t.append(bytes.fromhex(leaf))
        assert t.root().hex() == root


def test_go_sumdb_note_signature_reproduced_byte_for_byte() -> None:
    v = VECTORS["go_note"]
    # Go skey: PRIVATE+KEY+<name>+<hex id>+base64(0x01 || seed); the base64 may hold '+'.
    material = base64.b64decode(v["skey"].split("+", 4)[4])
    assert material[0] == 0x01
    signer = NoteSigner("PeterNeumann", Ed25519PrivateKey.from_private_bytes(material[1:]))
    assert signer.verifier().vkey() == v["vkey"]
    assert sign_note(v["text"], [signer]).decode("utf-8") == v["note"]
    verifier = NoteVerifier.from_vkey(v["vkey"])
    assert open_note(v["note"].encode(), [verifier]).text == v["text"]
    with pytest.raises(VerificationError):
        open_note(v["note"].replace("cryptography", "cryptographY").encode(), [verifier])


def test_real_witness_cosignatures_verify() -> None:
    v = VECTORS["cosigned_checkpoint"]
    note = v["note"].encode()
    vkeys = [v["cosigner_vkey"], *v["other_cosigner_vkeys"]]
    verifiers = [NoteVerifier.from_vkey(k) for k in vkeys]
    found = find_cosignatures(note, verifiers)
    assert {c.name for c in found} == {x.name for x in verifiers}
    text = parse_note(note).text
    assert text.splitlines()[:2] == [v["origin"], str(v["size"])]
    # invalid case: a changed size line breaks every cosignature
    bad = v["note"].replace(str(v["size"]), str(v["size"] + 1), 1).encode()
    with pytest.raises(VerificationError):
        find_cosignatures(bad, verifiers[:1])
