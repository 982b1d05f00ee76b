"""Node-side access to datasets for other subsystems (queries, PSI, training).

``load_dataset(ctx, name)`` returns the current version as a pandas DataFrame,
``load_dataset_table(ctx, name)`` as an Arrow table; identifier columns are already
normalised. These are for code running inside this node: results must never be sent to a
peer as rows. Ingest lives in :mod:`cleanroom.storage.datasets`.

:func:`release_memory` hands freed heap pages back to the operating system (Arrow's pool,
then glibc's ``malloc_trim``); :func:`add_dataset` calls it after every ingest, because
parsing and normalising a large file leaves hundreds of MiB freed but still resident,
which would otherwise add to the peak of the next query. It must not change any data.
"""

from __future__ import annotations

import ctypes
import functools
import platform
from collections.abc import Callable, Sequence
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
    "release_memory",
]


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, or ``None`` on other C libraries (musl, macOS, Windows)."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        trim: Callable[[int], int] = ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None
    return trim


def release_memory() -> None:
    """Return freed memory to the OS: Arrow's unused pool pages, then the C heap's free
    pages (``malloc_trim(0)`` on glibc; nothing elsewhere). Cheap (milliseconds); call it
    after dropping a large frame, table or item list."""
    import pyarrow as pa

    pa.default_memory_pool().release_unused()
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


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
    try:
        return ingest_file(
            ctx.engine, ctx.data_dir, name, source, id_columns, fmt=fmt, source_name=source_name
        )
    finally:
        release_memory()  # the parsed and normalised file is garbage now


def datasets(ctx: NodeContext) -> list[DatasetInfo]:
    return list_datasets(ctx.engine)


def dataset_summary(ctx: NodeContext, name: str) -> DatasetInfo:
    return dataset_info(ctx.engine, name)
