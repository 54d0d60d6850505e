"""More like a stored product or image, batch search and group_size, through HTTP on
SQLite and PostgreSQL."""

from __future__ import annotations

import httpx

from tests.api.test_search import b64, catalogue, index, jpeg


class TestSimilar:
    async def test_like_an_image_finds_the_near_copy_not_itself(
        self, db_client: httpx.AsyncClient
    ) -> None:
        products = catalogue(6)
        products[5]["images"] = [{"data": b64(jpeg(2, (118, 100)))}]  # a near-copy of sku-2
        await index(db_client, products)
        image_id = (await db_client.get("/products/sku-2")).json()["images"][0]["image_id"]

        by_image = await db_client.post("/search/similar", json={"image_id": image_id, "k": 3})
        assert by_image.status_code == 200, by_image.text
        hits = by_image.json()["results"]
        assert hits[0]["id"] == "sku-5"
        assert "sku-2" not in {h["id"] for h in hits}
        assert len(hits) == 3

        by_product = await db_client.post("/search/similar", json={"product_id": "sku-2", "k": 5})
        ids = [h["id"] for h in by_product.json()["results"]]
        assert ids[0] == "sku-5"
        assert "sku-2" not in ids
        assert len(ids) == 5

        filtered = await db_client.post(
            "/search/similar",
            json={"product_id": "sku-2", "k": 5, "filters": {"must": {"category": ["odd"]}}},
        )
        assert {h["category"] for h in filtered.json()["results"]} == {"odd"}

    async def test_unknown_ids_and_ambiguous_bodies(self, client: httpx.AsyncClient) -> None:
        missing = await client.post("/search/similar", json={"product_id": "nope"})
        assert missing.status_code == 404
        assert missing.json()["error"]["code"] == "product_not_found"
        image = await client.post("/search/similar", json={"image_id": 999})
        assert image.status_code == 404
        assert image.json()["error"]["code"] == "image_not_found"
        both = await client.post("/search/similar", json={"product_id": "a", "image_id": 1})
        assert both.status_code == 422


class TestBatch:
    async def test_one_response_per_query_in_order_errors_stay_local(
        self, db_client: httpx.AsyncClient
    ) -> None:
        await index(db_client, catalogue(6))
        queries = [
            {"image": b64(jpeg(3)), "k": 2},
            {"image": b64(b"not an image"), "k": 2},
            {"image": b64(jpeg(4)), "k": 3, "filters": {"must": {"category": ["even"]}}},
        ]
        response = await db_client.post("/search/batch", json={"queries": queries})
        assert response.status_code == 200, response.text
        got = response.json()["responses"]
        assert len(got) == 3
        assert got[0]["results"][0]["id"] == "sku-3"
        assert len(got[0]["results"]) == 2
        assert got[1]["results"] == []
        assert got[1]["error"]["code"] == "image_undecodable"
        assert got[2]["results"][0]["id"] == "sku-4"
        assert {h["category"] for h in got[2]["results"]} == {"even"}

    async def test_too_many_queries_is_422(self, client: httpx.AsyncClient) -> None:
        queries = [{"image": b64(jpeg(1))}] * 33
        response = await client.post("/search/batch", json={"queries": queries})
        assert response.status_code == 422


class TestGroupSize:
    async def test_hits_list_up_to_group_size_images_best_first(
        self, db_client: httpx.AsyncClient
    ) -> None:
        products = catalogue(4)
        products[0]["images"] = [
            {"data": b64(jpeg(40))},
            {"data": b64(jpeg(3, (118, 100)))},
            {"data": b64(jpeg(41))},
        ]
        await index(db_client, products)
        stored = (await db_client.get("/products/sku-0")).json()["images"]
        body = {"image": b64(jpeg(3)), "k": 4, "group_size": 2}
        hits = (await db_client.post("/search", json=body)).json()["results"]
        hit = next(h for h in hits if h["id"] == "sku-0")
        assert len(hit["images"]) == 2
        assert hit["images"][0]["image_id"] == stored[1]["image_id"] == hit["image_id"]
        assert hit["images"][0]["score"] >= hit["images"][1]["score"]
        single = next(h for h in hits if h["id"] == "sku-1")
        assert len(single["images"]) == 1  # it has one image
        one = (await db_client.post("/search", json={**body, "group_size": 1})).json()
        assert all(len(h["images"]) == 1 for h in one["results"])
