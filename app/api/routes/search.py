"""Visual search route."""

from __future__ import annotations

from fastapi import APIRouter, Request

from app.api import examples
from app.api.bodies import MULTIPART, UnsupportedMediaType, read_body, read_form, request_body
from app.api.deps import SearchDep
from app.api.errors import IMAGE_ERRORS, error_responses
from app.api.forms import SearchUpload
from app.api.routes.search_more import hit_read
from app.api.schemas import SearchRead, SearchRequest
from app.api.security import RateLimitDep, ReadKeyDep, ScopeDep
from app.catalogue.scope import Scope, restrict
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
line-wrapped base64 are refused), optionally `bbox`, `k`, `filters`, `min_score`, `flip`,
`expand`. To upload the file instead, use `POST /search/upload` (multipart).

`flip` (mirrored second view of the query) and `expand` (query expansion) switch the
search-time quality features for this request; left out, the service's settings decide
(`VS_SEARCH__*`). With product-level scoring on (`VS_SEARCH__PRODUCT_IMAGES` > 1), a
product's score blends its best image's cosine with the mean of its best images.

`filters` is `{"must": {key: [values]}, "must_not": {key: [values]}}` over the products'
labels, with `category` as one more key: AND across the keys of `must`, OR within a key,
and no key of `must_not` may match (`{"must": {"color": ["red", "blue"], "brand":
["Acme"]}, "must_not": {"color": ["green"]}}`). An unknown field is a 422. `group_size`
puts up to that many images of each product in its hit's `images`.

The box is in pixels of the upright image (EXIF orientation applied) and must lie inside
it. Results hold one entry per product (its best matching image), ordered by score; the
scores are cosine similarities of the embeddings. Filters are exact: a result always
passes them, and k results come back whenever k products pass (the index is searched
deeper for broad filters, exactly over the matching images for selective ones). Each hit
carries the product's labels. Products are
searchable as soon as `POST /products` returned for them. A key scoped to product sets
finds only the products of its sets (the filter is AND-ed with them, so results stay
exact); `set` filter values outside its scope match nothing.
"""

UPLOAD_DESCRIPTION = """
The same search with the query image uploaded as a multipart form: an `image` file,
optional `bbox` as `x,y,w,h` (or `bbox_x`, `bbox_y`, `bbox_w`, `bbox_h`, the Products-10K
names), `k`, `category`, `filters` (the JSON filter of `POST /search`, as text),
`min_score`, `group_size`, `flip`, `expand`. Answers as `POST /search`.
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
async def search_by_image(
    request: Request, search: SearchDep, _key: ReadKeyDep, scope: ScopeDep
) -> SearchRead:
    # Multipart is still read here for clients written before /search/upload existed.
    body = await read_body(request, SearchRequest, SearchUpload, max_files=1, max_fields=16)
    if isinstance(body, SearchUpload):
        return await _search_upload(search, body, scope)
    outcome = await search.search_image(
        data=decode_base64_image(body.image) if body.image is not None else None,
        url=body.image_url,
        box=body.bbox.as_box() if body.bbox else None,
        k=body.k,
        where=restrict(body.filters.as_filter() if body.filters else None, scope),
        min_score=body.min_score,
        group_size=body.group_size,
        flip=body.flip,
        expand=body.expand,
    )
    return _read(outcome, scope)


@router.post(
    "/search/upload",
    response_model=SearchRead,
    summary="Search products by an uploaded image file",
    description=UPLOAD_DESCRIPTION,
    responses=error_responses(*_ERRORS) | examples.ok(examples.SEARCH_READ),
    openapi_extra=request_body(SearchUpload, MULTIPART),
)
async def search_by_upload(
    request: Request, search: SearchDep, _key: ReadKeyDep, scope: ScopeDep
) -> SearchRead:
    body = await read_form(
        request,
        SearchUpload,
        max_files=1,
        max_fields=16,
        hint=" (JSON searches go to POST /search)",
    )
    return await _search_upload(search, body, scope)


async def _search_upload(search: SearchService, body: SearchUpload, scope: Scope) -> SearchRead:
    outcome = await search.search_image(
        data=body.image,
        box=body.box,
        k=body.k,
        category=body.category or None,
        where=restrict(body.filters.as_filter() if body.filters else None, scope),
        min_score=body.min_score,
        group_size=body.group_size,
        flip=body.flip,
        expand=body.expand,
    )
    return _read(outcome, scope)


def _read(outcome: SearchOutcome, scope: Scope) -> SearchRead:
    return SearchRead(
        results=[hit_read(hit, scope) for hit in outcome.hits],
        model_id=outcome.model_id,
        took_ms=outcome.took_ms,
    )
