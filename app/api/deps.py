"""Request dependencies: typed access to the process State."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from app.catalogue.duplicates import DuplicatesService
from app.catalogue.search import SearchService
from app.catalogue.service import CatalogueService
from app.core.errors import NotReady
from app.inference.worker import BatchWorker
from app.lifespan import State


def get_state(request: Request) -> State:
    state: State = request.app.state.vs
    return state


StateDep = Annotated[State, Depends(get_state)]


def get_worker(state: StateDep) -> BatchWorker:
    if state.worker is None or not state.worker.running:
        raise NotReady("The model is still loading; retry shortly.", headers={"Retry-After": "5"})
    return state.worker


WorkerDep = Annotated[BatchWorker, Depends(get_worker)]


def get_catalogue(state: StateDep) -> CatalogueService:
    if state.catalogue is None:
        raise NotReady(
            "The service is still starting; retry shortly.", headers={"Retry-After": "5"}
        )
    return state.catalogue


CatalogueDep = Annotated[CatalogueService, Depends(get_catalogue)]


def get_search(state: StateDep) -> SearchService:
    if state.search is None:
        raise NotReady(
            "The service is still starting; retry shortly.", headers={"Retry-After": "5"}
        )
    return state.search


SearchDep = Annotated[SearchService, Depends(get_search)]


def get_duplicates(state: StateDep) -> DuplicatesService:
    if state.duplicates is None:
        raise NotReady(
            "The service is still starting; retry shortly.", headers={"Retry-After": "5"}
        )
    return state.duplicates


DuplicatesDep = Annotated[DuplicatesService, Depends(get_duplicates)]
