"""Labels on products and the filter expression (search, product list, duplicates), on
SQLite and PostgreSQL, through HTTP."""

from __future__ import annotations

import itertools
from typing import Any

import httpx
import pytest

from app.catalogue import search as search_module
from app.catalogue.filters import LabelFilter
from tests.api.test_duplicates import SAME, ingest, names, variants
from tests.api.test_search import b64, index, jpeg

COLORS = ("red", "blue", "green")
BRANDS = ("acme", "zenith")


def labelled(n: int = 12) -> list[dict[str, Any]]:
    """Products with colour i % 3, brand i % 2, category by i % 4 < 2, and every fourth
    product also in a second colour (OR within a key)."""
    products = []
    for i in range(n):
        colors = [COLORS[i % 3]] + ([COLORS[(i + 1) % 3]] if i % 4 == 3 else [])
        products.append(
            {
                "id": f"sku-{i}",
                "title": f"product {i}",
                "category": "food" if i % 4 < 2 else "tools",
                "labels": {"color": colors, "brand": [BRANDS[i % 2]]},
                "images": [{"data": b64(jpeg(i))}],
            }
        )
    return products


def expected(products: list[dict[str, Any]], where: LabelFilter) -> set[str]:
    return {p["id"] for p in products if where.matches(p["category"], p["labels"])}


FILTERS: list[dict[str, Any]] = [
    {"must": {"color": ["red", "blue"], "brand": ["acme"]}},
    {"must": {"color": ["green"]}, "must_not": {"brand": ["zenith"]}},
    {"must": {"category": ["tools"], "color": ["red"]}},
    {"must_not": {"color": ["red"], "category": ["food"]}},
    {"category": "food", "must": {"brand": ["zenith"]}},
]


class TestLabels:
    async def test_stored_normalised_and_shown_on_product_and_list(
        self, db_client: httpx.AsyncClient
    ) -> None:
        product = {
            "id": "sku-1",
            "labels": {"color": ["red", "blue", "red"], "brand": ["Acme"]},
            "images": [{"data": b64(jpeg(1))}],
        }
        await index(db_client, [product])
        got = (await db_client.get("/products/sku-1")).json()
        assert got["labels"] == {"brand": ["Acme"], "color": ["blue", "red"]}
        listed = (await db_client.get("/products")).json()
        assert listed["products"][0]["labels"] == got["labels"]
        assert listed["total"] == 1

    async def test_repost_without_labels_keeps_them_and_empty_clears(
        self, db_client: httpx.AsyncClient
    ) -> None:
        base = {"id": "sku-1", "images": [{"data": b64(jpeg(1))}]}
        await index(db_client, [{**base, "labels": {"color": ["red"]}}])
        again = await db_client.post("/products", json={"products": [base]})
        assert again.json()["results"][0]["status"] == "unchanged"
        assert (await db_client.get("/products/sku-1")).json()["labels"] == {"color": ["red"]}
        changed = await db_client.post(
            "/products", json={"products": [{**base, "labels": {"color": ["blue"]}}]}
        )
        assert changed.json()["results"][0]["status"] == "updated"
        assert (await db_client.get("/products/sku-1")).json()["labels"] == {"color": ["blue"]}
        await db_client.post("/products", json={"products": [{**base, "labels": {}}]})
        assert (await db_client.get("/products/sku-1")).json()["labels"] == {}

    async def test_multipart_product_takes_labels(self, db_client: httpx.AsyncClient) -> None:
        response = await db_client.post(
            "/products",
            data={"id": "sku-m", "labels": '{"color": ["red"]}'},
            files={"image": ("a.jpg", jpeg(5), "image/jpeg")},
        )
        assert response.status_code == 200, response.text
        assert (await db_client.get("/products/sku-m")).json()["labels"] == {"color": ["red"]}

    @pytest.mark.parametrize(
        ("labels", "field"),
        [
            ({"category": ["x"]}, "category"),
            ({"bad key": ["x"]}, "bad key"),
            ({"color": []}, "at least 1"),
            ({"color": ["a\x00b"]}, "control"),
        ],
    )
    async def test_bad_labels_are_refused(
        self, client: httpx.AsyncClient, labels: dict[str, Any], field: str
    ) -> None:
        product = {"id": "sku-1", "labels": labels, "images": [{"data": b64(jpeg(1))}]}
        response = await client.post("/products", json={"products": [product]})
        assert response.status_code == 422
        assert field in response.text


class TestSearchFilters:
    async def test_every_filter_returns_exactly_the_matching_products(
        self, db_client: httpx.AsyncClient
    ) -> None:
        products = labelled()
        await index(db_client, products)
        for filters in FILTERS:
            body = {"image": b64(jpeg(0)), "k": 50, "filters": filters}
            response = await db_client.post("/search", json=body)
            assert response.status_code == 200, response.text
            hits = response.json()["results"]
            where = LabelFilter.build(
                filters.get("must"), filters.get("must_not"), category=filters.get("category")
            )
            assert {h["id"] for h in hits} == expected(products, where), filters
            by_id = {p["id"]: p for p in products}
            for hit in hits:  # hits carry the product's labels
                assert hit["labels"] == {
                    k: sorted(set(v)) for k, v in by_id[hit["id"]]["labels"].items()
                }

    async def test_broad_filters_deepen_until_k_pass(
        self, db_client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """With the allow-list limit at 1 image, every filter takes the accept-and-deepen
        path over the ANN results: still k results whenever k pass."""
        monkeypatch.setattr(search_module, "EXACT_FILTER_LIMIT", 1)
        products = labelled(16)
        await index(db_client, products)
        filters = {"must": {"color": ["green"]}}
        matching = expected(products, LabelFilter.build(filters["must"]))
        for k in (1, 3, len(matching)):
            body = {"image": b64(jpeg(1)), "k": k, "filters": filters}
            hits = (await db_client.post("/search", json=body)).json()["results"]
            assert len(hits) == k
            assert {h["id"] for h in hits} <= matching
        exact_hits = (
            await db_client.post(
                "/search", json={"image": b64(jpeg(1)), "k": 4, "filters": filters}
            )
        ).json()["results"]
        monkeypatch.setattr(search_module, "EXACT_FILTER_LIMIT", 50_000)
        allowed_hits = (
            await db_client.post(
                "/search", json={"image": b64(jpeg(1)), "k": 4, "filters": filters}
            )
        ).json()["results"]
        assert [h["id"] for h in exact_hits] == [h["id"] for h in allowed_hits]

    async def test_multipart_search_takes_filters(self, db_client: httpx.AsyncClient) -> None:
        products = labelled(6)
        await index(db_client, products)
        response = await db_client.post(
            "/search",
            data={"k": "10", "filters": '{"must": {"brand": ["zenith"]}}'},
            files={"image": ("q.jpg", jpeg(1), "image/jpeg")},
        )
        assert response.status_code == 200, response.text
        assert {h["id"] for h in response.json()["results"]} == {"sku-1", "sku-3", "sku-5"}

    @pytest.mark.parametrize(
        "filters",
        [
            {"must": {"color": ["red"]}, "should": {"color": ["blue"]}},
            {"must": {"color": "red"}},
            {"must": {"color": []}},
            {"must": {"no spaces": ["x"]}},
        ],
    )
    async def test_malformed_filters_are_422(
        self, client: httpx.AsyncClient, filters: dict[str, Any]
    ) -> None:
        body = {"image": b64(jpeg(1)), "filters": filters}
        response = await client.post("/search", json=body)
        assert response.status_code == 422, response.text
        assert response.json()["error"]["code"] == "invalid_request"


class TestListFilters:
    async def test_product_list_filters_and_counts(self, db_client: httpx.AsyncClient) -> None:
        products = labelled()
        await index(db_client, products)
        cases = [
            (["color:red", "color:blue", "brand:acme"], []),
            (["category:tools"], ["color:red"]),
            ([], ["brand:zenith", "color:green"]),
        ]
        for include, exclude in cases:
            params = [("label", t) for t in include] + [("exclude_label", t) for t in exclude]
            where = LabelFilter.parse_terms(include, exclude)
            want = expected(products, where)
            seen: list[str] = []
            cursor = None
            for _ in range(10):
                page_params = [*params, ("limit", "2")] + ([("cursor", cursor)] if cursor else [])
                body = (await db_client.get("/products", params=page_params)).json()
                assert body.get("total") == len(want), body
                seen += [p["id"] for p in body["products"]]
                cursor = body["next_cursor"]
                if cursor is None:
                    break
            assert set(seen) == want
            assert len(seen) == len(want)

    async def test_bad_term_is_422(self, client: httpx.AsyncClient) -> None:
        response = await client.get("/products", params={"label": "color"})
        assert response.status_code == 422
        assert "key:value" in response.json()["error"]["message"]

    async def test_duplicates_filter_on_both_products(self, db_client: httpx.AsyncClient) -> None:
        items = variants()
        await ingest(db_client, {n: items[n] for n in ("original", "reencoded")}, labels={})
        await ingest(db_client, {n: items[n] for n in ("resized", "cropped")}, labels={"x": ["1"]})
        everything = (await db_client.get("/duplicates", params={"min_score": 0.8})).json()
        assert everything["total"] == len(everything["pairs"]) >= 6
        all_same = {frozenset(p) for p in itertools.combinations(sorted(SAME), 2)}
        assert names(everything["pairs"]) == all_same
        only_x = (
            await db_client.get("/duplicates", params={"min_score": 0.8, "label": "x:1"})
        ).json()
        assert names(only_x["pairs"]) == {frozenset({"resized", "cropped"})}
        assert only_x["total"] == 1
        not_x = (
            await db_client.get("/duplicates", params={"min_score": 0.8, "exclude_label": "x:1"})
        ).json()
        assert names(not_x["pairs"]) == {frozenset({"original", "reencoded"})}
        groups = (
            await db_client.get("/duplicates/groups", params={"min_score": 0.8, "label": "x:1"})
        ).json()["groups"]
        assert [sorted(g["members"]) for g in groups] == [["cropped", "resized"]]
