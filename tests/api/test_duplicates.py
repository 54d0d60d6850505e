from __future__ import annotations

import base64
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.catalogue import repository as repo
from app.catalogue.duplicates import bounded_groups
from app.core.config import Settings
from app.imaging.decode import decode_image
from tests.conftest import app_client
from tests.images import encode, pattern

SOURCE = pattern(200, 160, seed=100)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def variants() -> dict[str, bytes]:
    """One photo as several sellers upload it, plus unrelated products."""
    return {
        "original": encode(SOURCE, "PNG"),
        "reencoded": encode(
            decode_image(encode(SOURCE, "JPEG", quality=55), max_pixels=10**8), "JPEG", quality=80
        ),
        "resized": encode(SOURCE.resize((150, 120)), "WEBP", quality=90),
        "cropped": encode(SOURCE.crop((6, 5, 194, 155)), "JPEG", quality=90),
        "other-1": encode(pattern(200, 160, seed=1), "JPEG"),
        "other-2": encode(pattern(200, 160, seed=2), "JPEG"),
        "other-3": encode(pattern(200, 160, seed=3), "JPEG"),
    }


async def ingest(client: httpx.AsyncClient, items: dict[str, bytes], **extra: Any) -> None:
    products = [
        {"id": name, "category": "c", "images": [{"data": b64(data)}], **extra}
        for name, data in items.items()
    ]
    response = await client.post("/products", json={"products": products})
    assert all(r["status"] != "failed" for r in response.json()["results"])


async def pairs(client: httpx.AsyncClient, **params: Any) -> list[dict[str, Any]]:
    response = await client.get("/duplicates", params={"min_score": 0.8, **params})
    assert response.status_code == 200, response.text
    return response.json()["pairs"]  # type: ignore[no-any-return]


def names(found: list[dict[str, Any]]) -> set[frozenset[str]]:
    return {frozenset((p["a"], p["b"])) for p in found}


SAME = {"original", "reencoded", "resized", "cropped"}


class TestIncrementalPairs:
    async def test_copies_are_found_and_distinct_products_are_not(
        self, db_client: httpx.AsyncClient
    ) -> None:
        await ingest(db_client, variants())
        found = await pairs(db_client)

        expected = {frozenset((a, b)) for a in SAME for b in SAME if a < b}
        assert names(found) == expected
        by_pair = {frozenset((p["a"], p["b"])): p["score"] for p in found}
        assert by_pair[frozenset(("original", "resized"))] > 0.98
        assert by_pair[frozenset(("original", "reencoded"))] > 0.98
        assert [p["score"] for p in found] == sorted((p["score"] for p in found), reverse=True)
        assert all(p["decision"] is None for p in found)

    async def test_reimaging_and_deleting_update_pairs(self, db_client: httpx.AsyncClient) -> None:
        await ingest(db_client, variants())
        await ingest(db_client, {"resized": encode(pattern(200, 160, seed=9), "PNG")})
        assert not any("resized" in pair for pair in names(await pairs(db_client)))

        await db_client.delete("/products/original")
        remaining = names(await pairs(db_client))
        assert remaining == {frozenset(("reencoded", "cropped"))}

    async def test_paging_is_stable_and_complete(self, db_client: httpx.AsyncClient) -> None:
        await ingest(db_client, variants())
        everything = await pairs(db_client)
        seen: list[dict[str, Any]] = []
        cursor = None
        while True:
            params: dict[str, Any] = {"min_score": 0.8, "limit": 2}
            if cursor:
                params["cursor"] = cursor
            page = (await db_client.get("/duplicates", params=params)).json()
            seen += page["pairs"]
            cursor = page["next_cursor"]
            if not cursor:
                break
        assert seen == everything

    async def test_min_score_below_the_floor_is_422(self, client: httpx.AsyncClient) -> None:
        response = await client.get("/duplicates", params={"min_score": 0.5})
        assert response.status_code == 422
        assert "below the duplicates floor 0.8" in response.json()["error"]["message"]
        bad = await client.get("/duplicates", params={"min_score": 0.9, "cursor": "%%%"})
        assert bad.status_code == 422

    async def test_category_filter_needs_both_products_in_it(
        self, db_client: httpx.AsyncClient
    ) -> None:
        await ingest(db_client, variants())
        await ingest(db_client, {"resized": variants()["resized"]}, category="other")
        in_c = names(await pairs(db_client, category="c"))
        assert in_c
        assert not any("resized" in pair for pair in in_c)


class TestDecisions:
    async def test_decisions_are_listed_paged_and_can_be_undone(
        self, db_client: httpx.AsyncClient
    ) -> None:
        await ingest(db_client, variants())
        for a, b, decision in (
            ("original", "cropped", "different"),
            ("resized", "original", "same"),
            ("reencoded", "original", "same"),
        ):
            response = await db_client.post(
                "/duplicates/decisions", json={"a": a, "b": b, "decision": decision}
            )
            assert response.status_code == 200
        assert frozenset(("original", "cropped")) not in names(await pairs(db_client))

        seen, cursor = [], None
        while True:
            params = {"limit": 2} | ({"cursor": cursor} if cursor else {})
            page = (await db_client.get("/duplicates/decisions", params=params)).json()
            seen += page["decisions"]
            cursor = page["next_cursor"]
            if cursor is None:
                break
        assert len(seen) == 3
        assert {frozenset((d["a"], d["b"])): d["decision"] for d in seen} == {
            frozenset(("original", "cropped")): "different",
            frozenset(("original", "resized")): "same",
            frozenset(("original", "reencoded")): "same",
        }
        assert all(d["decided_at"] for d in seen)
        different = await db_client.get("/duplicates/decisions", params={"decision": "different"})
        assert [frozenset((d["a"], d["b"])) for d in different.json()["decisions"]] == [
            frozenset(("original", "cropped"))
        ]

        undo = await db_client.delete(
            "/duplicates/decisions", params={"a": "cropped", "b": "original"}
        )
        assert undo.status_code == 204
        back = {frozenset((p["a"], p["b"])): p["decision"] for p in await pairs(db_client)}
        assert back[frozenset(("original", "cropped"))] is None  # in the queue again
        again = await db_client.delete(
            "/duplicates/decisions", params={"a": "cropped", "b": "original"}
        )
        assert again.status_code == 404
        assert again.json()["error"]["code"] == "decision_not_found"
        left = (await db_client.get("/duplicates/decisions")).json()["decisions"]
        assert len(left) == 2

    async def test_decisions_stick_across_a_rescan(
        self, db_settings: Settings, tmp_path: Path
    ) -> None:
        async with app_client(db_settings) as client:
            await ingest(client, variants())
            ok = await client.post(
                "/duplicates/decisions",
                json={"a": "original", "b": "cropped", "decision": "different"},
            )
            assert ok.status_code == 200, ok.text
            await client.post(
                "/duplicates/decisions", json={"a": "resized", "b": "original", "decision": "same"}
            )
            found = await pairs(client)
            assert frozenset(("original", "cropped")) not in names(found)
            decided = {frozenset((p["a"], p["b"])): p["decision"] for p in found}
            assert decided[frozenset(("original", "resized"))] == "same"
            undecided = names(await pairs(client, undecided="true"))
            assert frozenset(("original", "resized")) not in undecided
            assert frozenset(("original", "reencoded")) in undecided

            duplicates = client.app.state.vs.services.duplicates  # type: ignore[attr-defined]
            report = duplicates.scan(state_path=tmp_path / "scan.json", resume=False)
            assert report["pairs"] >= 5
            # Re-ingesting the cropped copy searches it again: the decision still holds.
            recoded = encode(SOURCE.crop((6, 5, 194, 155)), "JPEG", quality=70)
            await ingest(client, {"cropped": recoded}, title="again")
            after = await pairs(client)
            assert frozenset(("original", "cropped")) not in names(after)
            decided = {frozenset((p["a"], p["b"])): p["decision"] for p in after}
            assert decided[frozenset(("original", "resized"))] == "same"

    async def test_decision_errors(self, client: httpx.AsyncClient) -> None:
        await ingest(client, {"a": encode(SOURCE, "PNG")})
        missing = await client.post(
            "/duplicates/decisions", json={"a": "a", "b": "zzz", "decision": "same"}
        )
        assert missing.status_code == 404
        same = await client.post(
            "/duplicates/decisions", json={"a": "a", "b": "a", "decision": "same"}
        )
        assert same.status_code == 422
        bad = await client.post(
            "/duplicates/decisions", json={"a": "a", "b": "b", "decision": "maybe"}
        )
        assert bad.status_code == 422

    async def test_decisions_need_a_write_key(self, settings: Settings) -> None:
        async with app_client(settings.model_copy(update={"api_keys": "secret"})) as client:
            response = await client.post(
                "/duplicates/decisions", json={"a": "a", "b": "b", "decision": "same"}
            )
            assert response.status_code == 401


class TestScan:
    async def test_scan_rebuilds_pairs_and_resumes(
        self, db_settings: Settings, tmp_path: Path
    ) -> None:
        async with app_client(db_settings) as client:
            await ingest(client, variants())
            duplicates = client.app.state.vs.services.duplicates  # type: ignore[attr-defined]
            before = names(await pairs(client))
            db = client.app.state.vs.services.db  # type: ignore[attr-defined]
            with db.write() as session:  # a stale pair no image supports any more
                products = {
                    p.external_id: p.pk
                    for p in repo.list_products(session, after_pk=None, limit=100)
                }
                repo.upsert_pairs(
                    session,
                    [
                        {
                            "a_pk": min(products["other-1"], products["other-2"]),
                            "b_pk": max(products["other-1"], products["other-2"]),
                            "score": 0.95,
                            "a_image_id": 1,
                            "b_image_id": 2,
                            "found_at": datetime(2000, 1, 1, tzinfo=UTC),
                        }
                    ],
                )
            state = tmp_path / "scan.json"
            interrupted: list[int] = []

            def stop_after_first_batch(done: int, total: int) -> None:
                interrupted.append(done)
                raise KeyboardInterrupt

            with pytest.raises(KeyboardInterrupt):
                duplicates.scan(state_path=state, batch=3, progress=stop_after_first_batch)
            assert state.exists()
            progress: list[int] = []
            report = duplicates.scan(
                state_path=state, batch=3, progress=lambda d, t: progress.append(d)
            )

            assert interrupted == [3]
            assert progress[0] == 6  # resumed after the first batch
            assert report["images"] == 7
            assert report["stale_pairs_removed"] == 1
            assert names(await pairs(client)) == before
            assert not state.exists()


class TestGroups:
    def _pair(self, a: str, b: str, score: float) -> repo.PairRow:
        return repo.PairRow(0, 0, a, b, score, 0, 0, datetime.now(UTC), None)

    def test_chains_do_not_merge_dissimilar_ends(self) -> None:
        groups = bounded_groups([self._pair("A", "B", 0.95), self._pair("B", "C", 0.93)])
        assert len(groups) == 1
        assert groups[0].centre == "B"
        assert groups[0].members in (["B", "A"],)  # C matches B but not A: left out

    def test_cliques_stay_together(self) -> None:
        pairs_ = [
            self._pair(a, b, 0.9) for a, b in [("A", "B"), ("A", "C"), ("B", "C"), ("D", "E")]
        ]
        groups = bounded_groups(pairs_)
        assert [sorted(g.members) for g in groups] == [["A", "B", "C"], ["D", "E"]]

    async def test_groups_page_by_key_and_skip_nothing_when_the_catalogue_changes(
        self, db_client: httpx.AsyncClient
    ) -> None:
        await ingest(db_client, variants())
        twin = pattern(200, 160, seed=7)
        await ingest(
            db_client, {"twin-a": encode(twin, "PNG"), "twin-b": encode(twin, "JPEG", quality=90)}
        )
        first = (
            await db_client.get("/duplicates/groups", params={"min_score": 0.8, "limit": 1})
        ).json()
        assert set(first["groups"][0]["members"]) == SAME  # the biggest group first
        assert first["next_cursor"]
        # A new pair appears between the pages; it sorts before the cursor's group and
        # must not push an unseen group out of the next page.
        await ingest(
            db_client,
            {
                "new-a": encode(SOURCE.rotate(180), "PNG"),
                "new-b": encode(SOURCE.rotate(180), "JPEG"),
            },
        )
        second = (
            await db_client.get(
                "/duplicates/groups",
                params={"min_score": 0.8, "limit": 1, "cursor": first["next_cursor"]},
            )
        ).json()
        assert set(second["groups"][0]["members"]) == {"twin-a", "twin-b"}

    async def test_groups_endpoint(self, db_client: httpx.AsyncClient) -> None:
        await ingest(db_client, variants())
        body = (await db_client.get("/duplicates/groups", params={"min_score": 0.8})).json()
        assert len(body["groups"]) == 1
        assert set(body["groups"][0]["members"]) == SAME
        assert body["groups"][0]["min_score"] >= 0.8
