"""Every file of a corpus of broken and malicious images gets a 4xx in bounded time and
memory, never a 500 or a hung worker, while the service keeps answering others."""

from __future__ import annotations

import asyncio
import resource
import time

import httpx
import pytest

from tests.reliability.hostile_images import build_corpus

CORPUS = build_corpus()
MAX_SECONDS = 5.0
MAX_PEAK_GROWTH_MB = 600


@pytest.mark.slow
async def test_hostile_corpus_through_search_and_ingest(client: httpx.AsyncClient) -> None:
    probes: list[float] = []
    stop = asyncio.Event()

    async def probe() -> None:  # another client, asking throughout
        while not stop.is_set():
            t0 = time.perf_counter()
            assert (await client.get("/health")).status_code == 200
            probes.append(time.perf_counter() - t0)
            await asyncio.sleep(0.02)

    prober = asyncio.create_task(probe())
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    outcomes: dict[str, tuple[int, int, float]] = {}
    try:
        for n, (name, (data, _allowed)) in enumerate(CORPUS.items()):
            t0 = time.perf_counter()
            search = await client.post(
                "/search", files={"image": (f"{name}.jpg", data, "image/jpeg")}
            )
            ingest = await client.post(
                "/products",
                data={"id": f"h{n}"},
                files={"image": (f"{name}.jpg", data, "image/jpeg")},
            )
            elapsed = time.perf_counter() - t0
            result = ingest.json()["results"][0] if ingest.status_code == 200 else None
            ingest_status = (
                {"image_undecodable": 422, "image_too_large": 413}.get(result["error"]["code"], 500)
                if result and result["status"] == "failed"
                else ingest.status_code
            )
            outcomes[name] = (search.status_code, ingest_status, elapsed)
    finally:
        stop.set()
        await prober
    growth = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - peak_before

    for name, (search_status, ingest_status, elapsed) in outcomes.items():
        allowed = CORPUS[name][1]
        assert search_status in allowed, (name, search_status)
        assert ingest_status in allowed, (name, ingest_status)
        assert elapsed < MAX_SECONDS, (name, elapsed)
    assert growth < MAX_PEAK_GROWTH_MB, f"peak memory grew by {growth:.0f} MB"
    assert max(probes) < 2.0
    assert len(probes) > 10
    # Still healthy and searchable afterwards.
    assert (await client.get("/ready")).status_code == 200
