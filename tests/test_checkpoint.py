"""Signed notes, checkpoints, cosignatures and the witness logic (behaviour tests)."""

from __future__ import annotations

import base64

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from cleanroom.ledger.errors import VerificationError
from cleanroom.ledger.merkle import MerkleTree
from cleanroom.ledger.note import (
    EM_DASH,
    SIG_COSIGNATURE_V1,
    Checkpoint,
    NoteSigner,
    NoteVerifier,
    add_signatures,
    cosign_checkpoint,
    cosignature_message,
    find_cosignatures,
    key_id,
    open_checkpoint,
    open_note,
    parse_note,
    sign_checkpoint,
    verify_cosignature,
)
from cleanroom.ledger.witness import PeerCheckpoint, WitnessAlarm, witness_checkpoint


def _key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def _tree(n: int, tag: str = "x") -> MerkleTree:
    t = MerkleTree()
    for i in range(n):
        t.append(f"{tag}{i}".encode())
    return t


def test_checkpoint_text_format() -> None:
    root = bytes(range(32))
    cp = Checkpoint("cleanroom/oem", 12, root)
    assert cp.text() == f"cleanroom/oem\n12\n{base64.b64encode(root).decode()}\n"
    assert Checkpoint.from_text(cp.text()) == cp
    for bad in ("cleanroom/oem\n012\nAAAA\n", "cleanroom/oem\n12\n", "o\n-1\n" + "A" * 44 + "\n",
                cp.text()[:-1], "cleanroom/oem\n12\n!!!!\n"):
        with pytest.raises(VerificationError):
            Checkpoint.from_text(bad)


def test_signed_checkpoint_round_trip_and_key_id() -> None:
    k = _key()
    signer = NoteSigner("cleanroom/oem", k)
    raw_pub = signer.verifier().vkey().split("+", 2)[2]
    assert base64.b64decode(raw_pub)[0] == 0x01
    import hashlib

    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    pub = k.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    assert signer.key_id == hashlib.sha256(b"cleanroom/oem\n\x01" + pub).digest()[:4]
    cp = Checkpoint("cleanroom/oem", 3, _tree(3).root())
    note = sign_checkpoint(cp, signer)
    text = note.decode()
    assert text.startswith(cp.text() + "\n" + EM_DASH + " cleanroom/oem ")
    sig = base64.b64decode(text.rsplit(" ", 1)[1])
    assert sig[:4] == signer.key_id and len(sig) == 68
    got, _ = open_checkpoint(note, [signer.verifier()], origin="cleanroom/oem")
    assert got == cp
    assert NoteVerifier.from_vkey(signer.verifier().vkey()).key_id == signer.key_id


def test_wrong_key_and_tampering_rejected_opaquely() -> None:
    signer = NoteSigner("cleanroom/oem", _key())
    other = NoteSigner("cleanroom/oem", _key())
    note = sign_checkpoint(Checkpoint("cleanroom/oem", 1, _tree(1).root()), signer)
    with pytest.raises(VerificationError) as e1:
        open_note(note, [other.verifier()])  # same name, different key: unknown -> reject
    with pytest.raises(VerificationError) as e2:
        open_note(note.replace(b"\n1\n", b"\n2\n"), [signer.verifier()])
    assert str(e1.value) == str(e2.value) == "verification failed"
    with pytest.raises(VerificationError):
        open_checkpoint(note, [signer.verifier()], origin="cleanroom/dealer")
    # a signature line from a known key that fails rejects the whole note, even if
    # another signature verifies
    good = parse_note(note).signatures[0]
    forged = type(good)(good.name, good.key_id, bytes(64))
    with pytest.raises(VerificationError):
        open_note(add_signatures(note, [forged]), [signer.verifier()])
    for garbage in (b"", b"no blank line\n", note + b"junk", note.replace(EM_DASH.encode(), b"-"),
                    b"\xff\xfe\n\n" + note, note.replace(b"\n", b"\r\n")):
        with pytest.raises(VerificationError):
            open_note(garbage, [signer.verifier()])


def test_unknown_signatures_are_ignored() -> None:
    a, b = NoteSigner("a.example/log", _key()), NoteSigner("b.example/log", _key())
    text = "a.example/log\n0\n" + base64.b64encode(bytes(32)).decode() + "\n"
    from cleanroom.ledger.note import sign_note

    note = sign_note(text, [a, b])
    assert open_note(note, [b.verifier()]).text == text
    assert open_note(note, [a.verifier()]).text == text


def test_cosignature_round_trip() -> None:
    log = NoteSigner("cleanroom/oem", _key())
    wit = NoteSigner("cleanroom/dealer", _key(), SIG_COSIGNATURE_V1)
    cp = Checkpoint("cleanroom/oem", 5, _tree(5).root())
    note = sign_checkpoint(cp, log)
    cos = cosign_checkpoint(cp.text(), wit, 1_700_000_000)
    assert cosignature_message(cp.text(), 1_700_000_000).startswith(
        b"cosignature/v1\ntime 1700000000\ncleanroom/oem\n5\n")
    raw = base64.b64decode(cos.line().rstrip("\n").rsplit(" ", 1)[1])
    assert raw[:4] == key_id("cleanroom/dealer", 0x04, wit.private_key.public_key())
    assert int.from_bytes(raw[4:12], "big") == 1_700_000_000 and len(raw) == 76
    cosigned = add_signatures(note, [cos.note_signature()])
    # the log signature still verifies with the cosignature line present
    open_checkpoint(cosigned, [log.verifier()], origin="cleanroom/oem")
    assert find_cosignatures(cosigned, [wit.verifier()]) == [cos]
    verify_cosignature(cp.text(), cos, wit.verifier())
    # wrong witness key, wrong type, altered timestamp
    with pytest.raises(VerificationError):
        verify_cosignature(cp.text(), cos, NoteSigner("cleanroom/dealer", _key(), 4).verifier())
    with pytest.raises(VerificationError):
        verify_cosignature(cp.text(), cos, NoteVerifier("cleanroom/dealer",
                                                        wit.private_key.public_key()))
    shifted = type(cos)(cos.name, cos.key_id, cos.timestamp + 1, cos.signature)
    with pytest.raises(VerificationError):
        verify_cosignature(cp.text(), shifted, wit.verifier())
    # a type-0x04 cosignature is not a log signature
    with pytest.raises(VerificationError):
        open_note(cp.text().encode() + b"\n" + cos.line().encode(), [wit.verifier()])


def _peer() -> tuple[NoteSigner, NoteVerifier, NoteSigner]:
    log = NoteSigner("cleanroom/media", _key())
    me = NoteSigner("cleanroom/oem", _key(), SIG_COSIGNATURE_V1)
    return log, log.verifier(), me


def test_witness_accepts_consistent_growth() -> None:
    log, ver, me = _peer()
    t = _tree(10)
    n1 = sign_checkpoint(Checkpoint(log.name, 4, t.root(4)), log)
    r1 = witness_checkpoint(peer="media", peer_verifier=ver, cosigner=me, last=None, note=n1,
                            proof=[], timestamp=100)
    assert find_cosignatures(r1.cosigned_note, [me.verifier()])[0].timestamp == 100
    n2 = sign_checkpoint(Checkpoint(log.name, 10, t.root()), log)
    r2 = witness_checkpoint(peer="media", peer_verifier=ver, cosigner=me, last=r1.checkpoint,
                            note=n2, proof=t.consistency_proof(4, 10), timestamp=200)
    assert r2.checkpoint.size == 10
    assert r2.to_event().fields["peer"] == "media"
    # same checkpoint again: re-cosigned with a new time
    r3 = witness_checkpoint(peer="media", peer_verifier=ver, cosigner=me, last=r2.checkpoint,
                            note=n2, proof=[], timestamp=300)
    assert r3.cosignature.timestamp == 300


@pytest.mark.parametrize("case", ["fork", "rollback", "inconsistent", "bad_signature"])
def test_witness_refuses_and_raises_alarm(case: str) -> None:
    log, ver, me = _peer()
    honest = _tree(8)
    last = PeerCheckpoint(log.name, 6, honest.root(6), b"")
    proof: list[bytes]
    if case == "fork":
        other = _tree(6, "y")
        note, proof = sign_checkpoint(Checkpoint(log.name, 6, other.root()), log), []
    elif case == "rollback":
        note, proof = sign_checkpoint(Checkpoint(log.name, 5, honest.root(5)), log), []
    elif case == "inconsistent":
        rewritten = _tree(8, "z")
        note = sign_checkpoint(Checkpoint(log.name, 8, rewritten.root()), log)
        proof = rewritten.consistency_proof(6, 8)
    else:
        note = sign_checkpoint(Checkpoint(log.name, 8, honest.root()),
                               NoteSigner(log.name, _key()))
        proof = honest.consistency_proof(6, 8)
    with pytest.raises(WitnessAlarm) as exc:
        witness_checkpoint(peer="media", peer_verifier=ver, cosigner=me, last=last, note=note,
                           proof=proof, timestamp=1)
    alarm = exc.value.alarm
    assert alarm.reason == case and alarm.peer == "media"
    ev = alarm.to_event()
    assert ev.type == "witness_alarm" and ev.fields["reason"] == case
