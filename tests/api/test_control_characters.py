"""Control characters in ids, text, path and query parameters are a 422 naming the field
(PostgreSQL refuses NUL in text: without the check they were 500s there)."""

from __future__ import annotations

import base64
import json

import httpx
import pytest

from tests.images import encode, pattern


def image() -> dict[str, str]:
    return {"data": base64.b64encode(encode(pattern(seed=3), "PNG")).decode()}


def product(**fields: object) -> dict[str, object]:
    return {"id": "sku-1", "images": [image()], **fields}


def assert_refused(response: httpx.Response, where: str) -> None:
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "invalid_request"
    assert error["message"].startswith(f"{where}: "), error["message"]
    assert "control characters" in error["message"]
    assert response.headers["x-request-id"]


@pytest.mark.parametrize(
    ("fields", "where"),
    [
        ({"id": "sku\x00-1"}, "products.0.id"),
        ({"id": "sku\n1"}, "products.0.id"),
        ({"title": "milk\x00"}, "products.0.title"),
        ({"title": "milk\x1b[31m"}, "products.0.title"),
        ({"category": "dairy\x00"}, "products.0.category"),
        ({"category": "dairy\t"}, "products.0.category"),
        ({"attributes": {"bra\x00nd": "x"}}, "products.0.attributes"),
        ({"attributes": {"brand": "Ar\x00la"}}, "products.0.attributes"),
        ({"attributes": {"a": [{"b": "\x07"}]}}, "products.0.attributes"),
        ({"images": [{"url": "https://cdn.example.com/a\x00.jpg"}]}, "products.0.images.0.url"),
    ],
)
async def test_json_products_refuse_control_characters(
    db_client: httpx.AsyncClient, fields: dict[str, object], where: str
) -> None:
    response = await db_client.post("/products", json={"products": [product(**fields)]})
    assert_refused(response, where)
    listing = await db_client.get("/products")
    assert listing.json()["products"] == []


async def test_free_text_keeps_tabs_and_newlines(db_client: httpx.AsyncClient) -> None:
    title = "Whole milk\n1 L\tglass bottle\r\n"
    attributes = {"note": "line one\nline two", "size": {"ml": 1000}}
    response = await db_client.post(
        "/products", json={"products": [product(title=title, attributes=attributes)]}
    )
    assert response.json()["results"][0]["status"] == "created"
    stored = (await db_client.get("/products/sku-1")).json()
    assert stored["title"] == title
    assert stored["attributes"] == attributes


@pytest.mark.parametrize(
    ("path", "where"),
    [
        ("/products/sku%001", "path.product_id"),
        ("/products/sku%1B1", "path.product_id"),
        ("/products?category=dairy%00", "query.category"),
        ("/products?cursor=%00", "query.cursor"),
        ("/duplicates?category=%1F", "query.category"),
        ("/duplicates/groups?category=a%00b", "query.category"),
        ("/duplicates?cursor=x%7F", "query.cursor"),
    ],
)
async def test_path_and_query_parameters(
    db_client: httpx.AsyncClient, path: str, where: str
) -> None:
    assert_refused(await db_client.get(path), where)


async def test_delete_path(db_client: httpx.AsyncClient) -> None:
    assert_refused(await db_client.delete("/products/a%00b"), "path.product_id")


async def test_search_filter_and_url(db_client: httpx.AsyncClient) -> None:
    body = {"image": image()["data"], "filters": {"category": "dairy\x00"}}
    assert_refused(await db_client.post("/search", json=body), "filters.category")
    body = {"image_url": "http://127.0.0.1/\x00.png"}
    assert_refused(await db_client.post("/search", json=body), "image_url")
    multipart = await db_client.post(
        "/search",
        files={"image": ("q.png", encode(pattern(seed=3), "PNG"), "image/png")},
        data={"category": "dairy\x00"},
    )
    assert_refused(multipart, "category")


async def test_decisions(db_client: httpx.AsyncClient) -> None:
    response = await db_client.post(
        "/duplicates/decisions", json={"a": "sku\x00", "b": "sku-2", "decision": "same"}
    )
    assert_refused(response, "a")


@pytest.mark.parametrize(
    ("fields", "where"),
    [
        ({"id": "sku\x00"}, "id"),
        ({"id": "sku-1", "title": "a\x00b"}, "title"),
        ({"id": "sku-1", "category": "c\x01"}, "category"),
        ({"id": "sku-1", "attributes": json.dumps({"k": "v\x00"})}, "attributes"),
    ],
)
async def test_multipart_products(
    db_client: httpx.AsyncClient, fields: dict[str, str], where: str
) -> None:
    response = await db_client.post(
        "/products",
        data=fields,
        files={"image": ("a.png", encode(pattern(seed=3), "PNG"), "image/png")},
    )
    assert_refused(response, where)


async def test_multipart_attributes_with_a_lone_surrogate(db_client: httpx.AsyncClient) -> None:
    # Valid JSON text that Python decodes to a string no database can store.
    response = await db_client.post(
        "/products",
        data={"id": "sku-1", "attributes": '{"k": "\\ud800"}'},
        files={"image": ("a.png", encode(pattern(seed=3), "PNG"), "image/png")},
    )
    assert response.status_code == 422
    assert response.json()["error"]["message"].startswith("attributes: ")
