"""The openmined-psi compatible endpoint of a running node, used by the library's stock
Python client over mutual TLS: intersection and cardinality equal the plaintext join on
the node's normalised identifiers (GCS, Bloom filter and raw setups), policy refuses
partners and reveal modes it does not allow, malformed or replayed requests give 4xx, the
GCS setup is sized for the asked false-positive rate, and every session is in the node's
ledger (digests and sizes only)."""

from __future__ import annotations

from typing import Any

import private_set_intersection.python as psi
import pytest
from test_queries_support import (
    BASE_POLICIES,
    QueryNodes,
    ledger_bodies,
    ledger_entries,
    policy_override,
    query_nodes,
)

from cleanroom.ledger import digest, find_raw_looking
from cleanroom.node.datasets import load_dataset
from cleanroom.transport import PeerCallError

__all__ = ["query_nodes"]

BASE = "/v1/peer/psi/openmined"


def _phones(nodes: QueryNodes, party: str, dataset: str) -> list[str]:
    frame = load_dataset(nodes[party].context(), dataset, columns=["phone"])
    return sorted({str(v) for v in frame["phone"].dropna()})


def _run(nodes: QueryNodes, items: list[str], *, reveal: bool, kind: str = "gcs",
         mangle: bool = False) -> tuple[Any, str]:
    media, oem = nodes["media"], nodes["oem"]
    client = psi.client.CreateWithNewKey(reveal)
    with media.client_from(oem, retries=0) as c:
        r = c.request("POST", f"{BASE}/setup", params={
            "dataset": "users", "column": "phone", "kind": kind,
            "reveal": "intersection" if reveal else "cardinality",
            "client_set_size": str(len(items))}, idempotent=False)
        sid = r.headers["X-PSI-Session"]
        setup = psi.ServerSetup()
        setup.ParseFromString(r.content)
        body = client.CreateRequest(items).SerializeToString()
        if mangle:
            body = body[: len(body) // 2]
        r2 = c.request("POST", f"{BASE}/{sid}/request", content=body,
                       headers={"Content-Type": "application/x-protobuf"}, idempotent=False)
    response = psi.Response()
    response.ParseFromString(r2.content)
    if reveal:
        return sorted(client.GetIntersection(setup, response)), sid
    return int(client.GetIntersectionSize(setup, response)), sid


@pytest.mark.parametrize("kind", ["gcs", "bloom_filter", "raw"])
def test_stock_client_gets_the_plaintext_intersection(query_nodes: QueryNodes, kind: str
                                                      ) -> None:
    mine = _phones(query_nodes, "oem", "leads")
    theirs = set(_phones(query_nodes, "media", "users"))
    truth = sorted(i for i, p in enumerate(mine) if p in theirs)
    assert truth
    got, _ = _run(query_nodes, mine, reveal=True, kind=kind)
    if kind == "raw":
        assert got == truth
    else:  # GCS / Bloom filter: false positives allowed at rate 1e-9 for the whole query
        assert set(truth) <= set(got) and len(got) - len(truth) <= 1
    count, _ = _run(query_nodes, mine, reveal=False, kind=kind)
    assert count in (len(truth), len(truth) + (0 if kind == "raw" else 1))


def test_policy_decides_partner_and_reveal(query_nodes: QueryNodes) -> None:
    media = query_nodes["media"]
    card_only = BASE_POLICIES["media"].replace(
        'psi_reveal = ["intersection", "cardinality"]', 'psi_reveal = ["cardinality"]')
    mine = _phones(query_nodes, "oem", "leads")
    with policy_override(media, card_only):
        with pytest.raises(PeerCallError) as info:
            _run(query_nodes, mine, reveal=True)
        assert info.value.status == 403 and "psi_reveal" in str(info.value)
        count, _ = _run(query_nodes, mine, reveal=False)
        assert isinstance(count, int)
    no_match = BASE_POLICIES["media"].replace('query_types = ["match", "segment_stats"]',
                                              'query_types = ["segment_stats"]')
    with policy_override(media, no_match), pytest.raises(PeerCallError) as info:
        _run(query_nodes, mine, reveal=False)
    assert info.value.status == 403 and "query_types" in str(info.value)
    with media.client_from(query_nodes["oem"], retries=0) as c, \
            pytest.raises(PeerCallError) as info:
        c.request("POST", f"{BASE}/setup", params={
            "dataset": "behaviour", "column": "price_checks", "client_set_size": "3"},
            idempotent=False)
    assert info.value.status == 403


def test_malformed_and_replayed_requests_give_4xx(query_nodes: QueryNodes) -> None:
    mine = _phones(query_nodes, "oem", "leads")[:50]
    with pytest.raises(PeerCallError) as info:
        _run(query_nodes, mine, reveal=True, mangle=True)
    assert info.value.status == 400
    _, sid = _run(query_nodes, mine, reveal=True)
    body = psi.client.CreateWithNewKey(True).CreateRequest(mine).SerializeToString()
    media, oem = query_nodes["media"], query_nodes["oem"]
    with media.client_from(oem, retries=0) as c:
        with pytest.raises(PeerCallError) as info:  # a session answers once
            c.request("POST", f"{BASE}/{sid}/request", content=body, idempotent=False)
        assert info.value.status == 404
        r = c.request("POST", f"{BASE}/setup", params={
            "dataset": "users", "column": "phone", "reveal": "intersection",
            "client_set_size": "50"}, idempotent=False)
        sid2 = r.headers["X-PSI-Session"]
        with pytest.raises(PeerCallError) as info:  # garbage protobuf
            c.request("POST", f"{BASE}/{sid2}/request", content=b"\xff\x01garbage",
                      idempotent=False)
        assert info.value.status == 400


def _setup(nodes: QueryNodes, n_client: int, fpr: str) -> tuple[str, bytes]:
    media, oem = nodes["media"], nodes["oem"]
    with media.client_from(oem, retries=0) as c:
        r = c.request("POST", f"{BASE}/setup", params={
            "dataset": "users", "column": "phone", "reveal": "intersection",
            "client_set_size": str(n_client), "fpr": fpr}, idempotent=False)
    return r.headers["X-PSI-Session"], bytes(r.content)


def test_gcs_setup_is_sized_for_the_configured_rate(query_nodes: QueryNodes) -> None:
    """GCS sizes its hash range so that one client element is a false positive with
    probability ``|server| / hash_range``; a query of ``client_set_size`` elements then sees
    one with probability at most ``fpr`` (union bound). Checked on the endpoint's real setup
    message for two rates: the range follows the asked rate, never a looser one."""
    server_n = len(_phones(query_nodes, "media", "users"))
    ranges = {}
    for fpr in ("1e-9", "0.001"):
        _, data = _setup(query_nodes, 50, fpr)
        setup = psi.ServerSetup()
        setup.ParseFromString(data)
        assert setup.WhichOneof("data_structure") == "gcs"
        ranges[fpr] = setup.gcs.hash_range
        per_element = server_n / setup.gcs.hash_range
        assert 50 * per_element <= float(fpr) * 1.01
    assert ranges["0.001"] < ranges["1e-9"]


def test_every_session_is_recorded_without_raw_data(query_nodes: QueryNodes) -> None:
    media, oem = query_nodes["media"], query_nodes["oem"]
    mine = _phones(query_nodes, "oem", "leads")[:40]
    client = psi.client.CreateWithNewKey(True)
    sid, setup_bytes = _setup(query_nodes, len(mine), "1e-9")
    body = client.CreateRequest(mine).SerializeToString()
    with media.client_from(oem, retries=0) as c:
        reply = bytes(c.request("POST", f"{BASE}/{sid}/request", content=body,
                                idempotent=False).content)
        bad_sid, _ = _setup(query_nodes, 5, "1e-9")
        with pytest.raises(PeerCallError):
            c.request("POST", f"{BASE}/{bad_sid}/request", content=b"\xff\x01garbage",
                      idempotent=False)

    ok = ledger_entries(media, sid)
    assert [(e["type"], e.get("round")) for e in ok] == [
        ("session_started", None), ("message_received", "setup_request"),
        ("message_sent", "server_setup"), ("message_received", "client_request"),
        ("message_sent", "server_response"), ("session_ended", None)]
    assert all(e["protocol"] == "openmined_psi" and e["peer"] == "oem"
               and e["session_id"] == sid for e in ok)
    by_round = {e.get("round"): e for e in ok}
    for round_name, data in (("server_setup", setup_bytes), ("client_request", body),
                             ("server_response", reply)):
        assert by_round[round_name]["digest"] == digest(data)
        assert by_round[round_name]["size"] == len(data)
    end = ok[-1]
    assert end["outcome"] == "ok" and end["messages_received"] == 2
    assert end["messages_sent"] == 2
    assert end["bytes_sent"] == len(setup_bytes) + len(reply)

    failed = ledger_entries(media, bad_sid)
    assert failed[-1]["type"] == "session_ended" and failed[-1]["outcome"] == "failed"
    assert failed[-2]["digest"] == digest(b"\xff\x01garbage")

    entries = ok + failed
    assert not find_raw_looking(entries)
    blob = b"\n".join(ledger_bodies(media))
    assert not [p for p in _phones(query_nodes, "media", "users") if p.encode() in blob]
