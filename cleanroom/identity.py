"""Identifier normalisation shared by every party.

Matching only works if all three parties turn the same person's identifiers into the
same bytes, so these rules are part of the protocol: change them and every party must
change together (bump ``RULES_VERSION``).

Rules (``RULES_VERSION`` 1):

- **phone**: Chinese mobile numbers to E.164 (``+86`` followed by 11 ASCII digits starting
  ``1[3-9]``). Whitespace, dashes, dots and brackets are dropped; one ``+86``, ``0086``
  or (for 13 digits) ``86`` country prefix is accepted. Anything else, including
  non-ASCII digits such as full-width ``１``, is invalid.
- **email**: trimmed and lower-cased; must be ``local@domain.tld`` with no whitespace.
- **device_id**: trimmed, lower-cased, separators (``-``, ``:``, whitespace) removed; must
  then be 14 to 64 characters of ``[0-9a-z]`` and not all zeros (an all-zero advertising
  id means "tracking limited", not a device).

"Whitespace" is exactly the characters Python's ``str.isspace`` accepts (``WHITESPACE``),
spelled out so that the scalar and the vectorised forms cannot drift apart: the
vectorised forms run the ASCII rules in Arrow and send the rare non-ASCII cell through
the scalar function, so both always agree.

Invalid values become ``None`` and are counted per column; nothing here raises on bad
data. This module does no I/O and never logs values.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pandas as pd

RULES_VERSION = 1

IdKind = Literal["phone", "email", "device_id"]
ID_KINDS: tuple[IdKind, ...] = ("phone", "email", "device_id")

# Every character ``str.isspace`` accepts, listed so no regex engine's idea of ``\s`` matters.
WHITESPACE = (
    "\t\n\x0b\x0c\r\x1c\x1d\x1e\x1f \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004"
    "\u2005\u2006\u2007\u2008\u2009\u200a\u2028\u2029\u202f\u205f\u3000"
)
_WS_ASCII = "".join(c for c in WHITESPACE if c.isascii())
# Python patterns (scalar forms) over the full whitespace set ...
_WS_CLASS = "".join(f"\\u{ord(c):04x}" for c in WHITESPACE)
_PHONE_STRIP = re.compile(rf"[{_WS_CLASS}\-\.\(\)]")
_PHONE_BODY = re.compile(r"1[3-9][0-9]{9}")
_EMAIL = re.compile(rf"[^@{_WS_CLASS}]+@[^@{_WS_CLASS}]+\.[^@{_WS_CLASS}.]+")
_DEVICE_STRIP = re.compile(rf"[{_WS_CLASS}\-:]")
_DEVICE_BODY = re.compile(r"[0-9a-z]{14,64}")
_ZEROS = re.compile(r"0+")
# ... and their ASCII-only twins for the Arrow fast path (non-ASCII cells never reach it).
_WS_ASCII_CLASS = "".join(f"\\x{ord(c):02x}" for c in _WS_ASCII)
_PHONE_STRIP_ASCII = rf"[{_WS_ASCII_CLASS}\-\.\(\)]"
_EMAIL_ASCII = rf"[^@{_WS_ASCII_CLASS}]+@[^@{_WS_ASCII_CLASS}]+\.[^@{_WS_ASCII_CLASS}.]+"
_DEVICE_STRIP_ASCII = rf"[{_WS_ASCII_CLASS}\-:]"


def normalize_phone(value: object) -> str | None:
    """Return the E.164 form of a Chinese mobile number, or ``None`` if it is not one."""
    text = _coerce(value)
    if text is None:
        return None
    s = _PHONE_STRIP.sub("", text.strip(WHITESPACE))
    if s.startswith("+86"):
        s = s[3:]
    elif s.startswith("0086"):
        s = s[4:]
    elif s.startswith("86") and len(s) == 13:
        s = s[2:]
    if not _PHONE_BODY.fullmatch(s):
        return None
    return "+86" + s


def normalize_email(value: object) -> str | None:
    """Return the trimmed, lower-cased address, or ``None`` if it is not an address."""
    if not isinstance(value, str):
        return None
    s = value.strip(WHITESPACE).lower()
    return s if _EMAIL.fullmatch(s) else None


def normalize_device_id(value: object) -> str | None:
    """Return the canonical device id (lower-case, no separators), or ``None``."""
    if not isinstance(value, str):
        return None
    s = _DEVICE_STRIP.sub("", value.strip(WHITESPACE).lower())
    if not _DEVICE_BODY.fullmatch(s) or _ZEROS.fullmatch(s):
        return None
    return s


NORMALIZERS: dict[IdKind, Callable[[object], str | None]] = {
    "phone": normalize_phone,
    "email": normalize_email,
    "device_id": normalize_device_id,
}


def normalize(kind: IdKind, value: object) -> str | None:
    """Normalise one identifier of the given kind."""
    try:
        return NORMALIZERS[kind](value)
    except KeyError:
        raise ValueError(f"unknown identifier kind {kind!r}; expected one of {ID_KINDS}") from None


# --- vectorised forms (same rules, checked equal to the scalar ones by the tests) ---------


def _coerce(value: object) -> str | None:
    """Strings stay; whole numbers (a phone column read as numbers) become their digits."""
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return None
    if isinstance(value, int | np.integer):
        return str(int(value))
    if isinstance(value, float | np.floating) and np.isfinite(value) and float(value).is_integer():
        return str(int(value))
    return None


def _as_str_series(values: pd.Series) -> pd.Series:
    """Strings stay, whole numbers become digit strings, anything else becomes missing."""
    if isinstance(values.dtype, pd.StringDtype):
        return values.astype("string")
    return values.astype("object").map(_coerce).astype("string")


def _with_scalar_fallback(
    s: pd.Series, fast: Callable[[pd.Series], pd.Series], scalar: Callable[[object], str | None]
) -> pd.Series:
    """Run ``fast`` (ASCII rules in Arrow) and redo non-ASCII cells with the scalar rule."""
    out = fast(s).astype("string")
    nonascii = s.str.contains(r"[^\x00-\x7f]", regex=True).fillna(False).astype(bool)
    if bool(nonascii.any()):
        redo = s[nonascii].astype("object").map(scalar).astype("string")
        out = out.copy()
        out[nonascii] = redo
    return out


def _only_strings(values: pd.Series) -> pd.Series:
    """Strings stay; anything else (numbers, bytes, ...) becomes missing, as in the scalar forms."""
    if isinstance(values.dtype, pd.StringDtype):
        return values.astype("string")
    obj = values.astype("object")
    return obj.where(obj.map(lambda v: isinstance(v, str)), None).astype("string")


def _phone_fast(s: pd.Series) -> pd.Series:
    s = s.str.strip(_WS_ASCII).str.replace(_PHONE_STRIP_ASCII, "", regex=True)
    plus = s.str.startswith("+86").fillna(False).astype(bool)
    intl = s.str.startswith("0086").fillna(False).astype(bool)
    cc = (~plus & ~intl & s.str.startswith("86") & (s.str.len() == 13)).fillna(False).astype(bool)
    body = s.where(~plus, s.str.slice(3))
    body = body.where(~intl, s.str.slice(4))
    body = body.where(~cc, s.str.slice(2))
    ok = body.str.fullmatch(_PHONE_BODY.pattern).fillna(False).astype(bool)
    return ("+86" + body).where(ok, None)


def _email_fast(s: pd.Series) -> pd.Series:
    s = s.str.strip(_WS_ASCII).str.lower()
    ok = s.str.fullmatch(_EMAIL_ASCII).fillna(False).astype(bool)
    return s.where(ok, None)


def _device_fast(s: pd.Series) -> pd.Series:
    s = s.str.strip(_WS_ASCII).str.lower().str.replace(_DEVICE_STRIP_ASCII, "", regex=True)
    ok = s.str.fullmatch(_DEVICE_BODY.pattern).fillna(False).astype(bool)
    zeros = s.str.fullmatch(_ZEROS.pattern).fillna(False).astype(bool)
    return s.where(ok & ~zeros, None)


def normalize_phone_series(values: pd.Series) -> pd.Series:
    """Vectorised :func:`normalize_phone`: same result cell by cell, ``<NA>`` where invalid."""
    return _with_scalar_fallback(_as_str_series(values), _phone_fast, normalize_phone)


def normalize_email_series(values: pd.Series) -> pd.Series:
    """Vectorised :func:`normalize_email`: same result cell by cell, ``<NA>`` where invalid."""
    return _with_scalar_fallback(_only_strings(values), _email_fast, normalize_email)


def normalize_device_id_series(values: pd.Series) -> pd.Series:
    """Vectorised :func:`normalize_device_id`: same result cell by cell, ``<NA>`` if invalid."""
    return _with_scalar_fallback(_only_strings(values), _device_fast, normalize_device_id)


SERIES_NORMALIZERS: dict[IdKind, Callable[[pd.Series], pd.Series]] = {
    "phone": normalize_phone_series,
    "email": normalize_email_series,
    "device_id": normalize_device_id_series,
}


@dataclass(frozen=True)
class ColumnReport:
    """Counts for one identifier column: never the values themselves."""

    column: str
    kind: IdKind
    rows: int
    valid: int
    missing: int
    invalid: int

    def as_dict(self) -> dict[str, object]:
        return {
            "column": self.column,
            "kind": self.kind,
            "rows": self.rows,
            "valid": self.valid,
            "missing": self.missing,
            "invalid": self.invalid,
        }


def normalize_series(
    kind: IdKind, values: pd.Series, column: str = ""
) -> tuple[pd.Series, ColumnReport]:
    """Normalise a column; return the normalised values (``<NA>`` where invalid) and counts.

    ``missing`` counts empty cells (null, NaN or whitespace only); ``invalid`` counts cells
    that held something (of any type) that is not a valid identifier of ``kind``.
    """
    if kind not in SERIES_NORMALIZERS:
        raise ValueError(f"unknown identifier kind {kind!r}; expected one of {ID_KINDS}")
    out = SERIES_NORMALIZERS[kind](values).astype("string")
    blank = (_only_strings(values).str.strip(WHITESPACE) == "").fillna(False).astype(bool)
    missing = int((values.isna().to_numpy(dtype=bool) | blank.to_numpy(dtype=bool)).sum())
    valid = int(out.notna().sum())
    report = ColumnReport(
        column=column or kind,
        kind=kind,
        rows=len(values),
        valid=valid,
        missing=missing,
        invalid=len(values) - valid - missing,
    )
    return out, report


def normalize_frame(
    frame: pd.DataFrame, id_columns: dict[str, IdKind]
) -> tuple[pd.DataFrame, list[ColumnReport]]:
    """Return a copy of ``frame`` with each id column normalised, plus a report per column."""
    out = frame.copy()
    reports: list[ColumnReport] = []
    for column, kind in id_columns.items():
        if column not in frame.columns:
            raise KeyError(column)
        out[column], report = normalize_series(kind, frame[column], column)
        reports.append(report)
    return out, reports


def infer_kind(column: str) -> IdKind:
    """Map a column name such as ``phone``, ``email`` or ``device_id_2`` to its kind."""
    name = column.lower()
    for kind in ID_KINDS:
        if name == kind or name.startswith(kind + "_") or name.startswith(kind):
            return kind
    if "mobile" in name or "tel" in name:
        return "phone"
    if "mail" in name:
        return "email"
    if "device" in name or name in {"idfa", "oaid", "imei", "android_id"}:
        return "device_id"
    raise ValueError(
        f"cannot tell which identifier kind column {column!r} holds; "
        f"name it after one of {', '.join(ID_KINDS)}"
    )
