"""Unknown or repeated query parameters are refused, naming the parameter."""

from __future__ import annotations

import httpx
import pytest


@pytest.mark.parametrize(
    ("path", "params", "name"),
    [
        ("/duplicates", {"min_score": "0.9", "min_scor": "0.95"}, "min_scor"),
        ("/products", {"limt": "5"}, "limt"),
        ("/products/sku-1", {"embedings": "true"}, "embedings"),
        ("/duplicates/groups", {"min_score": "0.9", "categroy": "x"}, "categroy"),
    ],
)
async def test_unknown_query_parameters_are_422(
    client: httpx.AsyncClient, path: str, params: dict[str, str], name: str
) -> None:
    response = await client.get(path, params=params)
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["details"][0]["loc"] == ["query", name]
    assert "this route takes" in error["details"][0]["msg"]


async def test_a_repeated_single_valued_parameter_is_422(client: httpx.AsyncClient) -> None:
    response = await client.get("/products", params={"limit": ["5", "50"]})
    assert response.status_code == 422
    assert response.json()["error"]["details"][0]["loc"] == ["query", "limit"]


async def test_declared_parameters_still_work(client: httpx.AsyncClient) -> None:
    response = await client.get("/products", params={"limit": "5", "category": "x"})
    assert response.status_code == 200
    assert response.json()["products"] == []


@pytest.mark.parametrize(
    ("path", "body", "loc"),
    [
        ("/search", {"image_url": "http://x/a.jpg", "min_scor": 0.5}, ["body", "min_scor"]),
        ("/search", {"image_url": "http://x/a.jpg", "filter": {}}, ["body", "filter"]),
        (
            "/search",
            {"image_url": "http://x/a.jpg", "filters": {"brand": "Acme"}},
            ["body", "filters", "brand"],
        ),
        (
            "/products",
            {"products": [{"id": "a", "titel": "x", "images": [{"url": "http://x/a.jpg"}]}]},
            ["body", "products", 0, "titel"],
        ),
        (
            "/products",
            {"products": [{"id": "a", "images": [{"url": "http://x/a.jpg", "crop": {}}]}]},
            ["body", "products", 0, "images", 0, "crop"],
        ),
        ("/duplicates/decisions", {"a": "x", "b": "y", "decision": "same", "by": "me"}, None),
    ],
)
async def test_unknown_json_fields_are_422_naming_the_field(
    client: httpx.AsyncClient, path: str, body: dict[str, object], loc: list[object] | None
) -> None:
    response = await client.post(path, json=body)
    assert response.status_code == 422, response.text
    details = response.json()["error"]["details"]
    expected = loc or ["body", "by"]
    assert any(d["loc"] == expected and "extra" in d["msg"].lower() for d in details), details
