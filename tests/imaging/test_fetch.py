from __future__ import annotations

import asyncio
import gzip
import ipaddress
import os
import socket
import time
import zlib
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler
from typing import Any

import pytest

from app.core.errors import ImageFetchFailed, ImageTooLarge, UrlNotAllowed
from app.imaging import fetch as fetch_mod
from app.imaging.fetch import FetchLimits, ImageFetcher, is_public_address
from tests.httpserver import (
    LocalServer,
    Route,
    body,
    chunked,
    drip,
    lying_length,
    redirect,
    serve,
)
from tests.images import encode, pattern
from tests.reliability.hostile_images import gzip_layers

JPEG = encode(pattern(64, 64), "JPEG")


@pytest.fixture
def server() -> Iterator[LocalServer]:
    with serve({"/img.jpg": body(JPEG)}) as s:
        yield s


def _fetcher(**limits: object) -> ImageFetcher:
    return ImageFetcher(FetchLimits(**limits))  # type: ignore[arg-type]


async def _fetch(fetcher: ImageFetcher, url: str) -> bytes:
    try:
        return await fetcher.fetch(url)
    finally:
        await fetcher.aclose()


@pytest.fixture
def trusted_127_0_0_2(monkeypatch: pytest.MonkeyPatch) -> None:
    """Treat 127.0.0.2 (still loopback) as the one 'public' address, to test redirects and
    name resolution without leaving the machine; everything else keeps the real rule."""
    real = fetch_mod.is_public_address
    monkeypatch.setattr(
        fetch_mod,
        "is_public_address",
        lambda ip: ip == ipaddress.ip_address("127.0.0.2") or real(ip),
    )


class TestAddressRule:
    @pytest.mark.parametrize(
        "address",
        [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "224.0.0.1",
            "255.255.255.255",
            "::1",
            "fc00::1",
            "fe80::1",
            "::ffff:127.0.0.1",
            "::ffff:10.0.0.1",
            "::127.0.0.1",
            "64:ff9b::7f00:1",
            "2002:7f00:1::",
            "2001::1",
            "ff02::1",
            "::",
        ],
    )
    def test_non_public_addresses_are_refused(self, address: str) -> None:
        assert not is_public_address(ipaddress.ip_address(address))

    @pytest.mark.parametrize("address", ["8.8.8.8", "1.1.1.1", "2606:4700:4700::1111"])
    def test_public_addresses_pass(self, address: str) -> None:
        assert is_public_address(ipaddress.ip_address(address))


class TestPrivateTargets:
    @pytest.mark.parametrize(
        "host",
        [
            "127.0.0.1",
            "localhost",
            "2130706433",
            "0x7f000001",
            "[::ffff:127.0.0.1]",
            "127.1",
            "0177.0.0.1",
        ],
    )
    async def test_loopback_spellings_never_connect(self, server: LocalServer, host: str) -> None:
        with pytest.raises(UrlNotAllowed) as info:
            await _fetch(_fetcher(), f"http://{host}:{server.port}/img.jpg")
        assert server.connections == 0
        assert "127.0.0.1" not in info.value.message  # the refusal reveals no address

    async def test_redirect_to_a_private_address_is_refused(
        self, server: LocalServer, trusted_127_0_0_2: None
    ) -> None:
        with serve({"/r": redirect(server.url("/img.jpg"))}, host="127.0.0.2") as public:
            with pytest.raises(UrlNotAllowed):
                await _fetch(_fetcher(), public.url("/r"))
            assert public.connections == 1
        assert server.connections == 0

    async def test_allow_private_urls_lifts_the_rule(self, server: LocalServer) -> None:
        data = await _fetch(_fetcher(allow_private=True), server.url("/img.jpg"))
        assert data == JPEG


class TestUrlShape:
    @pytest.mark.parametrize(
        "url",
        [
            "ftp://example.com/a.jpg",
            "file:///etc/passwd",
            "gopher://x/",
            "http://",
            "not a url",
            "http://user:pass@example.com/a.jpg",
            "http://user@example.com/a.jpg",
            "http://example.com:99999/a.jpg",
        ],
    )
    async def test_refused_without_network(self, url: str) -> None:
        with pytest.raises(UrlNotAllowed):
            await _fetch(_fetcher(), url)


class TestConnectsToTheCheckedAddress:
    async def test_resolves_once_and_sends_the_name_as_host(
        self, monkeypatch: pytest.MonkeyPatch, trusted_127_0_0_2: None
    ) -> None:
        calls: list[str] = []
        answers = iter(["127.0.0.2", "127.0.0.1"])  # a rebinding DNS: second answer private

        def fake_getaddrinfo(host, port, **_):  # type: ignore[no-untyped-def]
            calls.append(host)
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (next(answers), port))]

        fetcher = _fetcher()
        fetcher.getaddrinfo = fake_getaddrinfo
        with serve({"/img.jpg": body(JPEG)}, host="127.0.0.2") as public:
            data = await _fetch(fetcher, f"http://images.example:{public.port}/img.jpg")
        assert data == JPEG
        assert calls == ["images.example"]
        assert public.requests[0]["headers"]["Host"] == f"images.example:{public.port}"


class TestRedirects:
    async def test_followed_up_to_the_limit(self) -> None:
        with serve({}) as s:
            s.routes.update(
                {
                    "/a": redirect(s.url("/b")),
                    "/b": redirect(s.url("/c")),
                    "/c": redirect(s.url("/d")),
                    "/d": redirect(s.url("/img.jpg")),
                    "/img.jpg": body(JPEG),
                }
            )
            assert await _fetch(_fetcher(allow_private=True), s.url("/b")) == JPEG
            with pytest.raises(UrlNotAllowed, match="more than 3 times"):
                await _fetch(_fetcher(allow_private=True), s.url("/a"))


class TestLimits:
    async def test_slow_drip_hits_the_total_timeout(self) -> None:
        with serve({"/slow": drip(b"x" * 100, every_s=0.2, total_chunks=100)}) as s:
            started = time.perf_counter()
            with pytest.raises(ImageFetchFailed, match="timed out"):
                await _fetch(_fetcher(allow_private=True, total_timeout_s=1.0), s.url("/slow"))
            assert time.perf_counter() - started < 3

    async def test_declared_length_over_the_cap_is_refused_before_reading(self) -> None:
        with serve({"/big": lying_length(10_000_000, b"x" * 1000)}) as s:
            with pytest.raises(ImageTooLarge):
                await _fetch(_fetcher(allow_private=True, max_bytes=100_000), s.url("/big"))

    async def test_chunked_body_over_the_cap_is_cut_while_streaming(self) -> None:
        with serve({"/big": chunked(5_000_000)}) as s:
            with pytest.raises(ImageTooLarge):
                await _fetch(_fetcher(allow_private=True, max_bytes=100_000), s.url("/big"))

    async def test_lying_small_length_never_yields_more_than_declared(self) -> None:
        with serve({"/lie": lying_length(100, b"y" * 2_000_000)}) as s:
            data = await _fetch(_fetcher(allow_private=True, max_bytes=100_000), s.url("/lie"))
        assert len(data) == 100

    async def test_http_errors(self, server: LocalServer) -> None:
        with pytest.raises(ImageFetchFailed, match="HTTP 404"):
            await _fetch(_fetcher(allow_private=True), server.url("/missing"))


class TestHostAllowlist:
    async def test_only_listed_hosts_are_fetched(self, server: LocalServer) -> None:
        allowed = _fetcher(allow_private=True, allowed_hosts=("127.0.0.1",))
        assert await _fetch(allowed, server.url("/img.jpg")) == JPEG
        with pytest.raises(UrlNotAllowed, match="allowlist"):
            await _fetch(
                _fetcher(allow_private=True, allowed_hosts=("*.example.com",)),
                server.url("/img.jpg"),
            )
        assert server.connections == 1

    def test_wildcards(self) -> None:
        limits = FetchLimits(allowed_hosts=("*.cdn.example", "img.shop.example"))
        assert limits.host_allowed("a.cdn.example")
        assert limits.host_allowed("img.shop.example")
        assert not limits.host_allowed("cdn.example.evil")
        assert not limits.host_allowed("shop.example")


class TestProxyEnvironmentIsIgnored:
    async def test_proxy_gets_no_connection(
        self, server: LocalServer, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        with serve({}) as proxy:
            for var in ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "ALL_PROXY"):
                monkeypatch.setenv(var, proxy.url())
            monkeypatch.delenv("NO_PROXY", raising=False)
            monkeypatch.delenv("no_proxy", raising=False)
            data = await _fetch(_fetcher(allow_private=True), server.url("/img.jpg"))
        assert data == JPEG
        assert proxy.connections == 0


def encoded(data: bytes, coding: str) -> Route:
    """Serve `data` as is, labelled with the Content-Encoding `coding`."""

    def route(h: BaseHTTPRequestHandler) -> None:
        h.send_response(200)
        h.send_header("Content-Type", "image/jpeg")
        h.send_header("Content-Encoding", coding)
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        h.wfile.write(data)

    return route


class TestContentEncoding:
    async def test_stacked_gzip_bomb_is_refused_without_inflating(self) -> None:
        bomb = gzip_layers(1 << 30, 3)  # 1 GiB of zeros in three gzip layers
        assert len(bomb) < 10_000
        with serve({"/bomb": encoded(bomb, "gzip, gzip, gzip")}) as s:
            started = time.perf_counter()
            with pytest.raises(ImageFetchFailed, match="3 content codings"):
                await _fetch(_fetcher(allow_private=True), s.url("/bomb"))
        assert time.perf_counter() - started < 1.0

    async def test_one_gzip_layer_is_inflated_up_to_the_cap(self) -> None:
        bomb = gzip_layers(1 << 30, 1)  # 1 GiB of zeros, ~1 MB on the wire
        with serve({"/bomb": encoded(bomb, "gzip")}) as s:
            started = time.perf_counter()
            with pytest.raises(ImageTooLarge):
                await _fetch(_fetcher(allow_private=True, max_bytes=2_000_000), s.url("/bomb"))
        assert time.perf_counter() - started < 1.0

    @pytest.mark.parametrize("coding", ["gzip", "deflate", "x-gzip", "identity"])
    async def test_a_compressed_image_arrives_intact(self, coding: str) -> None:
        payload = {
            "gzip": gzip.compress(JPEG),
            "x-gzip": gzip.compress(JPEG),
            "deflate": zlib.compress(JPEG),
            "identity": JPEG,
        }[coding]
        with serve({"/img": encoded(payload, coding)}) as s:
            assert await _fetch(_fetcher(allow_private=True), s.url("/img")) == JPEG
            assert s.requests[0]["headers"]["Accept-Encoding"] == "identity"

    @pytest.mark.parametrize(
        ("coding", "payload", "error"),
        [
            ("br", b"\x1b\x00", "unsupported content coding"),
            ("gzip", b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\x03" + b"\xff" * 64, "corrupt"),
            ("gzip", gzip.compress(JPEG)[:-20], "truncated"),
            ("gzip", gzip.compress(JPEG) + gzip.compress(JPEG), "trailing data"),
        ],
    )
    async def test_bad_codings_are_refused(self, coding: str, payload: bytes, error: str) -> None:
        with serve({"/img": encoded(payload, coding)}) as s:
            with pytest.raises(ImageFetchFailed, match=error):
                await _fetch(_fetcher(allow_private=True), s.url("/img"))

    async def test_codings_can_be_refused_altogether(self) -> None:
        with serve({"/img": encoded(gzip.compress(JPEG), "gzip")}) as s:
            with pytest.raises(ImageFetchFailed, match="at most 0"):
                await _fetch(_fetcher(allow_private=True, content_codings=0), s.url("/img"))

    async def test_the_wire_is_capped_too(self) -> None:
        payload = gzip.compress(os.urandom(300_000))  # incompressible: wire > cap
        with serve({"/img": encoded(payload, "gzip")}) as s:
            with pytest.raises(ImageTooLarge):
                await _fetch(_fetcher(allow_private=True, max_bytes=200_000), s.url("/img"))


def _hanging_resolver(seconds: float) -> Callable[..., list[Any]]:
    """A resolver that behaves like a DNS server that never answers (for `seconds`)."""

    def getaddrinfo(*_: object, **__: object) -> list[Any]:
        time.sleep(seconds)
        raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")

    return getaddrinfo


class TestHangingDns:
    async def test_a_lookup_that_never_answers_times_out(self) -> None:
        fetcher = _fetcher(dns_timeout_s=0.3)
        fetcher.getaddrinfo = _hanging_resolver(2)
        started = time.perf_counter()
        with pytest.raises(ImageFetchFailed, match="did not resolve in 0.3 s"):
            await _fetch(fetcher, "http://never-answers.example/a.jpg")
        assert time.perf_counter() - started < 1.0

    async def test_hanging_lookups_leave_the_default_executor_free(self) -> None:
        fetcher = _fetcher(dns_timeout_s=0.5, dns_threads=2)
        fetcher.getaddrinfo = _hanging_resolver(2)
        loop = asyncio.get_running_loop()
        tasks = [
            asyncio.create_task(fetcher.fetch(f"http://h{i}.example/a.jpg")) for i in range(12)
        ]
        await asyncio.sleep(0.05)
        started = time.perf_counter()
        await loop.run_in_executor(None, time.sleep, 0)  # what a database call waits for
        waited = time.perf_counter() - started
        results = await asyncio.gather(*tasks, return_exceptions=True)
        await fetcher.aclose()
        assert waited < 0.2
        assert all(isinstance(r, ImageFetchFailed) for r in results)


class TestMalformedUrls:
    @pytest.mark.parametrize(
        "url",
        [
            "http://127.0.0.1\x00.cdn.example.com/a.jpg",
            "http://cdn.example.com\x00/a.jpg",
            "http://cdn.example.com/a\r\nX-Injected: 1",
            "http://cdn.example.com/\x7f",
            "http://cdn.\x85example.com/",
        ],
    )
    async def test_control_characters_are_refused_before_any_lookup(self, url: str) -> None:
        fetcher = _fetcher(allowed_hosts=("*.example.com",))
        fetcher.getaddrinfo = _hanging_resolver(5)  # must never be asked
        with pytest.raises(UrlNotAllowed, match="control characters"):
            await _fetch(fetcher, url)

    @pytest.mark.parametrize(
        "location", ["http:foo", "data:image/png;base64,AAAA", "about:blank", "http://xn--/"]
    )
    async def test_malformed_redirects_are_refused(self, location: str) -> None:
        with serve({"/r": redirect(location)}) as s:
            with pytest.raises(UrlNotAllowed, match="malformed"):
                await _fetch(_fetcher(allow_private=True), s.url("/r"))
