"""Governance at the owner's node: the policy file, the query spec and policy decisions."""

from cleanroom.policy.decide import Decision, NoUsage, Usage, decide
from cleanroom.policy.model import Policy, default_policy_path, load_policy, parse_policy
from cleanroom.policy.spec import QuerySpec, parse_spec

__all__ = [
    "Decision",
    "NoUsage",
    "Policy",
    "QuerySpec",
    "Usage",
    "decide",
    "default_policy_path",
    "load_policy",
    "parse_policy",
    "parse_spec",
]
