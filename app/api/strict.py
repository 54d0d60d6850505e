"""Strict query strings: an unknown or repeated single-valued query parameter is a 422
naming it, never silently ignored (a misspelt `min_scor` must not return wrong results)."""

from __future__ import annotations

import types
import typing
from typing import Any

from fastapi import Request
from fastapi.dependencies.models import Dependant
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute

_CACHE_ATTR = "_vsearch_query_params"


def reject_unknown_query(request: Request) -> None:
    """App-wide dependency: compare the query string with the route's declared parameters."""
    route = request.scope.get("route")
    if not isinstance(route, APIRoute) or not request.query_params:
        return
    allowed: dict[str, bool] = getattr(route, _CACHE_ATTR, None) or _declared(route)
    errors: list[dict[str, Any]] = []
    for name in dict.fromkeys(request.query_params.keys()):
        values = request.query_params.getlist(name)
        if name not in allowed:
            known = ", ".join(sorted(allowed)) or "none"
            errors.append(
                {
                    "type": "extra_forbidden",
                    "loc": ("query", name),
                    "msg": f"Unknown query parameter (this route takes: {known}).",
                    "input": values[0],
                }
            )
        elif not allowed[name] and len(values) > 1:
            errors.append(
                {
                    "type": "repeated_field",
                    "loc": ("query", name),
                    "msg": "This parameter takes one value; it was sent more than once.",
                    "input": values,
                }
            )
    if errors:
        raise RequestValidationError(errors)


def _is_union(annotation: Any) -> bool:
    return typing.get_origin(annotation) in (typing.Union, types.UnionType)


def _declared(route: APIRoute) -> dict[str, bool]:
    """{alias: takes a list} for every query parameter of the route and its dependencies."""
    found: dict[str, bool] = {}
    stack: list[Dependant] = [route.dependant]
    while stack:
        dependant = stack.pop()
        for field in dependant.query_params:
            annotation = field.field_info.annotation
            # `list[str] | None` is a list too: look inside the union.
            options = typing.get_args(annotation) if _is_union(annotation) else (annotation,)
            found[field.alias] = any(
                typing.get_origin(o) in (list, set, tuple) for o in options if o is not None
            )
        stack.extend(dependant.dependencies)
    setattr(route, _CACHE_ATTR, found)
    return found
