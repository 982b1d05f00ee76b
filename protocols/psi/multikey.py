"""Multi-key matching: a record matches if its phone, email or device id matches.

Pure functions around one bucketed PSI session (:mod:`protocols.psi.roles`) whose items
are ``kind tag || normalised value``, so a phone never matches an email with the same
text and the responder cannot tell which kind an item is (the tag is inside the hash).

How it works:

1. Both parties turn records into items with :func:`requester_items` /
   :func:`responder_items`. The responder attaches to every item a *label*: a fresh random
   8-byte pseudonym of the record it came from (new every session).
2. One PSI session in intersection mode with labels. The requester learns, for each of
   its matched items, the responder's record pseudonym: an edge
   ``(requester row, responder pseudonym, kind)`` (:func:`edges_from_result`).
3. :func:`resolve` makes the matching one-to-one with a documented priority
   **phone > email > device_id**: edges are taken in the order (kind priority, requester
   row tag, responder pseudonym) and an edge is kept only if neither its requester row
   nor its responder record is already matched. The rule is a pure function of the edge
   list, so any party holding the same edges (the requester; the responder only if policy
   sends them back) computes the same result.
4. Per-key counts are reported before resolution (:func:`per_key_counts`, rows matched
   by each kind) and after it (:attr:`Resolution.per_key_counts`, the kind that won).

What each side learns (semi-honest):

- responder: the number of requester items per bucket. With ``pad=True`` every requester
  row contributes exactly three items (missing or duplicate identifiers become random
  dummies that never match), so this is ``3 x rows``, not the per-kind availability.
- requester: which of its rows matched by which kind, and the responder's record
  pseudonym for each matched item, hence which of its matched identifiers belong to the
  same responder record (needed for one-to-one resolution). It also sees the pseudonyms
  of all responder items; with ``pad=True`` on the responder each pseudonym appears
  exactly three times, so they reveal the responder's record count and nothing about
  which records have which kinds. Without padding they reveal how many identifiers each
  responder record has. Pseudonyms are fresh per session: not linkable across sessions.

Nothing here does I/O; values are expected already normalised (cleanroom.identity).
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from protocols.psi.roles import RequesterResult

Kind = Literal["phone", "email", "device_id"]
PRIORITY: tuple[Kind, ...] = ("phone", "email", "device_id")
KIND_TAG: dict[Kind, bytes] = {"phone": b"\x01", "email": b"\x02", "device_id": b"\x03"}
DUMMY_TAG = b"\x00"
LABEL_BYTES = 8

Record = Mapping[str, str | None]


def encode_item(kind: Kind, value: str) -> bytes:
    """The PSI item for one normalised identifier."""
    return KIND_TAG[kind] + value.encode("utf-8")


def _dummy() -> bytes:
    return DUMMY_TAG + secrets.token_bytes(32)


def requester_items(
    records: Sequence[Record], *, pad: bool = True
) -> tuple[list[bytes], list[tuple[int, Kind] | None]]:
    """Items and, for each, its origin ``(row, kind)`` (``None`` for a dummy).

    Duplicate identifiers stay (every row carrying one is matched); the PSI session sends
    each distinct item once. With ``pad`` a missing or duplicate identifier adds a dummy so
    the distinct count is always ``3 x rows``.
    """
    items: list[bytes] = []
    origins: list[tuple[int, Kind] | None] = []
    seen: set[bytes] = set()
    for row, rec in enumerate(records):
        for kind in PRIORITY:
            value = rec.get(kind)
            item = encode_item(kind, value) if value else None
            if item is not None:
                items.append(item)
                origins.append((row, kind))
            if pad and (item is None or item in seen):
                items.append(_dummy())
                origins.append(None)
            if item is not None:
                seen.add(item)
    return items, origins


def responder_items(
    records: Sequence[Record], *, pad: bool = True
) -> tuple[list[bytes], list[bytes], list[bytes]]:
    """Items, their labels (record pseudonyms), and the pseudonym of every record.

    A duplicate identifier (already held by an earlier record) is replaced by a dummy, so
    every item belongs to exactly one record; with ``pad`` missing ones become dummies too.
    """
    pseudonyms: list[bytes] = []
    used: set[bytes] = set()
    while len(pseudonyms) < len(records):
        tag = secrets.token_bytes(LABEL_BYTES)
        if tag not in used:
            used.add(tag)
            pseudonyms.append(tag)
    items: list[bytes] = []
    labels: list[bytes] = []
    seen: set[bytes] = set()
    for row, rec in enumerate(records):
        for kind in PRIORITY:
            value = rec.get(kind)
            item = encode_item(kind, value) if value else None
            if item is not None and item not in seen:
                seen.add(item)
                items.append(item)
                labels.append(pseudonyms[row])
            elif pad:
                items.append(_dummy())
                labels.append(pseudonyms[row])
    return items, labels, pseudonyms


@dataclass(frozen=True, order=True)
class Edge:
    """One per-key match: requester row, responder record pseudonym, kind."""

    row: int
    record: bytes
    kind: Kind


def edges_from_result(
    origins: Sequence[tuple[int, Kind] | None], result: RequesterResult
) -> list[Edge]:
    """Per-key matches from an intersection-mode session run with labels."""
    if result.matched_indices is None or result.labels is None:
        raise ValueError("multi-key matching needs an intersection-mode session with labels")
    edges: list[Edge] = []
    for index in result.matched_indices:
        origin = origins[index]
        if origin is None:  # a dummy cannot match; ignore defensively
            continue
        row, kind = origin
        edges.append(Edge(row, result.labels[index], kind))
    return edges


def per_key_counts(edges: Sequence[Edge]) -> dict[Kind, int]:
    """Distinct requester rows matched by each kind, before one-to-one resolution."""
    rows: dict[Kind, set[int]] = {k: set() for k in PRIORITY}
    for e in edges:
        rows[e.kind].add(e.row)
    return {k: len(v) for k, v in rows.items()}


@dataclass(frozen=True)
class Resolution:
    """One-to-one matching: ``pairs[row] = (record pseudonym, kind that matched)``."""

    pairs: dict[int, tuple[bytes, Kind]]
    per_key_counts: dict[Kind, int]

    @property
    def matched_rows(self) -> list[int]:
        return sorted(self.pairs)


def resolve(edges: Sequence[Edge]) -> Resolution:
    """Greedy one-to-one resolution in (kind priority, row, pseudonym) order."""
    rank = {k: i for i, k in enumerate(PRIORITY)}
    taken_rows: set[int] = set()
    taken_records: set[bytes] = set()
    pairs: dict[int, tuple[bytes, Kind]] = {}
    counts: dict[Kind, int] = dict.fromkeys(PRIORITY, 0)
    for e in sorted(set(edges), key=lambda e: (rank[e.kind], e.row, e.record)):
        if e.row in taken_rows or e.record in taken_records:
            continue
        taken_rows.add(e.row)
        taken_records.add(e.record)
        pairs[e.row] = (e.record, e.kind)
        counts[e.kind] += 1
    return Resolution(pairs, counts)


def plaintext_edges(
    requester: Sequence[Record], responder: Sequence[Record], pseudonyms: Sequence[bytes]
) -> list[Edge]:
    """Reference: the edges a trusted third party would compute from plaintext (tests).

    A responder identifier held by several records belongs to the first of them, as in
    :func:`responder_items`.
    """
    owner: dict[bytes, bytes] = {}
    for row, rec in enumerate(responder):
        for kind in PRIORITY:
            value = rec.get(kind)
            if value:
                owner.setdefault(encode_item(kind, value), pseudonyms[row])
    edges: list[Edge] = []
    for row, rec in enumerate(requester):
        for kind in PRIORITY:
            value = rec.get(kind)
            if value and encode_item(kind, value) in owner:
                edges.append(Edge(row, owner[encode_item(kind, value)], kind))
    return edges
