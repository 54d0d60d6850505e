"""API-key checks: constant-time comparison against the configured keys."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Security
from fastapi.security import APIKeyHeader

from app.api.deps import StateDep
from app.core.errors import Unauthorized

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
