from __future__ import annotations

import httpx


class TestHealth:
    async def test_alive(self, client: httpx.AsyncClient) -> None:
        response = await client.get("/health")
        assert response.status_code == 200
        assert response.json() == {"status": "ok"}


class TestReady:
    async def test_ready_names_the_loaded_model(self, client: httpx.AsyncClient) -> None:
        response = await client.get("/ready")
        body = response.json()
        assert response.status_code == 200
        assert body["status"] == "ready"
        assert body["checks"]["model"] is True
        assert body["checks"]["worker"] is True
        assert body["model"]["model_id"].startswith("tiny@")
        assert body["model"]["embedding_dim"] == 512
        assert body["model"]["precision"] == "fp32"
        assert body["model"]["fallback"] is False


class TestDocs:
    async def test_openapi_and_swagger_ui(self, client: httpx.AsyncClient) -> None:
        spec = (await client.get("/openapi.json")).json()
        docs = await client.get("/docs")
        assert docs.status_code == 200
        assert "swagger" in docs.text.lower()
        assert "/ready" in spec["paths"]
        assert spec["info"]["title"].startswith("vsearch")


class TestErrors:
    async def test_unknown_route_uses_the_error_shape(self, client: httpx.AsyncClient) -> None:
        response = await client.get("/nope")
        assert response.status_code == 404
        assert response.json()["error"]["code"] == "not_found"
