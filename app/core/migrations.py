"""Run or check the Alembic migrations from code (service start, CLI, tests)."""

from __future__ import annotations

import logging
import os
import sys
import sysconfig
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import text

from app.core.database import Database

LOG = logging.getLogger(__name__)


def migrations_dir() -> Path:
    """The Alembic scripts: `VS_MIGRATIONS_DIR`, else beside the package (a source checkout
    or an editable install), else where `pip install` put them (`<prefix>/share/vsearch/
    migrations`). Never the working directory: the catalogue must not depend on it."""
    override = os.environ.get("VS_MIGRATIONS_DIR")
    if override:
        return Path(override)
    candidates = [
        Path(__file__).resolve().parents[2] / "migrations",
        Path(sysconfig.get_path("data")) / "share" / "vsearch" / "migrations",
        Path(sys.prefix) / "share" / "vsearch" / "migrations",
    ]
    for candidate in candidates:
        if (candidate / "env.py").is_file():
            return candidate
    raise FileNotFoundError(
        "The database migrations were not found (looked in "
        + ", ".join(str(c) for c in candidates)
        + "); reinstall vsearch or set VS_MIGRATIONS_DIR to the project's migrations/."
    )


# Any fixed number: replicas starting together take turns migrating.
_ADVISORY_LOCK = 0x76736561726368


class SchemaBehind(RuntimeError):
    """The database schema is older than the code and migrations are not run at start."""


def alembic_config(url: str | None = None) -> Config:
    config = Config()
    config.set_main_option("script_location", str(migrations_dir()))
    config.attributes["configure_logger"] = False
    if url:
        config.attributes["url"] = url
    return config


def head_revision() -> str:
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None
    return head


def current_revision(db: Database) -> str | None:
    with db.engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def upgrade(db: Database) -> None:
    """Bring the schema to head (under an advisory lock on Postgres)."""
    config = alembic_config()
    with db.engine.begin() as conn:
        if db.is_postgres:
            conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _ADVISORY_LOCK})
        config.attributes["connection"] = conn
        command.upgrade(config, "head")


def ensure_schema(db: Database, *, migrate: bool) -> None:
    """Migrate (or refuse, with what to run) when the schema is behind the code."""
    current, head = current_revision(db), head_revision()
    if current == head:
        return
    if not migrate:
        raise SchemaBehind(
            f"The database schema is at revision {current or 'none'} but this version needs "
            f"{head}. Run `vsearch db upgrade` (or `alembic upgrade head`), or start with "
            "VS_MIGRATE_ON_START=true."
        )
    LOG.info("migrating the database schema from %s to %s", current or "empty", head)
    upgrade(db)
