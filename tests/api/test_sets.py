"""Product sets: membership on create and PATCH, the `set` filter key in search and lists,
and duplicates within one set or across two (feed vs catalogue), on SQLite and PostgreSQL."""

from __future__ import annotations

from typing import Any

import httpx

from tests.api.test_duplicates import b64, variants
from tests.api.test_search import index, jpeg


def item(pid: str, data: bytes, *sets: str) -> dict[str, Any]:
    return {"id": pid, "sets": list(sets), "images": [{"data": b64(data)}]}


class TestSets:
    async def test_membership_filters_and_patch(self, db_client: httpx.AsyncClient) -> None:
        await index(
            db_client,
            [
                item("a", jpeg(1), "catalogue"),
                item("b", jpeg(2), "catalogue", "feed"),
                item("c", jpeg(3), "feed"),
                item("d", jpeg(4)),
            ],
        )
        assert (await db_client.get("/products/b")).json()["sets"] == ["catalogue", "feed"]

        hits = (
            await db_client.post(
                "/search",
                json={"image": b64(jpeg(1)), "k": 10, "filters": {"must": {"set": ["feed"]}}},
            )
        ).json()["results"]
        assert {h["id"] for h in hits} == {"b", "c"}
        assert {h["id"]: h["sets"] for h in hits}["b"] == ["catalogue", "feed"]

        listed = (
            await db_client.get(
                "/products", params={"label": "set:catalogue", "exclude_label": "set:feed"}
            )
        ).json()
        assert [p["id"] for p in listed["products"]] == ["a"]
        assert listed["total"] == 1

        patched = await db_client.patch("/products/d", json={"sets": ["feed"]})
        assert patched.json()["product"]["sets"] == ["feed"]
        feed = (await db_client.get("/products", params={"label": "set:feed"})).json()
        assert feed["total"] == 3

        # a re-post without `sets` keeps them
        await db_client.post(
            "/products", json={"products": [{"id": "d", "images": [{"data": b64(jpeg(4))}]}]}
        )
        assert (await db_client.get("/products/d")).json()["sets"] == ["feed"]

    async def test_reserved_names_and_bad_set_ids(self, client: httpx.AsyncClient) -> None:
        labelled = {"id": "x", "labels": {"set": ["a"]}, "images": [{"data": b64(jpeg(1))}]}
        assert (await client.post("/products", json={"products": [labelled]})).status_code == 422
        bad = {"id": "x", "sets": ["no spaces"], "images": [{"data": b64(jpeg(1))}]}
        assert (await client.post("/products", json={"products": [bad]})).status_code == 422


class TestDuplicatesAcrossSets:
    async def test_within_one_set_and_across_two(self, db_client: httpx.AsyncClient) -> None:
        v = variants()
        await index(
            db_client,
            [
                item("cat-1", v["original"], "catalogue"),
                item("cat-2", v["other-1"], "catalogue"),
                item("feed-1", v["resized"], "feed"),
                item("feed-2", v["cropped"], "feed"),
                item("feed-3", v["other-2"], "feed"),
            ],
        )
        params: dict[str, Any] = {"min_score": 0.8}
        across = (
            await db_client.get(
                "/duplicates", params={**params, "set_a": "feed", "set_b": "catalogue"}
            )
        ).json()
        assert {frozenset((p["a"], p["b"])) for p in across["pairs"]} == {
            frozenset(("cat-1", "feed-1")),
            frozenset(("cat-1", "feed-2")),
        }
        assert across["total"] == 2
        within = (await db_client.get("/duplicates", params={**params, "label": "set:feed"})).json()
        assert {frozenset((p["a"], p["b"])) for p in within["pairs"]} == {
            frozenset(("feed-1", "feed-2"))
        }
        half = await db_client.get("/duplicates", params={**params, "set_a": "feed"})
        assert half.status_code == 422
