"""Visual search route."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from starlette.datastructures import UploadFile

from app.api.deps import SearchDep
from app.api.errors import error_responses
from app.api.routes.products import UnsupportedMediaType
from app.api.schemas import (
    SearchHitRead,
    SearchRead,
    SearchRequest,
    check_name,
    parse_json_body,
)
from app.api.security import RateLimitDep, ReadKeyDep
from app.catalogue.service import decode_base64_image
from app.core.errors import InvalidRequest

router = APIRouter(tags=["search"], dependencies=[RateLimitDep], responses=error_responses(429))

_MULTIPART_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["image"],
    "properties": {
        "image": {"type": "string", "format": "binary", "description": "The query image."},
        "bbox": {
            "type": "string",
            "description": "Crop box `x,y,w,h` in pixels.",
            "example": "0,0,300,400",
        },
        "bbox_x": {"type": "number", "minimum": 0},
        "bbox_y": {"type": "number", "minimum": 0},
        "bbox_w": {"type": "number", "exclusiveMinimum": 0},
        "bbox_h": {"type": "number", "exclusiveMinimum": 0},
        "k": {"type": "integer", "minimum": 1, "maximum": 1000, "default": 10},
        "category": {"type": "string"},
        "min_score": {"type": "number", "minimum": -1, "maximum": 1},
    },
}

DESCRIPTION = """
Find the catalogue products that look most like an image.

* **Multipart** (`multipart/form-data`): an `image` file, optional `bbox` as `x,y,w,h`
  (or `bbox_x`, `bbox_y`, `bbox_w`, `bbox_h`, the Products-10K names), `k`, `category`,
  `min_score`.
* **JSON** (`application/json`): `image_url` or `image` (base64), optional `bbox`,
  `k`, `filters.category`, `min_score`.

The box is in pixels of the upright image (EXIF orientation applied) and must lie inside
it. Results hold one entry per product (its best matching image), ordered by score; the
scores are cosine similarities of the embeddings. A category filter is exact: it never
returns another category, and returns k results whenever k exist. Products are
searchable as soon as `POST /products` returned for them.
"""


@router.post(
    "/search",
    response_model=SearchRead,
    summary="Search products by image",
    description=DESCRIPTION,
    responses=error_responses(401, 413, 415, 422, 503),
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": {"$ref": "#/components/schemas/SearchRequest"}},
                "multipart/form-data": {"schema": _MULTIPART_SCHEMA},
            },
        }
    },
)
async def search(request: Request, search: SearchDep, _key: ReadKeyDep) -> SearchRead:
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == "multipart/form-data":
        query = await _multipart_query(request)
    elif content_type in ("application/json", ""):
        query = _json_query(await parse_json_body(SearchRequest, await request.body()))
    else:
        raise UnsupportedMediaType("Send multipart/form-data or application/json.")
    outcome = await search.search_image(**query)
    return SearchRead(
        results=[SearchHitRead(**hit.__dict__) for hit in outcome.hits],
        model_id=outcome.model_id,
        took_ms=outcome.took_ms,
    )


def _json_query(payload: SearchRequest) -> dict[str, Any]:
    return {
        "data": decode_base64_image(payload.image) if payload.image is not None else None,
        "url": payload.image_url,
        "box": payload.bbox.as_tuple() if payload.bbox else None,
        "k": payload.k,
        "category": payload.filters.category if payload.filters else None,
        "min_score": payload.min_score,
    }


def _number(form: Any, name: str, kind: type = float) -> Any:
    value = form.get(name)
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    try:
        return kind(value)
    except (TypeError, ValueError):
        raise InvalidRequest(f"`{name}` must be a number.") from None


async def _multipart_query(request: Request) -> dict[str, Any]:
    async with request.form(max_files=1, max_fields=16) as form:
        upload = form.get("image")
        if not isinstance(upload, UploadFile):
            raise InvalidRequest("Multipart searches need an `image` file.")
        data = await upload.read()
        box = None
        bbox = form.get("bbox")
        parts = [_number(form, f"bbox_{c}") for c in "xywh"]
        if isinstance(bbox, str) and bbox.strip():
            try:
                x, y, w, h = (float(v) for v in bbox.split(","))
            except ValueError:
                raise InvalidRequest("`bbox` must be four numbers `x,y,w,h`.") from None
            box = (x, y, w, h)
        elif any(p is not None for p in parts):
            if any(p is None for p in parts):
                raise InvalidRequest("Give all of bbox_x, bbox_y, bbox_w, bbox_h.")
            box = (parts[0], parts[1], parts[2], parts[3])
        k = _number(form, "k", int)
        min_score = _number(form, "min_score")
        category = form.get("category")
        check_name(("category",), category)
    if k is not None and not 1 <= k <= 1000:
        raise InvalidRequest("`k` must be between 1 and 1000.")
    if min_score is not None and not -1 <= min_score <= 1:
        raise InvalidRequest("`min_score` must be between -1 and 1.")
    return {
        "data": data,
        "box": box,
        "k": k or 10,
        "category": category if isinstance(category, str) and category else None,
        "min_score": min_score,
    }
