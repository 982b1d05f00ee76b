"""Binary label formats carried by the labeled-PSI ("anonymous query") tables.

Three labels, each fixed-length so that a label's size says nothing about its owner:

**Nearest-stores label** (media platform -> OEM, one per media user), version 1,
``6 + 10 * k`` bytes (56 for ``k = 5``), big-endian::

    offset  size  field
    0       1     format version = 1
    1       1     k, stores per list (1..16; 5 in this product)
    2       4     store-list tag (parties.stores.StoreList.tag): the list the positions
                  point into; a label is refused against any other list
    6       5k    home list, nearest first: k entries of
                    uint16 store position in the store list
                    uint24 great-circle distance in units of 10 m (rounded to nearest)
    6+5k    5k    work list, same layout

A list whose location is unknown is written as k entries of ``0xFFFF`` / ``0xFFFFFF``
(all or none). Nothing else is in the label: no identifier, no user id, no coordinate.
A 10 m unit keeps the distance within 5 m of the exact one and covers any distance on
Earth (``0xFFFFFE`` units is 167,772 km).

**Inventory label** (dealer -> OEM, one per store and series), version 1, 2 bytes::

    offset  size  field
    0       1     format version = 1
    1       1     availability level: 0 none, 1 low, 2 available (see parties.dealer)

keyed by the text ``"<store_id>|<series>"``.

**Partial-score label** (media platform or dealer -> OEM, one per host record, for
``lead_score`` standard mode), version 1, 9 bytes, defined by
:func:`protocols.vertical_lr.scoring.encode_partial_label`::

    offset  size  field
    0       1     format version = 1
    1       8     the record's partial score under the host's model slice, signed
                  64-bit big-endian fixed point with 24 fractional bits (2^-24)

keyed by every identifier of the record (``partial_scores`` tables,
:mod:`cleanroom.anonq.tables`); one reserved entry (``tables.ZERO_ROW_ITEM``) holds the
score of an all-zero feature row, used for leads the host does not know.

Decoding is strict: a wrong length, an unknown version, a ``k`` or tag other than the
expected, a position outside the store list, a half-absent list, distances that are not
non-decreasing, a store repeated within a list, or an unknown level raise
:class:`LabelError` naming the field (and the row, for batches). This module does no I/O
and logs nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

import numpy as np
import numpy.typing as npt

from cleanroom.errors import CleanroomError

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]
U8Array = npt.NDArray[np.uint8]

NEAREST_LABEL_VERSION: Final = 1
INVENTORY_LABEL_VERSION: Final = 1
K_DEFAULT: Final = 5
K_MAX: Final = 16
TAG_SIZE: Final = 4
HEADER_SIZE: Final = 2 + TAG_SIZE
ENTRY_SIZE: Final = 5
ABSENT_STORE: Final = 0xFFFF
ABSENT_DISTANCE: Final = 0xFFFFFF
MAX_DISTANCE_UNITS: Final = 0xFFFFFE
UNITS_PER_KM: Final = 100  # 10 m units
INVENTORY_LABEL_SIZE: Final = 2
PARTIAL_SCORE_LABEL_SIZE: Final = 9  # protocols.vertical_lr.scoring.encode_partial_label
INVENTORY_LEVELS: Final = ("none", "low", "available")
KEY_SEPARATOR: Final = "|"


class LabelError(CleanroomError):
    """A label that does not decode under the expected format: names the field (and row)."""

    def __init__(self, message: str, *, field: str, row: int | None = None) -> None:
        self.field = field
        self.row = row
        self.detail = message
        where = f"label field {field!r}" + (f", row {row}" if row is not None else "")
        super().__init__(f"{where}: {message}")


def nearest_label_size(k: int = K_DEFAULT) -> int:
    """Bytes in a nearest-stores label holding ``k`` stores per list."""
    return HEADER_SIZE + 2 * k * ENTRY_SIZE


@dataclass(frozen=True)
class NearestLists:
    """Decoded nearest-store lists for ``n`` labels: positions (-1 absent) and km (nan absent)."""

    home_idx: IntArray
    home_km: FloatArray
    work_idx: IntArray
    work_km: FloatArray

    def __len__(self) -> int:
        return int(self.home_idx.shape[0])

    def row(self, i: int) -> NearestLabel:
        def lst(idx: IntArray, km: FloatArray) -> tuple[tuple[int, float], ...] | None:
            if idx[i, 0] < 0:
                return None
            return tuple((int(a), float(b)) for a, b in zip(idx[i], km[i], strict=True))

        return NearestLabel(home=lst(self.home_idx, self.home_km),
                            work=lst(self.work_idx, self.work_km))


@dataclass(frozen=True)
class NearestLabel:
    """One decoded label: ``(store position, km)`` nearest first, or ``None`` if unknown."""

    home: tuple[tuple[int, float], ...] | None
    work: tuple[tuple[int, float], ...] | None


def _check_tag(tag: bytes) -> None:
    if not isinstance(tag, bytes | bytearray) or len(tag) != TAG_SIZE:
        raise ValueError(f"store-list tag must be {TAG_SIZE} bytes")


def _encode_list(idx: npt.ArrayLike, km: npt.ArrayLike, k: int, n_stores: int,
                 name: str) -> U8Array:
    i = np.asarray(idx, dtype=np.int64)
    d = np.asarray(km, dtype=np.float64)
    if i.ndim != 2 or i.shape[1] != k or d.shape != i.shape:
        raise ValueError(f"{name} positions and km must both have shape (n, {k})")
    n = i.shape[0]
    absent: npt.NDArray[np.bool_] = np.asarray(
        (i < 0).any(axis=1) | ~np.isfinite(d).all(axis=1), dtype=bool)
    ok = ~absent
    if (i[ok] >= n_stores).any():
        raise ValueError(f"{name} store position outside the store list ({n_stores} stores)")
    scaled = np.rint(d[ok] * UNITS_PER_KM)
    if (scaled < 0).any() or (scaled > MAX_DISTANCE_UNITS).any():
        raise ValueError(f"{name} distance outside 0..{MAX_DISTANCE_UNITS / UNITS_PER_KM} km")
    units = np.zeros((n, k), dtype=np.int64)
    units[ok] = scaled.astype(np.int64)
    i = np.where(absent[:, None], ABSENT_STORE, i)
    units = np.where(absent[:, None], ABSENT_DISTANCE, units)
    out = np.empty((n, k, ENTRY_SIZE), dtype=np.uint8)
    out[:, :, 0] = (i >> 8) & 0xFF
    out[:, :, 1] = i & 0xFF
    out[:, :, 2] = (units >> 16) & 0xFF
    out[:, :, 3] = (units >> 8) & 0xFF
    out[:, :, 4] = units & 0xFF
    return out.reshape(n, k * ENTRY_SIZE)


def encode_nearest_labels(
    home_idx: npt.ArrayLike,
    home_km: npt.ArrayLike,
    work_idx: npt.ArrayLike,
    work_km: npt.ArrayLike,
    *,
    store_tag: bytes,
    n_stores: int,
) -> U8Array:
    """Encode ``n`` labels at once; returns a ``(n, nearest_label_size(k))`` uint8 array.

    ``*_idx`` are store positions, shape ``(n, k)``, nearest first (a row with any
    negative position or non-finite km is written as absent); ``*_km`` great-circle km.
    Raises ``ValueError`` for shapes, positions or distances the format cannot hold.
    """
    _check_tag(store_tag)
    hi = np.asarray(home_idx)
    if hi.ndim != 2:
        raise ValueError("home positions must have shape (n, k)")
    k = int(hi.shape[1])
    if not 1 <= k <= K_MAX:
        raise ValueError(f"k must be between 1 and {K_MAX}, got {k}")
    if not 1 <= n_stores <= ABSENT_STORE:
        raise ValueError(f"the store list must hold 1..{ABSENT_STORE} stores")
    home = _encode_list(hi, home_km, k, n_stores, "home")
    work = _encode_list(work_idx, work_km, k, n_stores, "work")
    if home.shape[0] != work.shape[0]:
        raise ValueError("home and work lists differ in length")
    n = home.shape[0]
    out = np.empty((n, nearest_label_size(k)), dtype=np.uint8)
    out[:, 0] = NEAREST_LABEL_VERSION
    out[:, 1] = k
    out[:, 2:HEADER_SIZE] = np.frombuffer(bytes(store_tag), dtype=np.uint8)
    out[:, HEADER_SIZE:HEADER_SIZE + k * ENTRY_SIZE] = home
    out[:, HEADER_SIZE + k * ENTRY_SIZE:] = work
    return out


def encode_nearest_label(
    home: Sequence[tuple[int, float]] | None,
    work: Sequence[tuple[int, float]] | None,
    *,
    store_tag: bytes,
    n_stores: int,
    k: int = K_DEFAULT,
) -> bytes:
    """Encode one label from ``(position, km)`` lists (``None`` for an unknown location)."""

    def arrays(lst: Sequence[tuple[int, float]] | None, name: str) -> tuple[IntArray, FloatArray]:
        if lst is None:
            return np.full((1, k), -1, dtype=np.int64), np.full((1, k), np.nan)
        if len(lst) != k:
            raise ValueError(f"{name} list must hold {k} stores, got {len(lst)}")
        return (np.array([[p for p, _ in lst]], dtype=np.int64),
                np.array([[d for _, d in lst]], dtype=np.float64))

    hi, hk = arrays(home, "home")
    wi, wk = arrays(work, "work")
    return encode_nearest_labels(hi, hk, wi, wk, store_tag=store_tag,
                                 n_stores=n_stores)[0].tobytes()


def _as_matrix(labels: Sequence[bytes] | U8Array, size: int) -> U8Array:
    if isinstance(labels, np.ndarray):
        arr = np.asarray(labels)
        if arr.dtype != np.uint8 or arr.ndim != 2:
            raise LabelError("expected a (n, size) uint8 array", field="length")
        if arr.shape[1] != size:
            raise LabelError(f"expected {size} bytes, got {arr.shape[1]}", field="length",
                             row=1 if arr.shape[0] else None)
        return arr
    for r, lab in enumerate(labels, start=1):
        if not isinstance(lab, bytes | bytearray | memoryview):
            raise LabelError("expected bytes", field="length", row=r)
        if len(lab) != size:
            raise LabelError(f"expected {size} bytes, got {len(lab)}", field="length", row=r)
    if len(labels) == 0:
        return np.zeros((0, size), dtype=np.uint8)
    return np.frombuffer(b"".join(bytes(lab) for lab in labels),
                         dtype=np.uint8).reshape(-1, size)


def _first(mask: npt.NDArray[np.bool_]) -> int:
    return int(np.flatnonzero(mask)[0]) + 1


def _decode_list(block: U8Array, k: int, n_stores: int,
                 name: str) -> tuple[IntArray, FloatArray]:
    e = block.reshape(-1, k, ENTRY_SIZE).astype(np.int64)
    idx = (e[:, :, 0] << 8) | e[:, :, 1]
    units = (e[:, :, 2] << 16) | (e[:, :, 3] << 8) | e[:, :, 4]
    absent_i = idx == ABSENT_STORE
    absent_d = units == ABSENT_DISTANCE
    absent_row = absent_i.all(axis=1) & absent_d.all(axis=1)
    partial = (absent_i | absent_d).any(axis=1) & ~absent_row
    if partial.any():
        raise LabelError("an absent list must mark every entry absent",
                         field=f"{name}_list", row=_first(partial))
    ok = ~absent_row
    bad_pos = ok & (idx >= n_stores).any(axis=1)
    if bad_pos.any():
        raise LabelError(f"store position outside the store list ({n_stores} stores)",
                         field=f"{name}_store", row=_first(bad_pos))
    if k > 1:
        unsorted = ok & (np.diff(units, axis=1) < 0).any(axis=1)
        if unsorted.any():
            raise LabelError("distances must be nearest first", field=f"{name}_km",
                             row=_first(unsorted))
        srt = np.sort(idx, axis=1)
        repeated = ok & (np.diff(srt, axis=1) == 0).any(axis=1)
        if repeated.any():
            raise LabelError("a store appears twice in one list", field=f"{name}_store",
                             row=_first(repeated))
    idx = np.where(absent_row[:, None], -1, idx)
    km = np.where(absent_row[:, None], np.nan, units / UNITS_PER_KM)
    return idx.astype(np.int64), km.astype(np.float64)


def decode_nearest_labels(
    labels: Sequence[bytes] | U8Array,
    *,
    store_tag: bytes,
    n_stores: int,
    k: int = K_DEFAULT,
) -> NearestLists:
    """Decode and check a batch of nearest-stores labels (bytes or a ``(n, size)`` array).

    Raises :class:`LabelError` naming the field and the 1-based row of the first bad label.
    """
    _check_tag(store_tag)
    size = nearest_label_size(k)
    m = _as_matrix(labels, size)
    version = m[:, 0]
    if (bad := version != NEAREST_LABEL_VERSION).any():
        raise LabelError(f"unknown format version (expected {NEAREST_LABEL_VERSION})",
                         field="version", row=_first(bad))
    if (bad := m[:, 1] != k).any():
        raise LabelError(f"expected k = {k}", field="k", row=_first(bad))
    tag = np.frombuffer(bytes(store_tag), dtype=np.uint8)
    if (bad := (m[:, 2:HEADER_SIZE] != tag).any(axis=1)).any():
        raise LabelError("label built against a different store list", field="store_tag",
                         row=_first(bad))
    hi, hk = _decode_list(m[:, HEADER_SIZE:HEADER_SIZE + k * ENTRY_SIZE], k, n_stores, "home")
    wi, wk = _decode_list(m[:, HEADER_SIZE + k * ENTRY_SIZE:], k, n_stores, "work")
    return NearestLists(home_idx=hi, home_km=hk, work_idx=wi, work_km=wk)


def decode_nearest_label(
    label: bytes, *, store_tag: bytes, n_stores: int, k: int = K_DEFAULT
) -> NearestLabel:
    """Decode and check one nearest-stores label (errors carry no row)."""
    try:
        lists = decode_nearest_labels([label], store_tag=store_tag, n_stores=n_stores, k=k)
    except LabelError as exc:
        raise LabelError(exc.detail, field=exc.field) from None
    return lists.row(0)


# --- inventory -----------------------------------------------------------------------


def inventory_key(store_id: str, series: str) -> str:
    """The lookup key of one store and series: ``"<store_id>|<series>"``."""
    if not store_id or not series:
        raise ValueError("store id and series must not be empty")
    if KEY_SEPARATOR in store_id or KEY_SEPARATOR in series:
        raise ValueError(f"store id and series must not contain {KEY_SEPARATOR!r}")
    return f"{store_id}{KEY_SEPARATOR}{series}"


def encode_inventory_label(level: int) -> bytes:
    """The 2-byte inventory label of an availability level (0 none, 1 low, 2 available)."""
    if isinstance(level, bool) or not isinstance(level, int | np.integer) or not (
            0 <= int(level) < len(INVENTORY_LEVELS)):
        raise ValueError(f"availability level must be 0..{len(INVENTORY_LEVELS) - 1}")
    return bytes((INVENTORY_LABEL_VERSION, int(level)))


def decode_inventory_label(label: bytes) -> int:
    """The availability level in a 2-byte inventory label; :class:`LabelError` if malformed."""
    if not isinstance(label, bytes | bytearray | memoryview):
        raise LabelError("expected bytes", field="length")
    raw = bytes(label)
    if len(raw) != INVENTORY_LABEL_SIZE:
        raise LabelError(f"expected {INVENTORY_LABEL_SIZE} bytes, got {len(raw)}",
                         field="length")
    if raw[0] != INVENTORY_LABEL_VERSION:
        raise LabelError(f"unknown format version (expected {INVENTORY_LABEL_VERSION})",
                         field="version")
    if raw[1] >= len(INVENTORY_LEVELS):
        raise LabelError(f"unknown availability level {raw[1]}", field="level")
    return raw[1]
