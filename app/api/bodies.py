"""Request bodies that come as JSON or as a multipart form, parsed in one place.

Each operation takes one content type (generated clients cannot handle an operation with
two): `read_json` or `read_form` parses the body into the operation's pydantic model, and
`request_body` writes the OpenAPI `requestBody` from the same model. `read_body` takes
either, for the older paths that accepted both. Limits and checks therefore live in
the models alone, and both content types answer bad input alike: a 422 in the error
envelope naming each field (unknown and repeated form fields included), or a 415 for any
other content type.
"""

from __future__ import annotations

import types
import typing
from typing import Any, TypeVar

import anyio.to_thread
from fastapi import Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError
from starlette.datastructures import UploadFile

from app.core.errors import ServiceError

J = TypeVar("J", bound=BaseModel)
F = TypeVar("F", bound=BaseModel)

INLINE_JSON_BYTES = 64 * 1024
"""JSON bodies up to this size are parsed on the event loop (microseconds); larger ones on
a worker thread, so one big body never stalls every other request."""

JSON = "application/json"
MULTIPART = "multipart/form-data"


class UnsupportedMediaType(ServiceError):
    status_code = 415
    code = "unsupported_media_type"


def _ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def request_body(
    model: type[BaseModel], media_type: str = JSON, *, example: Any = None
) -> dict[str, Any]:
    """`openapi_extra` for a route that parses its own body: one content type per
    operation, which is what generated clients handle (the models are registered as
    components by `app.api.openapi.install_openapi`)."""
    content: dict[str, Any] = {"schema": _ref(model)}
    if example is not None:
        content["example"] = example
    return {"requestBody": {"required": True, "content": {media_type: content}}}


def _content_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


async def read_json(
    request: Request, model: type[J], *, context: dict[str, Any] | None = None, hint: str = ""
) -> J:
    """The body as `model`, from JSON (also when no content type is sent); any other
    content type is a 415 (`hint` says where else to send it)."""
    content_type = _content_type(request)
    if content_type not in (JSON, ""):
        raise UnsupportedMediaType(f"Send {JSON}{hint}.")
    body = await request.body()
    if len(body) <= INLINE_JSON_BYTES:
        return _validate(model, body, context)
    return await anyio.to_thread.run_sync(_validate, model, body, context)


async def read_form(
    request: Request,
    model: type[F],
    *,
    max_files: int,
    max_fields: int,
    context: dict[str, Any] | None = None,
    hint: str = "",
) -> F:
    """The body as `model`, from a multipart form (file parts read into bytes); unknown
    and repeated single-valued fields are 422s naming them, other content types 415."""
    if _content_type(request) != MULTIPART:
        raise UnsupportedMediaType(f"Send {MULTIPART}{hint}.")
    return await _read_form(request, model, max_files, max_fields, context)


async def read_body(
    request: Request,
    json_model: type[J],
    form_model: type[F],
    *,
    max_files: int,
    max_fields: int,
    context: dict[str, Any] | None = None,
) -> J | F:
    """The body as `json_model` (JSON, also when no content type is sent) or `form_model`
    (multipart; file parts are read into bytes). `context` reaches the models' validators
    (e.g. `{"attributes": AttributeSettings}`)."""
    content_type = _content_type(request)
    if content_type in (JSON, ""):
        return await read_json(request, json_model, context=context)
    if content_type == MULTIPART:
        return await _read_form(request, form_model, max_files, max_fields, context)
    raise UnsupportedMediaType(f"Send {JSON} or {MULTIPART} (see the API docs).")


async def _read_form(
    request: Request,
    form_model: type[F],
    max_files: int,
    max_fields: int,
    context: dict[str, Any] | None,
) -> F:
    async with request.form(max_files=max_files, max_fields=max_fields) as form:
        values: dict[str, Any] = {}
        repeated: list[str] = []
        for name in dict.fromkeys(form.keys()):
            parts = [await p.read() if isinstance(p, UploadFile) else p for p in form.getlist(name)]
            if _is_list(form_model, name):
                values[name] = parts
            elif len(parts) > 1:
                repeated.append(name)
            else:
                values[name] = parts[0]
    if repeated:
        raise RequestValidationError(
            [
                {
                    "type": "repeated_field",
                    "loc": ("body", name),
                    "msg": "This field takes one value; it was sent more than once.",
                    "input": None,
                }
                for name in repeated
            ]
        )
    return _validate(form_model, values, context)


def _validate(
    model: type[J], data: bytes | dict[str, Any], context: dict[str, Any] | None = None
) -> J:
    try:
        if isinstance(data, bytes):
            return model.model_validate_json(data, context=context)
        return model.model_validate(data, context=context)
    except ValidationError as exc:
        raise RequestValidationError(
            [
                {**e, "loc": ("body", *e.get("loc", ())), "input": _short(e.get("input"))}
                for e in exc.errors(include_url=False, include_context=False)
            ]
        ) from None


def _short(value: Any) -> Any:
    """File bytes are not echoed back in validation errors."""
    if isinstance(value, bytes):
        return f"<{len(value)} bytes>"
    if isinstance(value, dict):
        return {k: _short(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_short(v) for v in value]
    return value


def _is_list(model: type[BaseModel], name: str) -> bool:
    field = model.model_fields.get(name)
    if field is None:
        return False
    annotation = field.annotation
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(typing.get_origin(a) is list for a in typing.get_args(annotation))
    return origin is list
