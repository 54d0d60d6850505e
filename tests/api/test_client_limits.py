"""Who a client is for the rate limits: a configured key, else the client's address (a
trusted proxy's forwarded one only when configured), with bounded tables."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
from fastapi import FastAPI

from app.core.config import Settings
from app.core.ratelimit import ClientLimits
from tests.conftest import app_client
from tests.server import start_server


def limited(settings: Settings, **limits: float) -> Settings:
    return settings.model_copy(update={"rate_limit": settings.rate_limit.model_copy(update=limits)})


@asynccontextmanager
async def from_address(app: FastAPI, host: str) -> AsyncIterator[httpx.AsyncClient]:
    """A client of the running app whose connection comes from `host`."""
    transport = httpx.ASGITransport(app=app, client=(host, 40000))
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
        yield c


class TestRequestIdentity:
    async def test_invented_keys_share_their_address_bucket(self, settings: Settings) -> None:
        settings = limited(settings, per_minute=1, burst=3).model_copy(
            update={"api_keys": "writer-key"}
        )
        async with app_client(settings) as c:
            statuses = [
                (await c.get("/products", headers={"X-API-Key": secrets.token_hex(8)})).status_code
                for _ in range(5)
            ]
            own_bucket = await c.get("/products", headers={"X-API-Key": "writer-key"})
        assert statuses == [200, 200, 200, 429, 429]
        assert own_bucket.status_code == 200  # a configured key is its own client

    async def test_ipv6_clients_are_limited_per_64(self, settings: Settings) -> None:
        async with app_client(limited(settings, per_minute=1, burst=2)) as c:
            app = c.app  # type: ignore[attr-defined]
            statuses = []
            for host in ("2001:db8:1:2::1", "2001:db8:1:2::2", "2001:db8:1:2:ffff::9"):
                async with from_address(app, host) as client:
                    statuses.append((await client.get("/products")).status_code)
            async with from_address(app, "2001:db8:1:3::1") as other_network:
                other = (await other_network.get("/products")).status_code
        assert statuses == [200, 200, 429]
        assert other == 200

    async def test_the_client_table_is_bounded(self, settings: Settings) -> None:
        async with app_client(limited(settings, per_minute=1, burst=1, max_clients=100)) as c:
            app = c.app  # type: ignore[attr-defined]
            for n in range(1000):
                async with from_address(app, f"10.1.{n // 250}.{n % 250}") as client:
                    assert (await client.get("/products")).status_code == 200
            limits: ClientLimits = app.state.vs.limits
            assert limits.requests is not None
            assert len(limits.requests) == 100
            async with from_address(app, "10.1.3.249") as recent:
                assert (await recent.get("/products")).status_code == 429  # still remembered


class TestFailedAuthentication:
    async def test_wrong_keys_are_limited_per_address(self, settings: Settings) -> None:
        settings = limited(settings, auth_failures_per_minute=1, auth_failures_burst=3)
        settings = settings.model_copy(update={"api_keys": "writer-key"})
        async with app_client(settings) as c:
            app = c.app  # type: ignore[attr-defined]
            guesses = [
                await c.delete("/products/x", headers={"X-API-Key": secrets.token_hex(8)})
                for _ in range(5)
            ]
            right_key = await c.delete("/products/x", headers={"X-API-Key": "writer-key"})
            no_key = await c.delete("/products/x")
            async with from_address(app, "10.9.9.9") as elsewhere:
                other = await elsewhere.delete("/products/x", headers={"X-API-Key": "writer-key"})
        assert [g.status_code for g in guesses] == [401, 401, 401, 429, 429]
        assert guesses[3].json()["error"]["code"] == "rate_limited"
        assert int(guesses[3].headers["retry-after"]) >= 1
        # Locked out: the right key is answered like a wrong one, so guessing learns nothing.
        assert right_key.status_code == 429
        assert no_key.status_code == 401
        assert other.status_code == 404  # another address, its key works

    async def test_read_key_guesses_count_too(self, settings: Settings) -> None:
        settings = limited(settings, auth_failures_per_minute=1, auth_failures_burst=2)
        settings = settings.model_copy(update={"api_keys": "w", "api_keys_read": "r"})
        async with app_client(settings) as c:
            statuses = [
                (await c.get("/products", headers={"X-API-Key": f"guess-{n}"})).status_code
                for n in range(3)
            ]
        assert statuses == [401, 401, 429]


def _server_env(tiny_model_dir: Path, data_dir: Path, **extra: str) -> dict[str, str]:
    return {
        "VS_MODEL": str(tiny_model_dir),
        "VS_DATA_DIR": str(data_dir),
        "VS_PRECISION": "fp32",
        "VS_WARMUP": "false",
        "VS_RATE_LIMIT__PER_MINUTE": "1",
        "VS_RATE_LIMIT__BURST": "2",
        **extra,
    }


def test_forwarded_for_is_believed_only_from_configured_proxies(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """A real `vsearch serve` on 127.0.0.1: by default a rotated X-Forwarded-For does not
    make a new client; with 127.0.0.1 as a trusted proxy it names the client."""
    results: dict[str, list[int]] = {}
    for name, extra in (("default", {}), ("trusted", {"VS_TRUSTED_PROXIES": "127.0.0.1"})):
        env = _server_env(tiny_model_dir, tmp_path / name, **extra)
        server = start_server(env, tmp_path / f"{name}.log")
        try:
            results[name] = [
                httpx.get(
                    f"{server.url}/products",
                    headers={"X-Forwarded-For": f"203.0.113.{n}"},
                    timeout=10,
                ).status_code
                for n in range(4)
            ]
        finally:
            server.stop()
    assert results["default"] == [200, 200, 429, 429]
    assert results["trusted"] == [200, 200, 200, 200]
