"""In-process token buckets for per-client rate limits."""

from __future__ import annotations

import threading
import time


class TokenBuckets:
    """Per-identity token buckets (in-process; each replica limits its own traffic)."""

    def __init__(self, per_minute: float, burst: int, max_identities: int = 100_000) -> None:
        self.rate = per_minute / 60.0
        self.burst = float(burst)
        self.max_identities = max_identities
        self._buckets: dict[str, tuple[float, float]] = {}
        self._lock = threading.Lock()

    def take(self, identity: str) -> float:
        """0 when allowed, else the seconds until a token is available."""
        now = time.monotonic()
        with self._lock:
            tokens, last = self._buckets.get(identity, (self.burst, now))
            tokens = min(self.burst, tokens + (now - last) * self.rate)
            if tokens >= 1.0:
                self._buckets[identity] = (tokens - 1.0, now)
                if len(self._buckets) > self.max_identities:
                    self._buckets.pop(next(iter(self._buckets)))
                return 0.0
            self._buckets[identity] = (tokens, now)
            return (1.0 - tokens) / self.rate
