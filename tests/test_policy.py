"""Policy parsing and decisions: every rule can deny, and every denial names rule and field."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from cleanroom.errors import ConfigError, InputError
from cleanroom.policy import (
    NoUsage,
    Policy,
    decide,
    default_policy_path,
    load_policy,
    parse_policy,
    parse_spec,
)

NOW = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)


def media_policy() -> Policy:
    return load_policy(default_policy_path("media"))


def spec(**changes: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "version": 1,
        "type": "segment_stats",
        "requester": "oem",
        "counterparties": ["media"],
        "purpose": "campaign_measurement",
        "receiver": "oem",
        "inputs": {
            "oem": [{"dataset": "leads", "columns": {"phone": "join_key", "city": "group_by"}}],
            "media": [
                {"dataset": "users", "columns": {"phone": "join_key", "email": "join_key"}},
                {"dataset": "behaviour", "columns": {"views_series_a": "aggregate"}},
            ],
        },
        "params": {},
    }
    for key, value in changes.items():
        if key.startswith("params."):
            base["params"][key.split(".", 1)[1]] = value
        else:
            base[key] = value
    return base


class Used:
    def __init__(self, queries: int = 0, epsilon: float = 0.0) -> None:
        self.queries, self.epsilon = queries, epsilon

    def queries_since(self, partner: str, since: datetime) -> int:
        return self.queries

    def epsilon_spent_since(self, partner: str, since: datetime) -> float:
        return self.epsilon


@pytest.mark.parametrize("role", ["oem", "media", "dealer"])
def test_default_policies_load(role: str) -> None:
    policy = load_policy(default_policy_path(role))
    assert policy.version == 1
    assert policy.partners


def test_allowed_query_is_approved() -> None:
    decision = decide(media_policy(), parse_spec(spec()), "media", NoUsage(), NOW)
    assert decision.outcome == "approved", decision


@pytest.mark.parametrize(
    ("changes", "rule", "field"),
    [
        ({"requester": "stranger", "receiver": "stranger", "inputs": {}}, "partners", "requester"),
        (
            {
                "type": "match",
                "requester": "dealer",
                "receiver": "dealer",
                "inputs": {},
                "params.psi_reveal": "intersection",
            },
            "partners.dealer.psi_reveal",
            "params.psi_reveal",
        ),
        ({"purpose": "resale"}, "partners.oem.purposes", "purpose"),
        (
            {"requester": "dealer", "receiver": "dealer", "inputs": {}, "type": "train_lead_model"},
            "partners.dealer.query_types",
            "type",
        ),
        ({"params.min_group_size": 5}, "limits.min_group_size", "params.min_group_size"),
        (
            {"inputs": {"media": [{"dataset": "secret", "columns": {"x": "aggregate"}}]}},
            "datasets",
            "inputs.media.0.dataset",
        ),
        (
            {"inputs": {"media": [{"dataset": "users", "columns": {"phone": "aggregate"}}]}},
            "datasets.users.columns.phone",
            "inputs.media.0.columns.phone",
        ),
        (
            {"inputs": {"media": [{"dataset": "users", "columns": {"nickname": "group_by"}}]}},
            "datasets.users.columns",
            "inputs.media.0.columns.nickname",
        ),
        (
            {"inputs": {"media": [{"dataset": "locations", "columns": {"home_lat": "group_by"}}]}},
            "datasets.locations.columns.*",
            "inputs.media.0.columns.home_lat",
        ),
        (
            {"inputs": {"media": [{"dataset": "behaviour", "columns": {"x": "label"}}]}},
            "query_types",
            "inputs.media.0.columns.x",
        ),
    ],
)
def test_each_rule_denies_and_names_itself(changes: dict[str, Any], rule: str, field: str) -> None:
    decision = decide(media_policy(), parse_spec(spec(**changes)), "media", NoUsage(), NOW)
    assert (decision.outcome, decision.rule, decision.field) == ("denied", rule, field)
    assert decision.reason


def test_rate_limit_denies_when_reached() -> None:
    policy = media_policy()
    limit = policy.partners["oem"].rate_limit
    assert limit is not None
    ok = decide(policy, parse_spec(spec()), "media", Used(queries=limit.max_queries - 1), NOW)
    assert ok.approved
    denied = decide(policy, parse_spec(spec()), "media", Used(queries=limit.max_queries), NOW)
    assert (denied.outcome, denied.rule) == ("denied", "partners.oem.rate_limit")


def test_privacy_budget_is_charged_and_exhausts() -> None:
    policy = media_policy()
    budget = policy.partners["oem"].dp_budget
    assert budget is not None
    noisy = spec(**{"params.noise": {"mechanism": "laplace", "epsilon": 1.0}})
    assert decide(
        policy, parse_spec(noisy), "media", Used(epsilon=budget.epsilon - 1), NOW
    ).approved
    denied = decide(policy, parse_spec(noisy), "media", Used(epsilon=budget.epsilon - 0.5), NOW)
    assert (denied.rule, denied.field) == ("partners.oem.dp_budget", "params.noise.epsilon")


def test_manual_approval_holds() -> None:
    s = spec(requester="dealer", receiver="dealer", inputs={}, type="segment_stats")
    s["params"]["psi_reveal"] = "cardinality"
    decision = decide(media_policy(), parse_spec(s), "media", NoUsage(), NOW)
    assert (decision.outcome, decision.rule) == ("held", "partners.dealer.manual_approval")


def test_requester_checks_its_own_policy_per_counterparty() -> None:
    oem = load_policy(default_policy_path("oem"))
    s = spec(counterparties=["media", "insurer"], inputs={})
    decision = decide(oem, parse_spec(s), "oem", NoUsage(), NOW)
    assert (decision.rule, decision.field) == ("partners", "counterparties.1")


def test_policy_errors_name_line_and_key() -> None:
    text = default_policy_path("media").read_text()
    bad = text.replace("min_group_size = 20", "min_group_size = 0")
    with pytest.raises(ConfigError) as info:
        parse_policy(bad, "media.toml")
    line = 1 + text.splitlines().index(
        next(ln for ln in text.splitlines() if ln.startswith("min_group_size"))
    )
    assert f"media.toml, line {line}" in str(info.value)
    assert "limits.min_group_size" in str(info.value)

    with pytest.raises(ConfigError, match=r"line \d+: key 'partners.oem.purpose'"):
        parse_policy(text.replace('purposes = ["lead', 'purpose = ["lead', 1), "media.toml")
    with pytest.raises(ConfigError, match="not valid TOML"):
        parse_policy("version = = 1", "media.toml")
    with pytest.raises(ConfigError, match=r"datasets\.users\.columns\.phone"):
        parse_policy(text.replace('phone = ["join_key"]', 'phone = ["sell"]'), "media.toml")


def test_spec_errors_name_the_field() -> None:
    with pytest.raises(InputError, match="receiver"):
        parse_spec(spec(receiver="someone-else"), "q.json")
    with pytest.raises(InputError, match=r"q\.json.*'type'"):
        parse_spec(spec(type="export_everything"), "q.json")
    with pytest.raises(InputError, match="not valid JSON"):
        parse_spec(b"{", "q.json")
    with pytest.raises(InputError, match="counterparties"):
        parse_spec(spec(counterparties=["oem"]), "q.json")


def test_spec_canonical_bytes_are_stable() -> None:
    a = parse_spec(spec())
    b = parse_spec(dict(reversed(list(spec().items()))))
    assert a.canonical_bytes() == b.canonical_bytes()


def test_revealing_our_rows_needs_the_receiver_in_reveal_rows_to() -> None:
    text = default_policy_path("media").read_text()
    reveal = parse_spec(spec(**{"params.reveal_counterparty_rows": True}))
    assert decide(media_policy(), reveal, "media", NoUsage(), NOW).approved  # default: oem
    closed = parse_policy(text.replace('reveal_rows_to = ["oem"]', "reveal_rows_to = []", 1))
    denied = decide(closed, reveal, "media", NoUsage(), NOW)
    assert (denied.outcome, denied.rule, denied.field) == (
        "denied",
        "partners.oem.reveal_rows_to",
        "params.reveal_counterparty_rows",
    )
