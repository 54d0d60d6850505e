"""Request and response models shared by the routes (the OpenAPI contract), and the rules
every client string obeys.

Text the service stores or filters on may not hold control characters: PostgreSQL refuses
NUL in text, and none of them means anything in an id. Ids, categories, URLs, attribute
keys, path and query parameters refuse every C0 control and DEL; free text (titles and
attribute values) keeps tab, newline and carriage return. `attributes` are bounded in
size, depth and key count (`VS_ATTRIBUTES__*`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationInfo,
    field_validator,
    model_validator,
)

from app.catalogue.filters import (
    LABEL_KEY_PATTERN,
    MAX_VALUE_LENGTH,
    MAX_VALUES_PER_KEY,
    LabelFilter,
    normalise_labels,
)
from app.core.config import AttributeSettings
from app.imaging.crop import Box

_CONTROLS = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_CONTROLS_BUT_WHITESPACE = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
CONTROL_MESSAGE = "control characters are not allowed"


def _plain(value: str) -> str:
    if _CONTROLS.search(value):
        raise ValueError(CONTROL_MESSAGE)
    return value


def _text(value: str) -> str:
    if _CONTROLS_BUT_WHITESPACE.search(value):
        raise ValueError(f"{CONTROL_MESSAGE} (tab, newline and carriage return are)")
    return value


Name = Annotated[str, AfterValidator(_plain)]
"""An id, category, URL or key: no control characters at all."""

Text = Annotated[str, AfterValidator(_text)]
"""Free text: no control characters but tab, newline and carriage return."""


def _invalid(loc: tuple[str | int, ...], message: str) -> RequestValidationError:
    return RequestValidationError([{"loc": loc, "msg": message, "type": "value_error"}])


def check_name(loc: tuple[str | int, ...], value: object) -> None:
    """422 naming `loc` when `value` is a string holding a control character."""
    if isinstance(value, str) and _CONTROLS.search(value):
        raise _invalid(loc, CONTROL_MESSAGE)


def check_text(loc: tuple[str | int, ...], value: object) -> None:
    """422 naming `loc` when free text `value` holds a control character other than
    tab, newline or carriage return."""
    if isinstance(value, str) and _CONTROLS_BUT_WHITESPACE.search(value):
        raise _invalid(loc, f"{CONTROL_MESSAGE} (tab, newline and carriage return are)")


def refuse_control_characters(request: Request) -> None:
    """Every route's path and query parameters: 422 naming the parameter, before the
    route's own validation or any query runs."""
    for name, value in request.path_params.items():
        check_name(("path", name), value)
    for name, value in request.query_params.multi_items():
        check_name(("query", name), name)
        check_name(("query", name), value)


def check_attributes(value: Mapping[str, Any], limits: AttributeSettings) -> None:
    """Raise ValueError unless `value` fits the attribute bounds and its keys and strings
    are clean. Walks iteratively and stops at the first breach, so a deep or wide value
    costs no more than the bounds allow."""
    keys = 0
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, (dict, list)) and depth > limits.max_depth:
            raise ValueError(f"attributes nest deeper than {limits.max_depth} levels")
        if isinstance(node, dict):
            keys += len(node)
            if keys > limits.max_keys:
                raise ValueError(f"attributes have more than {limits.max_keys} keys")
            for key, item in node.items():
                if not isinstance(key, str) or _CONTROLS.search(key):
                    raise ValueError(f"attribute keys: {CONTROL_MESSAGE}")
                stack.append((item, depth + 1))
        elif isinstance(node, list):
            if len(node) > limits.max_bytes // 2:
                raise ValueError(f"attributes are larger than {limits.max_bytes} bytes")
            stack.extend((item, depth + 1) for item in node)
        elif isinstance(node, str) and _CONTROLS_BUT_WHITESPACE.search(node):
            raise ValueError(f"attribute values: {CONTROL_MESSAGE}")
    try:
        size = len(json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode())
    except (UnicodeEncodeError, ValueError, TypeError):
        raise ValueError("attributes must be JSON with valid Unicode text") from None
    if size > limits.max_bytes:
        raise ValueError(f"attributes are larger than {limits.max_bytes} bytes ({size})")


LabelValue = Annotated[Name, StringConstraints(min_length=1, max_length=MAX_VALUE_LENGTH)]
"""One value of a label (no control characters)."""

LabelValues = Annotated[list[LabelValue], Field(min_length=1, max_length=MAX_VALUES_PER_KEY)]

SetId = Annotated[str, StringConstraints(pattern=LABEL_KEY_PATTERN)]
"""A product set's id: 1-64 letters, digits, `_`, `.` or `-`."""

Sets = Annotated[list[SetId], Field(max_length=64)]

Labels = dict[str, LabelValues]
"""key -> one or more values: `{"color": ["red", "blue"], "brand": ["Acme"]}`. Keys (1-64
letters, digits, `_`, `.`, `-`) are checked by a validator rather than a key pattern, so
the JSON Schema says `additionalProperties: array of strings`, which generated clients
turn into a typed map (a `patternProperties` schema they would drop)."""


class RequestModel(BaseModel):
    """Base of every JSON request body: an unknown field is a 422 naming it, never
    silently ignored (a misspelt `min_scor` or `titel` must not return wrong results)."""

    model_config = ConfigDict(extra="forbid")


def optional_labels(value: dict[str, list[str]] | None) -> dict[str, list[str]] | None:
    """Validator of an optional `labels` field (absent: keep the stored labels)."""
    return None if value is None else normalise_labels(value)


def optional_attributes(
    value: dict[str, Any] | None, info: ValidationInfo
) -> dict[str, Any] | None:
    """Validator of an optional `attributes` field: the bounds, when given."""
    if value is not None:
        check_attributes(value, (info.context or {}).get("attributes") or AttributeSettings())
    return value


class ErrorBody(BaseModel):
    code: str = Field(
        description="Stable machine-readable error code.", examples=["image_undecodable"]
    )
    message: str = Field(description="What went wrong, for a human.")
    details: list[dict[str, Any]] | None = Field(
        None, description="Per-field problems, for request validation errors."
    )


class ErrorResponse(BaseModel):
    """Every error the service returns has this shape."""

    error: ErrorBody


class HealthRead(BaseModel):
    status: Literal["ok", "starting"] = Field(examples=["ok"])


class ModelRead(BaseModel):
    model_id: str = Field(
        description="Stable id of the loaded weights; stored with every embedding."
    )
    backbone: str
    head: str = Field(description="flatten (Trendyol), avgpool or pool_linear.")
    embedding_dim: int
    input_size: int
    device: str
    precision: str
    precision_min_cosine_vs_fp32: float | None = None
    precision_speedup_vs_fp32: float | None = Field(
        None,
        description="With VS_PRECISION=auto on a CPU: fp32's time over the tried low "
        "precision's on the calibration images at start (below 1: it was slower, fp32 runs).",
    )
    compiled: bool = False
    runtime: Literal["torch", "openvino"] = Field(
        "torch", description="What runs the forward pass (VS_RUNTIME): PyTorch or OpenVINO."
    )
    allocator: str = Field(
        "system",
        description="The process's malloc: tcmalloc where installed (VS_ALLOCATOR), else system.",
    )
    fallback: bool = Field(
        False, description="True when the hub model was unreachable and the generic model runs."
    )


class ReadyRead(BaseModel):
    status: str = Field(examples=["ready"], description="`ready` or `starting`.")
    checks: dict[str, bool] = Field(description="Each component and whether it is ready.")
    model: ModelRead | None = None
    index: dict[str, Any] | None = Field(
        None, description="Index kind, generation, size per shard and change-log watermark."
    )


# products -------------------------------------------------------------------------------
class BoxIn(RequestModel):
    """A box in pixels of the upright image (Products-10K convention)."""

    x: float = Field(ge=0, description="Left edge.", examples=[0])
    y: float = Field(ge=0, description="Top edge.", examples=[0])
    w: float = Field(gt=0, description="Width.", examples=[300])
    h: float = Field(gt=0, description="Height.", examples=[400])

    def as_box(self) -> Box:
        return Box(self.x, self.y, self.w, self.h)


def _absent_not_null(schema: dict[str, Any]) -> None:
    """The field's schema as a plain string: it may be left out, but not sent as null."""
    schema.pop("default", None)
    branches = [b for b in schema.pop("anyOf", []) if b.get("type") != "null"]
    if branches:
        schema.update(branches[0])


def _no_null(value: object) -> object:
    if value is None:
        raise ValueError("omit the field instead of sending null")
    return value


class ImageIn(RequestModel):
    """One product image: exactly one of `url` or `data`."""

    # "Exactly one of" is said in the descriptions, not as a `oneOf` of `required` lists:
    # openapi-python-client turns a model with an object-level oneOf into `Any`, losing
    # the typed model generated clients need. The fields may be absent but not null
    # (`_no_null` refuses an explicit null; the schema shows a plain string).
    url: Name | None = Field(
        None,
        max_length=4096,
        description="Exactly one of `url` or `data`. Public http(s) URL of the image "
        "(private addresses are refused).",
        json_schema_extra=_absent_not_null,
        examples=["https://cdn.example.com/sku-1/front.jpg"],
    )
    data: str | None = Field(
        None,
        description="Exactly one of `url` or `data`. The image file (JPEG, PNG, WebP or "
        "GIF), base64: the standard alphabet with padding, on one line; a "
        "`data:image/...;base64,` prefix is accepted.",
        json_schema_extra=_absent_not_null,
    )
    box: BoxIn | None = Field(None, description="Crop to this box before embedding.")

    _present = field_validator("url", "data", mode="before")(_no_null)

    @model_validator(mode="after")
    def _one_source(self) -> ImageIn:
        if (self.url is None) == (self.data is None):
            raise ValueError("give exactly one of `url` or `data`")
        return self


class ProductIn(RequestModel):
    id: Name = Field(
        min_length=1,
        max_length=256,
        description="Your product id. Re-posting an id replaces that product.",
        examples=["sku-123"],
    )
    title: Text | None = Field(None, max_length=4096, examples=["Organic whole milk 1 L"])
    category: Name | None = Field(None, max_length=256, examples=["dairy"])
    attributes: dict[str, Any] = Field(
        default_factory=dict,
        description="Free-form JSON kept with the product, at most VS_ATTRIBUTES__MAX_BYTES "
        "(16 KiB) as compact JSON, VS_ATTRIBUTES__MAX_DEPTH (4) levels deep and "
        "VS_ATTRIBUTES__MAX_KEYS (64) keys in all.",
    )
    labels: Labels | None = Field(
        None,
        description="The filterable part of the product: key -> one or more values. "
        "Search, list and duplicates filter on them (with `category` as one more key, so no "
        "label may be named `category`). Omitted: a re-post keeps the stored labels; `{}` "
        "clears them.",
        examples=[{"color": ["red", "blue"], "brand": ["Acme"]}],
    )
    sets: Sets | None = Field(
        None,
        description="The product sets (catalogue partitions) the product belongs to; filters "
        "name them with the `set` key. Omitted: a re-post keeps the stored sets; `[]` "
        "removes the product from every set.",
        examples=[["catalogue"]],
    )
    images: list[ImageIn] = Field(min_length=1, max_length=64)

    @field_validator("labels")
    @classmethod
    def _labels(cls, value: dict[str, list[str]] | None) -> dict[str, list[str]] | None:
        return None if value is None else normalise_labels(value)

    @field_validator("attributes")
    @classmethod
    def _bounded(cls, value: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        limits = (info.context or {}).get("attributes") or AttributeSettings()
        check_attributes(value, limits)
        return value


class ProductsCreate(RequestModel):
    products: list[ProductIn] = Field(min_length=1, description="Products to index.")

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "products": [
                        {
                            "id": "sku-123",
                            "title": "Organic whole milk 1 L",
                            "category": "dairy",
                            "attributes": {"brand": "Arla"},
                            "labels": {"brand": ["Arla"], "fat": ["whole"]},
                            "sets": ["catalogue"],
                            "images": [{"url": "https://cdn.example.com/sku-123/front.jpg"}],
                        }
                    ]
                }
            ]
        },
    )


class ProductResultRead(BaseModel):
    id: str = Field(examples=["sku-123"])
    status: Literal["created", "updated", "unchanged", "failed"]
    images: int = Field(description="Images stored for the product (0 when failed).")
    error: ErrorBody | None = Field(None, description="Why the product failed.")


class ProductsCreateRead(BaseModel):
    """One result per posted product, in the order posted."""

    results: list[ProductResultRead]


class ImageRead(BaseModel):
    image_id: int = Field(description="The image's id in the index (search results name it).")
    position: int
    url: str | None = Field(None, description="Where the image was fetched from, if a URL.")
    sha256: str
    box: list[float] | None = None
    width: int
    height: int
    model_id: str
    embedding: list[float] | None = Field(None, description="Only with `?embeddings=true`.")


class ProductRead(BaseModel):
    id: str
    title: str | None
    category: str | None
    attributes: dict[str, Any]
    labels: dict[str, list[str]] = Field(
        default_factory=dict, description="key -> values, sorted.", examples=[{"brand": ["Arla"]}]
    )
    sets: list[str] = Field(default_factory=list, description="The product sets it is in.")
    images: list[ImageRead]
    created_at: datetime
    updated_at: datetime


class ProductsRead(BaseModel):
    products: list[ProductRead]
    next_cursor: str | None = Field(None, description="Pass as `cursor` for the next page.")
    total: int = Field(
        description="Exact number of products passing the filters, all pages together."
    )


# search ---------------------------------------------------------------------------------
class SearchFilters(RequestModel):
    """A filter expression: every key of `must` must have one of its values (AND across
    keys, OR within a key), no key of `must_not` may have any of its values. `category`
    is one more key (`"must": {"category": ["dairy", "bakery"]}`), and so is `set`, the
    product sets (`"must": {"set": ["catalogue"]}`); the `category` field is a shorthand
    for one category."""

    category: Name | None = Field(
        None, max_length=256, description="Only products of this category (exact)."
    )
    must: dict[str, LabelValues] = Field(
        default_factory=dict,
        description="key -> accepted values: a product passes when, for every key, it has "
        "at least one of them.",
        examples=[{"color": ["red", "blue"], "brand": ["Acme"]}],
    )
    must_not: dict[str, LabelValues] = Field(
        default_factory=dict,
        description="key -> refused values: a product having any of them does not pass.",
        examples=[{"color": ["green"]}],
    )

    def as_filter(self) -> LabelFilter:
        return LabelFilter.build(self.must, self.must_not, category=self.category)


class SearchRequest(RequestModel):
    """Exactly one of `image_url` or `image`."""

    image_url: Name | None = Field(
        None,
        max_length=4096,
        description="Exactly one of `image_url` or `image`. Public http(s) URL of the query image.",
        json_schema_extra=_absent_not_null,
    )
    image: str | None = Field(
        None,
        description="Exactly one of `image_url` or `image`. The query image file, base64: "
        "the standard alphabet with padding, on one line; a `data:image/...;base64,` prefix "
        "is accepted.",
        json_schema_extra=_absent_not_null,
    )

    _present = field_validator("image_url", "image", mode="before")(_no_null)
    bbox: BoxIn | None = Field(None, description="Crop the query image to this box first.")
    k: int = Field(10, ge=1, le=1000, description="How many products to return.")
    filters: SearchFilters | None = None
    min_score: float | None = Field(
        None, ge=-1.0, le=1.0, description="Drop results below this cosine similarity."
    )
    flip: bool | None = Field(
        None,
        description="Also embed the query mirrored and average the two (more robust, one "
        "more image of model time); default: `VS_SEARCH__FLIP`.",
    )
    expand: bool | None = Field(
        None,
        description="Query expansion: search again with the query averaged with its nearest "
        "catalogue images (a second index search); default: on when "
        "`VS_SEARCH__EXPANSION` > 0.",
    )
    group_size: int = Field(
        1, ge=1, le=16, description="Up to this many images of each product in its hit's `images`."
    )

    @model_validator(mode="after")
    def _one_image(self) -> SearchRequest:
        if (self.image_url is None) == (self.image is None):
            raise ValueError("give exactly one of `image_url` or `image`")
        return self

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "image_url": "https://cdn.example.com/shopper-photo.jpg",
                    "bbox": {"x": 40, "y": 60, "w": 300, "h": 420},
                    "k": 10,
                    "filters": {
                        "must": {"category": ["dairy"], "brand": ["Arla", "Lurpak"]},
                        "must_not": {"fat": ["skimmed"]},
                    },
                    "min_score": 0.3,
                }
            ],
        },
    )


class ImageMatchRead(BaseModel):
    image_id: int
    score: float = Field(description="Cosine similarity of this image to the query.")
    image_url: str | None = None


class SearchHitRead(BaseModel):
    id: str = Field(description="The product's id.", examples=["sku-123"])
    score: float = Field(
        description="The product's score, -1..1: the cosine similarity of its best matching "
        "image, blended with the mean of its best images' when product-level scoring is on "
        "(the default; VS_SEARCH__PRODUCT_WEIGHT=0 turns it off)."
    )
    title: str | None
    category: str | None
    image_id: int = Field(description="The product image that matched best.")
    image_url: str | None = Field(None, description="That image's URL, when it came from one.")
    labels: dict[str, list[str]] = Field(
        default_factory=dict, description="The product's labels (no extra request needed)."
    )
    sets: list[str] = Field(default_factory=list, description="The product sets it is in.")
    images: list[ImageMatchRead] = Field(
        default_factory=list,
        description="The product's best matching images, best first (`group_size` of them).",
    )


class SearchRead(BaseModel):
    results: list[SearchHitRead] = Field(description="One entry per product, best first.")
    model_id: str
    took_ms: float


class SimilarSearchRequest(RequestModel):
    """Exactly one of `product_id` or `image_id`."""

    product_id: Name | None = Field(
        None,
        min_length=1,
        max_length=256,
        description="More like this product (all of its images); it is never in its results.",
    )
    image_id: int | None = Field(
        None, ge=0, description="More like this stored image; its product is never in results."
    )
    k: int = SearchRequest.model_fields["k"]  # type: ignore[assignment]
    filters: SearchFilters | None = None
    min_score: float | None = SearchRequest.model_fields["min_score"]  # type: ignore[assignment]
    group_size: int = SearchRequest.model_fields["group_size"]  # type: ignore[assignment]

    @model_validator(mode="after")
    def _one_source(self) -> SimilarSearchRequest:
        if (self.product_id is None) == (self.image_id is None):
            raise ValueError("give exactly one of `product_id` or `image_id`")
        return self

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"product_id": "sku-123", "k": 5}]},
    )


class BatchSearchRequest(RequestModel):
    queries: list[SearchRequest] = Field(
        min_length=1,
        max_length=32,
        description="Up to 32 searches, each with its own image, k, filters and options.",
    )

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "queries": [
                        {"image_url": "https://cdn.example.com/photo-1.jpg", "k": 5},
                        {
                            "image_url": "https://cdn.example.com/photo-2.jpg",
                            "k": 5,
                            "filters": {"must": {"category": ["dairy"]}},
                        },
                    ]
                }
            ]
        },
    )


class BatchSearchItemRead(BaseModel):
    results: list[SearchHitRead] = Field(
        default_factory=list, description="As `POST /search` returns them; empty on error."
    )
    error: ErrorBody | None = Field(None, description="Why this query failed (the others ran).")


class BatchSearchRead(BaseModel):
    """One entry per query, in the order sent."""

    responses: list[BatchSearchItemRead]
    model_id: str
    took_ms: float


# duplicates -----------------------------------------------------------------------------
class DuplicatePairRead(BaseModel):
    a: str = Field(examples=["sku-1"])
    b: str = Field(examples=["sku-2"])
    score: float = Field(description="Cosine of the pair's best matching images.")
    a_image_id: int
    b_image_id: int
    found_at: datetime
    decision: Literal["same", "different"] | None = Field(
        None, description="A reviewer's decision on this pair, if any."
    )
    probability: float | None = Field(
        None, description="Calibrated P(same product); null until `calibrated`."
    )
    tier: Literal["exact", "same", "similar"] | None = Field(
        None,
        description="`exact`: identical or near-identical images; `same`: probability at "
        "least VS_DUPLICATES__SAME_PROBABILITY; `similar`: below it; null when neither "
        "exact nor calibrated.",
    )


class DuplicatePairsRead(BaseModel):
    pairs: list[DuplicatePairRead]
    next_cursor: str | None = Field(None, description="Pass as `cursor` for the next page.")
    calibrated: bool = Field(
        False, description="Whether probabilities exist (enough review decisions)."
    )
    total: int | None = Field(
        None, description="Exact number of pairs passing the filters, all pages together."
    )


class DuplicateGroupRead(BaseModel):
    centre: str = Field(description="The product every member matched.")
    members: list[str] = Field(description="All products of the group, the centre first.")
    min_score: float = Field(description="Weakest member-to-centre score in the group.")
    probability: float | None = Field(
        None, description="Calibrated P(same) of the weakest member-to-centre pair."
    )
    tier: Literal["exact", "same", "similar"] | None = Field(
        None, description="The tier of the weakest member-to-centre pair."
    )


class DuplicateGroupsRead(BaseModel):
    groups: list[DuplicateGroupRead]
    next_cursor: str | None = None
    calibrated: bool = Field(
        False, description="Whether probabilities exist (enough review decisions)."
    )


class DecisionCreate(RequestModel):
    a: Name = Field(min_length=1, max_length=256, examples=["sku-1"])
    b: Name = Field(min_length=1, max_length=256, examples=["sku-2"])
    decision: Literal["same", "different"]


class DecisionRead(BaseModel):
    a: str
    b: str
    decision: Literal["same", "different"]


class DecisionRecordRead(DecisionRead):
    decided_at: datetime
    decided_by: str | None = Field(
        None, description="A fingerprint of the API key that decided (never the key)."
    )


class DecisionsRead(BaseModel):
    decisions: list[DecisionRecordRead]
    next_cursor: str | None = Field(None, description="Pass as `cursor` for the next page.")


# partial updates ------------------------------------------------------------------------
class ProductPatchIn(RequestModel):
    """The fields to change; a field left out is kept, `null` clears it."""

    title: Text | None = Field(None, max_length=4096, examples=["Organic whole milk 1.5 L"])
    category: Name | None = Field(None, max_length=256, examples=["dairy"])
    attributes: dict[str, Any] | None = Field(
        None, description="Replaces the free-form attributes (same bounds as on create)."
    )
    labels: Labels | None = Field(
        None,
        description="Replaces every label (`{}` or `null` clears them).",
        examples=[{"brand": ["Arla"], "fat": ["whole"]}],
    )
    sets: Sets | None = Field(
        None, description="Replaces the product's sets (`[]` or `null`: in no set)."
    )

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"title": "Organic whole milk 1.5 L", "labels": {}}]},
    )

    _labels = field_validator("labels")(optional_labels)
    _bounded = field_validator("attributes")(optional_attributes)


class ProductUpdateRead(BaseModel):
    status: Literal["updated", "unchanged"] = Field(
        description="`unchanged` when the patch set what was already stored."
    )
    product: ProductRead


class ImageAddRead(BaseModel):
    status: Literal["updated", "unchanged"] = Field(
        description="`unchanged` when the product already had this image (same bytes and box)."
    )
    image: ImageRead
