"""What a hostile client can make a real `vsearch serve` on 127.0.0.1 spend (tiny model).

    python -m tests.reliability.client_bounds [--methods 20000] [--keys 1000] [--json]

* methods: `--methods` requests, each with a new random HTTP method token; the server's
  RSS before and after, the series in /metrics, and how long one scrape takes.
* identities: with a rate limit of burst 10 (and 1 a minute), how many of `--keys`
  requests pass when each sends a new invalid X-API-Key, or a new X-Forwarded-For; with a
  write key configured, how many of `--keys` wrong-key guesses the service checks (401)
  before it refuses them (429).
* attributes: a product with `--attr-mb` MB of attributes: the answer and the time taken.

Each phase starts its own server and stops it; nothing leaves 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import secrets
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx

from tests.images import encode, pattern
from tests.server import Server, start_server


def _rss_mb(server: Server) -> float:
    with open(f"/proc/{server.process.pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


async def _methods(server: Server, count: int) -> dict[str, Any]:
    limits = httpx.Limits(max_connections=8, max_keepalive_connections=8)
    async with httpx.AsyncClient(base_url=server.url, limits=limits, timeout=30) as client:
        await client.get("/metrics")
        rss_before = _rss_mb(server)
        statuses: Counter[int] = Counter()
        queue = iter(range(count))

        async def one_client() -> None:
            for _ in queue:
                response = await client.request("M" + secrets.token_hex(6).upper(), "/products")
                statuses[response.status_code] += 1

        started = time.perf_counter()
        await asyncio.gather(*(one_client() for _ in range(8)))
        sending = time.perf_counter() - started
        scrapes = []
        for _ in range(3):
            t = time.perf_counter()
            text = (await client.get("/metrics")).text
            scrapes.append(time.perf_counter() - t)
        series = sum(1 for line in text.splitlines() if line.startswith("vsearch_http_"))
        return {
            "requests": count,
            "statuses": dict(statuses),
            "seconds": round(sending, 1),
            "rss_mb_before": round(rss_before, 1),
            "rss_mb_after": round(_rss_mb(server), 1),
            "http_series_in_metrics": series,
            "metrics_bytes": len(text),
            "scrape_s_max_of_3": round(max(scrapes), 3),
        }


def _invalid_keys(server: Server, count: int) -> dict[str, Any]:
    with httpx.Client(base_url=server.url, timeout=10) as client:
        statuses = Counter(
            client.get("/products", headers={"X-API-Key": secrets.token_hex(16)}).status_code
            for _ in range(count)
        )
    return {"sent": count, "statuses": dict(statuses)}


def _forwarded_for(server: Server, count: int) -> dict[str, Any]:
    with httpx.Client(base_url=server.url, timeout=10) as client:
        statuses = Counter(
            client.get(
                "/products", headers={"X-Forwarded-For": f"198.51.{n // 250}.{n % 250}"}
            ).status_code
            for n in range(count)
        )
    return {"sent": count, "statuses": dict(statuses)}


def _guesses(server: Server, count: int) -> dict[str, Any]:
    with httpx.Client(base_url=server.url, timeout=10) as client:
        statuses = Counter(
            client.delete("/products/x", headers={"X-API-Key": secrets.token_hex(16)}).status_code
            for _ in range(count)
        )
    return {"sent": count, "statuses": dict(statuses)}


def _attributes(server: Server, megabytes: int) -> dict[str, Any]:
    image = base64.b64encode(encode(pattern(seed=1), "PNG")).decode()
    attributes = {f"k{n}": "x" * 1024 for n in range(megabytes * 1024)}
    body = {"products": [{"id": "big", "attributes": attributes, "images": [{"data": image}]}]}
    payload = json.dumps(body).encode()
    with httpx.Client(base_url=server.url, timeout=300) as client:
        rss_before = _rss_mb(server)
        t = time.perf_counter()
        response = client.post(
            "/products", content=payload, headers={"content-type": "application/json"}
        )
        posted = time.perf_counter() - t
        t = time.perf_counter()
        listing = client.get("/products")
        listed = time.perf_counter() - t
    return {
        "attributes_bytes": len(json.dumps(attributes)),
        "post_status": response.status_code,
        "post_answer": response.text[:160],
        "post_s": round(posted, 2),
        "list_status": listing.status_code,
        "list_bytes": len(listing.content),
        "list_s": round(listed, 2),
        "rss_mb_before": round(rss_before, 1),
        "rss_mb_after": round(_rss_mb(server), 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", type=int, default=20_000)
    parser.add_argument("--keys", type=int, default=1000)
    parser.add_argument("--attr-mb", type=int, default=8)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    from app.inference.builders import init_random

    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model = init_random(work / "model", backbone="convnext_atto", input_size=64)
        base = {
            "VS_MODEL": str(model),
            "VS_PRECISION": "fp32",
            "VS_LOG_LEVEL": "WARNING",
            "VS_WARMUP": "false",
        }

        server = start_server({**base, "VS_DATA_DIR": str(work / "m")}, work / "m.log")
        try:
            results["methods"] = asyncio.run(_methods(server, args.methods))
        finally:
            server.stop()

        limited = {
            **base,
            "VS_API_KEYS": "the-write-key",
            "VS_RATE_LIMIT__PER_MINUTE": "1",
            "VS_RATE_LIMIT__BURST": "10",
        }
        phases = [
            ("invalid_keys", limited, _invalid_keys),
            ("rotated_forwarded_for", limited, _forwarded_for),
            ("wrong_key_guesses", {**base, "VS_API_KEYS": "the-write-key"}, _guesses),
        ]
        for name, env, phase in phases:
            data = work / name
            server = start_server({**env, "VS_DATA_DIR": str(data)}, work / f"{name}.log")
            try:
                results[name] = phase(server, args.keys)
            finally:
                server.stop()

        server = start_server({**base, "VS_DATA_DIR": str(work / "a")}, work / "a.log")
        try:
            results["attributes"] = _attributes(server, args.attr_mb)
        finally:
            server.stop()
    print(json.dumps(results, indent=None if args.json else 2))


if __name__ == "__main__":
    main()
