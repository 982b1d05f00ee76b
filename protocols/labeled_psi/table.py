"""Labeled tables of the anonymous query: the public table, its buckets and deltas, their
byte format, and the owner's private build/update state.

A *table* maps lookup tags (from the OPRF output of an identifier, see
:mod:`protocols.labeled_psi.oprf`) to AES-GCM-encrypted labels. It has a random 16-byte
table id (one per OPRF key) and a version that grows by one with each update. Rows are
kept sorted by tag, so the bucket of a tag, ``floor(u64be(tag[0:8]) / ceil(2^64 / B))``
(a public function of the tag, which is itself an HKDF output), is a contiguous range of
rows, and lookups are a binary search (vectorised with numpy).

Byte format (no pickle; all integers big-endian), a 64-byte header then fixed-size rows::

    offset size field
    0      4    magic            b"CRLT"
    4      1    format version   1
    5      1    kind             1 TABLE, 2 DELTA, 3 BUCKET
    6      1    suite            1 (X25519 / RFC 9380 ELL2 NU / HKDF-SHA-512 / AES-256-GCM)
    7      1    reserved         0
    8      16   table_id
    24     4    version          >= 1
    28     4    aux              TABLE: 0; DELTA: base version; BUCKET: bucket id
    32     4    bucket_count     >= 1
    36     4    min_bucket_size  >= 1 (the anonymity-set target the owner built for)
    40     2    label_size       1..4096 (bytes of label capacity per entry)
    42     6    reserved         0
    48     8    entry_count      entries of the table at ``version``
    56     4    count_a          TABLE/BUCKET: rows; DELTA: removed tags
    60     4    count_b          TABLE/BUCKET: 0;    DELTA: upserted rows

    row    = tag 16 | entry_version u32 | AES-256-GCM(len u16 | label | zero pad) (label_size + 18)
    TABLE  = header | count_a rows (strictly ascending by tag)
    BUCKET = header | count_a rows of bucket ``aux`` (strictly ascending)
    DELTA  = header | count_a removed tags (16 B, strictly ascending)
                    | count_b upserted rows (strictly ascending, entry_version in (base, version])

Parsing is strict and raises :class:`~protocols.errors.RemoteProtocolError`: 400 for a
malformed, truncated or inconsistent blob, 413 for one above the caller's size limit,
409 for a delta that does not apply to the local version.

:class:`OwnerTable` is the owner's private state (OPRF key, which tags belong to which
user, tombstones of removed tags); it never leaves the owner. Nothing here does I/O.
"""

from __future__ import annotations

import math
import secrets
import struct
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

import numpy as np

from protocols.errors import LocalProtocolError, RemoteProtocolError
from protocols.labeled_psi import oprf

MAGIC = b"CRLT"
FORMAT_VERSION = 1
SUITE = 1
HEADER = struct.Struct(">4sBBBB16sIIIIH6sQII")
DEFAULT_MIN_BUCKET_SIZE = 1000
DEFAULT_LABEL_SIZE = 96
DEFAULT_MAX_ENTRIES = 1 << 26
TAG = oprf.TAG_BYTES
_VER_END = TAG + 4
_U64 = np.dtype(">u8")
_U32 = np.dtype(">u4")
_FEW_TAGS = 4


class Kind(IntEnum):
    TABLE = 1
    DELTA = 2
    BUCKET = 3


def row_size(label_size: int) -> int:
    return TAG + 4 + oprf.ciphertext_size(label_size)


def bucket_width(bucket_count: int) -> int:
    """Width of a bucket on the 64-bit tag prefix: ``ceil(2^64 / B)``."""
    return -(-(1 << 64) // bucket_count)


def bucket_of(tag: bytes, bucket_count: int) -> int:
    """The public bucket of a tag."""
    if bucket_count == 1:
        return 0
    return int.from_bytes(tag[:8], "big") // bucket_width(bucket_count)


def _prefix(tags: np.ndarray, start: int) -> np.ndarray:
    """Big-endian uint64 of bytes ``start..start+8`` of every row (as native uint64)."""
    # A strided big-endian view of the 8 columns, converted in one copy.
    return tags[:, start : start + 8].view(_U64).reshape(-1).astype(np.uint64)


def _buckets_of(hi: np.ndarray, bucket_count: int) -> np.ndarray:
    if bucket_count == 1:
        return np.zeros(len(hi), dtype=np.uint64)
    return hi // np.uint64(bucket_width(bucket_count))


def _sorted_rows(rows: np.ndarray) -> np.ndarray:
    if len(rows) < 2:
        return rows
    order = np.lexsort((_prefix(rows, 8), _prefix(rows, 0)))
    return rows[order]


def _strictly_ascending(tags: np.ndarray, hi: np.ndarray | None = None) -> bool:
    """Whether the 16-byte tags of ``tags`` ascend strictly (``hi``: their first 8 bytes as
    :func:`_prefix` gives them, if the caller has it already)."""
    if len(tags) < 2:
        return True
    hi = _prefix(tags, 0) if hi is None else hi
    lo = _prefix(tags, 8)
    up = (hi[1:] > hi[:-1]) | ((hi[1:] == hi[:-1]) & (lo[1:] > lo[:-1]))
    return bool(up.all())


def _duplicate_positions(tags: np.ndarray) -> np.ndarray:
    """Positions (in sorted order) of rows whose tag equals the previous row's."""
    if len(tags) < 2:
        return np.zeros(0, dtype=np.int64)
    same = (tags[1:, :TAG] == tags[:-1, :TAG]).all(axis=1)
    return np.nonzero(same)[0] + 1


def _find(rows: np.ndarray, hi: np.ndarray, tags: Sequence[bytes]) -> np.ndarray:
    """Row index of every tag in sorted ``rows`` (``-1`` if absent); vectorised."""
    out = np.full(len(tags), -1, dtype=np.int64)
    n = len(rows)
    if not tags or n == 0:
        return out
    if len(tags) <= _FEW_TAGS:  # a real-time lookup: one binary search each, no set-up
        for i, tag in enumerate(tags):
            one = int.from_bytes(tag[:8], "big")
            j = int(np.searchsorted(hi, np.uint64(one), side="left"))
            while j < n and int(hi[j]) == one:
                if rows[j, :TAG].tobytes() == tag:
                    out[i] = j
                    break
                j += 1
        return out
    q = np.frombuffer(b"".join(tags), dtype=np.uint8).reshape(-1, TAG)
    qhi = _prefix(q, 0)
    idx = np.searchsorted(hi, qhi, side="left")
    inside = idx < n
    cand = np.where(inside, idx, 0)
    prefix_eq = inside & (hi[cand] == qhi)
    full_eq = prefix_eq & (rows[cand, :TAG] == q).all(axis=1)
    out[full_eq] = cand[full_eq]
    for i in np.nonzero(prefix_eq & ~full_eq)[0].tolist():  # shared 64-bit prefix: scan the run
        j = int(cand[i]) + 1
        while j < n and hi[j] == qhi[i]:
            if bytes(rows[j, :TAG]) == tags[i]:
                out[i] = j
                break
            j += 1
    return out


def _fail(reason: str, status: int = 400) -> RemoteProtocolError:
    return RemoteProtocolError(f"malformed labeled table: {reason}", status_hint=status)


@dataclass(frozen=True)
class _Header:
    kind: Kind
    table_id: bytes
    version: int
    aux: int
    bucket_count: int
    min_bucket_size: int
    label_size: int
    entry_count: int
    count_a: int
    count_b: int

    def pack(self) -> bytes:
        return HEADER.pack(
            MAGIC, FORMAT_VERSION, self.kind, SUITE, 0, self.table_id, self.version, self.aux,
            self.bucket_count, self.min_bucket_size, self.label_size, bytes(6),
            self.entry_count, self.count_a, self.count_b,
        )


def _parse_header(data: bytes, expected: Kind, max_entries: int) -> _Header:
    if not isinstance(data, bytes | bytearray | memoryview):
        raise _fail("not bytes")
    if len(data) < HEADER.size:
        raise _fail(f"truncated header ({len(data)} of {HEADER.size} bytes)")
    (magic, fmt, kind, suite, res1, table_id, version, aux, bucket_count, min_bucket,
     label_size, res6, entry_count, count_a, count_b) = HEADER.unpack_from(data)
    if magic != MAGIC:
        raise _fail("bad magic")
    if fmt != FORMAT_VERSION:
        raise _fail(f"unsupported format version {fmt}")
    if kind != expected:
        raise _fail(f"kind {kind}, expected {int(expected)} ({expected.name})")
    if suite != SUITE:
        raise _fail(f"unknown suite {suite}")
    if res1 or res6 != bytes(6):
        raise _fail("reserved bytes set")
    if version < 1:
        raise _fail("version must be at least 1")
    if bucket_count < 1 or min_bucket < 1:
        raise _fail("bucket_count and min_bucket_size must be at least 1")
    if not 1 <= label_size <= oprf.MAX_LABEL_SIZE:
        raise _fail(f"label_size {label_size} outside 1..{oprf.MAX_LABEL_SIZE}")
    if count_a + count_b > max_entries or (expected is Kind.TABLE and entry_count > max_entries):
        raise _fail(f"{count_a + count_b} rows exceed the limit {max_entries}", 413)
    if bucket_count > max(entry_count, 1):
        raise _fail("more buckets than entries")
    return _Header(Kind(kind), table_id, version, aux, bucket_count, min_bucket, label_size,
                   entry_count, count_a, count_b)


def _rows_from(data: bytes, offset: int, count: int, rsize: int) -> np.ndarray:
    return np.frombuffer(data, dtype=np.uint8, count=count * rsize, offset=offset).reshape(
        count, rsize
    )


def _check_rows(rows: np.ndarray, low_version: int, high_version: int, what: str,
                hi: np.ndarray | None = None) -> None:
    if not _strictly_ascending(rows, hi):
        raise _fail(f"{what} are not strictly ascending by tag")
    if len(rows):
        versions = np.ascontiguousarray(rows[:, TAG:_VER_END]).view(_U32).ravel()
        if bool((versions <= low_version).any()) or bool((versions > high_version).any()):
            raise _fail(f"{what} carry an entry_version outside ({low_version}, {high_version}]")


# --- public objects --------------------------------------------------------------------


class _Rows:
    """Sorted rows with vectorised lookup (shared by tables and buckets)."""

    table_id: bytes
    version: int
    bucket_count: int
    min_bucket_size: int
    label_size: int
    rows: np.ndarray

    def _init_rows(self, rows: np.ndarray, hi: np.ndarray | None = None) -> None:
        self.rows = rows
        if hi is None:
            hi = _prefix(rows, 0) if len(rows) else np.zeros(0, dtype=np.uint64)
        self.hi = hi

    @property
    def row_size(self) -> int:
        return row_size(self.label_size)

    def find(self, tags: Sequence[bytes]) -> np.ndarray:
        """Row index per tag, ``-1`` where absent."""
        return _find(self.rows, self.hi, tags)

    def open(self, pairs: Sequence[tuple[bytes, bytes]]) -> list[bytes | None]:
        """For each ``(tag, label key)``: the decrypted label, or ``None`` if no entry.

        An entry whose tag matches but does not authenticate raises RemoteProtocolError.
        """
        idx = self.find([t for t, _ in pairs])
        out: list[bytes | None] = []
        for (tag, key), i in zip(pairs, idx.tolist(), strict=True):
            if i < 0:
                out.append(None)
                continue
            row = self.rows[i].tobytes()
            ver = int.from_bytes(row[TAG:_VER_END], "big")
            out.append(oprf.open_label(key, self.table_id, ver, tag, row[_VER_END:]))
        return out

    def tags(self) -> list[bytes]:
        data = np.ascontiguousarray(self.rows[:, :TAG]).tobytes()
        return [data[i : i + TAG] for i in range(0, len(data), TAG)]


class Table(_Rows):
    """One immutable version of a labeled table (what batch-mode queriers download)."""

    def __init__(
        self,
        *,
        table_id: bytes,
        version: int,
        bucket_count: int,
        min_bucket_size: int,
        label_size: int,
        rows: np.ndarray,
    ) -> None:
        self.table_id = table_id
        self.version = version
        self.bucket_count = bucket_count
        self.min_bucket_size = min_bucket_size
        self.label_size = label_size
        self._init_rows(rows)
        self._bounds: np.ndarray | None = None

    @property
    def entry_count(self) -> int:
        return len(self.rows)

    def bucket_bounds(self) -> np.ndarray:
        """``B + 1`` row offsets: bucket ``b`` is rows ``bounds[b]:bounds[b + 1]``."""
        if self._bounds is None:
            b = self.bucket_count
            if b == 1:
                self._bounds = np.array([0, self.entry_count], dtype=np.int64)
            else:
                starts = np.arange(b, dtype=np.uint64) * np.uint64(bucket_width(b))
                inner = np.searchsorted(self.hi, starts, side="left").astype(np.int64)
                self._bounds = np.append(inner, self.entry_count)
        return self._bounds

    def bucket_sizes(self) -> np.ndarray:
        return np.diff(self.bucket_bounds())

    def bucket(self, bucket_id: int) -> Bucket:
        if not 0 <= bucket_id < self.bucket_count:
            raise LocalProtocolError(f"bucket {bucket_id} outside 0..{self.bucket_count - 1}")
        bounds = self.bucket_bounds()
        return Bucket(
            table_id=self.table_id, version=self.version, bucket_count=self.bucket_count,
            min_bucket_size=self.min_bucket_size, label_size=self.label_size,
            entry_count=self.entry_count, bucket_id=bucket_id,
            rows=self.rows[bounds[bucket_id] : bounds[bucket_id + 1]],
        )

    def to_bytes(self) -> bytes:
        head = _Header(Kind.TABLE, self.table_id, self.version, 0, self.bucket_count,
                       self.min_bucket_size, self.label_size, self.entry_count,
                       self.entry_count, 0)
        return head.pack() + np.ascontiguousarray(self.rows).tobytes()

    @classmethod
    def from_bytes(cls, data: bytes, *, max_entries: int = DEFAULT_MAX_ENTRIES) -> Table:
        h = _parse_header(data, Kind.TABLE, max_entries)
        if h.aux != 0 or h.count_b != 0 or h.count_a != h.entry_count:
            raise _fail("TABLE header fields are inconsistent")
        rsize = row_size(h.label_size)
        if len(data) != HEADER.size + h.count_a * rsize:
            raise _fail(f"TABLE is {len(data)} bytes, its header says "
                        f"{HEADER.size + h.count_a * rsize}")
        rows = _rows_from(bytes(data), HEADER.size, h.count_a, rsize)
        _check_rows(rows, 0, h.version, "TABLE rows")
        return cls(table_id=h.table_id, version=h.version, bucket_count=h.bucket_count,
                   min_bucket_size=h.min_bucket_size, label_size=h.label_size, rows=rows)

    def apply(self, delta: Delta) -> Table:
        """The next version: ``self`` with ``delta`` applied (RemoteProtocolError if it does
        not fit: 409 for another table or base version, 400 for inconsistent content)."""
        if delta.table_id != self.table_id or delta.label_size != self.label_size:
            raise RemoteProtocolError("delta belongs to another table", status_hint=409)
        if delta.base_version != self.version:
            raise RemoteProtocolError(
                f"delta applies to version {delta.base_version}, local table is version "
                f"{self.version}", status_hint=409)
        if delta.version == self.version:
            return self
        removed = [bytes(t) for t in delta.removed]
        gone = self.find(removed)
        if bool((gone < 0).any()):
            raise _fail("delta removes a tag the table does not hold")
        replaced = self.find(delta.tags_upserted())
        keep = np.ones(self.entry_count, dtype=bool)
        keep[gone] = False
        keep[replaced[replaced >= 0]] = False
        rows = _sorted_rows(np.concatenate([self.rows[keep], delta.upserts]))
        if len(rows) != delta.entry_count:
            raise _fail(f"delta yields {len(rows)} entries, it announces {delta.entry_count}")
        return Table(table_id=self.table_id, version=delta.version,
                     bucket_count=delta.bucket_count, min_bucket_size=delta.min_bucket_size,
                     label_size=self.label_size, rows=rows)


class Bucket(_Rows):
    """The rows of one bucket of one table version (what real-time queriers fetch)."""

    def __init__(
        self,
        *,
        table_id: bytes,
        version: int,
        bucket_count: int,
        min_bucket_size: int,
        label_size: int,
        entry_count: int,
        bucket_id: int,
        rows: np.ndarray,
        hi: np.ndarray | None = None,
    ) -> None:
        self.table_id = table_id
        self.version = version
        self.bucket_count = bucket_count
        self.min_bucket_size = min_bucket_size
        self.label_size = label_size
        self.entry_count = entry_count
        self.bucket_id = bucket_id
        self._init_rows(rows, hi)

    def to_bytes(self) -> bytes:
        head = _Header(Kind.BUCKET, self.table_id, self.version, self.bucket_id,
                       self.bucket_count, self.min_bucket_size, self.label_size,
                       self.entry_count, len(self.rows), 0)
        return head.pack() + np.ascontiguousarray(self.rows).tobytes()

    @classmethod
    def from_bytes(cls, data: bytes, *, max_entries: int = 1 << 20) -> Bucket:
        h = _parse_header(data, Kind.BUCKET, max_entries)
        if h.count_b != 0 or h.aux >= h.bucket_count or h.count_a > h.entry_count:
            raise _fail("BUCKET header fields are inconsistent")
        rsize = row_size(h.label_size)
        if len(data) != HEADER.size + h.count_a * rsize:
            raise _fail("BUCKET length does not match its row count")
        rows = _rows_from(data if isinstance(data, bytes) else bytes(data), HEADER.size,
                          h.count_a, rsize)
        hi = _prefix(rows, 0)
        _check_rows(rows, 0, h.version, "BUCKET rows", hi)
        if len(rows) and bool((_buckets_of(hi, h.bucket_count) != h.aux).any()):
            raise _fail(f"BUCKET {h.aux} holds rows of another bucket")
        return cls(table_id=h.table_id, version=h.version, bucket_count=h.bucket_count,
                   min_bucket_size=h.min_bucket_size, label_size=h.label_size,
                   entry_count=h.entry_count, bucket_id=h.aux, rows=rows, hi=hi)


@dataclass(frozen=True, eq=False)
class Delta:
    """Changes from ``base_version`` to ``version``: removed tags and upserted rows."""

    table_id: bytes
    base_version: int
    version: int
    bucket_count: int
    min_bucket_size: int
    label_size: int
    entry_count: int
    removed: np.ndarray = field(repr=False)  # (m, 16) uint8, ascending
    upserts: np.ndarray = field(repr=False)  # (u, row_size) uint8, ascending

    def tags_upserted(self) -> list[bytes]:
        data = np.ascontiguousarray(self.upserts[:, :TAG]).tobytes()
        return [data[i : i + TAG] for i in range(0, len(data), TAG)]

    def to_bytes(self) -> bytes:
        head = _Header(Kind.DELTA, self.table_id, self.version, self.base_version,
                       self.bucket_count, self.min_bucket_size, self.label_size,
                       self.entry_count, len(self.removed), len(self.upserts))
        return (head.pack() + np.ascontiguousarray(self.removed).tobytes()
                + np.ascontiguousarray(self.upserts).tobytes())

    @classmethod
    def from_bytes(cls, data: bytes, *, max_entries: int = DEFAULT_MAX_ENTRIES) -> Delta:
        h = _parse_header(data, Kind.DELTA, max_entries)
        base = h.aux
        if not 1 <= base <= h.version:
            raise _fail(f"base version {base} outside 1..{h.version}")
        if base == h.version and (h.count_a or h.count_b):
            raise _fail("a delta to the same version must be empty")
        rsize = row_size(h.label_size)
        expected = HEADER.size + h.count_a * TAG + h.count_b * rsize
        if len(data) != expected:
            raise _fail(f"DELTA is {len(data)} bytes, its header says {expected}")
        raw = bytes(data)
        removed = _rows_from(raw, HEADER.size, h.count_a, TAG)
        upserts = _rows_from(raw, HEADER.size + h.count_a * TAG, h.count_b, rsize)
        if not _strictly_ascending(removed):
            raise _fail("removed tags are not strictly ascending")
        _check_rows(upserts, base, h.version, "DELTA upserts")
        both = _sorted_rows(np.concatenate([removed, upserts[:, :TAG]]))
        if len(_duplicate_positions(both)):
            raise _fail("a tag is both removed and upserted")
        return cls(h.table_id, base, h.version, h.bucket_count, h.min_bucket_size,
                   h.label_size, h.entry_count, removed, upserts)


# --- bucket count ----------------------------------------------------------------------


def _sizes(hi_sorted: np.ndarray, bucket_count: int) -> np.ndarray:
    n = len(hi_sorted)
    if bucket_count == 1:
        return np.array([n], dtype=np.int64)
    starts = np.arange(bucket_count, dtype=np.uint64) * np.uint64(bucket_width(bucket_count))
    bounds = np.append(np.searchsorted(hi_sorted, starts, side="left"), n)
    return np.diff(bounds)


def choose_bucket_count(hi_sorted: np.ndarray, min_bucket_size: int) -> int:
    """Largest-found B such that every bucket holds at least ``min_bucket_size`` entries.

    Starts from ``n / (m + 4·sqrt(m))`` (hash buckets are binomial: the smallest of many
    buckets sits a few standard deviations below the mean) and lowers B until the
    smallest bucket is large enough; B = 1 when the table has fewer than ``2m`` entries.
    """
    n = len(hi_sorted)
    m = min_bucket_size
    if n < 2 * m:
        return 1
    b = max(1, min(n // m, int(n / (m + 4 * math.sqrt(m)))))
    while b > 1:
        smallest = int(_sizes(hi_sorted, b).min())
        if smallest >= m:
            return b
        b = max(1, min(b - 1, b * smallest // m))
    return 1


def keep_or_choose_bucket_count(hi_sorted: np.ndarray, min_bucket_size: int, current: int) -> int:
    """On update keep B while every bucket still holds ``m`` entries and buckets have not
    grown past twice the initial target; otherwise choose again."""
    n = len(hi_sorted)
    m = min_bucket_size
    target = m + 4 * math.sqrt(m)
    if current >= 1 and n / current <= 2 * target and int(_sizes(hi_sorted, current).min()) >= m:
        return current
    return choose_bucket_count(hi_sorted, m)


# --- owner side ------------------------------------------------------------------------

UserRef = str
UserRecord = tuple[Sequence[bytes], bytes]
"""``(identifiers, label)``: every identifier of one user (normalised, kind-tagged bytes)
and the opaque label they all point to."""

MapFn = Callable[..., Iterable[Any]]


def build_chunk(args: tuple[bytes, bytes, int, int, Sequence[bytes], Sequence[bytes]]) -> bytes:
    """Picklable single-argument wrapper of :func:`oprf.build_chunk_job` for ``pool.map``."""
    return oprf.build_chunk_job(*args)


class OwnerTable:
    """The owner's private state of one labeled table: OPRF key, user index, versions.

    ``build`` computes every row (one X25519 per identifier) in chunks through ``map_fn``
    (default: the builtin ``map``; pass ``ProcessPoolExecutor(...).map`` to use several
    processes: the chunk jobs are plain picklable functions of bytes). ``update`` makes the
    next version and returns its :class:`Delta`. ``delta_since(v)`` serves a querier that
    holds version ``v``. Never send this object; send ``current`` or deltas.

    Versions only increase and each identifier's row is written at most once per version,
    which keeps AES-GCM nonces (derived from the write version) unique per key. A node
    must persist a version before publishing it and must never republish a version number
    with other content (rebuild under a new table id instead).
    """

    def __init__(
        self,
        *,
        key: bytes,
        table: Table,
        user_tags: dict[UserRef, tuple[bytes, ...]],
    ) -> None:
        self.key = key
        self.current = table
        self._user_tags = user_tags
        self._tag_user: dict[bytes, UserRef] = {
            t: ref for ref, tags in user_tags.items() for t in tags
        }
        # first version of each tag's current presence (rewrites do not change it)
        self._tag_since: dict[bytes, int] = dict.fromkeys(self._tag_user, table.version)
        self._tombstones: list[tuple[np.ndarray, np.ndarray, int]] = []

    @property
    def table_id(self) -> bytes:
        return self.current.table_id

    @property
    def version(self) -> int:
        return self.current.version

    @property
    def user_count(self) -> int:
        return len(self._user_tags)

    @staticmethod
    def _rows_for(
        key: bytes,
        table_id: bytes,
        version: int,
        label_size: int,
        users: Mapping[UserRef, UserRecord],
        map_fn: MapFn | None,
        chunk_size: int,
    ) -> tuple[np.ndarray, list[UserRef], list[int]]:
        """Unsorted rows for ``users``, and the owner and count of rows per user."""
        ids: list[bytes] = []
        labels: list[bytes] = []
        refs: list[UserRef] = []
        counts: list[int] = []
        for ref, record in users.items():
            if not (isinstance(record, tuple) and len(record) == 2):
                raise LocalProtocolError(f"user {ref!r}: expected (identifiers, label)")
            identifiers, label = record
            if not isinstance(label, bytes) or len(label) > label_size:
                raise LocalProtocolError(
                    f"user {ref!r}: label must be bytes of at most {label_size} bytes")
            unique = list(dict.fromkeys(identifiers))
            for i, x in enumerate(unique):
                if not isinstance(x, bytes) or not x:
                    raise LocalProtocolError(f"user {ref!r}: identifier {i} is not non-empty bytes")
            if not unique:
                raise LocalProtocolError(f"user {ref!r} has no identifiers")
            ids.extend(unique)
            labels.extend([label] * len(unique))
            refs.append(ref)
            counts.append(len(unique))
        rsize = row_size(label_size)
        chunks = [
            (key, table_id, version, label_size, ids[i : i + chunk_size],
             labels[i : i + chunk_size])
            for i in range(0, len(ids), chunk_size)
        ]
        packed = b"".join((map_fn or map)(build_chunk, chunks))
        rows = np.frombuffer(packed, dtype=np.uint8).reshape(-1, rsize)
        return rows, refs, counts

    @classmethod
    def build(
        cls,
        users: Mapping[UserRef, UserRecord],
        *,
        label_size: int = DEFAULT_LABEL_SIZE,
        min_bucket_size: int = DEFAULT_MIN_BUCKET_SIZE,
        key: bytes | None = None,
        table_id: bytes | None = None,
        map_fn: MapFn | None = None,
        chunk_size: int = 4096,
    ) -> OwnerTable:
        """Version 1 of a new table (fresh random key and table id unless given)."""
        if not 1 <= label_size <= oprf.MAX_LABEL_SIZE:
            raise LocalProtocolError(f"label_size must be 1..{oprf.MAX_LABEL_SIZE}")
        if min_bucket_size < 1 or chunk_size < 1:
            raise LocalProtocolError("min_bucket_size and chunk_size must be at least 1")
        key = key if key is not None else oprf.new_oprf_key()
        if not oprf.is_clamped(key):
            raise LocalProtocolError("the OPRF key must be a clamped 32-byte X25519 scalar")
        tid = table_id if table_id is not None else secrets.token_bytes(oprf.TABLE_ID_BYTES)
        if len(tid) != oprf.TABLE_ID_BYTES:
            raise LocalProtocolError(f"table_id must be {oprf.TABLE_ID_BYTES} bytes")
        rows, refs, counts = cls._rows_for(key, tid, 1, label_size, users, map_fn, chunk_size)
        user_tags = cls._index(rows, refs, counts)
        rows = cls._sorted_unique(rows, user_tags)
        hi = _prefix(rows, 0) if len(rows) else np.zeros(0, dtype=np.uint64)
        table = Table(table_id=tid, version=1,
                      bucket_count=choose_bucket_count(hi, min_bucket_size),
                      min_bucket_size=min_bucket_size, label_size=label_size, rows=rows)
        return cls(key=key, table=table, user_tags=user_tags)

    @staticmethod
    def _index(
        rows: np.ndarray, refs: list[UserRef], counts: list[int]
    ) -> dict[UserRef, tuple[bytes, ...]]:
        tags = np.ascontiguousarray(rows[:, :TAG]).tobytes()
        out: dict[UserRef, tuple[bytes, ...]] = {}
        pos = 0
        for ref, c in zip(refs, counts, strict=True):
            out[ref] = tuple(tags[(pos + j) * TAG : (pos + j + 1) * TAG] for j in range(c))
            pos += c
        return out

    @staticmethod
    def _sorted_unique(
        rows: np.ndarray, user_tags: Mapping[UserRef, tuple[bytes, ...]]
    ) -> np.ndarray:
        rows = _sorted_rows(rows)
        dup = _duplicate_positions(rows)
        if len(dup):
            tag = bytes(rows[int(dup[0]), :TAG])
            owners = sorted(repr(ref) for ref, tags in user_tags.items() if tag in tags)
            raise LocalProtocolError(
                f"an identifier belongs to more than one user ({', '.join(owners[:2])}); "
                "every identifier must point to exactly one label")
        return rows

    def update(
        self,
        *,
        upsert: Mapping[UserRef, UserRecord] | None = None,
        remove: Iterable[UserRef] = (),
        map_fn: MapFn | None = None,
        chunk_size: int = 4096,
    ) -> Delta:
        """Add or replace users (``upsert``) and remove users; returns the delta to the new
        version (``current`` moves to it). Replacing a user re-encrypts its label under
        every identifier it now has and removes identifiers it no longer has."""
        upsert = dict(upsert or {})
        removing = list(dict.fromkeys(remove))
        for ref in removing:
            if ref not in self._user_tags:
                raise LocalProtocolError(f"cannot remove unknown user {ref!r}")
            if ref in upsert:
                raise LocalProtocolError(f"user {ref!r} is both upserted and removed")
        old = self.current
        version = old.version + 1
        rows, refs, counts = self._rows_for(self.key, old.table_id, version, old.label_size,
                                            upsert, map_fn, chunk_size)
        new_index = self._index(rows, refs, counts)
        rows = self._sorted_unique(rows, new_index)
        affected = set(upsert) | set(removing)
        old_tags = [t for ref in affected for t in self._user_tags.get(ref, ())]
        new_tags = {t for tags in new_index.values() for t in tags}
        for t in new_tags:
            owner = self._tag_user.get(t)
            if owner is not None and owner not in affected:
                raise LocalProtocolError(
                    f"an identifier of user {next(r for r, ts in new_index.items() if t in ts)!r}"
                    f" already belongs to user {owner!r}")
        dropped = [t for t in old_tags if t not in new_tags]
        if dropped:
            since = np.array([self._tag_since[t] for t in dropped], dtype=np.int64)
            tomb = np.frombuffer(b"".join(dropped), dtype=np.uint8).reshape(-1, TAG)
            self._tombstones.append((tomb, since, version))
        idx = old.find(old_tags)
        keep = np.ones(old.entry_count, dtype=bool)
        keep[idx[idx >= 0]] = False
        merged = _sorted_rows(np.concatenate([old.rows[keep], rows]))
        hi = _prefix(merged, 0) if len(merged) else np.zeros(0, dtype=np.uint64)
        bucket_count = keep_or_choose_bucket_count(hi, old.min_bucket_size, old.bucket_count)
        self.current = Table(table_id=old.table_id, version=version, bucket_count=bucket_count,
                             min_bucket_size=old.min_bucket_size, label_size=old.label_size,
                             rows=merged)
        kept_since = {t: self._tag_since[t] for t in old_tags if t in new_tags}
        for ref in affected:
            for t in self._user_tags.pop(ref, ()):
                self._tag_user.pop(t, None)
                self._tag_since.pop(t, None)
        for ref, tags in new_index.items():
            self._user_tags[ref] = tags
            for t in tags:
                self._tag_user[t] = ref
                self._tag_since[t] = kept_since.get(t, version)
        return self.delta_since(old.version)

    def delta_since(self, version: int) -> Delta:
        """Delta from ``version`` (1..current) to the current version."""
        cur = self.current
        if not 1 <= version <= cur.version:
            raise LocalProtocolError(f"no version {version} (current is {cur.version})")
        empty_tags = np.zeros((0, TAG), dtype=np.uint8)
        if version == cur.version:
            return Delta(cur.table_id, version, version, cur.bucket_count, cur.min_bucket_size,
                         cur.label_size, cur.entry_count, empty_tags,
                         np.zeros((0, cur.row_size), dtype=np.uint8))
        versions = np.ascontiguousarray(cur.rows[:, TAG:_VER_END]).view(_U32).ravel()
        upserts = cur.rows[versions > version]
        # removed since ``version``: present at it (since <= version) and dropped after it
        parts = [tags[since <= version] for tags, since, removed_at in self._tombstones
                 if removed_at > version]
        removed = np.concatenate(parts) if parts else empty_tags
        if len(removed):
            present = cur.find([bytes(t) for t in removed])
            removed = _sorted_rows(removed[present < 0])
        return Delta(cur.table_id, version, cur.version, cur.bucket_count, cur.min_bucket_size,
                     cur.label_size, cur.entry_count, removed, upserts)
