"""The OpenAPI document says what the service does: security as configured, every error
code an operation answers (each with its schema), the headers, and examples that work."""

from __future__ import annotations

import base64
from typing import Any

import httpx
import pytest

from app.api import examples
from app.core.config import Settings
from tests.conftest import app_client
from tests.images import encode, pattern

OPERATIONS = {
    ("post", "/products"): "create_products",
    ("post", "/products/upload"): "upload_product",
    ("get", "/products"): "list_products",
    ("get", "/products/{product_id}"): "get_product",
    ("delete", "/products/{product_id}"): "delete_product",
    ("post", "/search"): "search_by_image",
    ("post", "/search/upload"): "search_by_upload",
    ("get", "/duplicates"): "list_duplicate_pairs",
    ("get", "/duplicates/groups"): "list_duplicate_groups",
    ("post", "/duplicates/decisions"): "create_decision",
    ("get", "/duplicates/decisions"): "list_decisions",
    ("delete", "/duplicates/decisions"): "delete_decision",
    ("get", "/health"): "get_health",
    ("get", "/ready"): "get_readiness",
    ("get", "/metrics"): "get_metrics",
    ("get", "/images/{image_id}/thumbnail"): "get_image_thumbnail",
    ("get", "/duplicates/calibration"): "get_duplicates_calibration",
    ("post", "/duplicates/calibration"): "fit_duplicates_calibration",
    ("get", "/duplicates/audit"): "sample_duplicates_for_audit",
    ("post", "/imports"): "create_import",
    ("get", "/imports"): "list_imports",
    ("get", "/imports/{job_id}"): "get_import",
    ("get", "/imports/{job_id}/failures"): "list_import_failures",
    ("post", "/imports/{job_id}/cancel"): "cancel_import",
}


def operations(spec: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    return {
        (method, path): op
        for path, item in spec["paths"].items()
        for method, op in item.items()
        if method in ("get", "post", "put", "patch", "delete")
    }


async def spec_for(settings: Settings, **update: Any) -> dict[str, Any]:
    async with app_client(settings.model_copy(update=update)) as client:
        spec: dict[str, Any] = (await client.get("/openapi.json")).json()
    return spec


async def test_operation_ids_are_readable(client: httpx.AsyncClient) -> None:
    spec = (await client.get("/openapi.json")).json()
    found = {key: op["operationId"] for key, op in operations(spec).items()}
    for key, operation_id in OPERATIONS.items():
        assert found.get(key) == operation_id, key


@pytest.mark.parametrize(
    ("keys", "secured"),
    [
        ({}, set()),
        ({"api_keys": "w"}, {"write"}),
        ({"api_keys": "w", "api_keys_read": "r"}, {"write", "read"}),
    ],
)
async def test_security_is_declared_as_configured(
    settings: Settings, keys: dict[str, str], secured: set[str]
) -> None:
    spec = await spec_for(settings, **keys)
    probes = {("get", "/health"), ("get", "/ready")}
    for key, op in operations(spec).items():
        method, path = key
        write = method in ("patch", "delete") or (
            method == "post" and not path.startswith("/search")
        )
        kind = "probe" if key in probes else "write" if write else "read"
        declared = bool(op.get("security"))
        assert declared == (kind in secured), (key, op.get("security"))
        assert ("401" in op["responses"]) == declared, key
    schemes = spec["components"].get("securitySchemes", {})
    assert ("APIKeyHeader" in schemes) == bool(secured)
    if "read" in secured:
        # Prometheus sends the key as a bearer token.
        assert {"HTTPBearer": []} in operations(spec)[("get", "/metrics")]["security"]


async def test_each_error_code_has_its_schema_and_is_listed_per_operation(
    client: httpx.AsyncClient,
) -> None:
    spec = (await client.get("/openapi.json")).json()
    schemas = spec["components"]["schemas"]
    ops = operations(spec)
    get_product = ops[("get", "/products/{product_id}")]["responses"]
    assert get_product["404"]["x-error-codes"] == ["product_not_found"]
    ref = get_product["404"]["content"]["application/json"]["schema"]["$ref"]
    assert ref == "#/components/schemas/ProductNotFoundError"
    body_ref = schemas["ProductNotFoundError"]["properties"]["error"]["$ref"]
    assert body_ref == "#/components/schemas/ProductNotFoundErrorBody"
    body = schemas["ProductNotFoundErrorBody"]
    assert body["properties"]["code"]["const"] == "product_not_found"
    search = ops[("post", "/search")]["responses"]
    assert set(search["422"]["x-error-codes"]) >= {
        "invalid_request",
        "image_undecodable",
        "invalid_box",
        "url_not_allowed",
        "image_fetch_failed",
    }
    assert {s["$ref"] for s in search["422"]["content"]["application/json"]["schema"]["oneOf"]} >= {
        "#/components/schemas/InvalidBoxError"
    }
    assert search["413"]["x-error-codes"] == ["image_too_large", "request_too_large"]
    assert search["415"]["x-error-codes"] == ["unsupported_media_type"]
    assert set(search["503"]["x-error-codes"]) == {"not_ready", "overloaded"}
    decide = ops[("post", "/duplicates/decisions")]["responses"]
    assert set(decide["404"]["x-error-codes"]) == {"product_not_found", "pair_not_found"}
    assert "413" in decide  # any body can be too large
    # FastAPI's own validation schema is not what the service sends.
    assert "HTTPValidationError" not in schemas
    for key, op in ops.items():
        for status, response in op["responses"].items():
            assert "X-Request-ID" in response.get("headers", {}), (key, status)
            if status in ("429", "503"):
                assert "Retry-After" in response["headers"], (key, status)
            if status.startswith(("4", "5")) and key != ("get", "/ready"):
                for code in response["x-error-codes"]:
                    assert f"`{code}`" in response["description"]


async def test_declared_codes_are_the_ones_sent(db_client: httpx.AsyncClient) -> None:
    spec = (await db_client.get("/openapi.json")).json()
    ops = operations(spec)
    cases = [
        (("get", "/products/{product_id}"), "GET", "/products/nope", {}),
        (("post", "/search"), "POST", "/search", {"json": {"image": "bm90IGFuIGltYWdl"}}),
        (("post", "/duplicates/decisions"), "POST", "/duplicates/decisions", {"json": {}}),
        (("get", "/products"), "GET", "/products", {"params": {"cursor": "x"}}),
    ]
    for key, method, path, kwargs in cases:
        response = await db_client.request(method, path, **kwargs)
        code = response.json()["error"]["code"]
        declared = ops[key]["responses"][str(response.status_code)]["x-error-codes"]
        assert code in declared, (key, response.status_code, code, declared)


async def test_duplicates_min_score_minimum_is_the_floor(settings: Settings) -> None:
    spec = await spec_for(
        settings, duplicates=settings.duplicates.model_copy(update={"floor": 0.85})
    )
    for path in ("/duplicates", "/duplicates/groups"):
        params = {p["name"]: p for p in spec["paths"][path]["get"]["parameters"]}
        assert params["min_score"]["schema"]["minimum"] == 0.85


def _keys(value: Any) -> Any:
    """The shape of a JSON value: dict keys recursively (first list item stands for all)."""
    if isinstance(value, dict):
        return {k: _keys(v) for k, v in value.items()}
    if isinstance(value, list) and value:
        return [_keys(value[0])]
    return type(value).__name__ if value is not None else None


def _same_shape(example: Any, real: Any) -> bool:
    if isinstance(example, dict) and isinstance(real, dict):
        # The document leaves out null members of examples.
        missing = {k for k in set(real) - set(example) if real[k] is not None}
        return (
            not missing
            and set(example) <= set(real)
            and all(
                k in ("attributes", "labels") or _same_shape(example[k], real[k]) for k in example
            )
        )
    if isinstance(example, list) and isinstance(real, list):
        return not example or not real or _same_shape(example[0], real[0])
    return (
        example is None
        or real is None
        or isinstance(real, type(example))
        or (isinstance(example, (int, float)) and isinstance(real, (int, float)))
    )


async def test_the_examples_succeed_in_order_on_a_fresh_service(
    db_client: httpx.AsyncClient,
) -> None:
    spec = (await db_client.get("/openapi.json")).json()
    ops = operations(spec)

    def request_example(key: tuple[str, str]) -> Any:
        return ops[key]["requestBody"]["content"]["application/json"]["example"]

    def response_example(key: tuple[str, str]) -> Any:
        return ops[key]["responses"]["200"]["content"]["application/json"]["example"]

    def check(key: tuple[str, str], response: httpx.Response) -> None:
        assert response.status_code == 200, (key, response.text)
        real = response.json()
        assert _same_shape(response_example(key), real), (key, _keys(real))

    created = await db_client.post("/products", json=request_example(("post", "/products")))
    check(("post", "/products"), created)
    assert [r["status"] for r in created.json()["results"]] == ["created", "created"]
    product = await db_client.get(f"/products/{examples.PRODUCT_ID}")
    check(("get", "/products/{product_id}"), product)
    check(("get", "/products"), await db_client.get("/products"))
    found = await db_client.post("/search", json=request_example(("post", "/search")))
    check(("post", "/search"), found)
    assert found.json()["results"][0]["id"] in (examples.PRODUCT_ID, examples.OTHER_ID)
    pairs = await db_client.get("/duplicates")
    check(("get", "/duplicates"), pairs)
    assert {pairs.json()["pairs"][0]["a"], pairs.json()["pairs"][0]["b"]} == {
        examples.PRODUCT_ID,
        examples.OTHER_ID,
    }
    check(("get", "/duplicates/groups"), await db_client.get("/duplicates/groups"))
    decision = request_example(("post", "/duplicates/decisions"))
    check(
        ("post", "/duplicates/decisions"),
        await db_client.post("/duplicates/decisions", json=decision),
    )
    check(("get", "/duplicates/decisions"), await db_client.get("/duplicates/decisions"))
    undo = await db_client.delete(
        "/duplicates/decisions", params={"a": decision["a"], "b": decision["b"]}
    )
    assert undo.status_code == 204
    assert (await db_client.delete(f"/products/{examples.OTHER_ID}")).status_code == 204


async def test_the_sample_image_is_plain_base64_of_a_jpeg() -> None:
    assert base64.b64decode(examples.SAMPLE_B64, validate=True)[:3] == b"\xff\xd8\xff"


async def test_decisions_need_a_pair_the_service_found(db_settings: Settings) -> None:
    # A floor no two different images reach: the two products are never a pair.
    floor = db_settings.duplicates.model_copy(update={"floor": 0.9999})
    async with app_client(db_settings.model_copy(update={"duplicates": floor})) as client:
        a = {"id": "far-a", "images": [{"data": examples.SAMPLE_B64}]}
        other = base64.b64encode(encode(pattern(seed=11), "JPEG")).decode()
        b = {"id": "far-b", "images": [{"data": other}]}
        assert (await client.post("/products", json={"products": [a, b]})).status_code == 200
        assert (await client.get("/duplicates", params={"min_score": 0.9999})).json()["pairs"] == []
        response = await client.post(
            "/duplicates/decisions", json={"a": "far-a", "b": "far-b", "decision": "same"}
        )
        assert response.status_code == 404
        assert response.json()["error"]["code"] == "pair_not_found"
