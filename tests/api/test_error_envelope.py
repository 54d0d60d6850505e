"""Every 4xx and 5xx, the framework's own included, is the JSON error envelope with an
X-Request-ID; generated ids, path, query parameters and headers never make a 5xx."""

from __future__ import annotations

import base64
import os
from urllib.parse import quote, urlencode

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from app.core.config import Settings
from app.main import create_app
from tests.images import encode, pattern

EXAMPLES = int(os.environ.get("VS_TEST_FUZZ_EXAMPLES", "40"))


def assert_envelope(response: httpx.Response) -> None:
    assert response.status_code < 500, (response.status_code, response.text)
    assert response.headers.get("x-request-id")
    if response.status_code >= 400:
        assert response.headers["content-type"].startswith("application/json")
        error = response.json()["error"]
        assert isinstance(error["code"], str)
        assert error["code"]
        assert isinstance(error["message"], str)


class TestFrameworkErrors:
    @pytest.mark.parametrize(
        ("method", "path", "kwargs", "status", "code"),
        [
            ("GET", "/no/such/route", {}, 404, "not_found"),
            ("PUT", "/search", {}, 405, "method_not_allowed"),
            ("BREW", "/products", {}, 405, "method_not_allowed"),
            (
                "POST",
                "/search",
                {"content": b"{", "headers": {"content-type": "application/json"}},
                422,
                "invalid_request",
            ),  # noqa: E501
            (
                "POST",
                "/search",
                {"content": b"\xff\xfe", "headers": {"content-type": "application/json"}},
                422,
                "invalid_request",
            ),  # noqa: E501
            (
                "POST",
                "/duplicates/decisions",
                {"content": b"[1,", "headers": {"content-type": "application/json"}},
                422,
                "invalid_request",
            ),  # noqa: E501
            (
                "POST",
                "/search",
                {"content": b"x", "headers": {"content-type": "text/plain"}},
                415,
                "unsupported_media_type",
            ),  # noqa: E501
            (
                "POST",
                "/products",
                {"content": b"--x\r\n", "headers": {"content-type": "multipart/form-data"}},
                422,
                "invalid_request",
            ),  # noqa: E501
            ("GET", "/products?limit=abc", {}, 422, "invalid_request"),
        ],
    )
    async def test_envelope(
        self,
        client: httpx.AsyncClient,
        method: str,
        path: str,
        kwargs: dict[str, object],
        status: int,
        code: str,
    ) -> None:
        response = await client.request(method, path, **kwargs)  # type: ignore[arg-type]
        assert response.status_code == status
        assert_envelope(response)
        assert response.json()["error"]["code"] == code

    async def test_an_unexpected_exception_is_a_500_in_the_envelope(
        self, settings: Settings
    ) -> None:
        app = create_app(settings)

        async def fails() -> None:
            raise RuntimeError("a bug")

        app.add_api_route("/fails", fails)
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
            response = await c.get("/fails", headers={"X-Request-ID": "bug-1"})
        assert response.status_code == 500
        assert response.json()["error"] == {
            "code": "internal_error",
            "message": "Internal error; quote the X-Request-ID.",
        }
        assert response.headers["x-request-id"] == "bug-1"
        assert "a bug" not in response.text


# property-based -------------------------------------------------------------------------
texts = st.text(st.characters(exclude_categories=("Cs",)), max_size=40)
header_values = st.text(st.characters(min_codepoint=0x20, max_codepoint=0xFF), max_size=60)
numbers = st.one_of(
    st.integers(-(10**20), 10**20).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    texts,
)
IMAGE = base64.b64encode(encode(pattern(width=32, height=32, seed=1), "PNG")).decode()
json_floats = st.floats(allow_nan=False, allow_infinity=False)
HEADERS = ["X-API-Key", "X-Request-ID", "Content-Type", "Authorization", "X-Forwarded-For"]


@st.composite
def requests(draw: st.DrawFn) -> tuple[str, str, dict[str, str], dict[str, object]]:
    product_id = quote(draw(texts), safe="")
    query: dict[str, str] = {}
    for name in ("limit", "min_score", "cursor", "category", "undecided", "embeddings", "k"):
        if draw(st.booleans()):
            query[name] = draw(numbers)
    path = draw(
        st.sampled_from(
            [
                f"/products/{product_id}",
                "/products",
                "/duplicates",
                "/duplicates/groups",
                f"/{product_id}",
                "/ready",
                "/metrics",
            ]
        )
    )
    method = draw(st.sampled_from(["GET", "GET", "DELETE", "HEAD", "OPTIONS", "PATCH"]))
    headers = {name: draw(header_values) for name in HEADERS if draw(st.booleans())}
    url = f"{path}?{urlencode(query)}" if query else path
    body: dict[str, object] = {}
    if draw(st.booleans()):
        method, url = "POST", "/search" if draw(st.booleans()) else "/products"
        data = IMAGE
        headers.pop("Content-Type", None)
        body = {
            "json": {
                "products": [{"id": draw(texts), "title": draw(texts), "images": [{"data": data}]}],
                "image": data,
                "k": draw(st.one_of(st.integers(), texts)),
                "min_score": draw(st.one_of(json_floats, texts)),
                "filters": {"category": draw(texts)},
            }
        }
    return method, url, headers, body


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(request=requests())
async def test_generated_requests_never_get_a_5xx(
    db_client: httpx.AsyncClient,
    request: tuple[str, str, dict[str, str], dict[str, object]],
) -> None:
    method, url, headers, body = request
    # Header values as bytes: any latin-1 text a client may send, as a server receives it.
    raw = [(name.encode(), value.encode("latin-1")) for name, value in headers.items()]
    response = await db_client.request(method, url, headers=raw, **body)  # type: ignore[arg-type]
    if method == "HEAD":
        assert response.status_code < 500
        assert response.headers.get("x-request-id")
        return
    assert_envelope(response)
