"""Prometheus scrape endpoint."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Depends
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from app.api.deps import StateDep
from app.api.security import require_metrics_key

router = APIRouter(tags=["health"])


@router.get(
    "/metrics",
    summary="Prometheus metrics",
    description=(
        "Prometheus text format: request counts and latency per route and status, inference "
        "batch sizes, queue depth and images embedded, index vectors per shard, generation "
        "and change-log catch-up lag, duplicate pairs stored. With read keys set "
        "(VS_API_KEYS_READ) it needs one, as X-API-Key or `Authorization: Bearer <key>`."
    ),
    dependencies=[Depends(require_metrics_key)],
    response_class=Response,
    responses={
        200: {"content": {CONTENT_TYPE_LATEST: {}}, "description": "Metrics."},
    },
)
async def get_metrics(state: StateDep) -> Response:
    # Rendering walks every series: off the event loop, like any other bounded work.
    text = await asyncio.to_thread(generate_latest, state.metrics.registry)
    return Response(text, media_type=CONTENT_TYPE_LATEST)
