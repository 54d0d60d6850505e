"""Bodies of the bulk import routes (`/imports`)."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from app.catalogue.models import ImportJob

ImportStatus = Literal["queued", "running", "succeeded", "failed", "cancelled"]


class ImportUpload(BaseModel):
    """An import file as a multipart form."""

    model_config = ConfigDict(extra="forbid")

    file: bytes = Field(
        description="A CSV (`.csv`, `text/csv`) or JSONL (`.jsonl`, `.ndjson`, "
        "`application/x-ndjson`) file of products, UTF-8: the columns and fields of "
        "`vsearch ingest`; image values must be http(s) URLs (or, in JSONL, `data`)."
    )


class ImportLinks(BaseModel):
    self: str
    failures: str
    cancel: str


class ImportJobRead(BaseModel):
    id: str = Field(description="The job's id.")
    status: ImportStatus = Field(
        description="queued -> running -> succeeded; or failed (an internal error, see "
        "`error`) or cancelled."
    )
    filename: str | None = Field(description="The uploaded file's name.")
    format: Literal["csv", "jsonl"]
    total: int = Field(description="Records (products) in the file.")
    done: int = Field(description="Records processed so far.")
    succeeded: int = Field(description="Products created or changed.")
    skipped: int = Field(
        description="Products already stored as they are in the file (a re-imported file, "
        "or a batch done again after a restart): nothing was embedded again."
    )
    failed: int = Field(description="Records that did not become products (see `failures`).")
    progress: float = Field(ge=0, le=1, description="`done / total`.")
    error: str | None = Field(description="Why a `failed` job stopped.")
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    links: ImportLinks

    @classmethod
    def of(cls, job: ImportJob) -> ImportJobRead:
        base = f"/imports/{job.public_id}"
        return cls(
            id=job.public_id,
            status=job.status,
            filename=job.filename,
            format=job.kind,
            total=job.total,
            done=job.cursor,
            succeeded=job.succeeded,
            skipped=job.skipped,
            failed=job.failed,
            progress=round(job.cursor / job.total, 4) if job.total else 1.0,
            error=job.error,
            created_at=job.created_at,
            started_at=job.started_at,
            finished_at=job.finished_at,
            links=ImportLinks(self=base, failures=f"{base}/failures", cancel=f"{base}/cancel"),
        )


class ImportJobsRead(BaseModel):
    imports: list[ImportJobRead] = Field(description="Newest first.")
    next_cursor: str | None
