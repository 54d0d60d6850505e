"""Visual search route."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from app.api.bodies import read_body, request_body
from app.api.deps import SearchDep
from app.api.errors import error_responses
from app.api.forms import SearchUpload
from app.api.routes.search_more import hit_read
from app.api.schemas import SearchRead, SearchRequest
from app.api.security import RateLimitDep, ReadKeyDep
from app.catalogue.service import decode_base64_image

router = APIRouter(tags=["search"], dependencies=[RateLimitDep], responses=error_responses(429))

DESCRIPTION = """
Find the catalogue products that look most like an image.

* **Multipart** (`multipart/form-data`): an `image` file, optional `bbox` as `x,y,w,h`
  (or `bbox_x`, `bbox_y`, `bbox_w`, `bbox_h`, the Products-10K names), `k`, `category`,
  `filters` (the JSON filter below, as text), `min_score`, `group_size`.
* **JSON** (`application/json`): `image_url` or `image` (base64), optional `bbox`,
  `k`, `filters`, `min_score`, `group_size` (up to that many images per product in
  each hit's `images`).

`filters` is `{"must": {key: [values]}, "must_not": {key: [values]}}` over the products'
labels, with `category` as one more key: AND across the keys of `must`, OR within a key,
and no key of `must_not` may match (`{"must": {"color": ["red", "blue"], "brand":
["Acme"]}, "must_not": {"color": ["green"]}}`). An unknown field is a 422.

The box is in pixels of the upright image (EXIF orientation applied) and must lie inside
it. Results hold one entry per product (its best matching image), ordered by score; the
scores are cosine similarities of the embeddings. Filters are exact: a result always
passes them, and k results come back whenever k products pass (the index is searched
deeper for broad filters, exactly over the matching images for selective ones). Each hit
carries the product's labels. Products are
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
            "where": body.filters.as_filter() if body.filters else None,
            "min_score": body.min_score,
            "group_size": body.group_size,
        }
    else:
        query = {
            "data": decode_base64_image(body.image) if body.image is not None else None,
            "url": body.image_url,
            "box": body.bbox.as_box() if body.bbox else None,
            "k": body.k,
            "where": body.filters.as_filter() if body.filters else None,
            "min_score": body.min_score,
            "group_size": body.group_size,
        }
    outcome = await search.search_image(**query)
    return SearchRead(
        results=[hit_read(hit) for hit in outcome.hits],
        model_id=outcome.model_id,
        took_ms=outcome.took_ms,
    )
