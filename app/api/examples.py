"""Request and response examples for the OpenAPI document, built around one small real
product photo (`sample.jpg`, "Oatly natural oatghurt" from the Grocery Store Dataset by
Marcus Klasson et al., MIT licence: `sample.LICENSE`).

Run in order against a fresh service, the request examples succeed: index two listings
of the same product, search with the photo, find the duplicate pair they form, decide on
it, undo the decision, delete. `tests/api/test_examples.py` runs them so, and checks each
response example against the real answer's shape.
"""

from __future__ import annotations

import base64
from importlib.resources import files
from typing import Any

SAMPLE_JPEG = files("app.api").joinpath("sample.jpg").read_bytes()
SAMPLE_B64 = base64.b64encode(SAMPLE_JPEG).decode()

PRODUCT_ID = "sample-oatly"
OTHER_ID = "sample-oatly-reseller"
_TIME = "2026-11-23T10:00:00Z"

PRODUCTS_CREATE: dict[str, Any] = {
    "products": [
        {
            "id": PRODUCT_ID,
            "title": "Oatly natural oatghurt 1 kg",
            "category": "dairy",
            "attributes": {"brand": "Oatly", "size": "1 kg"},
            "labels": {"brand": ["Oatly"], "diet": ["vegan", "lactose-free"]},
            "sets": ["catalogue"],
            "images": [{"data": SAMPLE_B64}],
        },
        {
            "id": OTHER_ID,
            "title": "OATLY Oatgurt natural, 1000 g",
            "category": "dairy",
            "attributes": {"brand": "Oatly"},
            "labels": {"brand": ["Oatly"]},
            "sets": ["feed"],
            "images": [{"data": SAMPLE_B64, "box": {"x": 0, "y": 0, "w": 160, "h": 160}}],
        },
    ]
}

PRODUCTS_CREATE_READ: dict[str, Any] = {
    "results": [
        {"id": PRODUCT_ID, "status": "created", "images": 1, "error": None},
        {"id": OTHER_ID, "status": "created", "images": 1, "error": None},
    ]
}

_IMAGE: dict[str, Any] = {
    "image_id": 1,
    "position": 0,
    "url": None,
    "sha256": "9f2c4e1b7a0d5c3e8f6a1b2c3d4e5f60718293a4b5c6d7e8f9a0b1c2d3e4f5a6",
    "box": [0.0, 0.0, 160.0, 160.0],
    "width": 160,
    "height": 160,
    "model_id": "convnext-arcface-5f0e1c2d",
    "embedding": None,
}

PRODUCT_READ: dict[str, Any] = {
    "id": PRODUCT_ID,
    "title": "Oatly natural oatghurt 1 kg",
    "category": "dairy",
    "attributes": {"brand": "Oatly", "size": "1 kg"},
    "labels": {"brand": ["Oatly"], "diet": ["lactose-free", "vegan"]},
    "sets": ["catalogue"],
    "images": [_IMAGE],
    "created_at": _TIME,
    "updated_at": _TIME,
}

PRODUCTS_READ: dict[str, Any] = {"products": [PRODUCT_READ], "next_cursor": None, "total": 2}

SEARCH_REQUEST: dict[str, Any] = {
    "image": SAMPLE_B64,
    "bbox": {"x": 10, "y": 10, "w": 140, "h": 140},
    "k": 5,
    "filters": {"must": {"category": ["dairy"], "diet": ["vegan"]}},
}

SEARCH_READ: dict[str, Any] = {
    "results": [
        {
            "id": PRODUCT_ID,
            "score": 0.97,
            "title": "Oatly natural oatghurt 1 kg",
            "category": "dairy",
            "image_id": 1,
            "image_url": None,
            "labels": {"brand": ["Oatly"], "diet": ["lactose-free", "vegan"]},
            "sets": ["catalogue"],
            "images": [{"image_id": 1, "score": 0.97, "image_url": None}],
        }
    ],
    "model_id": "convnext-arcface-5f0e1c2d",
    "took_ms": 41.7,
}

DUPLICATE_PAIRS_READ: dict[str, Any] = {
    "pairs": [
        {
            "a": PRODUCT_ID,
            "b": OTHER_ID,
            "score": 1.0,
            "a_image_id": 1,
            "b_image_id": 2,
            "found_at": _TIME,
            "decision": None,
            "probability": None,
            "tier": "exact",
        }
    ],
    "next_cursor": None,
    "calibrated": False,
    "total": 1,
}

DUPLICATE_GROUPS_READ: dict[str, Any] = {
    "groups": [
        {
            "centre": PRODUCT_ID,
            "members": [PRODUCT_ID, OTHER_ID],
            "min_score": 1.0,
            "probability": None,
            "tier": "exact",
        }
    ],
    "next_cursor": None,
    "calibrated": False,
}

DECISION_CREATE: dict[str, Any] = {"a": PRODUCT_ID, "b": OTHER_ID, "decision": "same"}

DECISION_READ: dict[str, Any] = dict(DECISION_CREATE)

DECISIONS_READ: dict[str, Any] = {
    "decisions": [
        {
            **DECISION_CREATE,
            "decided_at": _TIME,
            "decided_by": "key:3b4c5d6e9f01",
        }
    ],
    "next_cursor": None,
}

IMPORT_ID = "3f9a1c7e5b2d4f6081a9c3e5d7f90b12"
_IMPORT_LINKS = {
    "self": f"/imports/{IMPORT_ID}",
    "failures": f"/imports/{IMPORT_ID}/failures",
    "cancel": f"/imports/{IMPORT_ID}/cancel",
}

IMPORT_JOB_READ: dict[str, Any] = {
    "id": IMPORT_ID,
    "status": "running",
    "filename": "catalogue.csv",
    "format": "csv",
    "total": 1200,
    "done": 480,
    "succeeded": 470,
    "skipped": 4,
    "failed": 6,
    "progress": 0.4,
    "error": None,
    "created_at": _TIME,
    "started_at": _TIME,
    "finished_at": None,
    "links": _IMPORT_LINKS,
}

IMPORT_JOB_CANCELLED: dict[str, Any] = {
    **IMPORT_JOB_READ,
    "status": "cancelled",
    "finished_at": _TIME,
}

IMPORT_JOBS_READ: dict[str, Any] = {"imports": [IMPORT_JOB_READ], "next_cursor": None}


def ok(example: dict[str, Any]) -> dict[int | str, dict[str, Any]]:
    """`responses=` entry giving the 200 answer's example."""
    return {200: {"content": {"application/json": {"example": example}}}}
