"""parties.dealer: coarse inventory labels and per-customer visit features."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cleanroom.errors import InputError
from cleanroom.synth import SynthConfig, generate
from parties.dealer import availability_level, inventory_rows, visit_features
from parties.labels import decode_inventory_label
from parties.schemas import load_table


def test_availability_levels() -> None:
    assert availability_level([0, 1, 2, 3, 17]).tolist() == [0, 1, 1, 2, 2]
    with pytest.raises(ValueError):
        availability_level([-1])


def test_inventory_rows_and_errors() -> None:
    inv = pd.DataFrame({"store_id": ["S1", "S1", "S2"], "series": ["AX3", "EV6", "AX3"],
                        "units": [0, 2, 9]})
    rows = inventory_rows(inv)
    got = {k: decode_inventory_label(v) for k, v in rows}
    assert got == {"S1|AX3": 0, "S1|EV6": 1, "S2|AX3": 2}
    assert all(len(v) == 2 for _, v in rows)  # no unit count leaves the node
    with pytest.raises(InputError, match=r"column 'store_id', row 3: repeated"):
        inventory_rows(inv.assign(series=["AX3", "EV6", "AX3"], store_id=["S1", "S1", "S1"]))
    with pytest.raises(InputError, match=r"column 'units', row 2"):
        inventory_rows(inv.assign(units=[0, -1, 3]))
    with pytest.raises(InputError, match=r"column 'units', row 1"):
        inventory_rows(inv.assign(units=["x", 1, 3]))
    with pytest.raises(InputError, match=r"column 'store_id', row 2: value must not contain"):
        inventory_rows(inv.assign(store_id=["S1", "S|1", "S2"]))
    with pytest.raises(InputError, match="column 'series'"):
        inventory_rows(inv.drop(columns=["series"]))


def test_visit_features_sum_split_customers() -> None:
    act = pd.DataFrame({
        "record_id": ["R1", "R2", "R3", "R4"],
        "phone": ["138 0013 8000", "+86-138-0013-8000", "bad", "13900139000"],
        "store_id": ["S1", "S2", "S1", "S1"],
        "visits": [2, 3, 1, 1],
        "test_drives": [2, 3, 0, 0],
        "prior_orders": [0, 1, 0, 0],
        "last_visit_at": pd.to_datetime(["2024-01-01", "2024-03-01", "2024-02-01",
                                         "2024-02-02"]),
    })
    feats, report = visit_features(act)
    assert feats["phone"].tolist() == ["+8613800138000", "+8613900139000"]
    a = feats.iloc[0]
    assert (a["rows"], a["visits"], a["test_drives"], a["prior_orders"]) == (2, 5, 5, 1)
    assert a["last_visit_at"] == pd.Timestamp("2024-03-01")
    assert a["dealer_test_drives"] == 3.0 and a["dealer_prior_order"] == 1.0
    assert a["dealer_visits_log"] == pytest.approx(np.log1p(5))
    assert report.phone.invalid == 1 and report.customers == 2 and report.merged_rows == 1
    with pytest.raises(InputError, match=r"column 'visits', row 2"):
        visit_features(act.assign(visits=[1, 1.5, 1, 1]))


def test_visit_features_match_generator_truth(tmp_path: Path) -> None:
    out = tmp_path / "d"
    generate(out, SynthConfig(leads=1200, seed=8))
    feats, _ = visit_features(load_table(out, "dealer/activity"))
    truth = load_table(out, "ground_truth/lead_features").set_index("lead_id")
    ident = load_table(out, "ground_truth/identity_map")
    dealer = ident[ident["party"] == "dealer"]
    spoiled = set(dealer.loc[dealer["phone"].isna(), "person_id"])  # a row's phone was spoiled
    leads = ident[(ident["party"] == "oem") & ident["phone"].notna()
                  & ~ident["person_id"].isin(spoiled)]
    by_phone = feats.set_index("phone")
    checked = 0
    for lead_id, phone in zip(leads["record_id"], leads["phone"], strict=True):
        t = truth.loc[lead_id]
        if phone not in by_phone.index:
            assert t["is_dealer_customer"] == 0.0
            continue
        row = by_phone.loc[phone]
        for name in ("is_dealer_customer", "dealer_visits_log", "dealer_test_drives",
                     "dealer_prior_order"):
            assert row[name] == pytest.approx(t[name]), name
        checked += 1
    assert checked > 100
