"""The anonymous query between real node processes: OEM, media platform and dealer.

Small synthetic data (cleanroom.synth) is ingested at each party's node through the
operator API; the media node builds its nearest-stores table from its own datasets and
the OEM's public store list (fetched over mutual TLS), the dealer node its inventory
table; the OEM runs ``store_recommendation`` in batch and in real-time mode. The media
node captures every request body it receives (test hook ``CLEANROOM_ANONQ_TRANSCRIPT``)
so the transcript can be checked byte by byte.
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from conftest import RunningNode, make_node, pin_each_other

from cleanroom.anonq import tables
from cleanroom.anonq.api import TRANSCRIPT_ENV, read_transcript
from cleanroom.anonq.client import lead_items
from cleanroom.ledger import digest, scan_entries
from cleanroom.node.datasets import load_dataset
from cleanroom.synth import SynthConfig, generate
from cleanroom.transport import PeerCallError
from parties.recommend_eval import check_nearest
from parties.schemas import get_schema, load_table, table_file
from protocols.labeled_psi import oprf
from protocols.labeled_psi.messages import (
    BucketRequest,
    EvalRequest,
    Mode,
    TableRequest,
    decode,
)

UPLOADS = {
    "oem": ("oem/leads", "oem/stores"),
    "media": ("media/users", "media/locations"),
    "dealer": ("dealer/inventory",),
}


def _upload(node: RunningNode, table: str, path: Path) -> None:
    name = table.split("/", 1)[1]
    id_columns = ",".join(f"{c}:{k}" for c, k in get_schema(table).id_columns.items())
    with node.operator_client(timeout=120.0) as client:
        client.upload(f"/v1/datasets/{name}/versions", path.read_bytes(),
                      params={"id_columns": id_columns, "format": path.suffix.lstrip("."),
                              "filename": path.name})


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    base = tmp_path_factory.mktemp("anonq")
    data = base / "data"
    generate(data, SynthConfig(leads=400, seed=5))
    nodes = {p: make_node(base / "nodes", p, p) for p in ("oem", "media", "dealer")}
    pin_each_other(*nodes.values())
    capture = base / "capture"
    try:
        for party, node in nodes.items():
            node.start(env={TRANSCRIPT_ENV: str(capture)} if party == "media" else None)
        for party, names in UPLOADS.items():
            for t in names:
                _upload(nodes[party], t, table_file(data, t))
        with nodes["media"].operator_client(timeout=300.0) as c:
            media = c.post_json("/v1/anonq/tables/nearest_stores/publish",
                                {"kind": "nearest_stores", "stores_peer": "oem"})
        with nodes["dealer"].operator_client(timeout=300.0) as c:
            dealer = c.post_json("/v1/anonq/tables/inventory/publish",
                                 {"kind": "inventory", "min_bucket_size": 1})
        yield {"nodes": nodes, "data": data, "capture": capture, "media": media,
               "dealer": dealer}
    finally:
        for node in nodes.values():
            node.stop()


def _recommend(world: dict[str, Any], mode: str) -> tuple[dict[str, Any], pd.DataFrame]:
    with world["nodes"]["oem"].operator_client(timeout=300.0) as c:
        report = c.post_json("/v1/anonq/store-recommendations", {
            "media_peer": "media", "dealer_peer": "dealer", "mode": mode,
            "output": f"rec-{mode}.parquet", "query_id": f"q-test{mode}"})
    return report, pd.read_parquet(report["path"])


def _check_truth(world: dict[str, Any], result: pd.DataFrame) -> None:
    truth = load_table(world["data"], "ground_truth/nearest_stores")
    ident = load_table(world["data"], "ground_truth/identity_map")
    check = check_nearest(result, truth, ident)
    assert check.matched_leads > 50
    assert check.checked > 0.9 * check.matched_leads
    assert check.all_equal, check.as_dict()


def test_published_tables(world: dict[str, Any]) -> None:
    media, dealer = world["media"], world["dealer"]
    assert media["version"] == 1 and media["entries"] > 1000
    assert dealer["entries"] > 0
    folder = tables.table_dir(world["nodes"]["media"].dir / "data", "nearest_stores")
    assert (folder / "key").stat().st_mode & 0o777 == 0o600
    meta = tables.read_meta(folder)
    assert meta.sources["store_list_tag"] and meta.kind == "nearest_stores"


def test_store_recommendation_batch_matches_ground_truth(world: dict[str, Any]) -> None:
    report, result = _recommend(world, "batch")
    assert report["rows"] == report["leads"] == 400
    assert report["inventory_found"] > 0
    _check_truth(world, result)


def test_store_recommendation_realtime_matches_ground_truth(world: dict[str, Any]) -> None:
    report, result = _recommend(world, "realtime")
    assert report["mode"] == "realtime"
    _, batch = _recommend(world, "batch")
    _check_truth(world, result)
    cols = ["lead_id", "matched", "recommended_store", "home_top5", "work_top5"]
    pd.testing.assert_frame_equal(result[cols], batch[cols])
    # the real-time endpoints' successes are counted for the access summary, not logged
    # one line each (the summary is written every 10 s and at shutdown)
    log = world["nodes"]["media"].log()
    assert re.search(r"POST /v1/peer/anonq/tables/\S+/(eval|buckets) 200 ", log) is None


def _received(world: dict[str, Any]) -> list[tuple[str, bytes]]:
    return read_transcript(world["capture"])


def test_owner_transcript_holds_only_blinded_points_and_bucket_ids(
        world: dict[str, Any]) -> None:
    _recommend(world, "realtime")
    _recommend(world, "batch")
    received = _received(world)
    kinds = {name for name, _ in received}
    assert {"eval", "buckets", "download"} <= kinds
    leads = load_table(world["data"], "oem/leads")
    # what the OEM would have fed in: its normalised identifiers, their hash to curve,
    # their OPRF outputs (computed here with the media key, which only this test reads)
    items, _ = lead_items(load_dataset(world["nodes"]["oem"].context(), "leads"))
    assert len(items) > len(leads)
    folder = tables.table_dir(world["nodes"]["media"].dir / "data", "nearest_stores")
    key = (folder / "key").read_bytes()
    meta = tables.read_meta(folder)
    hashed = oprf.hash_to_curve(items)
    outputs = oprf.oprf_direct(key, items)
    tags = oprf.TagDeriver(meta.table_id).derive_many(outputs)
    secrets_ = {hashed[i:i + 32] for i in range(0, len(hashed), 32)}
    secrets_ |= {outputs[i:i + 32] for i in range(0, len(outputs), 32)}
    secrets_ |= {t for t, _ in tags}
    raw_values = [x[1:] for x in items]  # identifier text without its kind byte
    for name, body in received:
        msg = decode(body)
        if name == "eval":
            assert isinstance(msg, EvalRequest)
            assert len(body) == 40 + 32 * msg.count  # header, mode/suite/count, points
            points = {msg.points[i:i + 32] for i in range(0, len(msg.points), 32)}
            assert not points & secrets_
        elif name == "buckets":
            assert isinstance(msg, BucketRequest)
            assert len(body) == 40 + 4 * len(msg.buckets)
        else:
            assert isinstance(msg, TableRequest)
        for value in raw_values[:2000]:
            assert value not in body
        for s in list(secrets_)[:500]:
            assert s not in body
    # the owner's ledger: one digest per received body, nothing raw-looking
    with world["nodes"]["media"].operator_client() as c:
        page = c.get_json("/v1/ledger/entries", params={
            "peer": "oem", "event_type": "message_received", "limit": "1000"})
        everything = c.get_json("/v1/ledger/entries", params={"limit": "1000"})
    recorded = {json.loads(e["body"])["digest"] for e in page["entries"]}
    assert {digest(b) for _, b in received} <= recorded
    assert not scan_entries([e["body"].encode() for e in everything["entries"]])
    for e in everything["entries"]:
        for value in raw_values[:2000]:
            assert value.decode("utf-8", "replace") not in e["body"]


def test_public_columns_under_policy(world: dict[str, Any]) -> None:
    oem, media, dealer = (world["nodes"][p] for p in ("oem", "media", "dealer"))
    with oem.client_from(media) as c:
        r = c.request("GET", "/v1/peer/public/stores", params={"columns": "store_id,lat"})
        assert r.headers["content-type"].startswith("application/vnd.apache.arrow")
        with pytest.raises(PeerCallError) as e1:
            c.request("GET", "/v1/peer/public/leads", params={"columns": "city"})
        assert e1.value.status == 403 and "datasets.leads.columns.city" in e1.value.reason
        with pytest.raises(PeerCallError) as e2:
            c.request("GET", "/v1/peer/public/leads")
        assert e2.value.status == 403 and "not public" in e2.value.reason
    # the media node's public endpoint: its datasets have no public column at all
    with media.client_from(oem) as c:
        with pytest.raises(PeerCallError) as e3:
            c.request("GET", "/v1/peer/public/users", params={"columns": "phone"})
        assert e3.value.status == 403 and "datasets.users.columns.phone" in e3.value.reason
    # the dealer is pinned by the media node but its partner rule has no store_recommendation
    with media.client_from(dealer) as c:
        with pytest.raises(PeerCallError) as e4:
            c.get_json("/v1/peer/anonq/tables/nearest_stores")
        assert e4.value.status == 403 and "partners.dealer.query_types" in e4.value.reason


@pytest.mark.parametrize(("field", "value"), [
    ("media_table", "nearest_stores HTTP/1.1\r\nHost: x\r\n\r\nPOST /v1/peer/x"),
    ("dealer_table", "Inventory"),
    ("query_id", "q1\r\nX-Evil: 1"),
])
def test_recommendation_spec_refuses_names_that_are_not_names(
        world: dict[str, Any], field: str, value: str) -> None:
    """Table names and query ids end up in peer request paths and headers: a value that is
    not a plain name is refused with a 4xx naming the field, before any peer call."""
    spec = {"media_peer": "media", "dealer_peer": "dealer", "mode": "realtime",
            "output": "never.parquet", field: value}
    with world["nodes"]["oem"].operator_client() as c, pytest.raises(PeerCallError) as info:
        c.post_json("/v1/anonq/store-recommendations", spec)
    assert info.value.status == 422 and field in info.value.reason


def test_malformed_requests_get_4xx(world: dict[str, Any]) -> None:
    oem, media = world["nodes"]["oem"], world["nodes"]["media"]
    base = "/v1/peer/anonq/tables/nearest_stores"
    good_eval = EvalRequest(b"\x01" * 16, Mode.REALTIME,
                            oprf.blind(oprf.new_blinding_pair()[0], [b"\x01x"])).to_bytes()
    cases: list[tuple[str, str, bytes, set[int]]] = [
        ("POST", f"{base}/eval", b"", {400}),
        ("POST", f"{base}/eval", b"garbage" * 10, {400}),
        ("POST", f"{base}/eval", good_eval[:-5], {400}),  # truncated
        ("POST", f"{base}/eval", good_eval[:-32] + b"\xff" * 32, {400}),  # non-canonical
        ("POST", f"{base}/buckets", good_eval, {409}),  # wrong round
        ("POST", f"{base}/buckets",
         BucketRequest(b"\x07" * 16, 1, (0,)).to_bytes(), {409}),  # no such session
        ("POST", f"{base}/eval", bytes(40 + 32 * 70_000), {413}),  # oversized
        ("POST", "/v1/peer/anonq/tables/nope/eval", good_eval, {404}),
    ]
    with media.client_from(oem, retries=0) as c:
        for method, path, body, want in cases:
            with pytest.raises(PeerCallError) as exc:
                c.request(method, path, content=body, idempotent=False)
            assert exc.value.status in want, (path, len(body), exc.value)
        # replaying a finished real-time session's bucket request
        r = c.request("POST", f"{base}/eval", content=good_eval, idempotent=False)
        assert r.status_code == 200
        breq = BucketRequest(b"\x01" * 16, tables.read_meta(tables.table_dir(
            media.dir / "data", "nearest_stores")).version, (0,)).to_bytes()
        assert c.request("POST", f"{base}/buckets", content=breq,
                         idempotent=False).status_code == 200
        with pytest.raises(PeerCallError) as again:
            c.request("POST", f"{base}/buckets", content=breq, idempotent=False)
        assert again.value.status == 409
        bad = base64.urlsafe_b64encode(b"\x00" * 52).decode()
        with pytest.raises(PeerCallError) as dl:
            c.request("GET", f"{base}/download", params={"message": bad})
        assert dl.value.status == 400
    assert "Traceback" not in media.log()
