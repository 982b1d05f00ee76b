"""Policy decisions: does this node's policy allow a query spec, and if not, which rule denies.

``decide`` is a pure function of the policy, the spec, which party this node is, the
current usage (queries run, privacy budget spent) and the time. It never looks at data.
Every denial names the policy rule (a dotted path into the policy file) and the spec field
that it denied, so a refused query always says why.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Literal, Protocol

from cleanroom.policy.model import Policy
from cleanroom.policy.spec import QuerySpec

Outcome = Literal["approved", "denied", "held"]

# Uses a partner may ask of a column in each query type. A spec that lists a use outside
# this table for its type is refused whatever the policy says.
USES_BY_QUERY_TYPE: dict[str, frozenset[str]] = {
    "match": frozenset({"join_key", "row_id"}),
    "segment_stats": frozenset({"join_key", "row_id", "group_by", "aggregate"}),
    "train_lead_model": frozenset({"join_key", "row_id", "model_feature", "label"}),
    "lead_score": frozenset({"join_key", "row_id", "model_feature"}),
    "store_recommendation": frozenset(
        {"join_key", "row_id", "group_by", "location", "inventory", "public"}
    ),
}


class Usage(Protocol):
    """What a node has already allowed a partner: kept by the node's query store."""

    def queries_since(self, partner: str, since: datetime) -> int: ...

    def epsilon_spent_since(self, partner: str, since: datetime) -> float: ...


class NoUsage:
    """Usage of a node that has run nothing yet (dry runs before any history, tests)."""

    def queries_since(self, partner: str, since: datetime) -> int:
        return 0

    def epsilon_spent_since(self, partner: str, since: datetime) -> float:
        return 0.0


@dataclass(frozen=True)
class Decision:
    outcome: Outcome
    rule: str  # dotted path of the deciding rule in the policy, "" when all rules passed
    field: str  # dotted path of the spec field concerned, "" when none
    reason: str  # a sentence for people; names only, never data

    @property
    def approved(self) -> bool:
        return self.outcome == "approved"

    def as_dict(self) -> dict[str, str]:
        return {
            "outcome": self.outcome,
            "rule": self.rule,
            "field": self.field,
            "reason": self.reason,
        }


def _deny(rule: str, field: str, reason: str) -> Decision:
    return Decision("denied", rule, field, reason)


def _partners_of(spec: QuerySpec, me: str) -> list[tuple[str, str]]:
    """The parties this node must hold a partner rule for, with the spec field naming each."""
    if me == spec.requester:
        return [(p, f"counterparties.{i}") for i, p in enumerate(spec.counterparties)]
    return [(spec.requester, "requester")]


def decide(
    policy: Policy,
    spec: QuerySpec,
    me: str,
    usage: Usage,
    now: datetime,
) -> Decision:
    """Decide whether this node (named ``me``) takes part in ``spec``."""
    if me not in spec.parties:
        return _deny("parties", "counterparties", f"this node ({me}) is not a party to the query")
    for partner, partner_field in _partners_of(spec, me):
        rule = policy.partners.get(partner)
        base = f"partners.{partner}"
        if rule is None:
            return _deny("partners", partner_field, f"{partner} is not an allowed partner")
        if spec.type not in rule.query_types:
            return _deny(
                f"{base}.query_types",
                "type",
                f"query type {spec.type} is not allowed for {partner}",
            )
        if spec.purpose not in rule.purposes:
            return _deny(
                f"{base}.purposes",
                "purpose",
                f"purpose {spec.purpose} is not allowed for {partner}",
            )
        if spec.params.psi_reveal not in rule.psi_reveal:
            return _deny(
                f"{base}.psi_reveal",
                "params.psi_reveal",
                f"PSI reveal mode {spec.params.psi_reveal} is not allowed with {partner}",
            )
        if (
            spec.params.reveal_counterparty_rows
            and me != spec.receiver
            and spec.receiver not in rule.reveal_rows_to
        ):
            return _deny(
                f"{base}.reveal_rows_to",
                "params.reveal_counterparty_rows",
                f"our matched rows may not be revealed to {spec.receiver}",
            )
        asked = spec.params.min_group_size
        if asked is not None and asked < policy.min_group_size(partner):
            return _deny(
                "limits.min_group_size"
                if rule.min_group_size is None
                else f"{base}.min_group_size",
                "params.min_group_size",
                f"minimum group size {asked} is below this node's {policy.min_group_size(partner)}",
            )
        if rule.rate_limit is not None:
            since = now - timedelta(hours=rule.rate_limit.per_hours)
            if usage.queries_since(partner, since) >= rule.rate_limit.max_queries:
                return _deny(
                    f"{base}.rate_limit",
                    "requester" if partner_field == "requester" else partner_field,
                    f"rate limit of {rule.rate_limit.max_queries} queries per "
                    f"{rule.rate_limit.per_hours:g} h reached for {partner}",
                )
        noise = spec.params.noise
        if noise is not None:
            if rule.dp_budget is None:
                return _deny(
                    f"{base}.dp_budget",
                    "params.noise.epsilon",
                    f"no differential-privacy budget is configured for {partner}",
                )
            since = now - timedelta(days=rule.dp_budget.period_days)
            spent = usage.epsilon_spent_since(partner, since)
            if spent + noise.epsilon > rule.dp_budget.epsilon + 1e-12:
                return _deny(
                    f"{base}.dp_budget",
                    "params.noise.epsilon",
                    f"privacy budget exhausted for {partner}: spent {spent:g} of "
                    f"{rule.dp_budget.epsilon:g}, asked {noise.epsilon:g}",
                )
    column_denial = _check_columns(policy, spec, me)
    if column_denial is not None:
        return column_denial
    for partner, _ in _partners_of(spec, me):
        if spec.type in policy.partners[partner].manual_approval:
            return Decision(
                "held",
                f"partners.{partner}.manual_approval",
                "type",
                f"{spec.type} queries with {partner} need a person's approval",
            )
    return Decision("approved", "", "", "all policy rules passed")


def _check_columns(policy: Policy, spec: QuerySpec, me: str) -> Decision | None:
    allowed_for_type = USES_BY_QUERY_TYPE[spec.type]
    for i, item in enumerate(spec.inputs.get(me, [])):
        where = f"inputs.{me}.{i}"
        dataset_rule = policy.datasets.get(item.dataset)
        if dataset_rule is None:
            return _deny(
                "datasets",
                f"{where}.dataset",
                f"dataset {item.dataset} may not be used in joint queries",
            )
        for column, use in item.columns.items():
            field = f"{where}.columns.{column}"
            if use not in allowed_for_type:
                return _deny(
                    "query_types",
                    field,
                    f"a {spec.type} query cannot use a column as {use}",
                )
            found = dataset_rule.uses_of(column)
            if found is None:
                return _deny(
                    f"datasets.{item.dataset}.columns",
                    field,
                    f"column {column} of {item.dataset} has no allowed use (default deny)",
                )
            key, uses = found
            if use not in uses:
                return _deny(
                    f"datasets.{item.dataset}.columns.{key}",
                    field,
                    f"column {column} of {item.dataset} may not be used as {use}",
                )
    return None
