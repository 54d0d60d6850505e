"""Start-up and shut-down of the service's long-lived parts, held in one typed `State`."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from fastapi import FastAPI

from app.catalogue import repository as repo
from app.catalogue.duplicates import DuplicatesService
from app.catalogue.feed import CatalogueEmbeddings, change_feed
from app.catalogue.search import SearchService
from app.catalogue.service import CatalogueService
from app.core.config import DEFAULT_MODEL, Settings
from app.core.database import Database
from app.core.errors import ModelUnavailable
from app.core.migrations import ensure_schema
from app.core.ratelimit import TokenBuckets
from app.imaging.fetch import FetchLimits, ImageFetcher
from app.index.lifecycle import IndexService
from app.inference.model import CONFIG_FILE, Embedder, load_model
from app.inference.worker import BatchWorker

if TYPE_CHECKING:
    from app.api.observability import ServiceMetrics

LOG = logging.getLogger(__name__)

FALLBACK_MODEL_DIR = "models/efficientnet-lite0-imagenet"


class ModelMismatch(RuntimeError):
    """The catalogue holds embeddings of another model than the one loaded."""


@dataclass
class State:
    """Everything a request may need, created once per process."""

    settings: Settings
    embedder: Embedder | None = None
    worker: BatchWorker | None = None
    db: Database | None = None
    fetcher: ImageFetcher | None = None
    catalogue: CatalogueService | None = None
    index: IndexService | None = None
    search: SearchService | None = None
    duplicates: DuplicatesService | None = None
    model_fallback: bool = False
    write_keys: list[str] = field(default_factory=list)
    read_keys: list[str] = field(default_factory=list)
    rate_limits: TokenBuckets | None = None
    metrics: ServiceMetrics | None = None
    started_at: float = field(default_factory=time.time)

    @property
    def ready(self) -> bool:
        return (
            self.embedder is not None
            and self.worker is not None
            and self.worker.running
            and self.index is not None
        )


def load_embedder(settings: Settings) -> tuple[Embedder, bool]:
    """Load `VS_MODEL`; fall back to the offline ImageNet model only for the hub default.

    Returns:
        The embedder and whether it is the fallback model.
    """
    try:
        return load_model(settings.model, settings.device, settings.precision), False
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
        return load_model(target, settings.device, settings.precision), True


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


def start_worker(
    settings: Settings, embedder: Embedder, metrics: ServiceMetrics | None = None
) -> BatchWorker:
    worker = BatchWorker(
        embedder,
        max_size=settings.batch.max_size,
        max_wait_ms=settings.batch.max_wait_ms,
        queue_size=settings.batch.queue_size,
        preprocess_threads=settings.batch.preprocess_threads,
        on_batch=metrics.observe_batch if metrics is not None else None,
    )
    worker.start()
    return worker


def make_fetcher(settings: Settings) -> ImageFetcher:
    return ImageFetcher(
        FetchLimits(
            max_bytes=settings.image.max_bytes,
            connect_timeout_s=settings.image.fetch_connect_timeout_s,
            total_timeout_s=settings.image.fetch_timeout_s,
            max_redirects=settings.image.fetch_max_redirects,
            allow_private=settings.allow_private_urls,
            allowed_hosts=tuple(
                h.strip().lower()
                for h in settings.image.fetch_allowed_hosts.split(",")
                if h.strip()
            ),
        )
    )


def open_index(
    settings: Settings, db: Database, embedder: Embedder, *, tail: bool = True
) -> IndexService:
    index = IndexService(
        feed=change_feed(db),
        source=CatalogueEmbeddings(db),
        directory=settings.data_dir / "index",
        model_id=embedder.model_id,
        dim=embedder.embedding_dim,
        settings=settings.index,
    )
    index.open()
    if tail:
        index.start_tailing()
    return index


def open_database(settings: Settings) -> Database:
    db = Database(settings.resolved_database_url)
    ensure_schema(db, migrate=settings.migrate_on_start)
    return db


def start_services(state: State) -> None:
    """Open the database, load the model, start the worker: everything but HTTP.

    Used by the app's lifespan and by CLI commands, so both run the same code.
    """
    settings = state.settings
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    state.write_keys = settings.write_keys()
    state.read_keys = settings.read_keys()
    if settings.rate_limit.per_minute > 0:
        state.rate_limits = TokenBuckets(settings.rate_limit.per_minute, settings.rate_limit.burst)
    state.db = open_database(settings)
    embedder, fallback = load_embedder(settings)
    check_model_matches_catalogue(state.db, embedder.model_id)
    if settings.compile:
        embedder.compile()
    if settings.warmup:
        embedder.warmup(sorted({1, settings.batch.max_size}))
    state.embedder, state.model_fallback = embedder, fallback
    state.index = open_index(settings, state.db, embedder)
    state.worker = start_worker(settings, embedder, state.metrics)
    state.fetcher = make_fetcher(settings)
    state.duplicates = DuplicatesService(
        state.db,
        state.index,
        floor=settings.duplicates.floor,
        neighbours=settings.duplicates.neighbours,
    )
    state.catalogue = CatalogueService(
        state.db,
        state.worker,
        state.fetcher,
        max_pixels=settings.image.max_pixels,
        max_bytes=settings.image.max_bytes,
        index=state.index,
        after_commit=state.duplicates.on_commit,
    )
    state.search = SearchService(
        state.db,
        state.worker,
        state.fetcher,
        state.index,
        max_pixels=settings.image.max_pixels,
        max_bytes=settings.image.max_bytes,
    )
    LOG.info("ready: %s", embedder.describe())


async def stop_services(state: State) -> None:
    """Drain the inference queue, then release everything `start_services` opened."""
    if state.worker is not None:
        LOG.info("shutting down: draining the inference queue")
        await asyncio.to_thread(state.worker.shutdown, drain=True)
        state.worker = None
    if state.fetcher is not None:
        await state.fetcher.aclose()
        state.fetcher = None
    if state.index is not None:
        LOG.info("shutting down: saving the index")
        await asyncio.to_thread(state.index.close, save=True)
        state.index = None
    if state.db is not None:
        state.db.dispose()
        state.db = None


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    state: State = app.state.vs
    try:
        await asyncio.to_thread(start_services, state)
        yield
    finally:
        await stop_services(state)
