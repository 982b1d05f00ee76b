"""The main job end to end at a small size: data, three real node processes, ingest."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cleanroom.cli import main
from cleanroom.errors import InputError
from cleanroom.simulate import MARKER, reachable_overlaps, run_simulation
from parties.schemas import PARTY_TABLES


def test_simulation_runs_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "sim"
    result = run_simulation(out, leads=2000, seed=3)
    rows = result["data"]["rows"]
    assert set(result["ingest"]) == set(PARTY_TABLES)
    for table, report in result["ingest"].items():
        assert report["rows"] == rows[table], table
    # Every identifier column of a party table was normalised at its own node, and the
    # invalid values the generator planted were counted there, not crashed on.
    users = result["ingest"]["media/users"]["id_report"]
    assert {r["column"] for r in users} == {"phone", "email", "device_id", "device_id_2"}
    assert all(r["valid"] + r["missing"] + r["invalid"] == r["rows"] for r in users)
    # PSI matching finds (nearly) every lead that shares an identifier with the other
    # parties; one-to-one resolution over duplicate accounts costs at most a few.
    reachable = reachable_overlaps(out / "data")
    for name, outcome in result["match"].items():
        assert abs(outcome["rate"] - reachable[name]) <= 0.01, (name, outcome, reachable)
        assert outcome["rate"] <= reachable[name] + 1e-9
    # segment_stats ran between the OEM and media nodes; every released group is at least
    # the minimum group size, and no group exceeds the leads in its city that are media users.
    groups = result["segment_stats"]["result"]["result"]["groups"]
    assert groups and all(g["count"] >= 20 for g in groups)
    assert sum(g["count"] for g in groups) <= rows["oem/leads"]
    # The federated model trained across the three nodes beats the best single party's
    # model on the same data, and store recommendations use the true nearest stores.
    aucs = rows_auc(result)
    single = max(v for k, v in aucs.items() if k in ("oem", "media", "dealer"))
    assert result["lead_score"]["eval_auc"] > single
    # 600 evaluation leads: the AUC itself varies by about 0.02 between seeds
    assert abs(result["lead_score"]["eval_auc"] - aucs["joint"]) < 0.05
    assert result["lead_score"]["lift_vs_truth"]["strict"] > 2.0
    assert result["store_recommendation"]["nearest_all_equal"]
    assert result["store_recommendation"]["matched"] > 0
    # Every node's ledger verifies, with its peers' views consistent, and has a report.
    for party, audit in result["audit"].items():
        assert audit["ok"], (party, audit["summary"])
        html = Path(audit["report"]).read_text()
        assert "<svg" in html and "http://" not in html and "https://" not in html
    page = (out / "report.html").read_text()
    assert "Match funnel" in page and "<svg" in page and "<script" not in page
    assert "http://" not in page.replace("http://www.w3.org/2000/svg", "")
    saved = json.loads((out / "summary.json").read_text())
    assert saved["ingest"]["oem/leads"]["rows"] == 2000
    # No node keeps running after the simulation.
    for party in ("oem", "media", "dealer"):
        assert (out / "nodes" / party / "node.toml").exists()


def rows_auc(result: dict[str, object]) -> dict[str, float]:
    data = result["data"]
    assert isinstance(data, dict)
    return {k: float(v) for k, v in data["auc"].items() if v is not None}


def test_simulation_refuses_a_foreign_folder_and_replaces_its_own(tmp_path: Path) -> None:
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("someone's file")
    with pytest.raises(InputError, match="not empty"):
        run_simulation(foreign, leads=400, seed=1)
    assert (foreign / "keep.txt").exists()

    own = tmp_path / "own"
    own.mkdir()
    (own / MARKER).write_text("earlier run")
    (own / "stale.txt").write_text("old output")
    assert main(["simulate", "--out", str(own), "--leads", "50"]) != 0  # too few leads
    assert (own / "stale.txt").exists()  # a refused run changes nothing
