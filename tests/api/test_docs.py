"""The API docs pages work offline: their HTML names no external host and every asset it
references is served by the service itself."""

from __future__ import annotations

import re

import httpx
import pytest


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
async def test_docs_pages_load_only_local_assets(client: httpx.AsyncClient, page: str) -> None:
    response = await client.get(page)
    assert response.status_code == 200
    html = response.text
    assert "//" not in re.sub(r"https?://(www\.)?w3\.org/[^\"' ]*", "", html), html
    refs = re.findall(r"""(?:src|href)=["']([^"']+)["']""", html)
    refs += re.findall(r"""url: ?["']([^"']+)["']""", html)
    assert any(r.endswith(".js") for r in refs)
    for ref in refs:
        asset = await client.get(ref)
        assert asset.status_code == 200, ref
        assert len(asset.content) > 100


async def test_docs_can_be_switched_off(settings: object) -> None:
    from app.core.config import Settings
    from tests.conftest import app_client

    assert isinstance(settings, Settings)
    async with app_client(settings.model_copy(update={"docs": False})) as c:
        assert (await c.get("/docs")).status_code == 404
        assert (await c.get("/docs/assets/swagger-ui-bundle.js")).status_code == 404
        assert (await c.get("/openapi.json")).status_code == 404
