"""Request dependencies: one-line getters over the app's `ApiState` and its services."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from app.api.state import ApiState
from app.catalogue.duplicates import DuplicatesService
from app.catalogue.imports import ImportService
from app.catalogue.search import SearchService
from app.catalogue.service import CatalogueService
from app.core.errors import NotReady
from app.services import Services


def get_state(request: Request) -> ApiState:
    state: ApiState = request.app.state.vs
    return state


StateDep = Annotated[ApiState, Depends(get_state)]


def get_services(state: StateDep) -> Services:
    if state.services is None:
        raise NotReady("The service is starting or stopping; retry shortly.")
    return state.services


ServicesDep = Annotated[Services, Depends(get_services)]


def get_catalogue(services: ServicesDep) -> CatalogueService:
    return services.catalogue


def get_search(services: ServicesDep) -> SearchService:
    return services.search


def get_duplicates(services: ServicesDep) -> DuplicatesService:
    return services.duplicates


def get_imports(services: ServicesDep) -> ImportService:
    return services.imports


CatalogueDep = Annotated[CatalogueService, Depends(get_catalogue)]
SearchDep = Annotated[SearchService, Depends(get_search)]
DuplicatesDep = Annotated[DuplicatesService, Depends(get_duplicates)]
ImportsDep = Annotated[ImportService, Depends(get_imports)]
