"""parties.recommend / parties.oem / parties.recommend_eval: the rule, the table, the checks."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cleanroom.errors import InputError
from cleanroom.synth import SynthConfig, generate
from parties.labels import LabelError, encode_nearest_label
from parties.oem import (
    RESULT_COLUMNS,
    inventory_keys_needed,
    recommend,
    resolve_lead_labels,
    write_recommendations,
)
from parties.recommend import (
    REASON_HOME,
    REASON_NONE,
    REASON_WORK,
    ScoringRule,
    choose,
)
from parties.recommend_eval import evaluate_synthetic, store_choice_agreement
from parties.stores import StoreList

A, L, N, U = 2, 1, 0, -1  # available, low, none, unknown


def _one(home: list[tuple[int, float, int]] | None, work: list[tuple[int, float, int]] | None,
         rule: ScoringRule | None = None) -> tuple[int, int, float]:
    k = len(home or work or [])

    def arr(lst: list[tuple[int, float, int]] | None) -> tuple[list[list[int]],
                                                                list[list[float]],
                                                                list[list[int]]]:
        if lst is None:
            return [[-1] * k], [[math.nan] * k], [[U] * k]
        return [[s for s, _, _ in lst]], [[d for _, d, _ in lst]], [[v for _, _, v in lst]]

    hi, hk, hl = arr(home)
    wi, wk, wl = arr(work)
    c = choose(hi, hk, hl, wi, wk, wl, rule or ScoringRule())
    return int(c.store[0]), int(c.reason[0]), float(c.km[0])


def test_nearest_stocking_entry_wins() -> None:
    home = [(1, 2.0, N), (2, 5.0, A), (3, 9.0, A)]
    work = [(4, 3.0, A), (5, 4.0, A), (6, 8.0, A)]
    assert _one(home, work) == (4, REASON_WORK, 3.0)  # home 1 lacks the series
    home[0] = (1, 2.0, L)
    assert _one(home, work) == (1, REASON_HOME, 2.0)  # low stock counts as stock by default
    # a low-stock penalty can move the choice
    assert _one(home, work, ScoringRule(low_stock_km=1.5)) == (4, REASON_WORK, 3.0)


def test_constants_act_as_documented() -> None:
    home = [(1, 4.0, A), (2, 9.0, A)]
    work = [(3, 3.0, A), (4, 6.0, A)]
    assert _one(home, work)[0] == 3
    assert _one(home, work, ScoringRule(work_km_factor=1.5))[0] == 1  # 4.5 > 4.0
    # rank penalty: home rank 2 at 2.0 km vs work rank 1 at 2.5 km
    h2 = [(1, 1.0, N), (2, 2.0, A)]
    w2 = [(3, 2.5, A), (4, 9.0, A)]
    assert _one(h2, w2)[0] == 2
    assert _one(h2, w2, ScoringRule(rank_km=1.0))[0] == 3  # 3.0 > 2.5
    # a finite no-stock penalty lets a much nearer store without stock win
    h3 = [(1, 1.0, N), (2, 30.0, A)]
    assert _one(h3, None)[0] == 2
    assert _one(h3, None, ScoringRule(no_stock_km=10.0))[0] == 1
    # unknown availability costs like none
    assert _one([(1, 1.0, U), (2, 3.0, A)], None)[0] == 2


def test_ties_and_no_stock() -> None:
    # the same store in both lists at the same km: home entry first
    assert _one([(7, 2.0, A), (8, 3.0, A)], [(7, 2.0, A), (9, 3.0, A)]) == (7, REASON_HOME, 2.0)
    # two stores at the same cost: the earlier entry (home before work, lower rank first)
    assert _one([(1, 5.0, N), (2, 3.0, A)], [(3, 3.0, A), (4, 5.0, A)])[0] == 2
    # nothing stocks: nearest home store; without home, nearest work store
    assert _one([(1, 5.0, N), (2, 6.0, N)], [(3, 1.0, N), (4, 2.0, U)]) == (1, REASON_HOME, 5.0)
    assert _one(None, [(3, 1.0, N), (4, 2.0, N)]) == (3, REASON_WORK, 1.0)
    # neither list: no store, reason none (the OEM then uses the city fallback)
    c = choose([[-1, -1]], [[np.nan] * 2], [[U] * 2], [[-1, -1]], [[np.nan] * 2], [[U] * 2])
    assert int(c.store[0]) == -1 and int(c.reason[0]) == REASON_NONE and math.isnan(c.km[0])


def test_rule_rejects_bad_constants() -> None:
    with pytest.raises(ValueError, match="rank_km"):
        ScoringRule(rank_km=-1)
    with pytest.raises(ValueError, match="work_km_factor"):
        ScoringRule(work_km_factor=0)


@pytest.fixture
def world() -> tuple[StoreList, pd.DataFrame, dict[str, int]]:
    # city "A": stores 0, 1, 2 around (30, 120); city "B": store 3 far away
    stores = StoreList(("S0", "S1", "S2", "S3"), ("A", "A", "A", "B"),
                       np.array([30.00, 30.05, 30.20, 40.0]),
                       np.array([120.00, 120.05, 120.20, 116.0]))
    leads = pd.DataFrame({"lead_id": ["L1", "L2", "L3", "L4"], "city": ["A", "A", "B", "Z"],
                          "intended_series": ["AX3", "EV6", "AX3", "AX3"]})
    availability = {"S0|AX3": 0, "S1|AX3": 2, "S2|AX3": 2, "S0|EV6": 2, "S1|EV6": 0,
                    "S3|AX3": 1}
    return stores, leads, availability


def _label(stores: StoreList, home: list[tuple[int, float]], work: list[tuple[int, float]]
           ) -> bytes:
    return encode_nearest_label(home, work, store_tag=stores.tag, n_stores=stores.size, k=2)


def test_table_matched_and_fallback(world: tuple[StoreList, pd.DataFrame, dict[str, int]],
                                    tmp_path: Path) -> None:
    stores, leads, availability = world
    labels = {"L1": _label(stores, [(0, 1.0), (1, 6.0)], [(2, 2.0), (1, 4.0)])}
    table = recommend(leads, stores, labels, availability, k=2)
    assert tuple(table.columns) == RESULT_COLUMNS
    r = table.set_index("lead_id")
    assert r.loc["L1", "matched"] and r.loc["L1", "recommended_store"] == "S2"
    assert r.loc["L1", "reason"] == "work" and r.loc["L1", "inventory"] == "available"
    assert r.loc["L1", "home_top5"] == "S0,S1" and r.loc["L1", "home_km"] == "1.00,6.00"
    assert r.loc["L1", "work_top5"] == "S2,S1" and r.loc["L1", "fallback_top5"] == ""
    # unmatched lead in city A, series EV6: city stores nearest the centre, S0 has EV6
    assert not r.loc["L2", "matched"] and r.loc["L2", "reason"] == "fallback"
    assert r.loc["L2", "recommended_store"] == "S0"
    assert r.loc["L2", "fallback_top5"].split(",")[0] in {"S0", "S1"}
    assert r.loc["L3", "recommended_store"] == "S3" and r.loc["L3", "inventory"] == "low"
    # a city without stores and without a known centre: no recommendation
    assert pd.isna(r.loc["L4", "recommended_store"]) and r.loc["L4", "reason"] == "none"
    # with a centre for city Z, the stores nearest that centre
    t2 = recommend(leads, stores, labels, availability, k=2,
                   city_centres={"Z": (39.9, 116.1)}).set_index("lead_id")
    assert t2.loc["L4", "recommended_store"] == "S3" and t2.loc["L4", "reason"] == "fallback"
    for name in ("out.csv", "out.parquet"):
        path = write_recommendations(table, tmp_path / name)
        back = pd.read_csv(path) if name.endswith(".csv") else pd.read_parquet(path)
        assert back["recommended_store"].tolist()[:3] == ["S2", "S0", "S3"]
    with pytest.raises(InputError, match="unsupported"):
        write_recommendations(table, tmp_path / "out.json")
    keys = inventory_keys_needed(leads, stores, labels, k=2)
    assert "S2|AX3" in keys and "S0|EV6" in keys and all("|" in k for k in keys)


def test_bad_labels_and_leads(world: tuple[StoreList, pd.DataFrame, dict[str, int]]) -> None:
    stores, leads, availability = world
    other = StoreList(("X0", "X1"), ("A", "A"), np.array([1.0, 2.0]), np.array([3.0, 4.0]))
    wrong_list = encode_nearest_label([(0, 1.0), (1, 2.0)], None, store_tag=other.tag,
                                      n_stores=2, k=2)
    with pytest.raises(LabelError, match="store_tag"):
        recommend(leads, stores, {"L1": wrong_list}, availability, k=2)
    with pytest.raises(LabelError, match="row 2"):
        recommend(leads, stores, {"L2": b"\x01\x02"}, availability, k=2)
    with pytest.raises(InputError, match="lead_id"):
        recommend(pd.concat([leads, leads]), stores, {}, availability, k=2)
    with pytest.raises(InputError, match="level"):
        recommend(leads, stores, {}, {"S0|AX3": 7}, k=2)


def test_resolve_lead_labels() -> None:
    labels, conflicts = resolve_lead_labels({
        "L1": {"email": b"e", "phone": b"p"}, "L2": {"device_id": b"d", "email": b"d"},
        "L3": {}})
    assert labels == {"L1": b"p", "L2": b"d"} and conflicts == 1
    with pytest.raises(InputError, match="fax"):
        resolve_lead_labels({"L1": {"fax": b"x"}})


def test_agreement_on_hand_made_case() -> None:
    table = pd.DataFrame({
        "lead_id": ["L1", "L2", "L3", "L4", "L5"],
        "matched": [True, True, True, False, True],
        "recommended_store": ["S1", "S2", "S3", "S4", None],
        "reason": ["home", "work", "home", "fallback", "none"],
    })
    truth = pd.DataFrame({
        "lead_id": ["L1", "L2", "L3", "L4", "L5", "L9"],
        "split": ["train", "eval", "eval", "eval", "eval", "eval"],
        "store_id": ["S1", "S2", "S9", "S4", "S5", "S1"],
    })
    a = store_choice_agreement(table, truth, "eval")
    assert (a.converting_leads, a.matched, a.agree_matched, a.agree_all) == (4, 3, 1, 2)
    assert a.rate_matched == pytest.approx(1 / 3) and a.rate_all == pytest.approx(0.5)
    assert a.by_reason == {"fallback": (1, 1), "home": (1, 0), "none": (1, 0), "work": (1, 1)}
    b = store_choice_agreement(table, truth)
    assert (b.converting_leads, b.agree_matched) == (5, 2)


def test_end_to_end_against_ground_truth(tmp_path: Path) -> None:
    out = tmp_path / "data"
    generate(out, SynthConfig(leads=3000, seed=21))
    ev = evaluate_synthetic(out)
    # every matched lead's five nearest home and work stores equal the generator's truth
    assert ev.matched > 1000 and ev.nearest.checked == ev.matched
    assert ev.nearest.all_equal and ev.nearest.without_truth == 0
    # the recommendation agrees far above chance (1 in 10 candidates)
    assert ev.eval.matched > 50 and ev.eval.rate_matched > 0.6
    assert ev.tune_rate_train is not None and ev.train.rate_matched == pytest.approx(
        ev.tune_rate_train, abs=1e-4)
    assert set(ev.table["reason"]) <= {"home", "work", "fallback", "none"}
    assert (ev.table["matched"] == ev.table["home_top5"].ne("")).all()
