"""Operator endpoints for datasets: list, show, and add a version by streamed upload.

``POST /v1/datasets/{name}/versions?id_columns=phone,email&format=csv&filename=leads.csv``
takes the file as the raw request body (any size up to ``limits.max_upload_bytes``), writes
it to a private temporary file in chunks, then ingests it exactly like ``cleanroom dataset
add``. Responses carry schema and counts only. There is no peer endpoint here: peers can
never read rows.
"""

from __future__ import annotations

import contextlib
import logging
import os
import uuid
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Query, Request
from starlette.concurrency import run_in_threadpool

from cleanroom.errors import InputError
from cleanroom.node.context import NodeContext
from cleanroom.node.datasets import add_dataset, dataset_summary, datasets
from cleanroom.node.deps import NodeContextDep, OperatorAuth, body_limit
from cleanroom.storage.datasets import check_name

UPLOADS_SUBDIR = "uploads"
log = logging.getLogger("cleanroom.node.datasets")


def _record_ingest(ctx: NodeContext) -> None:
    """Record the new version in the audit ledger (``dataset_registered``).

    The version is already committed; if recording fails now, the next reconcile (any
    later ingest, witnessing round or node start) records it, so the upload still succeeds.
    """
    from cleanroom.errors import CleanroomError
    from cleanroom.node.audit import reconcile

    try:
        reconcile(ctx)
    except CleanroomError as exc:
        log.warning("dataset version stored; its ledger entry is deferred: %s", exc)


def routers(ctx: NodeContext) -> list[APIRouter]:
    router = APIRouter(prefix="/v1/datasets", tags=["datasets (operator)"])

    @router.get("", summary="Datasets with the schema and counts of their current version")
    def list_all(_op: OperatorAuth, ctx: NodeContextDep) -> list[dict[str, Any]]:
        return [d.as_dict() for d in datasets(ctx)]

    @router.get("/{name}", summary="One dataset's current version: schema and counts")
    def show(name: str, _op: OperatorAuth, ctx: NodeContextDep) -> dict[str, Any]:
        return dataset_summary(ctx, name).as_dict()

    @router.post(
        "/{name}/versions",
        status_code=201,
        summary="Add a version: the CSV or Parquet file is the streamed request body",
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {
                    "text/csv": {"schema": {"type": "string", "format": "binary"}},
                    "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
                },
            }
        },
    )
    @body_limit("upload")
    async def add_version(
        name: str,
        request: Request,
        _op: OperatorAuth,
        ctx: NodeContextDep,
        id_columns: str = Query(
            "", description="e.g. phone,email,device_id or col:kind; empty for none"
        ),
        format: str | None = Query(None, pattern="^(csv|tsv|parquet)$"),
        filename: str | None = Query(None, max_length=255),
    ) -> dict[str, Any]:
        check_name(name)
        shown = Path(filename).name if filename else f"{name}.{format or 'csv'}"
        folder = ctx.data_dir / UPLOADS_SUBDIR
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".upload-{uuid.uuid4().hex}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "wb") as f:
                async for chunk in request.stream():
                    f.write(chunk)
            if tmp.stat().st_size == 0:
                raise InputError("the request body (the file) is empty", file=shown)
            report = await run_in_threadpool(
                add_dataset, ctx, name, tmp, id_columns, fmt=format, source_name=shown
            )
            await run_in_threadpool(_record_ingest, ctx)
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        return report.as_dict()

    return [router]
