"""Generator invariants at small sizes: overlaps, formats, ground-truth separation, stores."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from cleanroom.cli import main
from cleanroom.identity import normalize_frame
from cleanroom.synth import CITIES, SynthConfig, generate
from cleanroom.synth.generator import _Counts
from cleanroom.synth.model import SERIES, TRUE_FEATURES
from parties.geo import great_circle_km, nearest_stores
from parties.schemas import GROUND_TRUTH_TABLES, PARTY_TABLES, SCHEMAS, load_table

LEADS = 5000
ID_COLUMNS = {
    "oem": ("oem/leads", "lead_id", ("phone", "email", "device_id")),
    "media": ("media/users", "user_id", ("phone", "email", "device_id", "device_id_2")),
    "dealer": ("dealer/activity", "record_id", ("phone",)),
}


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "data"
    generate(out, SynthConfig(leads=LEADS, seed=11))
    return out


@pytest.fixture(scope="module")
def tables(data: Path) -> dict[str, pd.DataFrame]:
    return {name: load_table(data, name) for name in (*PARTY_TABLES, *GROUND_TRUTH_TABLES)}


def test_layout_and_ground_truth_only_in_ground_truth(data: Path) -> None:
    files = {str(p.relative_to(data)) for p in data.rglob("*") if p.is_file()}
    expected = {f"{t}.parquet" for t in SCHEMAS} | {"ground_truth/model.json", "summary.json"}
    assert files == expected
    assert not [p for p in data.parent.iterdir() if p.name.startswith(".data.tmp")]
    gt_only = {"converted", "true_logit", "person_id", "store_id_chosen", "home_store_1",
               "chosen_from", "is_duplicate"}
    for table in PARTY_TABLES:
        cols = set(pq.read_schema(data / f"{table}.parquet").names)
        allowed = {"converted"} if table == "oem/labels" else set()
        assert not (cols & gt_only) - allowed, table


def test_labels_split_by_time(tables: dict[str, pd.DataFrame]) -> None:
    leads = tables["oem/leads"]
    train, ev = tables["oem/labels"], tables["ground_truth/eval_labels"]
    assert len(train) + len(ev) == len(leads) == LEADS
    assert set(train.lead_id).isdisjoint(ev.lead_id)
    assert len(train) == round(0.7 * LEADS)
    created = leads.set_index("lead_id").created_at
    assert created[train.lead_id].max() <= created[ev.lead_id].min()
    feats = tables["ground_truth/lead_features"].set_index("lead_id")
    both = pd.concat([train, ev]).set_index("lead_id").converted
    assert (feats.converted[both.index] == both).all()
    assert (feats.split[train.lead_id] == "train").all()


def test_summary_overlaps_and_auc(data: Path, tables: dict[str, pd.DataFrame]) -> None:
    summary = json.loads((data / "summary.json").read_text())
    ov = summary["overlaps"]
    assert abs(ov["leads that are media users"] - 0.6) < 0.01
    assert abs(ov["leads that are dealer customers"] - 0.3) < 0.01
    # the same overlaps, counted from the identity map
    idm = tables["ground_truth/identity_map"]
    lead_people = idm[idm.party == "oem"].person_id
    for party, rate in (("media", 0.6), ("dealer", 0.3)):
        share = lead_people.isin(set(idm[idm.party == party].person_id)).mean()
        assert abs(share - rate) < 0.01
    assert summary["rows"]["oem/leads"] == LEADS
    assert summary["rows"]["media/users"] == 3 * LEADS
    auc = summary["auc"]
    for party in ("oem", "media", "dealer"):
        assert auc["joint"] > auc[party] + 0.03, (party, auc)
    assert auc["true_model"] > 0.75
    assert 0.03 < summary["conversion_rate"]["all leads"] < 0.25


def test_identifiers_are_messy_but_normalise_to_the_identity_map(
    tables: dict[str, pd.DataFrame],
) -> None:
    idm = tables["ground_truth/identity_map"]
    for party, (table, key, cols) in ID_COLUMNS.items():
        frame = tables[table]
        kinds = {c: "device_id" if c.startswith("device") else c for c in cols}
        norm, reports = normalize_frame(frame, kinds)  # type: ignore[arg-type]
        truth = idm[idm.party == party].set_index("record_id").loc[frame[key]]
        for col in cols:
            got = norm[col].fillna("<none>").to_numpy()
            want = truth[col].fillna("<none>").to_numpy()
            assert (got == want).all(), (party, col)
        for report in reports:
            assert report.invalid > 0, (party, report.column)  # a few spoiled values
            assert report.invalid < 0.02 * report.rows
        raw = frame["phone"].dropna()
        # several formats per party, not one clean format
        assert raw.str.contains(r"[ \-.()\u3000]").mean() > 0.2 or party == "media"
        assert raw.str.startswith("+86").mean() < 0.95
    users = tables["media/users"]
    only_email = users.phone.isna() & users.device_id.isna() & users.email.notna()
    only_device = users.phone.isna() & users.email.isna() & users.device_id.notna()
    assert only_email.mean() > 0.05 and only_device.mean() > 0.05
    assert tables["oem/leads"].email.str.contains("[A-Z]").any()
    # duplicates: a person with two lead ids, two accounts, two dealer rows
    for party in ("oem", "media", "dealer"):
        part = idm[idm.party == party]
        assert part.is_duplicate.any(), party
        assert part.person_id.duplicated().any(), party


def test_store_count_and_spread_follow_the_leads() -> None:
    assert _Counts.of(SynthConfig(leads=LEADS)).stores == 20
    assert _Counts.of(SynthConfig(leads=45_000)).stores == 30
    assert _Counts.of(SynthConfig(leads=1_000_000)).stores == 667


def test_stores_spread_in_proportion_to_leads(tables: dict[str, pd.DataFrame]) -> None:
    stores = tables["oem/stores"]
    assert len(stores) == 20 and stores.store_id.is_unique
    lead_share = tables["oem/leads"].city.value_counts(normalize=True)
    per_city = stores.city.value_counts()
    for city, count in per_city.items():
        assert abs(count - 20 * lead_share[city]) < 1.0, city
    # stores sit in their city
    centre = {c[0]: (c[1], c[2]) for c in CITIES}
    km = great_circle_km(stores.lat, stores.lon, [centre[c][0] for c in stores.city],
                         [centre[c][1] for c in stores.city])
    assert (km < 80).all()
    inv = tables["dealer/inventory"]
    assert len(inv) == len(stores) * len(SERIES)
    assert set(inv.store_id) == set(stores.store_id)


def test_locations_are_plausible(tables: dict[str, pd.DataFrame]) -> None:
    loc = tables["media/locations"]
    commute = great_circle_km(loc.home_lat, loc.home_lon, loc.work_lat, loc.work_lon)
    assert np.median(commute) < 25
    assert (commute < 60).mean() > 0.9
    lats = np.array([c[1] for c in CITIES])
    lons = np.array([c[2] for c in CITIES])
    _, km = nearest_stores(loc.home_lat, loc.home_lon, lats, lons, k=1)
    assert (km[:, 0] < 120).all()


def test_nearest_stores_equal_brute_force(tables: dict[str, pd.DataFrame]) -> None:
    stores = tables["oem/stores"]
    loc = tables["media/locations"].set_index("user_id")
    gt = tables["ground_truth/nearest_stores"].set_index("user_id")
    assert set(gt.index) == set(loc.index)
    sample = gt.sample(400, random_state=1)
    for where in ("home", "work"):
        lat = loc.loc[sample.index, f"{where}_lat"].to_numpy()
        lon = loc.loc[sample.index, f"{where}_lon"].to_numpy()
        dist = great_circle_km(lat[:, None], lon[:, None], stores.lat.to_numpy()[None, :],
                               stores.lon.to_numpy()[None, :])
        order = np.argsort(dist, axis=1)[:, :5]
        want_ids = stores.store_id.to_numpy()[order]
        got_ids = sample[[f"{where}_store_{i}" for i in range(1, 6)]].to_numpy()
        assert (got_ids == want_ids).all()
        got_km = sample[[f"{where}_km_{i}" for i in range(1, 6)]].to_numpy()
        assert np.allclose(got_km, np.take_along_axis(dist, order, axis=1), atol=1e-3)
    # lead_id is filled exactly for users who are leads
    idm = tables["ground_truth/identity_map"]
    lead_people = set(idm[idm.party == "oem"].person_id)
    media = idm[idm.party == "media"].set_index("record_id")
    is_lead = media.person_id.isin(lead_people)
    assert (gt.lead_id.notna()[media.index] == is_lead).all()


def test_store_choice_follows_the_rule(tables: dict[str, pd.DataFrame]) -> None:
    choice = tables["ground_truth/store_choice"]
    feats = tables["ground_truth/lead_features"]
    assert set(choice.lead_id) == set(feats.lead_id[feats.converted])
    inv = tables["dealer/inventory"].set_index(["store_id", "series"]).units
    series = tables["oem/leads"].set_index("lead_id").intended_series
    stocked = [inv[(s, series[lead])] > 0 for lead, s in zip(choice.lead_id, choice.store_id,
                                                             strict=True)]
    from_candidates = choice.chosen_from != "fallback"
    assert np.array(stocked)[from_candidates.to_numpy()].all()
    assert set(choice.chosen_from) <= {"home", "work", "fallback"}
    assert (choice.km >= 0).all()


def test_true_features_come_from_party_data(data: Path, tables: dict[str, pd.DataFrame]) -> None:
    model = json.loads((data / "ground_truth" / "model.json").read_text())
    assert [f["name"] for f in model["features"]] == [f.name for f in TRUE_FEATURES]
    assert {f["party"] for f in model["features"]} == {"oem", "media", "dealer"}
    feats = tables["ground_truth/lead_features"].set_index("lead_id")
    logit = model["intercept"] + sum(f["coefficient"] * feats[f["name"]]
                                     for f in model["features"])
    assert np.allclose(logit, feats.true_logit)
    # media_views_log recomputed from media/behaviour through the identity map
    idm = tables["ground_truth/identity_map"]
    beh = tables["media/behaviour"].set_index("user_id")
    views = np.log1p(beh[[f"views_{s.lower()}" for s in SERIES]].sum(axis=1))
    primary = idm[(idm.party == "media") & ~idm.is_duplicate].set_index("person_id").record_id
    leads = idm[idm.party == "oem"].set_index("record_id").person_id
    user = leads.map(primary)
    want = views.reindex(user.to_numpy()).fillna(0.0).to_numpy()
    assert np.allclose(feats.media_views_log[leads.index].to_numpy(), want)
    # dealer test drives: summed over a customer's rows, matched by person
    act = tables["dealer/activity"].set_index("record_id")
    dealer = idm[idm.party == "dealer"].set_index("record_id").person_id
    drives = act.test_drives.groupby(dealer[act.index].to_numpy()).sum()
    want_d = np.minimum(drives.reindex(leads.to_numpy()).fillna(0).to_numpy(), 3)
    assert np.allclose(feats.dealer_test_drives[leads.index].to_numpy(), want_d)


def test_same_seed_same_data_other_seed_other_data(tmp_path: Path) -> None:
    cfg = SynthConfig(leads=400, seed=5)
    generate(tmp_path / "a", cfg)
    generate(tmp_path / "b", cfg)
    generate(tmp_path / "c", SynthConfig(leads=400, seed=6))
    for table in SCHEMAS:
        a = pq.read_table(tmp_path / "a" / f"{table}.parquet")
        b = pq.read_table(tmp_path / "b" / f"{table}.parquet")
        assert a.equals(b), table
    a = pq.read_table(tmp_path / "a" / "oem/leads.parquet")
    c = pq.read_table(tmp_path / "c" / "oem/leads.parquet")
    assert not a.equals(c)


def test_csv_mode_through_the_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "csv"
    code = main(["synth", "--out", str(out), "--leads", "600", "--seed", "2", "--csv",
                 "--media-users", "1000", "--media-overlap", "0.5", "--dealer-overlap", "0.2"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "oem/leads" in printed and "joint" in printed and "AUC" in printed
    files = {str(p.relative_to(out)) for p in out.rglob("*.csv")}
    assert files == {f"{t}.csv" for t in SCHEMAS}
    assert not list(out.rglob("*.parquet"))
    leads = load_table(out / "oem" / "leads.csv", "oem/leads")
    assert len(leads) == 600
    assert leads.phone.dtype == "string"
    raw = pd.read_csv(out / "oem" / "leads.csv", dtype=str).phone.dropna()
    assert raw.str.len().min() >= 3  # phones kept as text
    users = load_table(out, "media/users")
    assert len(users) == 1000
    idm = load_table(out, "ground_truth/identity_map")
    norm, _ = normalize_frame(leads, {"phone": "phone", "email": "email",
                                      "device_id": "device_id"})
    truth = idm[idm.party == "oem"].set_index("record_id").loc[leads.lead_id]
    for col in ("phone", "email", "device_id"):
        # CSV reads empty strings as missing, so compare where the truth has a value
        has = truth[col].notna().to_numpy()
        assert (norm[col].to_numpy()[has] == truth[col].to_numpy()[has]).all()
    summary = json.loads((out / "summary.json").read_text())
    assert abs(summary["overlaps"]["leads that are media users"] - 0.5) < 0.01
    assert abs(summary["overlaps"]["leads that are dealer customers"] - 0.2) < 0.01
