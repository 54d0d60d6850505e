"""Multipart forms of the routes that also take JSON. Their fields reuse the JSON models'
field definitions (limits, descriptions, examples), so the two bodies cannot drift apart."""

from __future__ import annotations

from typing import Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    Json,
    field_validator,
    model_validator,
)

from app.api.schemas import (
    Labels,
    Name,
    ProductIn,
    SearchFilters,
    SearchRequest,
    Sets,
    Text,
    optional_attributes,
    optional_labels,
)
from app.imaging.crop import Box

# A FieldInfo as the default carries the JSON model's default, limits and docs over
# (pydantic supports it; mypy sees only the assignment, hence the ignores below).
_product = ProductIn.model_fields
_search = SearchRequest.model_fields


class ProductUpload(BaseModel):
    """One product as a multipart form: its fields and one or more `image` files."""

    model_config = ConfigDict(extra="forbid")

    id: Name = _product["id"]  # type: ignore[assignment]
    title: Text | None = _product["title"]  # type: ignore[assignment]
    category: Name | None = _product["category"]  # type: ignore[assignment]
    attributes: Json[dict[str, Any]] | None = Field(
        None, description="A JSON object, as text (free-form data kept with the product)."
    )
    labels: Json[Labels] | None = Field(
        None,
        description='Labels as JSON text, key -> values: `{"color": ["red", "blue"]}`. '
        "Omitted: a re-post keeps the stored labels.",
    )
    sets: Json[Sets] | None = Field(
        None,
        description='The product sets as JSON text: `["catalogue"]`. Omitted: a re-post keeps '
        "the stored sets.",
    )
    image: list[bytes] = Field(
        min_length=1,
        max_length=64,
        description="One or more image files (JPEG, PNG, WebP, GIF), in order.",
    )

    _labels = field_validator("labels")(optional_labels)
    _bounded = field_validator("attributes")(optional_attributes)


class SearchUpload(BaseModel):
    """A search as a multipart form: an `image` file and the same options as JSON."""

    model_config = ConfigDict(extra="forbid")

    image: bytes = Field(description="The query image file.")
    bbox: str | None = Field(
        None, description="Crop box `x,y,w,h` in pixels.", examples=["0,0,300,400"]
    )
    bbox_x: float | None = Field(None, ge=0, description="Left edge (Products-10K name).")
    bbox_y: float | None = Field(None, ge=0, description="Top edge.")
    bbox_w: float | None = Field(None, gt=0, description="Width.")
    bbox_h: float | None = Field(None, gt=0, description="Height.")
    k: int = _search["k"]  # type: ignore[assignment]
    category: Name | None = SearchFilters.model_fields["category"]  # type: ignore[assignment]
    filters: Json[SearchFilters] | None = Field(
        None,
        description='A filter expression as JSON text: `{"must": {"color": ["red"]}, '
        '"must_not": {"brand": ["Acme"]}}`.',
    )
    min_score: float | None = _search["min_score"]  # type: ignore[assignment]
    flip: bool | None = _search["flip"]  # type: ignore[assignment]
    expand: bool | None = _search["expand"]  # type: ignore[assignment]
    group_size: int = _search["group_size"]  # type: ignore[assignment]

    @model_validator(mode="after")
    def _one_box_spelling(self) -> SearchUpload:
        parts = (self.bbox_x, self.bbox_y, self.bbox_w, self.bbox_h)
        given = [p is not None for p in parts]
        if self.bbox is not None and any(given):
            raise ValueError("give `bbox` or bbox_x/bbox_y/bbox_w/bbox_h, not both")
        if any(given) and not all(given):
            raise ValueError("give all of bbox_x, bbox_y, bbox_w, bbox_h")
        if self.bbox is not None:
            try:
                x, y, w, h = (float(v) for v in self.bbox.split(","))
            except ValueError:
                raise ValueError("`bbox` must be four numbers `x,y,w,h`") from None
            if x < 0 or y < 0 or w <= 0 or h <= 0:
                raise ValueError("`bbox` needs x, y >= 0 and w, h > 0")
        return self

    @property
    def box(self) -> Box | None:
        if self.bbox is not None:
            x, y, w, h = (float(v) for v in self.bbox.split(","))
            return Box(x, y, w, h)
        if self.bbox_x is not None:
            return Box(self.bbox_x, self.bbox_y or 0.0, self.bbox_w or 0.0, self.bbox_h or 0.0)
        return None
