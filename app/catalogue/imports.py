"""Bulk imports over HTTP: a CSV or JSONL file of products, ingested in the background.

The file is checked as a whole when it arrives (format, encoding, required columns; its
records counted), stored under `<data dir>/imports/`, and a job row is written. One
runner per process works through the jobs one at a time, in order, through the same
reader (`app.catalogue.ingest.read_records`) and the same service as `vsearch ingest` and
`POST /products`; image values must be URLs or inline data (a file sent over HTTP names
no server paths). A batch of records is ingested, then its counts, its failures and the
advanced cursor are committed in one transaction. A process that stops mid-batch leaves
the job `running` with the cursor of its last batch; the next start resumes there, and
the re-done products (stored already) come back `unchanged`, so nothing is duplicated.

A job runs where its file is: with replicas sharing a database, each runs the jobs that
were uploaded to it. Cancelling marks the job at once; the runner stops before the next
product it would start.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import itertools
import logging
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from app.catalogue import import_repository as repo
from app.catalogue.import_repository import FailedRecord
from app.catalogue.ingest import ProductRecord, read_records
from app.catalogue.models import ImportFailure, ImportJob
from app.catalogue.scope import Scope, sets_within
from app.catalogue.service import CatalogueService, ProductInput, ProductResult
from app.core.database import Database
from app.core.errors import (
    ImportFileInvalid,
    ImportFinished,
    ImportNotFound,
    InvalidRequest,
    Overloaded,
    RequestTooLarge,
    ServiceError,
)

LOG = logging.getLogger(__name__)

KINDS = {
    ".csv": "csv",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    "text/csv": "csv",
    "application/jsonl": "jsonl",
    "application/x-ndjson": "jsonl",
    "application/x-jsonlines": "jsonl",
}
_COPY_CHUNK = 1024 * 1024
_RETRY_RUNNER_S = 5.0


@dataclass(frozen=True)
class BatchOutcome:
    records: int
    succeeded: int
    skipped: int
    failures: list[FailedRecord]


class ImportService:
    """Accepts import files, answers for their jobs, and runs them in the background."""

    def __init__(
        self,
        db: Database,
        catalogue: CatalogueService,
        directory: Path,
        *,
        batch_size: int = 32,
        concurrency: int = 4,
        max_bytes: int = 64 * 1024 * 1024,
        retry_s: float = 0.5,
    ) -> None:
        self.db = db
        self.catalogue = catalogue
        self.directory = directory
        self.batch_size = batch_size
        self.concurrency = concurrency
        self.max_bytes = max_bytes
        self.retry_s = retry_s
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._cancelled: set[str] = set()
        self._current: str | None = None

    # requests ---------------------------------------------------------------------------
    def create(
        self,
        upload: BinaryIO,
        filename: str | None,
        content_type: str | None,
        scope: Scope = None,
    ) -> ImportJob:
        """Store an uploaded file and queue its job (blocking: call it in a thread). A
        job uploaded with a key scoped to product sets keeps that scope: each of its
        products must be in those sets, and only keys of that scope see the job."""
        kind = _kind(filename, content_type)
        self.directory.mkdir(parents=True, exist_ok=True)
        public_id = uuid.uuid4().hex
        path = self.directory / f"{public_id}.{kind}"
        partial = path.with_suffix(".part")
        try:
            _copy(upload, partial, self.max_bytes)
            total = _count_records(partial, kind)
            partial.rename(path)
            with self.db.write() as session:
                job = repo.add_job(
                    session,
                    public_id=public_id,
                    kind=kind,
                    filename=(filename or "")[:256] or None,
                    total=total,
                    scope=scope_key(scope),
                )
        except BaseException:
            partial.unlink(missing_ok=True)
            path.unlink(missing_ok=True)
            raise
        LOG.info("import %s queued: %s, %d records", public_id, filename, total)
        return job

    def get(self, public_id: str, scope: Scope = None) -> ImportJob:
        """The job; 404 also for a job of another scope (as if it did not exist)."""
        with self.db.read() as session:
            job = repo.get_job(session, public_id)
        if job is None or not _visible(job, scope):
            raise ImportNotFound(f"No import job with id {public_id!r}.")
        return job

    def list_jobs(
        self, *, before_pk: int | None, limit: int, scope: Scope = None
    ) -> list[ImportJob]:
        with self.db.read() as session:
            return repo.list_jobs(session, before_pk=before_pk, limit=limit, scope=scope_key(scope))

    def failures(self, job: ImportJob, *, after_line: int, limit: int) -> list[ImportFailure]:
        with self.db.read() as session:
            return repo.failures(session, job.pk, after_line=after_line, limit=limit)

    def cancel(self, public_id: str, scope: Scope = None) -> ImportJob:
        """Stop a queued or running job (it keeps what it stored); 409 once it has ended."""
        with self.db.write() as session:
            job = repo.get_job(session, public_id, for_update=True)
            if job is None or not _visible(job, scope):
                raise ImportNotFound(f"No import job with id {public_id!r}.")
            if job.status not in repo.UNFINISHED:
                raise ImportFinished(f"The import job {public_id!r} has already {job.status}.")
            repo.finish_job(session, job.pk, repo.CANCELLED)
            session.refresh(job)
        if self._current == public_id:
            self._cancelled.add(public_id)  # stops the runner before its next chunk
        else:
            self._path(job).unlink(missing_ok=True)
        LOG.info("import %s cancelled after %d of %d records", public_id, job.cursor, job.total)
        return job

    # the runner -------------------------------------------------------------------------
    def start(self) -> None:
        """Run the unfinished jobs whose files are here, then each new one as it comes."""
        self._task = asyncio.create_task(self._run(), name="vsearch-imports")

    async def stop(self) -> None:
        """Stop at once; a job interrupted mid-batch resumes at the next start."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def wake(self) -> None:
        self._wake.set()

    async def _run(self) -> None:
        while True:
            self._wake.clear()
            try:
                jobs = await asyncio.to_thread(self._runnable)
                for job in jobs:
                    await self._process(job)
            except Exception:  # the database away: the jobs wait, the runner goes on
                LOG.exception("import runner: retrying in %.0f s", _RETRY_RUNNER_S)
                await asyncio.sleep(_RETRY_RUNNER_S)
                continue
            if not jobs:
                await self._wake.wait()

    def _runnable(self) -> list[ImportJob]:
        with self.db.read() as session:
            jobs = repo.unfinished_jobs(session)
        return [j for j in jobs if self._path(j).is_file()]

    def _path(self, job: ImportJob) -> Path:
        return self.directory / f"{job.public_id}.{job.kind}"

    async def _process(self, job: ImportJob) -> None:
        self._current = job.public_id
        ended = True
        try:
            if not await asyncio.to_thread(self._start, job):
                return
            LOG.info("import %s running from record %d of %d", job.public_id, job.cursor, job.total)
            records = read_records(self._path(job), allow_paths=False, kind=job.kind)
            await asyncio.to_thread(_skip, records, job.cursor)
            while True:
                batch = await asyncio.to_thread(_take, records, self.batch_size)
                if not batch:
                    break
                outcome = await self._ingest(job, batch)
                status = await asyncio.to_thread(self._record, job, outcome)
                if status != repo.RUNNING or job.public_id in self._cancelled:
                    LOG.info("import %s stopped: %s", job.public_id, status)
                    return
            await asyncio.to_thread(self._finish, job, repo.SUCCEEDED, None)
            LOG.info("import %s succeeded", job.public_id)
        except asyncio.CancelledError:
            ended = False  # shutting down: the job resumes at the next start
            raise
        except Exception as exc:
            LOG.exception("import %s failed", job.public_id)
            message = f"The import stopped on an internal error ({type(exc).__name__})."
            await asyncio.to_thread(self._finish, job, repo.FAILED, message)
        finally:
            self._current = None
            self._cancelled.discard(job.public_id)
            if ended:
                self._path(job).unlink(missing_ok=True)

    def _start(self, job: ImportJob) -> bool:
        with self.db.write() as session:
            return repo.start_job(session, job.pk)

    def _record(self, job: ImportJob, outcome: BatchOutcome) -> str:
        with self.db.write() as session:
            return repo.record_batch(
                session,
                job.pk,
                records=outcome.records,
                succeeded=outcome.succeeded,
                skipped=outcome.skipped,
                failures=outcome.failures,
            )

    def _finish(self, job: ImportJob, status: str, error: str | None) -> None:
        with self.db.write() as session:
            repo.finish_job(session, job.pk, status, error)

    async def _ingest(self, job: ImportJob, batch: Sequence[ProductRecord]) -> BatchOutcome:
        """Ingest a batch a few products at a time; a cancel stops it between chunks, and
        the outcome then covers the records done."""
        done = succeeded = skipped = 0
        failures: list[FailedRecord] = []
        for start in range(0, len(batch), self.concurrency):
            if job.public_id in self._cancelled:
                break
            chunk = batch[start : start + self.concurrency]
            refused = _out_of_scope(chunk, job_scope(job))
            products = [r.product for r in chunk if r.product is not None and id(r) not in refused]
            outcomes = await self._upsert(products, job_scope(job))
            results = dict(zip((id(p) for p in products), outcomes, strict=True))
            for record in chunk:
                if record.error is not None or id(record) in refused:
                    error = record.error or refused[id(record)]
                    failures.append(
                        FailedRecord(
                            record.line, record.product_id, error.code, error.message[:2000]
                        )
                    )
                    continue
                assert record.product is not None
                result = results[id(record.product)]
                if result.status == "failed":
                    code = result.error.code if result.error else "internal_error"
                    message = result.error.message if result.error else ""
                    failures.append(FailedRecord(record.line, result.id, code, message[:2000]))
                elif result.status == "unchanged":
                    skipped += 1
                else:
                    succeeded += 1
            done += len(chunk)
        return BatchOutcome(done, succeeded, skipped, failures)

    async def _upsert(self, products: list[ProductInput], scope: Scope) -> list[ProductResult]:
        """Results in order; a product refused because the model is busy (searches come
        first) is tried again, never failed."""
        results = await self.catalogue.upsert_products(products, scope)
        while busy := [i for i, r in enumerate(results) if isinstance(r.error, Overloaded)]:
            await asyncio.sleep(self.retry_s)
            again = await self.catalogue.upsert_products([products[i] for i in busy], scope)
            for i, result in zip(busy, again, strict=True):
                results[i] = result
        return results


def scope_key(scope: Scope) -> str | None:
    """A scope as the job stores it: its sets sorted and comma-joined (set ids have no
    commas)."""
    return None if scope is None else ",".join(sorted(scope))


def job_scope(job: ImportJob) -> Scope:
    return None if job.scope is None else frozenset(job.scope.split(","))


def _visible(job: ImportJob, scope: Scope) -> bool:
    """Unscoped keys see every job; a scoped key sees the jobs uploaded under its scope."""
    return scope is None or job.scope == scope_key(scope)


def _out_of_scope(records: Sequence[ProductRecord], scope: Scope) -> dict[int, ServiceError]:
    """The records (by id()) whose product a job of `scope` may not write: no sets, or
    sets outside it (`forbidden`, as POST /products answers)."""
    refused: dict[int, ServiceError] = {}
    for record in records:
        if record.product is None:
            continue
        try:
            sets_within(record.product.sets, scope, record.product.id)
        except ServiceError as exc:
            refused[id(record)] = exc
    return refused


def _kind(filename: str | None, content_type: str | None) -> str:
    suffix = Path(filename or "").suffix.lower()
    media = (content_type or "").split(";")[0].strip().lower()
    kind = KINDS.get(suffix) or KINDS.get(media)
    if kind is None:
        raise ImportFileInvalid(
            f"Send a .csv or .jsonl file (got {filename!r}, {media or 'no content type'})."
        )
    return kind


def _copy(upload: BinaryIO, path: Path, max_bytes: int) -> None:
    written = 0
    with path.open("wb") as out:
        while chunk := upload.read(_COPY_CHUNK):
            written += len(chunk)
            if written > max_bytes:
                raise RequestTooLarge(
                    f"The import file is larger than {max_bytes} bytes (VS_IMPORTS__MAX_BYTES)."
                )
            out.write(chunk)


def _count_records(path: Path, kind: str) -> int:
    """Read the whole file once: what cannot be read as a whole is refused now, with the
    reason; a record that is not a product only fails itself, later."""
    try:
        total = sum(1 for _ in read_records(path, allow_paths=False, kind=kind))
    except InvalidRequest as exc:
        raise ImportFileInvalid(exc.message) from None
    except UnicodeDecodeError as exc:
        raise ImportFileInvalid(
            f"The file is not UTF-8 text (byte {exc.start}: {exc.reason})."
        ) from None
    except csv.Error as exc:
        raise ImportFileInvalid(f"The file is not readable CSV ({exc}).") from None
    if total == 0:
        raise ImportFileInvalid("The file holds no records.")
    return total


def _skip(records: Iterator[ProductRecord], count: int) -> None:
    for _ in itertools.islice(records, count):
        pass


def _take(records: Iterator[ProductRecord], count: int) -> list[ProductRecord]:
    return list(itertools.islice(records, count))
