"""parties.media: nearest stores equal the generator's truth; identifier rows -> labels."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cleanroom.errors import InputError
from cleanroom.identity import normalize
from cleanroom.synth import SynthConfig, generate
from parties.labels import decode_nearest_labels
from parties.media import (
    align_locations,
    build_label_rows,
    identifier_rows,
    nearest_for_users,
    nearest_store_labels,
)
from parties.schemas import load_table
from parties.stores import StoreList


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("media") / "data"
    generate(out, SynthConfig(leads=1500, seed=5))
    return out


def test_nearest_equals_ground_truth(data: Path) -> None:
    stores = StoreList.from_frame(load_table(data, "oem/stores"))
    users = load_table(data, "media/users")
    locations, missing = align_locations(users, load_table(data, "media/locations"))
    assert missing == 0
    truth = load_table(data, "ground_truth/nearest_stores").set_index("user_id")
    truth = truth.loc[users["user_id"]]
    # a small chunk so several chunks run
    lists = nearest_for_users(locations, stores, chunk=997)
    labels = decode_nearest_labels(nearest_store_labels(locations, stores, chunk=1234),
                                   store_tag=stores.tag, n_stores=stores.size)
    for prefix, idx, km, lab_idx, lab_km in (
        ("home", lists.home_idx, lists.home_km, labels.home_idx, labels.home_km),
        ("work", lists.work_idx, lists.work_km, labels.work_idx, labels.work_km),
    ):
        want_ids = truth[[f"{prefix}_store_{j}" for j in range(1, 6)]].to_numpy(dtype=str)
        want_km = truth[[f"{prefix}_km_{j}" for j in range(1, 6)]].to_numpy(dtype=float)
        got_ids = np.asarray(stores.store_ids)[idx]
        assert (got_ids == want_ids).all()
        assert np.allclose(km, want_km, atol=1e-4)
        assert (lab_idx == idx).all()
        assert np.abs(lab_km - want_km).max() <= 0.005 + 1e-4


def test_identifier_rows_cover_every_valid_identifier(data: Path) -> None:
    stores = StoreList.from_frame(load_table(data, "oem/stores"))
    users = load_table(data, "media/users")
    rows = build_label_rows(users, load_table(data, "media/locations"), stores)
    table = rows.to_arrow().to_pandas()
    assert table.duplicated(["kind", "identifier"]).sum() == 0
    lookup = {(k, i): bytes(lab) for k, i, lab in zip(table["kind"], table["identifier"],
                                                      table["label"], strict=True)}
    aligned, _ = align_locations(users, load_table(data, "media/locations"))
    labels = nearest_store_labels(aligned, stores)
    owner_of = dict(zip(zip(table["kind"], table["identifier"], strict=True),
                        rows.label_index.tolist(), strict=True))
    checked = 0
    for i, user in enumerate(users.itertuples(index=False)):
        keys = []
        for col, kind in (("phone", "phone"), ("email", "email"),
                          ("device_id", "device_id"), ("device_id_2", "device_id")):
            norm = normalize(kind, getattr(user, col))  # type: ignore[arg-type]
            if norm is not None:
                keys.append((kind, norm))
        for key in keys:
            assert key in lookup, "a valid identifier has no row"
            if owner_of[key] == i:
                assert lookup[key] == labels[i].tobytes()
                checked += 1
            else:  # a duplicate account of the same person: same locations, same label
                assert lookup[key] == labels[owner_of[key]].tobytes()
        # every identifier of one user opens the same label
        assert len({lookup[key] for key in keys}) <= 1
    assert checked > 0.95 * len(rows)
    # the label carries no identifier
    for ident in table["identifier"].head(200):
        assert ident.encode() not in bytes(table["label"].iloc[0])
    rep = rows.report
    assert rep.rows == len(rows) == sum(c.valid for c in rep.columns) - rep.duplicate_same_label \
        - rep.duplicate_conflicting - _self_duplicates(users)
    assert sum(c.invalid for c in rep.columns) > 0  # the generator spoils 0.4% of cells


def _self_duplicates(users: pd.DataFrame) -> int:
    """Users whose two device columns normalise to the same device (one row, no collision)."""
    a = users["device_id"].map(lambda v: normalize("device_id", v))
    b = users["device_id_2"].map(lambda v: normalize("device_id", v))
    return int(((a == b) & a.notna()).sum())


def test_invalid_identifiers_counted_not_crashing() -> None:
    users = pd.DataFrame({
        "user_id": ["u1", "u2", "u3"],
        "phone": ["138 0013 8000", "12345", None],
        "email": ["A@Example.com ", "not-an-email", "b@example.com"],
        "device_id": ["0000000000000000", "ABCDEF-0123456789", None],
        "device_id_2": [None, "abcdef0123456789", 7],
    })
    labels = np.arange(3 * 4, dtype=np.uint8).reshape(3, 4)
    rows = identifier_rows(users, labels)
    got = sorted((k, i, lab) for k, i, lab in rows)
    assert got == [
        ("device_id", "abcdef0123456789", bytes([4, 5, 6, 7])),
        ("email", "a@example.com", bytes([0, 1, 2, 3])),
        ("email", "b@example.com", bytes([8, 9, 10, 11])),
        ("phone", "+8613800138000", bytes([0, 1, 2, 3])),
    ]
    cols = {c.column: c for c in rows.report.columns}
    assert cols["phone"].invalid == 1 and cols["phone"].missing == 1
    assert cols["email"].invalid == 1
    assert cols["device_id"].invalid == 1 and cols["device_id_2"].invalid == 1
    assert rows.report.users_without_identifier == 0
    assert rows.report.duplicate_same_label == rows.report.duplicate_conflicting == 0


def test_shared_identifier_keeps_the_richer_user_and_counts() -> None:
    users = pd.DataFrame({
        "user_id": ["a", "b"],
        "phone": ["13800138000", "+86 138-0013-8000"],
        "email": [None, "x@y.cn"],
        "device_id": [None, None],
        "device_id_2": [None, None],
    })
    rows = identifier_rows(users, np.array([[1], [2]], dtype=np.uint8))
    assert dict(((k, i), lab) for k, i, lab in rows) == {
        ("phone", "+8613800138000"): b"\x02", ("email", "x@y.cn"): b"\x02"}
    assert rows.report.duplicate_conflicting == 1


def test_missing_location_and_bad_input() -> None:
    stores = StoreList(("S1", "S2"), ("c", "c"), np.array([30.0, 31.0]), np.array([120.0, 121.0]))
    users = pd.DataFrame({"user_id": ["u1", "u2"], "phone": ["13800138000", "13900139000"],
                          "email": [None, None], "device_id": [None, None],
                          "device_id_2": [None, None]})
    locs = pd.DataFrame({"user_id": ["u1"], "home_lat": [30.1], "home_lon": [120.1],
                         "work_lat": [np.nan], "work_lon": [np.nan]})
    rows = build_label_rows(users, locs, stores, k=2)
    assert rows.report.users_without_location == 1
    dec = decode_nearest_labels(rows.labels, store_tag=stores.tag, n_stores=2, k=2)
    assert dec.home_idx[0].tolist() == [0, 1] and dec.work_idx[0].tolist() == [-1, -1]
    assert dec.home_idx[1].tolist() == [-1, -1]
    with pytest.raises(InputError, match="home_lat"):
        build_label_rows(users, locs.assign(home_lat=[95.0]), stores, k=2)
    with pytest.raises(InputError, match="work_lon"):
        build_label_rows(users, locs.drop(columns=["work_lon"]), stores, k=2)
    with pytest.raises(InputError, match="repeated"):
        build_label_rows(pd.concat([users, users]), locs, stores, k=2)
