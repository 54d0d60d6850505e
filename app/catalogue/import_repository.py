"""SQL of the import jobs (`import_jobs`, `import_failures`); callers own the transaction."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from app.catalogue.models import ImportFailure, ImportJob, utcnow

QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED = (
    "queued",
    "running",
    "succeeded",
    "failed",
    "cancelled",
)
UNFINISHED = (QUEUED, RUNNING)


@dataclass(frozen=True)
class FailedRecord:
    line: int
    product_id: str | None
    code: str
    message: str


def add_job(
    session: Session,
    *,
    public_id: str,
    kind: str,
    filename: str | None,
    total: int,
    scope: str | None = None,
) -> ImportJob:
    job = ImportJob(
        public_id=public_id,
        scope=scope,
        status=QUEUED,
        kind=kind,
        filename=filename,
        total=total,
        cursor=0,
        succeeded=0,
        skipped=0,
        failed=0,
    )
    session.add(job)
    session.flush()
    return job


def get_job(session: Session, public_id: str, *, for_update: bool = False) -> ImportJob | None:
    query = select(ImportJob).where(ImportJob.public_id == public_id)
    if for_update:
        query = query.with_for_update()
    return session.scalars(query).one_or_none()


def list_jobs(
    session: Session, *, before_pk: int | None, limit: int, scope: str | None = None
) -> list[ImportJob]:
    """Newest first; with `scope`, only the jobs uploaded under that scope."""
    query = select(ImportJob).order_by(ImportJob.pk.desc()).limit(limit)
    if scope is not None:
        query = query.where(ImportJob.scope == scope)
    if before_pk is not None:
        query = query.where(ImportJob.pk < before_pk)
    return list(session.scalars(query))


def unfinished_jobs(session: Session) -> list[ImportJob]:
    """Queued and running jobs, oldest first (the order they are run in)."""
    query = select(ImportJob).where(ImportJob.status.in_(UNFINISHED)).order_by(ImportJob.pk)
    return list(session.scalars(query))


def start_job(session: Session, job_pk: int) -> bool:
    """Mark a queued (or interrupted running) job running; False if it finished meanwhile."""
    now = utcnow()
    result = session.execute(
        update(ImportJob)
        .where(ImportJob.pk == job_pk, ImportJob.status.in_(UNFINISHED))
        .values(status=RUNNING)
    )
    session.execute(
        update(ImportJob)
        .where(ImportJob.pk == job_pk, ImportJob.started_at.is_(None))
        .values(started_at=now)
    )
    return bool(result.rowcount)  # type: ignore[attr-defined]


def record_batch(
    session: Session,
    job_pk: int,
    *,
    records: int,
    succeeded: int,
    skipped: int,
    failures: Sequence[FailedRecord],
) -> str:
    """Add one batch's counts and failures and advance the cursor; the job's status after."""
    session.execute(
        update(ImportJob)
        .where(ImportJob.pk == job_pk)
        .values(
            cursor=ImportJob.cursor + records,
            succeeded=ImportJob.succeeded + succeeded,
            skipped=ImportJob.skipped + skipped,
            failed=ImportJob.failed + len(failures),
        )
    )
    session.add_all(
        ImportFailure(
            job_pk=job_pk, line=f.line, product_id=f.product_id, code=f.code, message=f.message
        )
        for f in failures
    )
    status = session.scalar(select(ImportJob.status).where(ImportJob.pk == job_pk))
    return str(status)


def finish_job(session: Session, job_pk: int, status: str, error: str | None = None) -> bool:
    """End a job that is still unfinished; False if it had ended already (cancelled)."""
    result = session.execute(
        update(ImportJob)
        .where(ImportJob.pk == job_pk, ImportJob.status.in_(UNFINISHED))
        .values(status=status, error=error, finished_at=utcnow())
    )
    return bool(result.rowcount)  # type: ignore[attr-defined]


def failures(
    session: Session, job_pk: int, *, after_line: int = 0, limit: int = 10_000
) -> list[ImportFailure]:
    query = (
        select(ImportFailure)
        .where(ImportFailure.job_pk == job_pk, ImportFailure.line > after_line)
        .order_by(ImportFailure.line)
        .limit(limit)
    )
    return list(session.scalars(query))
