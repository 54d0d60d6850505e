"""Visual search route."""

from __future__ import annotations

from fastapi import APIRouter, Request

from app.api import examples
from app.api.bodies import MULTIPART, UnsupportedMediaType, read_body, read_form, request_body
from app.api.deps import SearchDep
from app.api.errors import IMAGE_ERRORS, error_responses
from app.api.forms import SearchUpload
from app.api.schemas import SearchHitRead, SearchRead, SearchRequest
from app.api.security import RateLimitDep, ReadKeyDep
from app.catalogue.search import SearchOutcome, SearchService
from app.catalogue.service import decode_base64_image
from app.core.errors import NotReady, Overloaded, RateLimited, RequestTooLarge

router = APIRouter(
    tags=["search"], dependencies=[RateLimitDep], responses=error_responses(RateLimited)
)

DESCRIPTION = """
Find the catalogue products that look most like an image, sent as JSON: exactly one of
`image_url` (fetched by the service) or `image` (the file, base64: the standard alphabet
with padding on one line; a `data:image/...;base64,` prefix is accepted; URL-safe and MIME
line-wrapped base64 are refused), optionally `bbox`, `k`, `filters`, `min_score`. To
upload the file instead, use `POST /search/upload` (multipart).

The box is in pixels of the upright image (EXIF orientation applied) and must lie inside
it. Results hold one entry per product (its best matching image), ordered by score; the
scores are cosine similarities of the embeddings. A category filter is exact: it never
returns another category, and returns k results whenever k exist. Products are
searchable as soon as `POST /products` returned for them.
"""

UPLOAD_DESCRIPTION = """
The same search with the query image uploaded as a multipart form: an `image` file,
optional `bbox` as `x,y,w,h` (or `bbox_x`, `bbox_y`, `bbox_w`, `bbox_h`, the Products-10K
names), `k`, `category`, `min_score`. Answers as `POST /search`.
"""

_ERRORS = (*IMAGE_ERRORS, RequestTooLarge, UnsupportedMediaType, NotReady, Overloaded)


@router.post(
    "/search",
    response_model=SearchRead,
    summary="Search products by image (JSON: URL or base64)",
    description=DESCRIPTION,
    responses=error_responses(*_ERRORS) | examples.ok(examples.SEARCH_READ),
    openapi_extra=request_body(SearchRequest, example=examples.SEARCH_REQUEST),
)
async def search_by_image(request: Request, search: SearchDep, _key: ReadKeyDep) -> SearchRead:
    # Multipart is still read here for clients written before /search/upload existed.
    body = await read_body(request, SearchRequest, SearchUpload, max_files=1, max_fields=16)
    if isinstance(body, SearchUpload):
        return await _search_upload(search, body)
    outcome = await search.search_image(
        data=decode_base64_image(body.image) if body.image is not None else None,
        url=body.image_url,
        box=body.bbox.as_box() if body.bbox else None,
        k=body.k,
        category=body.filters.category if body.filters else None,
        min_score=body.min_score,
    )
    return _read(outcome)


@router.post(
    "/search/upload",
    response_model=SearchRead,
    summary="Search products by an uploaded image file",
    description=UPLOAD_DESCRIPTION,
    responses=error_responses(*_ERRORS) | examples.ok(examples.SEARCH_READ),
    openapi_extra=request_body(SearchUpload, MULTIPART),
)
async def search_by_upload(request: Request, search: SearchDep, _key: ReadKeyDep) -> SearchRead:
    body = await read_form(
        request,
        SearchUpload,
        max_files=1,
        max_fields=16,
        hint=" (JSON searches go to POST /search)",
    )
    return await _search_upload(search, body)


async def _search_upload(search: SearchService, body: SearchUpload) -> SearchRead:
    outcome = await search.search_image(
        data=body.image,
        box=body.box,
        k=body.k,
        category=body.category or None,
        min_score=body.min_score,
    )
    return _read(outcome)


def _read(outcome: SearchOutcome) -> SearchRead:
    return SearchRead(
        results=[SearchHitRead(**hit.__dict__) for hit in outcome.hits],
        model_id=outcome.model_id,
        took_ms=outcome.took_ms,
    )
