"""``train_lead_model`` through three real nodes on synthetic data (3,000 leads): the query
completes, each party stores only its own weight slice, the joint model scored on the
held-out leads is close to a centralised plaintext logistic regression on the joined data
and beats the OEM alone, a refused policy names its rule, and no ledger holds a raw
identifier."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from conftest import RunningNode, make_node, pin_each_other
from test_queries_support import ledger_bodies, result, submit, upload, wait_state, write_policy

from cleanroom.synth import SynthConfig, generate
from cleanroom.synth.model import auc as rank_auc
from cleanroom.synth.model import fit_features, fit_logistic
from parties.catalog import SERIES
from protocols.vertical_lr import lift_by_decile

LEADS = 3000
OEM_COLUMNS = {"lead_id": ["row_id"], "phone": ["join_key"], "email": ["join_key"],
               "device_id": ["join_key"], "source_channel": ["model_feature"],
               "intended_series": ["model_feature"]}


def _policy(party: str, reveal: bool) -> str:
    partners = {"oem": ["media", "dealer"], "media": ["oem"], "dealer": ["oem"]}[party]
    out = ["version = 1", "[limits]", "min_intersection_size = 10", "min_group_size = 5"]
    for p in partners:
        to = json.dumps([p if party == "oem" else "oem"] if reveal else [])
        out += [f"[partners.{p}]", 'query_types = ["train_lead_model", "lead_score"]',
                'purposes = ["lead_grading"]', 'psi_reveal = ["intersection"]',
                f"reveal_rows_to = {to}"]
    out += {
        "oem": ['[datasets.leads.columns]', 'lead_id = ["row_id"]', 'phone = ["join_key"]',
                'email = ["join_key"]', 'device_id = ["join_key"]',
                'source_channel = ["model_feature"]', 'intended_series = ["model_feature"]',
                '[datasets.crm.columns]', 'lead_id = ["row_id"]', '"*" = ["model_feature"]',
                '[datasets.labels.columns]', 'lead_id = ["row_id"]', 'converted = ["label"]'],
        "media": ['[datasets.users.columns]', 'user_id = ["row_id"]', 'phone = ["join_key"]',
                  'email = ["join_key"]', 'device_id = ["join_key"]',
                  'device_id_2 = ["join_key"]', '[datasets.behaviour.columns]',
                  'user_id = ["row_id"]', '"*" = ["model_feature"]'],
        "dealer": ['[datasets.activity.columns]', 'phone = ["join_key"]',
                   '"*" = ["model_feature"]'],
    }[party]
    return "\n".join(out) + "\n"


def train_spec(**options: Any) -> dict[str, Any]:
    beh = ["views_" + s.lower() for s in SERIES]
    return {
        "version": 1, "type": "train_lead_model", "requester": "oem",
        "counterparties": ["media", "dealer"], "purpose": "lead_grading", "receiver": "oem",
        "inputs": {
            "oem": [{"dataset": "leads", "columns": {"lead_id": "row_id", "phone": "join_key",
                                                     "email": "join_key",
                                                     "device_id": "join_key",
                                                     "source_channel": "model_feature",
                                                     "intended_series": "model_feature"}},
                    {"dataset": "crm", "columns": {"lead_id": "row_id",
                                                   "previous_owner": "model_feature",
                                                   "service_visits": "model_feature",
                                                   "prior_brand": "model_feature",
                                                   "household_cars": "model_feature"}},
                    {"dataset": "labels", "columns": {"lead_id": "row_id",
                                                      "converted": "label"}}],
            "media": [{"dataset": "users", "columns": {"user_id": "row_id", "phone": "join_key",
                                                       "email": "join_key",
                                                       "device_id": "join_key",
                                                       "device_id_2": "join_key"}},
                      {"dataset": "behaviour", "columns": {
                          "user_id": "row_id", **dict.fromkeys(beh, "model_feature"),
                          **dict.fromkeys(("comparisons", "price_checks", "forum_posts",
                                           "testdrive_form_opens", "days_since_active"),
                                          "model_feature")}}],
            "dealer": [{"dataset": "activity", "columns": {
                "phone": "join_key", "visits": "model_feature", "test_drives": "model_feature",
                "prior_orders": "model_feature", "last_visit_at": "model_feature"}}],
        },
        "params": {"psi_reveal": "intersection", "reveal_counterparty_rows": True,
                   "options": options},
    }


@pytest.fixture(scope="module")
def lm_nodes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[dict[str, RunningNode],
                                                                         Path]]:
    base = tmp_path_factory.mktemp("lead_model")
    data = base / "synth"
    generate(data, SynthConfig(leads=LEADS, seed=23))
    nodes = {p: make_node(base, p, p) for p in ("oem", "media", "dealer")}
    pin_each_other(*nodes.values())
    for p, node in nodes.items():
        write_policy(node, _policy(p, reveal=True))
        node.start(env={"CLEANROOM_WITNESS_INTERVAL_SECONDS": "0"})
    uploads = {"oem": [("leads", "oem/leads", "phone,email,device_id"), ("crm", "oem/crm", ""),
                       ("labels", "oem/labels", "")],
               "media": [("users", "media/users", "phone,email,device_id,device_id_2"),
                         ("behaviour", "media/behaviour", "")],
               "dealer": [("activity", "dealer/activity", "phone")]}
    for p, items in uploads.items():
        for name, table, ids in items:
            upload(nodes[p], name, data / f"{table}.parquet", ids)
    try:
        yield nodes, data
    finally:
        for node in nodes.values():
            node.stop()


def _slice(node: RunningNode, qid: str) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads((node.dir / "data" / "models" / f"{qid}.json").read_text())
    return doc


def _score(doc: dict[str, Any], x: np.ndarray) -> np.ndarray:
    z = np.clip((x - np.asarray(doc["mean"])) / np.asarray(doc["scale"]), -8, 8)
    if doc["intercept"]:
        z = np.column_stack([np.ones(len(z)), z])
    return np.asarray(z @ np.asarray(doc["weights"]))


def test_train_lead_model_quality(lm_nodes: tuple[dict[str, RunningNode], Path]) -> None:
    nodes, data = lm_nodes
    qid = submit(nodes["oem"], train_spec())["id"]
    q = wait_state(nodes["oem"], qid, timeout=240)
    assert q["state"] == "completed", q
    res = result(nodes["oem"], qid)["result"]
    assert res["rows"]["train"] > 1000 and res["matched"]["media"] > 100
    assert len(res["lift_by_decile"]) == 10
    for p in ("media", "dealer"):
        assert wait_state(nodes[p], qid)["state"] == "completed"
    slices = {p: _slice(nodes[p], qid) for p in nodes}
    assert slices["oem"]["columns"] == list(fit_features("oem"))
    assert slices["media"]["columns"] == list(fit_features("media"))
    assert "weights" in slices["dealer"] and "platt" not in slices["dealer"]
    # score the held-out leads (ground-truth eval split) with the three slices
    gt = pd.read_parquet(data / "ground_truth/lead_features.parquet")
    train, ev = gt[gt.split == "train"], gt[gt.split == "eval"]
    s: np.ndarray = np.sum([_score(slices[p], ev[list(fit_features(p))].to_numpy(float))
            for p in ("oem", "media", "dealer")], axis=0)
    y = ev.converted.to_numpy(bool)
    fed = rank_auc(y, s)
    joint = list(fit_features("joint"))
    w = fit_logistic(train[joint].to_numpy(float), train.converted.to_numpy(bool))
    central = rank_auc(y, np.column_stack([np.ones(len(ev)), ev[joint].to_numpy(float)]) @ w)
    own = list(fit_features("oem"))
    wo = fit_logistic(train[own].to_numpy(float), train.converted.to_numpy(bool))
    oem_only = rank_auc(y, np.column_stack([np.ones(len(ev)), ev[own].to_numpy(float)]) @ wo)
    assert abs(fed - central) < 0.03, (fed, central)
    assert fed > oem_only + 0.03, (fed, oem_only)
    lift = lift_by_decile(y.astype(float), s)
    print(f"federated {fed:.4f} central {central:.4f} oem-only {oem_only:.4f} "
          f"top-decile lift {lift[0]['lift']:.2f} validation_auc {res['validation_auc']:.4f}")
    assert lift[0]["lift"] > 2.0, lift
    # no raw identifier in any node's ledger
    leads = pd.read_parquet(data / "oem/leads.parquet")
    needles = [v.encode() for v in leads.email.dropna().head(200)]
    for node in nodes.values():
        blob = b"\n".join(ledger_bodies(node))
        assert not any(n in blob for n in needles)


def test_refused_without_reveal_rows(lm_nodes: tuple[dict[str, RunningNode], Path]) -> None:
    nodes, _ = lm_nodes
    write_policy(nodes["media"], _policy("media", reveal=False))
    try:
        qid = submit(nodes["oem"], train_spec())["id"]
        q = wait_state(nodes["oem"], qid)
    finally:
        write_policy(nodes["media"], _policy("media", reveal=True))
    assert q["state"] == "denied", q
    assert "reveal_rows_to" in json.dumps(q)
