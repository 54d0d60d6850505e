"""Request and response models shared by the routes (the OpenAPI contract)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field


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
    status: str = Field(examples=["ok"])


class ModelRead(BaseModel):
    model_id: str = Field(
        description="Stable id of the loaded weights; stored with every embedding."
    )
    backbone: str
    head: str
    embedding_dim: int
    input_size: int
    device: str
    precision: str
    precision_min_cosine_vs_fp32: float | None = None
    compiled: bool = False
    fallback: bool = Field(
        False, description="True when the hub model was unreachable and the generic model runs."
    )


class ReadyRead(BaseModel):
    status: str = Field(examples=["ready"], description="`ready` or `starting`.")
    checks: dict[str, bool] = Field(description="Each component and whether it is ready.")
    model: ModelRead | None = None
