"""With read keys set, which routes stay open (README, "Security"), and what an image URL's
refusal may tell a client about internal names."""

from __future__ import annotations

import pytest

from app.core.config import Settings
from tests.conftest import app_client


@pytest.fixture
def keyed(settings: Settings) -> Settings:
    return settings.model_copy(update={"api_keys": "writer", "api_keys_read": "reader"})


class TestWithReadKeys:
    async def test_probes_and_docs_stay_open(self, keyed: Settings) -> None:
        async with app_client(keyed) as c:
            health = await c.get("/health")
            ready = await c.get("/ready")
            docs = await c.get("/docs")
            schema = await c.get("/openapi.json")
        assert health.status_code == 200
        assert ready.status_code == 200
        assert ready.json()["status"] == "ready"
        assert all(ready.json()["checks"].values())
        assert docs.status_code == 200
        assert schema.status_code == 200
        assert "/search" in schema.json()["paths"]

    async def test_ready_shows_model_and_index_only_to_readers(self, keyed: Settings) -> None:
        async with app_client(keyed) as c:
            anonymous = (await c.get("/ready")).json()
            wrong = (await c.get("/ready", headers={"X-API-Key": "guess"})).json()
            reader = (await c.get("/ready", headers={"X-API-Key": "reader"})).json()
        assert (anonymous["model"], anonymous["index"]) == (None, None)
        assert (wrong["model"], wrong["index"]) == (None, None)
        assert reader["model"]["model_id"]
        assert reader["index"] is not None

    async def test_metrics_need_a_read_key(self, keyed: Settings) -> None:
        async with app_client(keyed) as c:
            anonymous = await c.get("/metrics")
            wrong = await c.get("/metrics", headers={"Authorization": "Bearer guess"})
            by_header = await c.get("/metrics", headers={"X-API-Key": "reader"})
            by_bearer = await c.get("/metrics", headers={"Authorization": "Bearer reader"})
            by_writer = await c.get("/metrics", headers={"Authorization": "Bearer writer"})
        assert anonymous.status_code == 401
        assert anonymous.json()["error"]["code"] == "unauthorized"
        assert wrong.status_code == 401
        assert by_header.status_code == 200
        assert by_bearer.status_code == 200
        assert by_writer.status_code == 200
        assert "vsearch_http_requests_total" in by_bearer.text

    async def test_without_read_keys_metrics_and_ready_are_open(self, settings: Settings) -> None:
        async with app_client(settings.model_copy(update={"api_keys": "writer"})) as c:
            assert (await c.get("/metrics")).status_code == 200
            assert (await c.get("/ready")).json()["model"] is not None


async def test_fetch_refusals_do_not_tell_whether_a_name_resolves(settings: Settings) -> None:
    async with app_client(settings.model_copy(update={"allow_private_urls": False})) as c:
        missing = await c.post("/search", json={"image_url": "http://no-such-host.invalid/a.jpg"})
        private = await c.post("/search", json={"image_url": "http://localhost/a.jpg"})
    assert missing.status_code == private.status_code == 422
    assert missing.json()["error"] == private.json()["error"]
