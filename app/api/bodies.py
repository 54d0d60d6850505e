"""Request bodies that come as JSON or as a multipart form, parsed in one place.

A route that takes both declares a pydantic model for each (`json_model`, `form_model`);
`read_body` parses whichever the client sent into its model, and `request_body` writes
the OpenAPI `requestBody` from the same two models. Limits and checks therefore live in
the models alone, and both content types answer bad input alike: a 422 in the error
envelope naming each field (unknown and repeated form fields included), or a 415 for any
other content type.
"""

from __future__ import annotations

import types
import typing
from typing import Any, TypeVar

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError
from starlette.datastructures import UploadFile

from app.core.errors import ServiceError

J = TypeVar("J", bound=BaseModel)
F = TypeVar("F", bound=BaseModel)

JSON = "application/json"
MULTIPART = "multipart/form-data"


class UnsupportedMediaType(ServiceError):
    status_code = 415
    code = "unsupported_media_type"


def request_body(json_model: type[BaseModel], form_model: type[BaseModel]) -> dict[str, Any]:
    """`openapi_extra` for a route that takes either model (both are registered as
    components by `app.api.openapi.install_openapi`)."""
    return {
        "requestBody": {
            "required": True,
            "content": {
                JSON: {"schema": {"$ref": f"#/components/schemas/{json_model.__name__}"}},
                MULTIPART: {"schema": {"$ref": f"#/components/schemas/{form_model.__name__}"}},
            },
        }
    }


async def read_body(
    request: Request,
    json_model: type[J],
    form_model: type[F],
    *,
    max_files: int,
    max_fields: int,
) -> J | F:
    """The body as `json_model` (JSON, also when no content type is sent) or `form_model`
    (multipart; file parts are read into bytes)."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type in (JSON, ""):
        return _validate(json_model, await request.body())
    if content_type == MULTIPART:
        async with request.form(max_files=max_files, max_fields=max_fields) as form:
            values: dict[str, Any] = {}
            repeated: list[str] = []
            for name in dict.fromkeys(form.keys()):
                parts = [
                    await p.read() if isinstance(p, UploadFile) else p for p in form.getlist(name)
                ]
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
        return _validate(form_model, values)
    raise UnsupportedMediaType(f"Send {JSON} or {MULTIPART} (see the API docs).")


def _validate(model: type[J], data: bytes | dict[str, Any]) -> J:
    try:
        if isinstance(data, bytes):
            return model.model_validate_json(data)
        return model.model_validate(data)
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
