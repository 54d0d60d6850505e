"""Shared fixtures: tiny generated models, settings on a temporary data directory, real
databases (a SQLite file, and a throwaway PostgreSQL server started for the session), and
an HTTP client that runs the real app (lifespan included) through ASGI."""

from __future__ import annotations

import itertools
import os
import shutil
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import psycopg
import pytest

from app.core.config import Settings
from app.core.database import Database
from app.core.migrations import upgrade
from app.inference.builders import init_random
from app.main import create_app
from tests.postgres import PostgresServer, find_bin_dir

REPO = Path(__file__).resolve().parents[1]
DATASET = Path(
    os.environ.get("VS_TEST_DATASET", REPO.parent / "shared" / "datasets" / "grocery-store")
)
REQUIRE_POSTGRES = os.environ.get("VS_TEST_REQUIRE_POSTGRES") == "1"
_TEMPLATE_DB = "vs_template"
_db_numbers = itertools.count()


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


# databases ------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """One PostgreSQL server for the session, with a migrated template database."""
    bin_dir = find_bin_dir()
    if bin_dir is None:
        message = "PostgreSQL server binaries not found (apt-get install postgresql)"
        if REQUIRE_POSTGRES:
            pytest.fail(message)
        pytest.skip(message)
    server = PostgresServer.start(bin_dir)
    try:
        with psycopg.connect(server.url().replace("+psycopg", ""), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {_TEMPLATE_DB}")
        db = Database(server.url(_TEMPLATE_DB))
        upgrade(db)
        db.dispose()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("sqlite") / "template.db"
    db = Database(f"sqlite:///{path}")
    upgrade(db)
    db.dispose()
    return path


def new_postgres_database(server: PostgresServer) -> str:
    name = f"vs_test_{os.getpid()}_{next(_db_numbers)}"
    with psycopg.connect(server.url().replace("+psycopg", ""), autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name} TEMPLATE {_TEMPLATE_DB}")
    return server.url(name)


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path, sqlite_template: Path) -> str:
    """A fresh, migrated database of each kind (each test gets its own)."""
    if request.param == "sqlite":
        path = tmp_path / "catalogue.db"
        shutil.copy(sqlite_template, path)
        return f"sqlite:///{path}"
    server: PostgresServer = request.getfixturevalue("postgres_server")
    return new_postgres_database(server)


@pytest.fixture
def db(database_url: str) -> Iterator[Database]:
    database = Database(database_url)
    yield database
    database.dispose()


# the app --------------------------------------------------------------------------------
@pytest.fixture
def settings(tmp_path: Path, tiny_model_dir: Path) -> Settings:
    """Settings on SQLite in a temporary data directory, with the tiny model in fp32."""
    return Settings(
        model=str(tiny_model_dir),
        data_dir=tmp_path / "data",
        device="cpu",
        precision="fp32",
        batch={"max_size": 8, "max_wait_ms": 2, "queue_size": 64},
        allow_private_urls=True,
    )


@pytest.fixture
def db_settings(settings: Settings, database_url: str) -> Settings:
    """`settings` on each database kind."""
    return settings.model_copy(update={"database_url": database_url})


@asynccontextmanager
async def app_client(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    """The real app (lifespan included) behind an ASGI transport."""
    app = create_app(settings)
    app.state.vs.exit_on_start_failure = False  # raise start-up errors here instead
    async with app.router.lifespan_context(app):
        await app.state.vs.wait_started()
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
            c.app = app  # type: ignore[attr-defined]
            yield c


@pytest.fixture
async def client(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    async with app_client(settings) as c:
        yield c


@pytest.fixture
async def db_client(db_settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    """A client of the app on each database kind."""
    async with app_client(db_settings) as c:
        yield c
