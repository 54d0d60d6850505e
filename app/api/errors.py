"""Rendering of errors as `{"error": {"code", "message"}}` and their OpenAPI entries."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.core.errors import (
    ImageFetchFailed,
    ImageTooLarge,
    ImageUndecodable,
    InvalidBox,
    InvalidRequest,
    ServiceError,
    UrlNotAllowed,
)

CODES: dict[str, str] = {
    "invalid_request": "A parameter or body field is invalid; `details` names each one.",
    "invalid_cursor": "The `cursor` is not one this service issued for this list.",
    "image_undecodable": "The bytes are not a JPEG, PNG, WebP or GIF image the service can "
    "decode (or the base64 is malformed).",
    "image_too_large": "The image passes the pixel or byte limits (VS_IMAGE__*).",
    "invalid_box": "The box does not lie inside the upright image.",
    "url_not_allowed": "The URL is not http(s), or points to a private or refused address.",
    "image_fetch_failed": "The image URL could not be fetched (status, timeout, size).",
    "request_too_large": "The request body passes VS_MAX_REQUEST_BYTES.",
    "unsupported_media_type": "This operation takes another content type (see its request body).",
    "unauthorized": "A valid X-API-Key header is required.",
    "forbidden": "The key is scoped to product sets (VS_API_KEY_SCOPES) and this asks for "
    "more: products written into sets outside the scope (or into none), or a "
    "catalogue-wide operation.",
    "product_not_found": "No product has this id (or none the key's product sets hold).",
    "image_not_found": "No such image (of that product, or embedded by the loaded model).",
    "pair_not_found": "The two products were never found as a duplicate pair.",
    "decision_not_found": "There is no decision on this pair.",
    "rate_limited": "Too many requests (or failed keys) from this client; see Retry-After.",
    "not_ready": "The service is starting or stopping; see Retry-After.",
    "overloaded": "The inference queue or image decoder is full; see Retry-After.",
    "thumbnail_not_found": "No image has this id, or its thumbnail was not made yet "
    "(`vsearch thumbnails backfill`).",
    "import_not_found": "No import job has this id.",
    "import_finished": "The import job has already ended (succeeded, failed or cancelled).",
    "import_file_invalid": "The uploaded file is not a CSV or JSONL file of products (its "
    "format, its encoding, or a required column; the message names it).",
    "not_calibrated": "Too few review decisions to give probabilities yet (see "
    "`GET /duplicates/calibration`).",
}
"""Every error code an operation declares, with what it means (the OpenAPI documents each
as its own schema, `<Code>Error`)."""

IMAGE_ERRORS: tuple[type[ServiceError], ...] = (
    InvalidRequest,
    ImageUndecodable,
    ImageTooLarge,
    InvalidBox,
    UrlNotAllowed,
    ImageFetchFailed,
)
"""What any operation that reads an image can answer."""


def error_responses(*errors: type[ServiceError]) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses=` entries for the errors an operation raises, grouped by status.
    `app.api.openapi` turns each code into its schema and adds the errors every operation
    of a kind shares (invalid parameters, keys, rate limits, start-up)."""
    by_status: dict[int, list[str]] = {}
    for error in errors:
        codes = by_status.setdefault(error.status_code, [])
        if error.code not in codes:
            codes.append(error.code)
    return {
        status: {"description": "Error.", "x-error-codes": codes}
        for status, codes in by_status.items()
    }


def error_json(status: int, code: str, message: str, **extra: Any) -> JSONResponse:
    body: dict[str, Any] = {"code": code, "message": message}
    body.update({k: v for k, v in extra.items() if k != "headers"})
    return JSONResponse({"error": body}, status_code=status, headers=extra.get("headers"))


_HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    404: "not_found",
    405: "method_not_allowed",
    413: "request_too_large",
    415: "unsupported_media_type",
    422: "invalid_request",
    429: "rate_limited",
    503: "unavailable",
}


def install_error_handlers(app: FastAPI) -> None:
    """Every error answer, the framework's own (404, 405, malformed bodies) and an
    unexpected exception's 500 included, in the one envelope."""

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        # Starlette logs the traceback and re-raises after this answer; the client learns
        # nothing about the fault but the request id it can quote. This answer is sent
        # outside the request middleware, so the id is added here.
        request_id = getattr(request.state, "request_id", None)
        headers = {"X-Request-ID": request_id} if request_id else None
        return error_json(
            500, "internal_error", "Internal error; quote the X-Request-ID.", headers=headers
        )

    @app.exception_handler(ServiceError)
    async def _service_error(_: Request, exc: ServiceError) -> JSONResponse:
        return error_json(exc.status_code, exc.code, exc.message, headers=exc.headers or None)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        details = [
            {
                "loc": list(e.get("loc", ())),
                # pydantic prefixes a validator's own ValueError with "Value error, ".
                "msg": str(e.get("msg", "")).removeprefix("Value error, "),
                "type": str(e.get("type", "")),
            }
            for e in exc.errors()
        ]
        first = details[0] if details else {"loc": [], "msg": "invalid request"}
        where = ".".join(str(p) for p in first["loc"] if p != "body") or "request"
        return error_json(422, "invalid_request", f"{where}: {first['msg']}", details=details)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = _HTTP_CODES.get(exc.status_code, "http_error")
        headers = dict(getattr(exc, "headers", None) or {})
        if exc.status_code == 400:
            # FastAPI's "error parsing the body" (e.g. bytes that are not UTF-8 JSON): an
            # invalid request like any other, with the same status and shape.
            return error_json(
                422, "invalid_request", f"The request body is malformed: {exc.detail}"
            )
        if exc.status_code == 405:
            # Starlette names only the first matching route's methods; a path served by
            # several routes (GET and DELETE /products/{id}) must list them all.
            headers["Allow"] = ", ".join(_allowed_methods(request))
        return error_json(exc.status_code, code, str(exc.detail), headers=headers or None)


def _allowed_methods(request: Request) -> list[str]:
    methods: set[str] = set()
    for route in request.app.routes:
        regex = getattr(route, "path_regex", None)
        if regex is not None and regex.match(request.url.path):
            methods |= set(getattr(route, "methods", None) or ())
    return sorted(methods)
