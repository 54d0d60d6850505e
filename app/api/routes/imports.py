"""Bulk import routes: upload a file of products, follow its job, read its failures, cancel."""

from __future__ import annotations

import asyncio
import csv
import io
import json
from collections.abc import AsyncIterator
from typing import Annotated, Literal

from fastapi import APIRouter, Path, Query, Request, Response
from fastapi.responses import StreamingResponse
from starlette.datastructures import UploadFile

from app.api import examples
from app.api.bodies import MULTIPART, UnsupportedMediaType, request_body
from app.api.deps import ImportsDep
from app.api.errors import error_responses
from app.api.import_schemas import ImportJobRead, ImportJobsRead, ImportUpload
from app.api.security import RateLimitDep, ReadKeyDep, ScopeDep, WriteKeyDep
from app.catalogue.imports import ImportService
from app.catalogue.models import ImportJob
from app.core.cursor import InvalidCursor, decode_cursor, encode_cursor
from app.core.errors import (
    ImportFileInvalid,
    ImportFinished,
    ImportNotFound,
    InvalidRequest,
    NotReady,
    RateLimited,
    RequestTooLarge,
)

router = APIRouter(
    prefix="/imports",
    tags=["products"],
    dependencies=[RateLimitDep],
    responses=error_responses(RateLimited),
)

JobId = Annotated[str, Path(max_length=64, description="The import job's id.")]
_FAILURES_PAGE = 1000

CREATE_DESCRIPTION = """
Upload a CSV or JSONL file of products (multipart, field `file`) to be indexed in the
background; the answer is `202` with the job, whose `links.self` tells its progress. The
file has the columns (CSV: `id`, `image`, `title`, `category`, `attributes`, `labels` as
`key=value,key=value`, `sets` as `a|b`, `bbox_x`/`bbox_y`/`bbox_w`/`bbox_h`; one row per
image, rows of a product adjacent) or fields (JSONL: one product per line as in
`POST /products`) of `vsearch ingest`. Images are http(s) URLs, fetched with the same
limits as `POST /products` (in JSONL also `{"data": "<base64>"}`); server paths are refused.

The file is checked as a whole at once: a file that is not CSV or JSONL, not UTF-8, has no
`id` or `image` column, or holds no records is a 422 `import_file_invalid` naming the
reason. Each record is then its own product: one that fails (an unreadable row, an image
that cannot be fetched or decoded) is counted in `failed` and listed by
`GET /imports/{job_id}/failures`, and the others go on. Products are upserts, as in
`POST /products`: importing a file again changes nothing and embeds nothing twice.

With a key scoped to product sets (`VS_API_KEY_SCOPES`), every product of the file must
be in at least one set of the scope and in none outside it; a record that is not fails as
`forbidden`. Only keys of the same scope (and unscoped keys) see the job.

Jobs run one at a time per server, a few products at once, so searches keep the model.
Progress is committed every `VS_IMPORTS__BATCH_SIZE` records; a server restarted
mid-job resumes it there.
"""


@router.post(
    "",
    status_code=202,
    response_model=ImportJobRead,
    summary="Import a file of products (asynchronous)",
    description=CREATE_DESCRIPTION,
    responses=error_responses(
        ImportFileInvalid, InvalidRequest, RequestTooLarge, UnsupportedMediaType, NotReady
    )
    | {202: {"content": {"application/json": {"example": examples.IMPORT_JOB_READ}}}},
    openapi_extra=request_body(ImportUpload, MULTIPART),
)
async def create_import(
    request: Request,
    response: Response,
    imports: ImportsDep,
    _key: WriteKeyDep,
    scope: ScopeDep,
) -> ImportJobRead:
    if request.headers.get("content-type", "").split(";")[0].strip().lower() != MULTIPART:
        raise UnsupportedMediaType(f"Send {MULTIPART} with the file in the field `file`.")
    async with request.form(max_files=1, max_fields=0) as form:
        unknown = sorted(set(form.keys()) - {"file"})
        if unknown:
            raise InvalidRequest(f"Unknown form field(s) {unknown}; send the file as `file`.")
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise InvalidRequest("file: send the import file in the form field `file`.")
        job = await asyncio.to_thread(
            imports.create, upload.file, upload.filename, upload.content_type, scope
        )
    imports.wake()
    response.headers["Location"] = f"/imports/{job.public_id}"
    return ImportJobRead.of(job)


@router.get(
    "",
    response_model=ImportJobsRead,
    summary="List import jobs",
    description="Import jobs, newest first, a page at a time; follow `next_cursor`.",
    responses=error_responses(InvalidCursor, NotReady) | examples.ok(examples.IMPORT_JOBS_READ),
)
async def list_imports(
    imports: ImportsDep,
    _key: ReadKeyDep,
    scope: ScopeDep,
    cursor: Annotated[str | None, Query(description="From the previous page.")] = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
) -> ImportJobsRead:
    before = int(decode_cursor(cursor, "imports", (int,))[0]) if cursor else None
    jobs = await asyncio.to_thread(imports.list_jobs, before_pk=before, limit=limit, scope=scope)
    next_cursor = encode_cursor("imports", (jobs[-1].pk,)) if len(jobs) == limit else None
    return ImportJobsRead(imports=[ImportJobRead.of(j) for j in jobs], next_cursor=next_cursor)


@router.get(
    "/{job_id}",
    response_model=ImportJobRead,
    summary="Get an import job",
    description="The job's status, counts and progress.",
    responses=error_responses(ImportNotFound, NotReady) | examples.ok(examples.IMPORT_JOB_READ),
)
async def get_import(
    job_id: JobId, imports: ImportsDep, _key: ReadKeyDep, scope: ScopeDep
) -> ImportJobRead:
    return ImportJobRead.of(await asyncio.to_thread(imports.get, job_id, scope))


@router.get(
    "/{job_id}/failures",
    summary="List an import job's failed records",
    description=(
        "Every record that did not become a product so far, in file order: its `line` "
        "(the JSONL line; in CSV the line of the product's first row), the product id when "
        "it could be read, and the error's `code` and `message` (as in the error envelope). "
        "JSON lines by default, `?format=csv` for CSV with a header row."
    ),
    response_class=StreamingResponse,
    responses={
        200: {
            "description": "The failures.",
            "content": {
                "application/x-ndjson": {"schema": {"type": "string"}},
                "text/csv": {"schema": {"type": "string"}},
            },
        },
        **error_responses(ImportNotFound, NotReady),
    },
)
async def list_import_failures(
    job_id: JobId,
    imports: ImportsDep,
    _key: ReadKeyDep,
    scope: ScopeDep,
    format: Annotated[
        Literal["jsonl", "csv"], Query(description="jsonl (default) or csv.")
    ] = "jsonl",
) -> StreamingResponse:
    job = await asyncio.to_thread(imports.get, job_id, scope)
    media = "text/csv; charset=utf-8" if format == "csv" else "application/x-ndjson"
    return StreamingResponse(_failures(imports, job, format), media_type=media)


async def _failures(imports: ImportService, job: ImportJob, format: str) -> AsyncIterator[str]:
    after = 0
    if format == "csv":
        yield "line,product_id,code,message\r\n"
    while True:
        page = await asyncio.to_thread(
            imports.failures, job, after_line=after, limit=_FAILURES_PAGE
        )
        out = io.StringIO()
        writer = csv.writer(out)
        for f in page:
            if format == "csv":
                writer.writerow([f.line, f.product_id or "", f.code, f.message])
            else:
                row = {"line": f.line, "product_id": f.product_id, "code": f.code}
                out.write(json.dumps(row | {"message": f.message}) + "\n")
        yield out.getvalue()
        if len(page) < _FAILURES_PAGE:
            return
        after = page[-1].line


@router.post(
    "/{job_id}/cancel",
    response_model=ImportJobRead,
    summary="Cancel an import job",
    description=(
        "Stops a queued or running job before the next product it would start; what it "
        "indexed stays. A job that has already ended is a 409 `import_finished`."
    ),
    responses=error_responses(ImportNotFound, ImportFinished, NotReady)
    | examples.ok(examples.IMPORT_JOB_CANCELLED),
)
async def cancel_import(
    job_id: JobId, imports: ImportsDep, _key: WriteKeyDep, scope: ScopeDep
) -> ImportJobRead:
    return ImportJobRead.of(await asyncio.to_thread(imports.cancel, job_id, scope))
