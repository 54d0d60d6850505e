"""Partial updates of a product: its fields and labels (PATCH), one image added or removed.

Each has ingest's guarantees: one transaction with its change-log rows, published to the
index at once (read-your-writes), the product's duplicate pairs refreshed after an image
change, and idempotent (a repeat reports `unchanged`)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, File, Form, Path, Response

import app.api.paths  # noqa: F401 - registers the `product_id` path convertor
from app.api.deps import CatalogueDep, StateDep
from app.api.errors import IMAGE_ERRORS, error_responses
from app.api.routes.products import image_read, product_read
from app.api.schemas import (
    BoxIn,
    ImageAddRead,
    ImageIn,
    ProductPatchIn,
    ProductUpdateRead,
    check_attributes,
)
from app.api.security import RateLimitDep, ScopeDep, WriteKeyDep
from app.catalogue.service import ImageInput, ProductPatch
from app.core.errors import (
    Forbidden,
    ImageNotFound,
    InvalidRequest,
    Overloaded,
    ProductNotFound,
    RateLimited,
    RequestTooLarge,
)
from app.imaging.crop import Box

router = APIRouter(
    prefix="/products",
    tags=["products"],
    dependencies=[RateLimitDep],
    responses=error_responses(RateLimited),
)

# PATCH goes after the products router (an unknown method on /products/{id} is answered by
# that router's routes first); the image routes go before it (more specific paths).
patch_router = APIRouter(
    prefix="/products",
    tags=["products"],
    dependencies=[RateLimitDep],
    responses=error_responses(RateLimited),
)

ProductId = Annotated[str, Path(description="The product's id.", examples=["sku-123"])]


@patch_router.patch(
    "/{product_id:product_id}",
    response_model=ProductUpdateRead,
    operation_id="update_product",
    summary="Update a product's fields and labels",
    description=(
        "Sets the fields given (`title`, `category`, `attributes`, `labels`, `sets`) and "
        "keeps the "
        "others and every image: nothing is fetched or embedded. A field sent as `null` is "
        "cleared. `labels` and `attributes` are replaced as a whole. A patch that changes "
        "nothing reports `unchanged`; filters see the change at once. With a key scoped to "
        "product sets, a product outside them is a 404, and `sets` must name at least one "
        "set, all within the scope (else 403 `forbidden`); the product's memberships in "
        "sets outside the scope are kept."
    ),
    responses=error_responses(ProductNotFound, InvalidRequest, Forbidden),
)
async def update_product(
    product_id: ProductId,
    body: ProductPatchIn,
    state: StateDep,
    catalogue: CatalogueDep,
    _key: WriteKeyDep,
    scope: ScopeDep,
) -> ProductUpdateRead:
    if body.attributes is not None:
        try:
            check_attributes(body.attributes, state.settings.attributes)
        except ValueError as exc:
            raise InvalidRequest(f"attributes: {exc}") from None
    patch = ProductPatch(
        fields=frozenset(body.model_fields_set),
        title=body.title,
        category=body.category,
        attributes=body.attributes,
        labels=body.labels,
        sets=body.sets,
    )
    status, product = await catalogue.patch_product(product_id, patch, scope)
    return ProductUpdateRead(status=status, product=product_read(product, scope=scope))


@router.post(
    "/{product_id:path}/images",
    response_model=ImageAddRead,
    operation_id="add_product_image",
    summary="Add one image to a product",
    description=(
        'One image, `{"url": ...}` or `{"data": "<base64>"}` with an optional `box`, '
        "added after the product's other images; searchable when this returns. The same "
        "image (bytes and box) posted again reports `unchanged`. For a file upload use "
        "`POST /products/{product_id}/images/upload`."
    ),
    responses=error_responses(ProductNotFound, *IMAGE_ERRORS, RequestTooLarge, Overloaded),
)
async def add_product_image(
    product_id: ProductId,
    body: ImageIn,
    catalogue: CatalogueDep,
    _key: WriteKeyDep,
    scope: ScopeDep,
) -> ImageAddRead:
    image = ImageInput(
        url=body.url, data_b64=body.data, box=body.box.as_box() if body.box else None
    )
    status, stored = await catalogue.add_image(product_id, image, scope)
    return ImageAddRead(status=status, image=image_read(stored))


@router.post(
    "/{product_id:path}/images/upload",
    response_model=ImageAddRead,
    operation_id="upload_product_image",
    summary="Add one image file to a product",
    description=(
        "The multipart form of `POST /products/{product_id}/images`: an `image` file and "
        "an optional `bbox` (`x,y,w,h` in pixels)."
    ),
    responses=error_responses(ProductNotFound, *IMAGE_ERRORS, RequestTooLarge, Overloaded),
)
async def upload_product_image(
    product_id: ProductId,
    image: Annotated[bytes, File(description="The image file (JPEG, PNG, WebP, GIF).")],
    catalogue: CatalogueDep,
    _key: WriteKeyDep,
    scope: ScopeDep,
    bbox: Annotated[
        str | None, Form(description="Crop box `x,y,w,h` in pixels.", examples=["0,0,300,400"])
    ] = None,
) -> ImageAddRead:
    box: Box | None = None
    if bbox is not None:
        try:
            x, y, w, h = (float(v) for v in bbox.split(","))
            box = BoxIn(x=x, y=y, w=w, h=h).as_box()
        except ValueError:
            raise InvalidRequest(
                "`bbox` must be four numbers `x,y,w,h` (x, y >= 0; w, h > 0)."
            ) from None
    status, stored = await catalogue.add_image(product_id, ImageInput(data=image, box=box), scope)
    return ImageAddRead(status=status, image=image_read(stored))


@router.delete(
    "/{product_id:path}/images/{image_id:image_id}",
    status_code=204,
    operation_id="delete_product_image",
    summary="Remove one image of a product",
    description=(
        "Removes the image (from search at once) and the duplicate pairs resting on it; "
        "the product and its other images stay. 404 when the product has no such image."
    ),
    responses=error_responses(ProductNotFound, ImageNotFound),
)
async def delete_product_image(
    product_id: ProductId,
    image_id: Annotated[int, Path(description="The image's id (`image_id` of the product).")],
    catalogue: CatalogueDep,
    _key: WriteKeyDep,
    scope: ScopeDep,
) -> Response:
    await catalogue.remove_image(product_id, image_id, scope)
    return Response(status_code=204)
