"""The OpenAPI document as generated clients need it.

FastAPI writes most of it from the routes; this module adds what it cannot know:

* the schemas of bodies that routes parse themselves (JSON or multipart);
* security as this service is configured: an operation needs `X-API-Key` only when the
  settings make it so (writes with `VS_API_KEYS`, reads with `VS_API_KEYS_READ`), so a
  client generated against an open service does not demand a key it cannot have;
* every error an operation can answer, by status, each code with its own schema
  (`ProductNotFoundError`, ...), including the ones every operation of a kind shares:
  invalid parameters (422), a key (401), rate limits (429), start-up (503), body size (413);
* the `X-Request-ID` header on every response and `Retry-After` on 429 and 503;
* the lowest `min_score` the duplicates routes accept (the configured floor).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from fastapi import FastAPI
from fastapi.dependencies.models import Dependant
from fastapi.openapi.utils import get_openapi
from fastapi.routing import APIRoute, iter_route_contexts
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from app.api.deps import get_services
from app.api.errors import CODES
from app.api.security import rate_limit, require_metrics_key, require_read_key, require_write_key
from app.api.state import ApiState

API_KEY = "APIKeyHeader"
BEARER = "HTTPBearer"

_STATUS_TEXT = {
    401: "Missing or invalid API key.",
    403: "The key's product-set scope does not allow this.",
    404: "Not found.",
    413: "Too large.",
    415: "Unsupported content type.",
    422: "Invalid input.",
    429: "Too many requests; retry after `Retry-After` seconds.",
    503: "Not ready or overloaded; retry after `Retry-After` seconds.",
}

_REQUEST_ID = {
    "description": "The request's id: the client's own `X-Request-ID` when it sent a valid "
    "one, else one the service made. Logged with the request; quote it when reporting a "
    "problem.",
    "schema": {"type": "string"},
}
_RETRY_AFTER = {
    "description": "Seconds to wait before retrying.",
    "schema": {"type": "integer", "minimum": 1},
}


def install_openapi(app: FastAPI, extra_models: list[type[BaseModel]], state: ApiState) -> None:
    """Generate the schema once, with `extra_models` under components/schemas and the
    operations documented for `state`'s settings."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = get_openapi(
            title=app.title,
            version=app.version,
            description=app.description,
            routes=app.routes,
            tags=app.openapi_tags,
        )
        _, defs = models_json_schema(
            [(m, "validation") for m in extra_models],
            ref_template="#/components/schemas/{model}",
        )
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for name, definition in defs.get("$defs", {}).items():
            components.setdefault(name, definition)
        document_operations(app, schema, state)
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def _calls(dependant: Dependant) -> Iterator[Callable[..., Any]]:
    for dep in dependant.dependencies:
        if dep.call is not None:
            yield dep.call
        yield from _calls(dep)


def document_operations(app: FastAPI, schema: dict[str, Any], state: ApiState) -> None:
    components = schema["components"]["schemas"]
    used_codes: set[str] = set()
    needs_key = False
    needs_bearer = False
    # Included routers are resolved lazily; their contexts carry each route's effective
    # path, methods and dependencies (the router's own included).
    for route in iter_route_contexts(app.routes):
        if not isinstance(route.original_route, APIRoute) or not route.include_in_schema:
            continue
        calls = set(_calls(route.dependant))
        for method in route.methods or ():
            operation = schema["paths"][route.path_format].get(method.lower())
            if operation is None:
                continue
            if require_write_key in calls:
                secured = bool(state.write_keys)
            elif require_read_key in calls or require_metrics_key in calls:
                secured = bool(state.read_keys)
            else:
                secured = False
            operation.pop("security", None)
            if secured:
                operation["security"] = [{API_KEY: []}]
                needs_key = True
                if require_metrics_key in calls:
                    operation["security"].append({BEARER: []})
                    needs_bearer = True
            codes = _declared_codes(operation)
            codes.setdefault(422, []).append("invalid_request")
            if secured:
                codes.setdefault(401, []).append("unauthorized")
                if state.limits.auth_failures is not None:
                    codes.setdefault(429, []).append("rate_limited")
            if rate_limit in calls and state.limits.requests is not None:
                codes.setdefault(429, []).append("rate_limited")
            if get_services in calls:
                codes.setdefault(503, []).append("not_ready")
            if "requestBody" in operation:
                codes.setdefault(413, []).append("request_too_large")
            responses = operation.setdefault("responses", {})
            for status, listed in sorted(codes.items()):
                unique = list(dict.fromkeys(listed))
                used_codes.update(unique)
                responses[str(status)] = _error_response(status, unique)
            for status, response in responses.items():
                headers = response.setdefault("headers", {})
                headers["X-Request-ID"] = _REQUEST_ID
                if status in ("429", "503"):
                    headers["Retry-After"] = _RETRY_AFTER
            operation["responses"] = dict(sorted(responses.items()))
            for parameter in operation.get("parameters", []):
                if parameter.get("in") in ("path", "query"):  # what the service checks
                    _refuse_controls(parameter["schema"])
            if (route.path_format or "").startswith("/duplicates"):
                for parameter in operation.get("parameters", []):
                    if parameter["name"] == "min_score":
                        parameter["schema"]["minimum"] = state.settings.duplicates.floor
    for name in _form_schemas(schema):
        _drop_null(components[name])
    # Named components all the way down: generated clients name inline objects after
    # their parents (`ProductNotFoundErrorProductNotFoundErrorBody`), components by name.
    if used_codes:
        components[_ERROR_DETAIL] = _ERROR_DETAIL_SCHEMA
    for code in sorted(used_codes):
        components[_schema_name(code)] = _error_schema(code)
        components[_schema_name(code) + "Body"] = _error_body_schema(code)
    for unused in ("HTTPValidationError", "ValidationError", "ErrorResponse"):
        components.pop(unused, None)
    schemes = schema["components"].setdefault("securitySchemes", {})
    schemes.pop(API_KEY, None)
    if needs_key:
        schemes[API_KEY] = {
            "type": "apiKey",
            "in": "header",
            "name": "X-API-Key",
            "description": "One of the keys in VS_API_KEYS (writes) or VS_API_KEYS_READ "
            "(reads). Generated Python clients: `AuthenticatedClient(base_url, token=key, "
            'auth_header_name="X-API-Key", prefix="")`.',
        }
    if needs_bearer:
        schemes[BEARER] = {"type": "http", "scheme": "bearer", "description": "A read key."}
    if not schemes:
        schema["components"].pop("securitySchemes")


NO_CONTROLS = "^[^\\u0000-\\u001f\\u007f-\\u009f]*$"
"""Every path and query parameter refuses control characters (a 422 naming it), as
`refuse_control_characters` checks; the pattern says so, so a schema-valid value is one the
service takes."""


def _refuse_controls(schema: dict[str, Any]) -> None:
    for branch in schema.get("anyOf", [schema]):
        if branch.get("type") == "string" and "enum" not in branch:
            branch.setdefault("pattern", NO_CONTROLS)


def _form_schemas(schema: dict[str, Any]) -> set[str]:
    """Components that are multipart request bodies."""
    names = set()
    for item in schema["paths"].values():
        for operation in item.values():
            content = operation.get("requestBody", {}).get("content", {})
            ref = content.get("multipart/form-data", {}).get("schema", {}).get("$ref", "")
            if ref:
                names.add(ref.rsplit("/", 1)[-1])
    return names


def _drop_null(model: dict[str, Any]) -> None:
    """A form field is text or absent, never null: an optional field's `null` branch would
    make generated clients offer None and send it as the text "None"."""
    for field in model.get("properties", {}).values():
        branches = [b for b in field.get("anyOf", []) if b.get("type") != "null"]
        if "anyOf" in field and len(branches) == 1:
            del field["anyOf"]
            field.update(branches[0])
            if field.get("default", "") is None:
                del field["default"]


def _declared_codes(operation: dict[str, Any]) -> dict[int, list[str]]:
    codes: dict[int, list[str]] = {}
    for status, response in list(operation.get("responses", {}).items()):
        if status == "422" and "x-error-codes" not in response:
            del operation["responses"][status]  # FastAPI's HTTPValidationError: not ours
            continue
        if "x-error-codes" in response:
            codes[int(status)] = list(response["x-error-codes"])
    return codes


def _schema_name(code: str) -> str:
    return "".join(part.capitalize() for part in code.split("_")) + "Error"


def _error_response(status: int, codes: list[str]) -> dict[str, Any]:
    refs = [{"$ref": f"#/components/schemas/{_schema_name(c)}"} for c in codes]
    lines = "\n".join(f"* `{c}`: {CODES[c]}" for c in codes)
    return {
        "description": f"{_STATUS_TEXT.get(status, 'Error.')}\n\n{lines}",
        "content": {"application/json": {"schema": refs[0] if len(refs) == 1 else {"oneOf": refs}}},
        "x-error-codes": codes,
    }


_ERROR_DETAIL = "ErrorDetail"
_ERROR_DETAIL_SCHEMA: dict[str, Any] = {
    "title": _ERROR_DETAIL,
    "description": "One problem with one field of a request.",
    "type": "object",
    "required": ["loc", "msg", "type"],
    "properties": {
        "loc": {
            "type": "array",
            "description": "Where: `body`, `query` or `path`, then the field's path.",
            "items": {"anyOf": [{"type": "string"}, {"type": "integer"}]},
        },
        "msg": {"type": "string"},
        "type": {"type": "string"},
    },
}


def _error_schema(code: str) -> dict[str, Any]:
    name = _schema_name(code)
    return {
        "title": name,
        "description": CODES[code],
        "type": "object",
        "required": ["error"],
        "properties": {"error": {"$ref": f"#/components/schemas/{name}Body"}},
    }


def _error_body_schema(code: str) -> dict[str, Any]:
    # `const` rather than a one-value `enum`: clients type it as the literal string
    # instead of generating an enum class per error code.
    return {
        "title": f"{_schema_name(code)}Body",
        "type": "object",
        "required": ["code", "message"],
        "properties": {
            "code": {"type": "string", "const": code},
            "message": {"type": "string", "description": "What went wrong, for a human."},
            "details": {
                "type": "array",
                "description": "Per-field problems (request validation errors).",
                "items": {"$ref": f"#/components/schemas/{_ERROR_DETAIL}"},
            },
        },
    }
