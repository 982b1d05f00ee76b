"""The node's dataset store: validated, normalised tables as Parquet files plus DB metadata.

``ingest_file`` reads a CSV or Parquet file, checks it (readable, identifier columns
present, column types consistent), normalises the identifier columns with
:mod:`cleanroom.identity` and stores the result as a new version:

1. the Parquet file is written to a temporary name in the dataset's folder and fsynced;
2. it is renamed to its final, version-specific name (and the folder fsynced);
3. one database transaction inserts the version row and makes it current.

A crash or error before step 3 commits leaves the previous version current and its file
untouched; leftovers (temporary or unreferenced files) are removed by the next ingest of
that dataset, which holds a per-dataset lock for the whole run.

Reports hold counts only. Nothing here logs, prints or returns identifier values, and no
function here is reachable by peers: rows leave this module only through
:func:`read_dataset`, for code running on this node.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import signal
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import JSON, Column, UniqueConstraint
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlmodel import Field, Session, SQLModel, col, select

from cleanroom.errors import CleanroomError, InputError
from cleanroom.identity import ID_KINDS, RULES_VERSION, IdKind, infer_kind

if TYPE_CHECKING:
    import pyarrow as pa

DATASETS_SUBDIR = "datasets"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_NUMERIC = r"^\s*[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?\s*$"
_MIXED_SHARE = 0.9
_HASH_CHUNK = 1 << 20
# Test hook: the named step kills the process with SIGKILL (see tests/test_dataset_ingest.py).
_CRASH_ENV = "CLEANROOM_INGEST_CRASH_AT"


class Dataset(SQLModel, table=True):
    """A named dataset; ``current_version`` points at the version peers' queries will use."""

    __tablename__ = "dataset"

    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(max_length=64, unique=True, index=True)
    created_at: datetime
    current_version: int | None = None


class DatasetVersion(SQLModel, table=True):
    """One stored version: where its Parquet file is, its schema and its counts."""

    __tablename__ = "dataset_version"
    __table_args__ = (UniqueConstraint("dataset_id", "version", name="uq_dataset_version"),)

    id: int | None = Field(default=None, primary_key=True)
    dataset_id: int = Field(foreign_key="dataset.id", index=True)
    version: int
    created_at: datetime
    source_name: str = Field(max_length=255)
    source_format: str = Field(max_length=16)
    source_digest: str = Field(max_length=64)
    file_path: str = Field(max_length=512)
    file_digest: str = Field(max_length=64)
    file_bytes: int
    row_count: int
    columns: list[dict[str, Any]] = Field(sa_column=Column(JSON, nullable=False))
    id_columns: dict[str, str] = Field(sa_column=Column(JSON, nullable=False))
    id_report: list[dict[str, Any]] = Field(sa_column=Column(JSON, nullable=False))
    rules_version: int


@dataclass(frozen=True)
class DatasetInfo:
    """What ``dataset list`` shows: schema and counts of the current version, no rows."""

    name: str
    version: int
    versions: int
    created_at: datetime
    rows: int
    columns: list[dict[str, Any]]
    id_columns: dict[str, str]
    id_report: list[dict[str, Any]]
    file_path: str
    file_digest: str
    source_name: str
    source_digest: str

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "versions": self.versions,
            "created_at": _iso(self.created_at),
            "rows": self.rows,
            "columns": self.columns,
            "id_columns": self.id_columns,
            "id_report": self.id_report,
            "file_digest": self.file_digest,
            "source_name": self.source_name,
            "source_digest": self.source_digest,
        }


@dataclass(frozen=True)
class IngestReport:
    """The outcome of one ingest: counts per identifier column, never values."""

    dataset: str
    version: int
    previous_version: int | None
    rows: int
    columns: list[dict[str, Any]]
    id_report: list[dict[str, Any]]
    file_digest: str
    source_digest: str

    def as_dict(self) -> dict[str, Any]:
        return {
            "dataset": self.dataset,
            "version": self.version,
            "previous_version": self.previous_version,
            "rows": self.rows,
            "columns": self.columns,
            "id_report": self.id_report,
            "file_digest": self.file_digest,
            "source_digest": self.source_digest,
        }


# --- arguments ------------------------------------------------------------------------------


def check_name(name: str) -> str:
    """Return ``name`` if it is a valid dataset name, else raise :class:`InputError`."""
    if not _NAME.fullmatch(name or ""):
        raise InputError(
            f"dataset name {name!r} is not allowed: use 1-64 letters, digits, '_', '.', '-', "
            "starting with a letter or digit"
        )
    return name


def parse_id_columns(spec: str | Sequence[str] | Mapping[str, str]) -> dict[str, IdKind]:
    """``"phone,mail:email"`` -> ``{"phone": "phone", "mail": "email"}``.

    A bare column name gets its kind from :func:`cleanroom.identity.infer_kind`. An empty
    spec is allowed: a table without identifiers (a store list, inventory, features keyed by
    a local row id) is stored as it is.
    """
    if isinstance(spec, Mapping):
        items = [f"{k}:{v}" for k, v in spec.items()]
    elif isinstance(spec, str):
        items = [p for p in spec.split(",")]
    else:
        items = list(spec)
    out: dict[str, IdKind] = {}
    for raw in items:
        item = raw.strip()
        if not item:
            continue
        column, _, kind_text = item.partition(":")
        column = column.strip()
        kind_text = kind_text.strip()
        if not column:
            raise InputError(f"empty column name in id columns {item!r}")
        if kind_text:
            if kind_text not in ID_KINDS:
                raise InputError(
                    f"unknown identifier kind {kind_text!r}; expected one of {', '.join(ID_KINDS)}",
                    column=column,
                )
            kind: IdKind = kind_text
        else:
            try:
                kind = infer_kind(column)
            except ValueError as exc:
                raise InputError(f"{exc}, or write it as {column}:KIND", column=column) from None
        if column in out:
            raise InputError("listed twice in id columns", column=column)
        out[column] = kind
    return out


# --- reading and checking -------------------------------------------------------------------


def _format_of(path: Path, fmt: str | None) -> str:
    if fmt:
        f = fmt.lower()
    else:
        suffix = path.suffix.lower().lstrip(".")
        f = {"pq": "parquet", "tsv": "tsv"}.get(suffix, suffix)
    if f not in ("csv", "tsv", "parquet"):
        raise InputError(
            "unsupported file type: expected .csv, .tsv or .parquet (or give the format)",
            file=str(path),
        )
    return f


def _read_csv(path: Path, id_columns: Mapping[str, IdKind], delimiter: str) -> pa.Table:
    import pyarrow as pa
    import pyarrow.csv as pacsv

    convert = pacsv.ConvertOptions(column_types={c: pa.string() for c in id_columns})
    parse = pacsv.ParseOptions(delimiter=delimiter)
    try:
        return pacsv.read_csv(path, parse_options=parse, convert_options=convert)
    except pa.ArrowInvalid as exc:
        raise _csv_error(path, str(exc), parse, convert) from None
    except OSError as exc:
        raise InputError(f"cannot read file: {exc.strerror or exc}", file=str(path)) from None


def _csv_error(path: Path, message: str, parse: Any, convert: Any) -> InputError:
    """Turn a pyarrow CSV error into one that names the row, without quoting any cell."""
    import pyarrow as pa
    import pyarrow.csv as pacsv

    if "Empty CSV file" in message:
        return InputError("the file is empty (no header row)", file=str(path))
    m = re.search(r"Expected (\d+) columns, got (\d+)", message)
    if m:
        row: int | None = None
        try:  # single-threaded parse just to learn the row number
            pacsv.read_csv(
                path,
                read_options=pacsv.ReadOptions(use_threads=False),
                parse_options=parse,
                convert_options=convert,
            )
        except pa.ArrowInvalid as again:
            r = re.search(r"Row #(\d+)", str(again))
            row = int(r.group(1)) if r else None
        return InputError(
            f"row has {m.group(2)} fields but the header has {m.group(1)}",
            file=str(path),
            row=row,
        )
    m = re.search(r"column #(\d+).*?Row #(\d+)", message)
    if m:
        return InputError(
            "value does not fit the column's type", file=str(path), row=int(m.group(2))
        )
    return InputError("not a readable CSV file", file=str(path))


def _read_parquet(path: Path) -> pa.Table:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path)
    except (pa.ArrowException, OSError) as exc:
        kind = "cannot read file" if isinstance(exc, OSError) else "not a readable Parquet file"
        raise InputError(kind, file=str(path)) from None


def _check_table(table: pa.Table, path: Path, fmt: str, id_columns: Mapping[str, IdKind]) -> None:
    import pyarrow as pa
    import pyarrow.compute as pc

    names = table.column_names
    seen: set[str] = set()
    for name in names:
        if not name or not name.strip():
            raise InputError("a column has an empty name in the header", file=str(path))
        if name in seen:
            raise InputError("column name appears twice in the header", file=str(path), column=name)
        seen.add(name)
    missing = [c for c in id_columns if c not in seen]
    if missing:
        raise InputError(
            f"identifier column not in the file (columns are: {', '.join(names)})",
            file=str(path),
            column=missing[0],
        )
    if table.num_rows == 0:
        raise InputError("the file has a header but no data rows", file=str(path))
    header_rows = 1 if fmt in ("csv", "tsv") else 0
    for name in names:
        arr = table.column(name)
        t = arr.type
        if pa.types.is_binary(t) or pa.types.is_large_binary(t):
            if fmt in ("csv", "tsv"):
                raise InputError("column is not valid UTF-8 text", file=str(path), column=name)
            if name in id_columns:
                raise InputError(
                    "identifier column holds bytes, not text", file=str(path), column=name
                )
        if name in id_columns or not (pa.types.is_string(t) or pa.types.is_large_string(t)):
            continue
        trimmed = pc.utf8_trim_whitespace(arr)
        nonempty = pc.and_(pc.is_valid(arr), pc.not_equal(trimmed, ""))
        numeric = pc.and_(nonempty, pc.match_substring_regex(arr, _NUMERIC))
        n_nonempty = pc.sum(nonempty).as_py() or 0
        n_numeric = pc.sum(numeric).as_py() or 0
        if n_nonempty and n_numeric < n_nonempty and n_numeric >= _MIXED_SHARE * n_nonempty:
            odd = pc.and_(nonempty, pc.invert(numeric))
            first = int(pc.index(odd, True).as_py())
            raise InputError(
                f"mixed types: {n_nonempty - n_numeric} of {n_nonempty} values are not numbers "
                f"while the rest are (this row is the first); fix or blank those cells",
                file=str(path),
                column=name,
                row=first + 1 + header_rows,
            )


def _normalise(
    table: pa.Table, path: Path, id_columns: Mapping[str, IdKind]
) -> tuple[pa.Table, list[dict[str, Any]]]:
    import pyarrow as pa

    from cleanroom.identity import normalize_series

    reports: list[dict[str, Any]] = []
    for column, kind in id_columns.items():
        idx = table.column_names.index(column)
        values = table.column(idx).to_pandas()
        normalised, report = normalize_series(kind, values, column)
        if report.valid == 0 and report.invalid > 0:
            raise InputError(
                f"none of the {report.invalid} non-empty values is a valid {kind}; "
                f"is this the right column or kind?",
                file=str(path),
                column=column,
            )
        arr = pa.array(normalised, type=pa.string(), from_pandas=True)
        table = table.set_column(idx, pa.field(column, pa.string()), arr)
        reports.append(report.as_dict())
    return table, reports


# --- files and locks ------------------------------------------------------------------------


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _fsync_path(path: Path, *, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _crash_point(step: str) -> None:
    if os.environ.get(_CRASH_ENV) == step:
        os.kill(os.getpid(), signal.SIGKILL)


@contextlib.contextmanager
def _dataset_lock(folder: Path) -> Iterator[None]:
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _cleanup(folder: Path, data_dir: Path, referenced: set[str]) -> None:
    """Remove temporary and unreferenced Parquet files (caller holds the dataset lock)."""
    for entry in folder.iterdir():
        if entry.name == ".lock":
            continue
        rel = entry.relative_to(data_dir).as_posix()
        if entry.name.startswith(".tmp-") or (entry.suffix == ".parquet" and rel not in referenced):
            with contextlib.suppress(FileNotFoundError):
                entry.unlink()


# --- public API -----------------------------------------------------------------------------


def ingest_file(
    engine: Engine,
    data_dir: Path,
    name: str,
    source: Path,
    id_columns: str | Sequence[str] | Mapping[str, str],
    *,
    fmt: str | None = None,
    source_name: str | None = None,
) -> IngestReport:
    """Validate, normalise and store ``source`` as the next version of dataset ``name``.

    ``source_name`` is what error messages and the version record call the file (for an
    upload, the client's file name). Raises :class:`InputError` on bad input, leaving the
    previous version current.
    """
    import pyarrow.parquet as pq

    check_name(name)
    ids = parse_id_columns(id_columns)
    source = Path(source)
    shown = Path(source_name) if source_name else source
    file_format = _format_of(shown, fmt)
    if not source.is_file():
        raise InputError("file not found", file=str(shown))
    try:
        if file_format == "parquet":
            table = _read_parquet(source)
        else:
            table = _read_csv(source, ids, "\t" if file_format == "tsv" else ",")
    except InputError as exc:
        raise InputError(exc.detail, file=str(shown), column=exc.column, row=exc.row) from None
    _check_table(table, shown, file_format, ids)
    table, id_report = _normalise(table, shown, ids)
    columns = [
        {"name": f.name, "type": str(f.type), "id_kind": ids.get(f.name)} for f in table.schema
    ]
    source_digest = _sha256_file(source)

    data_dir = Path(data_dir)
    folder = data_dir / DATASETS_SUBDIR / name
    with _dataset_lock(folder):
        with Session(engine) as s:
            ds = s.exec(select(Dataset).where(Dataset.name == name)).first()
            referenced: set[str] = set()
            if ds is not None:
                referenced = set(
                    s.exec(
                        select(DatasetVersion.file_path).where(DatasetVersion.dataset_id == ds.id)
                    ).all()
                )
        _cleanup(folder, data_dir, referenced)

        tmp = folder / f".tmp-{uuid.uuid4().hex}.parquet"
        try:
            pq.write_table(table, tmp, compression="zstd")
            os.chmod(tmp, 0o600)
            _fsync_path(tmp)
            file_digest = _sha256_file(tmp)
            file_bytes = tmp.stat().st_size
            _crash_point("before_rename")
            final_name = f"v-{uuid.uuid4().hex[:12]}-{file_digest[:16]}.parquet"
            final = folder / final_name
            os.replace(tmp, final)
            _fsync_path(folder, directory=True)
        except OSError as exc:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            raise CleanroomError(f"cannot write dataset file in {folder}: {exc}") from None
        _crash_point("after_rename")
        try:
            version, previous = _commit_version(
                engine,
                name,
                DatasetVersion(
                    dataset_id=0,
                    version=0,
                    created_at=_now(),
                    source_name=shown.name,
                    source_format=file_format,
                    source_digest=source_digest,
                    file_path=final.relative_to(data_dir).as_posix(),
                    file_digest=file_digest,
                    file_bytes=file_bytes,
                    row_count=table.num_rows,
                    columns=columns,
                    id_columns=dict(ids),
                    id_report=id_report,
                    rules_version=RULES_VERSION,
                ),
            )
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                final.unlink()
            raise
    return IngestReport(
        dataset=name,
        version=version,
        previous_version=previous,
        rows=table.num_rows,
        columns=columns,
        id_report=id_report,
        file_digest=file_digest,
        source_digest=source_digest,
    )


def _now() -> datetime:
    return datetime.now(UTC)


def _iso(dt: datetime) -> str:
    return (dt if dt.tzinfo else dt.replace(tzinfo=UTC)).astimezone(UTC).isoformat()


def _commit_version(engine: Engine, name: str, row: DatasetVersion) -> tuple[int, int | None]:
    """Insert ``row`` as the next version of ``name`` and make it current, in one transaction.

    Returns (new version, previous current version). Raises only if nothing was committed.
    """
    with Session(engine, expire_on_commit=False) as s:
        try:
            ds = s.exec(select(Dataset).where(Dataset.name == name)).first()
            if ds is None:
                ds = Dataset(name=name, created_at=row.created_at)
                s.add(ds)
                s.flush()
            assert ds.id is not None
            last = s.exec(
                select(DatasetVersion.version)
                .where(DatasetVersion.dataset_id == ds.id)
                .order_by(col(DatasetVersion.version).desc())
            ).first()
            previous = ds.current_version
            version = (last or 0) + 1
            row.dataset_id = ds.id
            row.version = version
            s.add(row)
            ds.current_version = version
            s.add(ds)
            s.commit()
        except IntegrityError:
            s.rollback()
            raise CleanroomError(
                f"dataset {name!r} was changed by another ingest at the same time; try again"
            ) from None
        except BaseException:
            s.rollback()
            raise
    return version, previous


def _info(s: Session, ds: Dataset) -> DatasetInfo | None:
    if ds.current_version is None:
        return None
    v = s.exec(
        select(DatasetVersion).where(
            DatasetVersion.dataset_id == ds.id, DatasetVersion.version == ds.current_version
        )
    ).one()
    count = len(s.exec(select(DatasetVersion.id).where(DatasetVersion.dataset_id == ds.id)).all())
    return DatasetInfo(
        name=ds.name,
        version=v.version,
        versions=count,
        created_at=v.created_at,
        rows=v.row_count,
        columns=list(v.columns),
        id_columns=dict(v.id_columns),
        id_report=list(v.id_report),
        file_path=v.file_path,
        file_digest=v.file_digest,
        source_name=v.source_name,
        source_digest=v.source_digest,
    )


def list_datasets(engine: Engine) -> list[DatasetInfo]:
    """Every dataset with a current version, by name."""
    with Session(engine) as s:
        out = []
        for ds in s.exec(select(Dataset).order_by(col(Dataset.name))).all():
            info = _info(s, ds)
            if info is not None:
                out.append(info)
        return out


def dataset_info(engine: Engine, name: str) -> DatasetInfo:
    """The current version of ``name``; raises :class:`InputError` if there is none."""
    with Session(engine) as s:
        ds = s.exec(select(Dataset).where(Dataset.name == name)).first()
        info = _info(s, ds) if ds is not None else None
    if info is None:
        raise InputError(f"no dataset named {name!r} on this node")
    return info


def read_dataset(
    engine: Engine,
    data_dir: Path,
    name: str,
    *,
    columns: Sequence[str] | None = None,
    verify: bool = False,
) -> pa.Table:
    """The current version of ``name`` as an Arrow table (identifier columns normalised).

    With ``verify`` the file's SHA-256 is checked against the recorded digest first.
    For code running on this node only: never send the result to a peer.
    """
    import pyarrow.parquet as pq

    info = dataset_info(engine, name)
    path = Path(data_dir) / info.file_path
    if not path.is_file():
        raise CleanroomError(f"dataset {name!r} version {info.version}: file {path} is missing")
    if verify and _sha256_file(path) != info.file_digest:
        raise CleanroomError(
            f"dataset {name!r} version {info.version}: file {path} does not match its digest"
        )
    if columns is not None:
        unknown = [c for c in columns if c not in {x["name"] for x in info.columns}]
        if unknown:
            raise InputError(f"dataset {name!r} has no such column", column=unknown[0])
    return pq.read_table(path, columns=list(columns) if columns is not None else None)
