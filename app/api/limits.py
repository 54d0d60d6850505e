"""Per-request limits enforced by ASGI middleware: the body size, counted while the body
streams in (chunked uploads included), and the pixel budget of the images it decodes."""

from __future__ import annotations

import json

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.imaging.decode import PixelBudget, request_pixel_budget

_CLOSE = (b"connection", b"close")


class BodySizeLimit:
    """Answer 413 as soon as a request body passes `max_bytes`, whatever its headers say.

    A declared Content-Length over the cap is refused before reading; otherwise the bytes
    are counted as they arrive and the first chunk past the cap raises a 413 inside the
    request, which the app's error handler renders like every other error.

    Either way the 413, like any answer sent before the whole body was read, carries
    `Connection: close`: the server (uvicorn) then closes the connection once the answer
    is written, instead of reading and discarding the rest of a body that may never end,
    which it otherwise does to keep the connection alive for the next request.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", []):
            if name == b"content-length" and value.isdigit() and int(value) > self.max_bytes:
                await self._reject(send)
                return
        received = 0
        exceeded = False
        body_pending = _has_body(scope)

        async def counting_receive() -> Message:
            nonlocal received, exceeded, body_pending
            if exceeded:
                raise HTTPException(413, self._message())
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                body_pending = bool(message.get("more_body", False))
                if received > self.max_bytes:
                    exceeded = True
                    raise HTTPException(413, self._message())
            return message

        async def closing_send(message: Message) -> None:
            # An answer sent before the body has arrived (a 413, or any early error) ends
            # the connection: keeping it alive would mean reading the rest of the body.
            if body_pending and message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", []) if k != b"connection"]
                message = {**message, "headers": [*headers, _CLOSE]}
            await send(message)

        await self.app(scope, counting_receive, closing_send)

    def _message(self) -> str:
        return f"The request body is larger than {self.max_bytes} bytes."

    async def _reject(self, send: Send) -> None:
        body = json.dumps({"error": {"code": "request_too_large", "message": self._message()}})
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    _CLOSE,
                ],
            }
        )
        await send({"type": "http.response.body", "body": body.encode()})


def _has_body(scope: Scope) -> bool:
    for name, value in scope.get("headers", []):
        if name == b"transfer-encoding":
            return True
        if name == b"content-length":
            return value.strip() not in (b"", b"0")
    return False


class RequestPixelBudget:
    """Give every HTTP request a fresh `PixelBudget` of `max_pixels` decoded pixels.

    Per-image caps alone let one multipart product of many large images decode gigabytes;
    the budget is shared by all the images one request decodes (`app.imaging.decode`).
    """

    def __init__(self, app: ASGIApp, max_pixels: int) -> None:
        self.app = app
        self.max_pixels = max_pixels

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        token = request_pixel_budget.set(PixelBudget(self.max_pixels))
        try:
            await self.app(scope, receive, send)
        finally:
            request_pixel_budget.reset(token)
