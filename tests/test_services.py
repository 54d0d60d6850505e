from __future__ import annotations

import base64

import pytest
from sqlalchemy import update

from app.catalogue.models import ProductImage
from app.core.config import Settings
from app.core.database import Database
from app.core.migrations import SchemaBehind, current_revision, head_revision
from app.services import ModelMismatch
from tests.conftest import app_client
from tests.images import encode, pattern


class TestStartupRefusals:
    async def test_catalogue_of_another_model_refuses_to_start(self, db_settings: Settings) -> None:
        async with app_client(db_settings) as client:
            data = base64.b64encode(encode(pattern(), "PNG")).decode()
            await client.post(
                "/products", json={"products": [{"id": "a", "images": [{"data": data}]}]}
            )
        db = Database(db_settings.resolved_database_url)
        with db.write() as session:
            session.execute(update(ProductImage).values(model_id="other-model@123"))
        db.dispose()

        with pytest.raises(ModelMismatch, match=r"other-model@123 \(1 images\)"):
            async with app_client(db_settings):
                pass

    async def test_schema_behind_without_migrations_refuses(self, settings: Settings) -> None:
        settings = settings.model_copy(update={"migrate_on_start": False})
        with pytest.raises(SchemaBehind, match="vsearch db upgrade"):
            async with app_client(settings):
                pass

    async def test_schema_is_migrated_at_start(self, settings: Settings) -> None:
        async with app_client(settings):
            pass
        db = Database(settings.resolved_database_url)
        assert current_revision(db) == head_revision()
        db.dispose()
