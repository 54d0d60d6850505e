from __future__ import annotations

import base64
import json
import logging
from pathlib import Path

import httpx
import pytest

from app.core.config import Settings
from tests.conftest import app_client
from tests.images import encode, pattern


def product(pid: str, seed: int) -> dict[str, object]:
    data = base64.b64encode(encode(pattern(seed=seed), "JPEG")).decode()
    return {"id": pid, "images": [{"data": data}]}


class TestMetrics:
    async def test_prometheus_text_covers_requests_inference_index_and_pairs(
        self, client: httpx.AsyncClient
    ) -> None:
        await client.post("/products", json={"products": [product("a", 1), product("b", 2)]})
        await client.get("/products/a")
        await client.get("/products/missing")
        text = (await client.get("/metrics")).text

        assert (
            'vsearch_http_requests_total{method="POST",route="/products",status="200"} 1.0' in text
        )
        route = "/products/{product_id:product_id}"
        assert (
            f'vsearch_http_requests_total{{method="GET",route="{route}",status="404"}} 1.0' in text
        )
        assert "vsearch_http_request_duration_seconds_bucket" in text
        assert "vsearch_inference_batch_size_count" in text
        assert "vsearch_images_embedded_total 2.0" in text
        assert "vsearch_inference_queue_depth 0.0" in text
        assert 'vsearch_index_vectors{kind="flat",shard="0"}' in text
        assert "vsearch_index_catchup_lag" in text
        assert "vsearch_index_generation" in text
        assert "vsearch_duplicate_pairs 0.0" in text


class TestRequestIds:
    async def test_echoed_or_generated_and_logged(
        self, client: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
    ) -> None:
        with caplog.at_level(logging.INFO, logger="app.requests"):
            mine = await client.get("/health", headers={"X-Request-ID": "req-42"})
            generated = await client.get("/health")
        assert mine.headers["x-request-id"] == "req-42"
        assert len(generated.headers["x-request-id"]) == 32
        records = [r for r in caplog.records if r.name == "app.requests"]
        assert records[0].request_id == "req-42"  # type: ignore[attr-defined]
        assert records[0].route == "/health"  # type: ignore[attr-defined]
        assert records[0].status == 200  # type: ignore[attr-defined]
        assert records[0].duration_ms >= 0  # type: ignore[attr-defined]

    def test_json_log_lines(self) -> None:
        from app.core.logging import JsonFormatter

        record = logging.LogRecord("app.requests", logging.INFO, "x", 1, "GET / 200", None, None)
        record.request_id = "abc"
        line = json.loads(JsonFormatter().format(record))
        assert line["request_id"] == "abc"
        assert line["message"] == "GET / 200"
        assert line["level"] == "info"


class TestKeys:
    async def test_read_keys_protect_reads(self, settings: Settings) -> None:
        settings = settings.model_copy(update={"api_keys": "writer", "api_keys_read": "reader"})
        async with app_client(settings) as c:
            assert (await c.get("/products")).status_code == 401
            assert (await c.get("/products", headers={"X-API-Key": "reader"})).status_code == 200
            assert (await c.get("/products", headers={"X-API-Key": "writer"})).status_code == 200
            search = await c.post("/search", json={"image": "AA=="})
            assert search.status_code == 401
            assert (await c.get("/duplicates")).status_code == 401
            write = await c.post(
                "/products", json={"products": [product("a", 1)]}, headers={"X-API-Key": "reader"}
            )
            assert write.status_code == 401
            assert (await c.get("/health")).status_code == 200

    async def test_write_keys_from_a_file(self, settings: Settings, tmp_path: Path) -> None:
        keys = tmp_path / "keys"
        keys.write_text("# rotated 2026-11\nfile-key-1\n\n  file-key-2  \n")
        settings = settings.model_copy(update={"api_keys": "env-key", "api_keys_file": keys})
        async with app_client(settings) as c:
            for key, expected in [
                ("file-key-1", 200),
                ("file-key-2", 200),
                ("env-key", 200),
                ("# rotated 2026-11", 401),
                ("file-key", 401),  # a prefix of a key is not a key
                ("", 401),
            ]:
                response = await c.post(
                    "/products",
                    json={"products": [product(f"k{len(key)}", 1)]},
                    headers={"X-API-Key": key},
                )
                assert response.status_code == expected, key
            denied = await c.delete("/products/k10")
            assert denied.status_code == 401
            assert denied.json()["error"]["code"] == "unauthorized"


class TestRateLimits:
    async def test_per_key_buckets_ignore_forwarded_for(self, settings: Settings) -> None:
        limits = settings.rate_limit.model_copy(update={"per_minute": 6, "burst": 2})
        async with app_client(settings.model_copy(update={"rate_limit": limits})) as c:
            statuses = [
                (await c.get("/products", headers={"X-Forwarded-For": f"10.0.0.{i}"})).status_code
                for i in range(3)
            ]
            assert statuses == [200, 200, 429]
            limited = await c.get("/products", headers={"X-Forwarded-For": "10.9.9.9"})
            assert limited.status_code == 429
            assert int(limited.headers["retry-after"]) >= 1
            assert limited.json()["error"]["code"] == "rate_limited"
            invented = await c.get("/products", headers={"X-API-Key": "anything"})
            assert invented.status_code == 429  # an invented key is not another client
            assert (await c.get("/health")).status_code == 200  # probes are never limited


class TestCorsAndDocs:
    async def test_cors_off_by_default(self, client: httpx.AsyncClient) -> None:
        response = await client.get("/health", headers={"Origin": "https://shop.example"})
        assert "access-control-allow-origin" not in response.headers

    async def test_cors_origins(self, settings: Settings) -> None:
        settings = settings.model_copy(update={"cors_origins": "https://shop.example"})
        async with app_client(settings) as c:
            preflight = await c.options(
                "/search",
                headers={
                    "Origin": "https://shop.example",
                    "Access-Control-Request-Method": "POST",
                },
            )
            other = await c.get("/health", headers={"Origin": "https://evil.example"})
        assert preflight.headers["access-control-allow-origin"] == "https://shop.example"
        assert "access-control-allow-origin" not in other.headers

    async def test_docs_can_be_disabled(self, settings: Settings) -> None:
        async with app_client(settings.model_copy(update={"docs": False})) as c:
            assert (await c.get("/docs")).status_code == 404
            assert (await c.get("/openapi.json")).status_code == 404
            assert (await c.get("/health")).status_code == 200
