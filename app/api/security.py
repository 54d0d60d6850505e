"""API-key checks: constant-time comparison against the configured keys."""

from __future__ import annotations

import hashlib
import hmac
import math
from typing import Annotated

from fastapi import Depends, Request, Security
from fastapi.security import APIKeyHeader

from app.api.deps import StateDep
from app.core.errors import RateLimited, Unauthorized

api_key_header = APIKeyHeader(
    name="X-API-Key",
    auto_error=False,
    description="Required on write routes when the service has VS_API_KEYS set.",
)


def key_matches(candidate: str, keys: list[str]) -> bool:
    """Compare against every key in constant time (no early exit on a match)."""
    found = False
    for key in keys:
        found |= hmac.compare_digest(candidate.encode(), key.encode())
    return found


def require_write_key(
    state: StateDep, api_key: Annotated[str | None, Security(api_key_header)] = None
) -> str | None:
    """The caller's key (None when writes are open); 401 when keys are set and it is wrong."""
    keys = state.write_keys
    if not keys:
        return None
    if not api_key or not key_matches(api_key, keys):
        raise Unauthorized("A valid X-API-Key header is required for this operation.")
    return api_key


WriteKeyDep = Annotated[str | None, Depends(require_write_key)]


def require_read_key(
    state: StateDep, api_key: Annotated[str | None, Security(api_key_header)] = None
) -> str | None:
    """With VS_API_KEYS_READ set, reads need a read or write key; otherwise they are open."""
    keys = state.read_keys
    if not keys:
        return api_key
    if not api_key or not key_matches(api_key, keys):
        raise Unauthorized("A valid X-API-Key header is required to read.")
    return api_key


ReadKeyDep = Annotated[str | None, Depends(require_read_key)]


def rate_limit(
    request: Request,
    state: StateDep,
    api_key: Annotated[str | None, Security(api_key_header)] = None,
) -> None:
    """429 with Retry-After past the key's budget. The identity is the API key, or the
    connection's address when there is none; X-Forwarded-For is never trusted for it."""
    buckets = state.rate_limits
    if buckets is None:
        return
    if api_key:
        identity = "key:" + hashlib.sha256(api_key.encode()).hexdigest()
    else:
        identity = "addr:" + (request.client.host if request.client else "unknown")
    wait = buckets.take(identity)
    if wait > 0:
        retry = max(1, math.ceil(wait))
        raise RateLimited(
            f"Rate limit exceeded; retry in {retry} s.", headers={"Retry-After": str(retry)}
        )


RateLimitDep = Depends(rate_limit)
