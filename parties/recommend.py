"""The ``store_recommendation`` scoring rule: one store per lead from its candidate lists.

Pure and vectorised: given, for ``n`` leads, the home and work top-k lists (store
positions and km, nearest first) and the availability level of the lead's intended
series at each listed store, pick one store per lead. The OEM runs it at its own node
(:mod:`parties.oem`); the rule is documented in docs/store-recommendation.md.

Every list entry (a store at rank ``r`` of the home or the work list, ``d`` km away) gets
a cost in km::

    cost = d * (1 if home else WORK_KM_FACTOR)
           + RANK_KM * (r - 1)
           + LOW_STOCK_KM   if availability is low
           + NO_STOCK_KM    if availability is none or unknown

and the entry with the lowest cost wins; ties go to the earlier entry in the order
home 1..k, work 1..k. A store in both lists competes with its cheaper entry. If every
entry costs infinity (no listed store has the series and ``NO_STOCK_KM`` is infinite)
the lead goes to its nearest home store (or nearest work store when home is unknown):
the customer can order there and will come back there for service. A lead with neither
list uses its fallback list (the stores of its city, nearest the city centre first)
under the same rule with reason ``fallback``.

This module does no I/O and logs nothing.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]

REASONS = ("home", "work", "fallback", "none")
REASON_HOME, REASON_WORK, REASON_FALLBACK, REASON_NONE = 0, 1, 2, 3
LEVEL_UNKNOWN = -1


@dataclass(frozen=True)
class ScoringRule:
    """The constants of the rule (all in km). Defaults: tuned on the training split only."""

    work_km_factor: float = 1.0
    rank_km: float = 0.0
    low_stock_km: float = 0.0
    no_stock_km: float = math.inf

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if not isinstance(value, int | float) or math.isnan(value) or value < 0:
                raise ValueError(f"{name} must be a number >= 0, got {value!r}")
        if not math.isfinite(self.work_km_factor) or self.work_km_factor == 0:
            raise ValueError("work_km_factor must be finite and > 0")

    def as_dict(self) -> dict[str, float]:
        return {k: float(v) for k, v in asdict(self).items()}


DEFAULT_RULE = ScoringRule()


@dataclass(frozen=True)
class Choice:
    """Per lead: store position (-1 none), reason code, km of the winning entry, its level."""

    store: IntArray
    reason: npt.NDArray[np.int8]
    km: FloatArray
    level: IntArray


def _penalty(level: IntArray, rule: ScoringRule) -> FloatArray:
    lv = np.asarray(level, dtype=np.int64)
    out = np.where(lv >= 2, 0.0, np.where(lv == 1, rule.low_stock_km, rule.no_stock_km))
    return np.asarray(out, dtype=np.float64)


def _entry_costs(km: FloatArray, level: IntArray, factor: float,
                 rule: ScoringRule) -> FloatArray:
    k = km.shape[1]
    rank = np.arange(k, dtype=np.float64)[None, :]
    with np.errstate(invalid="ignore"):
        rank_cost = rule.rank_km * rank if rule.rank_km else np.zeros_like(rank)
        cost = km * factor + rank_cost + _penalty(level, rule)
    return np.where(np.isfinite(km), cost, np.inf)


def choose(
    home_idx: npt.ArrayLike,
    home_km: npt.ArrayLike,
    home_level: npt.ArrayLike,
    work_idx: npt.ArrayLike,
    work_km: npt.ArrayLike,
    work_level: npt.ArrayLike,
    rule: ScoringRule = DEFAULT_RULE,
) -> Choice:
    """Apply the rule to ``n`` leads; all arrays ``(n, k)``, position -1 / km nan = absent.

    Levels are 2 available, 1 low, 0 none, -1 unknown (costs like none). A lead whose two
    lists are both absent gets store -1 and reason ``none`` (the caller falls back).
    """
    hi = np.asarray(home_idx, dtype=np.int64)
    wi = np.asarray(work_idx, dtype=np.int64)
    hk = np.where(hi >= 0, np.asarray(home_km, dtype=np.float64), np.nan)
    wk = np.where(wi >= 0, np.asarray(work_km, dtype=np.float64), np.nan)
    hl = np.asarray(home_level, dtype=np.int64)
    wl = np.asarray(work_level, dtype=np.int64)
    if not (hi.shape == hk.shape == hl.shape == wi.shape == wk.shape == wl.shape) or hi.ndim != 2:
        raise ValueError("all candidate arrays must have the same shape (n, k)")
    n, k = hi.shape
    idx = np.concatenate([hi, wi], axis=1)
    km = np.concatenate([hk, wk], axis=1)
    level = np.concatenate([hl, wl], axis=1)
    cost = np.concatenate([_entry_costs(hk, hl, 1.0, rule),
                           _entry_costs(wk, wl, rule.work_km_factor, rule)], axis=1)
    best = np.argmin(cost, axis=1)  # first minimum: home before work, lower rank first
    rows = np.arange(n)
    finite = np.isfinite(cost[rows, best])
    has_home = hi[:, 0] >= 0 if k else np.zeros(n, bool)
    has_work = wi[:, 0] >= 0 if k else np.zeros(n, bool)
    # nothing stocks the series: nearest home store, else nearest work store
    best = np.where(finite, best, np.where(has_home, 0, k))
    store = idx[rows, best]
    reason = np.where(best < k, REASON_HOME, REASON_WORK).astype(np.int8)
    none = ~(has_home | has_work)
    store = np.where(none, -1, store)
    reason = np.where(none, REASON_NONE, reason).astype(np.int8)
    return Choice(store=store, reason=reason,
                  km=np.where(none, np.nan, km[rows, best]),
                  level=np.where(none, LEVEL_UNKNOWN, level[rows, best]))


def choose_fallback(
    city_idx: npt.ArrayLike, city_km: npt.ArrayLike, city_level: npt.ArrayLike,
    rule: ScoringRule = DEFAULT_RULE,
) -> Choice:
    """The rule over one fallback list (city stores by distance to the centre).

    Same costs as a home list; reason ``fallback`` (or ``none`` where the list is absent).
    """
    ci = np.asarray(city_idx, dtype=np.int64)
    absent_i = np.full_like(ci, -1)
    absent_k = np.full(ci.shape, np.nan)
    c = choose(ci, city_km, city_level, absent_i, absent_k, absent_i, rule)
    reason = np.where(c.reason == REASON_HOME, REASON_FALLBACK, c.reason).astype(np.int8)
    return Choice(store=c.store, reason=reason, km=c.km, level=c.level)


def reason_names(reason: npt.ArrayLike) -> list[str]:
    return [REASONS[int(r)] for r in np.asarray(reason)]
