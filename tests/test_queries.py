"""Joint query lifecycle through real node processes: every policy rule denies (with rule
and field at the requester and in both ledgers), manual approval, budget and rate limits,
result access, cancellation, timeouts, crashes mid-query, 50 concurrent queries."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from typing import Any

import pytest
from conftest import ROOT
from test_queries_support import (
    BASE_POLICIES,
    QueryNodes,
    ledger_bodies,
    ledger_entries,
    policy_override,
    query_nodes,
    show,
    stats_spec,
    submit,
    usage,
    wait_ledger,
    wait_state,
)

from cleanroom.ledger import scan_entries
from cleanroom.queries.orchestrator import CRASH_ENV, ledger_name
from cleanroom.queries.states import State, transition_table_markdown
from cleanroom.transport import PeerCallError

__all__ = ["query_nodes"]

MEDIA = BASE_POLICIES["media"]


def _replace(text: str, old: str, new: str) -> str:
    assert old in text, old
    return text.replace(old, new)


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cleanroom.cli", *args], capture_output=True,
                          text=True, timeout=120, cwd=ROOT)


# --- every policy rule denies ------------------------------------------------------------------

MEDIA_NO_OEM = MEDIA.split("[partners.oem]")[0] + "[datasets" + MEDIA.split("[datasets", 1)[1]

USERS = {"dataset": "users", "columns": {"phone": "join_key"}}

DENIALS: list[tuple[str, str, dict[str, Any], str, str]] = [
    # (case, media policy, spec changes, rule, field)
    ("partner", MEDIA_NO_OEM, {}, "partners", "requester"),
    ("query_type", _replace(MEDIA, 'query_types = ["match", "segment_stats"]',
                            'query_types = ["match"]'), {},
     "partners.oem.query_types", "type"),
    ("purpose", _replace(MEDIA, 'purposes = ["campaign_measurement"]',
                         'purposes = ["lead_grading"]'), {},
     "partners.oem.purposes", "purpose"),
    ("psi_reveal", _replace(MEDIA, 'psi_reveal = ["intersection", "cardinality"]',
                            'psi_reveal = ["cardinality"]'), {},
     "partners.oem.psi_reveal", "params.psi_reveal"),
    ("reveal_rows_to", MEDIA, {"params": {"reveal_counterparty_rows": True}},
     "partners.oem.reveal_rows_to", "params.reveal_counterparty_rows"),
    ("min_group_size", _replace(MEDIA, "min_group_size = 5", "min_group_size = 8"),
     {"params": {"min_group_size": 6}}, "limits.min_group_size", "params.min_group_size"),
    ("no_dp_budget", _replace(MEDIA, "dp_budget = { epsilon = 100000.0, period_days = 30 }\n",
                              ""),
     {"params": {"noise": {"mechanism": "laplace", "epsilon": 0.5}}},
     "partners.oem.dp_budget", "params.noise.epsilon"),
    ("dataset", MEDIA, {"media_inputs": [USERS, {"dataset": "locations",
                                                 "columns": {"home_lat": "join_key"}}]},
     "datasets", "inputs.media.1.dataset"),
    ("use_for_type", MEDIA, {"media_inputs": [{"dataset": "users",
                                               "columns": {"phone": "join_key",
                                                           "email": "label"}}]},
     "query_types", "inputs.media.0.columns.email"),
    ("column_use", MEDIA, {"media_inputs": [{"dataset": "users",
                                             "columns": {"phone": "join_key",
                                                         "user_id": "join_key"}}]},
     "datasets.users.columns.user_id", "inputs.media.0.columns.user_id"),
    ("column_default_deny", MEDIA, {"media_inputs": [{"dataset": "users",
                                                      "columns": {"phone": "join_key",
                                                                  "age": "join_key"}}]},
     "datasets.users.columns", "inputs.media.0.columns.age"),
    ("column_glob", MEDIA, {"media_inputs": [USERS, {"dataset": "behaviour",
                                                     "columns": {"views_suv": "join_key"}}]},
     "datasets.behaviour.columns.views_*", "inputs.media.1.columns.views_suv"),
    ("spec_rule_of_the_type", MEDIA, {"media_inputs": [{"dataset": "users",
                                                        "columns": {"user_id": "row_id"}}]},
     "spec.segment_stats.join_key", "inputs.media"),
]


def _spec_with(changes: dict[str, Any]) -> dict[str, Any]:
    spec = stats_spec()
    if "media_inputs" in changes:
        spec["inputs"]["media"] = changes["media_inputs"]
    spec["params"].update(changes.get("params", {}))
    return spec


def _assert_denied(qn: QueryNodes, qid: str, party: str, rule: str, field: str) -> None:
    q = wait_state(qn["oem"], qid)
    assert q["state"] == "denied", q
    assert q["error"]["rule"] == f"{party}:{rule}"
    assert q["error"]["field"] == field
    assert q["error"]["party"] == party
    assert any(d["party"] == party and d["outcome"] == "denied" and d["rule"] == rule
               for d in q["decisions"])
    want = {"decision": "denied", "rule_id": ledger_name(rule), "field": field}
    for node in (qn["oem"], qn[party]):
        decisions = [e for e in ledger_entries(node, qid) if e["type"] == "policy_decision"]
        assert any(all(e.get(k) == v for k, v in want.items()) and e["party"] == party
                   for e in decisions), (node.name, decisions)


@pytest.mark.parametrize(("case", "policy", "changes", "rule", "field"), DENIALS,
                         ids=[d[0] for d in DENIALS])
def test_counterparty_policy_rule_denies(
    query_nodes: QueryNodes, case: str, policy: str, changes: dict[str, Any], rule: str,
    field: str,
) -> None:
    with policy_override(query_nodes["media"], policy):
        q = submit(query_nodes["oem"], _spec_with(changes))
        _assert_denied(query_nodes, q["id"], "media", rule, field)
    assert show(query_nodes["media"], q["id"])["state"] == "denied"


def test_requester_own_policy_and_spec_rules_deny(query_nodes: QueryNodes) -> None:
    oem = query_nodes["oem"]
    q = submit(oem, stats_spec(purpose="lead_grading"))
    q = wait_state(oem, q["id"])
    assert (q["state"], q["error"]["rule"], q["error"]["field"]) == (
        "denied", "oem:partners.media.purposes", "purpose")
    # a query the type cannot run is refused by the type's rule, before any proposal
    q = submit(oem, stats_spec(params={"psi_reveal": "cardinality"}))
    q = wait_state(oem, q["id"])
    assert (q["error"]["rule"], q["error"]["field"]) == (
        "oem:spec.segment_stats.psi_reveal", "params.psi_reveal")
    assert ledger_entries(query_nodes["media"], q["id"]) == []  # never proposed


def test_rate_limit_denies(query_nodes: QueryNodes) -> None:
    media = query_nodes["media"]
    used = usage(media, "oem")["queries"]
    policy = _replace(MEDIA, 'psi_reveal = ["intersection", "cardinality"]\n',
                      'psi_reveal = ["intersection", "cardinality"]\n'
                      f"rate_limit = {{ max_queries = {used + 1}, per_hours = 24 }}\n")
    with policy_override(media, policy):
        first = wait_state(query_nodes["oem"], submit(query_nodes["oem"], stats_spec())["id"])
        assert first["state"] == "completed", first
        second = submit(query_nodes["oem"], stats_spec())
        _assert_denied(query_nodes, second["id"], "media", "partners.oem.rate_limit",
                       "requester")


def test_privacy_budget_is_charged_and_exhaustion_denies(query_nodes: QueryNodes) -> None:
    media, oem = query_nodes["media"], query_nodes["oem"]
    spent = usage(media, "oem")["epsilon_spent"]
    oem_spent = usage(oem, "media")["epsilon_spent"]
    policy = _replace(MEDIA, "dp_budget = { epsilon = 100000.0, period_days = 30 }",
                      f"dp_budget = {{ epsilon = {spent + 1.0}, period_days = 30 }}")
    noisy = stats_spec(params={"noise": {"mechanism": "laplace", "epsilon": 0.6}})
    with policy_override(media, policy):
        first = wait_state(oem, submit(oem, noisy)["id"])
        assert first["state"] == "completed", first
        wait_state(media, first["id"])
        assert usage(media, "oem")["epsilon_spent"] == pytest.approx(spent + 0.6)
        assert usage(oem, "media")["epsilon_spent"] == pytest.approx(oem_spent + 0.6)
        delivered = wait_ledger(media, first["id"], "result_delivered")
        assert delivered and delivered[0]["epsilon_milli"] == 600
        second = submit(oem, noisy)
        _assert_denied(query_nodes, second["id"], "media", "partners.oem.dp_budget",
                       "params.noise.epsilon")
        # a dry run answers without spending anything
        report = submit(oem, noisy, dry_run=True)
        assert not report["would_pass"]
        assert usage(media, "oem")["epsilon_spent"] == pytest.approx(spent + 0.6)


# --- manual approval, cancellation, timeouts -----------------------------------------------------

DEALER_MANUAL = _replace(BASE_POLICIES["dealer"], 'psi_reveal = ["intersection", "cardinality"]',
                         'psi_reveal = ["intersection", "cardinality"]\n'
                         'manual_approval = ["segment_stats"]')


def test_held_query_waits_then_runs_once_approved(query_nodes: QueryNodes) -> None:
    oem, dealer = query_nodes["oem"], query_nodes["dealer"]
    with policy_override(dealer, DEALER_MANUAL):
        q = submit(oem, stats_spec(counterparties=("dealer",)))
        wait_state(dealer, q["id"], {"held"})
        time.sleep(1.0)
        assert show(oem, q["id"])["state"] == "proposed"
        assert show(dealer, q["id"])["state"] == "held"
        assert [e for e in ledger_entries(dealer, q["id"]) if e["type"] == "session_started"] == []
        cli = _cli("query", "approve", "--dir", str(dealer.dir), q["id"])
        assert cli.returncode == 0, cli.stderr
        done = wait_state(oem, q["id"])
    assert done["state"] == "completed", done
    assert any(d["party"] == "dealer" and d["decided_by"] == "operator" and
               d["outcome"] == "approved" for d in done["decisions"])
    for node in (oem, dealer):
        approvals = wait_ledger(node, q["id"], "human_approval")
        assert approvals and approvals[0]["decision"] == "approved"
    assert wait_state(dealer, q["id"])["state"] == "completed"


def test_held_query_denied_by_a_person(query_nodes: QueryNodes) -> None:
    oem, dealer = query_nodes["oem"], query_nodes["dealer"]
    with policy_override(dealer, DEALER_MANUAL):
        q = submit(oem, stats_spec(counterparties=("dealer",)))
        wait_state(dealer, q["id"], {"held"})
        cli = _cli("query", "deny", "--dir", str(dealer.dir), q["id"])
        assert cli.returncode == 0, cli.stderr
        _assert_denied(query_nodes, q["id"], "dealer", "partners.oem.manual_approval", "type")


def test_cancel_propagates_to_counterparties(query_nodes: QueryNodes) -> None:
    oem, dealer = query_nodes["oem"], query_nodes["dealer"]
    with policy_override(dealer, DEALER_MANUAL):
        q = submit(oem, stats_spec(counterparties=("dealer",)))
        wait_state(dealer, q["id"], {"held"})
        cli = _cli("query", "cancel", "--dir", str(oem.dir), q["id"])
        assert cli.returncode == 0, cli.stderr
        assert wait_state(dealer, q["id"])["state"] == "cancelled"
    assert show(oem, q["id"])["state"] == "cancelled"
    for node in (oem, dealer):
        assert wait_ledger(node, q["id"], "query_cancelled")
    # a finished query cannot be cancelled; a counterparty cannot cancel
    with oem.operator_client() as c, pytest.raises(PeerCallError) as exc:
        c.post_json(f"/v1/queries/{q['id']}/cancel", {})
    assert exc.value.status == 409


def test_timeout_ends_a_query_everywhere(query_nodes: QueryNodes) -> None:
    oem, dealer = query_nodes["oem"], query_nodes["dealer"]
    with policy_override(dealer, DEALER_MANUAL):
        q = submit(oem, stats_spec(counterparties=("dealer",), params={"timeout_seconds": 2}))
        assert wait_state(oem, q["id"], timeout=30)["state"] == "timed_out"
        assert wait_state(dealer, q["id"], timeout=30)["state"] == "timed_out"
    for node in (oem, dealer):
        failed = wait_ledger(node, q["id"], "query_failed")
        assert failed and failed[0]["error_code"] == "timed_out"


# --- results go to the receiver only ------------------------------------------------------------


def test_only_the_receiver_gets_the_result(query_nodes: QueryNodes) -> None:
    oem, media, dealer = query_nodes["oem"], query_nodes["media"], query_nodes["dealer"]
    q = wait_state(oem, submit(oem, stats_spec())["id"])
    assert q["state"] == "completed"
    for caller in (media, dealer):
        with oem.client_from(caller) as c, pytest.raises(PeerCallError) as exc:
            c.get_json(f"/v1/peer/queries/{q['id']}/result")
        assert exc.value.status == 403
    with media.operator_client() as c, pytest.raises(PeerCallError) as exc:
        c.get_json(f"/v1/queries/{q['id']}/result")
    assert exc.value.status == 403
    assert wait_state(media, q["id"])["result"]["digest"] == q["result"]["digest"]


def test_bad_session_messages_get_4xx_and_fail_the_query(query_nodes: QueryNodes) -> None:
    oem, media, dealer = query_nodes["oem"], query_nodes["media"], query_nodes["dealer"]
    with policy_override(dealer, DEALER_MANUAL):
        # media approves at once; the requester waits for the dealer's person: no session yet
        q = submit(oem, stats_spec(counterparties=("media", "dealer")))
        wait_state(dealer, q["id"], {"held"})
        assert wait_state(media, q["id"], {"approved"})["state"] == "approved"
        path = f"/v1/peer/queries/{q['id']}/sessions/s-bad/messages"
        # only the requester may open sessions
        with media.client_from(dealer) as c, pytest.raises(PeerCallError) as exc:
            c.request("POST", path, content=b"x", params={"protocol": "psi"})
        assert exc.value.status == 403
        # garbage in a session: the protocol's RemoteProtocolError becomes its 4xx hint
        with media.client_from(oem) as c, pytest.raises(PeerCallError) as exc:
            c.request("POST", path, content=b"not a psi message", params={"protocol": "psi"})
        assert exc.value.status == 400
        failed = show(media, q["id"])
        assert (failed["state"], failed["error"]["code"]) == ("failed", "protocol_error")
        ended = wait_ledger(media, q["id"], "session_ended")
        assert ended and ended[0]["outcome"] == "failed"
        # a session for a query held here is refused by state
        with dealer.client_from(oem) as c, pytest.raises(PeerCallError) as exc:
            c.request("POST", path, content=b"x", params={"protocol": "psi"})
        assert exc.value.status == 409
        _cli("query", "cancel", "--dir", str(oem.dir), q["id"])
        assert wait_state(dealer, q["id"])["state"] == "cancelled"


# --- restarts ------------------------------------------------------------------------------


def _no_active(node: Any, qid: str) -> dict[str, Any]:
    q = show(node, qid)
    assert q["state"] in {"completed", "denied", "failed", "cancelled", "timed_out"}, q
    return q


def test_requester_killed_mid_query_leaves_no_half_state(query_nodes: QueryNodes) -> None:
    oem, media = query_nodes["oem"], query_nodes["media"]
    oem.stop()
    oem.start(env={CRASH_ENV: "after_first_message", "CLEANROOM_WITNESS_INTERVAL_SECONDS": "0"})
    q = submit(oem, stats_spec())
    assert oem.proc is not None
    assert oem.proc.wait(60) == -signal.SIGKILL
    oem.proc = None
    oem.start(env={"CLEANROOM_WITNESS_INTERVAL_SECONDS": "0"})
    after = wait_state(oem, q["id"])
    assert (after["state"], after["error"]["code"]) == ("failed", "node_restarted")
    assert after["result"] is None
    peer_view = wait_state(media, q["id"], timeout=30)
    assert peer_view["state"] == "failed"
    assert wait_ledger(oem, q["id"], "query_failed")
    # the node works normally afterwards
    assert wait_state(oem, submit(oem, stats_spec())["id"])["state"] == "completed"


def test_counterparty_killed_mid_session_fails_cleanly(query_nodes: QueryNodes) -> None:
    oem, media = query_nodes["oem"], query_nodes["media"]
    media.stop()
    media.start(env={CRASH_ENV: "responder_message", "CLEANROOM_WITNESS_INTERVAL_SECONDS": "0"})
    q = submit(oem, stats_spec())
    assert media.proc is not None
    assert media.proc.wait(60) == -signal.SIGKILL
    media.proc = None
    assert wait_state(oem, q["id"])["state"] == "failed"
    media.start(env={"CLEANROOM_WITNESS_INTERVAL_SECONDS": "0"})
    assert wait_state(media, q["id"], timeout=30)["state"] == "failed"
    _no_active(oem, q["id"])
    assert wait_state(oem, submit(oem, stats_spec())["id"])["state"] == "completed"


# --- concurrency ---------------------------------------------------------------------------


def test_fifty_concurrent_queries_complete(query_nodes: QueryNodes) -> None:
    oem = query_nodes["oem"]
    spec = stats_spec()
    spec["inputs"] = {
        "oem": [{"dataset": "tiny_leads", "columns": {"phone": "join_key", "email": "join_key",
                                                      "device_id": "join_key",
                                                      "city": "group_by"}}],
        "media": [{"dataset": "tiny_users", "columns": {"phone": "join_key",
                                                        "email": "join_key",
                                                        "device_id": "join_key"}}],
    }
    ids: list[str] = []
    lock = threading.Lock()

    def one() -> None:
        qid = submit(oem, spec)["id"]
        with lock:
            ids.append(qid)

    threads = [threading.Thread(target=one) for _ in range(50)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(ids) == 50
    states = [wait_state(oem, qid, timeout=180)["state"] for qid in ids]
    assert states == ["completed"] * 50
    digests = {show(oem, qid)["result"]["rows"] for qid in ids}
    assert len(digests) == 1  # same data, same groups every time


# --- ledgers and docs -----------------------------------------------------------------------------


def test_ledgers_hold_no_raw_data(query_nodes: QueryNodes) -> None:
    for node in query_nodes.nodes.values():
        bodies = ledger_bodies(node)
        assert bodies
        assert scan_entries(bodies) == []


def test_docs_carry_the_transition_table() -> None:
    doc = (ROOT / "docs" / "governance.md").read_text(encoding="utf-8")
    assert transition_table_markdown() in doc
    for state in State:
        assert f"`{state.value}`" in doc
