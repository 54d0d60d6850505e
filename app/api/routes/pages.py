"""The workbench pages: search by photo and duplicates review, rendered by the service.

Server-rendered Jinja2 templates plus one small script and one stylesheet from
`app/api/ui/static`; nothing is built and nothing is loaded from another host. The pages
themselves hold no catalogue data, so they are open; the data comes from the API with the
key the reviewer enters (kept in the browser's session storage), under the same read and
write key rules as any other client.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, FastAPI, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates

from app.api.deps import StateDep

UI = Path(__file__).resolve().parents[1] / "ui"
ROOT = "/ui"
STATIC = f"{ROOT}/static"

templates = Jinja2Templates(directory=str(UI / "templates"))
router = APIRouter(prefix=ROOT, include_in_schema=False)

# The pages allow only their own script, style and images (blob: for thumbnails fetched
# with the key); a stray external reference would be blocked and show in the console.
CSP = (
    "default-src 'self'; img-src 'self' blob: data:; script-src 'self'; "
    "style-src 'self'; connect-src 'self'; object-src 'none'; base-uri 'none'; "
    "frame-ancestors 'none'"
)


def _page(
    request: Request, state: StateDep, page: str, title: str, threshold: float | None = None
) -> HTMLResponse:
    floor = state.settings.duplicates.floor
    start = max(floor, 0.9 if threshold is None else min(threshold, 1.0))
    context = {
        "page": page,
        "title": title,
        "root": ROOT,
        "static": STATIC,
        "floor": f"{floor:g}",
        "threshold": f"{start:g}",
    }
    response = templates.TemplateResponse(request, f"{page}.html", context)
    response.headers["Content-Security-Policy"] = CSP
    response.headers["Cache-Control"] = "no-cache"
    return response


@router.get("", response_class=RedirectResponse)
async def workbench_home() -> RedirectResponse:
    return RedirectResponse(f"{ROOT}/review")


@router.get("/review", response_class=HTMLResponse)
async def review_page(
    request: Request,
    state: StateDep,
    min_score: Annotated[float | None, Query(ge=-1.0, le=1.0)] = None,
) -> HTMLResponse:
    """The review page; `?min_score=` sets where the threshold slider starts."""
    return _page(request, state, "review", "Review duplicates", min_score)


@router.get("/search", response_class=HTMLResponse)
async def search_page(request: Request, state: StateDep) -> HTMLResponse:
    return _page(request, state, "search", "Search by photo")


def install_pages(app: FastAPI) -> None:
    app.include_router(router)
    app.mount(STATIC, StaticFiles(directory=UI / "static"), name="workbench-static")
