"""Visual search route."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from app.api.bodies import read_body, request_body
from app.api.deps import SearchDep
from app.api.errors import error_responses
from app.api.forms import SearchUpload
from app.api.schemas import SearchHitRead, SearchRead, SearchRequest
from app.api.security import RateLimitDep, ReadKeyDep
from app.catalogue.service import decode_base64_image

router = APIRouter(tags=["search"], dependencies=[RateLimitDep], responses=error_responses(429))

DESCRIPTION = """
Find the catalogue products that look most like an image.

* **Multipart** (`multipart/form-data`): an `image` file, optional `bbox` as `x,y,w,h`
  (or `bbox_x`, `bbox_y`, `bbox_w`, `bbox_h`, the Products-10K names), `k`, `category`,
  `min_score`, `flip`, `expand`.
* **JSON** (`application/json`): `image_url` or `image` (base64), optional `bbox`,
  `k`, `filters.category`, `min_score`, `flip`, `expand`.

`flip` (mirrored second view of the query) and `expand` (query expansion) switch the
search-time quality features for this request; left out, the service's settings decide
(`VS_SEARCH__*`). With product-level scoring on (`VS_SEARCH__PRODUCT_IMAGES` > 1), a
product's score blends its best image's cosine with the mean of its best images.

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
    openapi_extra=request_body(SearchRequest, SearchUpload),
)
async def search(request: Request, search: SearchDep, _key: ReadKeyDep) -> SearchRead:
    body = await read_body(request, SearchRequest, SearchUpload, max_files=1, max_fields=16)
    if isinstance(body, SearchUpload):
        query: dict[str, Any] = {
            "data": body.image,
            "box": body.box,
            "k": body.k,
            "category": body.category or None,
            "min_score": body.min_score,
            "flip": body.flip,
            "expand": body.expand,
        }
    else:
        query = {
            "data": decode_base64_image(body.image) if body.image is not None else None,
            "url": body.image_url,
            "box": body.bbox.as_box() if body.bbox else None,
            "k": body.k,
            "category": body.filters.category if body.filters else None,
            "min_score": body.min_score,
            "flip": body.flip,
            "expand": body.expand,
        }
    outcome = await search.search_image(**query)
    return SearchRead(
        results=[SearchHitRead(**hit.__dict__) for hit in outcome.hits],
        model_id=outcome.model_id,
        took_ms=outcome.took_ms,
    )
