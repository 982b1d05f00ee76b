"""The audit ledger inside real node processes: events, proofs, access, bad parameters.

Nodes are separate ``node start`` processes over mutual TLS (fixtures in conftest.py).
Proofs are checked with :mod:`cleanroom.ledger.merkle` and the nodes' pinned keys; every
entry the nodes wrote is scanned for raw identifiers at the end of each test.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import RunningNode, run_node_cli
from sqlalchemy import create_engine

from cleanroom.ledger import LedgerStore, NoteVerifier, scan_entries
from cleanroom.ledger.merkle import leaf_hash, verify_consistency, verify_inclusion
from cleanroom.ledger.note import open_checkpoint
from cleanroom.node.audit import LedgerBusyError, ledger, log_origin, peer_log_verifier
from cleanroom.node.identity import NodeIdentity
from cleanroom.node.witness_service import fetch_peer_checkpoint
from cleanroom.transport import PeerCallError, PeerClient

PHONES = ["+86 138 0013 8000", "139-0013-9001", "+8613700137002", "13600136003"]
EMAILS = ["Li.Wei@Example.com ", "wang@example.cn", "zhang.san@mail.example.org", ""]


def write_leads(path: Path, n: int = 4) -> Path:
    lines = ["phone,email,series,score"]
    for i in range(n):
        lines.append(f"{PHONES[i % 4]},{EMAILS[i % 4]},S{i % 3},{i * 7 % 11}")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def node_store(node: RunningNode) -> LedgerStore:
    """Read-only view of a node's ledger tables (the node process is the writer)."""
    engine = create_engine(f"sqlite:///{node.dir / 'node.db'}")
    return LedgerStore(engine, create=False)


def log_verifier(node: RunningNode) -> NoteVerifier:
    ident = NodeIdentity.load(node.dir)
    return NoteVerifier(log_origin(node.name), ident.public_key)


def b64list(items: list[str]) -> list[bytes]:
    return [base64.b64decode(x) for x in items]


def entries(node: RunningNode, **params: str) -> list[dict[str, Any]]:
    """Every matching entry, following the pages."""
    out: list[dict[str, Any]] = []
    offset = 0
    with node.operator_client() as c:
        while True:
            page = c.get_json("/v1/ledger/entries",
                              params={**params, "offset": str(offset), "limit": "50"})
            out.extend(page["entries"])
            if page["next_offset"] is None:
                return out
            offset = page["next_offset"]


def assert_no_raw(*nodes: RunningNode) -> None:
    for node in nodes:
        bodies = [r.body for r in node_store(node).iter_entries()]
        assert bodies, f"{node.name} wrote no entries"
        assert scan_entries(bodies) == [], f"raw-looking data in {node.name}'s ledger"


def upload(node: RunningNode, name: str, path: Path) -> dict[str, Any]:
    with node.operator_client() as c:
        result: dict[str, Any] = c.upload(
            f"/v1/datasets/{name}/versions",
            path.read_bytes(),
            params={"id_columns": "phone,email", "format": "csv"},
            content_type="text/csv",
        )
    return result


def status_of(exc_info: pytest.ExceptionInfo[PeerCallError]) -> int | None:
    return exc_info.value.status


# --- events -------------------------------------------------------------------------------------


def test_ingest_by_api_and_cli_records_dataset_registered(
    three_nodes: dict[str, RunningNode], tmp_path: Path
) -> None:
    oem = three_nodes["oem"]
    csv = write_leads(tmp_path / "leads.csv", 6)
    report = upload(oem, "ledger_leads", csv)
    cli = run_node_cli("dataset", "add", "--dir", str(oem.dir), "--name", "ledger_leads",
                       "--file", str(csv), "--id-columns", "phone,email")
    assert cli.returncode == 0, cli.stderr
    assert "recorded in the audit ledger by the running node" in cli.stdout

    got = [e["entry"] for e in entries(oem, event_type="dataset_registered")
           if e["entry"]["dataset"] == "ledger_leads"]
    assert [g["version"] for g in got] == [str(report["version"]), str(report["version"] + 1)]
    first = got[0]
    assert first["digest"] == "sha256:" + report["file_digest"]
    assert first["rows"] == 6 and first["columns"] == 4
    # The CLI did not become a second writer: the node still appends after it.
    upload(oem, "ledger_leads", csv)
    again = [e for e in entries(oem, event_type="dataset_registered")
             if e["entry"]["dataset"] == "ledger_leads"]
    assert len(again) == 3
    assert_no_raw(oem)


def test_running_node_is_the_only_writer(three_nodes: dict[str, RunningNode]) -> None:
    ctx = three_nodes["media"].context()
    with pytest.raises(LedgerBusyError, match="held by another process"):
        ledger(ctx, wait_seconds=0)


def test_cli_ingest_while_node_stopped_and_policy_changes(
    node_factory: Callable[[str, str], RunningNode], tmp_path: Path
) -> None:
    node = node_factory("solo", "dealer")
    csv = write_leads(tmp_path / "visits.csv")
    cli = run_node_cli("dataset", "add", "--dir", str(node.dir), "--name", "visits",
                       "--file", str(csv), "--id-columns", "phone,email")
    assert cli.returncode == 0, cli.stderr
    assert "recorded in the audit ledger" in cli.stdout
    node.start()
    regs = entries(node, event_type="dataset_registered")
    assert [(e["entry"]["dataset"], e["entry"]["version"]) for e in regs] == [("visits", "1")]

    policy = node.context().config.policy_file
    if policy is None:  # no default policy for this party: give it one
        pytest.skip("no default policy file for dealer nodes")
    changes = entries(node, event_type="policy_changed")
    assert len(changes) == 1
    first = changes[0]["entry"]["digest"]
    assert first == "sha256:" + hashlib.sha256(policy.read_bytes()).hexdigest()
    # Restarting with the same policy records nothing new.
    node.stop()
    node.start()
    assert len(entries(node, event_type="policy_changed")) == 1
    # An edit while the node runs is recorded (at the latest at the next witnessing round).
    policy.write_bytes(policy.read_bytes() + b"\n# reviewed\n")
    with node.operator_client() as c:
        c.post_json("/v1/ledger/witness", {})
    changes = entries(node, event_type="policy_changed")
    assert len(changes) == 2
    assert changes[1]["entry"]["previous_digest"] == first
    assert changes[1]["entry"]["digest"] != first
    assert_no_raw(node)


# --- proofs -------------------------------------------------------------------------------------


def test_checkpoint_consistency_and_inclusion_proofs_verify(
    three_nodes: dict[str, RunningNode], tmp_path: Path
) -> None:
    oem, media = three_nodes["oem"], three_nodes["media"]
    verifier = log_verifier(oem)
    upload(oem, "proof_a", write_leads(tmp_path / "a.csv"))
    with oem.client_from(media) as c:
        first = c.get_json("/v1/peer/ledger/checkpoint")
    cp1, _ = open_checkpoint(first["note"].encode(), [verifier], origin="cleanroom/oem")
    assert cp1.size == first["size"] > 0

    upload(oem, "proof_b", write_leads(tmp_path / "b.csv"))
    with oem.client_from(media) as c:
        second = c.get_json("/v1/peer/ledger/checkpoint", params={"old": str(cp1.size)})
        cp2, _ = open_checkpoint(second["note"].encode(), [verifier], origin="cleanroom/oem")
        assert cp2.size > cp1.size
        verify_consistency(cp1.size, cp2.size, cp1.root, cp2.root,
                           b64list(second["consistency"]))
        cons = c.get_json("/v1/peer/ledger/consistency",
                          params={"old": str(cp1.size), "new": str(cp2.size)})
        verify_consistency(cp1.size, cp2.size, cp1.root, cp2.root, b64list(cons["proof"]))
        # Each entry is in the signed tree.
        all_entries = entries(oem)[: cp2.size]
        for e in [*all_entries[::max(1, len(all_entries) // 8)], all_entries[-1]]:
            inc = c.get_json("/v1/peer/ledger/inclusion",
                             params={"index": str(e["index"]), "size": str(cp2.size)})
            leaf = leaf_hash(e["body"].encode())
            assert leaf.hex() == e["leaf_hash"]
            verify_inclusion(leaf, e["index"], cp2.size, b64list(inc["proof"]), cp2.root)

    # The same through the function `audit verify --peers` uses.
    note, proof = fetch_peer_checkpoint(media.context(), "oem", cp1.size)
    cp3, _ = open_checkpoint(note, [peer_log_verifier(media.context(), "oem")],
                             origin="cleanroom/oem")
    verify_consistency(cp1.size, cp3.size, cp1.root, cp3.root, proof)


@pytest.mark.parametrize(
    ("path", "params", "status", "words"),
    [
        ("/v1/peer/ledger/consistency", {"old": "5", "new": "2"}, 400, "'old'"),
        ("/v1/peer/ledger/consistency", {"old": "0", "new": "99999999"}, 400, "'new'"),
        ("/v1/peer/ledger/consistency", {"old": "-1", "new": "2"}, 422, "old"),
        ("/v1/peer/ledger/consistency", {"old": "x", "new": "2"}, 422, "old"),
        ("/v1/peer/ledger/consistency", {"new": "2"}, 422, "old"),
        ("/v1/peer/ledger/inclusion", {"index": "3", "size": "3"}, 400, "'index'"),
        ("/v1/peer/ledger/inclusion", {"index": "0", "size": "0"}, 422, "size"),
        ("/v1/peer/ledger/inclusion", {"index": "0", "size": "99999999"}, 400, "'size'"),
        ("/v1/peer/ledger/checkpoint", {"old": "-3"}, 422, "old"),
    ],
)
def test_bad_proof_parameters_are_4xx(
    three_nodes: dict[str, RunningNode], path: str, params: dict[str, str], status: int,
    words: str
) -> None:
    oem, dealer = three_nodes["oem"], three_nodes["dealer"]
    with oem.client_from(dealer, retries=0) as c, pytest.raises(PeerCallError) as exc:
        c.get_json(path, params=params)
    assert status_of(exc) == status
    assert words in exc.value.reason


def test_checkpoint_beyond_old_size_still_answers(three_nodes: dict[str, RunningNode]) -> None:
    oem, dealer = three_nodes["oem"], three_nodes["dealer"]
    with oem.client_from(dealer) as c:
        got = c.get_json("/v1/peer/ledger/checkpoint", params={"old": str(10**9)})
    assert got["consistency"] is None and "larger" in got["consistency_error"]


@pytest.mark.parametrize(
    ("body", "words"),
    [
        ({"note": "not a note"}, "not a signed note"),
        ({}, "note"),
        ({"note": 5}, "note"),
    ],
)
def test_bad_cosignature_bodies_are_4xx(
    three_nodes: dict[str, RunningNode], body: dict[str, Any], words: str
) -> None:
    oem, media = three_nodes["oem"], three_nodes["media"]
    with oem.client_from(media, retries=0) as c, pytest.raises(PeerCallError) as exc:
        c.post_json("/v1/peer/ledger/cosignature", body)
    assert status_of(exc) in (400, 422)
    assert words in exc.value.reason


def test_cosignature_must_be_the_callers_own(three_nodes: dict[str, RunningNode]) -> None:
    oem, media, dealer = three_nodes["oem"], three_nodes["media"], three_nodes["dealer"]
    with oem.client_from(media) as c:
        note = c.get_json("/v1/peer/ledger/checkpoint")["note"]
    # Uncosigned note: refused.
    with oem.client_from(media, retries=0) as c, pytest.raises(PeerCallError) as exc:
        c.post_json("/v1/peer/ledger/cosignature", {"note": note})
    assert status_of(exc) == 400 and "no cosignature of cleanroom/media" in exc.value.reason
    # Dealer cosigns (through a real round), then media replays dealer's cosignature as its
    # own delivery: it carries no cosignature of media, so it is refused.
    with dealer.operator_client() as c:
        c.post_json("/v1/ledger/witness", {})
    st = node_store(dealer).peer_state("cleanroom/oem")
    assert st is not None
    cosigned = (st.note + st.cosignature.encode()).decode()
    with oem.client_from(media, retries=0) as c, pytest.raises(PeerCallError) as exc:
        c.post_json("/v1/peer/ledger/cosignature", {"note": cosigned})
    assert status_of(exc) == 400


def test_access_rules(three_nodes: dict[str, RunningNode]) -> None:
    oem, media = three_nodes["oem"], three_nodes["media"]
    for path in ("/v1/ledger/entries", "/v1/ledger/checkpoint", "/v1/ledger/witness"):
        with oem.client_from(media, retries=0) as c, pytest.raises(PeerCallError) as exc:
            c.get_json(path)
        assert status_of(exc) == 403
    with oem.client_from(media, retries=0) as c, pytest.raises(PeerCallError) as exc:
        c.post_json("/v1/ledger/witness", {})
    assert status_of(exc) == 403
    # The operator is not a peer.
    with oem.operator_client(retries=0) as c, pytest.raises(PeerCallError) as exc:
        c.get_json("/v1/peer/ledger/checkpoint")
    assert status_of(exc) == 403
    # Without the token the operator API refuses too.
    ctx = oem.context()
    bare = PeerClient(peer_name="self", base_url=oem.url, peer_cert_pem=ctx.identity.cert_pem,
                      own_cert_path=ctx.identity.cert_path, own_key_path=ctx.identity.key_path,
                      retries=0)
    with bare, pytest.raises(PeerCallError) as exc:
        bare.get_json("/v1/ledger/entries")
    assert status_of(exc) == 401


def test_entries_pages_and_filters(
    three_nodes: dict[str, RunningNode], tmp_path: Path
) -> None:
    oem = three_nodes["oem"]
    for i in range(3):
        upload(oem, f"page_{i}", write_leads(tmp_path / f"p{i}.csv"))
    everything = entries(oem)
    assert [e["index"] for e in everything] == list(range(len(everything)))
    with oem.operator_client() as c:
        p1 = c.get_json("/v1/ledger/entries", params={"limit": "2"})
        p2 = c.get_json("/v1/ledger/entries", params={"limit": "2", "offset": "2"})
        assert [e["index"] for e in p1["entries"] + p2["entries"]] == [0, 1, 2, 3]
        assert p1["next_offset"] == 2
        regs = c.get_json("/v1/ledger/entries",
                          params={"event_type": "dataset_registered", "limit": "1000"})
        assert regs["entries"] and all(
            e["entry"]["type"] == "dataset_registered" for e in regs["entries"]
        )
        both = c.get_json("/v1/ledger/entries", params={
            "event_type": "dataset_registered,policy_changed", "limit": "1000"})
        assert len(both["entries"]) >= len(regs["entries"])
        ts = [e["entry"]["ts"] for e in everything]
        mid = sorted(ts)[len(ts) // 2]
        since = c.get_json("/v1/ledger/entries", params={"since": str(mid), "limit": "1000"})
        assert since["entries"] and all(e["entry"]["ts"] >= mid for e in since["entries"])
        until = c.get_json("/v1/ledger/entries", params={"until": str(mid), "limit": "1000"})
        assert all(e["entry"]["ts"] < mid for e in until["entries"])
        assert len(since["entries"]) + len(until["entries"]) == len(everything)
        iso = c.get_json("/v1/ledger/entries", params={"since": "2000-01-01T00:00:00Z"})
        assert len(iso["entries"]) == min(100, len(everything))
        none = c.get_json("/v1/ledger/entries", params={"query_id": "q-nosuchquery0000"})
        assert none["entries"] == [] and none["next_offset"] is None

    # After witnessing, the peer filter finds the entries naming that peer.
    with oem.operator_client() as c:
        c.post_json("/v1/ledger/witness", {})
    media_entries = entries(oem, peer="media")
    assert media_entries and all(
        e["entry"].get("peer") == "media" for e in media_entries
    )
    assert not any(e["entry"].get("peer") == "dealer" for e in media_entries)


@pytest.mark.parametrize(
    ("params", "status", "words"),
    [
        ({"limit": "0"}, 422, "limit"),
        ({"limit": "100000"}, 422, "limit"),
        ({"offset": "-1"}, 422, "offset"),
        ({"event_type": "query_exploded"}, 400, "unknown event type"),
        ({"since": "yesterday"}, 400, "'since'"),
        ({"since": "2000", "until": "1000"}, 400, "'until'"),
    ],
)
def test_bad_entries_parameters_are_4xx(
    three_nodes: dict[str, RunningNode], params: dict[str, str], status: int, words: str
) -> None:
    with three_nodes["oem"].operator_client(retries=0) as c, pytest.raises(PeerCallError) as e:
        c.get_json("/v1/ledger/entries", params=params)
    assert status_of(e) == status
    assert words in e.value.reason


def test_no_raw_identifiers_in_any_entry(three_nodes: dict[str, RunningNode]) -> None:
    assert_no_raw(*three_nodes.values())



def test_cli_waits_while_another_command_holds_the_ledger(
    node_factory: Callable[[str, str], RunningNode], tmp_path: Path
) -> None:
    """No node runs, but another process (here: this test) is the writer for a moment:
    the CLI neither appends beside it nor loses the event; it records once it may."""
    import threading

    from cleanroom.ledger import event
    from cleanroom.node.audit import close_ledger, record

    node = node_factory("busy", "media")
    ctx = node.context()
    record(ctx, event("query_cancelled", query_id="q-abcdefghjkmnpqrs", by="busy"))
    timer = threading.Timer(1.5, close_ledger, args=(ctx,))
    timer.start()
    try:
        cli = run_node_cli("dataset", "add", "--dir", str(node.dir), "--name", "users",
                           "--file", str(write_leads(tmp_path / "u.csv")),
                           "--id-columns", "phone,email")
    finally:
        timer.join()
    assert cli.returncode == 0, cli.stderr
    assert "recorded in the audit ledger" in cli.stdout
    node.start()
    got = entries(node)
    assert [e["entry"]["type"] for e in got][:1] == ["query_cancelled"]
    regs = [e for e in got if e["entry"]["type"] == "dataset_registered"]
    assert len(regs) == 1 and regs[0]["index"] > 0
    assert_no_raw(node)
