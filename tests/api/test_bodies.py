"""JSON-or-multipart bodies: one parser and one schema per content type, the same answers
for bad input on every route that takes both."""

from __future__ import annotations

import httpx
import pytest

from tests.images import encode, pattern

JPEG = encode(pattern(seed=3), "JPEG")


class TestMultipartStrictness:
    async def test_an_unknown_form_field_is_422_naming_it(self, client: httpx.AsyncClient) -> None:
        response = await client.post(
            "/products",
            data={"id": "sku-1", "catgory": "dairy"},
            files={"image": ("a.jpg", JPEG, "image/jpeg")},
        )
        assert response.status_code == 422
        details = response.json()["error"]["details"]
        assert any(d["loc"] == ["body", "catgory"] for d in details)
        assert (await client.get("/products/sku-1")).status_code == 404  # nothing stored

    async def test_a_repeated_single_valued_field_is_422(self, client: httpx.AsyncClient) -> None:
        response = await client.post(
            "/search",
            data={"k": ["3", "5"]},
            files={"image": ("q.jpg", JPEG, "image/jpeg")},
        )
        assert response.status_code == 422
        details = response.json()["error"]["details"]
        assert details[0]["loc"] == ["body", "k"]
        assert details[0]["type"] == "repeated_field"

    async def test_several_image_files_make_one_product(self, client: httpx.AsyncClient) -> None:
        other = encode(pattern(seed=4), "PNG")
        response = await client.post(
            "/products",
            data={"id": "sku-2", "attributes": '{"brand": "Acme"}'},
            files=[("image", ("a.jpg", JPEG, "image/jpeg")), ("image", ("b.png", other))],
        )
        assert response.status_code == 200, response.text
        product = (await client.get("/products/sku-2")).json()
        assert len(product["images"]) == 2
        assert product["attributes"] == {"brand": "Acme"}

    @pytest.mark.parametrize(
        ("fields", "message"),
        [
            ({"bbox": "1,2,3"}, "four numbers"),
            ({"bbox_x": "0", "bbox_y": "0"}, "all of bbox_x"),
            ({"bbox": "0,0,5,5", "bbox_w": "5"}, "not both"),
            ({"k": "0"}, "greater than or equal to 1"),
            ({"min_score": "2"}, "less than or equal to 1"),
        ],
    )
    async def test_search_form_checks_match_the_json_ones(
        self, client: httpx.AsyncClient, fields: dict[str, str], message: str
    ) -> None:
        response = await client.post(
            "/search", data=fields, files={"image": ("q.jpg", JPEG, "image/jpeg")}
        )
        assert response.status_code == 422
        assert message in str(response.json()["error"]["details"])

    @pytest.mark.parametrize(
        "path",
        ["/products", "/search", "/products/upload", "/search/upload", "/duplicates/decisions"],
    )
    async def test_other_content_types_are_415(self, client: httpx.AsyncClient, path: str) -> None:
        response = await client.post(path, content=b"id=1", headers={"content-type": "text/plain"})
        assert response.status_code == 415, path
        assert response.json()["error"]["code"] == "unsupported_media_type"


async def test_openapi_bodies_come_from_the_same_models(client: httpx.AsyncClient) -> None:
    spec = (await client.get("/openapi.json")).json()
    schemas = spec["components"]["schemas"]
    for path, media_type, model in (
        ("/products", "application/json", "ProductsCreate"),
        ("/products/upload", "multipart/form-data", "ProductUpload"),
        ("/search", "application/json", "SearchRequest"),
        ("/search/upload", "multipart/form-data", "SearchUpload"),
        ("/duplicates/decisions", "application/json", "DecisionCreate"),
    ):
        # One content type per operation: what generated clients can handle.
        content = spec["paths"][path]["post"]["requestBody"]["content"]
        assert list(content) == [media_type]
        assert content[media_type]["schema"]["$ref"].endswith(f"/{model}")
    upload = schemas["ProductUpload"]
    assert upload["additionalProperties"] is False
    assert upload["properties"]["id"]["maxLength"] == 256  # the JSON model's limit
    assert upload["properties"]["image"]["items"]["format"] == "binary"
    assert schemas["SearchUpload"]["properties"]["k"]["maximum"] == 1000


@pytest.mark.parametrize(
    ("path", "body"),
    [("/products/upload", {"json": {"id": "x"}}), ("/search/upload", {"json": {"k": 1}})],
)
async def test_upload_operations_take_only_multipart(
    client: httpx.AsyncClient, path: str, body: dict[str, object]
) -> None:
    response = await client.post(path, **body)  # type: ignore[arg-type]
    assert response.status_code == 415
    assert "multipart/form-data" in response.json()["error"]["message"]


async def test_the_upload_operations_index_and_find_a_product(db_client: httpx.AsyncClient) -> None:
    created = await db_client.post(
        "/products/upload",
        data={"id": "sku-up", "category": "dairy"},
        files={"image": ("p.jpg", JPEG, "image/jpeg")},
    )
    assert created.status_code == 200, created.text
    assert created.json()["results"][0]["status"] == "created"
    found = await db_client.post(
        "/search/upload", data={"k": "1"}, files={"image": ("q.jpg", JPEG, "image/jpeg")}
    )
    assert found.status_code == 200, found.text
    assert found.json()["results"][0]["id"] == "sku-up"
