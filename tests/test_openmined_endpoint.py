"""The openmined-psi compatible endpoint of a running node, used by the library's stock
Python client over mutual TLS: intersection and cardinality equal the plaintext join on
the node's normalised identifiers (GCS, Bloom filter and raw setups), policy refuses
partners and reveal modes it does not allow, malformed or replayed requests give 4xx."""

from __future__ import annotations

from typing import Any

import private_set_intersection.python as psi
import pytest
from test_queries_support import BASE_POLICIES, QueryNodes, policy_override, query_nodes

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
