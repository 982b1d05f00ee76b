"""The joint query spec: what a requester asks the parties to compute (schema version 1).

A spec names the query type, the requester, the counterparties, each party's datasets and
the use of each column, the purpose, the single result receiver and type parameters. It
carries names only: never an identifier, feature value or location. Reference:
docs/governance.md.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from cleanroom.errors import InputError
from cleanroom.policy.model import ColumnUse, QueryType, RevealMode

Name = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.\-]+$")]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class InputSpec(_Strict):
    dataset: Name
    columns: dict[Name, ColumnUse] = Field(min_length=1)


class NoiseSpec(_Strict):
    mechanism: Literal["laplace", "gaussian"]
    epsilon: Annotated[float, Field(gt=0, le=100)]
    delta: Annotated[float, Field(ge=0, lt=1)] = 0.0


class QueryParams(_Strict):
    psi_reveal: RevealMode = "intersection"
    reveal_counterparty_rows: bool = False
    min_group_size: Annotated[int, Field(ge=1)] | None = None
    min_intersection_size: Annotated[int, Field(ge=1)] | None = None
    noise: NoiseSpec | None = None
    timeout_seconds: Annotated[int, Field(ge=1, le=7 * 24 * 3600)] | None = None
    options: dict[str, Any] = Field(default_factory=dict)


class QuerySpec(_Strict):
    version: Literal[1] = 1
    type: QueryType
    requester: Name
    counterparties: list[Name] = Field(min_length=1, max_length=2)
    purpose: Name
    receiver: Name
    inputs: dict[Name, list[InputSpec]]
    params: QueryParams = Field(default_factory=QueryParams)

    @model_validator(mode="after")
    def _parties_consistent(self) -> QuerySpec:
        if len(set(self.counterparties)) != len(self.counterparties):
            raise ValueError("counterparties: a party is named twice")
        if self.requester in self.counterparties:
            raise ValueError("counterparties: the requester cannot be its own counterparty")
        parties = {self.requester, *self.counterparties}
        if self.receiver not in parties:
            raise ValueError(f"receiver: {self.receiver!r} is not a party to the query")
        unknown = sorted(set(self.inputs) - parties)
        if unknown:
            raise ValueError(f"inputs: {unknown[0]!r} is not a party to the query")
        if (
            self.params.noise is not None
            and self.params.noise.mechanism == "gaussian"
            and self.params.noise.delta <= 0
        ):
            raise ValueError("params.noise.delta: the gaussian mechanism needs delta > 0")
        return self

    @property
    def parties(self) -> list[str]:
        return [self.requester, *self.counterparties]

    def canonical_bytes(self) -> bytes:
        """Canonical JSON (sorted keys, no whitespace): what gets signed and digested."""
        return json.dumps(
            self.model_dump(mode="json"), sort_keys=True, separators=(",", ":")
        ).encode()


def parse_spec(data: bytes | str | dict[str, Any], source: str = "<spec>") -> QuerySpec:
    """Parse a spec; raise InputError naming the source and the field at fault."""
    try:
        obj = json.loads(data) if isinstance(data, bytes | str) else data
    except json.JSONDecodeError as exc:
        raise InputError(f"not valid JSON: {exc.msg} at line {exc.lineno}", file=source) from None
    if not isinstance(obj, dict):
        raise InputError("a query spec must be a JSON object", file=source)
    try:
        return QuerySpec.model_validate(obj)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = ".".join(str(p) for p in first["loc"]) or "(spec)"
        raise InputError(f"field {loc!r}: {first['msg']}", file=source) from None
