"""Image thumbnails: what the review and search pages show instead of source URLs."""

from __future__ import annotations

import asyncio
from typing import Annotated

from fastapi import APIRouter, Header, Path, Response

from app.api.deps import ServicesDep
from app.api.errors import error_responses
from app.api.security import RateLimitDep, ReadKeyDep, ScopeDep
from app.catalogue.thumbnails import get_thumbnail
from app.core.errors import RateLimited, ThumbnailNotFound
from app.imaging.thumbnail import THUMBNAIL_SIZE, THUMBNAIL_TYPE

router = APIRouter(
    prefix="/images",
    tags=["products"],
    dependencies=[RateLimitDep],
    responses=error_responses(RateLimited),
)


@router.get(
    "/{image_id}/thumbnail",
    operation_id="get_image_thumbnail",
    summary="Get an image's thumbnail",
    description=(
        f"A WebP copy of a product image, its longest side at most {THUMBNAIL_SIZE} px, "
        "made when the image was ingested (`vsearch thumbnails backfill` makes them for "
        "images ingested before). Image ids come from products, search results and "
        "duplicate pairs. The `ETag` changes only when the image's bytes do: send it back "
        "as `If-None-Match` for a 304 without a body. An image of a product outside the "
        "sets of a scoped key is a 404."
    ),
    response_class=Response,
    responses={
        200: {
            "description": "The thumbnail, sent as `image/webp`.",
            "content": {
                THUMBNAIL_TYPE: {"schema": {"type": "string", "format": "binary"}},
                # Listed too so generators that know only generic binaries (as
                # openapi-python-client 0.29) type the answer as bytes instead of dropping it.
                "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
            },
        },
        304: {"description": "Not modified: the `If-None-Match` ETag is current."},
        **error_responses(ThumbnailNotFound),
    },
)
async def get_image_thumbnail(
    services: ServicesDep,
    _key: ReadKeyDep,
    scope: ScopeDep,
    image_id: Annotated[int, Path(ge=1, le=2**63 - 1, description="The image's id.")],
    if_none_match: Annotated[str | None, Header(description="The ETag of a copy you hold.")] = None,
) -> Response:
    thumbnail = await asyncio.to_thread(get_thumbnail, services.db, image_id, scope)
    headers = {"ETag": thumbnail.etag, "Cache-Control": "private, max-age=3600"}
    if if_none_match and thumbnail.etag in {t.strip() for t in if_none_match.split(",")}:
        return Response(status_code=304, headers=headers)
    return Response(thumbnail.webp, media_type=THUMBNAIL_TYPE, headers=headers)
