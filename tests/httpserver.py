"""A real HTTP server on loopback for the fetch tests; it counts accepted connections so a
test can assert that the service never connected."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

Route = Callable[[BaseHTTPRequestHandler], None]


@dataclass
class LocalServer:
    host: str
    port: int
    routes: dict[str, Route]
    connections: int = 0
    requests: list[dict[str, Any]] = field(default_factory=list)

    def url(self, path: str = "/") -> str:
        return f"http://{self.host}:{self.port}{path}"


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    state: LocalServer

    def get_request(self):  # type: ignore[no-untyped-def]
        request = super().get_request()
        self.state.connections += 1
        return request


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        state = self.server.state
        state.requests.append({"path": self.path, "headers": dict(self.headers.items())})
        route = state.routes.get(self.path.split("?")[0])
        if route is None:
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        route(self)


@contextmanager
def serve(routes: dict[str, Route], host: str = "127.0.0.1") -> Iterator[LocalServer]:
    server = _Server((host, 0), _Handler)
    state = LocalServer(host=host, port=server.server_address[1], routes=routes)
    server.state = state
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.daemon = True
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()


def body(data: bytes, content_type: str = "image/jpeg", status: int = 200) -> Route:
    def route(h: BaseHTTPRequestHandler) -> None:
        h.send_response(status)
        h.send_header("Content-Type", content_type)
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        h.wfile.write(data)

    return route


def redirect(location: str, status: int = 302) -> Route:
    def route(h: BaseHTTPRequestHandler) -> None:
        h.send_response(status)
        h.send_header("Location", location)
        h.send_header("Content-Length", "0")
        h.end_headers()

    return route


def drip(chunk: bytes, every_s: float, total_chunks: int) -> Route:
    """Send a chunk every `every_s` seconds, without a Content-Length."""

    def route(h: BaseHTTPRequestHandler) -> None:
        h.send_response(200)
        h.send_header("Content-Type", "image/jpeg")
        h.send_header("Connection", "close")
        h.end_headers()
        h.close_connection = True
        try:
            for _ in range(total_chunks):
                h.wfile.write(chunk)
                h.wfile.flush()
                time.sleep(every_s)
        except (BrokenPipeError, ConnectionResetError):
            pass

    return route


def lying_length(claimed: int, actual: bytes) -> Route:
    def route(h: BaseHTTPRequestHandler) -> None:
        h.send_response(200)
        h.send_header("Content-Type", "image/jpeg")
        h.send_header("Content-Length", str(claimed))
        h.end_headers()
        try:
            h.wfile.write(actual)
        except (BrokenPipeError, ConnectionResetError):
            pass

    return route


def chunked(total: int, chunk_size: int = 65536) -> Route:
    """A chunked body of `total` bytes (no Content-Length)."""

    def route(h: BaseHTTPRequestHandler) -> None:
        h.send_response(200)
        h.send_header("Content-Type", "image/jpeg")
        h.send_header("Transfer-Encoding", "chunked")
        h.end_headers()
        sent = 0
        try:
            while sent < total:
                n = min(chunk_size, total - sent)
                h.wfile.write(f"{n:x}\r\n".encode() + b"\0" * n + b"\r\n")
                sent += n
            h.wfile.write(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass

    return route
