"""More search: like a stored product or image (nothing uploaded), and several image
queries in one request."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from fastapi import APIRouter

from app.api.deps import SearchDep
from app.api.errors import error_responses
from app.api.schemas import (
    BatchSearchItemRead,
    BatchSearchRead,
    BatchSearchRequest,
    ErrorBody,
    ImageMatchRead,
    SearchHitRead,
    SearchRead,
    SearchRequest,
    SimilarSearchRequest,
)
from app.api.security import RateLimitDep, ReadKeyDep, ScopeDep
from app.catalogue.scope import Scope, restrict, shown_sets
from app.catalogue.search import SearchHit, SearchService
from app.catalogue.service import decode_base64_image
from app.core.errors import (
    ImageNotFound,
    InvalidRequest,
    Overloaded,
    ProductNotFound,
    RateLimited,
    RequestTooLarge,
    ServiceError,
)

router = APIRouter(
    prefix="/search",
    tags=["search"],
    dependencies=[RateLimitDep],
    responses=error_responses(RateLimited),
)


def hit_read(hit: SearchHit, scope: Scope = None) -> SearchHitRead:
    return SearchHitRead(
        id=hit.id,
        score=hit.score,
        title=hit.title,
        category=hit.category,
        image_id=hit.image_id,
        image_url=hit.image_url,
        labels=hit.labels,
        sets=shown_sets(hit.sets, scope),
        images=[
            ImageMatchRead(image_id=m.image_id, score=m.score, image_url=m.image_url)
            for m in hit.images
        ],
    )


@router.post(
    "/similar",
    response_model=SearchRead,
    operation_id="search_similar",
    summary="Search products like a stored product or image",
    description=(
        "More like this: give `product_id` (its images are the queries; a product scores "
        "its best match over them) or `image_id` (one stored image). Nothing is uploaded or "
        "embedded, and the product itself is never in the results. `k`, `filters`, "
        "`min_score` and `group_size` work as in `POST /search`. With a key scoped to "
        "product sets, a product or image outside them is a 404 and results stay within them."
    ),
    responses=error_responses(ProductNotFound, ImageNotFound, InvalidRequest, Overloaded),
)
async def search_similar(
    body: SimilarSearchRequest, search: SearchDep, _key: ReadKeyDep, scope: ScopeDep
) -> SearchRead:
    outcome = await search.search_similar(
        product_id=body.product_id,
        image_id=body.image_id,
        k=body.k,
        where=body.filters.as_filter() if body.filters else None,
        min_score=body.min_score,
        group_size=body.group_size,
        scope=scope,
    )
    return SearchRead(
        results=[hit_read(h, scope) for h in outcome.hits],
        model_id=outcome.model_id,
        took_ms=outcome.took_ms,
    )


@router.post(
    "/batch",
    response_model=BatchSearchRead,
    operation_id="search_batch",
    summary="Search with several images in one request",
    description=(
        "Up to 32 queries, each a `POST /search` JSON body; the response holds one entry "
        "per query in the order sent. The queries run concurrently and are admitted one by "
        "one: a query that fails (an undecodable image, a URL that does not answer, the "
        "service busy) carries its own `error` and the others still run, so the response "
        "is 200 whenever the request itself is well-formed. A key scoped to product sets "
        "finds only their products, as in `POST /search`."
    ),
    responses=error_responses(RequestTooLarge, InvalidRequest),
)
async def search_batch(
    body: BatchSearchRequest, search: SearchDep, _key: ReadKeyDep, scope: ScopeDep
) -> BatchSearchRead:
    started = time.perf_counter()
    responses = await asyncio.gather(*(_one(search, query, scope) for query in body.queries))
    took = round((time.perf_counter() - started) * 1000, 2)
    return BatchSearchRead(responses=list(responses), model_id=search.model_id, took_ms=took)


async def _one(search: SearchService, query: SearchRequest, scope: Scope) -> BatchSearchItemRead:
    try:
        arguments: dict[str, Any] = {
            "data": decode_base64_image(query.image) if query.image is not None else None,
            "url": query.image_url,
            "box": query.bbox.as_box() if query.bbox else None,
            "k": query.k,
            "where": restrict(query.filters.as_filter() if query.filters else None, scope),
            "min_score": query.min_score,
            "group_size": query.group_size,
        }
        outcome = await search.search_image(**arguments)
    except ServiceError as exc:
        return BatchSearchItemRead(error=ErrorBody(code=exc.code, message=exc.message))
    return BatchSearchItemRead(results=[hit_read(h, scope) for h in outcome.hits])
