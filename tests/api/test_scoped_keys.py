"""API keys scoped to product sets (`VS_API_KEY_SCOPES`): a key confined to set `a` never
sees, searches or changes a product outside it, through every route, on SQLite and
PostgreSQL; an unscoped key sees everything."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.routing import APIRoute, iter_route_contexts

from app.api.openapi import _calls
from app.api.security import (
    caller_scope,
    require_metrics_key,
    require_read_key,
    require_unscoped,
    require_write_key,
)
from app.core.config import Settings
from app.imaging.decode import decode_image
from app.main import create_app
from tests.api.test_duplicates import b64
from tests.api.test_imports import wait_for
from tests.api.test_search import jpeg
from tests.conftest import app_client
from tests.images import encode

GROCERY = Path(__file__).resolve().parents[1] / "fixtures" / "grocery"
JUICE = (GROCERY / "tropicana-apple-juice.jpg").read_bytes()
OAT = (GROCERY / "oatly-natural-oatghurt.jpg").read_bytes()

ADMIN = {"X-API-Key": "admin"}  # a write key, unscoped
READER = {"X-API-Key": "reader"}  # a read key, unscoped
SHOP_A = {"X-API-Key": "shop-a"}  # a write key, confined to set `a`

# id -> (photo, sets). The juice photo is in both sets (a cross-set duplicate pair an
# unscoped key sees), and twice in `a`; the oat photo twice in `b`.
CATALOGUE: dict[str, tuple[bytes, list[str]]] = {
    "a-juice": (JUICE, ["a"]),
    "a-juice-copy": (
        encode(decode_image(JUICE, max_pixels=10**8).resize((240, 240)), "PNG"),
        ["a"],
    ),
    "a-other": (jpeg(1), ["a"]),
    "ab-both": (jpeg(2), ["a", "b"]),
    "b-juice": (JUICE, ["b"]),
    "b-oat": (OAT, ["b"]),
    "b-oat-copy": (encode(decode_image(OAT, max_pixels=10**8), "WEBP", quality=85), ["b"]),
    "no-set": (jpeg(3), []),
}
IN_A = {pid for pid, (_, sets) in CATALOGUE.items() if "a" in sets}
OUTSIDE_A = set(CATALOGUE) - IN_A


def scoped_settings(settings: Settings) -> Settings:
    return settings.model_copy(
        update={
            "api_keys": "admin,shop-a",
            "api_keys_read": "reader",
            "api_key_scopes": {"shop-a": ["a"]},
        }
    )


@pytest.fixture
async def shop(db_settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    """The app with the catalogue above, indexed with the unscoped key."""
    async with app_client(scoped_settings(db_settings)) as client:
        products = [
            {"id": pid, "title": pid, "sets": sets, "images": [{"data": b64(data)}]}
            for pid, (data, sets) in CATALOGUE.items()
        ]
        response = await client.post("/products", json={"products": products}, headers=ADMIN)
        assert response.status_code == 200
        assert {r["status"] for r in response.json()["results"]} == {"created"}
        yield client


async def ids_listed(client: httpx.AsyncClient, key: dict[str, str], **params: Any) -> set[str]:
    response = await client.get("/products", params=params, headers=key)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["total"] == len(body["products"])
    return {p["id"] for p in body["products"]}


async def search_ids(client: httpx.AsyncClient, key: dict[str, str], **body: Any) -> list[str]:
    response = await client.post("/search", json={"k": 20, **body}, headers=key)
    assert response.status_code == 200, response.text
    return [hit["id"] for hit in response.json()["results"]]


async def pair_set(
    client: httpx.AsyncClient, key: dict[str, str], path: str = "/duplicates", **params: Any
) -> set[frozenset[str]]:
    defaults = {"min_score": 0.8} if path == "/duplicates" else {}
    response = await client.get(path, params={**defaults, **params}, headers=key)
    assert response.status_code == 200, response.text
    return {frozenset((p["a"], p["b"])) for p in response.json()["pairs"]}


async def image_of(client: httpx.AsyncClient, pid: str) -> int:
    product = (await client.get(f"/products/{pid}", headers=ADMIN)).json()
    return int(product["images"][0]["image_id"])


async def same_as_missing(response: httpx.Response, client: httpx.AsyncClient, pid: str) -> None:
    """A product outside the scope is answered word for word as one that does not exist."""
    missing = await client.request(
        response.request.method,
        str(response.request.url).replace(pid, "never-was"),
        content=response.request.content.replace(pid.encode(), b"never-was"),
        headers=dict(response.request.headers),
    )
    assert response.status_code == missing.status_code == 404
    assert response.json()["error"]["code"] == missing.json()["error"]["code"]
    assert response.json()["error"]["message"] == missing.json()["error"]["message"].replace(
        "never-was", pid
    )


class TestReads:
    async def test_lists_and_searches_stay_inside_the_scope(self, shop: httpx.AsyncClient) -> None:
        assert await ids_listed(shop, SHOP_A) == IN_A
        assert await ids_listed(shop, SHOP_A, label="set:b") == set()
        assert await ids_listed(shop, SHOP_A, label="set:a", exclude_label="set:b") == IN_A - {
            "ab-both"
        }
        assert await ids_listed(shop, ADMIN) == set(CATALOGUE)
        assert await ids_listed(shop, READER) == set(CATALOGUE)
        # the names of sets outside the scope are not shown either
        for key, shown in ((SHOP_A, ["a"]), (READER, ["a", "b"])):
            product = await shop.get("/products/ab-both", headers=key)
            assert product.json()["sets"] == shown
            hits = await shop.post("/search", json={"image": b64(jpeg(2)), "k": 1}, headers=key)
            assert [(h["id"], h["sets"]) for h in hits.json()["results"]] == [("ab-both", shown)]

        for photo in (JUICE, OAT):
            # k exceeds the catalogue: every visible product comes back, and no other
            assert set(await search_ids(shop, SHOP_A, image=b64(photo))) == IN_A
            assert set(await search_ids(shop, READER, image=b64(photo))) == set(CATALOGUE)
        assert (await search_ids(shop, READER, image=b64(OAT)))[0].startswith("b-oat")
        assert (
            await search_ids(shop, SHOP_A, image=b64(OAT), filters={"must": {"set": ["b"]}}) == []
        )
        top = await search_ids(shop, SHOP_A, image=b64(JUICE), k=2)
        assert set(top) == {"a-juice", "a-juice-copy"}

        upload = await shop.post(
            "/search/upload", files={"image": ("oat.jpg", OAT)}, data={"k": "20"}, headers=SHOP_A
        )
        assert upload.status_code == 200
        assert {hit["id"] for hit in upload.json()["results"]} == IN_A

        batch = await shop.post(
            "/search/batch",
            json={"queries": [{"image": b64(OAT), "k": 20}, {"image": b64(JUICE), "k": 20}]},
            headers=SHOP_A,
        )
        assert batch.status_code == 200
        for item in batch.json()["responses"]:
            assert {hit["id"] for hit in item["results"]} == IN_A

        similar = await shop.post(
            "/search/similar", json={"product_id": "a-juice", "k": 20}, headers=SHOP_A
        )
        assert {hit["id"] for hit in similar.json()["results"]} == IN_A - {"a-juice"}
        similar = await shop.post(
            "/search/similar", json={"product_id": "a-juice", "k": 20}, headers=READER
        )
        assert {hit["id"] for hit in similar.json()["results"]} == set(CATALOGUE) - {"a-juice"}

    async def test_products_outside_the_scope_do_not_exist(self, shop: httpx.AsyncClient) -> None:
        for pid in OUTSIDE_A:
            await same_as_missing(await shop.get(f"/products/{pid}", headers=SHOP_A), shop, pid)
            response = await shop.post("/search/similar", json={"product_id": pid}, headers=SHOP_A)
            await same_as_missing(response, shop, pid)
            assert (await shop.get(f"/products/{pid}", headers=READER)).status_code == 200

            image_id = await image_of(shop, pid)
            thumbnail = await shop.get(f"/images/{image_id}/thumbnail", headers=SHOP_A)
            assert thumbnail.status_code == 404
            assert thumbnail.json()["error"]["code"] == "thumbnail_not_found"
            by_image = await shop.post(
                "/search/similar", json={"image_id": image_id}, headers=SHOP_A
            )
            assert by_image.status_code == 404
            assert by_image.json()["error"]["code"] == "image_not_found"
            admin_thumbnail = await shop.get(f"/images/{image_id}/thumbnail", headers=READER)
            assert admin_thumbnail.status_code == 200

        for pid in IN_A:
            assert (await shop.get(f"/products/{pid}", headers=SHOP_A)).status_code == 200
            image_id = await image_of(shop, pid)
            thumbnail = await shop.get(f"/images/{image_id}/thumbnail", headers=SHOP_A)
            assert thumbnail.status_code == 200


class TestDuplicates:
    async def test_pairs_groups_audit_and_decisions(self, shop: httpx.AsyncClient) -> None:
        everything = await pair_set(shop, READER)
        cross = frozenset(("a-juice", "b-juice"))
        assert cross in everything  # the same photo in both sets is a pair
        assert frozenset(("b-oat", "b-oat-copy")) in everything
        inside = await pair_set(shop, SHOP_A)
        assert inside == {frozenset(("a-juice", "a-juice-copy"))}
        assert {p for p in everything if p <= IN_A} == inside

        assert await pair_set(shop, SHOP_A, set_a="a", set_b="b") == set()
        assert cross in await pair_set(shop, READER, set_a="a", set_b="b")
        assert await pair_set(shop, SHOP_A, label="set:b") == set()

        audit = await pair_set(shop, SHOP_A, path="/duplicates/audit", size=50)
        assert audit == inside
        groups = await shop.get("/duplicates/groups", params={"min_score": 0.8}, headers=SHOP_A)
        members = {m for g in groups.json()["groups"] for m in g["members"]}
        assert members == {"a-juice", "a-juice-copy"}

        decide = {"a": "a-juice", "b": "b-juice", "decision": "same"}
        refused = await shop.post("/duplicates/decisions", json=decide, headers=SHOP_A)
        assert refused.status_code == 404
        assert refused.json()["error"]["code"] == "product_not_found"
        await same_as_missing(refused, shop, "b-juice")
        ok = {"a": "a-juice", "b": "a-juice-copy", "decision": "same"}
        assert (
            await shop.post("/duplicates/decisions", json=ok, headers=SHOP_A)
        ).status_code == 200
        theirs = {"a": "b-oat", "b": "b-oat-copy", "decision": "different"}
        assert (
            await shop.post("/duplicates/decisions", json=theirs, headers=ADMIN)
        ).status_code == 200

        decisions = await shop.get("/duplicates/decisions", headers=SHOP_A)
        # pairs are stored in row-id order, which concurrent ingest does not fix
        assert [frozenset((d["a"], d["b"])) for d in decisions.json()["decisions"]] == [
            frozenset(("a-juice", "a-juice-copy"))
        ]
        all_decisions = (await shop.get("/duplicates/decisions", headers=READER)).json()
        assert len(all_decisions["decisions"]) == 2
        undo = await shop.delete(
            "/duplicates/decisions", params={"a": "b-oat", "b": "b-oat-copy"}, headers=SHOP_A
        )
        assert undo.status_code == 404
        assert (
            len((await shop.get("/duplicates/decisions", headers=READER)).json()["decisions"]) == 2
        )

        for method in ("GET", "POST"):
            calibration = await shop.request(method, "/duplicates/calibration", headers=SHOP_A)
            assert calibration.status_code == 403
            assert calibration.json()["error"]["code"] == "forbidden"
        assert (await shop.get("/duplicates/calibration", headers=READER)).status_code == 200


class TestWrites:
    async def test_products_outside_cannot_be_changed(self, shop: httpx.AsyncClient) -> None:
        before = {
            pid: (await shop.get(f"/products/{pid}", headers=ADMIN)).json() for pid in OUTSIDE_A
        }
        image = {"data": b64(jpeg(9))}
        for pid in OUTSIDE_A:
            image_id = before[pid]["images"][0]["image_id"]
            for response in (
                await shop.patch(f"/products/{pid}", json={"title": "mine"}, headers=SHOP_A),
                await shop.delete(f"/products/{pid}", headers=SHOP_A),
                await shop.post(f"/products/{pid}/images", json=image, headers=SHOP_A),
                await shop.delete(f"/products/{pid}/images/{image_id}", headers=SHOP_A),
            ):
                await same_as_missing(response, shop, pid)
            # a re-post of the id fails for that product and leaves it as it was
            repost = {"id": pid, "title": "mine", "sets": ["a"], "images": [image]}
            response = await shop.post("/products", json={"products": [repost]}, headers=SHOP_A)
            assert response.status_code == 200
            (result,) = response.json()["results"]
            assert (result["status"], result["error"]["code"]) == ("failed", "product_not_found")
        after = {
            pid: (await shop.get(f"/products/{pid}", headers=ADMIN)).json() for pid in OUTSIDE_A
        }
        assert after == before

    async def test_writes_must_stay_inside_the_scope(self, shop: httpx.AsyncClient) -> None:
        image = [{"data": b64(jpeg(7))}]
        for sets in (["b"], ["a", "b"], [], None):
            product: dict[str, Any] = {"id": "new", "images": image}
            if sets is not None:
                product["sets"] = sets
            response = await shop.post("/products", json={"products": [product]}, headers=SHOP_A)
            assert response.status_code == 403, sets
            assert response.json()["error"]["code"] == "forbidden"
        upload = await shop.post(
            "/products/upload",
            data={"id": "new", "sets": json.dumps(["b"])},
            files={"image": ("x.jpg", jpeg(7))},
            headers=SHOP_A,
        )
        assert upload.status_code == 403
        assert (await shop.get("/products/new", headers=ADMIN)).status_code == 404

        created = await shop.post(
            "/products",
            json={"products": [{"id": "new", "sets": ["a"], "images": image}]},
            headers=SHOP_A,
        )
        assert created.json()["results"][0]["status"] == "created"
        assert "new" in await ids_listed(shop, SHOP_A)

        for sets in (["b"], ["a", "b"], [], None):
            moved = await shop.patch("/products/a-other", json={"sets": sets}, headers=SHOP_A)
            assert moved.status_code == 403, sets
        assert (await shop.get("/products/a-other", headers=ADMIN)).json()["sets"] == ["a"]

        # a product also in `b` keeps that membership whatever the scoped key sends
        kept = await shop.patch("/products/ab-both", json={"sets": ["a"]}, headers=SHOP_A)
        assert kept.status_code == 200
        assert kept.json()["product"]["sets"] == ["a"]  # other sets are not shown to it
        assert (await shop.get("/products/ab-both", headers=ADMIN)).json()["sets"] == ["a", "b"]
        reposted = await shop.post(
            "/products",
            json={
                "products": [
                    {
                        "id": "ab-both",
                        "title": "ab-both",
                        "sets": ["a"],
                        "images": [{"data": b64(jpeg(2))}],
                    }
                ]
            },
            headers=SHOP_A,
        )
        assert reposted.json()["results"][0]["status"] == "unchanged"
        assert "ab-both" in await ids_listed(shop, ADMIN, label="set:b")

        # the unscoped key moves products freely
        moved = await shop.patch("/products/a-other", json={"sets": ["b"]}, headers=ADMIN)
        assert moved.json()["product"]["sets"] == ["b"]
        assert "a-other" not in await ids_listed(shop, SHOP_A)

    async def test_imports_stay_inside_the_scope(self, shop: httpx.AsyncClient) -> None:
        """A scoped key's import job writes only into its sets, and only keys of its
        scope (and unscoped ones) see the job."""
        image = [{"data": b64(jpeg(8))}]
        records = [
            {"id": "imported-a", "sets": ["a"], "images": image},
            {"id": "imported-b", "sets": ["b"], "images": image},
            {"id": "imported-none", "images": image},
            {"id": "b-oat", "sets": ["a"], "images": image},  # held by a product in `b`
        ]
        data = "\n".join(json.dumps(r) for r in records).encode()
        files = {"file": ("feed.jsonl", data, "application/x-ndjson")}
        created = await shop.post("/imports", files=files, headers=SHOP_A)
        assert created.status_code == 202, created.text
        job_id = created.json()["id"]
        shop.headers.update(SHOP_A)  # wait_for polls without headers of its own
        try:
            job = await wait_for(shop, job_id)
        finally:
            del shop.headers["X-API-Key"]
        assert (job["status"], job["succeeded"], job["failed"]) == ("succeeded", 1, 3)
        failures = await shop.get(f"/imports/{job_id}/failures", headers=SHOP_A)
        codes = {
            row["product_id"]: row["code"] for row in map(json.loads, failures.text.splitlines())
        }
        assert codes == {
            "imported-b": "forbidden",
            "imported-none": "forbidden",
            "b-oat": "product_not_found",
        }
        assert (await shop.get("/products/imported-a", headers=ADMIN)).json()["sets"] == ["a"]
        for pid in ("imported-b", "imported-none"):
            assert (await shop.get(f"/products/{pid}", headers=ADMIN)).status_code == 404
        assert (await shop.get("/products/b-oat", headers=ADMIN)).json()["sets"] == ["b"]

        # the unscoped keys see the job; the scoped key does not see theirs
        assert (await shop.get(f"/imports/{job_id}", headers=READER)).status_code == 200
        theirs = await shop.post(
            "/imports", files={"file": ("x.jsonl", b"{}\n", "application/x-ndjson")}, headers=ADMIN
        )
        assert theirs.status_code == 202, theirs.text
        other = theirs.json()["id"]
        listed = (await shop.get("/imports", headers=SHOP_A)).json()["imports"]
        assert [j["id"] for j in listed] == [job_id]
        everyone = (await shop.get("/imports", headers=ADMIN)).json()["imports"]
        assert {j["id"] for j in everyone} == {job_id, other}
        for response in (
            await shop.get(f"/imports/{other}", headers=SHOP_A),
            await shop.get(f"/imports/{other}/failures", headers=SHOP_A),
            await shop.post(f"/imports/{other}/cancel", headers=SHOP_A),
        ):
            assert response.status_code == 404
            assert response.json()["error"]["code"] == "import_not_found"


class TestConfiguration:
    def test_scopes_need_keys_on_reads_and_writes(self, settings: Settings, tmp_path: Path) -> None:
        scoped = {"api_key_scopes": {"k": ["a"]}}
        for keys in ({"api_keys": "k"}, {"api_keys_read": "k"}, {}):
            with pytest.raises(ValueError, match="VS_API_KEYS_READ"):
                create_app(settings.model_copy(update={**scoped, **keys}))
        both = {"api_keys": "w", "api_keys_read": "r"}
        with pytest.raises(ValueError, match="scoped key #1 is not"):
            create_app(settings.model_copy(update={**scoped, **both}))
        with pytest.raises(ValueError, match="non-empty list"):
            settings.model_copy(update={"api_key_scopes": {"r": []}, **both}).key_scopes()
        scopes_file = tmp_path / "scopes.json"
        scopes_file.write_text(json.dumps({"r": ["x", "y"]}))
        from_file = settings.model_copy(update={"api_key_scopes_file": scopes_file, **both})
        assert from_file.key_scopes() == {"r": frozenset({"x", "y"})}

    def test_every_data_route_applies_the_scope(self, settings: Settings) -> None:
        """A route behind a key either narrows to the caller's scope or refuses scoped
        keys; only the operational probes (/ready's details, /metrics) show no product."""
        app = create_app(scoped_settings(settings))
        unchecked = []
        for route in iter_route_contexts(app.routes):
            if not isinstance(route.original_route, APIRoute):
                continue
            calls = set(_calls(route.dependant))
            keyed = calls & {require_read_key, require_write_key}
            if keyed and not calls & {caller_scope, require_unscoped}:
                unchecked.append(route.path_format)
            if require_metrics_key in calls:
                assert caller_scope not in calls
        assert unchecked == []
