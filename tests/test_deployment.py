"""What can be checked of the container set-up without a Docker engine."""

from __future__ import annotations

import pytest
import yaml
from pydantic import ValidationError

from app.core.config import Settings, settings_rows
from tests.conftest import REPO


def test_compose_service_env_names_real_settings() -> None:
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    env = compose["services"]["vsearch"]["environment"]
    known = {name for name, _, _ in settings_rows()}
    unknown = sorted(k for k in env if k.startswith("VS_") and k not in known)
    assert not unknown, f"docker-compose.yml sets variables Settings does not read: {unknown}"
    assert (
        compose["services"]["vsearch"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    )
    assert "healthcheck" in compose["services"]["postgres"]
    assert env["VS_DATABASE_URL"].startswith("postgresql+psycopg://")


def test_dockerfile_runs_as_non_root_with_a_readiness_healthcheck() -> None:
    dockerfile = (REPO / "docker" / "Dockerfile").read_text()
    assert "USER vsearch" in dockerfile
    assert "HEALTHCHECK" in dockerfile
    assert "/ready" in dockerfile
    assert 'VOLUME ["/data", "/models"]' in dockerfile
    entrypoint = (REPO / "docker" / "entrypoint.sh").read_text()
    assert entrypoint.index("vsearch db upgrade") < entrypoint.index("vsearch serve")


class TestProductionSettings:
    def test_production_refuses_open_writes(self) -> None:
        with pytest.raises(ValidationError, match="production needs VS_API_KEYS"):
            Settings(environment="production", api_keys="")

    def test_production_refuses_private_urls(self) -> None:
        with pytest.raises(ValidationError, match="VS_ALLOW_PRIVATE_URLS"):
            Settings(environment="production", api_keys="k", allow_private_urls=True)

    def test_production_with_keys_is_fine(self) -> None:
        assert Settings(environment="production", api_keys="k").write_keys() == ["k"]
