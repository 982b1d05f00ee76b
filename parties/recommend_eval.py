"""Store recommendation checked against the synthetic ground truth (simulations and tests).

Nothing here runs at a party's node in production. It needs what no party holds: the
generator's ``ground_truth/`` tables, and :func:`reference_lead_labels`, a join *in the
clear* of the OEM's identifiers with the media platform's label rows, which stands in
for the labeled-PSI query (the query must return exactly these labels) until the node
wiring exists. Use it on synthetic data only.

- :func:`check_nearest`: for every matched lead, the decoded top-k home and work stores
  equal ``ground_truth/nearest_stores`` for the lead's person (and the km agree to 5 m).
- :func:`store_choice_agreement`: how often the recommended store is the store the
  converting lead bought at (``ground_truth/store_choice``), per split.
- :func:`tune_rule`: a grid search of :class:`parties.recommend.ScoringRule` constants
  on the training split only; the figure to report is the evaluation split's.
- :func:`evaluate_synthetic`: all of it over one generated dataset directory.

It logs nothing; results are counts and rates.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from cleanroom.errors import InputError
from cleanroom.identity import normalize_series
from parties.dealer import inventory_rows
from parties.labels import K_DEFAULT
from parties.media import LabelRows, build_label_rows
from parties.oem import (
    LABEL_PRIORITY,
    LIST_SEPARATOR,
    LeadCandidates,
    apply_rule,
    build_candidates,
    decode_inventory_rows,
    recommendation_table,
    resolve_lead_labels,
)
from parties.recommend import DEFAULT_RULE, ScoringRule
from parties.stores import StoreList

KM_TOLERANCE = 0.005 + 1e-9  # labels carry 10 m units: within 5 m of the exact km


def reference_lead_labels(leads: pd.DataFrame, rows: LabelRows) -> dict[str, dict[str, bytes]]:
    """What the labeled-PSI query returns, computed in the clear: lead -> column -> label.

    Each of the lead's ``phone``, ``email`` and ``device_id`` is normalised and looked up
    among the media rows of the same kind. For tests and simulations on synthetic data.
    """
    table = rows.to_arrow().to_pandas()
    table["row"] = np.arange(len(table))
    found: dict[str, dict[str, bytes]] = {}
    ids = leads["lead_id"].astype(str).to_numpy()
    for column in LABEL_PRIORITY:
        if column not in leads.columns:
            continue
        norm, _ = normalize_series(column, leads[column].reset_index(drop=True), column)  # type: ignore[arg-type]
        q = pd.DataFrame({"lead": ids, "identifier": norm.to_numpy(dtype=object)}).dropna()
        q["kind"] = column
        hit = q.merge(table, on=["kind", "identifier"], how="inner")
        for lead, label in zip(hit["lead"].tolist(), hit["label"].tolist(), strict=True):
            found.setdefault(lead, {})[column] = bytes(label)
    return found


@dataclass(frozen=True)
class NearestCheck:
    """Matched leads compared with the true nearest stores of their person."""

    matched_leads: int
    checked: int
    lists_equal: int
    km_within_tolerance: int
    without_truth: int
    max_km_error: float

    @property
    def all_equal(self) -> bool:
        return self.checked == self.lists_equal == self.km_within_tolerance

    def as_dict(self) -> dict[str, object]:
        return {**asdict(self), "all_equal": self.all_equal}


def _km_matrix(values: pd.Series, k: int) -> np.ndarray:
    """Parse comma-joined km lists into an ``(n, k)`` array (nan where short or empty)."""
    parts = values.fillna("").astype(str).str.split(LIST_SEPARATOR, expand=True)
    parts = parts.reindex(columns=range(k))
    return parts.apply(pd.to_numeric, errors="coerce").to_numpy(dtype=np.float64)


def check_nearest(table: pd.DataFrame, truth_nearest: pd.DataFrame,
                  identity_map: pd.DataFrame, *, k: int = K_DEFAULT) -> NearestCheck:
    """Compare every matched lead's ``home_top5``/``work_top5`` (and km) with the truth.

    The truth is found through the person: ``identity_map`` links the lead to its person
    and the person to a media user; ``truth_nearest`` holds that user's lists. The table
    prints km with 2 decimals, so km agree when within 5 m (label units) + 5 m (print).
    """
    ident = identity_map[["party", "record_id", "person_id"]]
    lead_person = ident[ident["party"] == "oem"].set_index("record_id")["person_id"]
    user_person = ident[ident["party"] == "media"].set_index("record_id")["person_id"]
    truth = truth_nearest.copy()
    truth["person_id"] = truth["user_id"].map(user_person)
    truth = truth.dropna(subset=["person_id"]).drop_duplicates("person_id")
    truth = truth.set_index(truth["person_id"].astype(np.int64))
    matched = table[table["matched"].astype(bool)].reset_index(drop=True)
    person = matched["lead_id"].map(lead_person)
    has = person.notna().to_numpy(dtype=bool).copy()
    has[has] = person[has].astype(np.int64).isin(truth.index).to_numpy(dtype=bool)
    rows = matched[has].reset_index(drop=True)
    t = truth.loc[person[has].astype(np.int64).to_numpy()].reset_index(drop=True)
    same = np.ones(len(rows), dtype=bool)
    close = np.ones(len(rows), dtype=bool)
    max_err = 0.0
    for prefix in ("home", "work"):
        want = t[f"{prefix}_store_1"].astype(str)
        for j in range(2, k + 1):
            want = want + LIST_SEPARATOR + t[f"{prefix}_store_{j}"].astype(str)
        got = rows[f"{prefix}_top5"].fillna("").astype(str)
        same &= (got.to_numpy(dtype=object) == want.to_numpy(dtype=object))
        want_km = t[[f"{prefix}_km_{j}" for j in range(1, k + 1)]].to_numpy(dtype=np.float64)
        err = np.abs(_km_matrix(rows[f"{prefix}_km"], k) - want_km)
        bad = ~np.isfinite(err).all(axis=1)
        close &= ~bad
        if (~bad).any():
            row_err = err[~bad].max(axis=1)
            max_err = max(max_err, float(row_err.max()))
            ok = np.ones(len(rows), dtype=bool)
            ok[~bad] = row_err <= 0.005 + KM_TOLERANCE
            close &= ok
    return NearestCheck(matched_leads=len(matched), checked=len(rows),
                        lists_equal=int(same.sum()), km_within_tolerance=int(close.sum()),
                        without_truth=int((~has).sum()), max_km_error=round(max_err, 6))


@dataclass(frozen=True)
class Agreement:
    """Recommended store == chosen store, over converting leads (of one split, if given)."""

    split: str | None
    converting_leads: int
    matched: int
    agree_matched: int
    agree_all: int
    by_reason: dict[str, tuple[int, int]] = field(default_factory=dict)  # reason -> (n, agree)

    @property
    def rate_matched(self) -> float:
        return self.agree_matched / self.matched if self.matched else math.nan

    @property
    def rate_all(self) -> float:
        return self.agree_all / self.converting_leads if self.converting_leads else math.nan

    def as_dict(self) -> dict[str, object]:
        return {**asdict(self), "rate_matched": round(self.rate_matched, 4),
                "rate_all": round(self.rate_all, 4)}


def store_choice_agreement(table: pd.DataFrame, store_choice: pd.DataFrame,
                           split: str | None = None) -> Agreement:
    """Agreement of ``table.recommended_store`` with ``store_choice.store_id``.

    Counts converting leads (rows of ``store_choice``, of ``split`` if given) that are in
    ``table``; ``rate_matched`` is over the matched ones, ``rate_all`` over all of them.
    """
    truth = store_choice if split is None else store_choice[store_choice["split"] == split]
    joined = truth[["lead_id", "store_id"]].merge(
        table[["lead_id", "matched", "recommended_store", "reason"]], on="lead_id", how="inner")
    agree = (joined["recommended_store"].astype("string") == joined["store_id"].astype("string")
             ).fillna(False).to_numpy(dtype=bool)
    matched = joined["matched"].to_numpy(dtype=bool)
    by_reason: dict[str, tuple[int, int]] = {}
    for reason, grp in joined.groupby("reason", sort=True):
        mask = (joined["reason"] == reason).to_numpy(dtype=bool)
        by_reason[str(reason)] = (len(grp), int(agree[mask].sum()))
    return Agreement(split=split, converting_leads=len(joined), matched=int(matched.sum()),
                     agree_matched=int((agree & matched).sum()), agree_all=int(agree.sum()),
                     by_reason=by_reason)


DEFAULT_GRID: dict[str, tuple[float, ...]] = {
    "work_km_factor": (1.0, 0.8, 1.25, 1.5, 2.0),
    "rank_km": (0.0, 0.5, 1.0, 2.0, 5.0),
    "low_stock_km": (0.0, 1.0, 3.0, 10.0),
    "no_stock_km": (math.inf, 5.0, 20.0),
}


@dataclass(frozen=True)
class TuneResult:
    """The best rule on the tuning leads, its rate, and every rule tried."""

    rule: ScoringRule
    rate: float
    leads: int
    tried: int
    results: tuple[tuple[dict[str, float], float], ...] = field(repr=False)


def _truth_positions(c: LeadCandidates, store_choice: pd.DataFrame, stores: StoreList,
                     split: str | None) -> tuple[np.ndarray, np.ndarray]:
    truth = store_choice if split is None else store_choice[store_choice["split"] == split]
    want = dict(zip(truth["lead_id"].astype(str), truth["store_id"].astype(str), strict=True))
    rows = np.array([i for i, lead in enumerate(c.lead_ids) if c.matched[i] and lead in want],
                    dtype=np.int64)
    pos = np.array([stores.position.get(want[c.lead_ids[i]], -2) for i in rows], dtype=np.int64)
    return rows, pos


def tune_rule(c: LeadCandidates, store_choice: pd.DataFrame, stores: StoreList, *,
              split: str = "train",
              grid: Mapping[str, Iterable[float]] | None = None) -> TuneResult:
    """Grid-search the rule's constants to agree best with ``store_choice`` on ``split``.

    Only matched converting leads of ``split`` are used. Ties keep the rule found first
    in grid order (the grids list the plainest value first).
    """
    g = {k: tuple(v) for k, v in (grid or DEFAULT_GRID).items()}
    unknown = set(g) - set(asdict(DEFAULT_RULE))
    if unknown:
        raise InputError(f"unknown rule constant {sorted(unknown)[0]!r} in the grid")
    rows, want = _truth_positions(c, store_choice, stores, split)
    if rows.size == 0:
        raise InputError(f"no matched converting leads in the {split!r} split to tune on")
    sub = LeadCandidates(
        lead_ids=tuple(c.lead_ids[i] for i in rows), series=tuple(c.series[i] for i in rows),
        matched=c.matched[rows],
        lists=type(c.lists)(c.lists.home_idx[rows], c.lists.home_km[rows],
                            c.lists.work_idx[rows], c.lists.work_km[rows]),
        home_level=c.home_level[rows], work_level=c.work_level[rows],
        fallback_idx=c.fallback_idx[rows], fallback_km=c.fallback_km[rows],
        fallback_level=c.fallback_level[rows],
    )
    names = list(g)
    best_rule, best_rate = DEFAULT_RULE, -1.0
    results: list[tuple[dict[str, float], float]] = []
    for values in itertools.product(*(g[n] for n in names)):
        rule = ScoringRule(**dict(zip(names, values, strict=True)))
        rate = float(np.mean(apply_rule(sub, rule).store == want))
        results.append((rule.as_dict(), rate))
        if rate > best_rate:
            best_rule, best_rate = rule, rate
    return TuneResult(rule=best_rule, rate=best_rate, leads=int(rows.size),
                      tried=len(results), results=tuple(results))


@dataclass
class SyntheticEvaluation:
    """Everything :func:`evaluate_synthetic` measured, plus the result table."""

    rule: dict[str, float]
    tuned: bool
    tune_rate_train: float | None
    nearest: NearestCheck
    train: Agreement
    eval: Agreement
    default_rule_eval: Agreement
    labels: dict[str, object]
    leads: int
    matched: int
    label_conflicts: int
    table: pd.DataFrame = field(repr=False)

    def as_dict(self) -> dict[str, object]:
        return {
            "rule": self.rule, "tuned": self.tuned, "tune_rate_train": self.tune_rate_train,
            "nearest": self.nearest.as_dict(), "train": self.train.as_dict(),
            "eval": self.eval.as_dict(), "default_rule_eval": self.default_rule_eval.as_dict(),
            "labels": self.labels, "leads": self.leads, "matched": self.matched,
            "label_conflicts": self.label_conflicts,
        }


def evaluate_synthetic(root: Path | str, *, tune: bool = True,
                       rule: ScoringRule | None = None,
                       city_centres: Mapping[str, tuple[float, float]] | None = None,
                       k: int = K_DEFAULT) -> SyntheticEvaluation:
    """Run the party-local steps on a generated dataset and check them against the truth.

    Media labels -> identifier rows; dealer inventory labels; OEM: labels of its leads
    (:func:`reference_lead_labels`), candidates, rule (tuned on the training split when
    ``tune``, else ``rule`` or the default), table; then :func:`check_nearest` and
    :func:`store_choice_agreement` on both splits.
    """
    from parties.schemas import load_table

    r = Path(root)
    stores = StoreList.from_frame(load_table(r, "oem/stores"))
    leads = load_table(r, "oem/leads")
    rows = build_label_rows(load_table(r, "media/users"), load_table(r, "media/locations"),
                            stores, k=k)
    availability = decode_inventory_rows(inventory_rows(load_table(r, "dealer/inventory")))
    lead_labels, conflicts = resolve_lead_labels(reference_lead_labels(leads, rows))
    cand = build_candidates(leads, stores, lead_labels, availability, k=k,
                            city_centres=city_centres)
    choice_truth = load_table(r, "ground_truth/store_choice")
    tuned = None
    chosen = rule or DEFAULT_RULE
    if tune:
        tuned = tune_rule(cand, choice_truth, stores, split="train")
        chosen = tuned.rule
    table = recommendation_table(cand, apply_rule(cand, chosen), stores)
    default_table = recommendation_table(cand, apply_rule(cand, DEFAULT_RULE), stores)
    nearest = check_nearest(table, load_table(r, "ground_truth/nearest_stores"),
                            load_table(r, "ground_truth/identity_map"), k=k)
    return SyntheticEvaluation(
        rule=chosen.as_dict(), tuned=tune,
        tune_rate_train=None if tuned is None else round(tuned.rate, 4),
        nearest=nearest,
        train=store_choice_agreement(table, choice_truth, "train"),
        eval=store_choice_agreement(table, choice_truth, "eval"),
        default_rule_eval=store_choice_agreement(default_table, choice_truth, "eval"),
        labels=rows.report.as_dict(), leads=len(leads), matched=int(cand.matched.sum()),
        label_conflicts=conflicts, table=table,
    )
