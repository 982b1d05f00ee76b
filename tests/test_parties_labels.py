"""parties.labels: nearest-stores and inventory labels round-trip and decode strictly."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from parties.labels import (
    ABSENT_STORE,
    HEADER_SIZE,
    LabelError,
    decode_inventory_label,
    decode_nearest_label,
    decode_nearest_labels,
    encode_inventory_label,
    encode_nearest_label,
    encode_nearest_labels,
    inventory_key,
    nearest_label_size,
)

TAG = b"\x01\x02\x03\x04"
N_STORES = 2000


def _lists(draw: st.DrawFn, k: int) -> list[tuple[int, float]] | None:
    if draw(st.booleans()) and draw(st.booleans()):
        return None
    stores = draw(st.lists(st.integers(0, N_STORES - 1), min_size=k, max_size=k, unique=True))
    km = sorted(draw(st.lists(st.floats(0, 20_000, allow_nan=False), min_size=k,
                              max_size=k)))
    return list(zip(stores, km, strict=True))


@st.composite
def labels(draw: st.DrawFn) -> tuple[int, list[tuple[int, float]] | None,
                                     list[tuple[int, float]] | None]:
    k = draw(st.integers(1, 8))
    return k, _lists(draw, k), _lists(draw, k)


@given(labels())
@settings(max_examples=200, deadline=None)
def test_round_trip(case: tuple[int, list[tuple[int, float]] | None,
                                list[tuple[int, float]] | None]) -> None:
    k, home, work = case
    raw = encode_nearest_label(home, work, store_tag=TAG, n_stores=N_STORES, k=k)
    assert len(raw) == nearest_label_size(k) == 6 + 10 * k
    out = decode_nearest_label(raw, store_tag=TAG, n_stores=N_STORES, k=k)
    for got, want in ((out.home, home), (out.work, work)):
        if want is None:
            assert got is None
            continue
        assert got is not None
        assert [s for s, _ in got] == [s for s, _ in want]
        for (_, a), (_, b) in zip(got, want, strict=True):
            assert abs(a - b) <= 0.005 + 1e-9  # 10 m units, rounded to nearest


def test_layout_is_as_documented() -> None:
    raw = encode_nearest_label([(1, 0.0), (258, 1.234), (3, 1.235), (4, 100.0), (5, 167.77215)],
                               None, store_tag=TAG, n_stores=N_STORES)
    assert raw[:6] == b"\x01\x05" + TAG
    assert raw[6:11] == b"\x00\x01\x00\x00\x00"
    assert raw[11:16] == b"\x01\x02\x00\x00\x7b"  # position 258, 123 units of 10 m
    assert raw[26:31] == b"\x00\x05\x00\x41\x89"  # 167.77215 km -> 16777 = 0x4189 units
    assert raw[HEADER_SIZE + 25:] == b"\xff\xff\xff\xff\xff" * 5


def test_batch_encode_equals_scalar() -> None:
    rng = np.random.default_rng(1)
    idx = np.stack([rng.permutation(50)[:5] for _ in range(30)])
    km = np.sort(rng.uniform(0, 300, (30, 5)), axis=1)
    idx[3] = -1
    batch = encode_nearest_labels(idx, km, idx[::-1], km[::-1], store_tag=TAG, n_stores=50)
    for i in range(30):
        home = None if i == 3 else list(zip(idx[i].tolist(), km[i].tolist(), strict=True))
        j = 29 - i
        work = None if j == 3 else list(zip(idx[j].tolist(), km[j].tolist(), strict=True))
        assert batch[i].tobytes() == encode_nearest_label(home, work, store_tag=TAG,
                                                          n_stores=50)
    dec = decode_nearest_labels(batch, store_tag=TAG, n_stores=50)
    assert (dec.home_idx[3] == -1).all() and np.isnan(dec.home_km[3]).all()
    assert (dec.home_idx[0] == idx[0]).all()


def _good() -> bytearray:
    return bytearray(encode_nearest_label([(0, 1.0), (1, 2.0), (2, 3.0), (3, 4.0), (4, 5.0)],
                                          [(5, 1.0), (6, 2.0), (7, 3.0), (8, 4.0), (9, 5.0)],
                                          store_tag=TAG, n_stores=10))


def _spoil(offset: int, *values: int) -> bytes:
    raw = _good()
    raw[offset:offset + len(values)] = bytes(values)
    return bytes(raw)


@pytest.mark.parametrize(("raw", "field"), [
    (bytes(_good()[:-1]), "length"),
    (bytes(_good()) + b"\x00", "length"),
    (_spoil(0, 2), "version"),
    (_spoil(1, 4), "k"),
    (_spoil(2, 0xAA), "store_tag"),
    (_spoil(7, 10), "home_store"),           # position 10 in a 10-store list
    (_spoil(6 + 25 + 1, 9), "work_store"),   # work entry 1 repeats store 9
    (_spoil(6 + 5 + 4, 0), "home_km"),       # entry 2 nearer than entry 1
    (_spoil(6, 0xFF, 0xFF), "home_list"),    # absent position, present distance
])
def test_strict_decode(raw: bytes, field: str) -> None:
    with pytest.raises(LabelError) as info:
        decode_nearest_label(raw, store_tag=TAG, n_stores=10)
    assert info.value.field == field
    assert field in str(info.value)


def test_batch_error_names_row() -> None:
    good = bytes(_good())
    with pytest.raises(LabelError, match="row 3") as info:
        decode_nearest_labels([good, good, _spoil(0, 9)], store_tag=TAG, n_stores=10)
    assert info.value.row == 3 and info.value.field == "version"
    with pytest.raises(LabelError, match="row 2"):
        decode_nearest_labels([good, good[:10]], store_tag=TAG, n_stores=10)


def test_encode_refuses_what_the_format_cannot_hold() -> None:
    with pytest.raises(ValueError, match="outside the store list"):
        encode_nearest_label([(10, 1.0)], None, store_tag=TAG, n_stores=10, k=1)
    with pytest.raises(ValueError, match="distance"):
        encode_nearest_label([(1, 2e5)], None, store_tag=TAG, n_stores=10, k=1)
    with pytest.raises(ValueError, match="tag"):
        encode_nearest_label(None, None, store_tag=b"abc", n_stores=10)
    with pytest.raises(ValueError, match="store list"):
        encode_nearest_label(None, None, store_tag=TAG, n_stores=ABSENT_STORE + 1)


def test_inventory_label() -> None:
    for level in (0, 1, 2):
        assert decode_inventory_label(encode_inventory_label(level)) == level
    assert encode_inventory_label(2) == b"\x01\x02"
    for bad, field in ((b"\x01", "length"), (b"\x02\x01", "version"), (b"\x01\x03", "level"),
                       (b"\x01\x01\x00", "length")):
        with pytest.raises(LabelError) as info:
            decode_inventory_label(bad)
        assert info.value.field == field
    with pytest.raises(ValueError):
        encode_inventory_label(3)
    assert inventory_key("S0001", "AX5") == "S0001|AX5"
    with pytest.raises(ValueError):
        inventory_key("S|1", "AX5")
