"""Screenshots of the workbench pages on the grocery-store photos (for docs/images).

Starts `vsearch serve` on 127.0.0.1 with the given model on a throwaway data directory,
indexes a few shelf photos per product (each photo one listing, as if several sellers
listed one product), lets a reviewer simulated from the product labels decide an audit
sample so the probabilities are calibrated, then drives Debian's chromium through the
review page (pairs, groups, audit) and the search page and saves a PNG of each.

    python scripts/workbench_screenshots.py /path/to/grocery-store --model DIR --out docs/images
"""

from __future__ import annotations

import argparse
import base64
import csv
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
KEY = "screenshot-key"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def listings(
    dataset: Path, per_class: int, classes: int
) -> tuple[list[dict[str, object]], dict[str, str]]:
    """The listings to index, and each listing's product (what the reviewer knows)."""
    names = {}
    with (dataset / "dataset" / "classes.csv").open(newline="") as fh:
        for row in csv.reader(fh):
            if row and row[1].strip().isdigit():
                names[row[1].strip()] = (row[0].replace("-", " "), row[2].replace("-", " "))
    products: list[dict[str, object]] = []
    label_of: dict[str, str] = {}
    taken: dict[str, int] = {}
    with (dataset / "protocols" / "photos" / "gallery.csv").open(newline="") as fh:
        for row in csv.DictReader(fh):
            label = row["product_id"]
            wanted = int(label) % max(1, 81 // classes) == 0 or "Oatghurt" in row["img_path"]
            if not wanted or taken.get(label, 0) >= per_class:
                continue
            taken[label] = taken.get(label, 0) + 1
            path = dataset / "dataset" / row["img_path"]
            name, coarse = names[label]
            products.append(
                {
                    "id": f"listing-{row['seller_img_id']}",
                    "title": name,
                    "category": row["group"],
                    "attributes": {"kind": coarse, "photo": path.name},
                    "images": [{"data": base64.b64encode(path.read_bytes()).decode()}],
                }
            )
            label_of[f"listing-{row['seller_img_id']}"] = label
    return products, label_of


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dataset", type=Path)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "images")
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory(prefix="vs-shots-") as tmp:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        env = {
            **os.environ,
            "VS_MODEL": str(args.model),
            "VS_DATA_DIR": tmp,
            "VS_DEVICE": "cpu",
            "VS_API_KEYS": KEY,
            "VS_DUPLICATES__FLOOR": "0.6",
            "VS_DUPLICATES__CALIBRATION_MIN_LABELS": "30",
        }
        log = open(Path(tmp) / "server.log", "wb")  # noqa: SIM115 - closed below
        server = subprocess.Popen(
            [sys.executable, "-m", "app.cli", "serve", "--port", str(port)],
            cwd=REPO,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            for _ in range(300):
                try:
                    if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                time.sleep(0.3)
            client = httpx.Client(base_url=url, headers={"X-API-Key": KEY}, timeout=300)
            products, label = listings(args.dataset, per_class=5, classes=27)
            for start in range(0, len(products), 32):
                client.post("/products", json={"products": products[start : start + 32]})
            # a reviewer decides an audit sample (all score strata) from the labels
            audit = client.get("/duplicates/audit", params={"size": 120}).json()["pairs"]
            for pair in audit[:100]:
                same = label[pair["a"]] == label[pair["b"]]
                client.post(
                    "/duplicates/decisions",
                    json={
                        "a": pair["a"],
                        "b": pair["b"],
                        "decision": "same" if same else "different",
                    },
                )
            client.post("/duplicates/calibration")

            with sync_playwright() as playwright:
                browser = playwright.chromium.launch(
                    executable_path=args.chromium, args=CHROMIUM_ARGS, headless=True
                )
                page = browser.new_page(viewport={"width": 1366, "height": 900})
                page.goto(f"{url}/ui/review?min_score=0.75")
                page.fill("#api-key", KEY)
                page.press("#api-key", "Enter")
                page.wait_for_function("() => document.querySelector('#pair').dataset.pair")
                page.wait_for_selector("#pair table.diff tr")
                for _ in range(3):  # decide a few with the keyboard, so history shows
                    pair = page.locator("#pair").get_attribute("data-pair") or ""
                    a, b = pair.split("|")
                    page.keyboard.press("s" if label[a] == label[b] else "d")
                    page.wait_for_function(
                        "(p) => document.querySelector('#pair').dataset.pair !== p", arg=pair
                    )
                page.wait_for_selector("#pair table.diff tr")
                page.wait_for_timeout(800)
                page.screenshot(path=str(args.out / "review-pairs.png"))
                page.keyboard.press("g")
                page.wait_for_selector("#groups .group")
                page.locator("#groups .group .same").first.click()
                page.wait_for_timeout(1200)
                page.screenshot(path=str(args.out / "review-groups.png"))
                page.keyboard.press("a")
                page.wait_for_function("() => document.querySelector('#audit-pair').dataset.pair")
                page.wait_for_timeout(1000)
                page.screenshot(path=str(args.out / "review-audit.png"))

                query = sorted(
                    (args.dataset / "dataset" / "test" / "Packages" / "Oatghurt").rglob("*.jpg")
                )[0]
                page.goto(f"{url}/ui/search")
                page.set_input_files("#file", str(query))
                page.wait_for_selector("#results .result")
                box = page.locator("#canvas").bounding_box()
                assert box is not None
                with page.expect_response(lambda r: r.url.endswith("/search")):
                    page.mouse.move(box["x"] + box["width"] * 0.15, box["y"] + box["height"] * 0.1)
                    page.mouse.down()
                    page.mouse.move(box["x"] + box["width"] * 0.85, box["y"] + box["height"] * 0.9)
                    page.mouse.up()
                page.wait_for_timeout(1500)
                page.screenshot(path=str(args.out / "search.png"), full_page=True)
                browser.close()
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(60)
            log.close()
    print(f"screenshots in {args.out}")  # noqa: T201


if __name__ == "__main__":
    main()
