"""Ledger entry schema (version 1) and its canonical JSON encoding.

Every ledger entry is one JSON object, encoded canonically so that the same event always
gives the same bytes (and therefore the same RFC 6962 leaf hash):

- UTF-8, no whitespace at all (separators ``,`` and ``:``), keys sorted by code point;
- only objects, arrays, strings, integers and booleans: **no floats** (times are integer
  milliseconds, sizes and counts are integers), no ``null`` (an absent optional field is
  left out, not written as ``null``), no NaN/Infinity;
- strings are restricted per field type to ASCII character sets (ids, names, digests),
  so no Unicode normalisation question arises; non-ASCII is written as raw UTF-8,
  never ``\\u`` escapes (``ensure_ascii=False``), although v1 fields cannot contain it.

Every entry carries four envelope fields: ``v`` (schema version, ``1``), ``seq`` (its
index in the log, so a moved or deleted entry is located exactly), ``type`` (the event
type) and ``ts`` (integer milliseconds since the Unix epoch, UTC). Each event type then
has an allow-list of fields with types (see :data:`EVENT_SCHEMAS`); anything else raises
:class:`~cleanroom.ledger.errors.EntrySchemaError` naming the event type and field.

Values are ids, digests, counts, rule ids, timestamps and party names only. String values
are also refused if they *look* raw (a phone number, an email address, a device id,
coordinates): :func:`find_raw_looking` is the scanner, usable by tests on every entry a
run wrote. Ids should be made with :func:`new_id` (``q-`` + 16 base32 characters), which
never looks like a device id; a bare UUID or 32-hex token does, and is refused.

This module does no I/O and never logs values.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import json
import re
import secrets
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any, Final

from cleanroom.ledger.errors import EntrySchemaError

SCHEMA_VERSION: Final = 1

ENVELOPE_FIELDS: Final = ("v", "seq", "type", "ts")


class FieldType(Enum):
    """Kinds of values an entry field may hold."""

    ID = "id"  # query, session, request ids: [A-Za-z0-9][A-Za-z0-9._:/-]{0,127}
    NAME = "name"  # party, protocol, dataset, rule, field, round names (same charset)
    NAME_LIST = "name_list"  # a short list (1..64) of distinct names, e.g. counterparties
    DIGEST = "digest"  # "sha256:" + 64 lower-case hex
    COUNT = "count"  # integer >= 0 (rows, bytes, messages, sizes)
    TIMESTAMP = "timestamp"  # integer milliseconds since the epoch, >= 0
    ENUM = "enum"  # one of a fixed set of names


@dataclass(frozen=True)
class FieldSpec:
    """One allowed field: its type, whether it is required, and (for ENUM) its values."""

    type: FieldType
    required: bool = True
    choices: tuple[str, ...] = ()


def _r(t: FieldType, *choices: str) -> FieldSpec:
    return FieldSpec(t, True, choices)


def _o(t: FieldType, *choices: str) -> FieldSpec:
    return FieldSpec(t, False, choices)


ID, NAME, NAMES, DIGEST, COUNT, TS, ENUM = (
    FieldType.ID,
    FieldType.NAME,
    FieldType.NAME_LIST,
    FieldType.DIGEST,
    FieldType.COUNT,
    FieldType.TIMESTAMP,
    FieldType.ENUM,
)

QUERY_TYPES: Final = (
    "match",
    "segment_stats",
    "train_lead_model",
    "lead_score",
    "store_recommendation",
)

#: Allow-list of fields per event type (envelope fields excluded). Removing or retyping a
#: field, or adding a required one, is a schema change: bump SCHEMA_VERSION. Adding an
#: *optional* field keeps version 1 (every old entry stays valid; readers older than the
#: addition refuse entries that use it). Document every change in docs/ledger.md.
EVENT_SCHEMAS: Final[Mapping[str, Mapping[str, FieldSpec]]] = {
    "query_proposed": {
        "query_id": _r(ID),
        "query_type": _r(ENUM, *QUERY_TYPES),
        "requester": _r(NAME),
        "counterparties": _r(NAMES),
        "purpose": _r(NAME),
        "spec_digest": _r(DIGEST),
        "receiver": _o(NAME),
    },
    "policy_decision": {
        "query_id": _r(ID),
        "party": _r(NAME),
        "peer": _o(NAME),
        "decision": _r(ENUM, "approved", "denied", "held"),
        "rule_id": _r(NAME),
        "field": _o(NAME),
        "policy_digest": _o(DIGEST),
        # privacy budget the query asks for, which an approval reserves (thousandths of ε)
        "epsilon_milli": _o(COUNT),
        "charged_to": _o(NAME),  # the party whose budget that reservation is held against
    },
    "human_approval": {
        "query_id": _r(ID),
        "approver": _r(ID),
        "decision": _r(ENUM, "approved", "denied"),
        "peer": _o(NAME),
    },
    "session_started": {
        "query_id": _r(ID),
        "session_id": _r(ID),
        "protocol": _r(NAME),
        "peer": _r(NAME),
        "role": _o(NAME),
    },
    "session_ended": {
        "query_id": _r(ID),
        "session_id": _r(ID),
        "protocol": _r(NAME),
        "peer": _r(NAME),
        "outcome": _r(ENUM, "ok", "failed", "cancelled"),
        "messages_sent": _o(COUNT),
        "messages_received": _o(COUNT),
        "bytes_sent": _o(COUNT),
        "bytes_received": _o(COUNT),
    },
    "message_sent": {
        "query_id": _r(ID),
        "session_id": _r(ID),
        "protocol": _r(NAME),
        "peer": _r(NAME),
        "round": _r(NAME),
        "digest": _r(DIGEST),
        "size": _r(COUNT),
    },
    "message_received": {
        "query_id": _r(ID),
        "session_id": _r(ID),
        "protocol": _r(NAME),
        "peer": _r(NAME),
        "round": _r(NAME),
        "digest": _r(DIGEST),
        "size": _r(COUNT),
    },
    "result_delivered": {
        "query_id": _r(ID),
        "receiver": _r(NAME),
        "digest": _r(DIGEST),
        "rows": _r(COUNT),
        "size": _o(COUNT),
        "epsilon_milli": _o(COUNT),  # privacy budget charged, in thousandths of epsilon
        "charged_to": _o(NAME),  # the party whose budget epsilon_milli is charged to
    },
    "query_failed": {
        "query_id": _r(ID),
        "error_code": _r(NAME),
        "stage": _o(NAME),
        "peer": _o(NAME),
    },
    "query_cancelled": {
        "query_id": _r(ID),
        "by": _r(NAME),
        "reason_code": _o(NAME),
        "peer": _o(NAME),
    },
    "dataset_registered": {
        "dataset": _r(NAME),
        "version": _r(NAME),
        "digest": _r(DIGEST),
        "rows": _r(COUNT),
        "invalid_rows": _o(COUNT),
        "columns": _o(COUNT),
    },
    "policy_changed": {
        "digest": _r(DIGEST),
        "previous_digest": _o(DIGEST),
        "policy_version": _o(COUNT),
    },
    "key_rotated": {
        "key_kind": _r(NAME),
        "new_key": _r(DIGEST),
        "old_key": _o(DIGEST),
    },
    "checkpoint_cosigned": {
        "peer": _r(NAME),
        "origin": _r(NAME),
        "size": _r(COUNT),
        "root": _r(DIGEST),
        "cosigned_at": _o(TS),
    },
    "witness_alarm": {
        "peer": _r(NAME),
        "origin": _r(NAME),
        "reason": _r(ENUM, "inconsistent", "fork", "bad_signature", "rollback", "bad_proof"),
        "old_size": _o(COUNT),
        "old_root": _o(DIGEST),
        "new_size": _o(COUNT),
        "new_root": _o(DIGEST),
        "evidence": _o(DIGEST),
    },
}

EVENT_TYPES: Final = tuple(EVENT_SCHEMAS)

#: Fields whose values are party names; a filter by peer matches any of them.
PARTY_FIELDS: Final = ("peer", "party", "requester", "receiver", "counterparties", "charged_to")

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/\-]{0,127}")
_DIGEST_RE = re.compile(r"sha256:[0-9a-f]{64}")
_MAX_INT = 2**63 - 1

# --- raw-data detection -------------------------------------------------------------------

_DIGEST_TOKEN = re.compile(r"sha256:[0-9a-f]{64}")
_RAW_PATTERNS: Final[tuple[tuple[str, re.Pattern[str]], ...]] = (
    ("email", re.compile(r"[^@\s\"]+@[^@\s\"]+\.[A-Za-z]{2,}")),
    (
        "phone",
        re.compile(r"(?<!\d)(?:\+?86[\s.\-]?|0086[\s.\-]?)?1[3-9]\d[\s.\-]?\d{4}[\s.\-]?\d{4}(?!\d)"),
    ),
    (
        "device_id",
        re.compile(r"(?i)(?<![0-9a-z])[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"),
    ),
    (
        "device_id",
        re.compile(r"(?i)(?<![0-9a-z])(?=[0-9a-f]*[a-f])(?=[0-9a-f]*\d)[0-9a-f]{16,64}(?![0-9a-z])"),
    ),
    ("device_id", re.compile(r"(?<!\d)\d{14,}(?!\d)")),  # IMEI / MEID / long numeric ids
    ("coordinates", re.compile(r"-?\d{1,3}\.\d{3,}\s*[,; ]\s*-?\d{1,3}\.\d{3,}")),
    ("coordinates", re.compile(r"(?<![\d.])-?\d{1,3}\.\d{4,}(?![\d.])")),
)


# One search per string instead of one per pattern (the kind is looked up after a hit).
def _scoped(regex: str) -> str:
    """A pattern usable inside an alternation: a leading global ``(?i)`` made local."""
    return f"(?i:{regex[4:]})" if regex.startswith("(?i)") else f"(?:{regex})"


_RAW_ANY: Final = re.compile("|".join(_scoped(pattern.pattern) for _kind, pattern in _RAW_PATTERNS))


def _raw_kind_uncached(text: str) -> str | None:
    cleaned = _DIGEST_TOKEN.sub(" ", text)
    if _RAW_ANY.search(cleaned) is None:
        return None
    return next(kind for kind, pattern in _RAW_PATTERNS if pattern.search(cleaned))


_raw_kind_cached = functools.lru_cache(maxsize=8192)(_raw_kind_uncached)


def _raw_kind(text: str) -> str | None:
    """The kind of the first raw-data pattern found in ``text`` (digests removed), else
    None. Short strings are cached: entries repeat the same names (peers, protocols, query
    ids) again and again."""
    return _raw_kind_cached(text) if len(text) <= 256 else _raw_kind_uncached(text)


def find_raw_looking(value: object) -> list[tuple[str, str]]:
    """Return ``(kind, path)`` pairs for every string in ``value`` that looks like raw data.

    ``kind`` is ``phone``, ``email``, ``device_id`` or ``coordinates``; ``path`` is a JSON
    path-like location (``$.peer``, ``$.counterparties[1]``). The matched text itself is
    never returned, so callers may log the result. Digests (``sha256:<hex>``) are skipped.
    Works on decoded entries, on raw entry bytes and on any nested JSON-like value. Floats
    are always reported as ``coordinates``: entries never hold floats.
    """
    found: list[tuple[str, str]] = []

    def walk(v: object, path: str) -> None:
        if isinstance(v, bytes | bytearray):
            walk(bytes(v).decode("utf-8", "replace"), path)
        elif isinstance(v, str):
            kind = _raw_kind(v)
            if kind is not None:
                found.append((kind, path))
        elif isinstance(v, float):
            found.append(("coordinates", path))
        elif isinstance(v, Mapping):
            for k, item in v.items():
                walk(str(k), f"{path}<key>")
                walk(item, f"{path}.{k}")
        elif isinstance(v, list | tuple):
            for i, item in enumerate(v):
                walk(item, f"{path}[{i}]")

    walk(value, "$")
    return found


# --- canonical JSON -----------------------------------------------------------------------


_FLAT: Final = frozenset({str, int, bool})


def canonical_json(obj: Mapping[str, Any]) -> bytes:
    """Encode ``obj`` canonically (see the module docstring). Refuses floats and ``None``."""

    def check(v: object, path: str) -> None:
        if isinstance(v, bool | int | str):
            return
        if isinstance(v, float) or v is None:
            raise EntrySchemaError(f"{path}: {type(v).__name__} is not allowed in canonical JSON")
        if isinstance(v, Mapping):
            for k, item in v.items():
                if not isinstance(k, str):
                    raise EntrySchemaError(f"{path}: object keys must be strings")
                check(item, f"{path}.{k}")
            return
        if isinstance(v, list | tuple):
            for i, item in enumerate(v):
                check(item, f"{path}[{i}]")
            return
        raise EntrySchemaError(f"{path}: {type(v).__name__} is not allowed in canonical JSON")

    # Most entries are flat objects of strings and integers: checked without building a
    # path per value; anything else takes the walk that names where it went wrong.
    if not all(type(k) is str and type(v) in _FLAT for k, v in obj.items()):
        check(obj, "$")
    return json.dumps(
        obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode("utf-8")


def digest(data: bytes) -> str:
    """The ledger's digest notation for ``data``: ``sha256:`` + 64 lower-case hex."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


def digest_of_hash(raw32: bytes) -> str:
    """Write an existing 32-byte hash (e.g. a Merkle root) in digest notation."""
    if len(raw32) != 32:
        raise ValueError("a hash must be 32 bytes")
    return "sha256:" + raw32.hex()


def new_id(prefix: str = "q") -> str:
    """A fresh random id like ``q-mfrggzdfmztwq2lk`` (80 bits, base32, never device-id-like)."""
    if not _NAME_RE.fullmatch(prefix) or len(prefix) > 32:
        raise ValueError("id prefix must be a short name")
    while True:
        token = base64.b32encode(secrets.token_bytes(10)).decode("ascii").lower()
        candidate = f"{prefix}-{token}"
        if not find_raw_looking(candidate):
            return candidate


def now_ms() -> int:
    """Current time as integer milliseconds since the epoch (the ``ts`` field)."""
    return time.time_ns() // 1_000_000


# --- validation ---------------------------------------------------------------------------


_NAME_RULE: Final = "1-128 characters of A-Z a-z 0-9 . _ : / - required"


_ACCEPTED_NAMES: dict[str, None] = {}  # values that passed; never a rejected (raw) one
_ACCEPTED_MAX: Final = 8192


def _name_problem(value: str, what: str) -> str | None:
    """What is wrong with the value of an id or name field (``what``: "id" or "name"), else
    None. Accepted values are remembered (peers, protocols, rounds and query ids repeat
    from entry to entry); rejected ones, which may be raw data, are not kept."""
    if value in _ACCEPTED_NAMES:
        return None
    if not _NAME_RE.fullmatch(value):  # at most 128 characters
        return f"not a valid {what}: {_NAME_RULE}"
    kind = _raw_kind_uncached(value)
    if kind is not None:
        return f"value looks like raw data ({kind}); ledger entries hold ids only"
    if len(_ACCEPTED_NAMES) >= _ACCEPTED_MAX:
        _ACCEPTED_NAMES.clear()
    _ACCEPTED_NAMES[value] = None
    return None


def _check_value(event_type: str, name: str, spec: FieldSpec, value: object) -> None:
    def fail(msg: str) -> None:
        raise EntrySchemaError(msg, event_type=event_type, field=name)

    t = spec.type
    if t in (FieldType.ID, FieldType.NAME, FieldType.ENUM):
        if not isinstance(value, str):
            fail(f"expected a string ({t.value}), got {type(value).__name__}")
        assert isinstance(value, str)
        if t is FieldType.ENUM:
            if value not in spec.choices:
                fail(f"value is not one of {', '.join(spec.choices)}")
            return
        problem = _name_problem(value, t.value)
        if problem is not None:
            fail(problem)
    elif t is FieldType.NAME_LIST:
        if not isinstance(value, list | tuple) or not 1 <= len(value) <= 64:
            fail("expected a list of 1 to 64 names")
        assert isinstance(value, list | tuple)
        if len(set(value)) != len(value):
            fail("names in the list must be distinct")
        for item in value:
            _check_value(event_type, name, FieldSpec(FieldType.NAME), item)
    elif t is FieldType.DIGEST:
        if not isinstance(value, str) or not _DIGEST_RE.fullmatch(value):
            fail("expected a digest 'sha256:' + 64 lower-case hex characters")
    elif t in (FieldType.COUNT, FieldType.TIMESTAMP):
        if isinstance(value, bool) or not isinstance(value, int):
            fail(f"expected an integer ({t.value}), got {type(value).__name__}")
        assert isinstance(value, int)
        if not 0 <= value <= _MAX_INT:
            fail("integer out of range 0 .. 2^63-1")
    else:  # pragma: no cover - exhaustive over FieldType
        fail(f"unknown field type {t}")


def validate_event(event_type: str, fields: Mapping[str, object]) -> dict[str, object]:
    """Check ``fields`` against the allow-list of ``event_type``; return a clean copy.

    Raises :class:`EntrySchemaError` naming the event type and field on any unknown field,
    missing required field, wrong type or raw-looking value.
    """
    schema = EVENT_SCHEMAS.get(event_type)
    if schema is None:
        raise EntrySchemaError(
            f"unknown event type; allowed: {', '.join(EVENT_TYPES)}", event_type=event_type
        )
    clean: dict[str, object] = {}
    for name, value in fields.items():
        spec = schema.get(name)
        if spec is None:
            raise EntrySchemaError("field is not allowed for this event type",
                                   event_type=event_type, field=name)
        if value is None:
            if spec.required:
                raise EntrySchemaError("required field is None", event_type=event_type,
                                       field=name)
            continue
        _check_value(event_type, name, spec, value)
        clean[name] = list(value) if isinstance(value, tuple) else value
    for name, spec in schema.items():
        if spec.required and name not in clean:
            raise EntrySchemaError("required field is missing", event_type=event_type,
                                   field=name)
    return clean


@dataclass(frozen=True)
class Event:
    """An event to append: its type, its fields, and optionally its time (ms).

    ``ts_ms=None`` means "now" at append time. Build with ``Event("message_sent", {...})``
    or the keyword helper :func:`event`. Fields are validated on construction.
    """

    type: str
    fields: Mapping[str, object]
    ts_ms: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "fields", validate_event(self.type, self.fields))
        if self.ts_ms is not None:
            _check_value(self.type, "ts", FieldSpec(FieldType.TIMESTAMP), self.ts_ms)


def event(event_type: str, *, ts_ms: int | None = None, **fields: object) -> Event:
    """Keyword form: ``event("result_delivered", query_id=q, receiver="oem", ...)``."""
    return Event(event_type, fields, ts_ms)


def encode_entry(ev: Event, seq: int, ts_ms: int) -> bytes:
    """The canonical bytes of ``ev`` stored at index ``seq`` (its Merkle leaf input)."""
    body: dict[str, object] = dict(ev.fields)
    body["v"] = SCHEMA_VERSION
    body["seq"] = seq
    body["type"] = ev.type
    body["ts"] = ts_ms
    return canonical_json(body)


@dataclass(frozen=True)
class Entry:
    """A decoded, schema-checked ledger entry."""

    seq: int
    type: str
    ts_ms: int
    fields: Mapping[str, object]

    def parties(self) -> list[str]:
        """Every party name the entry mentions (for peer filters)."""
        out: list[str] = []
        for f in PARTY_FIELDS:
            v = self.fields.get(f)
            if isinstance(v, str):
                out.append(v)
            elif isinstance(v, list):
                out.extend(str(x) for x in v)
        return out

    @property
    def query_id(self) -> str | None:
        q = self.fields.get("query_id")
        return q if isinstance(q, str) else None

    def as_dict(self) -> dict[str, object]:
        d = dict(self.fields)
        d.update({"v": SCHEMA_VERSION, "seq": self.seq, "type": self.type, "ts": self.ts_ms})
        return d


def decode_entry(data: bytes) -> Entry:
    """Parse and fully check stored entry bytes: JSON, canonical form, envelope and schema."""
    try:
        obj = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise EntrySchemaError(f"not valid UTF-8 JSON ({exc.__class__.__name__})") from None
    if not isinstance(obj, dict):
        raise EntrySchemaError("an entry must be a JSON object")
    if canonical_json(obj) != data:
        raise EntrySchemaError("entry bytes are not in canonical form")
    if obj.get("v") != SCHEMA_VERSION:
        raise EntrySchemaError(f"unsupported schema version; expected {SCHEMA_VERSION}",
                               field="v")
    etype = obj.get("type")
    if not isinstance(etype, str):
        raise EntrySchemaError("missing event type", field="type")
    seq, ts = obj.get("seq"), obj.get("ts")
    for name, val in (("seq", seq), ("ts", ts)):
        if isinstance(val, bool) or not isinstance(val, int) or val < 0:
            raise EntrySchemaError("expected a non-negative integer", event_type=etype,
                                   field=name)
    fields = {k: v for k, v in obj.items() if k not in ENVELOPE_FIELDS}
    clean = validate_event(etype, fields)
    assert isinstance(seq, int) and isinstance(ts, int)
    return Entry(seq=seq, type=etype, ts_ms=ts, fields=clean)


_SEQ_RE = re.compile(rb'"seq":(\d{1,19})[,}]')


def peek_seq(data: bytes) -> int | None:
    """Fast read of the ``seq`` field of stored entry bytes without a JSON parse.

    Sound for entries this module wrote (no string value can contain a quote); used by the
    fast verifier to locate moved or deleted entries. ``None`` if absent.
    """
    m = _SEQ_RE.search(data)
    return int(m.group(1)) if m else None


def scan_entries(bodies: Iterable[bytes]) -> list[tuple[int, str, str]]:
    """Scan stored entry bytes for raw-looking data: ``(position, kind, path)`` per hit."""
    hits: list[tuple[int, str, str]] = []
    for pos, data in enumerate(bodies):
        try:
            obj: object = json.loads(data)
        except (ValueError, UnicodeDecodeError):
            obj = data
        for kind, path in find_raw_looking(obj):
            hits.append((pos, kind, path))
    return hits
