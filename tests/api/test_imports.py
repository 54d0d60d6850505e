"""Bulk import over HTTP: a file of products becomes a background job that reports its
progress and failures, can be cancelled, and resumes after a restart; on both databases,
with real images fetched from a real HTTP server on loopback."""

from __future__ import annotations

import asyncio
import base64
import csv
import io
import json
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.api import examples
from app.core.config import ImportSettings, Settings
from tests.api.test_contract import _same_shape
from tests.conftest import REPO, app_client
from tests.httpserver import LocalServer, Route, body, serve
from tests.images import encode, pattern

GROCERY = REPO / "tests" / "fixtures" / "grocery"
OATLY = (GROCERY / "oatly-natural-oatghurt.jpg").read_bytes()
TROPICANA = (GROCERY / "tropicana-apple-juice.jpg").read_bytes()
TERMINAL = {"succeeded", "failed", "cancelled"}
COLUMNS = [
    "id",
    "image",
    "title",
    "category",
    "labels",
    "sets",
    "bbox_x",
    "bbox_y",
    "bbox_w",
    "bbox_h",
]


def slow(route: Route, seconds: float) -> Route:
    def delayed(h: BaseHTTPRequestHandler) -> None:
        time.sleep(seconds)
        route(h)

    return delayed


@pytest.fixture
def images() -> Iterator[LocalServer]:
    routes: dict[str, Route] = {
        "/oatly.jpg": body(OATLY),
        "/tropicana.jpg": body(TROPICANA),
        "/broken.jpg": body(b"these bytes are not an image"),
    }
    for i in range(12):
        routes[f"/p{i}.jpg"] = body(encode(pattern(seed=i)))
        routes[f"/slow{i}.jpg"] = slow(body(encode(pattern(seed=100 + i))), 0.4)
    with serve(routes) as server:
        yield server


def csv_file(rows: list[dict[str, Any]]) -> bytes:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=COLUMNS, restval="")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue().encode()


async def upload(
    client: httpx.AsyncClient, data: bytes, name: str = "products.csv", media: str = "text/csv"
) -> httpx.Response:
    return await client.post("/imports", files={"file": (name, data, media)})


async def wait_for(
    client: httpx.AsyncClient, job_id: str, done: Any = None, timeout: float = 90
) -> dict[str, Any]:
    """Poll the job until it has ended (or `done(job)` holds)."""
    deadline = time.monotonic() + timeout
    while True:
        job: dict[str, Any] = (await client.get(f"/imports/{job_id}")).json()
        if (done(job) if done is not None else job["status"] in TERMINAL) or (
            time.monotonic() > deadline
        ):
            return job
        await asyncio.sleep(0.05)


def with_imports(settings: Settings, **values: Any) -> Settings:
    return settings.model_copy(update={"imports": ImportSettings(**values)})


class TestImportJob:
    async def test_good_and_bad_rows_complete_with_counts_failures_and_search(
        self, db_client: httpx.AsyncClient, images: LocalServer
    ) -> None:
        rows = [
            {
                "id": "oatly",
                "image": images.url("/oatly.jpg"),
                "title": "Oatly oatghurt",
                "category": "dairy",
                "labels": "brand=Oatly,diet=vegan",
                "sets": "catalogue|summer",
            },
            {"id": "oatly", "image": images.url("/p0.jpg")},  # a second image of the same product
            {
                "id": "juice",
                "image": images.url("/tropicana.jpg"),
                "category": "drinks",
                "bbox_x": "0",
                "bbox_y": "0",
                "bbox_w": "60",
                "bbox_h": "60",
            },
            {"id": "missing", "image": images.url("/nowhere.jpg")},
            {"id": "broken", "image": images.url("/broken.jpg")},
            {"id": "server-path", "image": "/etc/passwd"},
            {
                "id": "bad-box",
                "image": images.url("/p1.jpg"),
                "bbox_x": "left",
                "bbox_y": "0",
                "bbox_w": "9",
                "bbox_h": "9",
            },
            {"id": "bad-labels", "image": images.url("/p2.jpg"), "labels": "no-equals-sign"},
            {"id": "plain", "image": images.url("/p3.jpg")},
        ]

        created = await upload(db_client, csv_file(rows))

        assert created.status_code == 202, created.text
        job = created.json()
        assert created.headers["Location"] == f"/imports/{job['id']}"
        assert job["status"] in ("queued", "running")
        assert job["total"] == 8  # the two oatly rows are one product
        assert job["links"]["failures"] == f"/imports/{job['id']}/failures"
        finished = await wait_for(db_client, job["id"])
        assert finished["status"] == "succeeded", finished
        assert (finished["done"], finished["succeeded"], finished["skipped"]) == (8, 3, 0)
        assert finished["failed"] == 5
        assert finished["progress"] == 1.0
        assert finished["started_at"]
        assert finished["finished_at"]

        lines = (await db_client.get(f"/imports/{job['id']}/failures")).text.splitlines()
        failures = {f["line"]: f for f in map(json.loads, lines)}
        # CSV lines: header 1, oatly 2-3, juice 4, missing 5, broken 6, path 7, box 8, labels 9
        assert {n: f["code"] for n, f in failures.items()} == {
            5: "image_fetch_failed",
            6: "image_undecodable",
            7: "url_not_allowed",
            8: "invalid_request",
            9: "invalid_request",
        }
        assert failures[5]["product_id"] == "missing"
        assert "no-equals-sign" in failures[9]["message"]
        as_csv = await db_client.get(f"/imports/{job['id']}/failures", params={"format": "csv"})
        assert as_csv.headers["content-type"].startswith("text/csv")
        table = list(csv.DictReader(io.StringIO(as_csv.text)))
        assert [int(r["line"]) for r in table] == [5, 6, 7, 8, 9]
        assert table[1]["code"] == "image_undecodable"

        oatly = (await db_client.get("/products/oatly")).json()
        assert oatly["labels"] == {"brand": ["Oatly"], "diet": ["vegan"]}
        assert sorted(oatly["sets"]) == ["catalogue", "summer"]
        assert len(oatly["images"]) == 2
        juice = (await db_client.get("/products/juice")).json()
        assert juice["images"][0]["box"] == [0.0, 0.0, 60.0, 60.0]
        assert (await db_client.get("/products/missing")).status_code == 404
        search = await db_client.post(
            "/search", json={"image": base64.b64encode(OATLY).decode(), "k": 3}
        )
        assert search.json()["results"][0]["id"] == "oatly"

        # The same file again changes nothing and embeds nothing twice.
        again = await wait_for(db_client, (await upload(db_client, csv_file(rows))).json()["id"])
        assert (again["succeeded"], again["skipped"], again["failed"]) == (0, 3, 5)
        listed = (await db_client.get("/imports")).json()["imports"]
        assert [j["id"] for j in listed] == [again["id"], job["id"]]  # newest first
        assert _same_shape(examples.IMPORT_JOB_READ, finished)

    async def test_jsonl_with_inline_images_labels_sets_and_boxes(
        self, db_client: httpx.AsyncClient, images: LocalServer
    ) -> None:
        records = [
            {
                "id": "inline",
                "title": "Inline photo",
                "labels": {"colour": ["green"]},
                "sets": ["feed"],
                "images": [{"data": base64.b64encode(TROPICANA).decode()}],
            },
            {
                "id": "boxed",
                "images": [
                    {"url": images.url("/oatly.jpg"), "box": {"x": 5, "y": 5, "w": 50, "h": 50}}
                ],
            },
            {"id": "by-path", "images": [{"path": "imgs/0.jpg"}]},
        ]
        data = "\n".join(json.dumps(r) for r in records).encode() + b"\nnot json\n"

        job = (await upload(db_client, data, "feed.jsonl", "application/x-ndjson")).json()
        finished = await wait_for(db_client, job["id"])

        assert finished["format"] == "jsonl"
        assert (finished["total"], finished["succeeded"], finished["failed"]) == (4, 2, 2)
        failures = [
            json.loads(line)
            for line in (await db_client.get(f"/imports/{job['id']}/failures")).text.splitlines()
        ]
        assert [(f["line"], f["code"]) for f in failures] == [
            (3, "url_not_allowed"),
            (4, "invalid_request"),
        ]
        inline = (await db_client.get("/products/inline")).json()
        assert inline["labels"] == {"colour": ["green"]}
        assert inline["sets"] == ["feed"]
        boxed = (await db_client.get("/products/boxed")).json()
        assert boxed["images"][0]["box"] == [5.0, 5.0, 50.0, 50.0]


class TestUploadErrors:
    async def test_files_that_cannot_be_read_are_refused_at_upload(
        self, db_client: httpx.AsyncClient
    ) -> None:
        cases = [
            (b"id,image\na,http://x/a.jpg\n", "products.txt", "text/plain", "csv or .jsonl"),
            (b"id,title\na,A\n", "products.csv", "text/csv", "'image'"),
            (b"sku,image\na,http://x/a.jpg\n", "products.csv", "text/csv", "'id'"),
            (b"id,image\n\xff\xfe,bad\n", "products.csv", "text/csv", "UTF-8"),
            (b"id,image\n", "products.csv", "text/csv", "no records"),
        ]
        for data, name, media, reason in cases:
            response = await upload(db_client, data, name, media)
            assert response.status_code == 422, (name, response.text)
            error = response.json()["error"]
            assert error["code"] == "import_file_invalid"
            assert reason in error["message"], error
        assert (await db_client.get("/imports")).json()["imports"] == []

    async def test_not_multipart_unknown_job_and_size_limit(self, db_settings: Settings) -> None:
        async with app_client(with_imports(db_settings, max_bytes=64)) as client:
            as_json = await client.post("/imports", json={"file": "id,image"})
            assert as_json.status_code == 415
            unknown = await client.get("/imports/nope")
            assert (unknown.status_code, unknown.json()["error"]["code"]) == (
                404,
                "import_not_found",
            )
            assert (await client.post("/imports/nope/cancel")).status_code == 404
            assert (await client.get("/imports/nope/failures")).status_code == 404
            big = b"id,image\n" + b"a,http://example.com/a.jpg\n" * 10
            too_large = await upload(client, big)
            assert too_large.status_code == 413
            assert too_large.json()["error"]["code"] == "request_too_large"

    async def test_writes_need_the_write_key(self, db_settings: Settings) -> None:
        async with app_client(db_settings.model_copy(update={"api_keys": "w"})) as client:
            refused = await upload(client, b"id,image\na,http://example.com/a.jpg\n")
            assert refused.status_code == 401
            accepted = await client.post(
                "/imports",
                files={"file": ("p.csv", b"id,image\na,http://example.com/a.jpg\n", "text/csv")},
                headers={"X-API-Key": "w"},
            )
            assert accepted.status_code == 202


def slow_rows(images: LocalServer, count: int) -> bytes:
    return csv_file(
        [{"id": f"slow-{i}", "image": images.url(f"/slow{i}.jpg")} for i in range(count)]
    )


class TestCancel:
    async def test_cancel_stops_a_running_job_and_a_finished_one_is_a_conflict(
        self, db_settings: Settings, images: LocalServer
    ) -> None:
        async with app_client(with_imports(db_settings, batch_size=2, concurrency=1)) as client:
            job = (await upload(client, slow_rows(images, 12))).json()
            await wait_for(client, job["id"], lambda j: j["done"] >= 2)

            cancelled = await client.post(f"/imports/{job['id']}/cancel")

            assert cancelled.status_code == 200
            assert cancelled.json()["status"] == "cancelled"
            assert cancelled.json()["finished_at"] is not None
            await asyncio.sleep(1.5)  # longer than the product in flight takes
            after = (await client.get(f"/imports/{job['id']}")).json()
            assert after["status"] == "cancelled"
            assert 2 <= after["done"] < 12
            stored = (await client.get("/products")).json()["total"]
            assert stored <= after["done"] + 1  # at most the product in flight when cancelled
            assert stored < 12
            again = await client.post(f"/imports/{job['id']}/cancel")
            assert (again.status_code, again.json()["error"]["code"]) == (409, "import_finished")


class TestResume:
    async def test_a_job_interrupted_by_a_restart_resumes_without_duplicates(
        self, db_settings: Settings, images: LocalServer
    ) -> None:
        settings = with_imports(db_settings, batch_size=2, concurrency=1)
        async with app_client(settings) as client:
            job = (await upload(client, slow_rows(images, 8))).json()
            interrupted = await wait_for(client, job["id"], lambda j: j["done"] >= 2)
        # The server stopped mid-job: it stays `running` at its last committed batch.
        assert interrupted["status"] == "running"
        assert 2 <= interrupted["done"] < 8

        async with app_client(settings) as client:
            finished = await wait_for(client, job["id"])
            products = (await client.get("/products")).json()

        assert finished["status"] == "succeeded", finished
        assert finished["done"] == 8
        assert finished["failed"] == 0
        assert finished["succeeded"] + finished["skipped"] == 8
        assert finished["skipped"] <= 2  # at most the one batch that was cut short
        assert products["total"] == 8
        assert sorted(p["id"] for p in products["products"]) == sorted(
            f"slow-{i}" for i in range(8)
        )
        assert all(len(p["images"]) == 1 for p in products["products"])
        files = list((Path(settings.data_dir) / "imports").iterdir())
        assert files == []  # a finished job's file is removed


class TestQueue:
    async def test_jobs_run_one_at_a_time_and_a_queued_one_can_be_cancelled(
        self, db_settings: Settings, images: LocalServer
    ) -> None:
        async with app_client(with_imports(db_settings, batch_size=2, concurrency=1)) as client:
            first = (await upload(client, slow_rows(images, 4))).json()
            second = (await upload(client, slow_rows(images, 2))).json()
            third = await upload(client, csv_file([{"id": "p", "image": images.url("/p5.jpg")}]))
            third_id = third.json()["id"]
            await wait_for(client, first["id"], lambda j: j["status"] == "running")
            waiting = (await client.get(f"/imports/{second['id']}")).json()
            assert (waiting["status"], waiting["done"], waiting["started_at"]) == (
                "queued",
                0,
                None,
            )

            cancelled = (await client.post(f"/imports/{second['id']}/cancel")).json()

            assert cancelled["status"] == "cancelled"
            assert (await wait_for(client, first["id"]))["status"] == "succeeded"
            assert (await wait_for(client, third_id))["status"] == "succeeded"
            second_after = (await client.get(f"/imports/{second['id']}")).json()
            assert (second_after["status"], second_after["done"]) == ("cancelled", 0)
            assert second_after["started_at"] is None
            ids = {p["id"] for p in (await client.get("/products")).json()["products"]}
            assert ids == {"slow-0", "slow-1", "slow-2", "slow-3", "p"}
            page = (await client.get("/imports", params={"limit": 2})).json()
            assert [j["id"] for j in page["imports"]] == [third_id, second["id"]]
            rest = (await client.get("/imports", params={"cursor": page["next_cursor"]})).json()
            assert [j["id"] for j in rest["imports"]] == [first["id"]]
