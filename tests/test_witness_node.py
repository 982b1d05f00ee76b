"""Cross-party witnessing between real node processes.

- a round between three nodes leaves each node's served checkpoint cosigned by the two
  others, every ledger verifies with those cosignatures, and a second round settles
  (nothing new to cosign, no ledger grows);
- a node whose ledger was rewritten while it was stopped is refused by both peers after
  its restart: each records one ``witness_alarm`` and does not cosign;
- the timer runs rounds by itself; a pinned peer that is down is a status, not a crash.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import pytest
from conftest import RunningNode, pin_each_other
from sqlalchemy import create_engine, text
from test_ledger_node import entries, node_store, upload, write_leads

from cleanroom.ledger import SIG_COSIGNATURE_V1, NoteVerifier, canonical_json, scan_entries
from cleanroom.ledger.merkle import leaf_hash
from cleanroom.ledger.note import find_cosignatures, open_checkpoint
from cleanroom.ledger.verify import verify_store
from cleanroom.node.audit import log_origin
from cleanroom.node.identity import NodeIdentity
from cleanroom.transport import PeerCallError


def keys(node: RunningNode) -> tuple[NoteVerifier, NoteVerifier]:
    pub = NodeIdentity.load(node.dir).public_key
    origin = log_origin(node.name)
    return NoteVerifier(origin, pub), NoteVerifier(origin, pub, SIG_COSIGNATURE_V1)


def round_on(node: RunningNode) -> dict[str, dict[str, Any]]:
    with node.operator_client() as c:
        got = c.post_json("/v1/ledger/witness", {})
    return {p["peer"]: p for p in got["peers"]}


def op_checkpoint(node: RunningNode) -> dict[str, Any]:
    with node.operator_client() as c:
        got: dict[str, Any] = c.get_json("/v1/ledger/checkpoint")
    return got


def test_three_nodes_cosign_each_other(three_nodes: dict[str, RunningNode]) -> None:
    nodes = list(three_nodes.values())
    for node in nodes:
        statuses = round_on(node)
        assert set(statuses) == {n.name for n in nodes if n is not node}
        for s in statuses.values():
            assert s["status"] in ("cosigned", "up_to_date"), s
            assert s["delivered"] is True, s

    for node in nodes:
        others = [n for n in nodes if n is not node]
        cp = op_checkpoint(node)
        assert {c["witness"] for c in cp["cosigned_by"]} == {log_origin(o.name) for o in others}
        # The served note verifies with the node's key, and the stored cosignatures with
        # the pinned keys of the two others.
        log_key, _ = keys(node)
        checkpoint, _note = open_checkpoint(cp["note"].encode(), [log_key])
        assert checkpoint.size == cp["size"]
        report = verify_store(node_store(node), log_origin(node.name), [log_key],
                              [keys(o)[1] for o in others])
        assert report.ok, report.summary()
        assert report.cosignatures_checked >= 2
        # What each witness remembers matches what the node serves.
        for o in others:
            st = node_store(o).peer_state(log_origin(node.name))
            assert st is not None and st.size == cp["size"]
            cosigned = st.note + st.cosignature.encode()
            assert len(find_cosignatures(cosigned, [keys(o)[1]])) == 1
            # ... and the witness tells the node so when asked (its own log only).
            with o.client_from(node) as cl:
                got = cl.get_json("/v1/peer/ledger/witnessed")
                assert got["note"].encode() == cosigned and got["size"] == cp["size"]
                with pytest.raises(PeerCallError) as exc:
                    cl.get_json("/v1/peer/ledger/witnessed",
                                params={"origin": log_origin(o.name)})
                assert exc.value.status == 403

    # Nothing happened since: a second round settles without growing any ledger.
    sizes = {n.name: op_checkpoint(n)["log_size"] for n in nodes}
    for node in nodes:
        statuses = round_on(node)
        assert all(s["status"] == "up_to_date" for s in statuses.values()), statuses
    assert {n.name: op_checkpoint(n)["log_size"] for n in nodes} == sizes


def _tamper(node: RunningNode) -> int:
    """Rewrite one dataset_registered entry as a careful forger would (new body and new
    leaf hash, signed checkpoints and collected cosignatures deleted). Returns its index."""
    engine = create_engine(f"sqlite:///{node.dir / 'node.db'}")
    with engine.begin() as conn:
        idx, body = conn.execute(text(
            "SELECT idx, body FROM ledger_entry WHERE event_type = 'dataset_registered' "
            "ORDER BY idx LIMIT 1")).one()
        obj = json.loads(body)
        obj["rows"] = obj["rows"] + 1000
        new = canonical_json(obj)
        conn.execute(text("UPDATE ledger_entry SET body = :b, leaf_hash = :h WHERE idx = :i"),
                     {"b": new, "h": leaf_hash(new), "i": idx})
        conn.execute(text("DELETE FROM ledger_checkpoint"))
        conn.execute(text("DELETE FROM ledger_cosignature"))
    engine.dispose()
    return int(idx)


def test_rewritten_ledger_is_refused_by_peers(
    node_factory: Callable[[str, str], RunningNode], tmp_path: Any
) -> None:
    a, b, c = node_factory("ta", "oem"), node_factory("tb", "media"), node_factory("tc", "dealer")
    pin_each_other(a, b, c)
    for n in (a, b, c):
        n.start()
    upload(a, "leads", write_leads(tmp_path / "leads.csv"))
    for n in (b, c):
        assert round_on(n)["ta"]["status"] == "cosigned"
    a.stop()
    _tamper(a)
    a.start()

    for n in (b, c):
        before = len(entries(n, event_type="witness_alarm"))
        statuses = round_on(n)
        assert statuses["ta"]["status"] == "alarm", statuses
        assert statuses["ta"]["reason"] in ("fork", "inconsistent")
        assert statuses["ta"]["delivered"] is False
        other = "tc" if n is b else "tb"
        assert statuses[other]["status"] in ("cosigned", "up_to_date")
        alarms = entries(n, event_type="witness_alarm")
        assert len(alarms) == before + 1
        alarm = alarms[-1]["entry"]
        assert alarm["peer"] == "ta" and alarm["origin"] == "cleanroom/ta"
        assert alarm["reason"] == statuses["ta"]["reason"]
        # The same refused checkpoint again: still refused, not recorded twice.
        again = round_on(n)
        assert again["ta"]["status"] == "alarm"
        assert len(entries(n, event_type="witness_alarm")) == before + 1
        # The witness memory still holds the honest checkpoint.
        st = node_store(n).peer_state("cleanroom/ta")
        assert st is not None
        # The witness's own ledger still verifies but reports the alarm.
        log_key, _ = keys(n)
        report = verify_store(node_store(n), log_origin(n.name), [log_key])
        assert report.integrity_ok and [x.peer for x in report.alarms] == ["ta"]

    cp = op_checkpoint(a)
    assert cp["cosigned_by"] == []
    for n in (a, b, c):
        bodies = [r.body for r in node_store(n).iter_entries()]
        assert scan_entries(bodies) == []


def test_timer_rounds_and_unreachable_peer(
    node_factory: Callable[[str, str], RunningNode]
) -> None:
    x, y, z = node_factory("wx", "oem"), node_factory("wy", "media"), node_factory("wz", "dealer")
    pin_each_other(x, y, z)  # z is pinned but never started
    y.start()
    x.start(env={"CLEANROOM_WITNESS_INTERVAL_SECONDS": "0.3"})
    deadline = time.monotonic() + 30
    last: dict[str, dict[str, Any]] = {}
    while time.monotonic() < deadline:
        with x.operator_client() as cl:
            state = cl.get_json("/v1/ledger/witness")
        last = {p["peer"]: p for p in state["last_round"]}
        if last.get("wy", {}).get("status") in ("cosigned", "up_to_date") and last.get(
            "wy", {}
        ).get("delivered"):
            break
        time.sleep(0.2)
    assert last["wy"]["status"] in ("cosigned", "up_to_date"), last
    assert last["wz"]["status"] == "unreachable"
    assert "wz" in last["wz"]["detail"]
    # y got the cosignature back without anyone asking for a round.
    cp = op_checkpoint(y)
    assert "cleanroom/wx" in {w["witness"] for w in cp["cosigned_by"]}
    assert x.proc is not None and x.proc.poll() is None
    regs = [e["entry"] for e in entries(x, event_type="checkpoint_cosigned")]
    assert regs and all(r["peer"] == "wy" for r in regs)
