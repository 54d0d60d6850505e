"""Load and overload against a real `vsearch serve` on 127.0.0.1 (tiny model).

    python -m tests.reliability.load --seconds 20 --concurrency 1,4,16,64 [--json]

Phase 1, load: for each concurrency, clients loop for `--seconds` sending 80% searches
(multipart upload) and 20% ingests; p50/p95/p99 latency and throughput per concurrency.
Phase 2, overload: a server with a 4-image queue and batch size 1 gets `--overload`
concurrent searches; requests beyond the queue must get 503 (with Retry-After) quickly,
never a 500 or a timeout, and the server's memory must stay flat.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import random
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from tests.images import encode, pattern
from tests.server import Server, start_server

IMAGES = [encode(pattern(160, 120, seed=s), "JPEG", quality=85) for s in range(64)]


def _limits(concurrency: int) -> httpx.Limits:
    # Keep-alive expiry shorter than the server's (uvicorn: 5 s), as clients behind a load
    # balancer are configured: with equal expiries a pooled connection can be reused just
    # as the server closes it, and that race is the client's, not the service's.
    return httpx.Limits(
        max_connections=concurrency, max_keepalive_connections=concurrency, keepalive_expiry=2.0
    )


def _rss_mb(server: Server) -> float:
    with open(f"/proc/{server.process.pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def _percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {"p50_ms": 0.0, "p95_ms": 0.0, "p99_ms": 0.0}
    ms = np.asarray(values) * 1000
    return {f"p{p}_ms": round(float(np.percentile(ms, p)), 1) for p in (50, 95, 99)}


async def _client_loop(
    client: httpx.AsyncClient, deadline: float, ids: list[int], out: dict[str, Any]
) -> None:
    while time.perf_counter() < deadline:
        image = random.choice(IMAGES)
        t0 = time.perf_counter()
        try:
            if random.random() < 0.8:
                kind = "search"
                response = await client.post(
                    "/search", files={"image": ("q.jpg", image, "image/jpeg")}, data={"k": "10"}
                )
            else:
                kind = "ingest"
                ids[0] += 1
                payload = {
                    "products": [
                        {
                            "id": f"load-{ids[0]}",
                            "images": [{"data": base64.b64encode(image).decode()}],
                        }
                    ]
                }
                response = await client.post("/products", json=payload)
            status = response.status_code
        except httpx.TimeoutException:
            kind, status = "timeout", 0
        except httpx.TransportError:
            kind, status = "connection_error", -1
        out["latency"].setdefault(kind, []).append(time.perf_counter() - t0)
        out["status"][status] += 1


async def load_phase(url: str, concurrency: int, seconds: float, ids: list[int]) -> dict[str, Any]:
    out: dict[str, Any] = {"latency": {}, "status": Counter()}
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=_limits(concurrency)) as client:
        deadline = time.perf_counter() + seconds
        started = time.perf_counter()
        await asyncio.gather(
            *(_client_loop(client, deadline, ids, out) for _ in range(concurrency))
        )
        elapsed = time.perf_counter() - started
    total = sum(out["status"].values())
    return {
        "concurrency": concurrency,
        "requests": total,
        "requests_per_s": round(total / elapsed, 1),
        "search": {
            "count": len(out["latency"].get("search", [])),
            **_percentiles(out["latency"].get("search", [])),
        },
        "ingest": {
            "count": len(out["latency"].get("ingest", [])),
            **_percentiles(out["latency"].get("ingest", [])),
        },
        "statuses": {str(k): v for k, v in sorted(out["status"].items())},
    }


async def overload_phase(server: Server, concurrency: int, waves: int) -> dict[str, Any]:
    statuses: Counter[int] = Counter()
    rejected_latency: list[float] = []
    retry_after: set[str] = set()
    rss = [_rss_mb(server)]
    async with httpx.AsyncClient(
        base_url=server.url, timeout=60, limits=_limits(concurrency)
    ) as client:

        async def one() -> None:
            t0 = time.perf_counter()
            try:
                response = await client.post(
                    "/search", files={"image": ("q.jpg", random.choice(IMAGES), "image/jpeg")}
                )
            except httpx.TimeoutException:
                statuses[0] += 1
                return
            except httpx.TransportError:
                statuses[-1] += 1
                return
            statuses[response.status_code] += 1
            if response.status_code == 503:
                rejected_latency.append(time.perf_counter() - t0)
                retry_after.add(response.headers.get("retry-after", ""))

        for _ in range(waves):
            await asyncio.gather(*(one() for _ in range(concurrency)))
            rss.append(_rss_mb(server))
    return {
        "concurrency": concurrency,
        "waves": waves,
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "server_errors": sum(v for k, v in statuses.items() if k >= 500 and k != 503),
        "timeouts": statuses[0],
        "connection_errors": statuses[-1],
        "rejected_503": statuses[503],
        "rejected": _percentiles(rejected_latency),
        "retry_after_values": sorted(retry_after),
        "rss_mb_first_wave": round(rss[1], 1),
        "rss_mb_last_wave": round(rss[-1], 1),
    }


def run(
    concurrencies: list[int], seconds: float, overload: int, waves: int, work: Path
) -> dict[str, Any]:
    from app.inference.builders import init_random

    random.seed(0)
    model = init_random(work / "model", backbone="convnext_atto", input_size=64)
    base = {"VS_MODEL": str(model), "VS_PRECISION": "auto", "VS_LOG_LEVEL": "WARNING"}
    server = start_server({**base, "VS_DATA_DIR": str(work / "load")}, work / "load.log")
    ids = [0]
    try:
        with httpx.Client(base_url=server.url, timeout=60) as client:
            for start in range(0, 200, 50):
                products = [
                    {
                        "id": f"seed-{i}",
                        "images": [{"data": base64.b64encode(IMAGES[i % 64]).decode()}],
                    }
                    for i in range(start, start + 50)
                ]
                client.post("/products", json={"products": products}).raise_for_status()
        phases = [asyncio.run(load_phase(server.url, c, seconds, ids)) for c in concurrencies]
    finally:
        server.stop()
    squeezed = {
        **base,
        "VS_DATA_DIR": str(work / "overload"),
        "VS_BATCH__QUEUE_SIZE": "4",
        "VS_BATCH__MAX_SIZE": "1",
    }
    server = start_server(squeezed, work / "overload.log")
    try:
        overloaded = asyncio.run(overload_phase(server, overload, waves))
    finally:
        server.stop()
    return {"load": phases, "overload": overloaded}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--concurrency", default="1,4,16,64")
    parser.add_argument("--overload", type=int, default=256)
    parser.add_argument("--waves", type=int, default=10)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="vs-load-") as tmp:
        result = run(
            [int(c) for c in args.concurrency.split(",")],
            args.seconds,
            args.overload,
            args.waves,
            Path(tmp),
        )
    print(json.dumps(result, indent=2))
    overload = result["overload"]
    ok = overload["server_errors"] == overload["timeouts"] == overload["connection_errors"] == 0
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
