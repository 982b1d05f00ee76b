"""Identifier normalisation: idempotent, scalar == vectorised, messy forms map to clean ones."""

from __future__ import annotations

import math

import pandas as pd
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cleanroom import identity
from cleanroom.identity import (
    ID_KINDS,
    normalize,
    normalize_frame,
    normalize_series,
)
from cleanroom.synth import formats

NATIONAL = st.from_regex(r"\A1[3-9][0-9]{9}\Z")
LOCAL = st.from_regex(r"\A[a-z0-9][a-z0-9._]{0,15}\Z")
DOMAIN = st.from_regex(r"\A[a-z0-9]{1,10}\.(com|cn|net|com\.cn)\Z")
EMAIL = st.builds(lambda loc, dom: f"{loc}@{dom}", LOCAL, DOMAIN)
DEVICE = st.from_regex(r"\A[0-9a-f]{32}\Z").filter(lambda s: set(s) != {"0"})
# text that looks like identifiers, with the separators and whitespace that matter
NOISY = st.text(
    alphabet=st.sampled_from(list("0123456789+-.() @aAzZ:\t\n\u3000\u00a0\u2003\x1c\v１İK")),
    max_size=24,
)
ANY_TEXT = st.one_of(st.text(max_size=30), NOISY)
VALUES = st.one_of(
    ANY_TEXT, st.none(), st.integers(min_value=-(10**15), max_value=10**15),
    st.floats(allow_nan=True), st.booleans(),
)


def _series(kind: str, values: list[object]) -> list[str | None]:
    out, _ = normalize_series(kind, pd.Series(values, dtype=object))  # type: ignore[arg-type]
    return [None if v is pd.NA else v for v in out.tolist()]


@pytest.mark.parametrize("kind", ID_KINDS)
@given(value=VALUES)
@settings(max_examples=150, deadline=None)
def test_normalisation_is_idempotent(kind: identity.IdKind, value: object) -> None:
    once = normalize(kind, value)
    if once is not None:
        assert normalize(kind, once) == once


@pytest.mark.parametrize("kind", ID_KINDS)
@given(values=st.lists(VALUES, max_size=12))
@settings(max_examples=120, deadline=None)
def test_scalar_and_vectorised_forms_agree(kind: identity.IdKind, values: list[object]) -> None:
    assert _series(kind, values) == [normalize(kind, v) for v in values]


@given(national=NATIONAL)
@settings(max_examples=60, deadline=None)
def test_every_generated_phone_style_normalises_to_the_clean_form(national: str) -> None:
    clean = "+86" + national
    arr = pa.array([national])
    messy = [formats.PHONE_STYLES[s](arr)[0].as_py() for s in formats.PHONE_STYLES]
    assert [identity.normalize_phone(m) for m in messy] == [clean] * len(messy)
    assert _series("phone", messy) == [clean] * len(messy)
    assert identity.normalize_phone(clean) == clean


@given(email=EMAIL)
@settings(max_examples=60, deadline=None)
def test_every_generated_email_style_normalises_to_the_clean_form(email: str) -> None:
    arr = pa.array([email])
    messy = [formats.EMAIL_STYLES[s](arr)[0].as_py() for s in formats.EMAIL_STYLES]
    assert [identity.normalize_email(m) for m in messy] == [email] * len(messy)
    assert _series("email", messy) == [email] * len(messy)


@given(device=DEVICE)
@settings(max_examples=60, deadline=None)
def test_every_generated_device_style_normalises_to_the_clean_form(device: str) -> None:
    arr = pa.array([device])
    messy = [formats.DEVICE_STYLES[s](arr)[0].as_py() for s in formats.DEVICE_STYLES]
    assert [identity.normalize_device_id(m) for m in messy] == [device] * len(messy)
    assert _series("device_id", messy) == [device] * len(messy)


def test_styles_are_actually_messy() -> None:
    arr = pa.array(["13812345678"])
    phones = {formats.PHONE_STYLES[s](arr)[0].as_py() for s in formats.PHONE_STYLES}
    assert len(phones) == len(formats.PHONE_STYLES)
    assert "+86 138 1234 5678" in phones and "138-1234-5678" in phones
    emails = {formats.EMAIL_STYLES[s](pa.array(["li.na7@163.com"]))[0].as_py()
              for s in formats.EMAIL_STYLES}
    assert "LI.NA7@163.COM" in emails and "li.na7@163.com" in emails


def test_generator_invalid_values_normalise_to_nothing() -> None:
    for kind, bad in (("phone", formats.INVALID_PHONES), ("email", formats.INVALID_EMAILS),
                      ("device_id", formats.INVALID_DEVICE_IDS)):
        assert [normalize(kind, v) for v in bad] == [None] * len(bad)  # type: ignore[arg-type]
        assert _series(kind, list(bad)) == [None] * len(bad)


def test_known_forms() -> None:
    assert identity.normalize_phone("0086 138-1234-5678") == "+8613812345678"
    assert identity.normalize_phone(" (+86)138.1234.5678\t") == "+8613812345678"
    assert identity.normalize_phone(13812345678) == "+8613812345678"
    assert identity.normalize_phone("8613812345678") == "+8613812345678"
    # one country prefix only; full-width digits are not digits here
    assert identity.normalize_phone("+868613812345678") is None
    assert identity.normalize_phone("138１2345678") is None
    assert identity.normalize_phone("12812345678") is None
    assert identity.normalize_email("  Wang.Li@QQ.com ") == "wang.li@qq.com"
    assert identity.normalize_email("wang li@qq.com") is None
    assert identity.normalize_device_id("6D92078A-8246-4BA4-AE5B-76104861E7DC") == (
        "6d92078a82464ba4ae5b76104861e7dc")
    assert identity.normalize_device_id("00000000-0000-0000-0000-000000000000") is None


def test_invalid_values_are_counted_per_column_never_raised() -> None:
    frame = pd.DataFrame({
        "phone": ["138 1234 5678", "N/A", None, "   ", 13812345679, math.nan, b"x"],
        "email": ["A@B.CN", "nope", None, "", 5, {"a": 1}, "x@y.com"],
        "device_id": ["6D92078A-8246-4BA4-AE5B-76104861E7DC", "0000", None, "",
                      "short", ["list"], "abcdefabcdefabcd"],
    })
    out, reports = normalize_frame(
        frame, {"phone": "phone", "email": "email", "device_id": "device_id"})
    by = {r.column: r for r in reports}
    assert (by["phone"].valid, by["phone"].missing, by["phone"].invalid) == (2, 3, 2)
    assert (by["email"].valid, by["email"].missing, by["email"].invalid) == (2, 2, 3)
    assert (by["device_id"].valid, by["device_id"].missing,
            by["device_id"].invalid) == (2, 2, 3)
    for r in reports:
        assert r.valid + r.missing + r.invalid == r.rows == len(frame)
        assert set(r.as_dict()) == {"column", "kind", "rows", "valid", "missing", "invalid"}
    assert out["phone"].tolist()[:2] == ["+8613812345678", pd.NA]


def test_unknown_kind_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="unknown identifier kind"):
        normalize("passport", "x")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown identifier kind"):
        normalize_series("passport", pd.Series(["x"]))  # type: ignore[arg-type]
