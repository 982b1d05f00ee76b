"""Shared fixture and helpers for the query lifecycle tests (no tests in this module).

``query_nodes`` (session): three real node processes (oem, media, dealer) with permissive
test policies and small synthetic datasets (``cleanroom.synth``, 300 leads) ingested
through the operator API. Tests that change a policy use :func:`policy_override`, which
restores the base policy afterwards.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import RunningNode, make_node, pin_each_other
from sqlalchemy import create_engine

from cleanroom.ledger import LedgerStore, decode_entry
from cleanroom.synth import SynthConfig, generate
from cleanroom.transport import PeerCallError

LEADS = 300
SEED = 11
TERMINAL = {"completed", "denied", "failed", "cancelled", "timed_out"}

BASE_POLICIES: dict[str, str] = {
    "oem": """
version = 1
[limits]
min_intersection_size = 10
min_group_size = 5
[partners.media]
query_types = ["match", "segment_stats"]
purposes = ["campaign_measurement"]
psi_reveal = ["intersection", "cardinality"]
rate_limit = { max_queries = 100000, per_hours = 24 }
dp_budget = { epsilon = 100000.0, period_days = 30 }
[partners.dealer]
query_types = ["match", "segment_stats"]
purposes = ["campaign_measurement"]
psi_reveal = ["intersection", "cardinality"]
dp_budget = { epsilon = 100000.0, period_days = 30 }
[datasets.leads.columns]
phone = ["join_key"]
email = ["join_key"]
device_id = ["join_key"]
lead_id = ["row_id"]
city = ["group_by"]
source_channel = ["group_by"]
intended_series = ["group_by"]
[datasets.tiny_leads.columns]
phone = ["join_key"]
email = ["join_key"]
device_id = ["join_key"]
city = ["group_by"]
[datasets.crm.columns]
lead_id = ["row_id"]
service_visits = ["aggregate"]
household_cars = ["aggregate"]
prior_brand = ["group_by"]
""",
    "media": """
version = 1
[limits]
min_intersection_size = 10
min_group_size = 5
[partners.oem]
query_types = ["match", "segment_stats"]
purposes = ["campaign_measurement"]
psi_reveal = ["intersection", "cardinality"]
dp_budget = { epsilon = 100000.0, period_days = 30 }
[datasets.users.columns]
user_id = ["row_id"]
phone = ["join_key"]
email = ["join_key"]
device_id = ["join_key"]
device_id_2 = ["join_key"]
[datasets.tiny_users.columns]
phone = ["join_key"]
email = ["join_key"]
device_id = ["join_key"]
[datasets.behaviour.columns]
user_id = ["row_id"]
"views_*" = ["model_feature"]
price_checks = ["model_feature", "aggregate"]
""",
    "dealer": """
version = 1
[limits]
min_intersection_size = 10
min_group_size = 5
[partners.oem]
query_types = ["match", "segment_stats"]
purposes = ["campaign_measurement"]
psi_reveal = ["intersection", "cardinality"]
dp_budget = { epsilon = 100000.0, period_days = 30 }
[datasets.activity.columns]
phone = ["join_key"]
""",
}

UPLOADS = {
    "oem": [("leads", "oem/leads", "phone,email,device_id"), ("crm", "oem/crm", "")],
    "media": [("users", "media/users", "phone,email,device_id,device_id_2"),
              ("behaviour", "media/behaviour", "")],
    "dealer": [("activity", "dealer/activity", "phone")],
}


@dataclass
class QueryNodes:
    nodes: dict[str, RunningNode]
    data: Path

    def __getitem__(self, name: str) -> RunningNode:
        return self.nodes[name]


def write_policy(node: RunningNode, text: str) -> None:
    path = node.dir / "policy.toml"
    tmp = path.with_name("policy.toml.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


@contextmanager
def policy_override(node: RunningNode, text: str) -> Iterator[None]:
    write_policy(node, text)
    try:
        yield
    finally:
        write_policy(node, BASE_POLICIES[node.party])


def upload(node: RunningNode, name: str, path: Path, id_columns: str) -> dict[str, Any]:
    with node.operator_client() as c:
        out: dict[str, Any] = c.upload(
            f"/v1/datasets/{name}/versions", path.read_bytes(),
            params={"id_columns": id_columns, "format": "parquet"},
        )
    return out


def start_query_nodes(base: Path) -> QueryNodes:
    data = base / "synth"
    generate(data, SynthConfig(leads=LEADS, seed=SEED))
    nodes = {party: make_node(base, party, party) for party in ("oem", "media", "dealer")}
    pin_each_other(*nodes.values())
    for party, node in nodes.items():
        write_policy(node, BASE_POLICIES[party])
    env = {"CLEANROOM_WITNESS_INTERVAL_SECONDS": "0"}
    for node in nodes.values():
        node.start(env=env)
    for party, node in nodes.items():
        for name, table, ids in UPLOADS[party]:
            upload(node, name, data / f"{table}.parquet", ids)
    tiny_leads, tiny_users = write_tiny(data)
    upload(nodes["oem"], "tiny_leads", tiny_leads, "phone,email,device_id")
    upload(nodes["media"], "tiny_users", tiny_users, "phone,email,device_id")
    return QueryNodes(nodes, data)


def write_tiny(data: Path, n_leads: int = 40) -> tuple[Path, Path]:
    """40 leads and the media accounts of the same persons plus 20 others (concurrency)."""
    import pandas as pd

    leads = pd.read_parquet(data / "oem/leads.parquet").head(n_leads)
    ids = pd.read_parquet(data / "ground_truth/identity_map.parquet")
    persons = set(ids[(ids.party == "oem") & ids.record_id.isin(leads.lead_id)].person_id)
    users = pd.read_parquet(data / "media/users.parquet")
    media_ids = ids[ids.party == "media"]
    same = set(media_ids[media_ids.person_id.isin(persons)].record_id)
    others = [u for u in users.user_id if u not in same][:20]
    tiny_users = users[users.user_id.isin(same | set(others))]
    a, b = data / "tiny_leads.parquet", data / "tiny_users.parquet"
    leads[["phone", "email", "device_id", "city"]].to_parquet(a, index=False)
    tiny_users[["phone", "email", "device_id"]].to_parquet(b, index=False)
    return a, b


_shared: list[QueryNodes] = []
_users = [0]


@pytest.fixture(scope="session")
def query_nodes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[QueryNodes]:
    """One set of nodes for the whole session, even though several test modules import
    this fixture (each import is its own fixture definition to pytest)."""
    if not _shared:
        _shared.append(start_query_nodes(tmp_path_factory.mktemp("query_nodes")))
    _users[0] += 1
    try:
        yield _shared[0]
    finally:
        _users[0] -= 1
        if _users[0] == 0:
            for node in _shared.pop().nodes.values():
                node.stop()


# --- specs and calls ----------------------------------------------------------------------


def stats_spec(
    *,
    counterparties: tuple[str, ...] = ("media",),
    group_by: tuple[str, ...] = ("city",),
    aggregates: tuple[str, ...] = (),
    params: dict[str, Any] | None = None,
    purpose: str = "campaign_measurement",
    cp_inputs: dict[str, list[dict[str, Any]]] | None = None,
    oem_join: tuple[str, ...] = ("phone", "email", "device_id"),
) -> dict[str, Any]:
    leads_cols: dict[str, str] = {c: "join_key" for c in oem_join}
    leads_cols.update({g: "group_by" for g in group_by if g != "prior_brand"})
    oem_inputs: list[dict[str, Any]] = [{"dataset": "leads", "columns": leads_cols}]
    if aggregates or "prior_brand" in group_by:
        leads_cols["lead_id"] = "row_id"
        crm_cols = {"lead_id": "row_id", **{a: "aggregate" for a in aggregates}}
        if "prior_brand" in group_by:
            crm_cols["prior_brand"] = "group_by"
        oem_inputs.append({"dataset": "crm", "columns": crm_cols})
    default_cp = {
        "media": [{"dataset": "users",
                   "columns": {"phone": "join_key", "email": "join_key",
                               "device_id": "join_key"}}],
        "dealer": [{"dataset": "activity", "columns": {"phone": "join_key"}}],
    }
    inputs: dict[str, Any] = {"oem": oem_inputs}
    for cp in counterparties:
        inputs[cp] = (cp_inputs or {}).get(cp, default_cp[cp])
    return {
        "version": 1,
        "type": "segment_stats",
        "requester": "oem",
        "counterparties": list(counterparties),
        "purpose": purpose,
        "receiver": "oem",
        "inputs": inputs,
        "params": {"psi_reveal": "intersection", **(params or {})},
    }


def submit(node: RunningNode, spec: dict[str, Any], *, dry_run: bool = False) -> dict[str, Any]:
    with node.operator_client() as c:
        path = "/v1/queries?dry_run=true" if dry_run else "/v1/queries"
        out: dict[str, Any] = c.post_json(path, spec)
    return out


def show(node: RunningNode, qid: str) -> dict[str, Any]:
    with node.operator_client() as c:
        out: dict[str, Any] = c.get_json(f"/v1/queries/{qid}")
    return out


def wait_state(node: RunningNode, qid: str, states: set[str] | None = None,
               timeout: float = 60.0) -> dict[str, Any]:
    want = states or TERMINAL
    deadline = time.monotonic() + timeout
    with node.operator_client() as c:
        while True:
            try:
                q: dict[str, Any] = c.get_json(f"/v1/queries/{qid}")
            except PeerCallError as exc:  # not arrived at this node yet
                if exc.status != 404 or time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
                continue
            if q["state"] in want:
                return q
            if time.monotonic() > deadline:
                raise AssertionError(f"query {qid} at {node.name} stuck in {q['state']}: "
                                     f"{json.dumps(q)[:2000]}")
            time.sleep(0.1)


def result(node: RunningNode, qid: str) -> dict[str, Any]:
    with node.operator_client() as c:
        out: dict[str, Any] = c.get_json(f"/v1/queries/{qid}/result")
    return out


def usage(node: RunningNode, partner: str) -> dict[str, Any]:
    with node.operator_client() as c:
        out: dict[str, Any] = c.get_json("/v1/queries/usage", params={"partner": partner})
    return out


def ledger_entries(node: RunningNode, query_id: str | None = None) -> list[dict[str, Any]]:
    """Entries of a node's ledger (read-only view of its database; the node is the writer)."""
    store = LedgerStore(create_engine(f"sqlite:///{node.dir / 'node.db'}"), create=False)
    out = [decode_entry(r.body).as_dict() for r in store.iter_entries()]
    if query_id is not None:
        out = [e for e in out if e.get("query_id") == query_id]
    return out


def ledger_bodies(node: RunningNode) -> list[bytes]:
    store = LedgerStore(create_engine(f"sqlite:///{node.dir / 'node.db'}"), create=False)
    return [r.body for r in store.iter_entries()]


def wait_ledger(node: RunningNode, query_id: str, event_type: str,
                timeout: float = 20.0) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while True:
        found = [e for e in ledger_entries(node, query_id) if e["type"] == event_type]
        if found or time.monotonic() > deadline:
            return found
        time.sleep(0.1)
