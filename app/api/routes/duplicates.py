"""Catalogue unification: duplicate pairs, bounded groups and review decisions."""

from __future__ import annotations

import asyncio
from typing import Annotated, Literal

from fastapi import APIRouter, Query, Request, Response

from app.api import examples
from app.api.bodies import UnsupportedMediaType, read_json, request_body
from app.api.deps import DuplicatesDep
from app.api.errors import error_responses
from app.api.filters import ExcludeLabelQuery, LabelQuery
from app.api.schemas import (
    DecisionCreate,
    DecisionRead,
    DecisionRecordRead,
    DecisionsRead,
    DuplicateGroupRead,
    DuplicateGroupsRead,
    DuplicatePairRead,
    DuplicatePairsRead,
)
from app.api.security import RateLimitDep, ReadKeyDep, ScopeDep, WriteKeyDep
from app.catalogue.calibration import Tier
from app.catalogue.filters import SET_KEY, LabelFilter
from app.catalogue.repository import PairRow
from app.catalogue.scope import restrict
from app.core.cursor import InvalidCursor, decode_cursor, encode_cursor
from app.core.errors import (
    DecisionNotFound,
    InvalidRequest,
    NotCalibrated,
    PairNotFound,
    ProductNotFound,
    RateLimited,
)

router = APIRouter(
    prefix="/duplicates",
    tags=["duplicates"],
    dependencies=[RateLimitDep],
    responses=error_responses(RateLimited),
)

MinScore = Annotated[
    float,
    Query(
        ge=-1.0,
        le=1.0,
        description="Lowest pair score to return; must be at least the floor "
        "(VS_DUPLICATES__FLOOR, default 0.80).",
    ),
]

MinProbability = Annotated[
    float | None,
    Query(
        ge=0.0,
        le=1.0,
        description="Only pairs whose calibrated P(same) is at least this (409 "
        "`not_calibrated` until enough review decisions exist). `min_score` still applies; "
        "a page may then hold fewer than `limit` pairs (follow `next_cursor`).",
    ),
]


@router.get(
    "",
    response_model=DuplicatePairsRead,
    summary="List duplicate product pairs",
    description=(
        "Product pairs whose best image pair scores at least `min_score`, highest first, "
        "a page at a time (follow `next_cursor`; the order is stable). Pairs are kept up to "
        "date on every ingest, re-image and delete. Pairs a reviewer marked `different` "
        "never come back; `undecided=true` hides every reviewed pair. With `category`, both "
        "products must be in it; likewise both must pass `label` (repeat `key:value`: AND "
        "across keys, OR within a key) and `exclude_label`; `label=set:<id>` keeps pairs "
        "inside one product set, `set_a` and `set_b` pairs across two (which incoming "
        "products already exist in the catalogue). `total` counts the pairs of all pages. "
        "A `min_score` below the floor is a 422: such pairs are not stored. Each pair "
        "carries its calibrated `probability` and `tier` (see `GET /duplicates/calibration`). "
        "A key scoped to product sets sees only pairs whose two products are both in its "
        "sets; `set_a`/`set_b` or `set` values outside them match nothing."
    ),
    responses=error_responses(InvalidCursor, NotCalibrated)
    | examples.ok(examples.DUPLICATE_PAIRS_READ),
)
async def list_duplicate_pairs(
    duplicates: DuplicatesDep,
    _key: ReadKeyDep,
    scope: ScopeDep,
    min_score: MinScore = 0.9,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    cursor: Annotated[str | None, Query(description="From the previous page.")] = None,
    category: Annotated[str | None, Query(description="Both products in this category.")] = None,
    undecided: Annotated[bool, Query(description="Only pairs nobody decided on.")] = False,
    min_probability: MinProbability = None,
    label: LabelQuery = None,
    exclude_label: ExcludeLabelQuery = None,
    set_a: Annotated[
        str | None, Query(description="With `set_b`: pairs with one product in each set.")
    ] = None,
    set_b: Annotated[str | None, Query(description="The other set (with `set_a`).")] = None,
) -> DuplicatePairsRead:
    where = restrict(LabelFilter.parse_terms(label, exclude_label), scope)
    if (set_a is None) != (set_b is None):
        raise InvalidRequest("Give both `set_a` and `set_b`, or neither.")
    between = (set_a, set_b) if set_a is not None and set_b is not None else None
    if between is not None and scope is not None and not scope.issuperset(between):
        where = LabelFilter({SET_KEY: frozenset()})  # a set outside the scope: no pair
    if min_probability is not None:
        lowest = await asyncio.to_thread(duplicates.score_for_probability, min_probability)
        if lowest is None:  # no score reaches that probability
            return DuplicatePairsRead(pairs=[], next_cursor=None, calibrated=True, total=0)
        min_score = max(min_score, lowest)
    rows, next_cursor = await asyncio.to_thread(
        duplicates.list_pairs,
        min_score=min_score,
        limit=limit,
        cursor=cursor,
        category=category,
        undecided=undecided,
        where=where,
        between=between,
    )
    total = await asyncio.to_thread(
        duplicates.count_listed_pairs,
        min_score=min_score,
        category=category,
        undecided=undecided,
        where=where,
        between=between,
    )
    calibrated, assessed = await asyncio.to_thread(duplicates.assess_pairs, rows)
    return DuplicatePairsRead(
        pairs=[
            pair_read(r, probability, tier)
            for r, (probability, tier) in zip(rows, assessed, strict=True)
            if min_probability is None or (probability or 0.0) >= min_probability
        ],
        next_cursor=next_cursor,
        calibrated=calibrated,
        total=total,
    )


@router.get(
    "/groups",
    response_model=DuplicateGroupsRead,
    summary="Group duplicates into unification clusters",
    description=(
        "Products grouped by their duplicate pairs at `min_score`, without plain transitive "
        "chaining: a group grows around a centre (the product with the most strong "
        "matches), and a product joins only if it matches the centre and at least half of "
        "the members already in. So A~B and B~C put A and C together only if A~C too. "
        "Products left out of a group still appear in `GET /duplicates`. Biggest groups "
        "first; `limit`/`cursor` page through them. A key scoped to product sets groups "
        "only the products of its sets."
    ),
    responses=error_responses(InvalidCursor) | examples.ok(examples.DUPLICATE_GROUPS_READ),
)
async def list_duplicate_groups(
    duplicates: DuplicatesDep,
    _key: ReadKeyDep,
    scope: ScopeDep,
    min_score: MinScore = 0.9,
    category: Annotated[str | None, Query(description="Both products in this category.")] = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 100,
    cursor: Annotated[str | None, Query(description="From the previous page.")] = None,
    label: LabelQuery = None,
    exclude_label: ExcludeLabelQuery = None,
) -> DuplicateGroupsRead:
    where = restrict(LabelFilter.parse_terms(label, exclude_label), scope)
    found = await asyncio.to_thread(
        duplicates.groups, min_score=min_score, category=category, where=where
    )
    if cursor:
        # Keyset paging on the groups' order (size, weakest score, centre): a catalogue
        # change between pages shifts no group the client has not seen past the cursor.
        size, score, centre = decode_cursor(cursor, "groups", (int, float, str))
        after = (-int(size), -float(score), str(centre))
        found = [g for g in found if (-len(g.members), -g.min_score, g.centre) > after]
    page = found[:limit]
    next_cursor = (
        encode_cursor("groups", (len(page[-1].members), page[-1].min_score, page[-1].centre))
        if len(found) > limit
        else None
    )
    calibrated, assessed = await asyncio.to_thread(duplicates.assess_groups, page)
    return DuplicateGroupsRead(
        groups=[
            DuplicateGroupRead(
                centre=g.centre,
                members=g.members,
                min_score=g.min_score,
                probability=probability,
                tier=tier,
            )
            for g, (probability, tier) in zip(page, assessed, strict=True)
        ],
        next_cursor=next_cursor,
        calibrated=calibrated,
    )


@router.post(
    "/decisions",
    response_model=DecisionRead,
    summary="Record a review decision on a pair",
    description=(
        "`same`: the two products are one (the pair is kept, marked). `different`: they are "
        "not; the pair disappears from `GET /duplicates` and no later scan brings it back. "
        "A new decision on the same pair replaces the old one. The time and a fingerprint "
        "of the API key are stored with it. Only pairs the service found (in "
        "`GET /duplicates`, or decided before) can be decided on: others are a 404 "
        "`pair_not_found`. With a key scoped to product sets, a product outside them is a "
        "404 `product_not_found`, as if it did not exist."
    ),
    responses=error_responses(ProductNotFound, PairNotFound, UnsupportedMediaType)
    | examples.ok(examples.DECISION_READ),
    openapi_extra=request_body(DecisionCreate, example=examples.DECISION_CREATE),
)
async def create_decision(
    request: Request, duplicates: DuplicatesDep, api_key: WriteKeyDep, scope: ScopeDep
) -> DecisionRead:
    body = await read_json(request, DecisionCreate)
    await asyncio.to_thread(duplicates.decide, body.a, body.b, body.decision, api_key, scope)
    return DecisionRead(a=body.a, b=body.b, decision=body.decision)


@router.get(
    "/decisions",
    response_model=DecisionsRead,
    summary="List review decisions",
    description=(
        "Every recorded decision, `same` and `different` alike (filter with `decision`), "
        "a page at a time in a stable order; follow `next_cursor`. A key scoped to product "
        "sets sees the decisions on pairs of its sets only."
    ),
    responses=error_responses(InvalidCursor) | examples.ok(examples.DECISIONS_READ),
)
async def list_decisions(
    duplicates: DuplicatesDep,
    _key: ReadKeyDep,
    scope: ScopeDep,
    decision: Annotated[
        Literal["same", "different"] | None, Query(description="Only this decision.")
    ] = None,
    cursor: Annotated[str | None, Query(description="From the previous page.")] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> DecisionsRead:
    rows, next_cursor = await asyncio.to_thread(
        duplicates.list_decisions, decision=decision, cursor=cursor, limit=limit, scope=scope
    )
    return DecisionsRead(
        decisions=[
            DecisionRecordRead(
                a=r.a,
                b=r.b,
                decision=r.decision,
                decided_at=r.decided_at,
                decided_by=r.decided_by,
            )
            for r in rows
        ],
        next_cursor=next_cursor,
    )


@router.delete(
    "/decisions",
    status_code=204,
    summary="Undo a review decision",
    description=(
        "Forgets the decision on the pair `a`, `b` (in either order). A pair that was "
        "hidden as `different` is looked for again at once and is back in "
        "`GET /duplicates` when its images still match above the floor. With a key scoped "
        "to product sets, a product outside them is a 404."
    ),
    responses=error_responses(ProductNotFound, DecisionNotFound),
)
async def delete_decision(
    duplicates: DuplicatesDep,
    _key: WriteKeyDep,
    scope: ScopeDep,
    a: Annotated[str, Query(min_length=1, max_length=256, description="One product id.")],
    b: Annotated[str, Query(min_length=1, max_length=256, description="The other.")],
) -> Response:
    await asyncio.to_thread(duplicates.undo, a, b, scope)
    return Response(status_code=204)


def pair_read(row: PairRow, probability: float | None, tier: Tier | None) -> DuplicatePairRead:
    """One stored pair as the API shows it, with its calibrated assessment."""
    return DuplicatePairRead(
        a=row.a,
        b=row.b,
        score=row.score,
        a_image_id=row.a_image_id,
        b_image_id=row.b_image_id,
        found_at=row.found_at,
        decision=row.decision,
        probability=probability,
        tier=tier,
    )
