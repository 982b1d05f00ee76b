"""``store_recommendation`` through the query lifecycle, between real node processes.

OEM, media platform and dealer nodes run with the *default* policies of
``parties/policies`` and small synthetic data (``cleanroom.synth``, 400 leads) ingested
through the operator API; the media node publishes its nearest-stores table (from its
datasets and the OEM's public store list), the dealer its inventory table. The OEM
submits a ``store_recommendation`` query; every labeled-PSI message moves through the
lifecycle's session channel.

Checked: every matched lead's five nearest home and work stores equal the generator's
ground truth; the whole result table equals the party-local pipeline run in the clear on
the same data (:func:`parties.recommend_eval.evaluate_synthetic`, default rule);
agreement with ``ground_truth/store_choice`` is reported; unmatched leads fall back to
their own city; real-time equals batch; the owners' ledgers hold digests, sizes and
counts only; denials by the media or dealer policy reach the OEM with rule and field.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from conftest import ROOT, RunningNode, make_node, pin_each_other
from test_queries_support import ledger_entries, result, show, submit, wait_state, write_policy

from cleanroom.ledger import scan_entries
from cleanroom.synth import SynthConfig, generate
from parties.oem import RESULT_COLUMNS
from parties.recommend_eval import check_nearest, evaluate_synthetic, store_choice_agreement
from parties.schemas import get_schema, load_table, table_file

LEADS = 400
SEED = 5
POLICIES = ROOT / "parties" / "policies"
UPLOADS = {
    "oem": ("oem/leads", "oem/stores"),
    "media": ("media/users", "media/locations"),
    "dealer": ("dealer/inventory",),
}
LIFECYCLE_ROUNDS = {"table_request", "eval_request", "bucket_request"}


def _upload(node: RunningNode, table: str, path: Path) -> None:
    name = table.split("/", 1)[1]
    id_columns = ",".join(f"{c}:{k}" for c, k in get_schema(table).id_columns.items())
    with node.operator_client(timeout=120.0) as client:
        client.upload(f"/v1/datasets/{name}/versions", path.read_bytes(),
                      params={"id_columns": id_columns, "format": path.suffix.lstrip("."),
                              "filename": path.name})


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    base = tmp_path_factory.mktemp("store_rec")
    data = base / "data"
    generate(data, SynthConfig(leads=LEADS, seed=SEED))
    nodes = {p: make_node(base / "nodes", p, p) for p in ("oem", "media", "dealer")}
    pin_each_other(*nodes.values())
    try:
        for node in nodes.values():
            node.start(env={"CLEANROOM_WITNESS_INTERVAL_SECONDS": "0"})
        for party, names in UPLOADS.items():
            for t in names:
                _upload(nodes[party], t, table_file(data, t))
        with nodes["media"].operator_client(timeout=300.0) as c:
            c.post_json("/v1/anonq/tables/nearest_stores/publish",
                        {"kind": "nearest_stores", "stores_peer": "oem"})
        with nodes["dealer"].operator_client(timeout=300.0) as c:
            c.post_json("/v1/anonq/tables/inventory/publish",
                        {"kind": "inventory", "min_bucket_size": 1})
        yield {"nodes": nodes, "data": data}
    finally:
        for node in nodes.values():
            node.stop()


def rec_spec(**options: Any) -> dict[str, Any]:
    return {
        "version": 1,
        "type": "store_recommendation",
        "requester": "oem",
        "counterparties": ["media", "dealer"],
        "purpose": "store_recommendation",
        "receiver": "oem",
        "inputs": {
            "oem": [
                {"dataset": "leads", "columns": {
                    "lead_id": "row_id", "phone": "join_key", "email": "join_key",
                    "device_id": "join_key", "city": "group_by",
                    "intended_series": "group_by"}},
                {"dataset": "stores", "columns": {
                    "store_id": "public", "city": "public", "lat": "public", "lon": "public"}},
            ],
            "media": [
                {"dataset": "users", "columns": {
                    "user_id": "row_id", "phone": "join_key", "email": "join_key",
                    "device_id": "join_key", "device_id_2": "join_key"}},
                {"dataset": "locations", "columns": {
                    "user_id": "row_id", "home_lat": "location", "home_lon": "location",
                    "work_lat": "location", "work_lon": "location"}},
            ],
            "dealer": [
                {"dataset": "inventory", "columns": {
                    "store_id": "row_id", "series": "group_by", "units": "inventory"}},
            ],
        },
        "params": {"options": options},
    }


@contextmanager
def policy_edit(node: RunningNode, old: str, new: str) -> Iterator[None]:
    default = (POLICIES / f"{node.party}.toml").read_text(encoding="utf-8")
    assert old in default
    write_policy(node, default.replace(old, new))
    try:
        yield
    finally:
        write_policy(node, default)


def _run(world: dict[str, Any], spec: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    oem = world["nodes"]["oem"]
    q = wait_state(oem, submit(oem, spec)["id"], timeout=180.0)
    assert q["state"] == "completed", q["error"]
    return q, result(oem, q["id"])["result"]


@pytest.fixture(scope="module")
def batch(world: dict[str, Any]) -> dict[str, Any]:
    q, res = _run(world, rec_spec())
    path = world["nodes"]["oem"].dir / "data" / res["file"]["name"]
    return {"query": q, "result": res, "table": pd.read_parquet(path), "path": path}


def test_result_table_is_stored_and_inline(batch: dict[str, Any]) -> None:
    res, table = batch["result"], batch["table"]
    assert res["type"] == "store_recommendation" and res["rows_inline"]
    assert res["columns"] == list(RESULT_COLUMNS)
    assert list(table.columns) == list(RESULT_COLUMNS) and len(table) == LEADS
    assert batch["query"]["result"]["rows"] == LEADS
    from cleanroom.ledger import digest

    assert res["file"]["digest"] == digest(batch["path"].read_bytes())
    at = {c: i for i, c in enumerate(res["columns"])}
    assert [r[at["lead_id"]] for r in res["rows"]] == table["lead_id"].tolist()
    assert [r[at["recommended_store"]] for r in res["rows"]] == [
        None if pd.isna(v) else v for v in table["recommended_store"].tolist()]
    summary = res["summary"]
    assert summary["matched_leads"] == int(table["matched"].sum()) > 50
    assert sum(summary["by_reason"].values()) == LEADS


def test_matched_leads_get_the_true_five_nearest_stores(world: dict[str, Any],
                                                        batch: dict[str, Any]) -> None:
    truth = load_table(world["data"], "ground_truth/nearest_stores")
    ident = load_table(world["data"], "ground_truth/identity_map")
    check = check_nearest(batch["table"], truth, ident)
    assert check.matched_leads > 50 and check.checked > 0.9 * check.matched_leads
    assert check.all_equal, check.as_dict()


def test_equals_the_pipeline_in_the_clear_and_reports_agreement(
        world: dict[str, Any], batch: dict[str, Any]) -> None:
    reference = evaluate_synthetic(world["data"], tune=False).table
    got = batch["table"]
    cols = ["lead_id", "matched", "recommended_store", "reason", "inventory", "home_top5",
            "work_top5", "fallback_top5"]
    pd.testing.assert_frame_equal(got[cols].reset_index(drop=True),
                                  reference[cols].reset_index(drop=True), check_dtype=False)
    choice = load_table(world["data"], "ground_truth/store_choice")
    agreement = store_choice_agreement(got, choice)
    print("store_choice agreement:", json.dumps(agreement.as_dict()))
    assert agreement.converting_leads > 0 and agreement.matched > 0
    # the generator's buyers pick the nearest stocking candidate 85% of the time
    assert agreement.rate_matched > 0.6


def test_unmatched_leads_fall_back_to_their_city(world: dict[str, Any],
                                                batch: dict[str, Any]) -> None:
    table = batch["table"]
    leads = load_table(world["data"], "oem/leads").set_index("lead_id")
    stores = load_table(world["data"], "oem/stores").set_index("store_id")
    unmatched = table[~table["matched"]]
    with_stores = set(stores["city"])
    assert len(unmatched) > 20
    fallback = 0
    for row in unmatched.itertuples():
        assert row.home_top5 == "" and row.work_top5 == ""
        city = leads.loc[row.lead_id, "city"]
        if city not in with_stores:  # no store and no known centre: no recommendation
            assert row.reason == "none" and pd.isna(row.recommended_store)
            continue
        fallback += 1
        assert row.reason == "fallback"
        listed = row.fallback_top5.split(",")
        assert row.recommended_store in listed
        assert all(stores.loc[s, "city"] == city for s in listed)
    assert fallback > 20


def test_realtime_equals_batch(world: dict[str, Any], batch: dict[str, Any]) -> None:
    _, res = _run(world, rec_spec(mode="realtime", format="csv", inline_rows=0))
    assert res["rows_inline"] is False and res["rows"] is None
    assert res["file"]["name"].endswith(".csv")
    path = world["nodes"]["oem"].dir / "data" / res["file"]["name"]
    rt = pd.read_csv(path, dtype=str, keep_default_na=False)
    ref = batch["table"]
    for col in ("lead_id", "recommended_store", "reason", "home_top5", "work_top5"):
        assert rt[col].tolist() == ["" if pd.isna(v) else str(v) for v in ref[col]], col
    assert res["summary"]["sessions"]["media"]["smallest_bucket"] >= 1000


def test_owner_ledgers_hold_only_digests_sizes_and_counts(world: dict[str, Any],
                                                          batch: dict[str, Any]) -> None:
    qid = batch["query"]["id"]
    leads = load_table(world["data"], "oem/leads")
    raw = {str(v).strip() for c in ("phone", "email", "device_id") for v in leads[c].dropna()}
    ident = load_table(world["data"], "ground_truth/identity_map")
    raw |= {str(v) for c in ("phone", "email", "device_id")
            for v in ident.loc[ident["party"] == "oem", c].dropna()}
    raw = {v for v in raw if len(v) >= 6}  # skip junk cells such as "-"
    assert len(raw) > LEADS
    for party in ("media", "dealer"):
        node = world["nodes"][party]
        assert wait_state(node, qid)["state"] == "completed"
        entries = ledger_entries(node, qid)
        messages = [e for e in entries if e["type"].startswith("message_")]
        assert messages, party
        for e in messages:
            assert set(e) <= {"type", "query_id", "session_id", "protocol", "peer", "round",
                              "digest", "size", "ts", "seq", "v"}, e
            assert e["protocol"] == "labeled_psi" and e["round"] in LIFECYCLE_ROUNDS
            assert str(e["digest"]).startswith("sha256:") and isinstance(e["size"], int)
        started = [e for e in entries if e["type"] == "session_started"]
        assert {e["role"] for e in started} == {"responder"}
        bodies = [json.dumps(e).encode() for e in entries]
        assert not scan_entries(bodies)
        text = "\n".join(b.decode() for b in bodies)
        assert not [v for v in raw if v in text]
    # media sessions: one download (delta or table) and one evaluation session
    media_rounds = sorted(e["round"] for e in ledger_entries(world["nodes"]["media"], qid)
                          if e["type"] == "message_received")
    assert media_rounds == ["eval_request", "table_request"]


def test_cli_result_out_file(world: dict[str, Any], batch: dict[str, Any],
                             tmp_path: Path) -> None:
    oem = world["nodes"]["oem"]
    target = tmp_path / "rec.json"
    out = subprocess.run(
        [sys.executable, "-m", "cleanroom.cli", "query", "result", "--dir", str(oem.dir),
         batch["query"]["id"], "--out", str(target)],
        capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    body = json.loads(target.read_text())["result"]
    assert body["file"] == batch["result"]["file"] and len(body["rows"]) == LEADS


@pytest.mark.parametrize(("party", "old", "new", "rule", "field"), [
    ("dealer", 'units = ["inventory"]', 'units = ["group_by"]',
     "datasets.inventory.columns.units", "inputs.dealer.0.columns.units"),
    ("media", 'purposes = ["lead_grading", "store_recommendation", "campaign_measurement"]',
     'purposes = ["lead_grading", "campaign_measurement"]',
     "partners.oem.purposes", "purpose"),
])
def test_owner_policy_denial_reaches_the_oem(world: dict[str, Any], party: str, old: str,
                                             new: str, rule: str, field: str) -> None:
    oem = world["nodes"]["oem"]
    with policy_edit(world["nodes"][party], old, new):
        q = wait_state(oem, submit(oem, rec_spec())["id"], timeout=60.0)
    assert q["state"] == "denied", q
    decision = next(d for d in q["decisions"] if d["party"] == party)
    assert (decision["outcome"], decision["rule"], decision["field"]) == ("denied", rule, field)
    assert q["result"] is None
    shown = show(oem, q["id"])
    assert shown["error"]["rule"] and rule in shown["error"]["rule"]


def test_spec_refusals_name_rule_and_field(world: dict[str, Any]) -> None:
    oem = world["nodes"]["oem"]
    spec = rec_spec()
    spec["inputs"]["media"][1]["columns"].pop("work_lon")
    q = wait_state(oem, submit(oem, spec)["id"], timeout=60.0)
    assert q["state"] == "denied"
    assert q["error"]["rule"].endswith("spec.store_recommendation.location_columns")
    assert q["error"]["field"] == "inputs.media.1.columns.work_lon"
    q2 = wait_state(oem, submit(oem, rec_spec(mode="fast"))["id"], timeout=60.0)
    assert (q2["state"], q2["error"]["field"]) == ("denied", "params.options.mode")


def test_small_intersection_fails_naming_the_rule(world: dict[str, Any]) -> None:
    oem = world["nodes"]["oem"]
    with policy_edit(world["nodes"]["media"], "min_intersection_size = 50",
                     "min_intersection_size = 100000"):
        q = wait_state(oem, submit(oem, rec_spec())["id"], timeout=120.0)
    assert (q["state"], q["error"]["code"]) == ("failed", "min_intersection_size")
    assert q["error"]["rule"] == "media:limits.min_intersection_size"
    assert q["result"] is None


def test_stale_table_is_refused_until_published_again(world: dict[str, Any]) -> None:
    oem, media = world["nodes"]["oem"], world["nodes"]["media"]
    _upload(media, "media/locations", table_file(world["data"], "media/locations"))
    q = wait_state(oem, submit(oem, rec_spec())["id"], timeout=120.0)
    assert q["state"] == "failed" and q["error"]["code"] == "peer_error", q
    at_media = wait_state(media, q["id"])
    assert (at_media["state"], at_media["error"]["code"]) == ("failed", "stale_table")
    assert at_media["error"]["field"] == "inputs.media.1.dataset"
    assert "publish" in q["error"]["message"]
    with media.operator_client(timeout=300.0) as c:
        report = c.post_json("/v1/anonq/tables/nearest_stores/publish",
                             {"kind": "nearest_stores", "stores_peer": "oem"})
    assert report["users"] > 0  # same rows: the same table version, now from version 2
    _, res = _run(world, rec_spec())
    assert res["summary"]["sessions"]["media"]["version"] == report["version"]
