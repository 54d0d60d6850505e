"""In-process token buckets for per-client rate limits, with a bounded table of clients."""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

from app.core.config import RateLimitSettings


class TokenBuckets:
    """Per-identity token buckets (in-process; each replica limits its own traffic).

    The table holds at most `max_identities` buckets, least recently used first out, so a
    client that invents identities cannot grow memory; an evicted identity starts again
    with a full bucket, which costs nothing to a client that has a bucket to spare.
    """

    def __init__(self, per_minute: float, burst: int, max_identities: int = 100_000) -> None:
        self.rate = per_minute / 60.0
        self.burst = float(burst)
        self.max_identities = max_identities
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._buckets)

    def _tokens(self, identity: str, now: float) -> float:
        tokens, last = self._buckets.get(identity, (self.burst, now))
        return min(self.burst, tokens + (now - last) * self.rate)

    def take(self, identity: str) -> float:
        """0 when allowed (a token is spent), else the seconds until a token is available."""
        now = time.monotonic()
        with self._lock:
            tokens = self._tokens(identity, now)
            allowed = tokens >= 1.0
            self._buckets[identity] = (tokens - 1.0 if allowed else tokens, now)
            self._buckets.move_to_end(identity)
            while len(self._buckets) > self.max_identities:
                self._buckets.popitem(last=False)
            return 0.0 if allowed else (1.0 - tokens) / self.rate

    def peek(self, identity: str) -> float:
        """Like `take` without spending: 0 when a token is available, else the wait."""
        now = time.monotonic()
        with self._lock:
            if identity not in self._buckets:
                return 0.0
            tokens = self._tokens(identity, now)
            return 0.0 if tokens >= 1.0 else (1.0 - tokens) / self.rate


@dataclass
class ClientLimits:
    """The HTTP layer's limiters: requests per client, failed authentications per address.

    Both are optional (a rate of 0 turns one off) and both bound their tables by
    `max_clients`.
    """

    requests: TokenBuckets | None
    auth_failures: TokenBuckets | None

    @classmethod
    def from_settings(cls, settings: RateLimitSettings) -> ClientLimits:
        requests = None
        if settings.per_minute > 0:
            requests = TokenBuckets(settings.per_minute, settings.burst, settings.max_clients)
        failures = None
        if settings.auth_failures_per_minute > 0:
            failures = TokenBuckets(
                settings.auth_failures_per_minute,
                settings.auth_failures_burst,
                settings.max_clients,
            )
        return cls(requests=requests, auth_failures=failures)
