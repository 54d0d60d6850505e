"""Response bodies of the review workbench's calibration and audit routes."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, Field


class CalibratorRead(BaseModel):
    category: str | None = Field(description="null: the fit over all categories.")
    method: Literal["platt", "isotonic"]
    labels: int = Field(description="Review decisions it was fitted on.")
    positives: int = Field(description="Of which `same`.")
    fitted_at: datetime


class CurvePointRead(BaseModel):
    score: float
    probability: float


class ScoreBinRead(BaseModel):
    score_from: float
    score_to: float
    pairs: int = Field(description="Undecided pairs with a score in [score_from, score_to).")
    probability: float | None = Field(
        None, description="Calibrated P(same) at the bin's middle (overall fit)."
    )


class CalibrationRead(BaseModel):
    model_id: str
    calibrated: bool = Field(description="False until enough decisions exist to fit.")
    labels: int = Field(description="Review decisions stored.")
    min_labels: int = Field(description="Decisions needed (at least 5 of each kind).")
    isotonic_labels: int = Field(description="Decisions from which isotonic replaces Platt.")
    method: Literal["platt", "isotonic"] | None = None
    same_probability: float = Field(description="P(same) from which a pair is tier `same`.")
    same_score: float | None = Field(
        None, description="The lowest score at tier `same` (overall fit)."
    )
    floor: float
    fits: list[CalibratorRead] = Field(description="The overall fit, then per category.")
    curve: list[CurvePointRead] = Field(description="The overall fit from the floor to 1.")
    histogram: list[ScoreBinRead] = Field(
        description="Undecided pairs by score: remaining counts and estimated precision "
        "above any threshold (sum of probability x pairs over the bins / pairs)."
    )
