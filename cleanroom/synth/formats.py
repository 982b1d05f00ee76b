"""Messy identifier formats: how each synthetic party writes phones, emails and device ids.

Real parties never agree on formats, so the generator writes every identifier through
one of the styles below, drawn per row from the party's own mix, and then spoils a few
values beyond repair. Every style is chosen so that :mod:`cleanroom.identity` maps it back
to the clean value (the tests check that property for all styles); the ``INVALID_*`` values
must normalise to nothing.

Functions take and return Arrow string arrays and preserve nulls (a null stays null).
This module generates synthetic data only; it reads no real party's data.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

Formatter = Callable[[pa.Array], pa.Array]


def _join(*parts: pa.Array | str) -> pa.Array:
    """Concatenate arrays and literal strings element-wise (null in -> null out)."""
    args = [pa.scalar(p, pa.string()) if isinstance(p, str) else p for p in parts]
    return pc.binary_join_element_wise(*args, pa.scalar("", pa.string()))


def _cut(values: pa.Array, start: int, stop: int | None = None) -> pa.Array:
    if stop is None:
        return pc.utf8_slice_codeunits(values, start)
    return pc.utf8_slice_codeunits(values, start, stop)


# --- phones: input is the 11-digit national number, e.g. "13812345678" ------------------


def _groups(values: pa.Array, sep: str) -> pa.Array:
    return _join(_cut(values, 0, 3), sep, _cut(values, 3, 7), sep, _cut(values, 7))


PHONE_STYLES: dict[str, Formatter] = {
    "plain": lambda v: v,  # 13812345678
    "e164": lambda v: _join("+86", v),  # +8613812345678
    "plus86_space": lambda v: _join("+86 ", v),  # +86 13812345678
    "plus86_groups": lambda v: _join("+86 ", _groups(v, " ")),  # +86 138 1234 5678
    "plus86_dashed": lambda v: _join("+86-", _groups(v, "-")),  # +86-138-1234-5678
    "intl00": lambda v: _join("0086", v),  # 008613812345678
    "intl00_space": lambda v: _join("0086 ", _groups(v, " ")),  # 0086 138 1234 5678
    "cc86": lambda v: _join("86", v),  # 8613812345678
    "dashed": lambda v: _groups(v, "-"),  # 138-1234-5678
    "spaced": lambda v: _groups(v, " "),  # 138 1234 5678
    "dotted": lambda v: _groups(v, "."),  # 138.1234.5678
    "bracket": lambda v: _join("(+86) ", _groups(v, "-")),  # (+86) 138-1234-5678
    "padded": lambda v: _join("  ", v, " "),  # stray whitespace
    "tab_padded": lambda v: _join("\t", _groups(v, " "), "\t"),
    "ideographic": lambda v: _groups(v, "\u3000"),  # full-width spaces from a CJK IME
}

# --- emails: input is the clean (lower-case, trimmed) address ----------------------------


def _upper_first(values: pa.Array) -> pa.Array:
    return _join(pc.utf8_upper(_cut(values, 0, 1)), _cut(values, 1))


def _upper_domain(values: pa.Array) -> pa.Array:
    parts = pc.split_pattern(values, "@", max_splits=1)
    local = pc.list_element(parts, 0)
    domain = pc.list_element(parts, 1)
    return _join(local, "@", pc.utf8_upper(domain))


EMAIL_STYLES: dict[str, Formatter] = {
    "lower": lambda v: v,
    "upper": pc.utf8_upper,
    "capitalised": _upper_first,
    "upper_domain": _upper_domain,
    "padded": lambda v: _join(" ", v, "  "),
    "trailing_tab": lambda v: _join(v, "\t"),
}

# --- device ids: input is 32 lower-case hex characters -----------------------------------


def _uuid(values: pa.Array) -> pa.Array:
    return _join(
        _cut(values, 0, 8), "-", _cut(values, 8, 12), "-", _cut(values, 12, 16), "-",
        _cut(values, 16, 20), "-", _cut(values, 20),
    )


DEVICE_STYLES: dict[str, Formatter] = {
    "hex": lambda v: v,  # Android OAID style
    "hex_upper": pc.utf8_upper,
    "uuid": _uuid,
    "uuid_upper": lambda v: pc.utf8_upper(_uuid(v)),  # iOS IDFA style
    "padded": lambda v: _join(" ", v, " "),
}

# Values that are not identifiers at all; the generator drops a few of these in.
INVALID_PHONES: tuple[str, ...] = (
    "N/A", "000", "1381234567", "010-12345678", "+1 415 555 0100", "12345678901",
    "138123456789", "unknown", "-",
)
INVALID_EMAILS: tuple[str, ...] = (
    "wang.li at 163.com", "zhang@", "@qq.com", "none", "li na@sina.com", "test@localhost",
)
INVALID_DEVICE_IDS: tuple[str, ...] = (
    "00000000-0000-0000-0000-000000000000", "unknown", "abc123", "null", "0",
)

# Each party's habits: style -> share of rows.
Mix = Mapping[str, float]
PARTY_PHONE_MIX: dict[str, Mix] = {
    "oem": {"plain": 0.35, "plus86_space": 0.15, "spaced": 0.15, "dashed": 0.1, "e164": 0.1,
            "padded": 0.1, "bracket": 0.05},
    "media": {"e164": 0.5, "plus86_dashed": 0.2, "intl00": 0.1, "intl00_space": 0.05,
              "cc86": 0.1, "plain": 0.05},
    "dealer": {"dashed": 0.3, "plus86_groups": 0.2, "plain": 0.2, "padded": 0.08,
               "tab_padded": 0.05, "ideographic": 0.07, "dotted": 0.05, "bracket": 0.05},
}
PARTY_EMAIL_MIX: dict[str, Mix] = {
    "oem": {"lower": 0.5, "capitalised": 0.2, "padded": 0.15, "upper": 0.1, "upper_domain": 0.05},
    "media": {"lower": 0.8, "upper_domain": 0.1, "upper": 0.05, "trailing_tab": 0.05},
}
PARTY_DEVICE_MIX: dict[str, Mix] = {
    "oem": {"uuid_upper": 0.5, "uuid": 0.2, "hex": 0.25, "padded": 0.05},
    "media": {"hex": 0.6, "uuid_upper": 0.25, "hex_upper": 0.15},
}


def apply_styles(
    values: pa.Array, styles: Mapping[str, Formatter], mix: Mix, rng: np.random.Generator
) -> pa.Array:
    """Format each value with a style drawn from ``mix`` (nulls stay null)."""
    names = list(mix)
    probs = np.array([mix[n] for n in names], dtype=np.float64)
    codes = rng.choice(len(names), size=len(values), p=probs / probs.sum())
    pieces: list[pa.Array] = []
    order: list[np.ndarray] = []
    for code, name in enumerate(names):
        rows = np.flatnonzero(codes == code)
        if rows.size:
            pieces.append(styles[name](values.take(pa.array(rows))))
            order.append(rows)
    if not pieces:
        return values
    stacked = pa.concat_arrays([p.cast(pa.string()) for p in pieces])
    inverse = np.empty(len(values), dtype=np.int64)
    inverse[np.concatenate(order)] = np.arange(len(values), dtype=np.int64)
    return stacked.take(pa.array(inverse))


def spoil(
    values: pa.Array, rate: float, invalid: tuple[str, ...], rng: np.random.Generator
) -> tuple[pa.Array, np.ndarray]:
    """Replace about ``rate`` of the non-null values by invalid ones.

    Returns the new array and the boolean mask of spoiled rows.
    """
    present = ~np.asarray(values.is_null().to_numpy(zero_copy_only=False), dtype=bool)
    mask = present & (rng.random(len(values)) < rate)
    count = int(mask.sum())
    if count == 0:
        return values, mask
    bad = pa.array(np.asarray(invalid, dtype=object)[rng.integers(0, len(invalid), count)],
                   type=pa.string())
    return pc.replace_with_mask(values, pa.array(mask), bad), mask
