"""Identifier normalisation shared by every party.

Matching only works if all three parties turn the same person's identifiers into the
same bytes, so these rules are part of the protocol: change them and every party must
change together (bump ``RULES_VERSION``).

Rules (``RULES_VERSION`` 1):

- **phone**: Chinese mobile numbers to E.164 (``+86`` followed by 11 digits starting
  ``1[3-9]``). Spaces, dashes, dots, brackets and stray whitespace are dropped; a
  ``+86``, ``0086`` or ``86`` country prefix is accepted. Anything else is invalid.
- **email**: trimmed and lower-cased; must be ``local@domain.tld`` with no whitespace.
- **device_id**: trimmed, lower-cased, separators (``-``, ``:``, spaces) removed; must then
  be 14 to 64 characters of ``[0-9a-z]`` and not all zeros (an all-zero advertising id
  means "tracking limited", not a device).

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

_PHONE_STRIP = re.compile(r"[\s\-\.\(\)\u3000]")
_PHONE_BODY = re.compile(r"1[3-9]\d{9}")
_EMAIL = re.compile(r"[^@\s]+@[^@\s]+\.[^@\s.]+")
_DEVICE_STRIP = re.compile(r"[\s\-:]")
_DEVICE_BODY = re.compile(r"[0-9a-z]{14,64}")
_ZEROS = re.compile(r"0+")


def normalize_phone(value: object) -> str | None:
    """Return the E.164 form of a Chinese mobile number, or ``None`` if it is not one."""
    text = _coerce(value)
    if text is None:
        return None
    s = _PHONE_STRIP.sub("", text.strip())
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
    s = value.strip().lower()
    return s if _EMAIL.fullmatch(s) else None


def normalize_device_id(value: object) -> str | None:
    """Return the canonical device id (lower-case, no separators), or ``None``."""
    if not isinstance(value, str):
        return None
    s = _DEVICE_STRIP.sub("", value.strip().lower())
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


def normalize_phone_series(values: pd.Series) -> pd.Series:
    s = _as_str_series(values).str.strip().str.replace(_PHONE_STRIP.pattern, "", regex=True)
    s = s.str.replace(r"^(?:\+86|0086)", "", regex=True)
    drop86 = s.str.startswith("86") & (s.str.len() == 13)
    s = s.where(~drop86.fillna(False).astype(bool), s.str.slice(2))
    ok = s.str.fullmatch(_PHONE_BODY.pattern).fillna(False).astype(bool)
    return ("+86" + s).where(ok, None)


def normalize_email_series(values: pd.Series) -> pd.Series:
    s = _as_str_series(values).str.strip().str.lower()
    ok = s.str.fullmatch(_EMAIL.pattern).fillna(False).astype(bool)
    return s.where(ok, None)


def normalize_device_id_series(values: pd.Series) -> pd.Series:
    s = _as_str_series(values).str.strip().str.lower()
    s = s.str.replace(_DEVICE_STRIP.pattern, "", regex=True)
    ok = s.str.fullmatch(_DEVICE_BODY.pattern).fillna(False).astype(bool)
    zeros = s.str.fullmatch(_ZEROS.pattern).fillna(False).astype(bool)
    return s.where(ok & ~zeros, None)


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


def normalize_series(kind: IdKind, values: pd.Series, column: str = "") -> tuple[pd.Series, ColumnReport]:
    """Normalise a column; return the normalised values (``<NA>`` where invalid) and counts.

    ``missing`` counts empty cells (null or whitespace only); ``invalid`` counts cells that
    held something that is not a valid identifier of ``kind``.
    """
    if kind not in SERIES_NORMALIZERS:
        raise ValueError(f"unknown identifier kind {kind!r}; expected one of {ID_KINDS}")
    out = SERIES_NORMALIZERS[kind](values).astype("string")
    raw = _as_str_series(values).str.strip()
    missing = int((raw.isna() | (raw == "")).sum())
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

