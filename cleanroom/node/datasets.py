"""Node-side access to datasets for other subsystems (queries, PSI, training).

``load_dataset(ctx, name)`` returns the current version as a pandas DataFrame,
``load_dataset_table(ctx, name)`` as an Arrow table; identifier columns are already
normalised. These are for code running inside this node: results must never be sent to a
peer as rows. Ingest lives in :mod:`cleanroom.storage.datasets`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from cleanroom.node.context import NodeContext
from cleanroom.storage.datasets import (
    DatasetInfo,
    IngestReport,
    dataset_info,
    ingest_file,
    list_datasets,
    read_dataset,
)

if TYPE_CHECKING:
    import pandas as pd
    import pyarrow as pa

__all__ = [
    "add_dataset",
    "dataset_summary",
    "datasets",
    "load_dataset",
    "load_dataset_table",
]


def load_dataset_table(
    ctx: NodeContext, name: str, *, columns: Sequence[str] | None = None, verify: bool = False
) -> pa.Table:
    return read_dataset(ctx.engine, ctx.data_dir, name, columns=columns, verify=verify)


def load_dataset(
    ctx: NodeContext, name: str, *, columns: Sequence[str] | None = None, verify: bool = False
) -> pd.DataFrame:
    """The current version of dataset ``name`` as a DataFrame (ids normalised, ``<NA>`` if
    invalid)."""
    return load_dataset_table(ctx, name, columns=columns, verify=verify).to_pandas()


def add_dataset(
    ctx: NodeContext,
    name: str,
    source: Path,
    id_columns: str | Sequence[str],
    *,
    fmt: str | None = None,
    source_name: str | None = None,
) -> IngestReport:
    return ingest_file(
        ctx.engine, ctx.data_dir, name, source, id_columns, fmt=fmt, source_name=source_name
    )


def datasets(ctx: NodeContext) -> list[DatasetInfo]:
    return list_datasets(ctx.engine)


def dataset_summary(ctx: NodeContext, name: str) -> DatasetInfo:
    return dataset_info(ctx.engine, name)
