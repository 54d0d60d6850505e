"""Calibrated duplicate probabilities and the audit sample: what the review page's
threshold slider and audit tab read, and what a client uses to pick thresholds."""

from __future__ import annotations

import asyncio
from typing import Annotated

import numpy as np
from fastapi import APIRouter, Query

from app.api.deps import DuplicatesDep
from app.api.errors import error_responses
from app.api.review_schemas import CalibrationRead, CalibratorRead, CurvePointRead, ScoreBinRead
from app.api.routes.duplicates import pair_read
from app.api.schemas import DuplicatePairsRead
from app.api.security import RateLimitDep, ReadKeyDep, ScopeDep, UnscopedDep, WriteKeyDep
from app.catalogue.calibration import Calibration
from app.catalogue.duplicates import DuplicatesService
from app.catalogue.scope import restrict
from app.core.errors import Forbidden, RateLimited

router = APIRouter(
    prefix="/duplicates",
    tags=["duplicates"],
    dependencies=[RateLimitDep],
    responses=error_responses(RateLimited),
)

UNSCOPED = (
    "It spans the whole catalogue, so a key scoped to product sets (`VS_API_KEY_SCOPES`) "
    "gets a 403 `forbidden`."
)

CALIBRATION_DESCRIPTION = (
    "P(same product | score) for the loaded model, fitted on the review decisions: Platt "
    "scaling (logistic) from `min_labels` decisions, isotonic regression from "
    "`isotonic_labels`; a category with enough decisions of its own gets its own fit. "
    "`calibrated` is false until then, and no probability is given. It is refitted "
    "automatically as decisions come in. `histogram` counts the undecided pairs by score, "
    "with the probability at each bin: the pairs left above a threshold and the estimated "
    "precision there (the mean probability of those pairs)."
)


def _calibration_read(duplicates: DuplicatesService, calibration: Calibration) -> CalibrationRead:
    policy = duplicates.calibration.policy
    overall = calibration.overall
    floor = duplicates.floor
    grid = np.linspace(floor, 1.0, 41)
    curve = (
        [
            CurvePointRead(score=float(s), probability=float(p))
            for s, p in zip(grid, overall.probability(grid), strict=True)
        ]
        if overall is not None
        else []
    )
    bins = duplicates.open_score_histogram()
    middles = [(lo + hi) / 2 for lo, hi, _ in bins]
    probabilities = overall.probability(middles).tolist() if overall is not None else None
    return CalibrationRead(
        model_id=calibration.model_id,
        calibrated=calibration.calibrated,
        labels=calibration.labels,
        min_labels=policy.min_labels,
        isotonic_labels=policy.isotonic_labels,
        method=overall.method if overall is not None else None,
        same_probability=policy.same_probability,
        same_score=(
            overall.lowest_score_for(policy.same_probability, floor)
            if overall is not None
            else None
        ),
        floor=floor,
        fits=[
            CalibratorRead(
                category=c.category or None,
                method=c.method,
                labels=c.labels,
                positives=c.positives,
                fitted_at=c.fitted_at,
            )
            for c in calibration.all()
        ],
        curve=curve,
        histogram=[
            ScoreBinRead(
                score_from=lo,
                score_to=hi,
                pairs=n,
                probability=probabilities[i] if probabilities is not None else None,
            )
            for i, (lo, hi, n) in enumerate(bins)
        ],
    )


@router.get(
    "/calibration",
    response_model=CalibrationRead,
    operation_id="get_duplicates_calibration",
    summary="Show the calibration of duplicate scores",
    description=CALIBRATION_DESCRIPTION + " " + UNSCOPED,
    dependencies=[UnscopedDep],
    responses=error_responses(Forbidden),
)
async def get_duplicates_calibration(
    duplicates: DuplicatesDep, _key: ReadKeyDep
) -> CalibrationRead:
    def read() -> CalibrationRead:
        return _calibration_read(duplicates, duplicates.current_calibration())

    return await asyncio.to_thread(read)


@router.post(
    "/calibration",
    response_model=CalibrationRead,
    operation_id="fit_duplicates_calibration",
    summary="Fit the calibration now",
    description="Fit P(same | score) on the decisions stored now (it is also refitted "
    "automatically every `VS_DUPLICATES__CALIBRATION_REFIT_EVERY` decisions). " + UNSCOPED,
    dependencies=[UnscopedDep],
    responses=error_responses(Forbidden),
)
async def fit_duplicates_calibration(
    duplicates: DuplicatesDep, _key: WriteKeyDep
) -> CalibrationRead:
    def fit() -> CalibrationRead:
        return _calibration_read(duplicates, duplicates.fit_calibration())

    return await asyncio.to_thread(fit)


@router.get(
    "/audit",
    response_model=DuplicatePairsRead,
    operation_id="sample_duplicates_for_audit",
    summary="Draw an audit sample of pairs",
    description=(
        "Undecided pairs drawn at random from ten equal score strata between the floor and "
        "1, also below the review threshold, so that decisions (and the calibration fitted "
        "on them) are not biased to the top of the queue. Each call draws anew. A key "
        "scoped to product sets draws from the pairs of its sets only."
    ),
)
async def sample_duplicates_for_audit(
    duplicates: DuplicatesDep,
    _key: ReadKeyDep,
    scope: ScopeDep,
    size: Annotated[int, Query(ge=1, le=500, description="How many pairs.")] = 50,
) -> DuplicatePairsRead:
    rows = await asyncio.to_thread(duplicates.audit_sample, size, where=restrict(None, scope))
    calibrated, assessed = await asyncio.to_thread(duplicates.assess_pairs, rows)
    return DuplicatePairsRead(
        pairs=[
            pair_read(r, probability, tier)
            for r, (probability, tier) in zip(rows, assessed, strict=True)
        ],
        next_cursor=None,
        calibrated=calibrated,
    )
