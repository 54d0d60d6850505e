"""The FastAPI application factory."""

from __future__ import annotations

from fastapi import FastAPI

from app import __version__
from app.api.errors import install_error_handlers
from app.api.routes import health
from app.core.config import Settings
from app.lifespan import State, lifespan

DESCRIPTION = """
Self-hosted visual product search.

* **Index** catalogue products with one or more images (`POST /products`).
* **Search** the catalogue with a shopper's photo, optionally cropped to a box (`POST /search`).
* **Unify** the catalogue: product pairs that show the same item (`GET /duplicates`).

Every error has the body `{"error": {"code": "...", "message": "..."}}`; the codes are
listed under each route. Embeddings come from the model named in `GET /ready`
(`model.model_id`).
"""


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the app; the model and worker start in the lifespan."""
    settings = settings or Settings()
    app = FastAPI(
        title="vsearch: visual product search",
        version=__version__,
        description=DESCRIPTION,
        lifespan=lifespan,
    )
    app.state.vs = State(settings=settings)
    install_error_handlers(app)
    app.include_router(health.router)
    return app
