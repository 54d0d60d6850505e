"""A client generated from the OpenAPI document (openapi-python-client) drives labels,
filters, sets, partial updates, image add/remove, more-like-this, batch search and
totals against the real app: the new operations keep working with generated clients."""

from __future__ import annotations

import importlib
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import pytest

from app.core.config import Settings
from app.main import create_app
from tests.api.test_search import b64, jpeg

generator = pytest.importorskip("openapi_python_client.cli")


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The package name of a client generated from this app's OpenAPI document."""
    from typer.testing import CliRunner

    root = tmp_path_factory.mktemp("client")
    spec = root / "openapi.json"
    spec.write_text(json.dumps(create_app(Settings(model="unused")).openapi()))
    out = root / "vs_client"
    result = CliRunner().invoke(
        generator.app,
        ["generate", "--path", str(spec), "--meta", "none", "--output-path", str(out)],
    )
    assert (out / "client.py").exists(), result.output
    sys.path.insert(0, str(root))
    yield "vs_client"
    sys.path.remove(str(root))
    for name in [n for n in sys.modules if n.startswith("vs_client")]:
        del sys.modules[name]


def module(package: str, name: str) -> ModuleType:
    return importlib.import_module(f"{package}.{name}")


async def test_client_flow(db_client: httpx.AsyncClient, generated: str) -> None:
    client_module = module(generated, "client")
    models = module(generated, "models")
    api = client_module.AuthenticatedClient(
        base_url="http://test", token="unused", prefix="", auth_header_name="X-API-Key"
    ).set_async_httpx_client(db_client)

    def call(operation: str, **kwargs: Any) -> Any:
        return module(generated, f"api.{operation}").asyncio(client=api, **kwargs)

    products = [
        {
            "id": f"sku-{i}",
            "category": "food" if i < 3 else "tools",
            "labels": {"brand": ["acme" if i % 2 else "zenith"]},
            "sets": ["catalogue"],
            "images": [{"data": b64(jpeg(i))}],
        }
        for i in range(5)
    ]
    # POST /products takes JSON or multipart in one operation, which this generator
    # cannot type (its issue #1451): the catalogue is loaded over plain HTTP.
    created = await db_client.post("/products", json={"products": products})
    assert [r["status"] for r in created.json()["results"]] == ["created"] * 5

    listed = await call("products.list_products", label=["brand:acme"])
    assert listed.total == 2
    assert {p.id for p in listed.products} == {"sku-1", "sku-3"}
    assert listed.products[0].labels.additional_properties == {"brand": ["acme"]}

    patched = await call(
        "products.update_product",
        product_id="sku-0",
        body=models.ProductPatchIn.from_dict({"labels": {"brand": ["acme"]}}),
    )
    assert patched.status.value == "updated"

    similar = await call(
        "search.search_similar",
        body=models.SimilarSearchRequest.from_dict(
            {"product_id": "sku-1", "k": 10, "filters": {"must": {"brand": ["acme"]}}}
        ),
    )
    assert {h.id for h in similar.results} == {"sku-0", "sku-3"}
    assert all(h.sets == ["catalogue"] for h in similar.results)

    batch = await call(
        "search.search_batch",
        body=models.BatchSearchRequest.from_dict(
            {
                "queries": [
                    {"image": b64(jpeg(4)), "k": 1},
                    {
                        "image": b64(jpeg(4)),
                        "k": 5,
                        "filters": {"must_not": {"category": ["tools"]}},
                    },
                ]
            }
        ),
    )
    assert batch.responses[0].results[0].id == "sku-4"
    assert {h.category for h in batch.responses[1].results} == {"food"}

    added = await call(
        "products.add_product_image",
        product_id="sku-2",
        body=models.ImageIn.from_dict({"data": b64(jpeg(9))}),
    )
    assert added.status.value == "updated"
    deleted = await module(generated, "api.products.delete_product_image").asyncio_detailed(
        client=api, product_id="sku-2", image_id=added.image.image_id
    )
    assert deleted.status_code == 204


def test_label_maps_are_typed(generated: str) -> None:
    """Label maps are `dict[str, list[str]]` in the generated models, not untyped."""
    source = Path(module(generated, "models.search_filters_must").__file__ or "").read_text()
    assert "dict[str, list[str]]" in source
