"""segment_stats through real nodes: counts and sums equal a plaintext join on the same
synthetic data (within the suppression rule), the minimum intersection size fails the query
naming the rule, noise, three parties, dry runs (API and CLI)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from conftest import ROOT
from test_queries_support import (
    BASE_POLICIES,
    QueryNodes,
    ledger_entries,
    policy_override,
    query_nodes,
    result,
    show,
    stats_spec,
    submit,
    wait_state,
)

from cleanroom.identity import normalize_series

__all__ = ["query_nodes"]

KINDS = {"phone": "phone", "email": "email", "device_id": "device_id"}


def _normalised(frame: pd.DataFrame, column: str) -> pd.Series:
    values, _ = normalize_series(KINDS[column], frame[column], column)  # type: ignore[arg-type]
    return values


def plaintext_matched(data: Path, counterparties: tuple[str, ...] = ("media",)) -> pd.DataFrame:
    """Leads with a normalised phone, email or device id that every counterparty holds."""
    leads = pd.read_parquet(data / "oem/leads.parquet")
    cp_columns = {"media": ("users", ("phone", "email", "device_id")),
                  "dealer": ("activity", ("phone",))}
    keep = pd.Series(True, index=leads.index)
    for cp in counterparties:
        table, cols = cp_columns[cp]
        theirs = pd.read_parquet(data / f"{cp}/{table}.parquet")
        hit = pd.Series(False, index=leads.index)
        for c in cols:
            known = set(_normalised(theirs, c).dropna())
            hit |= _normalised(leads, c).isin(known).fillna(False).astype(bool)
        keep &= hit
    return leads[keep]


def _groups(res: dict[str, Any]) -> dict[tuple[str, ...], dict[str, Any]]:
    dims = res["dimensions"]
    return {tuple(g["key"][d] for d in dims): g for g in res["groups"]}


def test_counts_and_sums_equal_a_plaintext_join(query_nodes: QueryNodes) -> None:
    oem = query_nodes["oem"]
    spec = stats_spec(group_by=("city", "intended_series"), aggregates=("service_visits",))
    q = wait_state(oem, submit(oem, spec)["id"])
    assert q["state"] == "completed", q
    res = result(oem, q["id"])["result"]
    matched = plaintext_matched(query_nodes.data)
    crm = pd.read_parquet(query_nodes.data / "oem/crm.parquet")
    joined = matched.merge(crm[["lead_id", "service_visits"]], on="lead_id", how="left")
    truth = joined.groupby(["city", "intended_series"]).agg(
        count=("lead_id", "size"), visits=("service_visits", "sum"))
    assert res["matched_rows"] == len(matched)
    shown = _groups(res)
    big = truth[truth["count"] >= 5]
    assert set(shown) == {tuple(k) for k in big.index}
    for key, row in big.iterrows():
        g = shown[tuple(key)]
        assert g["count"] == row["count"]
        assert g["sums"]["service_visits"] == pytest.approx(float(row["visits"]))
    assert res["suppressed_groups"] == int((truth["count"] < 5).sum())
    assert res["min_group_size"] == 5


def test_three_parties_and_the_largest_minimum_group_size(query_nodes: QueryNodes) -> None:
    oem = query_nodes["oem"]
    spec = stats_spec(counterparties=("media", "dealer"), group_by=("city",),
                      params={"min_group_size": 7})
    q = wait_state(oem, submit(oem, spec)["id"])
    assert q["state"] == "completed", q
    res = result(oem, q["id"])["result"]
    truth = plaintext_matched(query_nodes.data, ("media", "dealer")).groupby("city").size()
    assert {k[0]: g["count"] for k, g in _groups(res).items()} == {
        k: int(v) for k, v in truth.items() if v >= 7}
    assert res["min_group_rule"] == "spec:params.min_group_size"
    for cp in ("media", "dealer"):
        assert wait_state(query_nodes[cp], q["id"])["state"] == "completed"
        kinds = [e["type"] for e in ledger_entries(query_nodes[cp], q["id"])]
        assert "session_started" in kinds and "message_received" in kinds


def test_small_intersection_fails_naming_the_rule(query_nodes: QueryNodes) -> None:
    oem, media = query_nodes["oem"], query_nodes["media"]
    policy = BASE_POLICIES["media"].replace("min_intersection_size = 10",
                                            "min_intersection_size = 100000")
    with policy_override(media, policy):
        q = wait_state(oem, submit(oem, stats_spec())["id"])
    assert (q["state"], q["error"]["code"]) == ("failed", "min_intersection_size")
    assert q["error"]["rule"] == "media:limits.min_intersection_size"
    assert q["result"] is None
    denial = [e for e in ledger_entries(oem, q["id"]) if e["type"] == "policy_decision"
              and e["decision"] == "denied"]
    assert denial and denial[0]["rule_id"] == "media:limits.min_intersection_size"
    assert wait_state(media, q["id"])["state"] == "failed"


def test_noise_is_applied_and_bounded(query_nodes: QueryNodes) -> None:
    oem = query_nodes["oem"]
    spec = stats_spec(group_by=("city",), aggregates=("service_visits",),
                      params={"noise": {"mechanism": "gaussian", "epsilon": 2.0,
                                        "delta": 1e-6},
                              "options": {"clip": {"service_visits": [0, 5]}}})
    q = wait_state(oem, submit(oem, spec)["id"])
    assert q["state"] == "completed", q
    res = result(oem, q["id"])
    body = res["result"]
    assert res["epsilon"] == 2.0 and "matched_rows" not in body
    truth = plaintext_matched(query_nodes.data).groupby("city").size()
    diffs = [g["count"] - int(truth[k[0]]) for k, g in _groups(body).items()]
    # sigma = sqrt(2 ln(1.25e6)) * 1 / (2.0 / 2) ~ 5.3: 40 sigma is never reached
    assert all(abs(d) < 200 for d in diffs)
    # a noisy sum without clipping bounds is refused by the type's rule
    bad = stats_spec(aggregates=("service_visits",),
                     params={"noise": {"mechanism": "laplace", "epsilon": 1.0}})
    q2 = wait_state(oem, submit(oem, bad)["id"])
    assert (q2["state"], q2["error"]["field"]) == ("denied",
                                                  "params.options.clip.service_visits")


def test_dry_run_reports_every_party_without_recording(query_nodes: QueryNodes,
                                                       tmp_path: Path) -> None:
    oem, media = query_nodes["oem"], query_nodes["media"]
    before = [e for e in ledger_entries(media) if "query_id" in e]
    ok = submit(oem, stats_spec(), dry_run=True)
    assert ok["would_pass"] and [d["party"] for d in ok["decisions"]] == ["oem", "media"]
    policy = BASE_POLICIES["media"].replace('purposes = ["campaign_measurement"]',
                                            'purposes = ["lead_grading"]')
    with policy_override(media, policy):
        spec_file = tmp_path / "spec.json"
        spec_file.write_text(json.dumps(stats_spec()), encoding="utf-8")
        cli = subprocess.run(
            [sys.executable, "-m", "cleanroom.cli", "query", "submit", "--dir", str(oem.dir),
             "--spec", str(spec_file), "--dry-run"],
            capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert cli.returncode == 1, cli.stderr
    assert "would NOT pass" in cli.stdout
    assert "media: denied: rule partners.oem.purposes, field purpose" in cli.stdout
    # nothing about a query is recorded for a dry run (earlier queries may still add
    # their late entries, e.g. a completion reported through the outbox)
    known = {e["query_id"] for e in before}
    assert [e for e in ledger_entries(media) if e.get("query_id", "") not in known | {""}] == []


def test_cli_submit_wait_show_and_result(query_nodes: QueryNodes, tmp_path: Path) -> None:
    oem = query_nodes["oem"]
    spec_file = tmp_path / "spec.json"
    spec_file.write_text(json.dumps(stats_spec()), encoding="utf-8")

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "cleanroom.cli", "query", *args],
                              capture_output=True, text=True, timeout=120, cwd=ROOT)

    out = cli("submit", "--dir", str(oem.dir), "--spec", str(spec_file), "--wait", "--json")
    assert out.returncode == 0, out.stderr
    q = json.loads(out.stdout)
    assert q["state"] == "completed"
    listed = cli("list", "--dir", str(oem.dir), "--state", "completed")
    assert q["id"] in listed.stdout
    shown = cli("show", "--dir", str(oem.dir), q["id"])
    assert "decision of media: approved" in shown.stdout
    target = tmp_path / "result.json"
    got = cli("result", "--dir", str(oem.dir), q["id"], "--out", str(target))
    assert got.returncode == 0, got.stderr
    assert json.loads(target.read_text())["digest"] == show(oem, q["id"])["result"]["digest"]
    bad = tmp_path / "bad.json"
    bad.write_text('{"version": 1, "type": "segment_stats"}', encoding="utf-8")
    err = cli("submit", "--dir", str(oem.dir), "--spec", str(bad))
    assert err.returncode != 0 and "field 'requester'" in err.stderr
