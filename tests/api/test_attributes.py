"""`attributes` are bounded in size, depth and key count (VS_ATTRIBUTES__*)."""

from __future__ import annotations

import base64
import json
from typing import Any

import httpx
import pytest

from app.core.config import AttributeSettings, Settings
from tests.conftest import app_client
from tests.images import encode, pattern


def post_body(attributes: object) -> dict[str, object]:
    data = base64.b64encode(encode(pattern(seed=5), "PNG")).decode()
    return {"products": [{"id": "sku-1", "attributes": attributes, "images": [{"data": data}]}]}


def nested(depth: int) -> dict[str, Any]:
    value: dict[str, Any] = {"leaf": 1}
    for _ in range(depth - 1):
        value = {"n": value}
    return value


@pytest.mark.parametrize(
    ("attributes", "message"),
    [
        ({"blob": "x" * (16 * 1024)}, "larger than 16384 bytes"),
        ({f"k{n}": n for n in range(65)}, "more than 64 keys"),
        ({"a": {"b": {"c": {f"k{n}": n for n in range(62)}}}}, "more than 64 keys"),
        (nested(5), "deeper than 4 levels"),
        ({"list": [[[[1]]]]}, "deeper than 4 levels"),
        ({"list": list(range(20_000))}, "larger than 16384 bytes"),
    ],
)
async def test_over_the_default_bounds_is_a_422(
    db_client: httpx.AsyncClient, attributes: object, message: str
) -> None:
    response = await db_client.post("/products", json=post_body(attributes))
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["message"].startswith("products.0.attributes: ")
    assert message in error["message"]
    assert (await db_client.get("/products")).json()["products"] == []


async def test_at_the_default_bounds_is_stored(db_client: httpx.AsyncClient) -> None:
    attributes: dict[str, Any] = {f"k{n}": n for n in range(59)}
    attributes["deep"] = nested(3)  # depth 4 in all, 64 keys in all
    attributes["text"] = ""
    attributes["text"] = "y" * (16 * 1024 - len(json.dumps(attributes, separators=(",", ":"))))
    assert len(json.dumps(attributes, separators=(",", ":")).encode()) == 16 * 1024
    response = await db_client.post("/products", json=post_body(attributes))
    assert response.json()["results"][0]["status"] == "created"
    assert (await db_client.get("/products/sku-1")).json()["attributes"] == attributes


async def test_bounds_are_settings(settings: Settings) -> None:
    bounds = AttributeSettings(max_bytes=64, max_depth=1, max_keys=2)
    settings = settings.model_copy(update={"attributes": bounds})
    async with app_client(settings) as c:
        assert (await c.post("/products", json=post_body({"a": 1, "b": 2}))).status_code == 200
        for attributes in ({"a": 1, "b": 2, "c": 3}, {"a": {}}, {"a": "z" * 64}):
            response = await c.post("/products", json=post_body(attributes))
            assert response.status_code == 422, attributes
        multipart = await c.post(
            "/products",
            data={"id": "sku-2", "attributes": json.dumps({"a": 1, "b": 2, "c": 3})},
            files={"image": ("a.png", encode(pattern(seed=6), "PNG"), "image/png")},
        )
        assert multipart.status_code == 422
        message = multipart.json()["error"]["message"]
        assert message == "attributes: attributes have more than 2 keys"


async def test_deeply_nested_multipart_text_is_a_422(client: httpx.AsyncClient) -> None:
    # Deeper than Python's recursion limit: the parser's RecursionError must not be a 500.
    response = await client.post(
        "/products",
        data={"id": "sku-1", "attributes": "[" * 100_000 + "]" * 100_000},
        files={"image": ("a.png", encode(pattern(seed=6), "PNG"), "image/png")},
    )
    assert response.status_code == 422
