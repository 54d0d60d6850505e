"""Download images from client-supplied URLs without becoming an SSRF proxy.

Rules, applied to the first URL and to every redirect hop:

- http and https only, no credentials in the URL, at most `max_redirects` hops;
- the host is resolved once, every address must be globally routable (no loopback,
  private, link-local incl. 169.254.169.254, CGNAT, ULA, multicast, unspecified, and no
  IPv6 forms that embed such an IPv4 address: mapped, compatible, NAT64, 6to4, Teredo);
- the connection goes to exactly the address that was checked (the URL's host travels in
  the Host header and TLS SNI), so DNS rebinding cannot swap it;
- proxy environment variables are ignored; connect and total timeouts; the body is
  capped while streaming, whatever Content-Length says.

Every refusal is the same `UrlNotAllowed` without the resolved address in it.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit

import httpx

from app.core.errors import ImageFetchFailed, ImageTooLarge, UrlNotAllowed

LOG = logging.getLogger(__name__)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

_NOT_ALLOWED = "The image URL is not allowed: it must be a public http(s) address."
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_NAT64_LOCAL = ipaddress.ip_network("64:ff9b:1::/48")
_SIX_TO_FOUR = ipaddress.ip_network("2002::/16")
_TEREDO = ipaddress.ip_network("2001::/32")
_REDIRECTS = {301, 302, 303, 307, 308}


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
                    current = urljoin(current, location)
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
            loop = asyncio.get_running_loop()
            try:
                infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            except (socket.gaierror, UnicodeError):
                raise ImageFetchFailed("The image URL's host name could not be resolved.") from None
            candidates = [ipaddress.ip_address(str(info[4][0]).split("%", 1)[0]) for info in infos]
        if not candidates:
            raise ImageFetchFailed("The image URL's host name could not be resolved.")
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
        request = self._client.build_request(
            "GET",
            target,
            headers={"Host": host_header},
            extensions={"sni_hostname": host} if scheme == "https" else {},
        )
        try:
            return await self._client.send(request, stream=True)
        except httpx.TimeoutException:
            raise ImageFetchFailed("Downloading the image URL timed out.") from None
        except httpx.HTTPError as exc:
            LOG.info("image fetch failed: %s", type(exc).__name__)
            raise ImageFetchFailed("The image URL could not be downloaded.") from None

    async def _read_capped(self, response: httpx.Response) -> bytes:
        cap = self.limits.max_bytes
        declared = response.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > cap:
            raise ImageTooLarge(f"The image at the URL is larger than {cap} bytes.")
        chunks: list[bytes] = []
        size = 0
        try:
            async for chunk in response.aiter_bytes():
                size += len(chunk)
                if size > cap:
                    raise ImageTooLarge(f"The image at the URL is larger than {cap} bytes.")
                chunks.append(chunk)
        except httpx.TimeoutException:
            raise ImageFetchFailed("Downloading the image URL timed out.") from None
        except httpx.HTTPError:
            raise ImageFetchFailed("The image URL's body could not be read completely.") from None
        return b"".join(chunks)


def _check_url(url: str) -> tuple[str, int, str]:
    """(host, port, scheme) of an acceptable URL, or UrlNotAllowed."""
    try:
        parts = urlsplit(url.strip())
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
