"""The duplicates review page in a real browser: keyboard decisions land in the
database, undo removes them, and the page loads nothing from another host."""

from __future__ import annotations

import base64
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select
from sqlalchemy.orm import aliased

from app.catalogue.models import DuplicateDecision, Product
from app.core.database import Database
from tests.api.test_duplicates import variants
from tests.server import Server, start_server

WRITE_KEY = "workbench-write-key"
SCREENSHOTS = os.environ.get("VS_TEST_SCREENSHOTS")


@pytest.fixture
def catalogue(tmp_path: Path, tiny_model_dir: Path) -> Iterator[tuple[Server, str]]:
    """A served catalogue of one photo as several sellers upload it, plus others."""
    db_url = f"sqlite:///{tmp_path / 'catalogue.db'}"
    env = {
        "VS_MODEL": str(tiny_model_dir),
        "VS_DATA_DIR": str(tmp_path / "data"),
        "VS_DATABASE_URL": db_url,
        "VS_DEVICE": "cpu",
        "VS_PRECISION": "fp32",
        "VS_API_KEYS": WRITE_KEY,
    }
    server = start_server(env, tmp_path / "server.log")
    try:
        products = [
            {
                "id": name,
                "title": f"Oat yoghurt ({name})",
                "category": "dairy",
                "attributes": {"brand": "Oatly", "size": "1 l" if i % 2 else "500 ml"},
                "images": [{"data": base64.b64encode(data).decode()}],
            }
            for i, (name, data) in enumerate(variants().items())
        ]
        response = httpx.post(
            f"{server.url}/products",
            json={"products": products},
            headers={"X-API-Key": WRITE_KEY},
            timeout=60,
        )
        assert all(r["status"] == "created" for r in response.json()["results"])
        yield server, db_url
    finally:
        server.stop(signal.SIGTERM)


def decisions(db_url: str) -> dict[frozenset[str], str]:
    db = Database(db_url)
    try:
        pa, pb = aliased(Product), aliased(Product)
        stmt = (
            select(pa.external_id, pb.external_id, DuplicateDecision.decision)
            .join(pa, pa.pk == DuplicateDecision.a_pk)
            .join(pb, pb.pk == DuplicateDecision.b_pk)
        )
        with db.read() as session:
            return {frozenset((a, b)): d for a, b, d in session.execute(stmt)}
    finally:
        db.dispose()


def shown_pair(page: Any) -> frozenset[str]:
    value = page.locator("#pair").get_attribute("data-pair")
    return frozenset(value.split("|"))


def wait_for_new_pair(page: Any, before: frozenset[str]) -> frozenset[str]:
    joined = "|".join(sorted(before))
    page.wait_for_function(
        """(before) => {
            const v = document.querySelector('#pair').dataset.pair;
            return v && v.split('|').sort().join('|') !== before;
        }""",
        arg=joined,
    )
    return shown_pair(page)


def test_keyboard_review_with_undo(browser: Any, catalogue: tuple[Server, str]) -> None:
    server, db_url = catalogue
    page = browser.new_page(viewport={"width": 1280, "height": 860})
    requested: list[str] = []
    page.on("request", lambda request: requested.append(request.url))
    page.goto(f"{server.url}/ui/review")
    page.fill("#api-key", WRITE_KEY)
    page.press("#api-key", "Enter")
    page.wait_for_function("() => document.querySelector('#pair').dataset.pair")
    page.wait_for_function(
        "() => [...document.querySelectorAll('#pair img.thumb')]"
        ".every(i => i.complete && i.naturalWidth > 0)"
    )
    page.wait_for_selector("#pair table.diff tr.differs")

    first = shown_pair(page)
    # the attribute that differs between the two listings is marked
    assert "size" in page.locator("#pair table.diff tr.differs").first.inner_text()
    if SCREENSHOTS:
        page.screenshot(path=str(Path(SCREENSHOTS) / "review-pairs.png"), full_page=True)

    page.keyboard.press("s")
    second = wait_for_new_pair(page, first)
    assert decisions(db_url) == {first: "same"}

    page.keyboard.press("d")
    third = wait_for_new_pair(page, second)
    assert decisions(db_url) == {first: "same", second: "different"}

    page.keyboard.press("k")  # skip: nothing recorded, the pair is not shown again
    fourth = wait_for_new_pair(page, third)
    assert third not in decisions(db_url)

    page.keyboard.press("u")  # undo the last decision: `different` on the second pair
    back = wait_for_new_pair(page, fourth)
    assert back == second
    assert decisions(db_url) == {first: "same"}
    history = page.locator("#history li")
    assert history.count() == 1
    assert "same" in history.first.inner_text()

    # decided pairs never come back, also after a reload
    page.reload()
    page.wait_for_function("() => document.querySelector('#pair').dataset.pair")
    assert shown_pair(page) != first

    # every request went to the service itself
    assert requested
    outside = [u for u in requested if not u.startswith((server.url, "blob:", "data:"))]
    assert outside == []
    page.close()


def test_writes_need_the_write_key(browser: Any, catalogue: tuple[Server, str]) -> None:
    server, db_url = catalogue
    page = browser.new_page()
    page.goto(f"{server.url}/ui/review")
    page.wait_for_function("() => document.querySelector('#pair').dataset.pair")
    page.keyboard.press("s")  # no key entered: the service refuses, the page asks for one
    page.wait_for_function(
        "() => document.querySelector('#key-state').textContent.includes('X-API-Key')"
    )
    assert "X-API-Key" in page.locator("#key-state").inner_text()
    assert decisions(db_url) == {}
    page.close()
