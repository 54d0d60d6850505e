"""A Python client generated from the served OpenAPI document with openapi-python-client
(the version pinned in pyproject.toml) runs every core flow against a real server: what
a user of the document gets is a client that works, with keys and without."""

from __future__ import annotations

import base64
import hashlib
import importlib
import io
import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import pytest

from tests.clients.conftest import READ_KEY, WRITE_KEY, Service, photo

pytestmark = pytest.mark.slow

OATLY = "oatly-natural-oatghurt"
TROPICANA = "tropicana-apple-juice"


def generate(spec_url: str, work: Path, package: str) -> Path:
    """Run the generator on the served document into `work/package`; any warning fails."""
    spec = httpx.get(spec_url, timeout=30)
    assert spec.status_code == 200, spec.text
    document = work / f"{package}.json"
    document.write_text(json.dumps(spec.json()))
    bin_dir = str(Path(sys.executable).parent)  # its post-hooks run ruff from the venv
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "openapi_python_client",
            "generate",
            "--path",
            str(document),
            "--output-path",
            str(work / package),
            "--meta",
            "none",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"},
    )
    output = run.stdout + run.stderr
    assert run.returncode == 0, output
    # The generator reports what it could not express as warnings and still exits 0.
    assert "warning" not in output.lower(), output
    assert "error" not in output.lower(), output
    return work / package


@pytest.fixture
def load(tmp_path: Path) -> Iterator[Callable[[Service, str], ModuleType]]:
    """Generate a client for a service and import it; unloaded again afterwards."""
    packages: list[str] = []

    def load_client(service: Service, package: str) -> ModuleType:
        generate(f"{service.url}/openapi.json", tmp_path, package)
        packages.append(package)
        return importlib.import_module(package)

    sys.path.insert(0, str(tmp_path))
    try:
        yield load_client
    finally:
        sys.path.remove(str(tmp_path))
        for name in [m for m in sys.modules if m.split(".")[0] in packages]:
            del sys.modules[name]


class Api:
    """The generated package's operations and models by name, as a user would import them."""

    def __init__(self, package: ModuleType) -> None:
        self.package = package
        self.models = importlib.import_module(f"{package.__name__}.models")
        self.types = importlib.import_module(f"{package.__name__}.types")
        self.client = importlib.import_module(f"{package.__name__}.client")

    def op(self, tag: str, name: str) -> Any:
        return importlib.import_module(f"{self.package.__name__}.api.{tag}.{name}")

    def __getattr__(self, model: str) -> Any:
        return getattr(self.models, model)


def b64(name: str) -> str:
    return base64.b64encode(photo(name)).decode()


def ok(response: Any, status: int = 200) -> Any:
    assert response.status_code == status, (response.status_code, response.content[:500])
    return response.parsed


def test_generated_python_client_runs_every_flow_with_keys(
    keyed_service: Service, load: Callable[[Service, str], ModuleType]
) -> None:
    api = Api(load(keyed_service, "vsearch_keyed_client"))
    spec = httpx.get(f"{keyed_service.url}/openapi.json").json()
    assert spec["components"]["securitySchemes"]["APIKeyHeader"]["name"] == "X-API-Key"

    def authenticated(key: str) -> Any:
        return api.client.AuthenticatedClient(
            keyed_service.url,
            token=key,
            auth_header_name="X-API-Key",
            prefix="",
            timeout=httpx.Timeout(60),
        )

    writer, reader = authenticated(WRITE_KEY), authenticated(READ_KEY)
    anonymous = api.client.Client(keyed_service.url, timeout=httpx.Timeout(60))

    def products(name: str) -> Any:
        return api.op("products", name)

    def search(name: str) -> Any:
        return api.op("search", name)

    def duplicates(name: str) -> Any:
        return api.op("duplicates", name)

    def health(name: str) -> Any:
        return api.op("health", name)

    image_url = keyed_service.images.url(f"/{OATLY}.jpg")
    crop = api.BoxIn(x=20, y=30, w=120, h=100)

    # Create as JSON: base64 images, a URL image, a cropped image.
    created = ok(
        products("create_products").sync_detailed(
            client=writer,
            body=api.ProductsCreate(
                products=[
                    api.ProductIn(
                        id="oatly",
                        title="Oatly natural oatghurt",
                        category="dairy",
                        attributes=api.ProductInAttributes.from_dict({"brand": "Oatly"}),
                        images=[api.ImageIn(data=b64(OATLY))],
                    ),
                    api.ProductIn(
                        id="oatly-url",
                        title="OATLY oatgurt",
                        category="dairy",
                        images=[api.ImageIn(url=image_url)],
                    ),
                    api.ProductIn(
                        id="oatly-crop",
                        category="dairy",
                        images=[api.ImageIn(data=b64(OATLY), box=crop)],
                    ),
                    api.ProductIn(
                        id="tropicana",
                        title="Tropicana apple juice",
                        category="juice",
                        images=[api.ImageIn(data=b64(TROPICANA))],
                    ),
                ]
            ),
        )
    )
    assert isinstance(created, api.ProductsCreateRead)
    assert [(r.id, r.status, r.images) for r in created.results] == [
        ("oatly", "created", 1),
        ("oatly-url", "created", 1),
        ("oatly-crop", "created", 1),
        ("tropicana", "created", 1),
    ]

    # Create as a multipart upload: the file, and attributes as JSON text.
    uploaded = ok(
        products("upload_product").sync_detailed(
            client=writer,
            body=api.ProductUpload(
                id="tropicana-upload",
                title="Tropicana apple 1 L",
                category="juice",
                attributes=json.dumps({"brand": "Tropicana"}),
                image=[
                    api.types.File(
                        payload=io.BytesIO(photo(TROPICANA)),
                        file_name=f"{TROPICANA}.jpg",
                        mime_type="image/jpeg",
                    )
                ],
            ),
        )
    )
    assert [(r.id, r.status) for r in uploaded.results] == [("tropicana-upload", "created")]
    every_id = {"oatly", "oatly-url", "oatly-crop", "tropicana", "tropicana-upload"}

    # Get: what was stored is what was sent.
    product = ok(products("get_product").sync_detailed("tropicana-upload", client=reader))
    assert isinstance(product, api.ProductRead)
    assert (product.title, product.category) == ("Tropicana apple 1 L", "juice")
    assert product.attributes.to_dict() == {"brand": "Tropicana"}
    assert product.images[0].sha256 == hashlib.sha256(photo(TROPICANA)).hexdigest()
    by_url = ok(products("get_product").sync_detailed("oatly-url", client=reader))
    assert by_url.images[0].url == image_url
    cropped = ok(products("get_product").sync_detailed("oatly-crop", client=reader))
    assert cropped.images[0].box == [20.0, 30.0, 120.0, 100.0]

    # List with paging: two at a time, every product exactly once.
    seen: list[str] = []
    cursor: Any = api.types.UNSET
    while True:
        page = ok(products("list_products").sync_detailed(client=reader, limit=2, cursor=cursor))
        assert len(page.products) <= 2
        seen += [p.id for p in page.products]
        if not page.next_cursor:
            break
        cursor = page.next_cursor
    assert sorted(seen) == sorted(every_id)
    juice = ok(products("list_products").sync_detailed(client=reader, category="juice"))
    assert {p.id for p in juice.products} == {"tropicana", "tropicana-upload"}

    # Search by upload, with a box and a category filter.
    hits = ok(
        search("search_by_upload").sync_detailed(
            client=reader,
            body=api.SearchUpload(
                image=api.types.File(payload=io.BytesIO(photo(OATLY)), file_name="q.jpg"),
                bbox="20,30,120,100",
                k=3,
                category="dairy",
            ),
        )
    )
    assert isinstance(hits, api.SearchRead)
    assert hits.results[0].id == "oatly-crop"
    assert hits.results[0].score > 0.999
    assert {h.category for h in hits.results} == {"dairy"}

    # Search by base64: the filter keeps to its category, the same photo comes first.
    hits = ok(
        search("search_by_image").sync_detailed(
            client=reader,
            body=api.SearchRequest(
                image=b64(TROPICANA),
                k=5,
                filters=api.SearchFilters(category="juice"),
                min_score=-1.0,
            ),
        )
    )
    assert {h.id for h in hits.results} == {"tropicana", "tropicana-upload"}
    assert min(h.score for h in hits.results) > 0.999

    # Search by URL with a box: the cropped listing is the one that matches the crop.
    hits = ok(
        search("search_by_image").sync_detailed(
            client=reader,
            body=api.SearchRequest(
                image_url=image_url,
                bbox=crop,
                k=2,
                filters=api.SearchFilters(category="dairy"),
            ),
        )
    )
    assert hits.results[0].id == "oatly-crop"
    assert hits.results[0].score > 0.999
    hits = ok(
        search("search_by_image").sync_detailed(
            client=reader, body=api.SearchRequest(image_url=image_url, k=2)
        )
    )
    assert {h.id for h in hits.results} == {"oatly", "oatly-url"}

    # Duplicate pairs, one per page: the same photo listed twice is a pair, found by ingest.
    def pairs(**params: Any) -> list[Any]:
        found: list[Any] = []
        cursor: Any = api.types.UNSET
        while True:
            page = ok(
                duplicates("list_duplicate_pairs").sync_detailed(
                    client=reader, min_score=0.999, limit=1, cursor=cursor, **params
                )
            )
            found += page.pairs
            if not page.next_cursor:
                return found
            cursor = page.next_cursor

    def pair_ids(found: list[Any]) -> set[frozenset[str]]:
        return {frozenset((p.a, p.b)) for p in found}

    oatly_pair = frozenset(("oatly", "oatly-url"))
    tropicana_pair = frozenset(("tropicana", "tropicana-upload"))
    all_pairs = pairs()
    assert {oatly_pair, tropicana_pair} <= pair_ids(all_pairs)
    assert all(p.score >= 0.999 and p.decision is None for p in all_pairs)
    one_page = ok(duplicates("list_duplicate_pairs").sync_detailed(client=reader, min_score=0.999))
    assert [(p.a, p.b) for p in one_page.pairs] == [(p.a, p.b) for p in all_pairs]

    groups = ok(duplicates("list_duplicate_groups").sync_detailed(client=reader, min_score=0.999))
    members = [set(g.members) for g in groups.groups]
    assert any(oatly_pair <= m for m in members)
    assert any(tropicana_pair <= m for m in members)
    juice_groups = ok(
        duplicates("list_duplicate_groups").sync_detailed(
            client=reader, min_score=0.999, category="juice"
        )
    )
    assert [set(g.members) for g in juice_groups.groups] == [set(tropicana_pair)]

    # Decisions: "different" hides the pair, "same" marks it, undo brings it back.
    different = api.DecisionCreateDecision("different")
    decided = ok(
        duplicates("create_decision").sync_detailed(
            client=writer,
            body=api.DecisionCreate(a="oatly", b="oatly-url", decision=different),
        )
    )
    assert (decided.a, decided.b, decided.decision) == ("oatly", "oatly-url", different)
    ok(
        duplicates("create_decision").sync_detailed(
            client=writer,
            body=api.DecisionCreate(
                a="tropicana", b="tropicana-upload", decision=api.DecisionCreateDecision("same")
            ),
        )
    )
    assert oatly_pair not in pair_ids(pairs())
    marked = {frozenset((p.a, p.b)): p.decision for p in pairs()}
    assert marked[tropicana_pair] == "same"
    assert tropicana_pair not in pair_ids(pairs(undecided=True))
    recorded = ok(
        duplicates("list_decisions").sync_detailed(
            client=reader, decision=api.ListDecisionsDecisionType0("different")
        )
    )
    assert [frozenset((d.a, d.b)) for d in recorded.decisions] == [oatly_pair]
    assert recorded.decisions[0].decided_by  # a fingerprint of the writer's key
    assert WRITE_KEY not in recorded.decisions[0].decided_by
    ok(duplicates("delete_decision").sync_detailed(client=writer, a="oatly-url", b="oatly"), 204)
    remaining = ok(duplicates("list_decisions").sync_detailed(client=reader))
    assert [frozenset((d.a, d.b)) for d in remaining.decisions] == [tropicana_pair]
    assert oatly_pair in pair_ids(pairs(undecided=True))
    again = ok(
        duplicates("delete_decision").sync_detailed(client=writer, a="oatly", b="oatly-url"), 404
    )
    assert again.error.code == "decision_not_found"

    # Delete: gone from get, search and duplicates at once.
    ok(products("delete_product").sync_detailed("oatly-url", client=writer), 204)
    missing = ok(products("get_product").sync_detailed("oatly-url", client=reader), 404)
    assert isinstance(missing, api.ProductNotFoundError)
    assert missing.error.code == "product_not_found"
    hits = ok(
        search("search_by_image").sync_detailed(
            client=reader, body=api.SearchRequest(image_url=image_url, k=5)
        )
    )
    assert "oatly-url" not in {h.id for h in hits.results}
    assert oatly_pair not in pair_ids(pairs())

    # The keys are enforced, and the errors parse into their declared models.
    refused = ok(products("list_products").sync_detailed(client=anonymous), 401)
    assert isinstance(refused, api.UnauthorizedError)
    assert refused.error.code == "unauthorized"
    refused = ok(products("delete_product").sync_detailed("oatly", client=reader), 401)
    assert isinstance(refused, api.UnauthorizedError)
    bad = ok(
        search("search_by_image").sync_detailed(
            client=reader, body=api.SearchRequest(image=base64.b64encode(b"not an image").decode())
        ),
        422,
    )
    assert isinstance(bad, api.ImageUndecodableError)

    # Probes and metrics.
    ready = ok(health("get_readiness").sync_detailed(client=reader))
    assert ready.status == "ready"
    assert ready.model.embedding_dim == 512
    assert ok(health("get_health").sync_detailed(client=anonymous)).status == "ok"
    metrics = health("get_metrics").sync_detailed(client=reader)
    assert metrics.status_code == 200
    assert b"vsearch_" in metrics.content
    assert health("get_metrics").sync_detailed(client=anonymous).status_code == 401


def test_open_service_client_needs_no_key(
    open_service: Service, load: Callable[[Service, str], ModuleType]
) -> None:
    spec = httpx.get(f"{open_service.url}/openapi.json").json()
    assert "securitySchemes" not in spec.get("components", {})
    api = Api(load(open_service, "vsearch_open_client"))
    client = api.client.Client(open_service.url, timeout=httpx.Timeout(60))

    created = ok(
        api.op("products", "upload_product").sync_detailed(
            client=client,
            body=api.ProductUpload(
                id="oatly",
                image=[api.types.File(payload=io.BytesIO(photo(OATLY)), file_name="o.jpg")],
            ),
        )
    )
    assert [(r.id, r.status) for r in created.results] == [("oatly", "created")]
    hits = ok(
        api.op("search", "search_by_image").sync_detailed(
            client=client, body=api.SearchRequest(image=b64(OATLY), k=1)
        )
    )
    assert [h.id for h in hits.results] == ["oatly"]
    ok(api.op("products", "delete_product").sync_detailed("oatly", client=client), 204)
    assert ok(api.op("products", "list_products").sync_detailed(client=client)).products == []
