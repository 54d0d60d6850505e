"""What the generated-client tests share: a real `vsearch serve` (with or without API keys)
whose image URLs can only reach a local image host, and the grocery photos."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.httpserver import LocalServer, body, serve
from tests.server import Server, start_server

PHOTOS = REPO / "tests" / "fixtures" / "grocery"
WRITE_KEY = "client-writer"
READ_KEY = "client-reader"


@dataclass
class Service:
    """A running service and where its example images can be fetched from."""

    server: Server
    images: LocalServer
    keyed: bool

    @property
    def url(self) -> str:
        return self.server.url


def photo(name: str) -> bytes:
    return (PHOTOS / f"{name}.jpg").read_bytes()


@pytest.fixture
def image_host() -> Iterator[LocalServer]:
    """The two grocery photos over HTTP on 127.0.0.1."""
    routes = {f"/{p.name}": body(p.read_bytes()) for p in sorted(PHOTOS.glob("*.jpg"))}
    with serve(routes) as host:
        yield host


def _start(tiny_model_dir: Path, work: Path, images: LocalServer, keyed: bool) -> Server:
    env = {
        "VS_MODEL": str(tiny_model_dir),
        "VS_DATA_DIR": str(work / "data"),
        "VS_PRECISION": "fp32",
        # URLs may reach the local image host only: nothing leaves the machine.
        "VS_ALLOW_PRIVATE_URLS": "true",
        "VS_IMAGE__FETCH_ALLOWED_HOSTS": images.host,
        "VS_LOG_LEVEL": "WARNING",
    }
    if keyed:
        env |= {"VS_API_KEYS": WRITE_KEY, "VS_API_KEYS_READ": READ_KEY}
    return start_server(env, work / "server.log")


@pytest.fixture
def keyed_service(
    tiny_model_dir: Path, tmp_path: Path, image_host: LocalServer
) -> Iterator[Service]:
    """A service with write and read keys, as in production: every operation but the
    probes declares `X-API-Key`."""
    server = _start(tiny_model_dir, tmp_path, image_host, keyed=True)
    try:
        yield Service(server, image_host, keyed=True)
    finally:
        server.stop()
    assert "Traceback" not in server.output()


@pytest.fixture
def open_service(
    tiny_model_dir: Path, tmp_path: Path, image_host: LocalServer
) -> Iterator[Service]:
    """A service without keys: its document declares no security at all."""
    server = _start(tiny_model_dir, tmp_path, image_host, keyed=False)
    try:
        yield Service(server, image_host, keyed=False)
    finally:
        server.stop()
    assert "Traceback" not in server.output()
