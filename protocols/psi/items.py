"""Packed PSI items: many byte strings in one buffer, without one Python object per item.

A PSI party holds up to tens of millions of normalised identifiers. As a list of ``bytes``
each costs ~50-60 bytes of object header and list slot on top of its text, which at 10^7
items is most of a node's memory. :class:`PackedItems` keeps them the way Arrow keeps a
binary column: one ``uint8`` buffer and ``n + 1`` offsets, plus an optional constant
prefix (the multi-key kind tag), so item ``i`` is ``prefix + data[offsets[i]:offsets[i+1]]``.
A caller can wrap an Arrow column's buffers without copying them.

The role objects (:mod:`protocols.psi.roles`) take either a list of ``bytes`` or a
:class:`PackedItems`; they materialise ``bytes`` only for the bucket whose job they are
building (:meth:`PackedItems.take`), a few thousand at a time.

:func:`count_distinct` counts distinct items through 64-bit BLAKE2b digests sorted in
numpy (8 bytes per item instead of a set of ``bytes``). It is exact unless two different
items share a digest (probability below ``n^2 / 2^65``: 3e-6 at 10^7 items), and is used
only to size the session's buckets, never for a result.

Pure data handling: no I/O, no state beyond the buffers.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from itertools import pairwise
from typing import overload

import numpy as np

#: items materialised at a time when a whole set is walked (hashing, iteration)
CHUNK = 1 << 16


class PackedItems(Sequence[bytes]):
    """``n`` byte strings: item ``i`` is ``prefix + data[offsets[i]:offsets[i + 1]]``.

    ``data`` is a 1-D ``uint8`` array (or anything :func:`numpy.frombuffer` takes);
    ``offsets`` is a non-decreasing integer array of ``n + 1`` positions into it (int32 or
    int64, as Arrow stores them). Neither is copied; both are only read.
    """

    __slots__ = ("_data", "_offsets", "_prefix")

    def __init__(self, data: object, offsets: np.ndarray, prefix: bytes = b"") -> None:
        buf = data if isinstance(data, np.ndarray) else np.frombuffer(data, dtype=np.uint8)  # type: ignore[call-overload]
        if buf.dtype != np.uint8 or buf.ndim != 1:
            raise ValueError("packed item data must be a 1-D uint8 buffer")
        off = np.asarray(offsets)
        if off.ndim != 1 or len(off) < 1 or off.dtype.kind not in "iu":
            raise ValueError("packed item offsets must be a 1-D integer array of n + 1 positions")
        if len(off) > 1 and (int(off[0]) < 0 or int(off[-1]) > len(buf)
                             or bool((np.diff(off) < 0).any())):
            raise ValueError("packed item offsets must be non-decreasing positions in the data")
        if not isinstance(prefix, bytes):
            raise ValueError("packed item prefix must be bytes")
        self._data = buf
        self._offsets = off
        self._prefix = prefix

    @classmethod
    def from_list(cls, items: Sequence[bytes], prefix: bytes = b"") -> PackedItems:
        """Pack a list of ``bytes`` (one copy of their contents)."""
        lengths = np.fromiter(map(len, items), dtype=np.int64, count=len(items))
        offsets = np.zeros(len(items) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        return cls(np.frombuffer(b"".join(items), dtype=np.uint8), offsets, prefix)

    @property
    def prefix(self) -> bytes:
        return self._prefix

    @property
    def nbytes(self) -> int:
        """Bytes held by the buffers (data as referenced, offsets)."""
        return int(self._offsets[-1] - self._offsets[0]) + self._offsets.nbytes

    def __len__(self) -> int:
        return len(self._offsets) - 1

    @overload
    def __getitem__(self, index: int) -> bytes: ...

    @overload
    def __getitem__(self, index: slice) -> list[bytes]: ...

    def __getitem__(self, index: int | slice) -> bytes | list[bytes]:
        n = len(self)
        if isinstance(index, slice):
            return self.take(np.arange(n, dtype=np.int64)[index])
        if not -n <= index < n:
            raise IndexError("packed item index out of range")
        i = index % n
        lo, hi = int(self._offsets[i]), int(self._offsets[i + 1])
        return self._prefix + self._data[lo:hi].tobytes()

    def __iter__(self) -> Iterator[bytes]:
        for start in range(0, len(self), CHUNK):
            yield from self.range(start, min(len(self), start + CHUNK))

    def range(self, start: int, stop: int) -> list[bytes]:
        """Items ``start..stop-1`` as ``bytes`` (one copy of their span, then slices)."""
        if not 0 <= start <= stop <= len(self):
            raise IndexError("packed item range out of bounds")
        if start == stop:
            return []
        off = self._offsets[start : stop + 1]
        base = int(off[0])
        blob = self._data[base : int(off[-1])].tobytes()
        rel = (off - base).tolist()
        p = self._prefix
        if p:
            return [p + blob[a:b] for a, b in pairwise(rel)]
        return [blob[a:b] for a, b in pairwise(rel)]

    def take(self, indices: np.ndarray) -> list[bytes]:
        """Items at ``indices`` (in that order) as ``bytes``: one vectorised gather of their
        bytes, then one slice per item."""
        idx = np.asarray(indices, dtype=np.int64)
        if len(idx) == 0:
            return []
        starts = self._offsets[idx].astype(np.int64)
        lengths = self._offsets[idx + 1].astype(np.int64) - starts
        ends = np.cumsum(lengths)
        total = int(ends[-1])
        # byte j of the gathered blob comes from data[starts[k] + (j - begin_k)]
        begins = ends - lengths
        src = np.repeat(starts - begins, lengths) + np.arange(total, dtype=np.int64)
        blob = self._data[src].tobytes()
        bounds = [0, *ends.tolist()]
        p = self._prefix
        if p:
            return [p + blob[a:b] for a, b in pairwise(bounds)]
        return [blob[a:b] for a, b in pairwise(bounds)]


def as_packed(items: Sequence[bytes] | PackedItems) -> PackedItems:
    """``items`` as :class:`PackedItems` (packed ones are returned as they are)."""
    if isinstance(items, PackedItems):
        return items
    return PackedItems.from_list(items if isinstance(items, list) else list(items))


def chunks(items: Sequence[bytes]) -> Iterator[Sequence[bytes]]:
    """``items`` in runs of :data:`CHUNK` (packed items materialised one run at a time)."""
    for start in range(0, len(items), CHUNK):
        stop = min(len(items), start + CHUNK)
        if isinstance(items, PackedItems):
            yield items.range(start, stop)
        else:
            yield items[start:stop]


def count_distinct(items: Sequence[bytes]) -> int:
    """Distinct items, counted by sorting 64-bit BLAKE2b digests (see the module docstring:
    exact unless two items share a digest; for sizing buckets only)."""
    n = len(items)
    if n == 0:
        return 0
    digests = np.empty(n, dtype=np.uint64)
    new = hashlib.blake2b(digest_size=8).copy

    def one(item: bytes) -> bytes:
        h = new()
        h.update(item)
        return h.digest()

    pos = 0
    for run in chunks(items):
        digests[pos : pos + len(run)] = np.frombuffer(b"".join(map(one, run)), dtype="<u8")
        pos += len(run)
    digests.sort()
    return 1 + int(np.count_nonzero(digests[1:] != digests[:-1]))
