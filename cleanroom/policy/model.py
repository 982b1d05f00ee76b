"""The node policy: what the owner allows its data to be used for, and by whom.

A policy is a TOML file at the owner's node (format version 1, reference in
docs/governance.md). It is parsed into the typed model below; every error names the file,
the line and the key at fault. This module does no network or database work.
"""

from __future__ import annotations

import fnmatch
import re
import tomllib
from importlib import resources
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from cleanroom.errors import ConfigError

QueryType = Literal[
    "match", "segment_stats", "train_lead_model", "lead_score", "store_recommendation"
]
QUERY_TYPES: tuple[str, ...] = (
    "match",
    "segment_stats",
    "train_lead_model",
    "lead_score",
    "store_recommendation",
)
RevealMode = Literal["intersection", "cardinality"]
ColumnUse = Literal[
    "join_key",  # may be matched by PSI (never revealed in the clear)
    "row_id",  # local row key; links tables at this node, never sent
    "model_feature",  # may enter federated training and scoring
    "group_by",  # may be a dimension of an aggregate
    "aggregate",  # may be summed or counted in an aggregate
    "label",  # training label
    "location",  # may be used at this node for nearest-store computation
    "inventory",  # may be published as availability under policy
    "public",  # not personal data; may be shared as is (e.g. store addresses)
]
COLUMN_USES: tuple[str, ...] = (
    "join_key",
    "row_id",
    "model_feature",
    "group_by",
    "aggregate",
    "label",
    "location",
    "inventory",
    "public",
)

PositiveInt = Annotated[int, Field(ge=1)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Limits(_Strict):
    min_intersection_size: PositiveInt = 50
    min_group_size: PositiveInt = 20


class RateLimit(_Strict):
    max_queries: PositiveInt
    per_hours: Annotated[float, Field(gt=0)] = 24.0


class DpBudget(_Strict):
    epsilon: Annotated[float, Field(gt=0)]
    period_days: Annotated[float, Field(gt=0)] = 30.0


class PartnerRule(_Strict):
    query_types: list[QueryType] = Field(default_factory=list)
    purposes: list[str] = Field(default_factory=list)
    psi_reveal: list[RevealMode] = Field(default_factory=lambda: ["cardinality"])  # type: ignore[arg-type]
    reveal_rows_to: list[str] = Field(default_factory=list)
    manual_approval: list[QueryType] = Field(default_factory=list)
    rate_limit: RateLimit | None = None
    dp_budget: DpBudget | None = None
    min_intersection_size: PositiveInt | None = None
    min_group_size: PositiveInt | None = None


class DatasetRule(_Strict):
    columns: dict[str, list[ColumnUse]] = Field(default_factory=dict)

    def uses_of(self, column: str) -> tuple[str, list[ColumnUse]] | None:
        """The rule key and allowed uses for ``column``: an exact name wins over a pattern."""
        if column in self.columns:
            return column, self.columns[column]
        for pattern, uses in self.columns.items():
            if any(ch in pattern for ch in "*?[") and fnmatch.fnmatchcase(column, pattern):
                return pattern, uses
        return None


class Policy(_Strict):
    version: Literal[1]
    limits: Limits = Field(default_factory=Limits)
    partners: dict[str, PartnerRule] = Field(default_factory=dict)
    datasets: dict[str, DatasetRule] = Field(default_factory=dict)

    def min_intersection_size(self, partner: str) -> int:
        rule = self.partners.get(partner)
        own = rule.min_intersection_size if rule else None
        return max(self.limits.min_intersection_size, own or 0)

    def min_group_size(self, partner: str) -> int:
        rule = self.partners.get(partner)
        own = rule.min_group_size if rule else None
        return max(self.limits.min_group_size, own or 0)

    def min_intersection_rule(self, partner: str) -> tuple[int, str]:
        """The effective minimum intersection size for ``partner`` and the rule setting it."""
        rule = self.partners.get(partner)
        own = rule.min_intersection_size if rule else None
        if own is not None and own > self.limits.min_intersection_size:
            return own, f"partners.{partner}.min_intersection_size"
        return self.limits.min_intersection_size, "limits.min_intersection_size"

    def min_group_rule(self, partner: str) -> tuple[int, str]:
        """The effective minimum group size for ``partner`` and the rule setting it."""
        rule = self.partners.get(partner)
        own = rule.min_group_size if rule else None
        if own is not None and own > self.limits.min_group_size:
            return own, f"partners.{partner}.min_group_size"
        return self.limits.min_group_size, "limits.min_group_size"


# --- loading with errors that name the line and the key ----------------------------------

_HEADER = re.compile(r"^\s*\[\[?\s*(?P<path>[^\]]+?)\s*\]\]?\s*(#.*)?$")
_ASSIGN = re.compile(
    r"^\s*(?P<key>(?:\"[^\"]*\"|'[^']*'|[A-Za-z0-9_\-]+)"
    r"(?:\s*\.\s*(?:\"[^\"]*\"|'[^']*'|[A-Za-z0-9_\-]+))*)\s*="
)
_KEY_PART = re.compile(r"\"([^\"]*)\"|'([^']*)'|([A-Za-z0-9_\-]+)")


def _split_key(text: str) -> list[str]:
    return [a or b or c for a, b, c in _KEY_PART.findall(text)]


def locate_key(text: str, path: tuple[str | int, ...]) -> int | None:
    """Best-effort 1-based line of the TOML key at ``path`` (or of its nearest parent)."""
    wanted = [str(p) for p in path]
    best_line, best_len = None, 0
    table: list[str] = []
    for number, line in enumerate(text.splitlines(), start=1):
        header = _HEADER.match(line)
        if header:
            table = _split_key(header.group("path"))
            candidate = table
        else:
            assign = _ASSIGN.match(line)
            if not assign:
                continue
            candidate = table + _split_key(assign.group("key"))
        n = len(candidate)
        if n > best_len and wanted[:n] == candidate:
            best_line, best_len = number, n
    return best_line


def _dotted(path: tuple[str | int, ...]) -> str:
    return ".".join(str(p) for p in path)


def parse_policy(text: str, source: str = "<policy>") -> Policy:
    """Parse and validate a policy; raise ConfigError naming file, line and key."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: not valid TOML: {exc}") from None
    try:
        return Policy.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = tuple(p for p in first["loc"] if not (isinstance(p, str) and "[" in p))
        line = locate_key(text, loc)
        where = f"{source}, line {line}" if line else source
        key = _dotted(loc) or "(top level)"
        more = f" (and {exc.error_count() - 1} more problem(s))" if exc.error_count() > 1 else ""
        raise ConfigError(f"{where}: key {key!r}: {first['msg']}{more}") from None


def load_policy(path: Path) -> Policy:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read policy file {path}: {exc.strerror}") from None
    return parse_policy(text, str(path))


def default_policy_path(role: str) -> Path:
    """The default policy shipped for a party role (oem, media, dealer)."""
    path = Path(str(resources.files("parties") / "policies" / f"{role}.toml"))
    if not path.is_file():
        raise ConfigError(f"no default policy for role {role!r} (looked for {path})")
    return path
