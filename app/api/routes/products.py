"""Catalogue routes: index, read, list and delete products."""

from __future__ import annotations

import asyncio
from typing import Annotated

import numpy as np
from fastapi import APIRouter, Query, Request, Response

import app.api.paths  # noqa: F401 - registers the `product_id` path convertor
from app.api import examples
from app.api.bodies import (
    MULTIPART,
    UnsupportedMediaType,
    read_body,
    read_form,
    request_body,
)
from app.api.deps import CatalogueDep, StateDep
from app.api.errors import IMAGE_ERRORS, error_responses
from app.api.filters import ExcludeLabelQuery, LabelQuery, label_map
from app.api.forms import ProductUpload
from app.api.schemas import (
    ErrorBody,
    ImageRead,
    ProductIn,
    ProductRead,
    ProductResultRead,
    ProductsCreate,
    ProductsCreateRead,
    ProductsRead,
)
from app.api.security import RateLimitDep, ReadKeyDep, ScopeDep, WriteKeyDep
from app.catalogue.filters import LabelFilter
from app.catalogue.models import Product, ProductImage
from app.catalogue.scope import Scope, restrict, sets_within, shown_sets
from app.catalogue.service import ImageInput, ProductInput, ProductResult
from app.core.cursor import InvalidCursor, decode_cursor, encode_cursor
from app.core.errors import (
    Forbidden,
    InvalidRequest,
    NotReady,
    ProductNotFound,
    RateLimited,
    RequestTooLarge,
)

router = APIRouter(
    prefix="/products",
    tags=["products"],
    dependencies=[RateLimitDep],
    responses=error_responses(RateLimited),
)

CREATE_DESCRIPTION = """
Index up to `VS_MAX_PRODUCTS_PER_REQUEST` products (default 64) in one call, as JSON:
`{"products": [...]}`. Each image is exactly one of `{"url": ...}` (fetched by the
service) or `{"data": "<base64>"}`, optionally with a `box` to crop before embedding.
Base64 is the standard alphabet (RFC 4648 section 4) with padding, on one line; a
`data:image/...;base64,` prefix is accepted; URL-safe and MIME line-wrapped base64 are
refused. To upload image files instead, use `POST /products/upload` (multipart).

Re-posting an `id` replaces that product's fields and images (an idempotent upsert):
images whose bytes did not change are not embedded again, and a re-post of identical
content reports `unchanged`. Each product is stored in its own transaction: a product
that fails (`status: failed`, with its `error`) leaves nothing behind and does not affect
the others, so the response is 200 whenever the request itself is well-formed. Products
are searchable as soon as this call returns.

A key scoped to product sets (`VS_API_KEY_SCOPES`) must give every product `sets`, at
least one and all within its scope, else the whole request is a 403 `forbidden` and
nothing is stored. An `id` already held by a product outside the key's sets fails
(`product_not_found`) and that product is not touched. Memberships of a product in sets
outside the key's scope are kept.
"""

UPLOAD_DESCRIPTION = """
Index one product from a multipart form: fields `id`, `title`, `category`, `attributes`
(a JSON object, as text) and one or more `image` files, in order. Otherwise the same as
`POST /products` (an idempotent upsert; the result has the same shape).
"""


@router.post(
    "",
    response_model=ProductsCreateRead,
    summary="Index products (create or replace)",
    description=CREATE_DESCRIPTION,
    responses=error_responses(
        *IMAGE_ERRORS, RequestTooLarge, UnsupportedMediaType, NotReady, Forbidden
    )
    | examples.ok(examples.PRODUCTS_CREATE_READ),
    openapi_extra=request_body(ProductsCreate, example=examples.PRODUCTS_CREATE),
)
async def create_products(
    request: Request, state: StateDep, catalogue: CatalogueDep, _key: WriteKeyDep, scope: ScopeDep
) -> ProductsCreateRead:
    # Multipart is still read here for clients written before /products/upload existed.
    body = await read_body(
        request,
        ProductsCreate,
        ProductUpload,
        max_files=64,
        max_fields=32,
        context={"attributes": state.settings.attributes},
    )
    if isinstance(body, ProductUpload):
        inputs = [_upload_input(body)]
    else:
        limit = state.settings.max_products_per_request
        if len(body.products) > limit:
            raise InvalidRequest(
                f"At most {limit} products per request (got {len(body.products)}); split the batch."
            )
        inputs = [_product_input(p) for p in body.products]
    for product in inputs:
        sets_within(product.sets, scope, product.id)
    results = await catalogue.upsert_products(inputs, scope)
    return ProductsCreateRead(results=[_result(r) for r in results])


@router.post(
    "/upload",
    response_model=ProductsCreateRead,
    summary="Index one product from uploaded image files",
    description=UPLOAD_DESCRIPTION,
    responses=error_responses(
        *IMAGE_ERRORS, RequestTooLarge, UnsupportedMediaType, NotReady, Forbidden
    )
    | examples.ok(examples.PRODUCTS_CREATE_READ),
    openapi_extra=request_body(ProductUpload, MULTIPART),
)
async def upload_product(
    request: Request, state: StateDep, catalogue: CatalogueDep, _key: WriteKeyDep, scope: ScopeDep
) -> ProductsCreateRead:
    body = await read_form(
        request,
        ProductUpload,
        max_files=64,
        max_fields=32,
        context={"attributes": state.settings.attributes},
        hint=" (JSON products go to POST /products)",
    )
    product = _upload_input(body)
    sets_within(product.sets, scope, product.id)
    results = await catalogue.upsert_products([product], scope)
    return ProductsCreateRead(results=[_result(r) for r in results])


def _upload_input(body: ProductUpload) -> ProductInput:
    return ProductInput(
        id=body.id,
        title=body.title,
        category=body.category,
        attributes=body.attributes or {},
        labels=body.labels,
        sets=body.sets,
        images=[ImageInput(data=data) for data in body.image],
    )


def _product_input(p: ProductIn) -> ProductInput:
    return ProductInput(
        id=p.id,
        title=p.title,
        category=p.category,
        attributes=p.attributes,
        labels=p.labels,
        sets=p.sets,
        images=[
            ImageInput(url=img.url, data_b64=img.data, box=img.box.as_box() if img.box else None)
            for img in p.images
        ],
    )


def _result(result: ProductResult) -> ProductResultRead:
    error = None
    if result.error is not None:
        error = ErrorBody(code=result.error.code, message=result.error.message)
    return ProductResultRead(id=result.id, status=result.status, images=result.images, error=error)


def image_read(img: ProductImage, *, embeddings: bool = False) -> ImageRead:
    return ImageRead(
        image_id=img.id,
        position=img.position,
        url=img.source_url if img.source_url and "://" in img.source_url else None,
        sha256=img.sha256,
        box=img.box,
        width=img.width,
        height=img.height,
        model_id=img.model_id,
        embedding=np.frombuffer(img.embedding, dtype=np.float32).tolist() if embeddings else None,
    )


def product_read(product: Product, *, embeddings: bool = False, scope: Scope = None) -> ProductRead:
    return ProductRead(
        id=product.external_id,
        title=product.title,
        category=product.category,
        attributes=product.attributes or {},
        labels=label_map(product),
        sets=shown_sets((member.set_id for member in product.sets), scope),
        created_at=product.created_at,
        updated_at=product.updated_at,
        images=[image_read(img, embeddings=embeddings) for img in product.images],
    )


@router.get(
    "",
    response_model=ProductsRead,
    summary="List products",
    description=(
        "Products in insertion order, a page at a time; follow `next_cursor`. `label` and "
        "`exclude_label` filter as search's `filters` do: repeat `label=key:value` (AND "
        "across keys, OR within a key; `category:dairy` works too) and "
        "`exclude_label=key:value`. `total` counts every product passing the filters. "
        "A key scoped to product sets sees only the products of its sets."
    ),
    responses=error_responses(InvalidCursor, NotReady) | examples.ok(examples.PRODUCTS_READ),
)
async def list_products(
    catalogue: CatalogueDep,
    _key: ReadKeyDep,
    scope: ScopeDep,
    cursor: Annotated[str | None, Query(description="From the previous page.")] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    category: Annotated[str | None, Query(description="Only this category.")] = None,
    label: LabelQuery = None,
    exclude_label: ExcludeLabelQuery = None,
) -> ProductsRead:
    after = int(decode_cursor(cursor, "products", (int,))[0]) if cursor else None
    where = restrict(LabelFilter.parse_terms(label, exclude_label, category=category), scope)
    products = await asyncio.to_thread(
        catalogue.list_products, after_pk=after, limit=limit, where=where
    )
    total = await asyncio.to_thread(catalogue.count_products, where=where)
    next_cursor = encode_cursor("products", (products[-1].pk,)) if len(products) == limit else None
    return ProductsRead(
        products=[product_read(p, scope=scope) for p in products],
        next_cursor=next_cursor,
        total=total,
    )


@router.get(
    "/{product_id:product_id}",
    response_model=ProductRead,
    summary="Get one product",
    description="The product and its images; `?embeddings=true` adds each image's vector. "
    "A product outside the sets of a scoped key is a 404, as if it did not exist.",
    responses=error_responses(ProductNotFound, NotReady) | examples.ok(examples.PRODUCT_READ),
)
async def get_product(
    product_id: str,
    catalogue: CatalogueDep,
    _key: ReadKeyDep,
    scope: ScopeDep,
    embeddings: Annotated[bool, Query(description="Include embedding vectors.")] = False,
) -> ProductRead:
    product = await asyncio.to_thread(catalogue.get_product, product_id, scope)
    return product_read(product, embeddings=embeddings, scope=scope)


@router.delete(
    "/{product_id:product_id}",
    status_code=204,
    summary="Delete a product",
    description="Removes the product, its images (from search at once) and its duplicate pairs. "
    "A product outside the sets of a scoped key is a 404.",
    responses=error_responses(ProductNotFound, NotReady),
)
async def delete_product(
    product_id: str, catalogue: CatalogueDep, _key: WriteKeyDep, scope: ScopeDep
) -> Response:
    await catalogue.delete_product(product_id, scope)
    return Response(status_code=204)
