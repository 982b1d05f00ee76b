"""Declared schemas of every party table, and loading with validation.

Each party keeps its tables at its own node; this module only says what a well-formed
table looks like and turns a file into a typed DataFrame, or raises
:class:`cleanroom.errors.InputError` naming the file, the column and the first bad row
(1-based data row, not counting a CSV header). It never logs or echoes cell values.
Identifier columns are always read as text, so a phone number never becomes a number.

Tables (``party/name``; files are ``DIR/party/name.parquet`` or ``.csv``):

OEM (``oem/``)
    ``leads``: lead_id (key), phone, email, device_id (identifiers in the OEM's own messy
    formats; email and device_id often empty), city, source_channel, intended_series,
    created_at.
    ``crm``: lead_id (key), previous_owner (owned this make before), service_visits (at
    the make's service network, last 3 years), prior_brand (brand of the current car),
    household_cars.
    ``labels``: lead_id (key), converted; historical labels of the TRAINING leads only
    (the earliest ``train_fraction`` of leads by created_at).
    ``stores``: store_id (key), dealer_id, name, city, lat, lon: the store network.

Media platform (``media/``)
    ``users``: user_id (key), phone, email, device_id, device_id_2: any of them may be
    empty; some users hold only an email or only a device id.
    ``behaviour``: user_id (key), views_<series> for each series (last 30 days),
    comparisons, price_checks, forum_posts, testdrive_form_opens, days_since_active.
    ``locations``: user_id (key), home_lat, home_lon, work_lat, work_lon (inferred).

Dealer group (``dealer/``)
    ``activity``: record_id (key), phone (the dealer's key for a customer; a customer may
    have several rows), store_id, visits, test_drives, prior_orders, last_visit_at. All
    activity predates the lead; it is not the conversion label.
    ``inventory``: store_id, series, units (one row per store and series).

Ground truth (``ground_truth/``, for checking only; no party holds any of it)
    ``eval_labels``: lead_id (key), converted: labels of the evaluation leads.
    ``lead_features``: lead_id (key), split, converted, true_logit and every model
    feature (see ``model.json``) as the true model saw it.
    ``nearest_stores``: user_id (key), lead_id (the user's lead, if any), home_store_1..5,
    home_km_1..5, work_store_1..5, work_km_1..5 (great-circle km, nearest first).
    ``identity_map``: person_id, party, record_id (lead_id / user_id / dealer record_id),
    is_duplicate (a second lead, account or customer row of the same person), and the
    normalised phone, email, device_id, device_id_2 that the record's identifiers must
    normalise to (empty where the record holds none, or holds an invalid value).
    ``store_choice``: lead_id (key), split, store_id, chosen_from (home / work /
    fallback), km: the store each converting lead bought at (rule in
    :mod:`cleanroom.synth.generator`).
    ``model.json`` (the true model) and ``summary.json`` are not tables.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from cleanroom.errors import InputError
from cleanroom.identity import IdKind
from cleanroom.synth.model import fit_features
from parties.catalog import PRIOR_BRANDS, SERIES, SOURCE_CHANNELS

Dtype = Literal["string", "int", "float", "bool", "datetime"]

_ARROW_TYPES: dict[str, pa.DataType] = {
    "string": pa.string(),
    "int": pa.int64(),
    "float": pa.float64(),
    "bool": pa.bool_(),
    "datetime": pa.timestamp("s"),
}

_TRUE = {"true", "t", "yes", "y", "1", "1.0"}
_FALSE = {"false", "f", "no", "n", "0", "0.0"}


@dataclass(frozen=True)
class Column:
    """One column: its type, whether it may be empty, and what it identifies (if anything)."""

    name: str
    dtype: Dtype
    nullable: bool = False
    id_kind: IdKind | None = None
    allowed: tuple[str, ...] | None = None
    min: float | None = None
    max: float | None = None


@dataclass(frozen=True)
class TableSchema:
    """A party table: ``party/name``, its columns and its key column (unique, if any)."""

    name: str
    columns: tuple[Column, ...]
    key: str | None = None
    description: str = ""
    by_name: dict[str, Column] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "by_name", {c.name: c for c in self.columns})

    @property
    def party(self) -> str:
        return self.name.split("/", 1)[0]

    @property
    def column_names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.columns)

    @property
    def id_columns(self) -> dict[str, IdKind]:
        """Identifier columns and their kinds, for :func:`cleanroom.identity.normalize_frame`."""
        return {c.name: c.id_kind for c in self.columns if c.id_kind is not None}

    def arrow_schema(self) -> pa.Schema:
        return pa.schema(
            [pa.field(c.name, _ARROW_TYPES[c.dtype], nullable=c.nullable) for c in self.columns]
        )


def _s(name: str, **kw: object) -> Column:
    return Column(name, "string", **kw)  # type: ignore[arg-type]


def _i(name: str, **kw: object) -> Column:
    return Column(name, "int", min=0, **kw)  # type: ignore[arg-type]


def _lat(name: str, nullable: bool = False) -> Column:
    return Column(name, "float", nullable=nullable, min=-90.0, max=90.0)


def _lon(name: str, nullable: bool = False) -> Column:
    return Column(name, "float", nullable=nullable, min=-180.0, max=180.0)


_ID_COLS = (
    _s("phone", nullable=True, id_kind="phone"),
    _s("email", nullable=True, id_kind="email"),
    _s("device_id", nullable=True, id_kind="device_id"),
)
_VIEW_COLUMNS = tuple(f"views_{s.lower()}" for s in SERIES)
_FEATURE_COLUMNS = fit_features("joint")
SPLITS = ("train", "eval")

_TABLES: tuple[TableSchema, ...] = (
    TableSchema(
        "oem/leads",
        (
            _s("lead_id"),
            *_ID_COLS,
            _s("city"),
            _s("source_channel", allowed=SOURCE_CHANNELS),
            _s("intended_series", allowed=SERIES),
            Column("created_at", "datetime"),
        ),
        key="lead_id",
        description="leads collected by the OEM",
    ),
    TableSchema(
        "oem/crm",
        (
            _s("lead_id"),
            Column("previous_owner", "bool"),
            _i("service_visits"),
            _s("prior_brand", allowed=PRIOR_BRANDS),
            _i("household_cars"),
        ),
        key="lead_id",
        description="CRM history per lead",
    ),
    TableSchema(
        "oem/labels",
        (_s("lead_id"), Column("converted", "bool")),
        key="lead_id",
        description="historical conversion labels (training split)",
    ),
    TableSchema(
        "oem/stores",
        (_s("store_id"), _s("dealer_id"), _s("name"), _s("city"), _lat("lat"), _lon("lon")),
        key="store_id",
        description="the store network",
    ),
    TableSchema(
        "media/users",
        (_s("user_id"), *_ID_COLS, _s("device_id_2", nullable=True, id_kind="device_id")),
        key="user_id",
        description="media platform accounts and their identifiers",
    ),
    TableSchema(
        "media/behaviour",
        (
            _s("user_id"),
            *(_i(c) for c in _VIEW_COLUMNS),
            _i("comparisons"),
            _i("price_checks"),
            _i("forum_posts"),
            _i("testdrive_form_opens"),
            _i("days_since_active"),
        ),
        key="user_id",
        description="browsing behaviour, last 30 days",
    ),
    TableSchema(
        "media/locations",
        (_s("user_id"), _lat("home_lat"), _lon("home_lon"), _lat("work_lat"), _lon("work_lon")),
        key="user_id",
        description="inferred home and work locations",
    ),
    TableSchema(
        "dealer/activity",
        (
            _s("record_id"),
            _s("phone", nullable=True, id_kind="phone"),
            _s("store_id"),
            _i("visits"),
            _i("test_drives"),
            _i("prior_orders"),
            Column("last_visit_at", "datetime"),
        ),
        key="record_id",
        description="store visits, test drives and prior orders per customer row",
    ),
    TableSchema(
        "dealer/inventory",
        (_s("store_id"), _s("series", allowed=SERIES), _i("units")),
        description="units in stock per store and series",
    ),
    TableSchema(
        "ground_truth/eval_labels",
        (_s("lead_id"), Column("converted", "bool")),
        key="lead_id",
    ),
    TableSchema(
        "ground_truth/lead_features",
        (
            _s("lead_id"),
            _s("split", allowed=SPLITS),
            Column("converted", "bool"),
            Column("true_logit", "float"),
            *(Column(name, "float") for name in _FEATURE_COLUMNS),
        ),
        key="lead_id",
    ),
    TableSchema(
        "ground_truth/nearest_stores",
        (
            _s("user_id"),
            _s("lead_id", nullable=True),
            *(_s(f"home_store_{i}") for i in range(1, 6)),
            *(Column(f"home_km_{i}", "float", min=0.0) for i in range(1, 6)),
            *(_s(f"work_store_{i}") for i in range(1, 6)),
            *(Column(f"work_km_{i}", "float", min=0.0) for i in range(1, 6)),
        ),
        key="user_id",
    ),
    TableSchema(
        "ground_truth/identity_map",
        (
            Column("person_id", "int", min=0),
            _s("party", allowed=("oem", "media", "dealer")),
            _s("record_id"),
            Column("is_duplicate", "bool"),
            _s("phone", nullable=True),
            _s("email", nullable=True),
            _s("device_id", nullable=True),
            _s("device_id_2", nullable=True),
        ),
    ),
    TableSchema(
        "ground_truth/store_choice",
        (
            _s("lead_id"),
            _s("split", allowed=SPLITS),
            _s("store_id"),
            _s("chosen_from", allowed=("home", "work", "fallback")),
            Column("km", "float", min=0.0),
        ),
        key="lead_id",
    ),
)

SCHEMAS: dict[str, TableSchema] = {t.name: t for t in _TABLES}
PARTY_TABLES: tuple[str, ...] = tuple(t.name for t in _TABLES if t.party != "ground_truth")
GROUND_TRUTH_TABLES: tuple[str, ...] = tuple(t.name for t in _TABLES if t.party == "ground_truth")


def get_schema(table: str) -> TableSchema:
    try:
        return SCHEMAS[table]
    except KeyError:
        raise InputError(
            f"unknown table {table!r}; known tables: {', '.join(SCHEMAS)}"
        ) from None


def table_file(root: Path, table: str) -> Path:
    """The file holding ``table`` under a dataset directory: Parquet if present, else CSV."""
    get_schema(table)
    for suffix in (".parquet", ".csv"):
        candidate = root / f"{table}{suffix}"
        if candidate.is_file():
            return candidate
    raise InputError(f"table {table} not found (no .parquet or .csv)", file=str(root / table))


def load_table(path: Path | str, table: str) -> pd.DataFrame:
    """Read ``table`` from a ``.parquet`` or ``.csv`` file (or a dataset directory) and validate.

    Returns a DataFrame with exactly the schema's columns (extra columns are dropped) in
    canonical dtypes: text as ``string``, integers as ``int64`` (``Int64`` if nullable),
    floats as ``float64``, booleans as ``bool`` (``boolean`` if nullable), times as
    ``datetime64``.
    """
    schema = get_schema(table)
    p = Path(path)
    if p.is_dir():
        p = table_file(p, table)
    file = str(p)
    if not p.is_file():
        raise InputError("file not found", file=file)
    suffix = p.suffix.lower()
    try:
        if suffix == ".csv":
            frame = pd.read_csv(p, dtype=str, keep_default_na=False, na_values=[""])
        elif suffix in {".parquet", ".pq"}:
            frame = _read_parquet(p, schema)
        else:
            raise InputError("unsupported file type; expected .parquet or .csv", file=file)
    except InputError:
        raise
    except (OSError, ValueError, pa.ArrowException) as exc:
        raise InputError(f"cannot read file: {type(exc).__name__}", file=file) from None
    return validate_frame(frame, schema.name, file)


def _read_parquet(path: Path, schema: TableSchema) -> pd.DataFrame:
    """Read a Parquet file; identifiers stored as integers become their digits (as text)."""
    table = pq.read_table(path)
    for i, fld in enumerate(table.schema):
        col = schema.by_name.get(fld.name)
        if col is not None and col.id_kind is not None and pa.types.is_integer(fld.type):
            table = table.set_column(i, fld.name, table.column(i).cast(pa.string()))
    return table.to_pandas()


def _first_bad(mask: np.ndarray) -> int:
    return int(np.flatnonzero(mask)[0]) + 1


def _present(values: pd.Series) -> np.ndarray:
    """Cells holding something: not null and, for text, not blank."""
    present = values.notna().to_numpy(dtype=bool).copy()
    if values.dtype == object or isinstance(values.dtype, pd.StringDtype):
        text = values.astype("string").str.strip()
        present &= ~(text == "").fillna(False).to_numpy(dtype=bool)
    return present


def _coerce_column(values: pd.Series, col: Column, file: str) -> pd.Series:
    present = _present(values)
    if col.dtype == "string":
        if values.dtype == object:
            kinds = values[present].map(type)
            bad = ~kinds.isin([str]).to_numpy(dtype=bool)
            if bad.any():
                numeric = kinds.map(lambda t: issubclass(t, int | np.integer)).to_numpy(bool)
                if col.id_kind is None or not numeric[bad].all():
                    row = int(np.flatnonzero(present)[np.flatnonzero(bad)[0]]) + 1
                    raise InputError("expected text", file=file, column=col.name, row=row)
        elif pd.api.types.is_integer_dtype(values.dtype) and col.id_kind is not None:
            pass  # identifiers stored as numbers: keep their digits
        elif not isinstance(values.dtype, pd.StringDtype) and present.any():
            raise InputError(
                f"expected text, found {values.dtype}", file=file, column=col.name,
                row=_first_bad(present),
            )
        out = values.astype("object").where(present, None)
        out = out.map(lambda v: v if v is None or isinstance(v, str) else str(int(v)))
        return out.astype("string")
    if col.dtype in ("int", "float"):
        if pd.api.types.is_bool_dtype(values.dtype):
            raise InputError(f"expected a number, found {values.dtype}", file=file,
                             column=col.name, row=1)
        num = pd.to_numeric(values.where(present, None), errors="coerce")
        arr = num.to_numpy(dtype=np.float64, na_value=np.nan)
        bad = present & ~np.isfinite(arr)
        what = "an integer" if col.dtype == "int" else "a number"
        if col.dtype == "int":
            bad |= present & np.isfinite(arr) & (arr != np.round(arr))
        if bad.any():
            raise InputError(f"expected {what}", file=file, column=col.name, row=_first_bad(bad))
        if col.min is not None and (low := present & (arr < col.min)).any():
            raise InputError(f"value below the minimum {col.min:g}", file=file,
                             column=col.name, row=_first_bad(low))
        if col.max is not None and (high := present & (arr > col.max)).any():
            raise InputError(f"value above the maximum {col.max:g}", file=file,
                             column=col.name, row=_first_bad(high))
        if col.dtype == "float":
            return pd.Series(arr, index=values.index, dtype="float64")
        if present.all():
            return pd.Series(arr.astype(np.int64), index=values.index, dtype="int64")
        return pd.Series(arr, index=values.index).round().astype("Int64")
    if col.dtype == "bool":
        if pd.api.types.is_bool_dtype(values.dtype) and present.all():
            return values.astype(bool)
        text = values.astype("string").str.strip().str.lower()
        is_true = text.isin(_TRUE).fillna(False).to_numpy(dtype=bool)
        is_false = text.isin(_FALSE).fillna(False).to_numpy(dtype=bool)
        bad = present & ~is_true & ~is_false
        if bad.any():
            raise InputError("expected true or false", file=file, column=col.name,
                             row=_first_bad(bad))
        out = pd.Series(is_true, index=values.index, dtype="boolean")
        if present.all():
            return out.astype(bool)
        return out.where(present, pd.NA)
    # datetime
    if pd.api.types.is_datetime64_any_dtype(values.dtype):
        parsed = values
    else:
        parsed = pd.to_datetime(values.where(present, None), errors="coerce", format="ISO8601")
    bad = present & parsed.isna().to_numpy(dtype=bool)
    if bad.any():
        raise InputError("expected a date-time (ISO 8601)", file=file, column=col.name,
                         row=_first_bad(bad))
    return parsed.astype("datetime64[s]") if parsed.dt.tz is None else parsed


def validate_frame(frame: pd.DataFrame, table: str, file: str) -> pd.DataFrame:
    """Check ``frame`` against ``table``'s schema; return it with canonical dtypes.

    Raises :class:`InputError` naming ``file``, the column and the first bad 1-based data
    row for: a missing column, a value of the wrong type, an empty required value, a value
    outside its allowed set or range, or a repeated key.
    """
    schema = get_schema(table)
    missing = [c for c in schema.column_names if c not in frame.columns]
    if missing:
        raise InputError(
            f"missing column (table {table} needs {', '.join(schema.column_names)})",
            file=file, column=missing[0],
        )
    frame = frame.reset_index(drop=True)
    out: dict[str, pd.Series] = {}
    for col in schema.columns:
        values = frame[col.name]
        if isinstance(values, pd.DataFrame):
            raise InputError("column appears more than once", file=file, column=col.name)
        coerced = _coerce_column(values, col, file)
        empty = coerced.isna().to_numpy(dtype=bool)
        if not col.nullable and empty.any():
            raise InputError("empty value in a required column", file=file, column=col.name,
                             row=_first_bad(empty))
        if col.allowed is not None:
            bad = ~empty & ~coerced.isin(col.allowed).fillna(False).to_numpy(dtype=bool)
            if bad.any():
                raise InputError(
                    f"value not allowed; expected one of {', '.join(col.allowed)}",
                    file=file, column=col.name, row=_first_bad(bad),
                )
        out[col.name] = coerced
    result = pd.DataFrame(out)
    if schema.key is not None:
        dup = result[schema.key].duplicated().to_numpy(dtype=bool)
        if dup.any():
            raise InputError("repeated key value", file=file, column=schema.key,
                             row=_first_bad(dup))
    return result
