"""What the HTTP layer holds per app: settings, access rules, metrics, and the services.

The services are opened by the lifespan (`app.main.lifespan`) through the one composition
root, `app.services.open_services`; everything else here is derived from the settings when
the app is created, so middleware and probes work before the model has loaded.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from app.api.observability import ServiceMetrics
from app.core.config import Settings
from app.core.ratelimit import ClientLimits
from app.services import Services


@dataclass
class ApiState:
    settings: Settings
    metrics: ServiceMetrics
    write_keys: list[str]
    read_keys: list[str]
    limits: ClientLimits
    # API key -> the product sets it is confined to; keys not here see everything.
    key_scopes: dict[str, frozenset[str]] = field(default_factory=dict)
    started_at: float = field(default_factory=time.time)
    # Set while the lifespan holds the services open; None before start-up ends and after
    # shut-down begins (requests then get 503 not_ready).
    services: Services | None = None
    started: asyncio.Event = field(default_factory=asyncio.Event)
    start_error: BaseException | None = None
    # A server process exits (code 3) when start-up fails, so an orchestrator restarts it
    # and the error is the last thing logged; in-process callers get the exception instead.
    exit_on_start_failure: bool = True

    async def wait_started(self) -> Services:
        """The services once start-up finished; raises what made it fail."""
        await self.started.wait()
        if self.start_error is not None:
            raise self.start_error
        assert self.services is not None
        return self.services

    @classmethod
    def from_settings(cls, settings: Settings) -> ApiState:
        return cls(
            settings=settings,
            metrics=ServiceMetrics(),
            write_keys=settings.write_keys(),
            read_keys=settings.read_keys(),
            key_scopes=settings.key_scopes(),
            limits=ClientLimits.from_settings(settings.rate_limit),
        )
