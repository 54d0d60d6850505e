"""Download images from client-supplied URLs without becoming an SSRF proxy.

Rules, applied to the first URL and to every redirect hop:

- http and https only, no credentials in the URL, at most `max_redirects` hops;
- the host is resolved once, every address must be globally routable (no loopback,
  private, link-local incl. 169.254.169.254, CGNAT, ULA, multicast, unspecified, and no
  IPv6 forms that embed such an IPv4 address: mapped, compatible, NAT64, 6to4, Teredo);
- the connection goes to exactly the address that was checked (the URL's host travels in
  the Host header and TLS SNI), so DNS rebinding cannot swap it;
- control characters anywhere in the URL are refused (a NUL in the host would pass the
  allowlist, which sees the whole string, and then cut the name the resolver sees);
- proxy environment variables are ignored; connect and total timeouts; host names
  resolve on a small pool of their own with a timeout, so lookups that never answer
  cannot occupy the executor that database calls share;
- the body is read raw and capped while streaming, whatever Content-Length says, both
  on the wire and after undoing its Content-Encoding: we ask for identity, accept at most
  `content_codings` gzip/deflate layers (each inflated with a cap), refuse the rest.

Every refusal is the same `UrlNotAllowed` without the resolved address in it.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import Any
from urllib.parse import urljoin, urlsplit

import httpx

from app.core.errors import ImageFetchFailed, ImageTooLarge, UrlNotAllowed

LOG = logging.getLogger(__name__)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# One answer for a name that does not resolve and one that resolves to a private address:
# two answers would tell a client which internal names exist.
_NOT_ALLOWED = (
    "The image URL is not allowed: it must be an http(s) URL whose host resolves to public "
    "addresses only."
)
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_NAT64_LOCAL = ipaddress.ip_network("64:ff9b:1::/48")
_SIX_TO_FOUR = ipaddress.ip_network("2002::/16")
_TEREDO = ipaddress.ip_network("2001::/32")
_REDIRECTS = {301, 302, 303, 307, 308}
_MALFORMED_REDIRECT = "The image URL redirected to a malformed URL."
_INFLATABLE = frozenset({"gzip", "x-gzip", "deflate"})


def is_public_address(ip: IPAddress) -> bool:
    """True only for globally routable unicast addresses (embedded IPv4 checked too)."""
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return is_public_address(ip.ipv4_mapped)
        if ip in _NAT64 or ip in _NAT64_LOCAL or ip in _SIX_TO_FOUR or ip in _TEREDO:
            return False
        # IPv4-compatible (::a.b.c.d, deprecated) addresses
        if int(ip) >> 32 == 0:
            return False
    return bool(
        ip.is_global
        and not ip.is_multicast
        and not ip.is_unspecified
        and not ip.is_reserved
        and not ip.is_loopback
        and not ip.is_link_local
        and not ip.is_private
    )


@dataclass(frozen=True)
class FetchLimits:
    max_bytes: int = 20 * 1024 * 1024
    connect_timeout_s: float = 3.0
    total_timeout_s: float = 10.0
    max_redirects: int = 3
    allow_private: bool = False
    allowed_hosts: tuple[str, ...] = ()
    content_codings: int = 1
    dns_timeout_s: float = 2.0
    dns_threads: int = 4

    def host_allowed(self, host: str) -> bool:
        """An empty allowlist admits every host; `*.x.com` matches subdomains of x.com."""
        if not self.allowed_hosts:
            return True
        for pattern in self.allowed_hosts:
            if pattern.startswith("*.") and host.endswith(pattern[1:]):
                return True
            if host == pattern:
                return True
        return False


class ImageFetcher:
    """SSRF-safe downloader; one per process (it owns a connection-less httpx client)."""

    def __init__(self, limits: FetchLimits) -> None:
        self.limits = limits
        self._dns_pool = ThreadPoolExecutor(limits.dns_threads, thread_name_prefix="image-dns")
        # The blocking resolver; an attribute so tests can make it hang like a dead server.
        self.getaddrinfo: Callable[..., list[Any]] = socket.getaddrinfo
        self._client = httpx.AsyncClient(
            trust_env=False,  # ignore HTTP(S)_PROXY and friends
            follow_redirects=False,
            timeout=httpx.Timeout(
                limits.total_timeout_s, connect=limits.connect_timeout_s, pool=1.0
            ),
            limits=httpx.Limits(max_keepalive_connections=0),
            headers={
                "User-Agent": "vsearch-image-fetcher/1",
                "Accept": "image/*",
                "Accept-Encoding": "identity",
            },
        )

    async def aclose(self) -> None:
        await self._client.aclose()
        self._dns_pool.shutdown(wait=False, cancel_futures=True)

    async def fetch(self, url: str) -> bytes:
        """Download `url` and return its bytes.

        Raises:
            UrlNotAllowed: The URL or one of its redirects breaks the rules above.
            ImageTooLarge: The body is larger than the cap.
            ImageFetchFailed: Network error, timeout, or a non-2xx answer.
        """
        try:
            async with asyncio.timeout(self.limits.total_timeout_s):
                return await self._fetch(url)
        except TimeoutError:
            raise ImageFetchFailed("Downloading the image URL timed out.") from None

    async def _fetch(self, url: str) -> bytes:
        current = url
        for _hop in range(self.limits.max_redirects + 1):
            host, port, scheme = _check_url(current)
            if not self.limits.host_allowed(host):
                raise UrlNotAllowed("The image URL's host is not on this service's allowlist.")
            address = await self._resolve(host, port)
            response = await self._request(current, host, port, scheme, address)
            try:
                if response.status_code in _REDIRECTS:
                    location = response.headers.get("location")
                    if not location:
                        raise ImageFetchFailed("The image URL redirected without a Location.")
                    try:
                        current = urljoin(current, location)
                    except ValueError:
                        raise UrlNotAllowed(_MALFORMED_REDIRECT) from None
                    continue
                if not 200 <= response.status_code < 300:
                    raise ImageFetchFailed(f"The image URL answered HTTP {response.status_code}.")
                return await self._read_capped(response)
            finally:
                await response.aclose()
        raise UrlNotAllowed(
            f"The image URL redirected more than {self.limits.max_redirects} times."
        )

    async def _resolve(self, host: str, port: int) -> IPAddress:
        try:
            literal: IPAddress | None = ipaddress.ip_address(host)
        except ValueError:
            literal = None
        if literal is not None:
            candidates = [literal]
        else:
            lookup = partial(self.getaddrinfo, host, port, type=socket.SOCK_STREAM)
            future = asyncio.get_running_loop().run_in_executor(self._dns_pool, lookup)
            try:
                infos = await asyncio.wait_for(future, self.limits.dns_timeout_s)
            except TimeoutError:
                raise ImageFetchFailed(
                    f"The image URL's host name did not resolve in {self.limits.dns_timeout_s:g} s."
                ) from None
            except (OSError, UnicodeError, ValueError):
                raise UrlNotAllowed(_NOT_ALLOWED) from None
            candidates = [ipaddress.ip_address(str(info[4][0]).split("%", 1)[0]) for info in infos]
        if not candidates:
            raise UrlNotAllowed(_NOT_ALLOWED)
        if not self.limits.allow_private and not all(is_public_address(ip) for ip in candidates):
            # One private answer is enough to refuse: we will not pick and choose.
            raise UrlNotAllowed(_NOT_ALLOWED)
        return candidates[0]

    async def _request(
        self, url: str, host: str, port: int, scheme: str, address: IPAddress
    ) -> httpx.Response:
        parts = urlsplit(url)
        ip_host = f"[{address}]" if address.version == 6 else str(address)
        target = parts._replace(netloc=f"{ip_host}:{port}").geturl()
        default_port = 443 if scheme == "https" else 80
        host_header = host if port == default_port else f"{host}:{port}"
        if ":" in host and not host.startswith("["):
            host_header = f"[{host}]" if port == default_port else f"[{host}]:{port}"
        try:
            request = self._client.build_request(
                "GET",
                target,
                headers={"Host": host_header},
                extensions={"sni_hostname": host} if scheme == "https" else {},
            )
        except (httpx.InvalidURL, ValueError, UnicodeError):
            raise UrlNotAllowed("The image URL is malformed.") from None
        try:
            return await self._client.send(request, stream=True)
        except (httpx.InvalidURL, UnicodeError):
            # httpx parses a redirect's Location while receiving the answer, even when it
            # does not follow redirects; `http:foo` or a bad IDNA label fail there.
            raise UrlNotAllowed(_MALFORMED_REDIRECT) from None
        except httpx.TimeoutException:
            raise ImageFetchFailed("Downloading the image URL timed out.") from None
        except httpx.HTTPError as exc:
            LOG.info("image fetch failed: %s", type(exc).__name__)
            raise ImageFetchFailed("The image URL could not be downloaded.") from None

    async def _read_capped(self, response: httpx.Response) -> bytes:
        cap = self.limits.max_bytes
        too_large = f"The image at the URL is larger than {cap} bytes."
        declared = response.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > cap:
            raise ImageTooLarge(too_large)
        inflaters = [_Inflater(cap, too_large) for _ in self._codings(response)]
        chunks: list[bytes] = []
        wire = size = 0
        try:
            # Raw bytes: httpx would otherwise undo every coding layer before we count.
            async for raw in response.aiter_raw():
                wire += len(raw)
                if wire > cap:
                    raise ImageTooLarge(too_large)
                chunk = raw
                for inflater in inflaters:
                    chunk = inflater.feed(chunk)
                size += len(chunk)
                if size > cap:
                    raise ImageTooLarge(too_large)
                chunks.append(chunk)
        except httpx.TimeoutException:
            raise ImageFetchFailed("Downloading the image URL timed out.") from None
        except httpx.HTTPError:
            raise ImageFetchFailed("The image URL's body could not be read completely.") from None
        tail = b""
        for inflater in inflaters:
            tail = inflater.finish(tail)
        if size + len(tail) > cap:
            raise ImageTooLarge(too_large)
        chunks.append(tail)
        return b"".join(chunks)

    def _codings(self, response: httpx.Response) -> list[str]:
        """The Content-Encoding layers to undo, outermost first, or ImageFetchFailed."""
        codings = [
            c.strip().lower()
            for value in response.headers.get_list("content-encoding")
            for c in value.split(",")
        ]
        codings = [c for c in codings if c not in ("", "identity")]
        if len(codings) > self.limits.content_codings:
            raise ImageFetchFailed(
                f"The image URL answered with {len(codings)} content codings; at most "
                f"{self.limits.content_codings} are accepted."
            )
        for coding in codings:
            if coding not in _INFLATABLE:
                raise ImageFetchFailed(
                    f"The image URL answered with an unsupported content coding ({coding[:32]})."
                )
        return codings[::-1]


class _Inflater:
    """One gzip/deflate layer undone incrementally, never producing more than `cap` bytes."""

    def __init__(self, cap: int, too_large: str) -> None:
        self._inflate = zlib.decompressobj(32 + zlib.MAX_WBITS)  # gzip or zlib header
        self._cap = cap
        self._too_large = too_large
        self._produced = 0

    def feed(self, data: bytes) -> bytes:
        if not data:
            return b""
        if self._inflate.eof:
            raise ImageFetchFailed("The image URL's compressed body has trailing data.")
        try:
            out = self._inflate.decompress(data, self._cap - self._produced + 1)
        except zlib.error:
            raise ImageFetchFailed("The image URL's compressed body is corrupt.") from None
        self._produced += len(out)
        if self._produced > self._cap:
            raise ImageTooLarge(self._too_large)
        if self._inflate.unused_data:
            raise ImageFetchFailed("The image URL's compressed body has trailing data.")
        return out

    def finish(self, data: bytes) -> bytes:
        out = self.feed(data)
        try:
            rest = self._inflate.flush(self._cap - self._produced + 1)
        except zlib.error:
            raise ImageFetchFailed("The image URL's compressed body is corrupt.") from None
        self._produced += len(rest)
        if self._produced > self._cap:
            raise ImageTooLarge(self._too_large)
        if not self._inflate.eof:
            raise ImageFetchFailed("The image URL's compressed body is truncated.")
        return out + rest


def _check_url(url: str) -> tuple[str, int, str]:
    """(host, port, scheme) of an acceptable URL, or UrlNotAllowed."""
    url = url.strip()
    if any(ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F for c in url):
        raise UrlNotAllowed("The image URL must not contain control characters.")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise UrlNotAllowed(_NOT_ALLOWED) from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https") or not parts.hostname:
        raise UrlNotAllowed(_NOT_ALLOWED)
    if parts.username is not None or parts.password is not None:
        raise UrlNotAllowed("The image URL must not contain credentials.")
    host = parts.hostname.rstrip(".").lower()
    if not host:
        raise UrlNotAllowed(_NOT_ALLOWED)
    return host, port or (443 if scheme == "https" else 80), scheme
