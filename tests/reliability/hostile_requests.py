"""Hostile requests, one class at a time, against a real `vsearch serve` on 127.0.0.1.

    python -m tests.reliability.hostile_requests [--seconds 8] [--workers 4] [--only a,b]
        [--checkout DIR] [--json]

For each class, `--workers` clients send that class's request in a loop for `--seconds`
(each request has a 60 s timeout, so a run always ends), while one more client asks
`GET /products` every 50 ms. Reported per class: the hostile answers and their longest
time, the probe's latency (p50, max), and the server's RSS growth (sampled every 50 ms).
Everything talks to 127.0.0.1 only: image URLs point at a local server, and host names
under `.hang.test` resolve through a resolver that never answers (patched into the server
process, as a dead DNS server would behave). `--checkout` runs the server from another
source tree (e.g. an export of an older commit) to compare.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import socketserver
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from tests.httpserver import LocalServer, redirect, serve
from tests.reliability.hostile_images import (
    gzip_layers,
    jpeg_many_scans,
    png_sixteen_bit,
    png_solid,
)
from tests.server import REPO, free_port

# The server process: a resolver that hangs for `*.hang.test`, then the app under uvicorn.
_SERVER = """
import socket, sys, time
import uvicorn
_real = socket.getaddrinfo
def _getaddrinfo(host, *args, **kwargs):
    if isinstance(host, str) and host.endswith(".hang.test"):
        time.sleep(120)
        raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
    return _real(host, *args, **kwargs)
socket.getaddrinfo = _getaddrinfo
from app.main import create_app
uvicorn.run(create_app(), host="127.0.0.1", port=int(sys.argv[1]), log_level="warning")
"""

MAX_REQUEST_BYTES = 16 * 1024 * 1024
Attack = Callable[[httpx.AsyncClient, int], Awaitable[str]]


def _gzip_bomb_route(bomb: bytes) -> Callable[[BaseHTTPRequestHandler], None]:
    def route(h: BaseHTTPRequestHandler) -> None:
        h.send_response(200)
        h.send_header("Content-Type", "image/jpeg")
        h.send_header("Content-Encoding", "gzip, gzip, gzip")
        h.send_header("Content-Length", str(len(bomb)))
        h.end_headers()
        h.wfile.write(bomb)

    return route


def _answer(response: httpx.Response) -> str:
    """'STATUS code' for a JSON error envelope, 'STATUS text' for anything else."""
    try:
        body = response.json()
    except ValueError:
        return f"{response.status_code} (not JSON)"
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        return f"{response.status_code} {body['error'].get('code')}"
    if isinstance(body, dict) and body.get("results") and "status" in body["results"][0]:
        result = body["results"][0]
        code = (result.get("error") or {}).get("code", "")
        return f"{response.status_code} {result['status']} {code}".strip()
    return str(response.status_code)


def _attacks(evil: LocalServer, server_url: str) -> dict[str, Attack]:
    scans = jpeg_many_scans(1500, 1500, 4000)
    sixteen = png_sixteen_bit(6000, 6000)
    solid = png_solid(4000, 4000)

    async def search_url(client: httpx.AsyncClient, url: str) -> str:
        return _answer(await client.post("/search", json={"image_url": url}))

    async def upload(client: httpx.AsyncClient, data: bytes) -> str:
        files = {"image": ("a.jpg", data, "image/jpeg")}
        return _answer(await client.post("/search", files=files))

    async def many_pngs(client: httpx.AsyncClient, n: int) -> str:
        files = [("image", (f"{i}.png", solid, "image/png")) for i in range(16)]
        return _answer(await client.post("/products", data={"id": f"png-{n}"}, files=files))

    async def body_after_413(_: httpx.AsyncClient, n: int) -> str:
        return await asyncio.to_thread(_stream_past_the_cap, server_url)

    return {
        "gzip_bomb_url": lambda c, n: search_url(c, evil.url("/bomb")),
        "jpeg_4000_scans": lambda c, n: upload(c, scans),
        "png_16_bit_36mp": lambda c, n: upload(c, sixteen),
        "product_of_16_flat_16mp_pngs": many_pngs,
        "hanging_dns": lambda c, n: search_url(c, f"http://img{n}.hang.test/a.jpg"),
        "nul_in_host": lambda c, n: search_url(
            c, f"http://127.0.0.1:{evil.port}\x00.cdn.example.com/a.jpg"
        ),
        "chunked_body_past_413": body_after_413,
        "malformed_redirect": lambda c, n: search_url(c, evil.url("/redirect")),
    }


def _stream_past_the_cap(server_url: str, limit: int = 1 << 30) -> str:
    """Stream a chunked upload until the server closes (at most `limit` bytes)."""
    host, port = server_url.removeprefix("http://").split(":")
    chunk = b"\0" * (1 << 20)
    frame = f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n"
    sent = 0
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        part = (
            b"--b\r\nContent-Disposition: form-data; name=id\r\n\r\nx\r\n--b\r\n"
            b'Content-Disposition: form-data; name="image"; filename="a.jpg"\r\n'
            b"Content-Type: image/jpeg\r\n\r\n"
        )
        sock.sendall(
            b"POST /products HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
            b"Content-Type: multipart/form-data; boundary=b\r\n\r\n"
            + f"{len(part):x}\r\n".encode()
            + part
            + b"\r\n"
        )
        try:
            while sent < limit:
                sock.sendall(frame)
                sent += len(chunk)
        except OSError:
            pass
        try:
            status = sock.recv(64).split(b"\r\n")[0].decode(errors="replace")
        except OSError:
            status = "(reset)"
    if sent >= limit:
        return f"{limit >> 20} MiB read"
    return f"closed after {sent >> 20} MiB: {status or '(no answer)'}"


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


async def run_class(
    url: str, pid: int, attack: Attack, *, seconds: float, workers: int
) -> dict[str, Any]:
    answers: Counter[str] = Counter()
    durations: list[float] = []
    probes: list[float] = []
    rss: list[float] = []
    start_rss = _rss_mb(pid)
    deadline = time.monotonic() + seconds
    done = asyncio.Event()
    failed_probes = 0

    async def worker(i: int) -> None:
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            n = 0
            while time.monotonic() < deadline:
                t0 = time.perf_counter()
                try:
                    answers[await attack(client, i * 1000 + n)] += 1
                except httpx.HTTPError as exc:
                    answers[type(exc).__name__] += 1
                durations.append(time.perf_counter() - t0)
                n += 1

    async def probe() -> None:
        nonlocal failed_probes
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            while not done.is_set():
                t0 = time.perf_counter()
                try:
                    ok = (await client.get("/products", params={"limit": 10})).is_success
                except httpx.HTTPError:
                    ok = False
                probes.append(time.perf_counter() - t0)
                failed_probes += not ok
                rss.append(_rss_mb(pid))
                await asyncio.sleep(0.05)

    prober = asyncio.create_task(probe())
    await asyncio.sleep(0.2)
    await asyncio.gather(*(worker(i) for i in range(workers)))
    done.set()
    await prober
    ms = np.asarray(probes) * 1000
    return {
        "hostile_answers": dict(answers),
        "hostile_requests": len(durations),
        "hostile_max_s": round(max(durations), 2),
        "probe_count": len(probes),
        "probe_p50_ms": round(float(np.percentile(ms, 50)), 1),
        "probe_max_ms": round(float(ms.max()), 1),
        "probe_failures": failed_probes,
        "rss_growth_mb": round(max(rss, default=start_rss) - start_rss, 1),
    }


def _start(checkout: Path, env: dict[str, str], log: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-c", _SERVER, str(port)],
        cwd=checkout,
        env={**os.environ, **env},
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(log.read_text()[-3000:])
        try:
            if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                return process, url
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    process.kill()
    raise RuntimeError("server not ready in 120 s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--only", default="", help="comma-separated class names")
    parser.add_argument("--checkout", type=Path, default=REPO)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    from app.inference.builders import init_random

    # The image server sees many connections dropped mid-answer; that is the point.
    setattr(socketserver.BaseServer, "handle_error", lambda *_: None)  # noqa: B010

    bomb = gzip_layers(1 << 30, 3)
    routes = {"/bomb": _gzip_bomb_route(bomb), "/redirect": redirect("http:foo")}
    with tempfile.TemporaryDirectory() as tmp, serve(routes) as evil:
        model = init_random(Path(tmp) / "model", backbone="convnext_atto", input_size=64)
        env = {
            "VS_MODEL": str(model),
            "VS_DATA_DIR": f"{tmp}/data",
            "VS_PRECISION": "fp32",
            "VS_DEVICE": "cpu",
            "VS_ALLOW_PRIVATE_URLS": "true",  # the hostile image server is on loopback
            "VS_MAX_REQUEST_BYTES": str(MAX_REQUEST_BYTES),
            "VS_LOG_LEVEL": "WARNING",
        }
        process, url = _start(args.checkout.resolve(), env, Path(tmp) / "server.log")
        try:
            attacks = _attacks(evil, url)
            names = [n for n in args.only.split(",") if n] or list(attacks)
            report: dict[str, Any] = {}
            for name in names:
                connections = evil.connections
                report[name] = asyncio.run(
                    run_class(
                        url, process.pid, attacks[name], seconds=args.seconds, workers=args.workers
                    )
                )
                report[name]["image_server_connections"] = evil.connections - connections
                if not args.json:
                    print(name, json.dumps(report[name]), flush=True)
        finally:
            process.send_signal(signal.SIGKILL)
            process.wait(10)
    if args.json:
        print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
