"""Liveness and readiness probes."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from app.api.deps import StateDep
from app.api.schemas import HealthRead, ModelRead, ReadyRead
from app.api.security import MayReadDep

router = APIRouter(tags=["health"])


@router.get(
    "/health",
    summary="Liveness probe",
    description=(
        "200 while the process runs, whatever the state of the model or database: "
        "`status` is `starting` while the model loads and the index opens, then `ok`. "
        "Use `/ready` to decide whether to send traffic."
    ),
)
async def get_health(state: StateDep) -> HealthRead:
    return HealthRead(status="ok" if state.services is not None else "starting")


@router.get(
    "/ready",
    response_model=ReadyRead,
    summary="Readiness probe",
    description=(
        "200 when the service can answer searches: the model is loaded and the inference "
        "worker runs. 503 (same body, `status: starting`) otherwise. Load balancers and the "
        "Docker HEALTHCHECK use this. With read keys set (VS_API_KEYS_READ), `model` and "
        "`index` are shown only to a caller with a read key."
    ),
    responses={503: {"model": ReadyRead, "description": "Not ready yet."}},
)
async def get_readiness(state: StateDep, reader: MayReadDep) -> ReadyRead | JSONResponse:
    services = state.services
    checks = {
        "model": services is not None,
        "worker": services is not None and services.worker.running,
        "database": services is not None,
        "index": services is not None and services.index.is_open,
    }
    body = ReadyRead(
        status="ready" if all(checks.values()) else "starting",
        checks=checks,
        model=(
            ModelRead(**services.embedder.describe(), fallback=services.model_fallback)
            if services is not None and reader
            else None
        ),
        index=services.index.describe() if services is not None and reader else None,
    )
    if body.status != "ready":
        return JSONResponse(body.model_dump(), status_code=503, headers={"Retry-After": "5"})
    return body
