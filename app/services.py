"""The composition root: every long-lived part of the service is built here, once.

The FastAPI lifespan and every CLI command open the parts they need through the two
context managers below, so a new dependency is wired in one place:

- `open_storage(settings)`: the catalogue database, the vector index and the duplicates
  service; no model. For commands that never embed (`reindex`, `duplicates scan`).
- `open_services(settings)`: all of it, plus the model, the admission control, the batching
  worker, the URL fetcher and the catalogue and search services.

Both bundles are frozen and have no optional fields: whoever holds one can use all of it.
Everything is released in reverse order on exit (the worker drains its queue, the index is
saved, the database pool is disposed), also when start-up fails halfway.
"""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack, ExitStack, asynccontextmanager, contextmanager
from dataclasses import dataclass

import numpy as np

from app.catalogue import repository as repo
from app.catalogue.calibration import CalibrationPolicy
from app.catalogue.duplicates import DuplicatesService
from app.catalogue.feed import CatalogueEmbeddings, change_feed
from app.catalogue.imports import ImportService
from app.catalogue.notify import ChangeListener
from app.catalogue.rerank import SearchQuality
from app.catalogue.search import SearchService
from app.catalogue.service import CatalogueService
from app.core.config import DEFAULT_MODEL, Settings
from app.core.database import Database
from app.core.errors import ModelUnavailable
from app.core.migrations import ensure_schema
from app.imaging.decode import DecodeLimits, ImageDecoder
from app.imaging.fetch import FetchLimits, ImageFetcher
from app.index.lifecycle import IndexService
from app.inference.admission import Admission
from app.inference.loading import CONFIG_FILE
from app.inference.runtime import Embedder, load_model
from app.inference.worker import BatchObserver, BatchWorker

LOG = logging.getLogger(__name__)

FALLBACK_MODEL_DIR = "models/efficientnet-lite0-imagenet"


class ModelMismatch(RuntimeError):
    """The catalogue holds embeddings of another model than the one loaded."""


@dataclass(frozen=True)
class Storage:
    """The catalogue and its derived index: what every command needs, no model."""

    settings: Settings
    db: Database
    index: IndexService
    duplicates: DuplicatesService

    @property
    def model_id(self) -> str:
        return self.index.model_id


@dataclass(frozen=True)
class Services:
    """Everything a request or a CLI command may use, created once per process."""

    settings: Settings
    db: Database
    index: IndexService
    duplicates: DuplicatesService
    embedder: Embedder
    model_fallback: bool
    admission: Admission
    worker: BatchWorker
    fetcher: ImageFetcher
    catalogue: CatalogueService
    search: SearchService
    imports: ImportService


# the parts ------------------------------------------------------------------------------
def open_database(settings: Settings) -> Database:
    """The catalogue database, migrated (or checked) per `VS_MIGRATE_ON_START`."""
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    db = Database(settings.resolved_database_url)
    LOG.info(
        "catalogue: %s; data directory: %s", db.engine.url.render_as_string(), settings.data_dir
    )
    try:
        ensure_schema(db, migrate=settings.migrate_on_start)
    except BaseException:
        db.dispose()
        raise
    return db


def load_embedder(settings: Settings) -> tuple[Embedder, bool]:
    """Load `VS_MODEL`; fall back to the offline ImageNet model only for the hub default.

    Returns:
        The embedder and whether it is the fallback model.
    """
    try:
        return (
            load_model(settings.model, settings.device, settings.precision, settings.runtime),
            False,
        )
    except ModelUnavailable as exc:
        if settings.model != DEFAULT_MODEL:
            raise
        from app.inference.builders import init_pretrained

        target = settings.data_dir / FALLBACK_MODEL_DIR
        LOG.warning(
            "!!! %s FALLING BACK to the generic ImageNet EfficientNet-Lite0 model in %s: "
            "search works, but product-level quality is far below the Trendyol model. "
            "Embeddings carry the model id, so they will not mix with the real model's later.",
            exc,
            target,
        )
        if not (target / CONFIG_FILE).is_file():
            init_pretrained(target)
        return load_model(target, settings.device, settings.precision, settings.runtime), True


def check_model_matches_catalogue(db: Database, model_id: str) -> None:
    """Refuse to serve a catalogue embedded by another model (they must never mix)."""
    with db.read() as session:
        counts = repo.model_id_counts(session)
    others = {m: n for m, n in counts.items() if m != model_id}
    if others:
        listing = ", ".join(f"{m} ({n} images)" for m, n in sorted(others.items()))
        raise ModelMismatch(
            f"The catalogue holds embeddings of another model: {listing}; the loaded model is "
            f"{model_id}. Embeddings of two models must never be searched together: set "
            "VS_MODEL back to that model, or run `vsearch reembed` to embed the catalogue "
            "again with the new one."
        )


def catalogue_model(db: Database) -> tuple[str, int] | None:
    """The model id and dimension of the catalogue's embeddings (None when it has none);
    refuses a catalogue that mixes models."""
    with db.read() as session:
        counts = repo.model_id_counts(session)
        if not counts:
            return None
        if len(counts) > 1:
            listing = ", ".join(f"{m} ({n} images)" for m, n in sorted(counts.items()))
            raise ModelMismatch(
                f"The catalogue mixes embeddings of several models: {listing}. Run "
                "`vsearch reembed` with the model to keep."
            )
        (model_id,) = counts
        sample = repo.embedding_sample(session, 1, model_id)
    dim = len(sample[0]) // np.dtype(np.float32).itemsize if sample else 0
    return model_id, dim


def make_fetcher(settings: Settings) -> ImageFetcher:
    return ImageFetcher(
        FetchLimits(
            max_bytes=settings.image.max_bytes,
            connect_timeout_s=settings.image.fetch_connect_timeout_s,
            total_timeout_s=settings.image.fetch_timeout_s,
            max_redirects=settings.image.fetch_max_redirects,
            content_codings=settings.image.fetch_content_codings,
            dns_timeout_s=settings.image.fetch_dns_timeout_s,
            dns_threads=settings.image.fetch_dns_threads,
            allow_private=settings.allow_private_urls,
            allowed_hosts=tuple(
                h.strip().lower()
                for h in settings.image.fetch_allowed_hosts.split(",")
                if h.strip()
            ),
        )
    )


def make_worker(
    settings: Settings,
    embedder: Embedder,
    admission: Admission,
    on_batch: BatchObserver | None = None,
) -> BatchWorker:
    return BatchWorker(
        embedder,
        max_size=settings.batch.max_size,
        max_wait_ms=settings.batch.max_wait_ms,
        preprocess_threads=settings.batch.preprocess_threads,
        on_batch=on_batch,
        admission=admission,
    )


def _open_index(
    settings: Settings, db: Database, model_id: str, dim: int, *, tail: bool
) -> IndexService:
    index = IndexService(
        feed=change_feed(db),
        source=CatalogueEmbeddings(db),
        directory=settings.data_dir / "index",
        model_id=model_id,
        dim=dim,
        settings=settings.index,
    )
    index.open()
    if tail:
        index.start_tailing()
    return index


def _close_index(index: IndexService, save: bool) -> None:
    LOG.info("shutting down: %s the index", "saving" if save else "closing")
    index.close(save=save)


def _duplicates(settings: Settings, db: Database, index: IndexService) -> DuplicatesService:
    d = settings.duplicates
    policy = CalibrationPolicy(
        min_labels=d.calibration_min_labels,
        isotonic_labels=d.calibration_isotonic_labels,
        refit_every=d.calibration_refit_every,
        same_probability=d.same_probability,
        exact_score=d.exact_score,
    )
    return DuplicatesService(
        db,
        index,
        floor=d.floor,
        neighbours=d.neighbours,
        replay_limit=d.replay_limit,
        calibration=policy,
    )


def _follow_replicas(
    stack: ExitStack | AsyncExitStack,
    settings: Settings,
    db: Database,
    index: IndexService,
    duplicates: DuplicatesService,
) -> None:
    """Converge with the other replicas that share the database.

    Products they write reach this index through the change log; their duplicate pairs
    are recomputed here as they arrive (unless `VS_DUPLICATES__ON_REPLAY` is off). On
    Postgres a listener wakes the catch-up as soon as any replica commits; the periodic
    catch-up stays as the safety net (and is the only path on SQLite).
    """
    if settings.duplicates.on_replay:
        index.on_replay.append(duplicates.on_replay)
    if settings.index.notify and db.is_postgres:
        listener = ChangeListener(db, index.wake)
        listener.start()
        stack.callback(listener.stop)  # before the index closes (exits run in reverse)


# the bundles ----------------------------------------------------------------------------
@contextmanager
def open_storage(settings: Settings, *, tail: bool = False, save: bool = True) -> Iterator[Storage]:
    """The database, index and duplicates service, without loading the model.

    The index's model id and dimension come from the catalogue's embeddings; an empty
    catalogue has none, and then the configured model is loaded once to learn them.
    """
    with ExitStack() as stack:
        db = open_database(settings)
        stack.callback(db.dispose)
        known = catalogue_model(db)
        if known is None:
            embedder, _ = load_embedder(settings)
            known = (embedder.model_id, embedder.embedding_dim)
            del embedder
        model_id, dim = known
        index = _open_index(settings, db, model_id, dim, tail=tail)
        stack.callback(_close_index, index, save)
        duplicates = _duplicates(settings, db, index)
        if tail:
            _follow_replicas(stack, settings, db, index, duplicates)
        yield Storage(settings, db, index, duplicates)


@dataclass(frozen=True)
class Embedding:
    """The model side: the loaded model, admission control, batching worker, fetcher and
    image decoder."""

    embedder: Embedder
    model_fallback: bool
    admission: Admission
    worker: BatchWorker
    fetcher: ImageFetcher
    decoder: ImageDecoder


@asynccontextmanager
async def open_embedding(
    settings: Settings,
    db: Database,
    *,
    check_catalogue: bool = True,
    on_batch: BatchObserver | None = None,
) -> AsyncIterator[Embedding]:
    """Load the model (refusing one whose embeddings the catalogue does not hold, unless
    `check_catalogue` is off, as for `vsearch reembed`) and start the worker."""
    async with AsyncExitStack() as stack:
        embedder, fallback = await asyncio.to_thread(
            _ready_embedder, settings, db if check_catalogue else None
        )
        admission = Admission(settings.batch.queue_size)
        worker = make_worker(settings, embedder, admission, on_batch)
        worker.start()
        stack.push_async_callback(_drain, worker)
        fetcher = make_fetcher(settings)
        stack.push_async_callback(fetcher.aclose)
        decoder = ImageDecoder(DecodeLimits.from_settings(settings.image))
        stack.callback(decoder.shutdown)
        yield Embedding(embedder, fallback, admission, worker, fetcher, decoder)


def catalogue_service(
    settings: Settings,
    db: Database,
    embedding: Embedding,
    storage: Storage | None = None,
) -> CatalogueService:
    """The ingest service; without `storage` nothing is published to an index."""
    return CatalogueService(
        db,
        embedding.worker,
        embedding.fetcher,
        max_pixels=settings.image.max_pixels,
        max_bytes=settings.image.max_bytes,
        index=storage.index if storage is not None else None,
        after_commit=storage.duplicates.on_commit if storage is not None else None,
        decoder=embedding.decoder,
    )


@asynccontextmanager
async def open_services(
    settings: Settings,
    *,
    tail: bool = True,
    on_batch: BatchObserver | None = None,
    run_imports: bool = False,
) -> AsyncIterator[Services]:
    """Open the database, load the model, open the index, start the worker (and, with
    `run_imports`, the runner of the HTTP import jobs: the server's, not a command's).

    Blocking start-up work runs in threads, so an event loop that serves probes meanwhile
    stays responsive.
    """
    async with AsyncExitStack() as stack:
        db = await asyncio.to_thread(open_database, settings)
        stack.callback(db.dispose)
        embedding = await stack.enter_async_context(open_embedding(settings, db, on_batch=on_batch))
        model = embedding.embedder
        index = await asyncio.to_thread(
            _open_index, settings, db, model.model_id, model.embedding_dim, tail=tail
        )
        stack.push_async_callback(asyncio.to_thread, _close_index, index, True)
        # Exits run last-in first-out: drain the worker (again; it is idempotent) before the
        # index is saved, so nothing embedded at shutdown misses the saved index.
        stack.push_async_callback(_drain, embedding.worker)
        storage = Storage(settings, db, index, _duplicates(settings, db, index))
        if tail:
            _follow_replicas(stack, settings, db, index, storage.duplicates)
        search = SearchService(
            db,
            embedding.worker,
            embedding.fetcher,
            index,
            max_pixels=settings.image.max_pixels,
            max_bytes=settings.image.max_bytes,
            decoder=embedding.decoder,
            quality=SearchQuality(**settings.search.model_dump()),
        )
        catalogue = catalogue_service(settings, db, embedding, storage)
        imports = ImportService(
            db,
            catalogue,
            settings.data_dir / "imports",
            batch_size=settings.imports.batch_size,
            concurrency=settings.imports.concurrency,
            max_bytes=settings.imports.max_bytes,
        )
        if run_imports:
            imports.start()
            # Stopped first (exits run last-in first-out): a batch cut short resumes later.
            stack.push_async_callback(imports.stop)
        LOG.info("ready: %s", model.describe())
        _freeze_startup_heap(stack)
        yield Services(
            settings=settings,
            db=db,
            index=index,
            duplicates=storage.duplicates,
            embedder=model,
            model_fallback=embedding.model_fallback,
            admission=embedding.admission,
            worker=embedding.worker,
            fetcher=embedding.fetcher,
            catalogue=catalogue,
            search=search,
            imports=imports,
        )


def _freeze_startup_heap(stack: AsyncExitStack) -> None:
    """Move everything alive after start-up (modules, the model, the app) out of the
    garbage collector's sight. Otherwise every full collection walks that heap while
    holding the GIL: measured on two replicas, one pause of ~0.4 s every few hundred
    requests stalled every request in flight (docs/benchmarks.md, replicas). Unfrozen at
    shutdown so a process that opens services again (tests, the CLI) can free the old ones.
    """
    gc.collect()
    gc.freeze()
    stack.callback(gc.unfreeze)


def _ready_embedder(settings: Settings, db: Database | None) -> tuple[Embedder, bool]:
    embedder, fallback = load_embedder(settings)
    if db is not None:
        check_model_matches_catalogue(db, embedder.model_id)
    if embedder.runtime == "openvino":
        if settings.compile:
            LOG.info("VS_COMPILE is not used: the forward pass runs on OpenVINO")
    elif settings.compile:
        embedder.compile()
    if settings.warmup:
        embedder.warmup(sorted({1, settings.batch.max_size}))
    return embedder, fallback


async def _drain(worker: BatchWorker) -> None:
    if worker.running:
        LOG.info("shutting down: draining the inference queue")
        await asyncio.to_thread(worker.shutdown, drain=True)
