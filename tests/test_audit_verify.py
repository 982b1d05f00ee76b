"""``audit verify``: a node directory's ledger verified read-only, tamper named by index,
CLI exit codes, and cross-peer consistency through an injected fetch function.

Node directories are made with ``cleanroom node init`` (the node CLI) and pinned to each
other; ledger entries are written into the node's own database with the node's own key,
as the node will once its ledger is wired. Peers' ledgers are real ledgers in other node
directories, read directly by the fetch function (the HTTP transport plugs in later).
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import run_node_cli
from sqlalchemy import text
from sqlalchemy.exc import OperationalError

import cleanroom.cli
from audits.verify import (
    FetchPeerCheckpoint,
    PeerLedgerReply,
    PeerLedgerRequest,
    origin_for,
    verify_node,
)
from cleanroom.errors import CleanroomError
from cleanroom.ledger import Event, Ledger, ProblemKind, digest, event, new_id
from cleanroom.ledger.note import Checkpoint, parse_note
from cleanroom.node.admin import add_peer, init_node
from cleanroom.node.config import NodeConfig
from cleanroom.node.identity import NodeIdentity
from cleanroom.storage.db import engine_for

DAY = 86_400_000
T0 = 1_714_521_600_000  # 2024-05-01T00:00:00Z


# ------------------------------------------------------------------ realistic events


def joint_query(
    *,
    requester: str,
    counterparties: list[str],
    purpose: str,
    query_type: str,
    ts: int,
    me: str,
    decision: str = "approved",
    rule: str = "partners.allowed",
    field: str | None = None,
    rows: int = 0,
    receiver: str | None = None,
    epsilon_milli: int | None = None,
    msg_sizes: tuple[int, ...] = (),
    recv_sizes: tuple[int, ...] = (),
    failed: str | None = None,
    cancelled: bool = False,
    qid: str | None = None,
) -> tuple[str, list[Event]]:
    """The entries one node writes for one joint query, in the order the node writes them."""
    q = qid or new_id("q")
    s = new_id("s")
    peer = requester if requester != me else counterparties[0]
    evs = [event("query_proposed", ts_ms=ts, query_id=q, query_type=query_type,
                 requester=requester, counterparties=counterparties, purpose=purpose,
                 spec_digest=digest(q.encode()), receiver=receiver or requester)]
    deciding = me if requester != me else peer
    evs.append(event("policy_decision", ts_ms=ts + 10, query_id=q, party=deciding,
                     peer=requester, decision=decision, rule_id=rule, field=field))
    if decision == "denied":
        return q, evs
    if cancelled:
        evs.append(event("query_cancelled", ts_ms=ts + 20, query_id=q, by=me,
                         reason_code="operator"))
        return q, evs
    evs.append(event("session_started", ts_ms=ts + 30, query_id=q, session_id=s,
                     protocol="ecdh_psi", peer=peer, role="sender"))
    for i, size in enumerate(msg_sizes):
        evs.append(event("message_sent", ts_ms=ts + 40 + i, query_id=q, session_id=s,
                         protocol="ecdh_psi", peer=peer, round=f"round{i}",
                         digest=digest(f"{q}/out/{i}".encode()), size=size))
    for i, size in enumerate(recv_sizes):
        evs.append(event("message_received", ts_ms=ts + 60 + i, query_id=q, session_id=s,
                         protocol="ecdh_psi", peer=peer, round=f"round{i}",
                         digest=digest(f"{q}/in/{i}".encode()), size=size))
    if failed:
        evs.append(event("session_ended", ts_ms=ts + 80, query_id=q, session_id=s,
                         protocol="ecdh_psi", peer=peer, outcome="failed"))
        evs.append(event("query_failed", ts_ms=ts + 90, query_id=q, error_code=failed,
                         stage="session", peer=peer))
        return q, evs
    evs.append(event("session_ended", ts_ms=ts + 80, query_id=q, session_id=s,
                     protocol="ecdh_psi", peer=peer, outcome="ok",
                     messages_sent=len(msg_sizes), messages_received=len(recv_sizes),
                     bytes_sent=sum(msg_sizes), bytes_received=sum(recv_sizes)))
    evs.append(event("result_delivered", ts_ms=ts + 100, query_id=q,
                     receiver=receiver or requester, digest=digest(f"{q}/result".encode()),
                     rows=rows, size=rows * 16, epsilon_milli=epsilon_milli))
    return q, evs


@dataclass
class Scenario:
    """The OEM node's ledger over five days, and what a reviewer should read from it."""

    events: list[Event]
    query_ids: dict[str, str]


def oem_scenario(me: str = "oem", *, alarm: bool = False) -> Scenario:
    evs: list[Event] = [
        event("dataset_registered", ts_ms=T0, dataset="leads", version="v1",
              digest=digest(b"leads-v1"), rows=10_000, invalid_rows=3, columns=7),
        event("policy_changed", ts_ms=T0 + 1, digest=digest(b"policy-2"),
              previous_digest=digest(b"policy-1"), policy_version=2),
    ]
    ids: dict[str, str] = {}
    specs: list[tuple[str, dict[str, object]]] = [
        # day 0: we ask media for a match (campaign measurement); we receive the rows
        ("match_media", dict(requester=me, counterparties=["media"],
                             purpose="campaign_measurement", query_type="match",
                             ts=T0 + 3_600_000, rows=4321, receiver=me,
                             msg_sizes=(120_000, 4_000), recv_sizes=(130_000,))),
        # day 1: media asks us for segment stats; we deliver 12 rows, 0.5 epsilon
        ("stats_media", dict(requester="media", counterparties=[me], purpose="lead_grading",
                             query_type="segment_stats", ts=T0 + DAY + 3_600_000, rows=12,
                             epsilon_milli=500, msg_sizes=(2_048, 1_024),
                             recv_sizes=(900,))),
        # day 2: dealer asks with a purpose our policy does not allow: denied
        ("denied_dealer", dict(requester="dealer", counterparties=[me],
                               purpose="resale", query_type="segment_stats",
                               ts=T0 + 2 * DAY + 3_600_000, decision="denied",
                               rule="partners.dealer.purposes", field="purpose")),
        # day 2: media again; the privacy budget rule denies
        ("denied_media", dict(requester="media", counterparties=[me], purpose="lead_grading",
                              query_type="segment_stats", ts=T0 + 2 * DAY + 7_200_000,
                              decision="denied", rule="partners.media.dp_budget",
                              field="params.noise.epsilon")),
        # day 3: media, segment stats again, 0.25 epsilon
        ("stats_media2", dict(requester="media", counterparties=[me],
                              purpose="campaign_measurement", query_type="segment_stats",
                              ts=T0 + 3 * DAY + 3_600_000, rows=30, epsilon_milli=250,
                              msg_sizes=(4_096,), recv_sizes=(1_000,))),
        # day 3: we ask dealer and media to score leads; the session times out
        ("score_failed", dict(requester=me, counterparties=["media", "dealer"],
                              purpose="lead_grading", query_type="lead_score",
                              ts=T0 + 3 * DAY + 7_200_000, msg_sizes=(50_000,),
                              failed="peer_timeout")),
        # day 4: dealer asks store recommendation; cancelled by our operator
        ("cancelled_dealer", dict(requester="dealer", counterparties=[me],
                                  purpose="store_recommendation",
                                  query_type="store_recommendation",
                                  ts=T0 + 4 * DAY + 3_600_000, cancelled=True)),
    ]
    for name, kw in specs:
        q, qevs = joint_query(me=me, **kw)  # type: ignore[arg-type]
        ids[name] = q
        evs += qevs
    evs.append(event("checkpoint_cosigned", ts_ms=T0 + 4 * DAY + 5_000_000, peer="media",
                     origin="cleanroom/media", size=40, root=digest(b"media-root-40"),
                     cosigned_at=T0 + 4 * DAY + 5_000_000))
    if alarm:  # dealer showed a forked checkpoint to this node
        evs.append(event("witness_alarm", ts_ms=T0 + 4 * DAY + 6_000_000, peer="dealer",
                         origin="cleanroom/dealer", reason="fork", old_size=12,
                         old_root=digest(b"d-a"), new_size=12, new_root=digest(b"d-b"),
                         evidence=digest(b"d-note")))
    return Scenario(evs, ids)


# ------------------------------------------------------------------ node directories


@pytest.fixture(scope="module")
def template_nodes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Node directories for oem, media and dealer, pinned to each other (made once)."""
    base = tmp_path_factory.mktemp("audit_nodes")
    # the audited node through the real CLI; its partners through the same function in
    # process (each CLI process costs a couple of seconds of imports)
    r = run_node_cli("node", "init", "--party", "oem", "--name", "oem", "--dir",
                     str(base / "oem"), "--listen", "127.0.0.1:19450")
    assert r.returncode == 0, r.stderr
    for i, name in enumerate(("media", "dealer"), start=1):
        init_node(base / name, name=name, party=name, listen=f"127.0.0.1:{19450 + i}")
    for a in ("oem", "media", "dealer"):
        for i, b in enumerate(("oem", "media", "dealer")):
            if a != b:
                add_peer(base / a, name=b, url=f"https://127.0.0.1:{19450 + i}",
                         cert_file=base / b / "identity" / "node.pem", party=b)
    return base


@pytest.fixture
def nodes(template_nodes: Path, tmp_path: Path) -> Path:
    base = tmp_path / "nodes"
    shutil.copytree(template_nodes, base)
    return base


def node_ledger(node_dir: Path) -> Ledger:
    """The node's ledger in its own database, signed with its own identity key."""
    cfg = NodeConfig.load(node_dir)
    key = NodeIdentity.load(node_dir).signing_key()
    return Ledger(engine_for(cfg.database_url), origin_for(cfg.name), key)


def tamper(node_dir: Path, sql: str, **params: object) -> None:
    eng = engine_for(NodeConfig.load(node_dir).database_url)
    with eng.begin() as c:
        c.execute(text(sql), params)
    eng.dispose()


def edit_entry(node_dir: Path, idx: int, old: bytes, new: bytes) -> None:
    eng = engine_for(NodeConfig.load(node_dir).database_url)
    with eng.begin() as c:
        body = c.execute(text("SELECT body FROM ledger_entry WHERE idx=:i"),
                         {"i": idx}).scalar_one()
        assert old in body
        c.execute(text("UPDATE ledger_entry SET body=:b WHERE idx=:i"),
                  {"b": body.replace(old, new), "i": idx})
    eng.dispose()


@pytest.fixture
def oem_with_ledger(nodes: Path) -> Iterator[tuple[Path, Ledger, Scenario]]:
    d = nodes / "oem"
    led = node_ledger(d)
    sc = oem_scenario()
    half = len(sc.events) // 2
    led.append_many(sc.events[:half])
    led.checkpoint()
    led.append_many(sc.events[half:])
    led.checkpoint()
    yield d, led, sc
    led.store.engine.dispose()


def run_cli(monkeypatch: pytest.MonkeyPatch, *argv: str) -> int:
    """``cleanroom ...`` in-process, with the audit commands wired as they will be."""
    if "audits.cli" not in cleanroom.cli.COMMAND_MODULES:
        monkeypatch.setattr(cleanroom.cli, "COMMAND_MODULES",
                            (*cleanroom.cli.COMMAND_MODULES, "audits.cli"))
    return cleanroom.cli.main(list(argv))


# ------------------------------------------------------------------ local verification


def test_clean_ledger_verifies(oem_with_ledger: tuple[Path, Ledger, Scenario]) -> None:
    d, led, sc = oem_with_ledger
    res = verify_node(d)
    assert res.ok, res.summary()
    assert res.report.size == len(sc.events) == led.size
    assert res.report.checkpoints_checked == 2
    assert res.latest_checkpoint is not None and res.latest_checkpoint.size == led.size
    assert res.latest_checkpoint.root_hex == led.root().hex()
    assert res.failure_lines() == []


def test_verify_opens_the_database_read_only(
    oem_with_ledger: tuple[Path, Ledger, Scenario],
) -> None:
    d, led, _sc = oem_with_ledger
    db = Path(NodeConfig.load(d).database_url.removeprefix("sqlite:///"))
    before = (led.size, db.stat().st_size)
    from audits.verify import open_readonly

    eng = open_readonly(NodeConfig.load(d).database_url)
    with pytest.raises(OperationalError, match="readonly"), eng.begin() as c:
        c.execute(text("DELETE FROM ledger_entry"))
    eng.dispose()
    assert verify_node(d).ok
    assert (led.size, db.stat().st_size) == before


def test_verify_reads_a_read_only_copy_not_in_wal_mode(
    oem_with_ledger: tuple[Path, Ledger, Scenario],
) -> None:
    """A reviewer's copy of the database: read-only and in rollback-journal mode (as a
    backup or `sqlite3 .backup` leaves it). Verify and the report need no write at all."""
    from audits.report import report_for_node

    d, led, sc = oem_with_ledger
    led.store.engine.dispose()
    db = Path(NodeConfig.load(d).database_url.removeprefix("sqlite:///"))
    con = sqlite3.connect(db)
    assert con.execute("PRAGMA journal_mode=DELETE").fetchone()[0] == "delete"
    con.close()
    os.chmod(db, 0o444)
    res = verify_node(d)
    assert res.ok, res.summary()
    assert res.report.size == len(sc.events) and res.report.checkpoints_checked == 2
    html, _audit = report_for_node(d)
    assert "Ledger integrity verified" in html
    con = sqlite3.connect(db)
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
    con.close()
    assert not db.with_name(db.name + "-wal").exists()
    # tampering in such a copy is still named by index
    os.chmod(db, 0o644)
    con = sqlite3.connect(db)
    body = con.execute("SELECT body FROM ledger_entry WHERE idx=4").fetchone()[0]
    with con:
        con.execute("UPDATE ledger_entry SET body=? WHERE idx=4",
                    (body.replace(b'"ts":', b'"ts":3'),))
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
    con.close()
    os.chmod(db, 0o444)
    first = verify_node(d).first_problem
    assert first is not None and (first.kind, first.index) == (ProblemKind.EDITED, 4)


def test_edited_entry_names_the_first_bad_index(
    oem_with_ledger: tuple[Path, Ledger, Scenario],
) -> None:
    d, _led, _sc = oem_with_ledger
    edit_entry(d, 7, b'"ts":', b'"ts":1')
    edit_entry(d, 20, b'"ts":', b'"ts":2')
    res = verify_node(d)
    assert not res.ok
    first = res.first_problem
    assert first is not None and first.kind is ProblemKind.EDITED and first.index == 7
    assert res.failure_lines()[0].startswith("first bad entry index 7: edited")


def test_deleted_entry_and_missing_ledger(
    oem_with_ledger: tuple[Path, Ledger, Scenario], nodes: Path,
) -> None:
    d, _led, _sc = oem_with_ledger
    tamper(d, "DELETE FROM ledger_entry WHERE idx=5")
    res = verify_node(d)
    assert res.first_problem is not None
    assert (res.first_problem.kind, res.first_problem.index) == (ProblemKind.DELETED, 5)
    # a node directory without its database: a clear error, not a crash
    (nodes / "dealer" / "node.db").unlink(missing_ok=True)
    with pytest.raises(CleanroomError, match="node database does not exist"):
        verify_node(nodes / "dealer")


def test_cosignatures_by_pinned_peers_are_verified(nodes: Path) -> None:
    oem, media = node_ledger(nodes / "oem"), node_ledger(nodes / "media")
    oem.append_many(oem_scenario().events)
    note = oem.checkpoint()
    cosigned = media.witness("media", oem.verifier, note, [])
    assert oem.record_cosignatures(cosigned, [media.witness_verifier]) == 1
    res = verify_node(nodes / "oem")
    assert res.ok, res.summary()
    assert res.report.cosignatures_checked == 1
    assert [(w.witness, w.peer, w.latest_size) for w in res.witnesses] == [
        ("cleanroom/media", "media", oem.size)]
    assert [c.origin for c in verify_node(nodes / "media").cosigned_peers] == ["cleanroom/oem"]
    tamper(nodes / "oem", "UPDATE ledger_cosignature SET signature=:s", s=bytes(64))
    bad = verify_node(nodes / "oem")
    assert not bad.ok and bad.report.problems[0].kind is ProblemKind.BAD_COSIGNATURE
    assert bad.witnesses == []


# ------------------------------------------------------------------ CLI


def test_cli_exit_codes(
    oem_with_ledger: tuple[Path, Ledger, Scenario], monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str], nodes: Path,
) -> None:
    d, _led, _sc = oem_with_ledger
    assert run_cli(monkeypatch, "audit", "verify", "--dir", str(d)) == 0
    out = capsys.readouterr().out
    assert "OK:" in out and "FAILED" not in out
    assert run_cli(monkeypatch, "audit", "verify", "--dir", str(d), "--json") == 0
    assert '"ok": true' in capsys.readouterr().out

    edit_entry(d, 11, b'"ts":', b'"ts":9')
    assert run_cli(monkeypatch, "audit", "verify", "--dir", str(d)) == 1
    out = capsys.readouterr().out
    assert "FAILED: first bad entry index 11: edited" in out
    assert run_cli(monkeypatch, "audit", "verify", "--dir", str(d), "--json") == 1
    cap = capsys.readouterr()
    assert '"index": 11' in cap.out and "first bad entry index 11" in cap.err

    # the audit cannot run at all: exit 2 with a message naming what is missing
    assert run_cli(monkeypatch, "audit", "verify", "--dir", str(nodes / "nowhere")) == 2
    assert "node.toml: not found" in capsys.readouterr().err
    (nodes / "dealer" / "node.db").unlink(missing_ok=True)
    assert run_cli(monkeypatch, "audit", "verify", "--dir", str(nodes / "dealer")) == 2
    assert "node database does not exist" in capsys.readouterr().err


def test_cli_report_exit_codes(
    oem_with_ledger: tuple[Path, Ledger, Scenario], monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str], tmp_path: Path,
) -> None:
    d, _led, _sc = oem_with_ledger
    out = tmp_path / "report.html"
    assert run_cli(monkeypatch, "audit", "report", "--dir", str(d), "--out", str(out),
                   "--since", "2024-05-01", "--until", "2024-05-05") == 0
    html = out.read_text(encoding="utf-8")
    assert html.startswith("<!DOCTYPE html>") and "Ledger integrity verified" in html
    capsys.readouterr()
    assert run_cli(monkeypatch, "audit", "report", "--dir", str(d), "--out", str(out),
                   "--since", "yesterday") == 2
    assert "--since 'yesterday'" in capsys.readouterr().err
    assert run_cli(monkeypatch, "audit", "report", "--dir", str(d), "--out", str(out),
                   "--since", "2024-05-03", "--until", "2024-05-02") == 2
    assert out.read_text(encoding="utf-8") == html  # the old report was left intact
    edit_entry(d, 3, b'"ts":', b'"ts":7')
    assert run_cli(monkeypatch, "audit", "report", "--dir", str(d), "--out", str(out)) == 1
    assert "first bad entry index 3" in capsys.readouterr().err
    tampered = out.read_text(encoding="utf-8")
    assert "Ledger verification FAILED" in tampered and "first bad entry index 3" in tampered


# ------------------------------------------------------------------ peers


def ledger_fetcher(ledgers: dict[str, Ledger]) -> tuple[FetchPeerCheckpoint, list[int]]:
    """A fetch function that reads the peers' ledgers directly (what the HTTP endpoint
    will serve): latest checkpoint, consistency proof, and the peer's record of our log."""
    asked: list[int] = []

    def fetch(req: PeerLedgerRequest) -> PeerLedgerReply:
        led = ledgers.get(req.peer.name)
        if led is None:
            raise CleanroomError(f"peer {req.peer.name} does not serve ledger checkpoints")
        asked.append(req.old_size)
        note = led.latest_checkpoint()
        assert note is not None
        size = Checkpoint.from_text(parse_note(note).text).size
        proof = led.consistency_proof(req.old_size, size) if req.old_size <= size else []
        return PeerLedgerReply(note, proof, led.peer_checkpoint(req.our_origin))

    return fetch, asked


def _msgs(n: int, peer: str, start: int = 0) -> list[Event]:
    return [event("message_sent", ts_ms=T0 + i, query_id="q-peertest0000", session_id="s-1",
                  protocol="ecdh_psi", peer=peer, round=f"r{i}",
                  digest=digest(f"{peer}{i}".encode()), size=100 + i)
            for i in range(start, start + n)]


def _witness_each_other(oem: Ledger, media: Ledger) -> None:
    """One witnessing round in both directions, as the node does after a joint query."""
    for a, b in ((oem, media), (media, oem)):
        note = b.checkpoint()
        cosigned = a.witness(b.origin.removeprefix("cleanroom/"), b.verifier, note,
                             b.consistency_proof(a.peer_size(b.origin)))
        b.record_cosignatures(cosigned, [a.witness_verifier])


def test_peers_consistent_then_fork_detected(nodes: Path) -> None:
    oem, media = node_ledger(nodes / "oem"), node_ledger(nodes / "media")
    oem.append_many(_msgs(6, "media"))
    media.append_many(_msgs(5, "oem"))
    _witness_each_other(oem, media)  # oem cosigns media at 5 (oem: +1 entry), media oem at 7
    media.append_many(_msgs(4, "oem", 10))
    media.checkpoint()
    fetch, asked = ledger_fetcher({"media": media})
    res = verify_node(nodes / "oem", peers=True, fetch_peer_checkpoint=fetch)
    by = {p.peer: p for p in res.peers}
    assert by["media"].status == "consistent" and by["media"].ok
    assert (by["media"].last_cosigned_size, by["media"].latest_size) == (5, media.size)
    assert by["media"].our_log == "matches" and by["media"].our_log_size == 7
    assert asked == [5]
    # dealer is pinned but has no ledger endpoint yet: reported, and verify is not OK
    assert by["dealer"].status == "unavailable" and not res.ok
    assert "does not serve ledger checkpoints" in by["dealer"].detail
    assert res.report.ok  # the local ledger itself is fine

    # media rewrites its history with the same key: a different log of a larger size
    forked_dir = nodes / "media-fork"
    forked_dir.mkdir()
    from sqlalchemy import create_engine

    forged = Ledger(create_engine(f"sqlite:///{forked_dir / 'fork.db'}"), media.origin,
                    NodeIdentity.load(nodes / "media").signing_key())
    forged.append_many(_msgs(20, "oem", 100))
    forged.checkpoint()
    fetch2, _ = ledger_fetcher({"media": forged, "dealer": media})
    res2 = verify_node(nodes / "oem", peers=True, fetch_peer_checkpoint=fetch2)
    by2 = {p.peer: p for p in res2.peers}
    assert by2["media"].status == "inconsistent" and not res2.ok
    assert any("peer media" in line and "inconsistent" in line
               for line in res2.failure_lines())
    # dealer's pinned key did not sign media's log: a bad signature, not a pass
    assert by2["dealer"].status == "bad_signature"

    # same size, different root: a fork in the strict sense
    same = Ledger(create_engine(f"sqlite:///{forked_dir / 'same.db'}"), media.origin,
                  NodeIdentity.load(nodes / "media").signing_key())
    same.append_many(_msgs(5, "oem", 200))
    same.checkpoint()
    fetch3, _ = ledger_fetcher({"media": same})
    by3 = {p.peer: p for p in verify_node(nodes / "oem", peers=True,
                                           fetch_peer_checkpoint=fetch3).peers}
    assert by3["media"].status == "fork"
    # checking is read-only: oem's witness memory is untouched, the real log still passes
    assert oem.peer_size(media.origin) == 5
    fetch4, _ = ledger_fetcher({"media": media, "dealer": media})
    by4 = {p.peer: p for p in verify_node(nodes / "oem", peers=True,
                                           fetch_peer_checkpoint=fetch4).peers}
    assert by4["media"].ok


def test_peer_record_reveals_a_rewritten_local_log(nodes: Path) -> None:
    """oem truncates its own log and drops its checkpoints and cosignatures: alone it
    verifies, but media's record of what it cosigned shows the truncation."""
    oem, media = node_ledger(nodes / "oem"), node_ledger(nodes / "media")
    oem.append_many(_msgs(8, "media"))
    media.append_many(_msgs(3, "oem"))
    _witness_each_other(oem, media)
    size = oem.size
    for sql in ("DELETE FROM ledger_entry WHERE idx >= 4", "DELETE FROM ledger_checkpoint",
                "DELETE FROM ledger_cosignature"):
        tamper(nodes / "oem", sql)
    assert verify_node(nodes / "oem").report.ok  # nothing local to compare with
    fetch, _ = ledger_fetcher({"media": media})
    res = verify_node(nodes / "oem", peers=True, fetch_peer_checkpoint=fetch)
    media_res = next(p for p in res.peers if p.peer == "media")
    assert media_res.status == "consistent" and media_res.our_log == "truncated"
    assert media_res.our_log_size == size
    first = res.first_problem
    assert first is not None and first.kind is ProblemKind.TRUNCATED and first.index == 4
    assert not res.ok


def test_peers_requires_a_fetch_function(oem_with_ledger: tuple[Path, Ledger, Scenario],
                                         ) -> None:
    d, _led, _sc = oem_with_ledger
    with pytest.raises(CleanroomError, match="--peers"):
        verify_node(d, peers=True)


def test_verify_peers_over_mutual_tls_against_running_nodes(
    three_nodes: dict[str, Any], monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Real node processes serving their ledgers: oem checks media and dealer over mutual
    TLS (the node's peer ledger API), reading its own live database read-only."""
    from audits.peers import transport_fetcher

    oem = three_nodes["oem"]
    cfg = NodeConfig.load(oem.dir)
    res = verify_node(oem.dir, peers=True, fetch_peer_checkpoint=transport_fetcher(cfg))
    assert res.report.ok, res.summary()
    assert sorted(p.peer for p in res.peers) == ["dealer", "media"]
    for p in res.peers:
        assert p.status in ("consistent", "first_seen"), p
        assert p.latest_size is not None and p.latest_size >= 0
    assert res.ok
    assert run_cli(monkeypatch, "audit", "verify", "--dir", str(oem.dir), "--peers") == 0
    assert "peer media: ok" in capsys.readouterr().out


def test_transport_fetcher_names_a_peer_without_ledger_endpoints(
    three_nodes: dict[str, Any], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A peer that answers 404 for the checkpoint path (a node without the ledger API)."""
    import audits.peers
    from audits.peers import PeerLedgerError, transport_fetcher

    monkeypatch.setattr(audits.peers, "CHECKPOINT_PATH", "/v1/peer/ledger/no-such-endpoint")
    cfg = NodeConfig.load(three_nodes["oem"].dir)
    fetch = transport_fetcher(cfg)
    req = PeerLedgerRequest(cfg.peer("media"), "cleanroom/media", 0, "cleanroom/oem")
    with pytest.raises(PeerLedgerError, match="peer media does not serve ledger checkpoints"):
        fetch(req)


def test_verify_while_the_node_appends_checkpoints_and_is_witnessed(nodes: Path) -> None:
    """A running node keeps appending, signing checkpoints and exchanging cosignatures
    with media while the audit runs again and again: never a false truncation, and the
    peer's record of our log always matches (the audit reads one snapshot)."""
    oem, media = node_ledger(nodes / "oem"), node_ledger(nodes / "media")
    oem.append_many(_msgs(6, "media"))
    media.append_many(_msgs(5, "oem"))
    _witness_each_other(oem, media)
    stop = threading.Event()
    errors: list[BaseException] = []
    rounds = [0]

    def node() -> None:
        try:
            while not stop.is_set():
                oem.append_many(_msgs(2, "media", 10 + 2 * rounds[0]))
                oem.checkpoint()
                rounds[0] += 1
                if rounds[0] % 3 == 0:
                    _witness_each_other(oem, media)
        except BaseException as exc:  # reported by the test thread
            errors.append(exc)

    fetch, _asked = ledger_fetcher({"media": media})
    t = threading.Thread(target=node, daemon=True)
    t.start()
    audits = 0
    try:
        while (audits < 12 or rounds[0] < 12) and audits < 200 and not errors:
            res = verify_node(nodes / "oem", peers=True, fetch_peer_checkpoint=fetch)
            assert res.report.ok, res.summary()
            media_res = next(p for p in res.peers if p.peer == "media")
            assert media_res.ok and media_res.our_log == "matches", media_res
            audits += 1
    finally:
        stop.set()
        t.join(30)
    assert not errors, errors
    assert rounds[0] >= 12 and oem.verify(witness_keys=[media.witness_verifier]).ok


def test_writes_between_the_audits_reads_are_not_seen(
    nodes: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Deterministic form of the race above: each time the audit's read-only engine is
    about to read the checkpoint table (after it read every entry), the node appends,
    signs a checkpoint and exchanges cosignatures with media. The audit must report the
    state it started reading, with no truncation."""
    from sqlalchemy import event as sa_event
    from sqlalchemy.engine import Engine

    oem, media = node_ledger(nodes / "oem"), node_ledger(nodes / "media")
    oem.append_many(_msgs(6, "media"))
    media.append_many(_msgs(5, "oem"))
    _witness_each_other(oem, media)
    fired = [0]

    def between(conn: Any, _cursor: Any, statement: str, *_a: Any) -> None:
        if "mode=ro" in str(conn.engine.url) and "FROM ledger_checkpoint" in statement:
            fired[0] += 1
            oem.append_many(_msgs(3, "media", 100 + 3 * fired[0]))
            _witness_each_other(oem, media)

    sa_event.listen(Engine, "before_cursor_execute", between)
    try:
        fetch, _asked = ledger_fetcher({"media": media})
        for _ in range(3):
            size = oem.size
            res = verify_node(nodes / "oem", peers=True, fetch_peer_checkpoint=fetch)
            assert res.report.ok, res.summary()
            assert res.report.size == size and fired[0] > 0
            media_res = next(p for p in res.peers if p.peer == "media")
            assert media_res.ok and media_res.our_log == "matches", media_res
    finally:
        sa_event.remove(Engine, "before_cursor_execute", between)
    assert oem.size > size and oem.verify(witness_keys=[media.witness_verifier]).ok
