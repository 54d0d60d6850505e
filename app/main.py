"""The FastAPI application factory."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.routing import APIRoute

from app import __version__
from app.api.docs import install_docs
from app.api.errors import install_error_handlers
from app.api.forms import ProductUpload, SearchUpload
from app.api.import_schemas import ImportUpload
from app.api.limits import BodySizeLimit, RequestPixelBudget
from app.api.observability import RequestObservability
from app.api.openapi import install_openapi
from app.api.routes import (
    calibration,
    duplicates,
    health,
    images,
    imports,
    metrics,
    product_edits,
    products,
    search,
    search_more,
)
from app.api.routes.pages import install_pages
from app.api.schemas import (
    DecisionCreate,
    ProductsCreate,
    SearchRequest,
    refuse_control_characters,
)
from app.api.state import ApiState
from app.api.strict import reject_unknown_query
from app.core.config import Settings
from app.services import open_services

LOG = logging.getLogger(__name__)

DESCRIPTION = """
Self-hosted visual product search.

* **Index** catalogue products with one or more images (`POST /products` as JSON,
  `POST /products/upload` with image files).
* **Search** the catalogue with a shopper's photo, optionally cropped to a box
  (`POST /search` with a URL or base64, `POST /search/upload` with the file).
* **Unify** the catalogue: product pairs that show the same item (`GET /duplicates`),
  groups of them, and reviewers' decisions.

Every error has the body `{"error": {"code": "...", "message": "..."}}`; each operation
lists the codes it can answer, each with its own schema. Which operations need an
`X-API-Key` header follows this service's settings (`VS_API_KEYS` for writes,
`VS_API_KEYS_READ` for reads) and is declared per operation; a client generated with
openapi-python-client sends it with `AuthenticatedClient(base_url, token=key,
auth_header_name="X-API-Key", prefix="")`. Rate limits answer 429 and a full inference
queue 503, both with `Retry-After`. Embeddings come from the model named in `GET /ready`
(`model.model_id`). Every response carries an `X-Request-ID` (yours, when you send one).

The examples in this document work against a fresh service, in order: index the sample
products, search with the sample image, list the duplicate pair they form, decide on it,
undo the decision, delete.
"""

TAGS = [
    {"name": "search", "description": "Find catalogue products that look like an image."},
    {"name": "products", "description": "Index and manage catalogue products."},
    {"name": "duplicates", "description": "Catalogue unification: duplicate pairs and groups."},
    {"name": "health", "description": "Probes and metrics for orchestrators and monitoring."},
]


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Open the services in the background, so the server answers `/health` (`starting`)
    and `/ready` (503) while the model loads; other routes answer 503 until then."""
    state: ApiState = app.state.vs
    stop = asyncio.Event()
    task = asyncio.create_task(_hold_services(state, stop), name="vsearch-services")
    try:
        yield
    finally:
        stop.set()
        if not state.started.is_set():
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task  # start-up errors were logged (and raised) where they happened


async def _hold_services(state: ApiState, stop: asyncio.Event) -> None:
    try:
        async with open_services(
            state.settings, on_batch=state.metrics.observe_batch, run_imports=True
        ) as s:
            state.services = s
            state.metrics.bind(s)
            state.started.set()
            try:
                await stop.wait()
            finally:
                state.services = None
                state.metrics.bind(None)
    except Exception as exc:
        if state.started.is_set():
            raise
        state.start_error = exc
        state.started.set()
        LOG.critical("start-up failed: %s: %s", type(exc).__name__, exc, exc_info=exc)
        if state.exit_on_start_failure:
            logging.shutdown()
            os._exit(3)  # nothing to release: open_services closed what it had opened
        raise


def _operation_id(route: APIRoute) -> str:
    return route.name


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the app; the model, database, index and worker start in the lifespan."""
    settings = settings or Settings()
    app = FastAPI(
        title="vsearch: visual product search",
        version=__version__,
        description=DESCRIPTION,
        lifespan=lifespan,
        openapi_tags=TAGS,
        # Every route: unknown or repeated query parameters and control characters in the
        # path or query are 422s naming the parameter.
        dependencies=[Depends(reject_unknown_query), Depends(refuse_control_characters)],
        docs_url=None,  # served from local assets by install_docs
        redoc_url=None,
        openapi_url="/openapi.json" if settings.docs else None,
        # Operation ids are the route functions' names (`create_products`, `search_by_image`):
        # generated clients name their methods after them.
        generate_unique_id_function=_operation_id,
    )
    state = ApiState.from_settings(settings)
    app.state.vs = state
    install_error_handlers(app)
    app.include_router(search.router)
    app.include_router(search_more.router)
    app.include_router(product_edits.router)  # before products: its routes are more specific
    app.include_router(products.router)
    app.include_router(product_edits.patch_router)
    app.include_router(duplicates.router)
    app.include_router(calibration.router)
    app.include_router(images.router)
    app.include_router(imports.router)
    app.include_router(health.router)
    app.include_router(metrics.router)
    install_pages(app)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_request_bytes)
    app.add_middleware(RequestPixelBudget, max_pixels=settings.image.max_request_pixels)
    origins = [o.strip() for o in settings.cors_origins.split(",") if o.strip()]
    if origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=origins,
            allow_methods=["GET", "POST", "DELETE"],
            allow_headers=["Content-Type", "X-API-Key", "X-Request-ID"],
            expose_headers=["X-Request-ID", "Retry-After"],
        )
    app.add_middleware(RequestObservability, metrics=state.metrics)
    if settings.docs:
        install_docs(app, "/openapi.json")
    install_openapi(
        app,
        [ProductsCreate, ProductUpload, SearchRequest, SearchUpload, DecisionCreate, ImportUpload],
        state,
    )
    return app
