"""Every file of a corpus of broken and malicious images gets a 4xx in bounded time and
memory, never a 500 or a hung worker, while the service keeps answering others."""

from __future__ import annotations

import httpx
import pytest

from tests.reliability.hostile_images import run_corpus

MAX_SECONDS = 5.0
MAX_PEAK_GROWTH_MB = 600


@pytest.mark.slow
async def test_hostile_corpus_through_search_and_ingest(client: httpx.AsyncClient) -> None:
    report = await run_corpus(client)

    assert report["unexpected"] == [], {n: report["files"][n] for n in report["unexpected"]}
    assert report["max_seconds"] < MAX_SECONDS, report["files"]
    assert report["peak_memory_growth_mb"] < MAX_PEAK_GROWTH_MB
    assert report["health_probes"] > 10
    assert report["max_probe_ms"] < 2000
    # Still healthy afterwards.
    assert (await client.get("/ready")).status_code == 200
