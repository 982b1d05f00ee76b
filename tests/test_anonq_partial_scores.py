"""``partial_scores`` labeled tables (lead_score standard mode), without nodes: building the
records (first record wins a shared identifier, the reserved zero-row entry), publishing
and opening them with the owner's key, the publish spec's rules, and the OEM's pick of a
lead's label (phone > email > device id, first hit wins, zero-row score otherwise)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from cleanroom.anonq import tables
from cleanroom.anonq.api import PublishSpec
from cleanroom.errors import InputError
from cleanroom.queries import lead_score as ls
from cleanroom.queries.runners import QueryFailure
from protocols.labeled_psi import oprf
from protocols.psi.multikey import encode_item
from protocols.vertical_lr import decode_partial_label, encode_partial_label


def _open(data_dir: Path, name: str, item: bytes) -> bytes | None:
    src = tables.load_serving(data_dir, name)
    pair = oprf.TagDeriver(src.current.table_id).derive(oprf.oprf_direct(src.key, [item]))
    return src.current.open([pair])[0]


def test_records_first_holder_wins_and_zero_row_is_reserved() -> None:
    phone, email = encode_item("phone", "13800000001"), encode_item("email", "a@b.cn")
    records = tables.partial_score_users(
        [[phone, email], [email], [phone], [encode_item("device_id", "d1")]],
        [encode_partial_label(v) for v in (0.5, -1.0, 2.0, 0.25)],
        ["r:a", "r:b", "r:c", "r:d"], encode_partial_label(-0.125))
    assert records["r:a"] == ((phone, email), encode_partial_label(0.5))
    assert "r:b" not in records and "r:c" not in records  # every identifier taken before
    assert records["r:d"][0] == (encode_item("device_id", "d1"),)
    assert records[tables.ZERO_ROW_REF] == ((tables.ZERO_ROW_ITEM,),
                                            encode_partial_label(-0.125))
    assert tables.ZERO_ROW_ITEM[:1] not in (b"\x00", b"\x01", b"\x02", b"\x03",
                                            tables.INVENTORY_TAG)
    with pytest.raises(InputError, match="must start with 'r:'"):
        tables.partial_score_users([[phone]], [b"x" * 9], [tables.ZERO_ROW_REF], b"z" * 9)
    with pytest.raises(InputError, match="differ in length"):
        tables.partial_score_users([[phone]], [], ["r:a"], b"z" * 9)


@settings(max_examples=15, deadline=None)
@given(st.lists(st.floats(-40, 40, allow_nan=False), min_size=1, max_size=12),
       st.floats(-40, 40, allow_nan=False))
def test_published_labels_open_to_the_scores(tmp_path_factory: pytest.TempPathFactory,
                                             scores: list[float], zero: float) -> None:
    data_dir = tmp_path_factory.mktemp("ps")
    items = [[encode_item("phone", f"1380000{i:04d}"), encode_item("email", f"u{i}@x.cn")]
             for i in range(len(scores))]
    records = tables.partial_score_users(items, [encode_partial_label(v) for v in scores],
                                         [f"r:{i}" for i in range(len(scores))],
                                         encode_partial_label(zero))
    report = tables.publish(data_dir, "partial_scores", records, kind="partial_scores",
                            query_type="lead_score", label_size=9, min_bucket_size=1,
                            sources={"model": "q-m"}, processes=1)
    assert report.users == len(scores) + 1 and report.entries == 2 * len(scores) + 1
    for i, v in enumerate(scores):
        for item in items[i]:
            label = _open(data_dir, "partial_scores", item)
            assert label is not None and abs(decode_partial_label(label) - v) <= 2**-24
    zero_label = _open(data_dir, "partial_scores", tables.ZERO_ROW_ITEM)
    assert zero_label is not None and abs(decode_partial_label(zero_label) - zero) <= 2**-24
    assert _open(data_dir, "partial_scores", encode_item("phone", "19999999999")) is None


def test_partial_scores_tables_serve_lead_score_only(tmp_path: Path) -> None:
    records = tables.partial_score_users([[encode_item("phone", "13800000001")]],
                                         [encode_partial_label(1.0)], ["r:a"],
                                         encode_partial_label(0.0))
    with pytest.raises(InputError, match="serves lead_score"):
        tables.publish(tmp_path, "partial_scores", records, kind="partial_scores",
                       query_type="store_recommendation", label_size=9, min_bucket_size=1)


def test_publish_spec_rules() -> None:
    spec = PublishSpec(kind="partial_scores", model="q-abc")
    assert spec.query_type == "lead_score" and spec.model_dump()["model"] == "q-abc"
    assert PublishSpec(kind="inventory").query_type == "store_recommendation"
    assert PublishSpec(kind="inventory", query_type="lead_score").query_type == "lead_score"
    for bad, field in (({"kind": "partial_scores"}, "model"),
                       ({"kind": "partial_scores", "model": "q-a",
                         "query_type": "store_recommendation"}, "query_type"),
                       ({"kind": "nearest_stores", "model": "q-a"}, "model"),
                       ({"kind": "partial_scores", "model": "../x"}, "model")):
        with pytest.raises(ValidationError, match=field):
            PublishSpec(**bad)


def test_a_lead_takes_its_first_hit_by_priority() -> None:
    leads = pd.DataFrame({"email": ["e1", "e2", "e3", None],
                          "phone": ["p1", "p2", None, "p4"],
                          "device_id": ["d1", None, "d3", "d1"]})
    kinds = {"email": "email", "phone": "phone", "device_id": "device_id"}
    items, per_lead = ls._lead_items(leads, ["email", "phone", "device_id"], kinds)  # type: ignore[arg-type]
    assert len(items) == len(set(items)) == 8  # d1 asked once for two leads
    pos = {it: i for i, it in enumerate(items)}
    labels = {pos[encode_item("email", "e1")]: encode_partial_label(1.0),   # phone p1 wins
              pos[encode_item("phone", "p1")]: encode_partial_label(2.0),
              pos[encode_item("email", "e2")]: encode_partial_label(3.0),   # p2 missing
              pos[encode_item("device_id", "d3")]: encode_partial_label(4.0)}
    scores, hits = ls._pick(per_lead, labels, encode_partial_label(-0.5), "media", "t")
    assert hits == 3 and scores.tolist() == [2.0, 3.0, 4.0, -0.5]
    with pytest.raises(QueryFailure, match="media, table t"):
        ls._pick(per_lead, {0: b"\x02" + bytes(8)}, encode_partial_label(0.0), "media", "t")
    assert np.isfinite(scores).all()
