"""Calibrated probabilities over HTTP: `calibrated: false` and a 409 before enough
decisions, then probabilities and tiers fitted on the decisions, `min_probability`, the
calibration summary the review page reads, and the audit sample."""

from __future__ import annotations

import base64
from typing import Any

import httpx
import pytest

from app.core.config import Settings
from app.imaging.decode import decode_image
from tests.conftest import app_client
from tests.images import encode, pattern

SOURCES = (11, 12, 13)


def catalogue() -> dict[str, bytes]:
    """Three products, each listed three times (re-encoded, resized), plus one listing
    that repeats another's bytes exactly."""
    items: dict[str, bytes] = {}
    for seed in SOURCES:
        image = pattern(200, 160, seed=seed)
        items[f"p{seed}-png"] = encode(image, "PNG")
        items[f"p{seed}-jpeg"] = encode(
            decode_image(encode(image, "JPEG", quality=60), max_pixels=10**8), "JPEG"
        )
        items[f"p{seed}-small"] = encode(image.resize((150, 120)), "WEBP", quality=90)
    items["p11-copy"] = items["p11-png"]
    return items


def product_of(name: str) -> str:
    return name.split("-")[0]


@pytest.fixture
def calibrating(settings: Settings) -> Settings:
    return settings.model_copy(
        update={
            "duplicates": settings.duplicates.model_copy(
                update={
                    "floor": -1.0,  # every neighbour is a pair: labels on both sides
                    "calibration_min_labels": 10,
                    "calibration_refit_every": 1,
                }
            )
        }
    )


async def ingest(client: httpx.AsyncClient) -> None:
    products = [
        {"id": name, "category": "dairy", "images": [{"data": base64.b64encode(d).decode()}]}
        for name, d in catalogue().items()
    ]
    response = await client.post("/products", json={"products": products})
    assert all(r["status"] == "created" for r in response.json()["results"])


async def all_pairs(client: httpx.AsyncClient, **params: Any) -> dict[str, Any]:
    response = await client.get("/duplicates", params={"min_score": -1, "limit": 1000, **params})
    assert response.status_code == 200, response.text
    return response.json()  # type: ignore[no-any-return]


async def test_probabilities_follow_the_reviewers_decisions(calibrating: Settings) -> None:
    async with app_client(calibrating) as client:
        await ingest(client)
        before = await all_pairs(client)
        assert before["calibrated"] is False
        assert all(p["probability"] is None for p in before["pairs"])
        # byte-identical listings are `exact` even before any calibration
        copy = next(p for p in before["pairs"] if {p["a"], p["b"]} == {"p11-png", "p11-copy"})
        assert copy["tier"] == "exact"
        refused = await client.get("/duplicates", params={"min_probability": 0.5})
        assert refused.status_code == 409
        assert refused.json()["error"]["code"] == "not_calibrated"

        # the reviewer decides every pair but those of product 13, from the ground truth
        held_out = []
        for pair in before["pairs"]:
            if "p13" in pair["a"] or "p13" in pair["b"]:
                held_out.append(pair)
                continue
            same = product_of(pair["a"]) == product_of(pair["b"])
            body = {"a": pair["a"], "b": pair["b"], "decision": "same" if same else "different"}
            assert (await client.post("/duplicates/decisions", json=body)).status_code == 200

        summary = (await client.get("/duplicates/calibration")).json()
        assert summary["calibrated"] is True
        assert summary["method"] == "platt"
        assert summary["labels"] == len(before["pairs"]) - len(held_out)
        assert [f["category"] for f in summary["fits"]] == [None, "dairy"]
        curve = [point["probability"] for point in summary["curve"]]
        assert curve == sorted(curve)
        assert sum(b["pairs"] for b in summary["histogram"]) == len(held_out)

        after = await all_pairs(client, undecided="true")
        assert after["calibrated"] is True
        assert {frozenset((p["a"], p["b"])) for p in after["pairs"]} == {
            frozenset((p["a"], p["b"])) for p in held_out
        }
        same = [p for p in after["pairs"] if product_of(p["a"]) == product_of(p["b"])]
        different = [p for p in after["pairs"] if product_of(p["a"]) != product_of(p["b"])]
        assert same
        assert different
        assert min(p["probability"] for p in same) > max(p["probability"] for p in different)
        assert all(p["tier"] in {"same", "exact"} for p in same)
        assert all(p["tier"] == "similar" for p in different)

        strict = await all_pairs(client, undecided="true", min_probability=0.9)
        assert strict["pairs"]
        assert all(p["probability"] >= 0.9 for p in strict["pairs"])
        assert {frozenset((p["a"], p["b"])) for p in strict["pairs"]} <= {
            frozenset((p["a"], p["b"])) for p in same
        }

        groups = (await client.get("/duplicates/groups", params={"min_score": -1})).json()
        assert groups["calibrated"] is True
        assert all(g["probability"] is not None for g in groups["groups"])


async def test_decisions_keep_their_score_after_the_pair_is_gone(
    calibrating: Settings,
) -> None:
    """A pair marked `different` leaves the pairs table, but its label still counts."""
    async with app_client(calibrating) as client:
        await ingest(client)
        pairs = (await all_pairs(client))["pairs"]
        for pair in pairs:
            same = product_of(pair["a"]) == product_of(pair["b"])
            body = {"a": pair["a"], "b": pair["b"], "decision": "same" if same else "different"}
            await client.post("/duplicates/decisions", json=body)
        fitted = (await client.post("/duplicates/calibration")).json()
        assert fitted["labels"] == len(pairs)
        assert fitted["fits"][0]["labels"] == len(pairs)
        assert fitted["fits"][0]["positives"] == sum(
            product_of(p["a"]) == product_of(p["b"]) for p in pairs
        )


async def test_audit_sample_spans_the_score_range(calibrating: Settings) -> None:
    async with app_client(calibrating) as client:
        await ingest(client)
        pairs = (await all_pairs(client))["pairs"]
        sample = (await client.get("/duplicates/audit", params={"size": 40})).json()["pairs"]
        scores = [p["score"] for p in sample]
        assert len(sample) <= 40
        # pairs below a 0.9 review threshold are in it, not only the queue's top
        assert min(scores) < 0.9 <= max(scores)
        assert {frozenset((p["a"], p["b"])) for p in sample} <= {
            frozenset((p["a"], p["b"])) for p in pairs
        }


async def test_new_routes_are_documented(client: httpx.AsyncClient) -> None:
    spec = (await client.get("/openapi.json")).json()
    ids = {
        op["operationId"]
        for path in spec["paths"].values()
        for op in path.values()
        if isinstance(op, dict) and "operationId" in op
    }
    assert {
        "get_duplicates_calibration",
        "fit_duplicates_calibration",
        "sample_duplicates_for_audit",
    } <= ids
    assert not any(p.startswith("/ui") for p in spec["paths"])
    params = spec["paths"]["/duplicates"]["get"]["parameters"]
    assert "min_probability" in {p["name"] for p in params}
