from __future__ import annotations

import asyncio
import base64
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from app.catalogue.models import ChangeLog, Product, ProductImage
from app.core.config import Settings
from app.core.database import Database
from tests.conftest import app_client
from tests.httpserver import body, serve
from tests.images import encode, pattern


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def jpeg(seed: int, size: tuple[int, int] = (80, 64)) -> bytes:
    return encode(pattern(*size, seed=seed), "JPEG", quality=92)


def product(pid: str, *seeds: int, **fields: Any) -> dict[str, Any]:
    return {"id": pid, "images": [{"data": b64(jpeg(s))} for s in seeds], **fields}


async def post(client: httpx.AsyncClient, *products: dict[str, Any], **kw: Any) -> httpx.Response:
    return await client.post("/products", json={"products": list(products)}, **kw)


def _db(client: httpx.AsyncClient) -> Database:
    return client.app.state.vs.services.db  # type: ignore[attr-defined]


def _change_log(client: httpx.AsyncClient) -> list[tuple[int, str]]:
    with _db(client).read() as session:
        rows = session.execute(select(ChangeLog.image_id, ChangeLog.op).order_by(ChangeLog.seq))
        return [(r[0], r[1]) for r in rows]


def _embedded(client: httpx.AsyncClient) -> int:
    return client.app.state.vs.services.worker.stats.images  # type: ignore[attr-defined,no-any-return]


class TestCreateProducts:
    async def test_create_then_read_back(self, db_client: httpx.AsyncClient) -> None:
        response = await post(
            db_client,
            product("sku-1", 1, 2, title="Milk", category="dairy", attributes={"brand": "A"}),
        )
        assert response.status_code == 200
        assert response.json() == {
            "results": [{"id": "sku-1", "status": "created", "images": 2, "error": None}]
        }
        got = (await db_client.get("/products/sku-1")).json()
        assert got["title"] == "Milk"
        assert got["category"] == "dairy"
        assert got["attributes"] == {"brand": "A"}
        assert [img["position"] for img in got["images"]] == [0, 1]
        assert all(img["embedding"] is None for img in got["images"])
        assert got["images"][0]["width"] == 80
        with_vectors = (await db_client.get("/products/sku-1?embeddings=true")).json()
        vector = with_vectors["images"][0]["embedding"]
        assert len(vector) == 512
        assert abs(sum(v * v for v in vector) - 1.0) < 1e-4
        ops = _change_log(db_client)
        assert [op for _, op in ops] == ["upsert", "upsert"]
        assert {i for i, _ in ops} == {img["image_id"] for img in got["images"]}

    async def test_reposting_is_an_idempotent_upsert(self, db_client: httpx.AsyncClient) -> None:
        await post(db_client, product("sku-1", 1, 2, title="Milk"))
        first = (await db_client.get("/products/sku-1")).json()
        embedded = _embedded(db_client)

        again = (await post(db_client, product("sku-1", 1, 2, title="Milk"))).json()

        assert again["results"][0]["status"] == "unchanged"
        assert _embedded(db_client) == embedded  # identical bytes are not re-embedded
        assert (await db_client.get("/products/sku-1")).json()["images"] == first["images"]
        assert len(_change_log(db_client)) == 2

    async def test_changed_fields_and_images_update_in_place(
        self, db_client: httpx.AsyncClient
    ) -> None:
        await post(db_client, product("sku-1", 1, 2, title="Milk"))
        before = (await db_client.get("/products/sku-1")).json()["images"]
        embedded = _embedded(db_client)

        result = (await post(db_client, product("sku-1", 2, 3, title="Whole milk"))).json()

        assert result["results"][0] == {
            "id": "sku-1",
            "status": "updated",
            "images": 2,
            "error": None,
        }
        after = (await db_client.get("/products/sku-1")).json()
        assert after["title"] == "Whole milk"
        assert _embedded(db_client) == embedded + 1  # only image 3 is new
        # image 2 kept its id (moved to position 0), image 1 deleted, image 3 added
        assert after["images"][0]["image_id"] == before[1]["image_id"]
        assert after["images"][1]["image_id"] not in {i["image_id"] for i in before}
        log = _change_log(db_client)[2:]
        assert (before[0]["image_id"], "delete") in log
        assert (after["images"][1]["image_id"], "upsert") in log
        assert len(log) == 2

    async def test_same_bytes_in_another_product_reuse_the_embedding(
        self, db_client: httpx.AsyncClient
    ) -> None:
        await post(db_client, product("sku-1", 7))
        embedded = _embedded(db_client)
        result = (await post(db_client, product("sku-2", 7))).json()
        assert result["results"][0]["status"] == "created"
        assert _embedded(db_client) == embedded

    async def test_one_bad_product_does_not_sink_the_others(
        self, db_client: httpx.AsyncClient
    ) -> None:
        bad = {"id": "sku-bad", "images": [{"data": b64(jpeg(1))}, {"data": b64(b"not an image")}]}
        response = await post(db_client, product("sku-a", 1), bad, product("sku-c", 3))

        results = response.json()["results"]
        assert response.status_code == 200
        assert [r["status"] for r in results] == ["created", "failed", "created"]
        assert results[1]["error"]["code"] == "image_undecodable"
        assert results[1]["images"] == 0
        assert (await db_client.get("/products/sku-bad")).status_code == 404
        with _db(db_client).read() as session:
            assert session.scalar(select(Product).where(Product.external_id == "sku-bad")) is None

    async def test_failed_repost_keeps_the_previous_version(
        self, db_client: httpx.AsyncClient
    ) -> None:
        await post(db_client, product("sku-1", 1, title="Milk"))
        before = (await db_client.get("/products/sku-1")).json()
        bad = {"id": "sku-1", "title": "Broken", "images": [{"data": b64(b"\xff\xd8\xff")}]}

        result = (await post(db_client, bad)).json()["results"][0]

        assert result["status"] == "failed"
        assert (await db_client.get("/products/sku-1")).json() == before

    async def test_bad_base64_and_box_are_per_product_errors(
        self, db_client: httpx.AsyncClient
    ) -> None:
        response = await post(
            db_client,
            {"id": "a", "images": [{"data": "%%%not-base64%%%"}]},
            {
                "id": "b",
                "images": [{"data": b64(jpeg(1)), "box": {"x": 70, "y": 0, "w": 20, "h": 5}}],
            },
            {
                "id": "c",
                "images": [{"data": b64(jpeg(1)), "box": {"x": 10, "y": 5, "w": 20, "h": 30}}],
            },
        )
        results = response.json()["results"]
        assert [r["status"] for r in results] == ["failed", "failed", "created"]
        assert results[0]["error"]["code"] == "image_undecodable"
        assert results[1]["error"]["code"] == "invalid_box"
        got = (await db_client.get("/products/c")).json()
        assert got["images"][0]["box"] == [10, 5, 20, 30]

    async def test_concurrent_posts_of_one_id_end_with_one_product(
        self, db_client: httpx.AsyncClient
    ) -> None:
        payload = product("sku-race", 1, 2)
        responses = await asyncio.gather(*(post(db_client, payload) for _ in range(20)))

        statuses = [r.json()["results"][0]["status"] for r in responses]
        assert statuses.count("created") == 1
        assert statuses.count("unchanged") == 19
        with _db(db_client).read() as session:
            products = session.scalars(select(Product)).all()
            images = session.scalars(select(ProductImage)).all()
        assert len(products) == 1
        assert len(images) == 2
        assert sorted(op for _, op in _change_log(db_client)) == ["upsert", "upsert"]

    async def test_multipart_upload(self, db_client: httpx.AsyncClient) -> None:
        files = [
            ("image", ("a.jpg", jpeg(1), "image/jpeg")),
            ("image", ("b.png", encode(pattern(seed=2), "PNG"), "image/png")),
        ]
        response = await db_client.post(
            "/products",
            data={"id": "sku-m", "title": "Juice", "category": "drinks", "attributes": '{"l": 1}'},
            files=files,
        )
        assert response.status_code == 200
        assert response.json()["results"][0]["status"] == "created"
        got = (await db_client.get("/products/sku-m")).json()
        assert got["attributes"] == {"l": 1}
        assert len(got["images"]) == 2

    async def test_images_by_url(self, db_client: httpx.AsyncClient) -> None:
        with serve({"/a.jpg": body(jpeg(5))}) as server:
            response = await post(db_client, {"id": "u", "images": [{"url": server.url("/a.jpg")}]})
        assert response.json()["results"][0]["status"] == "created"
        got = (await db_client.get("/products/u")).json()
        assert got["images"][0]["url"] == server.url("/a.jpg")


class TestRequestValidation:
    @pytest.mark.parametrize(
        "payload",
        [
            {"products": []},
            {"products": [{"id": "x", "images": []}]},
            {"products": [{"id": "", "images": [{"data": "AA=="}]}]},
            {"products": [{"id": "x", "images": [{"data": "AA==", "url": "http://a/b"}]}]},
            {"products": [{"id": "x", "images": [{}]}]},
            {
                "products": [
                    {
                        "id": "x",
                        "images": [{"data": "AA==", "box": {"x": 0, "y": 0, "w": 0, "h": 1}}],
                    }
                ]
            },
            {"nope": 1},
        ],
    )
    async def test_invalid_payloads_are_422(
        self, client: httpx.AsyncClient, payload: dict[str, Any]
    ) -> None:
        response = await client.post("/products", json=payload)
        assert response.status_code == 422
        assert response.json()["error"]["code"] == "invalid_request"

    async def test_malformed_json(self, client: httpx.AsyncClient) -> None:
        response = await client.post(
            "/products", content=b"{not json", headers={"content-type": "application/json"}
        )
        assert response.status_code == 422

    async def test_too_many_products(self, settings: Settings) -> None:
        settings = settings.model_copy(update={"max_products_per_request": 2})
        async with app_client(settings) as c:
            response = await post(c, product("a", 1), product("b", 2), product("c", 3))
            assert response.status_code == 422
            assert "At most 2 products" in response.json()["error"]["message"]

    async def test_unsupported_media_type(self, client: httpx.AsyncClient) -> None:
        response = await client.post(
            "/products", content=b"x", headers={"content-type": "text/plain"}
        )
        assert response.status_code == 415


class TestBodyCap:
    async def test_declared_and_streamed_bodies_over_the_cap(self, settings: Settings) -> None:
        settings = settings.model_copy(update={"max_request_bytes": 50_000})
        big = {"products": [{"id": "a", "images": [{"data": b64(jpeg(1, (600, 600)))}] * 3}]}
        async with app_client(settings) as c:
            declared = await c.post("/products", json=big)
            assert declared.status_code == 413
            assert declared.json()["error"]["code"] == "request_too_large"

            async def stream():  # no Content-Length: chunked transfer
                yield b'{"products": [{"id": "a", "images": [{"data": "'
                for _ in range(100):
                    yield b"A" * 1000
                yield b'"}]}]}'

            streamed = await c.post(
                "/products", content=stream(), headers={"content-type": "application/json"}
            )
            assert streamed.status_code == 413


class TestApiKeys:
    async def test_writes_need_a_key_reads_do_not(self, settings: Settings) -> None:
        settings = settings.model_copy(update={"api_keys": "k1, k2"})
        async with app_client(settings) as c:
            payload = product("a", 1)
            assert (await post(c, payload)).status_code == 401
            wrong = await post(c, payload, headers={"X-API-Key": "nope"})
            assert wrong.status_code == 401
            assert wrong.json()["error"]["code"] == "unauthorized"
            assert (await post(c, payload, headers={"X-API-Key": "k2"})).status_code == 200
            assert (await c.delete("/products/a")).status_code == 401
            assert (await c.get("/products/a")).status_code == 200
            assert (await c.delete("/products/a", headers={"X-API-Key": "k1"})).status_code == 204


class TestDeleteAndList:
    async def test_delete(self, db_client: httpx.AsyncClient) -> None:
        await post(db_client, product("sku-1", 1, 2))
        ids = [i["image_id"] for i in (await db_client.get("/products/sku-1")).json()["images"]]

        assert (await db_client.delete("/products/sku-1")).status_code == 204

        assert (await db_client.get("/products/sku-1")).status_code == 404
        assert (await db_client.delete("/products/sku-1")).status_code == 404
        assert _change_log(db_client)[2:] == [(ids[0], "delete"), (ids[1], "delete")]

    async def test_cursor_paging_visits_each_product_once(
        self, db_client: httpx.AsyncClient
    ) -> None:
        await post(
            db_client,
            *[product(f"p{i}", i, category="even" if i % 2 == 0 else "odd") for i in range(5)],
        )
        seen: list[str] = []
        cursor = None
        while True:
            params = {"limit": 2} | ({"cursor": cursor} if cursor else {})
            page = (await db_client.get("/products", params=params)).json()
            seen += [p["id"] for p in page["products"]]
            cursor = page["next_cursor"]
            if cursor is None:
                break
        assert sorted(seen) == [f"p{i}" for i in range(5)]
        assert len(seen) == 5
        evens = (await db_client.get("/products", params={"category": "even"})).json()
        assert sorted(p["id"] for p in evens["products"]) == ["p0", "p2", "p4"]
        bad = await db_client.get("/products", params={"cursor": "!!"})
        assert bad.status_code == 422

    async def test_ids_with_slashes(self, db_client: httpx.AsyncClient) -> None:
        await post(db_client, product("brand/sku 1", 1))
        assert (await db_client.get("/products/brand/sku 1")).json()["id"] == "brand/sku 1"
