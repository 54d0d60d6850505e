"""PATCH /products/{id} and one image added or removed, on SQLite and PostgreSQL: images
untouched by a patch, change-log rows written, search and duplicates up to date at once."""

from __future__ import annotations

from typing import Any

import httpx

from tests.api.test_duplicates import variants
from tests.api.test_products import _change_log, _embedded, b64, jpeg, post, product


async def search(client: httpx.AsyncClient, image: bytes, **body: Any) -> list[dict[str, Any]]:
    response = await client.post("/search", json={"image": b64(image), "k": 10, **body})
    assert response.status_code == 200, response.text
    return response.json()["results"]  # type: ignore[no-any-return]


class TestPatchProduct:
    async def test_patch_sets_given_fields_keeps_images_and_logs(
        self, db_client: httpx.AsyncClient
    ) -> None:
        await post(
            db_client,
            product("sku-1", 1, 2, title="Milk", category="dairy", labels={"brand": ["A"]}),
        )
        before = (await db_client.get("/products/sku-1")).json()
        log_before, embedded = _change_log(db_client), _embedded(db_client)

        response = await db_client.patch(
            "/products/sku-1", json={"title": "Whole milk", "labels": {"brand": ["B"]}}
        )
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["status"] == "updated"
        after = body["product"]
        assert after["title"] == "Whole milk"
        assert after["category"] == "dairy"  # not sent: kept
        assert after["labels"] == {"brand": ["B"]}
        assert after["images"] == before["images"]
        assert _embedded(db_client) == embedded  # nothing fetched or embedded
        image_ids = [i["image_id"] for i in before["images"]]
        assert _change_log(db_client)[len(log_before) :] == [(i, "upsert") for i in image_ids]

        # filters see it at once
        hits = await search(db_client, jpeg(1), filters={"must": {"brand": ["B"]}})
        assert [h["id"] for h in hits] == ["sku-1"]
        assert hits[0]["labels"] == {"brand": ["B"]}
        assert await search(db_client, jpeg(1), filters={"must": {"brand": ["A"]}}) == []

    async def test_same_patch_twice_is_unchanged_and_null_clears(
        self, db_client: httpx.AsyncClient
    ) -> None:
        await post(db_client, product("sku-1", 1, title="Milk", category="dairy"))
        first = await db_client.patch("/products/sku-1", json={"category": "drinks"})
        assert first.json()["status"] == "updated"
        log = _change_log(db_client)
        again = await db_client.patch("/products/sku-1", json={"category": "drinks"})
        assert again.json()["status"] == "unchanged"
        assert _change_log(db_client) == log
        cleared = await db_client.patch("/products/sku-1", json={"title": None})
        assert cleared.json()["product"]["title"] is None
        assert cleared.json()["product"]["category"] == "drinks"

    async def test_unknown_product_field_and_labels_are_refused(
        self, client: httpx.AsyncClient
    ) -> None:
        missing = await client.patch("/products/nope", json={"title": "x"})
        assert missing.status_code == 404
        assert missing.json()["error"]["code"] == "product_not_found"
        await post(client, product("sku-1", 1))
        typo = await client.patch("/products/sku-1", json={"titel": "x"})
        assert typo.status_code == 422
        assert "titel" in typo.text
        reserved = await client.patch("/products/sku-1", json={"labels": {"category": ["x"]}})
        assert reserved.status_code == 422


class TestProductImages:
    async def test_add_then_remove_one_image(self, db_client: httpx.AsyncClient) -> None:
        await post(db_client, product("sku-1", 1), product("sku-2", 2))
        added = await db_client.post("/products/sku-1/images", json={"data": b64(jpeg(7))})
        assert added.status_code == 200, added.text
        image = added.json()["image"]
        assert added.json()["status"] == "updated"
        assert image["position"] == 1
        assert (await search(db_client, jpeg(7)))[0]["id"] == "sku-1"  # searchable at once
        stored = (await db_client.get("/products/sku-1")).json()["images"]
        assert [i["image_id"] for i in stored][-1] == image["image_id"]

        repeat = await db_client.post("/products/sku-1/images", json={"data": b64(jpeg(7))})
        assert repeat.json() == {"status": "unchanged", "image": image}

        removed = await db_client.delete(f"/products/sku-1/images/{image['image_id']}")
        assert removed.status_code == 204
        assert (image["image_id"], "delete") in _change_log(db_client)
        hits = await search(db_client, jpeg(7))
        assert all(h["image_id"] != image["image_id"] for h in hits)
        assert len((await db_client.get("/products/sku-1")).json()["images"]) == 1

        other = (await db_client.get("/products/sku-2")).json()["images"][0]["image_id"]
        wrong = await db_client.delete(f"/products/sku-1/images/{other}")
        assert wrong.status_code == 404
        assert wrong.json()["error"]["code"] == "image_not_found"

    async def test_multipart_upload_with_box(self, db_client: httpx.AsyncClient) -> None:
        await post(db_client, product("sku-1", 1))
        response = await db_client.post(
            "/products/sku-1/images/upload",
            files={"image": ("a.jpg", jpeg(4), "image/jpeg")},
            data={"bbox": "0,0,40,30"},
        )
        assert response.status_code == 200, response.text
        assert response.json()["image"]["box"] == [0, 0, 40, 30]
        bad = await db_client.post(
            "/products/sku-1/images/upload",
            files={"image": ("a.jpg", jpeg(4), "image/jpeg")},
            data={"bbox": "0,0,-1"},
        )
        assert bad.status_code == 422

    async def test_image_changes_refresh_duplicate_pairs(
        self, db_client: httpx.AsyncClient
    ) -> None:
        items = variants()
        await post(
            db_client,
            {"id": "a", "images": [{"data": b64(items["original"])}]},
            {"id": "b", "images": [{"data": b64(items["other-1"])}]},
        )
        params = {"min_score": 0.8}
        assert (await db_client.get("/duplicates", params=params)).json()["pairs"] == []
        added = await db_client.post("/products/b/images", json={"data": b64(items["resized"])})
        pairs = (await db_client.get("/duplicates", params=params)).json()["pairs"]
        assert [{p["a"], p["b"]} for p in pairs] == [{"a", "b"}]
        await db_client.delete(f"/products/b/images/{added.json()['image']['image_id']}")
        assert (await db_client.get("/duplicates", params=params)).json()["pairs"] == []
