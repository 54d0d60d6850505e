"""Shared fixtures: tiny generated models, settings on a temporary data directory, and
an HTTP client that runs the real app (lifespan included) through ASGI."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from app.core.config import Settings
from app.inference.builders import init_random
from app.main import create_app

REPO = Path(__file__).resolve().parents[1]
DATASET = Path(
    os.environ.get("VS_TEST_DATASET", REPO.parent / "shared" / "datasets" / "grocery-store")
)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random ConvNeXt-Atto at 64 px in the Trendyol layout (512-d)."""
    return init_random(
        tmp_path_factory.mktemp("models") / "tiny", backbone="convnext_atto", input_size=64
    )


@pytest.fixture(scope="session")
def dataset() -> Path:
    """The grocery-store dataset (MIT); tests that need it skip when it is absent."""
    if not (DATASET / "protocols").is_dir():
        pytest.skip(f"grocery-store dataset not found at {DATASET} (set VS_TEST_DATASET)")
    return DATASET


@pytest.fixture
def settings(tmp_path: Path, tiny_model_dir: Path) -> Settings:
    return Settings(
        model=str(tiny_model_dir),
        data_dir=tmp_path / "data",
        device="cpu",
        precision="fp32",
        batch={"max_size": 8, "max_wait_ms": 2, "queue_size": 64},
    )


@pytest.fixture
async def client(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
            yield c
