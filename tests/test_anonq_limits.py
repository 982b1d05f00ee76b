"""Anonymous query at a node: policy refusals, rate limit, evaluation budget, updates.

Real node processes (``node_factory``); the querier side runs in the test process with
the OEM node's directory (its certificate and pins), exactly as the OEM node would.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest
from conftest import RunningNode, pin_each_other

from cleanroom.anonq import tables
from cleanroom.anonq.client import (
    AnonQueryError,
    lookup_batch,
    lookup_realtime,
    sync_table,
    table_info,
)
from cleanroom.transport import PeerCallError
from parties.catalog import SERIES
from parties.labels import decode_inventory_label
from protocols.labeled_psi import Table, oprf
from protocols.psi.multikey import encode_item

Factory = Callable[[str, str], RunningNode]


def _set_rate_limit(node: RunningNode, max_queries: int) -> None:
    path = node.dir / "policy.toml"
    text = path.read_text()
    text = text.replace("rate_limit = { max_queries = 500, per_hours = 24 }",
                        f"rate_limit = {{ max_queries = {max_queries}, per_hours = 1 }}", 1)
    path.write_text(text)


def _users(n: int) -> dict[str, tuple[tuple[bytes, ...], bytes]]:
    return {f"u{i}": ((encode_item("phone", f"+86139{i:08d}"),
                       encode_item("email", f"user{i}@example.com")), b"L%07d" % i)
            for i in range(n)}


def test_policy_rate_limit_budget_and_unknown_peers(node_factory: Factory,
                                                    tmp_path: Path) -> None:
    media = node_factory("media", "media")
    oem = node_factory("oem", "oem")
    other = node_factory("other", "oem")  # pinned by media, no partner rule there
    stranger = node_factory("stranger", "oem")  # not pinned by media
    pin_each_other(media, oem, other)
    from cleanroom.node.admin import add_peer

    add_peer(stranger.dir, name="media", url=media.url, cert_file=media.cert_path,
             party="media")
    _set_rate_limit(media, 6)
    users = _users(600)
    tables.publish(media.dir / "data", "contacts", users, label_size=8, min_bucket_size=100,
                   evaluation_budget=60)
    media.start()
    ctx = oem.context()
    info = table_info(ctx, "media", "contacts")
    assert info["entry_count"] == 1200 and info["evaluations_left"] == 60

    held = [encode_item("phone", "+8613900000007"), encode_item("email", "user9@example.com"),
            encode_item("phone", "+8613712345678")]  # the last one is not in the table
    got = lookup_realtime(ctx, "media", "contacts", held, min_anonymity=100)  # session 1
    assert got == {0: b"L0000007", 1: b"L0000009"}
    # the querier's anonymity floor: refuses an owner whose buckets are smaller
    with pytest.raises(AnonQueryError, match="anonymity floor"):
        lookup_realtime(ctx, "media", "contacts", held, min_anonymity=5000)  # session 2
    # evaluation budget: 60 per window; 3 + 3 spent, 60 more are refused whole
    many = [encode_item("phone", f"+86139{i:08d}") for i in range(60)]
    with pytest.raises(PeerCallError) as budget:
        lookup_realtime(ctx, "media", "contacts", many, min_anonymity=100)  # session 3
    assert budget.value.status == 429 and "evaluation limit" in budget.value.reason
    assert lookup_realtime(ctx, "media", "contacts", many[:50],
                           min_anonymity=100) == {i: b"L%07d" % i for i in range(50)}  # 4
    table_info(ctx, "media", "contacts")  # info does not count as a session
    lookup_realtime(ctx, "media", "contacts", many[:1], min_anonymity=100)  # session 5
    with pytest.raises(PeerCallError) as budget2:  # session 6: budget exhausted (54 + 1 + 6)
        lookup_realtime(ctx, "media", "contacts", many[:6], min_anonymity=100)
    assert budget2.value.status == 429
    with pytest.raises(PeerCallError) as limited:  # session 7: over the policy's rate limit
        lookup_realtime(ctx, "media", "contacts", held, min_anonymity=100)
    assert limited.value.status == 429
    assert "partners.oem.rate_limit" in limited.value.reason
    # a pinned peer without a partner rule, and a certificate the media node never pinned
    with pytest.raises(PeerCallError) as no_rule:
        table_info(other.context(), "media", "contacts")
    assert no_rule.value.status == 403 and "rule partners.other" in no_rule.value.reason
    with pytest.raises(PeerCallError) as unknown:
        table_info(stranger.context(), "media", "contacts")
    assert unknown.value.status in (403, None)  # refused at TLS or with 403 not_pinned
    # every session is in the owner's ledger, digests only
    with media.operator_client() as c:
        ended = c.get_json("/v1/ledger/entries", params={
            "peer": "oem", "event_type": "session_ended", "limit": "100"})["entries"]
    outcomes = [json.loads(e["body"])["outcome"] for e in ended]
    assert outcomes.count("ok") == 3 and outcomes.count("failed") >= 2


def _inventory_csv(path: Path, units: dict[tuple[str, str], int]) -> Path:
    pd.DataFrame([{"store_id": s, "series": r, "units": u} for (s, r), u in units.items()]
                 ).to_csv(path, index=False)
    return path


def _upload(node: RunningNode, path: Path) -> None:
    with node.operator_client() as c:
        c.upload("/v1/datasets/inventory/versions", path.read_bytes(),
                 params={"format": "csv", "filename": path.name})


def test_incremental_update_delta_download_and_unheld_identifiers(
        node_factory: Factory, tmp_path: Path) -> None:
    dealer = node_factory("dealer", "dealer")
    oem = node_factory("oem", "oem")
    pin_each_other(dealer, oem)
    dealer.start()
    stock = {(f"S{s:03d}", r): (s * 7 + i) % 5 for s in range(40) for i, r in enumerate(SERIES)}
    _upload(dealer, _inventory_csv(tmp_path / "inv1.csv", stock))
    with dealer.operator_client() as c:
        v1 = c.post_json("/v1/anonq/tables/inventory/publish",
                         {"kind": "inventory", "min_bucket_size": 20})
    assert v1["version"] == 1 and v1["entries"] == 200
    ctx = oem.context()
    local1 = sync_table(ctx, "dealer", "inventory")
    assert local1.version == 1 and local1.entry_count == 200

    changed = dict(stock)
    changed[("S001", "AX3")] = 9
    changed[("S002", "EV6")] = 0 if stock[("S002", "EV6")] else 4
    del changed[("S039", "EV9")]
    changed[("S040", "AX5")] = 3
    _upload(dealer, _inventory_csv(tmp_path / "inv2.csv", changed))
    with dealer.operator_client() as c:
        v2 = c.post_json("/v1/anonq/tables/inventory/publish",
                         {"kind": "inventory", "min_bucket_size": 20})
        again = c.post_json("/v1/anonq/tables/inventory/publish",
                            {"kind": "inventory", "min_bucket_size": 20})
    assert v2["version"] == 2 and not v2["rebuilt"] and v2["table_id"] == v1["table_id"]
    assert (v2["upserted_users"], v2["removed_users"]) == (3, 1)
    assert (v2["delta_rows"], v2["delta_removed"]) == (3, 1)
    assert again["version"] == 2 and again["upserted_users"] == 0  # nothing changed

    local2 = sync_table(ctx, "dealer", "inventory")  # a delta onto the cached version 1
    owner_file = tables.table_dir(dealer.dir / "data", "inventory") / "v00000002.table"
    assert local2.to_bytes() == Table.from_bytes(owner_file.read_bytes()).to_bytes()
    # A streamed download is recorded when its stream closes, just after the client has
    # every byte: give the owner a moment.
    deadline = time.monotonic() + 10
    while True:
        with dealer.operator_client() as c:
            kinds = [e["body"] for e in c.get_json("/v1/ledger/entries", params={
                "event_type": "message_sent", "limit": "100"})["entries"]]
        if any('"round":"table_full"' in b for b in kinds) or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert any('"round":"table_delta"' in b for b in kinds)
    assert any('"round":"table_full"' in b for b in kinds)

    keys = ["S001|AX3", "S002|EV6", "S039|EV9", "S040|AX5", "S005|AX7"]
    got = lookup_batch(ctx, "dealer", "inventory", [tables.inventory_item(k) for k in keys],
                       local=local2)
    assert {keys[p]: decode_inventory_label(v) for p, v in got.items()} == {
        "S001|AX3": 2, "S002|EV6": 0 if stock[("S002", "EV6")] else 2, "S040|AX5": 2,
        "S005|AX7": {0: 0, 1: 1, 2: 1}.get(changed[("S005", "AX7")], 2)}
    # Holding the whole table opens nothing without the owner's OPRF: tags derived from
    # the hash to curve, or from an OPRF under another key, match no entry.
    items = [tables.inventory_item(k) for k in keys]
    for outputs in (oprf.hash_to_curve(items), oprf.oprf_direct(oprf.new_oprf_key(), items)):
        pairs = oprf.TagDeriver(local2.table_id).derive_many(outputs)
        assert local2.open(pairs) == [None] * len(items)
    # while the querier's own identifiers open through the owner's evaluation
    real = lookup_realtime(ctx, "dealer", "inventory", items[:1], min_anonymity=20)
    assert list(real) == [0]
    assert os.path.exists(ctx.data_dir / "anonq" / "remote" / "dealer" / "inventory.table")
