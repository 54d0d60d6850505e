"""Property-based tests: no generated image URL or box makes the service answer a 5xx or
leave the JSON error envelope, and crops of reduced images always cover their box."""

from __future__ import annotations

import base64
import math
import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from PIL import Image
from starlette.testclient import TestClient

from app.core.config import Settings
from app.core.errors import InvalidBox
from app.imaging.crop import ORIGINAL_SIZE, crop
from app.main import create_app
from tests.httpserver import LocalServer, body, redirect, serve
from tests.images import encode, pattern

JPEG = encode(pattern(120, 90), "JPEG")
EXAMPLES = hsettings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@pytest.fixture(scope="module")
def images() -> Iterator[LocalServer]:
    routes = {
        "/a.jpg": body(JPEG),
        "/r": redirect("http:foo"),
        "/loop": redirect("/loop"),
        "/html": body(b"<html></html>", "text/html"),
    }
    with serve(routes) as server:
        yield server


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    """The app, allowed to fetch only from 127.0.0.1 and `*.test` (resolved to loopback):
    nothing a generated URL names can reach beyond this machine."""
    image = settings.image.model_copy(update={"fetch_allowed_hosts": "127.0.0.1,*.test"})
    app = create_app(settings.model_copy(update={"image": image}))
    app.state.vs.exit_on_start_failure = False
    with TestClient(app, raise_server_exceptions=False) as c:
        deadline = time.monotonic() + 120
        while c.get("/ready").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.1)

        def loopback(host: str, port: int, **_: Any) -> list[Any]:
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port or 80))]

        app.state.vs.services.fetcher.getaddrinfo = loopback
        yield c


def _hosts(port: int) -> st.SearchStrategy[str]:
    return st.one_of(
        st.sampled_from(
            [f"127.0.0.1:{port}", "img.test", f"img.test:{port}", "127.0.0.1", "[::1]"]
        ),
        st.text(min_size=0, max_size=30),
    )


def _urls(port: int) -> st.SearchStrategy[str]:
    scheme = st.sampled_from(["http", "https", "HTTP", "ftp", "file", "data", "javascript", ""])
    userinfo = st.sampled_from(["", "user@", "user:pw@", "@", ":@"])
    path = st.one_of(
        st.sampled_from(["/a.jpg", "/r", "/loop", "/html", "/missing", ""]),
        st.text(max_size=40).map(lambda t: "/" + t),
    )
    tail = st.sampled_from(["", "?x=1", "#f", "?%00", "%zz", "\x00", "\r\n", " "])
    structured = st.builds(
        lambda s, u, h, p, t: f"{s}://{u}{h}{p}{t}", scheme, userinfo, _hosts(port), path, tail
    )
    return st.one_of(structured, st.text(max_size=80))


def _assert_handled(response: Any) -> None:
    assert response.status_code < 500, response.text
    if response.status_code >= 400:
        assert set(response.json()["error"]) >= {"code", "message"}


def test_no_generated_url_gets_a_5xx(client: TestClient, images: LocalServer) -> None:
    @EXAMPLES
    @given(url=_urls(images.port))
    def check(url: str) -> None:
        _assert_handled(client.post("/search", json={"image_url": url}))
        product = {"id": "p", "images": [{"url": url}]}
        response = client.post("/products", json={"products": [product]})
        _assert_handled(response)
        if response.status_code == 200:
            result = response.json()["results"][0]
            if result["status"] == "failed":
                assert result["error"]["code"] != "internal_error"

    check()


_NUMBERS = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(min_value=-(10**30), max_value=10**30),
    st.sampled_from([0, 1e-300, 5e-324, 119.99999999, 120, 90, 1e308]),
)


def test_no_generated_box_gets_a_5xx(client: TestClient) -> None:
    files = {"image": ("a.jpg", JPEG, "image/jpeg")}

    @EXAMPLES
    @given(box=st.tuples(_NUMBERS, _NUMBERS, _NUMBERS, _NUMBERS), form=st.booleans())
    def check(box: tuple[Any, ...], form: bool) -> None:
        if form:
            text = ",".join(repr(v) if isinstance(v, float) else str(v) for v in box)
            response = client.post("/search", files=files, data={"bbox": text})
        else:
            payload = {
                "image": base64.b64encode(JPEG).decode(),
                "bbox": dict(zip("xywh", box, strict=True)),
            }
            # JSON has no NaN or infinity; send them as the strings a client might.
            payload["bbox"] = {
                k: (v if isinstance(v, int) or math.isfinite(v) else str(v))
                for k, v in payload["bbox"].items()
            }
            response = client.post("/search", json=payload)
        _assert_handled(response)

    check()


@EXAMPLES
@given(
    size=st.tuples(st.integers(1, 5000), st.integers(1, 5000)),
    held=st.tuples(st.integers(1, 700), st.integers(1, 700)),
    fractions=st.tuples(*(st.floats(0, 1) for _ in range(4))),
)
def test_crops_of_reduced_images_are_never_empty(
    size: tuple[int, int], held: tuple[int, int], fractions: tuple[float, ...]
) -> None:
    width, height = size
    image = Image.new("RGB", held)
    image.info[ORIGINAL_SIZE] = size
    fx, fy, fw, fh = fractions
    box = (fx * width, fy * height, fw * (width - fx * width), fh * (height - fy * height))
    try:
        out = crop(image, box)
    except InvalidBox:
        assert box[2] <= 0 or box[3] <= 0
        return
    assert 1 <= out.width <= image.width
    assert 1 <= out.height <= image.height
