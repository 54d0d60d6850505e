"""Who a client is and whether it may: API-key checks (constant-time), per-client rate
limits keyed by a valid key or the client's address, and a limit on failed keys per
address so keys cannot be guessed at line speed.

Which routes stay open when read keys are set (`VS_API_KEYS_READ`):

* `/health` and `/ready` stay open for probes; `/ready` then shows only its status and
  checks (the model and index details need a read key).
* `/docs`, `/redoc` and `/openapi.json` stay open: they describe the API, not the data
  (turn them off with `VS_DOCS=false`).
* `/metrics` needs a read key, as `X-API-Key` or `Authorization: Bearer <key>` (what
  Prometheus' `authorization` scrape option sends).

A key named in `VS_API_KEY_SCOPES` is confined to its product sets (`caller_scope`; what
that means for each route is in `app.catalogue.scope`); catalogue-wide operations refuse
it (`require_unscoped`).
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import math
from typing import Annotated

from fastapi import Depends, Request, Security
from fastapi.security import APIKeyHeader

from app.api.deps import StateDep
from app.api.state import ApiState
from app.catalogue.scope import Scope
from app.core.errors import Forbidden, RateLimited, Unauthorized

api_key_header = APIKeyHeader(
    name="X-API-Key",
    auto_error=False,
    description="Required on write routes when the service has VS_API_KEYS set.",
)


def client_address(request: Request) -> str:
    """The client's address as the limits see it: IPv6 clients by their /64 (one host
    usually owns a whole /64), IPv4-mapped addresses as IPv4."""
    host = request.client.host if request.client else ""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return host[:64] or "unknown"
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


def key_matches(candidate: str, keys: list[str]) -> bool:
    """Compare against every key in constant time (no early exit on a match)."""
    found = False
    for key in keys:
        found |= hmac.compare_digest(candidate.encode(), key.encode())
    return found


def _retry_after(wait: float) -> int:
    return max(1, math.ceil(wait))


def authenticate(
    request: Request, state: ApiState, api_key: str | None, keys: list[str], message: str
) -> None:
    """401 unless `api_key` is one of `keys`; 429 while the client's address has spent
    its failed-authentication budget (whatever key it sends then, so a right guess is not
    told apart from a wrong one)."""
    failures = state.limits.auth_failures
    address = client_address(request)
    if api_key and failures is not None:
        wait = failures.peek(address)
        if wait > 0:
            retry = _retry_after(wait)
            raise RateLimited(
                f"Too many failed authentications from this address; retry in {retry} s.",
                headers={"Retry-After": str(retry)},
            )
    if api_key and key_matches(api_key, keys):
        return
    if api_key and failures is not None:
        failures.take(address)
    raise Unauthorized(message)


def require_write_key(
    request: Request,
    state: StateDep,
    api_key: Annotated[str | None, Security(api_key_header)] = None,
) -> str | None:
    """The caller's key (None when writes are open); 401 when keys are set and it is wrong."""
    keys = state.write_keys
    if not keys:
        return None
    authenticate(
        request, state, api_key, keys, "A valid X-API-Key header is required for this operation."
    )
    return api_key


WriteKeyDep = Annotated[str | None, Depends(require_write_key)]


def require_read_key(
    request: Request,
    state: StateDep,
    api_key: Annotated[str | None, Security(api_key_header)] = None,
) -> str | None:
    """With VS_API_KEYS_READ set, reads need a read or write key; otherwise they are open."""
    keys = state.read_keys
    if not keys:
        return api_key
    authenticate(request, state, api_key, keys, "A valid X-API-Key header is required to read.")
    return api_key


ReadKeyDep = Annotated[str | None, Depends(require_read_key)]


def require_metrics_key(
    request: Request,
    state: StateDep,
    api_key: Annotated[str | None, Security(api_key_header)] = None,
) -> None:
    """Reads-protected services protect /metrics too; Prometheus sends the key as
    `Authorization: Bearer <key>`, so that header is accepted as well."""
    keys = state.read_keys
    if not keys:
        return
    if not api_key:
        scheme, _, credentials = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer" and credentials.strip():
            api_key = credentials.strip()
    authenticate(request, state, api_key, keys, "A valid read key is required for metrics.")


def may_read(request: Request, state: StateDep) -> bool:
    """Whether the caller may see what reads show (never raises: for open routes that
    show more to a reader). The header is read directly, not declared as a security
    scheme, so the route stays documented as open."""
    keys = state.read_keys
    api_key = request.headers.get("x-api-key")
    return not keys or (api_key is not None and key_matches(api_key, keys))


MayReadDep = Annotated[bool, Depends(may_read)]


def rate_limit(
    request: Request,
    state: StateDep,
    api_key: Annotated[str | None, Security(api_key_header)] = None,
) -> None:
    """429 with Retry-After past the client's budget. The identity is the API key when it
    is a configured key, else the client's address: an invented key is not a new client.
    The address is the connection's, or the one a trusted proxy forwarded
    (`VS_TRUSTED_PROXIES`)."""
    buckets = state.limits.requests
    if buckets is None:
        return
    known = [*state.write_keys, *state.read_keys]
    if api_key and known and key_matches(api_key, known):
        identity = "key:" + hashlib.sha256(api_key.encode()).hexdigest()
    else:
        identity = "addr:" + client_address(request)
    wait = buckets.take(identity)
    if wait > 0:
        retry = _retry_after(wait)
        raise RateLimited(
            f"Rate limit exceeded; retry in {retry} s.", headers={"Retry-After": str(retry)}
        )


RateLimitDep = Depends(rate_limit)


def caller_scope(
    state: StateDep, api_key: Annotated[str | None, Security(api_key_header)] = None
) -> Scope:
    """The product sets the caller's key is confined to; None for an unscoped key (or no
    key, which the route's own key check allows only on a service whose scopes are off:
    scopes need keys on reads and writes). Every scoped key is compared, in constant
    time."""
    if not state.key_scopes or not api_key:
        return None
    found: Scope = None
    for key, sets in state.key_scopes.items():
        if hmac.compare_digest(api_key.encode(), key.encode()):
            found = sets
    return found


ScopeDep = Annotated[Scope, Depends(caller_scope)]


def require_unscoped(scope: ScopeDep) -> None:
    """403 for a key confined to product sets: the operation spans the whole catalogue."""
    if scope is not None:
        raise Forbidden(
            "This key is scoped to product sets; this operation spans the whole catalogue."
        )


UnscopedDep = Depends(require_unscoped)
