"""Ledger behaviour: schema and canonical JSON, facade, witnessing, tamper detection."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy import create_engine, text
from sqlalchemy.engine import Engine

from cleanroom.ledger import (
    EVENT_SCHEMAS,
    EntrySchemaError,
    Event,
    Ledger,
    LedgerStore,
    ProblemKind,
    VerificationError,
    WitnessAlarm,
    canonical_json,
    decode_entry,
    digest,
    event,
    find_raw_looking,
    new_id,
    scan_entries,
    verify_store,
)
from cleanroom.ledger.errors import LedgerStateError
from cleanroom.ledger.merkle import verify_consistency, verify_inclusion
from cleanroom.ledger.note import Checkpoint, NoteSigner, open_checkpoint, sign_checkpoint

# ------------------------------------------------------------------ helpers


def _engine(tmp_path: Path, name: str = "ledger.db") -> Engine:
    return create_engine(f"sqlite:///{tmp_path / name}")


def _ledger(tmp_path: Path, origin: str = "cleanroom/oem", name: str = "ledger.db",
            key: Ed25519PrivateKey | None = None) -> Ledger:
    return Ledger(_engine(tmp_path, name), origin, key or Ed25519PrivateKey.generate())


def _msg(i: int, qid: str = "q-test0001", peer: str = "media") -> Event:
    return event("message_sent", query_id=qid, session_id="s-aaaa", protocol="ecdh_psi",
                 peer=peer, round=f"round{i % 3}", digest=digest(f"m{i}".encode()),
                 size=100 + i, ts_ms=1_700_000_000_000 + i)


def _full_run_events(qid: str) -> list[Event]:
    """Every event type, as a joint query and the node's housekeeping would write them."""
    d = digest
    return [
        event("dataset_registered", dataset="leads", version="v3", digest=d(b"ds"), rows=10_000,
              invalid_rows=12, columns=7),
        event("policy_changed", digest=d(b"p2"), previous_digest=d(b"p1"), policy_version=2),
        event("key_rotated", key_kind="ledger", new_key=d(b"k2"), old_key=d(b"k1")),
        event("query_proposed", query_id=qid, query_type="match", requester="oem",
              counterparties=["media", "dealer"], purpose="campaign_overlap",
              spec_digest=d(b"spec"), receiver="oem"),
        event("policy_decision", query_id=qid, party="media", peer="oem", decision="held",
              rule_id="min_group_size", field="city"),
        event("human_approval", query_id=qid, approver="op-7", decision="approved",
              peer="oem"),
        event("policy_decision", query_id=qid, party="dealer", peer="oem", decision="approved",
              rule_id="partner_allowed", policy_digest=d(b"p2")),
        event("session_started", query_id=qid, session_id="s-1", protocol="ecdh_psi",
              peer="media", role="sender"),
        event("message_sent", query_id=qid, session_id="s-1", protocol="ecdh_psi",
              peer="media", round="blinded_set", digest=d(b"m1"), size=123_456),
        event("message_received", query_id=qid, session_id="s-1", protocol="ecdh_psi",
              peer="media", round="double_blinded", digest=d(b"m2"), size=130_000),
        event("session_ended", query_id=qid, session_id="s-1", protocol="ecdh_psi",
              peer="media", outcome="ok", messages_sent=1, messages_received=1,
              bytes_sent=123_456, bytes_received=130_000),
        event("result_delivered", query_id=qid, receiver="oem", digest=d(b"res"), rows=4321,
              size=88_000, epsilon_milli=500),
        event("query_failed", query_id="q-other01", error_code="peer_timeout",
              stage="session", peer="dealer"),
        event("query_cancelled", query_id="q-other02", by="oem", reason_code="operator"),
        event("checkpoint_cosigned", peer="media", origin="cleanroom/media", size=10,
              root=d(b"r"), cosigned_at=1_700_000_000_000),
        event("witness_alarm", peer="dealer", origin="cleanroom/dealer", reason="fork",
              old_size=3, old_root=d(b"a"), new_size=3, new_root=d(b"b"), evidence=d(b"n")),
    ]


# ------------------------------------------------------------------ schema & canonical JSON


def test_canonical_json_rules() -> None:
    assert canonical_json({"b": 1, "a": [True, "x"], "c": {"z": 0, "y": "é"}}) == (
        '{"a":[true,"x"],"b":1,"c":{"y":"é","z":0}}'.encode())
    for bad in ({"a": 1.5}, {"a": None}, {"a": float("nan")}, {"a": b"x"}, {1: 2}):
        with pytest.raises(EntrySchemaError):
            canonical_json(bad)  # type: ignore[arg-type]


@settings(max_examples=100, deadline=None)
@given(size=st.integers(0, 2**63 - 1), rnd=st.text("abcXYZ09_-.", min_size=1, max_size=20))
def test_entries_round_trip_canonically(size: int, rnd: str) -> None:
    from cleanroom.ledger.entries import encode_entry

    rnd = "r" + rnd
    ev = event("message_received", query_id="q-1", session_id="s-1", protocol="psi",
               peer="media", round=rnd, digest=digest(b"x"), size=size)
    body = encode_entry(ev, 7, 123)
    assert b" " not in body
    e = decode_entry(body)
    assert (e.seq, e.ts_ms, e.type, e.fields["size"]) == (7, 123, "message_received", size)
    assert canonical_json(e.as_dict()) == body


def test_every_event_type_is_covered_by_the_full_run() -> None:
    assert {e.type for e in _full_run_events("q-x")} == set(EVENT_SCHEMAS)


@pytest.mark.parametrize(
    ("etype", "fields", "field"),
    [
        ("message_sent", {"payload": "abc"}, "payload"),
        ("result_delivered", {"query_id": "q-1", "receiver": "oem", "digest": digest(b"r"),
                              "rows": 3, "phone": "13800138000"}, "phone"),
        ("result_delivered", {"query_id": "q-1", "receiver": "oem", "digest": "abc",
                              "rows": 3}, "digest"),
        ("result_delivered", {"query_id": "q-1", "receiver": "oem", "digest": digest(b"r"),
                              "rows": 3.0}, "rows"),
        ("result_delivered", {"query_id": "q-1", "receiver": "oem", "digest": digest(b"r"),
                              "rows": -1}, "rows"),
        ("result_delivered", {"query_id": "q-1", "receiver": "oem", "digest": digest(b"r"),
                              "rows": True}, "rows"),
        ("result_delivered", {"query_id": "q-1", "receiver": "oem", "digest": digest(b"r")},
         "rows"),
        ("policy_decision", {"query_id": "q-1", "party": "media", "decision": "maybe",
                             "rule_id": "r1"}, "decision"),
        ("session_started", {"query_id": "13812345678", "session_id": "s", "protocol": "p",
                             "peer": "media"}, "query_id"),
        ("session_started", {"query_id": "q-1", "session_id": "a@b.com", "protocol": "p",
                             "peer": "media"}, "session_id"),
        ("session_started", {"query_id": "3f2a9c1e-8b7d-4e6f-9a0b-1c2d3e4f5a6b",
                             "session_id": "s", "protocol": "p", "peer": "media"}, "query_id"),
        ("session_started", {"query_id": "q-1", "session_id": "s", "protocol": "p",
                             "peer": "39.9042,116.4074"}, "peer"),
        ("session_started", {"query_id": "q 1", "session_id": "s", "protocol": "p",
                             "peer": "media"}, "query_id"),
        ("query_proposed", {"query_id": "q-1", "query_type": "match", "requester": "oem",
                            "counterparties": ["media", "media"], "purpose": "x",
                            "spec_digest": digest(b"s")}, "counterparties"),
        ("policy_decision", {"query_id": "q-1", "party": "media", "decision": "approved",
                             "rule_id": "r1", "epsilon_milli": 0.5}, "epsilon_milli"),
        ("policy_decision", {"query_id": "q-1", "party": "media", "decision": "approved",
                             "rule_id": "r1", "epsilon_milli": -1}, "epsilon_milli"),
        ("policy_decision", {"query_id": "q-1", "party": "media", "decision": "approved",
                             "rule_id": "r1", "charged_to": "a@b.com"}, "charged_to"),
        ("result_delivered", {"query_id": "q-1", "receiver": "oem", "digest": digest(b"r"),
                              "rows": 3, "epsilon_milli": 250, "charged_to": "oem dealer"},
         "charged_to"),
    ],
)
def test_schema_rejects_with_named_field(etype: str, fields: dict[str, object],
                                         field: str) -> None:
    with pytest.raises(EntrySchemaError) as exc:
        Event(etype, fields)
    assert exc.value.field == field and exc.value.event_type == etype
    assert field in str(exc.value) and etype in str(exc.value)


def test_budget_fields_are_optional_and_keep_schema_version_1() -> None:
    """policy_decision.epsilon_milli/charged_to and result_delivered.charged_to were added
    as optional fields: entries written before them still decode, and entries using them
    are version 1 too."""
    from cleanroom.ledger import SCHEMA_VERSION
    from cleanroom.ledger.entries import encode_entry

    assert SCHEMA_VERSION == 1
    d = digest(b"r")
    old = (b'{"decision":"approved","party":"media","query_id":"q-1","rule_id":"r1",'
           b'"seq":4,"ts":17,"type":"policy_decision","v":1}')
    assert decode_entry(old).fields == {"decision": "approved", "party": "media",
                                        "query_id": "q-1", "rule_id": "r1"}
    old_result = ('{"digest":"' + d + '","epsilon_milli":500,"query_id":"q-1","receiver":'
                  '"oem","rows":3,"seq":5,"ts":18,"type":"result_delivered","v":1}').encode()
    assert "charged_to" not in decode_entry(old_result).fields
    for ev in (event("policy_decision", query_id="q-1", party="oem", decision="approved",
                     rule_id="r1", epsilon_milli=250, charged_to="media"),
               event("result_delivered", query_id="q-1", receiver="dealer", digest=d, rows=3,
                     epsilon_milli=250, charged_to="media")):
        body = encode_entry(ev, 0, 1)
        assert json.loads(body)["v"] == 1
        e = decode_entry(body)
        assert (e.fields["epsilon_milli"], e.fields["charged_to"]) == (250, "media")
        assert "media" in e.parties()  # a peer filter on media finds the charge


def test_unknown_event_type_rejected() -> None:
    with pytest.raises(EntrySchemaError, match="unknown event type"):
        event("raw_dump", query_id="q-1")


def test_raw_scanner() -> None:
    assert find_raw_looking({"a": "call +86 138-0013-8000"}) == [("phone", "$.a")]
    assert find_raw_looking(["x", "ZHANG.san@Example.COM "]) == [("email", "$[1]")]
    assert find_raw_looking({"d": "3F2A9C1E-8B7D-4E6F-9A0B-1C2D3E4F5A6B"})[0][0] == "device_id"
    assert find_raw_looking({"d": "a1b2c3d4e5f60718"})[0][0] == "device_id"
    assert find_raw_looking({"d": "353456789012345"})[0][0] == "device_id"  # IMEI
    assert find_raw_looking({"loc": "31.2304, 121.4737"})[0][0] == "coordinates"
    assert find_raw_looking({"lat": 31.2304}) == [("coordinates", "$.lat")]
    assert find_raw_looking({"digest": digest(b"x"), "q": new_id(), "n": 12345}) == []
    for _ in range(200):
        assert find_raw_looking(new_id("s")) == []


# ------------------------------------------------------------------ facade


def test_append_checkpoint_proofs_and_entries(tmp_path: Path) -> None:
    led = _ledger(tmp_path)
    assert led.size == 0
    qid = new_id()
    first = led.append_many(_full_run_events(qid))
    assert first == list(range(16))
    assert led.append(_msg(0, "q-test0002", peer="dealer")) == 16
    note1 = led.checkpoint()
    cp, _ = open_checkpoint(note1, [led.verifier], origin="cleanroom/oem")
    assert (cp.size, cp.root) == (17, led.root())
    led.append_many([_msg(i) for i in range(1, 30)])
    note2 = led.checkpoint()
    cp2, _ = open_checkpoint(note2, [led.verifier])
    assert led.latest_checkpoint() == note2
    assert led.checkpoint() == note2  # deterministic, stored once
    verify_consistency(cp.size, cp2.size, cp.root, cp2.root, led.consistency_proof(17, 46))
    e5 = led.entry(5)
    verify_inclusion(e5.leaf_hash, 5, 46, led.inclusion_proof(5, 46), cp2.root)
    verify_inclusion(e5.leaf_hash, 5, 17, led.inclusion_proof(5, 17), cp.root)

    # reopening rebuilds the same tree from storage
    again = Ledger(led.store.engine, "cleanroom/oem", led.signer.private_key)
    assert again.root() == led.root() and again.size == 46

    # filters
    assert [e.index for e in led.entries(query_id=qid, event_type="message_sent")] == [8]
    by_dealer = led.entries(peer="dealer", limit=1000)
    assert {e.index for e in by_dealer} >= {3, 6, 12, 15, 16}
    assert all("dealer" in e.entry.parties() for e in by_dealer)
    page = led.entries(offset=2, limit=3, event_type=["message_sent", "message_received"])
    assert [e.index for e in page] == [16, 17, 18]
    timed = led.entries(since_ms=1_700_000_000_005, until_ms=1_700_000_000_008,
                        event_type="message_sent")
    assert [e.entry.ts_ms for e in timed] == [1_700_000_000_005, 1_700_000_000_006,
                                              1_700_000_000_007]
    assert led.entries(peer="med%") == []  # LIKE wildcards are escaped
    report = led.verify(deep=True)
    assert report.ok is False and report.integrity_ok  # the fixture holds a witness alarm
    assert [a.reason for a in report.alarms] == ["fork"]
    assert report.checkpoints_checked == 2 and report.largest_matching_anchor == 46


def test_a_large_batch_is_stored_whole_in_several_insert_statements(tmp_path: Path) -> None:
    """Appends use multi-row INSERTs of at most ``_ROWS_PER_INSERT`` rows: a batch larger
    than that is still one transaction, stored in order, and the tree reopens the same."""
    from cleanroom.ledger.store import _ROWS_PER_INSERT

    led = _ledger(tmp_path)
    n = 2 * _ROWS_PER_INSERT + 7
    assert led.append_many([_msg(i) for i in range(n)]) == list(range(n))
    got = led.entries(limit=n + 10)
    assert [e.index for e in got] == list(range(n))
    assert [e.entry.fields["size"] for e in got] == [100 + i for i in range(n)]
    again = Ledger(led.store.engine, "cleanroom/oem", led.signer.private_key)
    assert again.size == n and again.root() == led.root()
    assert led.verify(deep=True).integrity_ok


def test_no_raw_data_in_any_entry_of_a_full_run(tmp_path: Path) -> None:
    led = _ledger(tmp_path)
    led.append_many(_full_run_events(new_id()))
    led.append_many([_msg(i) for i in range(50)])
    bodies = [r.body for r in led.store.iter_entries()]
    assert len(bodies) == 66
    assert scan_entries(bodies) == []
    # the scanner does find raw data if it ever got in (e.g. by a bypass of the schema)
    assert scan_entries([b'{"x":"+8613800138000"}'])[0][:2] == (0, "phone")


def test_a_stale_second_handle_cannot_overwrite_an_index(tmp_path: Path) -> None:
    """Two handles on one database (what the node's writer lock prevents): the stale one's
    append is refused as a whole, naming the taken index, and stores nothing."""
    led = _ledger(tmp_path)
    stale = Ledger(led.store.engine, "cleanroom/oem", led.signer.private_key)
    led.append_many([_msg(i) for i in range(3)])
    with pytest.raises(LedgerStateError, match="ledger index 0 is already taken"):
        stale.append_many([_msg(i) for i in range(10, 15)])
    assert led.store.count() == 3 and [e.entry.fields["size"] for e in led.entries()] == [
        100, 101, 102]


def test_schema_error_leaves_log_untouched(tmp_path: Path) -> None:
    led = _ledger(tmp_path)
    led.append(_msg(0))
    with pytest.raises(TypeError):
        led.append_many([_msg(1), {"type": "message_sent"}])  # type: ignore[list-item]
    assert led.size == 1 and led.store.count() == 1


def test_second_writer_is_refused(tmp_path: Path) -> None:
    key = Ed25519PrivateKey.generate()
    a = _ledger(tmp_path, key=key)
    b = Ledger(a.store.engine, "cleanroom/oem", key)
    a.append(_msg(0))
    from cleanroom.ledger import LedgerStateError

    with pytest.raises(LedgerStateError):
        b.append(_msg(1))
    assert a.verify().ok


# ------------------------------------------------------------------ witnessing between ledgers


def test_two_nodes_cosign_each_other_and_detect_a_fork(tmp_path: Path) -> None:
    oem = _ledger(tmp_path, "cleanroom/oem", "oem.db")
    media = _ledger(tmp_path, "cleanroom/media", "media.db")
    media.append_many([_msg(i, peer="oem") for i in range(5)])
    note = media.checkpoint()
    size = oem.peer_size("cleanroom/media")
    cosigned = oem.witness("media", media.verifier, note, media.consistency_proof(size))
    assert media.record_cosignatures(cosigned, [oem.witness_verifier]) == 1
    media.append_many([_msg(i, peer="oem") for i in range(5, 9)])
    note2 = media.checkpoint()
    old = oem.peer_size("cleanroom/media")
    assert old == 5
    cosigned2 = oem.witness("media", media.verifier, note2, media.consistency_proof(old))
    assert media.record_cosignatures(cosigned2, [oem.witness_verifier]) == 1
    assert oem.peer_checkpoint("cleanroom/media") == note2
    rep = media.verify(witness_keys=[oem.witness_verifier])
    assert rep.ok and rep.cosignatures_checked == 2
    cos_entries = oem.entries(event_type="checkpoint_cosigned")
    assert [e.entry.fields["size"] for e in cos_entries] == [5, 9]

    # media signs a different history at size 9 (a fork): oem refuses and records an alarm
    forked = sign_checkpoint(Checkpoint("cleanroom/media", 9, bytes(32)), media.signer)
    with pytest.raises(WitnessAlarm):
        oem.witness("media", media.verifier, forked, [])
    alarms = oem.verify().alarms
    assert [(a.peer, a.reason) for a in alarms] == [("media", "fork")]
    assert oem.peer_size("cleanroom/media") == 9  # witness memory unchanged
    # cosignatures for a checkpoint that is not ours are refused
    with pytest.raises(VerificationError):
        oem.record_cosignatures(cosigned2, [media.witness_verifier])


# ------------------------------------------------------------------ tampering


def _prepared(tmp_path: Path, n: int = 40) -> tuple[Ledger, Engine]:
    led = _ledger(tmp_path)
    led.append_many([_msg(i) for i in range(n // 2)])
    led.checkpoint()
    led.append_many([_msg(i) for i in range(n // 2, n)])
    led.checkpoint()
    assert led.verify().ok
    return led, led.store.engine


def _audit(led: Ledger, **kw: object) -> object:
    store = LedgerStore(led.store.engine, create=False)
    return verify_store(store, led.origin, [led.verifier], **kw)  # type: ignore[arg-type]


def test_tamper_edited_entry(tmp_path: Path) -> None:
    led, eng = _prepared(tmp_path)
    with eng.begin() as c:
        body = c.execute(text("SELECT body FROM ledger_entry WHERE idx=27")).scalar_one()
        c.execute(text("UPDATE ledger_entry SET body=:b WHERE idx=27"),
                  {"b": body.replace(b'"size":127', b'"size":999')})
    rep = _audit(led)
    first = rep.first_problem  # type: ignore[attr-defined]
    assert first.kind is ProblemKind.EDITED and first.index == 27


def test_tamper_edited_entry_with_recomputed_leaf_hash(tmp_path: Path) -> None:
    led, eng = _prepared(tmp_path)
    from cleanroom.ledger.merkle import leaf_hash

    with eng.begin() as c:
        body = c.execute(text("SELECT body FROM ledger_entry WHERE idx=27")).scalar_one()
        nb = body.replace(b'"size":127', b'"size":999')
        c.execute(text("UPDATE ledger_entry SET body=:b, leaf_hash=:h WHERE idx=27"),
                  {"b": nb, "h": leaf_hash(nb)})
    rep = _audit(led)
    first = rep.first_problem  # type: ignore[attr-defined]
    # the signed checkpoint at 20 still matches, the one at 40 does not: the edit is
    # located in entries 20..39
    assert first.kind is ProblemKind.CHECKPOINT_MISMATCH and first.index == 20
    assert first.checkpoint_size == 40


def test_tamper_deleted_entry(tmp_path: Path) -> None:
    led, eng = _prepared(tmp_path)
    with eng.begin() as c:
        c.execute(text("DELETE FROM ledger_entry WHERE idx=13"))
    rep = _audit(led)
    first = rep.first_problem  # type: ignore[attr-defined]
    assert first.kind is ProblemKind.DELETED and first.index == 13
    from cleanroom.ledger import LedgerStateError

    with pytest.raises(LedgerStateError, match="not contiguous at index 13"):
        Ledger(eng, led.origin, led.signer.private_key)
    # renumbering the following rows does not hide it
    with eng.begin() as c:
        c.execute(text("UPDATE ledger_entry SET idx=idx-1 WHERE idx>13"))
    first = _audit(led).first_problem  # type: ignore[attr-defined]
    assert first.kind is ProblemKind.DELETED and first.index == 13


def test_tamper_reordered_entries(tmp_path: Path) -> None:
    led, eng = _prepared(tmp_path)
    with eng.begin() as c:
        c.execute(text("UPDATE ledger_entry SET idx=-1 WHERE idx=8"))
        c.execute(text("UPDATE ledger_entry SET idx=8 WHERE idx=11"))
        c.execute(text("UPDATE ledger_entry SET idx=11 WHERE idx=-1"))
    first = _audit(led).first_problem  # type: ignore[attr-defined]
    assert first.kind is ProblemKind.REORDERED and first.index == 8


def test_tamper_truncation(tmp_path: Path) -> None:
    led, eng = _prepared(tmp_path)
    with eng.begin() as c:
        c.execute(text("DELETE FROM ledger_entry WHERE idx>=33"))
    first = _audit(led).first_problem  # type: ignore[attr-defined]
    assert first.kind is ProblemKind.TRUNCATED and first.index == 33
    assert first.checkpoint_size == 40


def test_truncation_hidden_locally_is_caught_by_peer_checkpoint(tmp_path: Path) -> None:
    led, eng = _prepared(tmp_path)
    peer_copy = led.latest_checkpoint()
    assert peer_copy is not None
    with eng.begin() as c:
        c.execute(text("DELETE FROM ledger_entry WHERE idx>=33"))
        c.execute(text("DELETE FROM ledger_checkpoint WHERE size=40"))
    assert _audit(led).ok  # type: ignore[attr-defined]
    first = _audit(led, known_checkpoints=[peer_copy]).first_problem  # type: ignore[attr-defined]
    assert first.kind is ProblemKind.TRUNCATED and first.index == 33


def test_tamper_fork_two_signed_checkpoints_same_size(tmp_path: Path) -> None:
    led, eng = _prepared(tmp_path)
    # the node (holding its key) rewrote entry 25 and signed the new history at size 40
    from cleanroom.ledger.merkle import MerkleTree, leaf_hash

    rows = list(led.store.iter_entries())
    rows[25] = type(rows[25])(25, b"", rows[25].body.replace(b'"size":125', b'"size":1'))
    t = MerkleTree.from_leaf_hashes([leaf_hash(r.body) for r in rows])
    note = sign_checkpoint(Checkpoint(led.origin, 40, t.root()), led.signer)
    with eng.begin() as c:
        c.execute(text("INSERT INTO ledger_checkpoint (origin, size, root_hash, note, "
                       "created_ms) VALUES (:o, 40, :r, :n, 0)"),
                  {"o": led.origin, "r": t.root(), "n": note})
    first = _audit(led).first_problem  # type: ignore[attr-defined]
    assert first.kind is ProblemKind.FORK and first.checkpoint_size == 40
    assert first.index == 20


def test_bad_checkpoint_signature_and_unknown_key(tmp_path: Path) -> None:
    led, eng = _prepared(tmp_path)
    stranger = NoteSigner(led.origin, Ed25519PrivateKey.generate())
    note = sign_checkpoint(Checkpoint(led.origin, 40, led.root()), stranger)
    with eng.begin() as c:
        c.execute(text("UPDATE ledger_checkpoint SET note=:n WHERE size=40"), {"n": note})
    rep = _audit(led)
    kinds = [p.kind for p in rep.problems]  # type: ignore[attr-defined]
    assert kinds == [ProblemKind.BAD_CHECKPOINT_SIGNATURE]
    assert "verify" in rep.summary()  # type: ignore[attr-defined]
    json.dumps(rep.to_dict())  # type: ignore[attr-defined]


def _witnessed(tmp_path: Path) -> tuple[Ledger, Ledger]:
    oem = _ledger(tmp_path, "cleanroom/oem", "oem.db")
    dealer = _ledger(tmp_path, "cleanroom/dealer", "dealer.db")
    oem.append_many([_msg(i, peer="dealer") for i in range(12)])
    cosigned = dealer.witness("oem", oem.verifier, oem.checkpoint(), [])
    assert oem.record_cosignatures(cosigned, [dealer.witness_verifier]) == 1
    assert oem.verify(witness_keys=[dealer.witness_verifier]).ok
    return oem, dealer


def test_tampered_cosignature_is_reported(tmp_path: Path) -> None:
    oem, dealer = _witnessed(tmp_path)
    with oem.store.engine.begin() as c:
        c.execute(text("UPDATE ledger_cosignature SET timestamp = timestamp + 1"))
    rep = oem.verify(witness_keys=[dealer.witness_verifier])
    assert [p.kind for p in rep.problems] == [ProblemKind.BAD_COSIGNATURE]
    # without the witness key the cosignature cannot be checked, and says so
    assert oem.verify().cosignatures_unknown_key == 1


def test_rewritten_and_resigned_history_is_a_fork_against_the_cosignature(
    tmp_path: Path,
) -> None:
    oem, dealer = _witnessed(tmp_path)
    eng = oem.store.engine
    # the operator (holding the node key) edits entry 4, recomputes every hash and
    # replaces the signed checkpoint; only the dealer's cosignature remembers the truth
    from cleanroom.ledger.merkle import MerkleTree, leaf_hash

    with eng.begin() as c:
        body = c.execute(text("SELECT body FROM ledger_entry WHERE idx=4")).scalar_one()
        nb = body.replace(b'"size":104', b'"size":4')
        c.execute(text("UPDATE ledger_entry SET body=:b, leaf_hash=:h WHERE idx=4"),
                  {"b": nb, "h": leaf_hash(nb)})
        c.execute(text("DELETE FROM ledger_checkpoint"))
    bodies = [r.body for r in oem.store.iter_entries()]
    t = MerkleTree.from_leaf_hashes([leaf_hash(b) for b in bodies])
    with eng.begin() as c:
        c.execute(text("INSERT INTO ledger_checkpoint (origin, size, root_hash, note, "
                       "created_ms) VALUES (:o, 12, :r, :n, 0)"),
                  {"o": oem.origin, "r": t.root(),
                   "n": sign_checkpoint(Checkpoint(oem.origin, 12, t.root()), oem.signer)})
    rep = verify_store(LedgerStore(eng, create=False), oem.origin, [oem.verifier],
                       [dealer.witness_verifier])
    first = rep.first_problem
    assert first is not None and first.kind is ProblemKind.FORK and first.checkpoint_size == 12
    # and the dealer refuses the rewritten checkpoint when it is shown to it
    with pytest.raises(WitnessAlarm):
        dealer.witness("oem", oem.verifier,
                       sign_checkpoint(Checkpoint(oem.origin, 12, t.root()), oem.signer), [])
    assert [a.reason for a in dealer.verify().alarms] == ["fork"]


@settings(max_examples=400, deadline=None)
@given(st.text(alphabet="0123456789abcdefABCDEF+-. @x,;:sha256\u00e9", max_size=70))
def test_the_combined_raw_data_search_agrees_with_one_search_per_pattern(text: str) -> None:
    from cleanroom.ledger import entries

    cleaned = entries._DIGEST_TOKEN.sub(" ", text)
    expected = next((k for k, p in entries._RAW_PATTERNS if p.search(cleaned)), None)
    assert entries._raw_kind(text) == expected
    assert entries._raw_kind(text * 5) == next(
        (k for k, p in entries._RAW_PATTERNS if p.search(entries._DIGEST_TOKEN.sub(" ", text * 5))),
        None)
