"""The workbench pages as served: open HTML with a strict Content-Security-Policy, their
own script and stylesheet, nothing referenced from another host, outside the OpenAPI."""

from __future__ import annotations

import re

import httpx

from app.api.routes.pages import UI
from app.core.config import Settings
from tests.conftest import app_client


async def test_pages_render_and_allow_only_the_service(client: httpx.AsyncClient) -> None:
    for path, marker in (("/ui/review", 'data-page="review"'), ("/ui/search", 'id="drop"')):
        response = await client.get(path)
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/html")
        assert marker in response.text
        policy = response.headers["content-security-policy"]
        assert "default-src 'self'" in policy
        assert "script-src 'self'" in policy
        assert "/ui/static/workbench.js" in response.text
    script = await client.get("/ui/static/workbench.js")
    assert script.status_code == 200
    assert "javascript" in script.headers["content-type"]
    style = await client.get("/ui/static/workbench.css")
    assert style.status_code == 200


async def test_workbench_redirects_to_the_review_page(client: httpx.AsyncClient) -> None:
    response = await client.get("/ui")
    assert response.status_code == 307
    assert response.headers["location"] == "/ui/review"


async def test_slider_starts_where_asked_and_never_below_the_floor(
    client: httpx.AsyncClient,
) -> None:
    asked = await client.get("/ui/review", params={"min_score": 0.85})
    assert 'data-threshold="0.85"' in asked.text
    below = await client.get("/ui/review", params={"min_score": 0.1})
    assert 'data-threshold="0.8"' in below.text  # the floor
    assert (await client.get("/ui/review", params={"min_score": 7})).status_code == 422


async def test_pages_open_even_when_reads_need_a_key(settings: Settings) -> None:
    """They hold no data: the data comes from the API with the key typed into the page."""
    keyed = settings.model_copy(update={"api_keys": "w", "api_keys_read": "r"})
    async with app_client(keyed) as client:
        assert (await client.get("/ui/review")).status_code == 200
        assert (await client.get("/duplicates")).status_code == 401


def test_no_asset_references_another_host() -> None:
    files = [*(UI / "templates").glob("*.html"), *(UI / "static").glob("*")]
    assert len(files) >= 5
    for path in files:
        text = path.read_text()
        assert not re.search(r"(src|href)\s*=\s*[\"']?(https?:)?//", text), path
        assert "@import" not in text, path
        assert not re.search(r"url\(\s*[\"']?(https?:)?//", text), path
