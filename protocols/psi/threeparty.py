"""Three-party matching (OEM ∩ media platform ∩ dealer) composed from two-party PSI.

Two compositions, both built only from :mod:`protocols.psi.roles` sessions; the pure
pieces here plan them, prepare the second session's input and combine results.

**Star** (default): the OEM is the requester in two independent sessions, OEM x media and
OEM x dealer, both in intersection mode, and intersects the matched rows locally.

- OEM learns which of its rows the media platform holds, which the dealer holds, hence
  the pairwise intersections O∩M and O∩D (as its own rows), the triple O∩M∩D, and the
  media's and dealer's set sizes (per bucket).
- media platform learns the OEM's set size (per bucket) — nothing about the dealer.
- dealer learns the OEM's set size (per bucket) — nothing about the media platform.
- M∩D outside the OEM's set is never computed by anyone.

**Chained** (when the OEM may learn the triple only as a count from the dealer, or the
dealer only allows cardinality): first OEM x media in intersection mode; then the OEM
uses only its rows matched by the media platform as its set in OEM x dealer, in
cardinality mode.

- OEM learns O∩M (its rows), the media's and dealer's set sizes, and |O∩M∩D| (a count:
  not which rows, and not |O∩D|).
- media platform learns |O| (per bucket).
- dealer learns |O∩M| (the size of the OEM's second set, per bucket): the pairwise size
  of the OEM and media overlap. The dealer's policy must allow that.

In both, each two-party session keeps its own leakage statement (docs/protocols/psi.md);
multi-key sessions compose the same way on resolved rows. No I/O here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum

from protocols.psi.messages import Mode
from protocols.psi.roles import RequesterResult

PARTIES = ("oem", "media", "dealer")


class Composition(Enum):
    STAR = "star"
    CHAINED = "chained"


@dataclass(frozen=True)
class SessionPlan:
    requester: str
    responder: str
    mode: Mode
    input: str  # which rows the requester brings


@dataclass(frozen=True)
class ThreePartyPlan:
    composition: Composition
    sessions: tuple[SessionPlan, ...]
    learns: dict[str, tuple[str, ...]]


def plan(composition: Composition) -> ThreePartyPlan:
    """The two sessions to run and the statement of what each party learns."""
    if composition is Composition.STAR:
        return ThreePartyPlan(
            composition,
            (
                SessionPlan("oem", "media", Mode.INTERSECTION, "all OEM rows"),
                SessionPlan("oem", "dealer", Mode.INTERSECTION, "all OEM rows"),
            ),
            {
                "oem": ("rows in O∩M", "rows in O∩D", "rows in O∩M∩D", "|M| and |D| per bucket"),
                "media": ("|O| per bucket",),
                "dealer": ("|O| per bucket",),
            },
        )
    return ThreePartyPlan(
        composition,
        (
            SessionPlan("oem", "media", Mode.INTERSECTION, "all OEM rows"),
            SessionPlan("oem", "dealer", Mode.CARDINALITY, "OEM rows in O∩M"),
        ),
        {
            "oem": ("rows in O∩M", "|O∩M∩D|", "|M| and |D| per bucket"),
            "media": ("|O| per bucket",),
            "dealer": ("|O∩M| per bucket",),
        },
    )


@dataclass(frozen=True)
class StarResult:
    """Rows are the OEM's own row indices."""

    with_media: tuple[int, ...]
    with_dealer: tuple[int, ...]
    in_all_three: tuple[int, ...]

    @property
    def counts(self) -> dict[str, int]:
        return {
            "oem∩media": len(self.with_media),
            "oem∩dealer": len(self.with_dealer),
            "oem∩media∩dealer": len(self.in_all_three),
        }


def _rows(result: RequesterResult | Sequence[int]) -> tuple[int, ...]:
    if isinstance(result, RequesterResult):
        if result.matched_indices is None:
            raise ValueError("the star composition needs intersection-mode sessions")
        return result.matched_indices
    return tuple(sorted(set(result)))


def combine_star(
    media: RequesterResult | Sequence[int], dealer: RequesterResult | Sequence[int]
) -> StarResult:
    """Intersect at the OEM: results of OEM x media and OEM x dealer (or resolved rows)."""
    m, d = _rows(media), _rows(dealer)
    both = tuple(sorted(set(m) & set(d)))
    return StarResult(m, d, both)


def chained_input(oem_items: Sequence[bytes], with_media: RequesterResult) -> list[bytes]:
    """The OEM's set for the second (cardinality) session: only items the media matched."""
    if with_media.matched_indices is None:
        raise ValueError("the first chained session must run in intersection mode")
    return [oem_items[i] for i in with_media.matched_indices]
