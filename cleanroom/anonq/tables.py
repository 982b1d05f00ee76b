"""The owner's labeled tables at its node: build, persist, version, update, load for serving.

A table lives in ``DATA_DIR/anonq/tables/<name>/``::

    key                 the OPRF key (32 bytes, file mode 0600; never leaves the node)
    v00000003.table     TABLE blob of each retained version (protocols.labeled_psi format)
    users.arrow         private index for updates: user ref, record digest, its tags
    meta.json           the commit point: table id, current version, parameters, sources

Every file is written to a temporary name, fsynced and renamed; ``meta.json`` is written
last, so a crash leaves the previous version current and a half-written version is never
served (its version number is simply written again, which is safe because it was never
published). A rebuild under a fresh key always gets a fresh table id.

Updates are incremental: each user's record (identifiers and label) has a digest; a new
build compares digests and calls :meth:`protocols.labeled_psi.OwnerTable.update` with the
changed, new and removed users only. Deltas for queriers are the difference between a
retained version and the current one (:class:`ServingSource.delta_since`).

Sources (:func:`nearest_store_users`, :func:`inventory_users`,
:func:`partial_score_users`) turn the node's datasets into ``user -> (identifiers,
label)``; the X25519 work of a build runs in a process pool. A ``partial_scores`` table
(a host's partial scores under its slice of a trained lead model, for ``lead_score``
standard mode) also holds one reserved entry, :data:`ZERO_ROW_ITEM`, whose label is the
host's partial score of an all-zero feature row (what the OEM uses for a lead the host
does not know).
This module never sends anything and never logs identifiers, labels or keys.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import multiprocessing
import os
import re
import tempfile
import threading
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc

from cleanroom.errors import CleanroomError, InputError
from protocols.errors import RemoteProtocolError
from protocols.labeled_psi import Delta, OwnerTable, Table, oprf
from protocols.labeled_psi.table import (
    DEFAULT_MIN_BUCKET_SIZE,
    FORMAT_VERSION,
    HEADER,
    MAGIC,
    SUITE,
    TAG,
    Kind,
    UserRecord,
)
from protocols.psi.multikey import encode_item

ANONQ_SUBDIR = "anonq"
TABLES_SUBDIR = "tables"
META_FILE = "meta.json"
KEY_FILE = "key"
USERS_FILE = "users.arrow"
RETAIN_VERSIONS = 4
POOL_THRESHOLD = 20_000  # identifiers below which a build runs in this process
DEFAULT_PROCESSES = 2
DEFAULT_EVALUATION_BUDGET = 1_000_000
INVENTORY_TAG = b"\x10"  # item prefix of "store_id|series" keys (identifier kinds use 1..3)
#: The reserved item of a ``partial_scores`` table: its label is the host's partial score of
#: an all-zero feature row. Tag 0x11 cannot be an identifier (kinds use 1..3, dummies 0) or
#: an inventory key (0x10).
ZERO_ROW_ITEM = b"\x11cleanroom/lead-score/zero-row/v1"
ZERO_ROW_REF = "zero-row"  # its user reference (real users' references start with "r:")
KINDS = ("nearest_stores", "inventory", "partial_scores", "custom")
PARTIAL_SCORES = "partial_scores"
NAME_RE = re.compile(r"[a-z][a-z0-9_]{0,62}")
_VERSION_FILE = re.compile(r"v(\d{8})\.table")


class TableError(CleanroomError):
    """A table cannot be published, loaded or served; names the table and the reason."""


def check_table_name(name: str) -> str:
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise InputError(f"table name {name!r}: use lowercase letters, digits and '_' "
                         "(start with a letter, at most 63 characters)")
    return name


def inventory_item(key: str) -> bytes:
    """The table item of an inventory key ``"store_id|series"``."""
    return INVENTORY_TAG + key.encode("utf-8")


def tables_root(data_dir: Path) -> Path:
    return Path(data_dir) / ANONQ_SUBDIR / TABLES_SUBDIR


def table_dir(data_dir: Path, name: str) -> Path:
    return tables_root(data_dir) / check_table_name(name)


# --- atomic files ------------------------------------------------------------------------


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def _atomic(path: Path, mode: int = 0o600) -> Iterator[Any]:
    """Write ``path`` through a temporary file in the same folder, fsync, rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.fchmod(fd, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _write_bytes(path: Path, data: bytes | memoryview, mode: int = 0o600) -> None:
    with _atomic(path, mode) as f:
        f.write(data)


def _write_table(path: Path, table: Table) -> None:
    """The TABLE blob, written in row chunks (no second in-memory copy of a large table)."""
    head = HEADER.pack(MAGIC, FORMAT_VERSION, Kind.TABLE, SUITE, 0, table.table_id,
                       table.version, 0, table.bucket_count, table.min_bucket_size,
                       table.label_size, bytes(6), table.entry_count, table.entry_count, 0)
    rows = np.ascontiguousarray(table.rows)
    step = max(1, (16 << 20) // max(1, table.row_size))
    with _atomic(path, 0o600) as f:
        f.write(head)
        for start in range(0, len(rows), step):
            f.write(rows[start:start + step].tobytes())


# --- metadata ----------------------------------------------------------------------------


@dataclass(frozen=True)
class TableMeta:
    """What ``meta.json`` holds (public parameters and bookkeeping; no secrets)."""

    name: str
    kind: str
    query_type: str
    table_id: bytes
    version: int
    label_size: int
    min_bucket_size: int
    evaluation_budget: int
    entry_count: int
    bucket_count: int
    users: int
    sources: dict[str, str]
    retained: tuple[int, ...]

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name, "kind": self.kind, "query_type": self.query_type,
            "table_id": self.table_id.hex(), "version": self.version,
            "label_size": self.label_size, "min_bucket_size": self.min_bucket_size,
            "evaluation_budget": self.evaluation_budget, "entry_count": self.entry_count,
            "bucket_count": self.bucket_count, "users": self.users,
            "sources": dict(self.sources), "retained": list(self.retained),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str) -> TableMeta:
        try:
            return cls(
                name=str(data["name"]), kind=str(data["kind"]),
                query_type=str(data["query_type"]), table_id=bytes.fromhex(data["table_id"]),
                version=int(data["version"]), label_size=int(data["label_size"]),
                min_bucket_size=int(data["min_bucket_size"]),
                evaluation_budget=int(data["evaluation_budget"]),
                entry_count=int(data["entry_count"]), bucket_count=int(data["bucket_count"]),
                users=int(data["users"]),
                sources={str(k): str(v) for k, v in dict(data["sources"]).items()},
                retained=tuple(int(v) for v in data["retained"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise TableError(f"{source}: malformed table metadata ({exc})") from None


def read_meta(folder: Path) -> TableMeta:
    path = folder / META_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise TableError(f"no published table in {folder}") from None
    except (OSError, ValueError) as exc:
        raise TableError(f"{path}: cannot read ({exc})") from None
    return TableMeta.from_dict(data, str(path))


def _read_key(folder: Path) -> bytes:
    path = folder / KEY_FILE
    st = path.stat()
    if st.st_mode & 0o077:
        raise TableError(f"{path}: the OPRF key file must not be readable by others (mode 0600)")
    key = path.read_bytes()
    if not oprf.is_clamped(key):
        raise TableError(f"{path}: not a clamped 32-byte X25519 key")
    return key


def _version_path(folder: Path, version: int) -> Path:
    return folder / f"v{version:08d}.table"


def _load_table(folder: Path, version: int) -> Table:
    path = _version_path(folder, version)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise TableError(f"{path}: cannot read ({exc.strerror})") from None
    try:
        return Table.from_bytes(data, max_entries=1 << 31)
    except RemoteProtocolError as exc:
        raise TableError(f"{path}: {exc}") from None


# --- users index -------------------------------------------------------------------------


def record_digest(record: UserRecord) -> bytes:
    """Digest of one user's identifiers (as a set) and label: detects changes."""
    identifiers, label = record
    h = hashlib.sha256(b"cleanroom/anonq/user/v1\n")
    for x in sorted(set(identifiers)):
        h.update(len(x).to_bytes(4, "big") + x)
    h.update(b"\x00label" + len(label).to_bytes(4, "big") + label)
    return h.digest()


def _write_users(path: Path, user_tags: Mapping[str, Sequence[bytes]],
                 digests: Mapping[str, bytes]) -> None:
    refs = list(user_tags)
    counts = np.fromiter((len(user_tags[r]) for r in refs), dtype=np.int32, count=len(refs))
    offsets = np.zeros(len(refs) + 1, dtype=np.int32)
    np.cumsum(counts, out=offsets[1:])
    flat = b"".join(t for r in refs for t in user_tags[r])
    tags = pa.FixedSizeBinaryArray.from_buffers(pa.binary(TAG), len(flat) // TAG,
                                                [None, pa.py_buffer(flat)])
    dig = pa.FixedSizeBinaryArray.from_buffers(
        pa.binary(32), len(refs), [None, pa.py_buffer(b"".join(digests[r] for r in refs))])
    table = pa.table({
        "user": pa.array(refs, type=pa.string()),
        "digest": dig,
        "tags": pa.ListArray.from_arrays(pa.array(offsets), tags),
    })
    with _atomic(path) as f:
        sink = pa.PythonFile(f, mode="w")
        with ipc.new_file(sink, table.schema) as writer:
            writer.write_table(table)


def _read_users(path: Path) -> tuple[dict[str, tuple[bytes, ...]], dict[str, bytes]]:
    try:
        with pa.memory_map(str(path)) as source:
            table = ipc.open_file(source).read_all()
    except (OSError, pa.ArrowInvalid) as exc:
        raise TableError(f"{path}: cannot read the user index ({exc})") from None
    refs = table.column("user").to_pylist()
    digests = table.column("digest").to_pylist()
    tags_col = table.column("tags").combine_chunks()
    offsets = tags_col.offsets.to_numpy()
    flat = tags_col.values.buffers()[1]
    raw = bytes(flat)[tags_col.values.offset * TAG:] if flat is not None else b""
    user_tags: dict[str, tuple[bytes, ...]] = {}
    for i, ref in enumerate(refs):
        a, b = int(offsets[i]), int(offsets[i + 1])
        user_tags[ref] = tuple(raw[j * TAG:(j + 1) * TAG] for j in range(a, b))
    return user_tags, dict(zip(refs, digests, strict=True))


# --- serving -----------------------------------------------------------------------------


class ServingSource(OwnerTable):
    """What a running node serves from: the current table and the key, no user index.

    ``delta_since(v)`` is the difference between retained version ``v`` (read from disk)
    and the current version; a version no longer retained raises RemoteProtocolError 409
    (the querier then downloads the whole table).
    """

    def __init__(self, folder: Path, meta: TableMeta, key: bytes, table: Table) -> None:
        super().__init__(key=key, table=table, user_tags={})
        self.folder = folder
        self.meta = meta
        self._deltas: dict[int, Delta] = {}
        self._lock = threading.Lock()

    def delta_since(self, version: int) -> Delta:
        cur = self.current
        if version == cur.version:
            return super().delta_since(version)
        if version not in self.meta.retained or not 1 <= version < cur.version:
            raise RemoteProtocolError(
                f"version {version} of table {self.meta.name} is no longer kept; "
                "download the whole table", status_hint=409)
        with self._lock:
            hit = self._deltas.get(version)
            if hit is None:
                hit = diff_tables(_load_table(self.folder, version), cur)
                self._deltas[version] = hit
        return hit


def diff_tables(base: Table, cur: Table) -> Delta:
    """The delta that turns ``base`` into ``cur`` (same table id, later version)."""
    if base.table_id != cur.table_id or base.version >= cur.version:
        raise TableError("a delta needs an earlier version of the same table")
    present = cur.find(base.tags()) if base.entry_count else np.zeros(0, dtype=np.int64)
    removed = np.ascontiguousarray(base.rows[present < 0, :TAG])
    versions = np.ascontiguousarray(cur.rows[:, TAG:TAG + 4]).view(">u4").ravel()
    upserts = cur.rows[versions > base.version]
    return Delta(cur.table_id, base.version, cur.version, cur.bucket_count,
                 cur.min_bucket_size, cur.label_size, cur.entry_count, removed, upserts)


def load_serving(data_dir: Path, name: str) -> ServingSource:
    folder = table_dir(data_dir, name)
    meta = read_meta(folder)
    key = _read_key(folder)
    table = _load_table(folder, meta.version)
    if table.table_id != meta.table_id or table.version != meta.version:
        raise TableError(f"{folder}: the current table file does not match meta.json")
    return ServingSource(folder, meta, key, table)


def published_tables(data_dir: Path) -> list[str]:
    root = tables_root(data_dir)
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir()
                  if p.is_dir() and NAME_RE.fullmatch(p.name) and (p / META_FILE).is_file())


# --- publishing --------------------------------------------------------------------------


@dataclass(frozen=True)
class PublishReport:
    """Counts only: what a publish did."""

    name: str
    version: int
    table_id: str
    rebuilt: bool
    users: int
    entries: int
    buckets: int
    min_bucket: int
    upserted_users: int
    removed_users: int
    delta_rows: int
    delta_removed: int

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _pool_map(processes: int, n_items: int) -> tuple[Any, ProcessPoolExecutor | None]:
    if processes <= 1 or n_items < POOL_THRESHOLD:
        return None, None
    pool = ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("spawn"))
    return pool.map, pool


def publish(
    data_dir: Path,
    name: str,
    users: Mapping[str, UserRecord],
    *,
    kind: str = "custom",
    query_type: str = "store_recommendation",
    label_size: int,
    min_bucket_size: int = DEFAULT_MIN_BUCKET_SIZE,
    evaluation_budget: int = DEFAULT_EVALUATION_BUDGET,
    sources: Mapping[str, str] | None = None,
    rebuild: bool = False,
    processes: int = DEFAULT_PROCESSES,
    chunk_size: int = 4096,
) -> PublishReport:
    """Publish ``users`` as the next version of table ``name`` (version 1 if new).

    An existing table is updated incrementally (only changed, new and removed users are
    re-encrypted; versions grow by one); ``rebuild`` (or a changed label size or minimum
    bucket size) builds a new table under a fresh key and table id. Nothing changes on
    disk until every file of the new version is written.
    """
    folder = table_dir(data_dir, name)
    if kind not in KINDS:
        raise InputError(f"table kind {kind!r}: must be one of {', '.join(KINDS)}")
    if kind == PARTIAL_SCORES and query_type != "lead_score":
        raise InputError(f"table {name}: a partial_scores table serves lead_score, "
                         f"not {query_type}")
    if not users:
        raise InputError(f"table {name}: no users with identifiers to publish")
    if evaluation_budget < 1:
        raise InputError("evaluation_budget must be at least 1")
    digests = {ref: record_digest(rec) for ref, rec in users.items()}
    old = None
    if (folder / META_FILE).is_file() and not rebuild:
        old = read_meta(folder)
        if old.label_size != label_size or old.min_bucket_size != min_bucket_size:
            old = None
    n_ids = sum(len(rec[0]) for rec in users.values())
    map_fn, pool = _pool_map(processes, n_ids)
    try:
        if old is None:
            owner = OwnerTable.build(users, label_size=label_size,
                                     min_bucket_size=min_bucket_size, map_fn=map_fn,
                                     chunk_size=chunk_size)
            upserted, removed = len(users), 0
            delta_rows, delta_removed = owner.current.entry_count, 0
            retained: tuple[int, ...] = (1,)
            key_new = True
        else:
            user_tags, old_digests = _read_users(folder / USERS_FILE)
            owner = OwnerTable(key=_read_key(folder), table=_load_table(folder, old.version),
                               user_tags=user_tags)
            changed = {ref: rec for ref, rec in users.items()
                       if old_digests.get(ref) != digests[ref]}
            gone = [ref for ref in old_digests if ref not in users]
            upserted, removed = len(changed), len(gone)
            if not changed and not gone:
                cur = owner.current
                new_sources = dict(sources or {})
                if new_sources != old.sources:
                    # Same rows from newer dataset versions: the version stays, the record
                    # of what it was built from moves on (meta.json only, atomically).
                    meta = dataclasses.replace(old, sources=new_sources)
                    _write_bytes(folder / META_FILE,
                                 json.dumps(meta.as_dict(), indent=2).encode(), 0o600)
                return PublishReport(name, cur.version, cur.table_id.hex(), False, len(users),
                                     cur.entry_count, cur.bucket_count,
                                     int(cur.bucket_sizes().min()), 0, 0, 0, 0)
            delta = owner.update(upsert=changed, remove=gone, map_fn=map_fn,
                                 chunk_size=chunk_size)
            delta_rows, delta_removed = len(delta.upserts), len(delta.removed)
            retained = tuple(v for v in old.retained if v > owner.version - RETAIN_VERSIONS)
            retained = (*retained, owner.version)
            key_new = False
    except Exception as exc:
        from protocols.errors import LocalProtocolError

        if isinstance(exc, LocalProtocolError):
            raise InputError(f"table {name}: {exc}") from None
        raise
    finally:
        if pool is not None:
            pool.shutdown()
    table = owner.current
    if key_new and folder.exists():
        # A rebuild: drop the previous generation only after the new one is committed.
        stale = [p for p in folder.iterdir() if _VERSION_FILE.fullmatch(p.name)]
    else:
        stale = []
    folder.mkdir(parents=True, exist_ok=True)
    os.chmod(folder, 0o700)
    staging = folder / ".staging" if key_new else folder
    staging.mkdir(exist_ok=True)
    _write_table(_version_path(staging, table.version), table)
    _write_users(staging / USERS_FILE, owner._user_tags, digests)
    if key_new:
        _write_bytes(staging / KEY_FILE, owner.key, 0o600)
    meta = TableMeta(
        name=name, kind=kind, query_type=query_type, table_id=table.table_id,
        version=table.version, label_size=label_size, min_bucket_size=min_bucket_size,
        evaluation_budget=evaluation_budget, entry_count=table.entry_count,
        bucket_count=table.bucket_count, users=len(users), sources=dict(sources or {}),
        retained=retained,
    )
    if key_new:
        # Commit a new generation: move its files in place, meta.json last.
        (folder / META_FILE).unlink(missing_ok=True)
        for p in stale:
            p.unlink(missing_ok=True)
        for fname in (KEY_FILE, USERS_FILE, _version_path(staging, 1).name):
            os.replace(staging / fname, folder / fname)
        staging.rmdir()
        _fsync_dir(folder)
    _write_bytes(folder / META_FILE, json.dumps(meta.as_dict(), indent=2).encode(), 0o600)
    for p in folder.iterdir():
        m = _VERSION_FILE.fullmatch(p.name)
        if m and int(m.group(1)) not in retained:
            p.unlink(missing_ok=True)
    sizes = table.bucket_sizes()
    return PublishReport(name, table.version, table.table_id.hex(), key_new, len(users),
                         table.entry_count, table.bucket_count, int(sizes.min()),
                         upserted, removed, delta_rows, delta_removed)


# --- sources: the node's datasets -> users ------------------------------------------------


def nearest_store_users(users: Any, locations: Any, stores: Any) -> dict[str, UserRecord]:
    """``user_id -> (identifier items, nearest-stores label)`` from the media datasets."""
    from parties.media import build_label_rows

    rows = build_label_rows(users, locations, stores)
    kinds = rows.kinds.to_pylist()
    idents = rows.identifiers.to_pylist()
    user_ids = users["user_id"].astype(str).to_numpy(dtype=object)
    out: dict[str, tuple[list[bytes], bytes]] = {}
    for kind, ident, row in zip(kinds, idents, rows.label_index.tolist(), strict=True):
        ref = str(user_ids[row])
        rec = out.get(ref)
        if rec is None:
            rec = ([], rows.labels[row].tobytes())
            out[ref] = rec
        rec[0].append(encode_item(kind, ident))
    return {ref: (tuple(ids), label) for ref, (ids, label) in out.items()}


def partial_score_users(records: Sequence[Sequence[bytes]], labels: Sequence[bytes],
                        refs: Sequence[str], zero_label: bytes) -> dict[str, UserRecord]:
    """``ref -> (identifier items, partial-score label)`` for a ``partial_scores`` table,
    plus the reserved zero-row entry (``ZERO_ROW_REF -> ((ZERO_ROW_ITEM,), zero_label)``).

    ``records[i]`` are the table items of record ``i``'s identifiers in the order of its
    join columns; an identifier held by several records belongs to the first record that
    holds it (the rule of multi-key matching), and a record left without any identifier is
    not published (no lead can reach it). ``refs`` are stable references (``"r:..."``).
    """
    if not len(records) == len(labels) == len(refs):
        raise InputError("partial scores: records, labels and references differ in length")
    seen: set[bytes] = {ZERO_ROW_ITEM}
    out: dict[str, UserRecord] = {}
    for ref, items, label in zip(refs, records, labels, strict=True):
        if not ref.startswith("r:"):
            raise InputError(f"partial scores: record reference {ref!r} must start with 'r:'")
        own = []
        for item in items:
            if item not in seen:
                seen.add(item)
                own.append(item)
        if own:
            out[ref] = (tuple(own), label)
    out[ZERO_ROW_REF] = ((ZERO_ROW_ITEM,), zero_label)
    return out


def inventory_users(inventory: Any) -> dict[str, UserRecord]:
    """``"store_id|series" -> ((item,), availability label)`` from the dealer's inventory."""
    from parties.dealer import inventory_rows

    return {key: ((inventory_item(key),), label)
            for key, label in inventory_rows(inventory, file="dataset inventory")}
