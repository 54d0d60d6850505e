"""Start-up and shut-down of the service's long-lived parts, held in one typed `State`."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from fastapi import FastAPI

from app.core.config import DEFAULT_MODEL, Settings
from app.core.errors import ModelUnavailable
from app.inference.model import CONFIG_FILE, Embedder, load_model
from app.inference.worker import BatchWorker

LOG = logging.getLogger(__name__)

FALLBACK_MODEL_DIR = "models/efficientnet-lite0-imagenet"


@dataclass
class State:
    """Everything a request may need, created once per process."""

    settings: Settings
    embedder: Embedder | None = None
    worker: BatchWorker | None = None
    model_fallback: bool = False
    started_at: float = field(default_factory=time.time)

    @property
    def ready(self) -> bool:
        return self.embedder is not None and self.worker is not None and self.worker.running


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
            "!!! %s. FALLING BACK to the generic ImageNet EfficientNet-Lite0 model in %s: "
            "search works, but product-level quality is far below the Trendyol model. "
            "Embeddings carry the model id, so they will not mix with the real model's later.",
            exc,
            target,
        )
        if not (target / CONFIG_FILE).is_file():
            init_pretrained(target)
        return load_model(target, settings.device, settings.precision), True


def start_worker(settings: Settings, embedder: Embedder) -> BatchWorker:
    worker = BatchWorker(
        embedder,
        max_size=settings.batch.max_size,
        max_wait_ms=settings.batch.max_wait_ms,
        queue_size=settings.batch.queue_size,
        preprocess_threads=settings.batch.preprocess_threads,
    )
    worker.start()
    return worker


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    state: State = app.state.vs
    settings = state.settings
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    embedder, fallback = await asyncio.to_thread(load_embedder, settings)
    if settings.compile:
        await asyncio.to_thread(embedder.compile)
    if settings.warmup:
        sizes = sorted({1, settings.batch.max_size})
        await asyncio.to_thread(embedder.warmup, sizes)
    state.embedder, state.model_fallback = embedder, fallback
    state.worker = start_worker(settings, embedder)
    LOG.info("ready: %s", embedder.describe())
    try:
        yield
    finally:
        LOG.info("shutting down: draining the inference queue")
        await asyncio.to_thread(state.worker.shutdown, drain=True)
        state.worker = None
