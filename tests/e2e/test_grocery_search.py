"""End to end through HTTP on the real grocery-store dataset: the iconic gallery indexed
with POST /products, every query searched with POST /search (with its box), and the
metrics compared with the offline evaluation of the same model."""

from __future__ import annotations

import asyncio
import base64
from pathlib import Path

import numpy as np
import pytest

from app.core.config import Settings
from app.evaluation.metrics import evaluate_rankings
from app.evaluation.protocols import load_protocol
from app.evaluation.run import run_evaluation
from tests.conftest import app_client

pytestmark = pytest.mark.slow


async def test_http_search_matches_offline_evaluation(
    settings: Settings, tiny_model_dir: Path, dataset: Path
) -> None:
    protocol_dir = dataset / "protocols" / "iconic"
    root = dataset / "dataset"
    protocol = load_protocol(protocol_dir / "gallery.csv", protocol_dir / "queries.csv", root)
    offline = run_evaluation(
        tiny_model_dir,
        protocol_dir / "gallery.csv",
        protocol_dir / "queries.csv",
        root,
        device="cpu",
        precision="fp32",
    )

    # Best image per product, as the offline evaluation ranks (product-level scoring
    # re-scores from the float16 re-ranking store, which can swap near-ties).
    plain = settings.model_copy(
        update={"search": settings.search.model_copy(update={"product_images": 1})}
    )
    async with app_client(plain) as client:
        products = [
            {
                "id": item.id,
                "title": item.label,
                "category": item.group,
                "images": [{"data": base64.b64encode(item.path.read_bytes()).decode()}],
            }
            for item in protocol.gallery
        ]
        for start in range(0, len(products), 64):  # the default batch limit
            chunk = products[start : start + 64]
            response = await client.post("/products", json={"products": chunk})
            assert [r["status"] for r in response.json()["results"]] == ["created"] * len(chunk)
        label_of = {item.id: item.label for item in protocol.gallery}
        k = len(protocol.gallery)
        limit = asyncio.Semaphore(16)

        async def search(path: Path, box: tuple[float, float, float, float]) -> list[str]:
            async with limit:
                files = {"image": (path.name, path.read_bytes(), "image/jpeg")}
                data = {"bbox": ",".join(f"{v:g}" for v in box), "k": str(k)}
                got = await client.post("/search", files=files, data=data)
            assert got.status_code == 200, got.text
            return [label_of[r["id"]] for r in got.json()["results"]]

        ranked = await asyncio.gather(
            *(search(q.path, q.box) for q in protocol.queries)  # type: ignore[arg-type]
        )

    labels = sorted({i.label for i in protocol.gallery + protocol.queries})
    code = {label: n for n, label in enumerate(labels)}
    ranked_codes = np.asarray([[code[x] for x in row] for row in ranked])
    online = evaluate_rankings(
        ranked_codes,
        np.asarray([code[q.label] for q in protocol.queries]),
        np.asarray([code[g.label] for g in protocol.gallery]),
    ).as_dict()

    assert online["queries"] == offline["queries"] == 2485
    assert ranked_codes.shape == (2485, 81)
    for key in ("map_at_1000", "top1", "top3", "top5"):
        assert online[key] == pytest.approx(offline[key], abs=1e-6), key
