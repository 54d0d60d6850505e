"""What can be checked of the container set-up without a Docker engine."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import yaml
from pydantic import ValidationError

from app.core.config import Settings, settings_rows
from tests.conftest import REPO
from tests.server import free_port, start_server


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
    assert "USER 10001:10001" in dockerfile  # numeric: runAsNonRoot can verify it
    assert not dockerfile.startswith("# syntax=")  # no frontend image to fetch
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


def test_build_context_leaves_out_local_state() -> None:
    ignored = (REPO / ".dockerignore").read_text().split()
    assert ignored[ignored.index("*") :][:1] == ["*"]  # an allow-list: nothing by default
    allowed = {line[1:].rstrip("/") for line in ignored if line.startswith("!")}
    assert {"app", "migrations", "docker", "pyproject.toml"} <= allowed
    assert not allowed & {".venv", "data", "models", ".git"}


def _json_lines(text: str) -> list[dict[str, object]]:
    """Every non-empty line parsed as JSON (a plain-text line fails the test here)."""
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _cli(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "app.cli", *args],
        cwd=REPO,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


class TestEntrypointLogs:
    """The entry point migrates, then serves: under VS_LOG_FORMAT=json every line is JSON."""

    def test_migration_logs_json(self, tmp_path: Path) -> None:
        url = f"sqlite:///{tmp_path / 'catalogue.db'}"
        run = _cli(["db", "upgrade"], {"VS_DATABASE_URL": url, "VS_LOG_FORMAT": "json"})
        assert run.returncode == 0, run.stderr
        lines = _json_lines(run.stderr)
        done = [line for line in lines if str(line["message"]).startswith("database schema at")]
        assert len(done) == 1
        assert (
            done[0]["revision"]
            == json.loads(_cli(["db", "current"], {"VS_DATABASE_URL": url}).stdout)["head"]
        )

    def test_unreachable_database_is_one_json_error(self) -> None:
        url = f"postgresql+psycopg://vsearch:x@127.0.0.1:{free_port()}/vsearch"
        run = _cli(["db", "upgrade"], {"VS_DATABASE_URL": url, "VS_LOG_FORMAT": "json"})
        assert run.returncode == 1
        errors = [line for line in _json_lines(run.stderr) if line["level"] == "error"]
        assert len(errors) == 1
        assert str(errors[0]["message"]).startswith("database not reachable")

    def test_each_request_is_logged_once(self, tiny_model_dir: Path, tmp_path: Path) -> None:
        env = {
            "VS_MODEL": str(tiny_model_dir),
            "VS_DATA_DIR": str(tmp_path / "data"),
            "VS_PRECISION": "fp32",
        }
        server = start_server(env, tmp_path / "log")
        try:
            marker = f"probe-{free_port()}"
            response = httpx.get(
                f"{server.url}/health", headers={"X-Request-ID": marker}, timeout=10
            )
            assert response.status_code == 200
        finally:
            server.stop()
        lines = _json_lines(server.output())
        about_it = [line for line in lines if marker in json.dumps(line)]
        assert len(about_it) == 1, about_it
        assert about_it[0]["status"] == 200


def test_replicas_profile_balances_replicas_with_their_own_index() -> None:
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    replica = compose["services"]["vsearch-replica"]
    lb = compose["services"]["lb"]
    known = {name for name, _, _ in settings_rows()}
    assert {k for k in replica["environment"] if k.startswith("VS_")} <= known
    assert replica["profiles"] == lb["profiles"] == ["replicas"]
    assert replica["environment"]["VS_DATABASE_URL"].startswith("postgresql+psycopg://")
    # No named volume at /data: every replica keeps its own index (the image's anonymous
    # volume); a shared index directory would be written by several processes.
    assert not any(v.split(":")[1] == "/data" for v in replica["volumes"])
    assert "ports" not in replica  # reached through the load balancer only
    assert lb["depends_on"]["vsearch-replica"]["condition"] == "service_healthy"
    nginx = (REPO / "docker" / "lb" / "nginx.conf").read_text()
    assert "server vsearch-replica:8000" in nginx
    assert "X-Forwarded-For $remote_addr" in nginx
    assert "apt-get install" in (REPO / "docker" / "lb" / "Dockerfile").read_text()


def test_compose_file_validates_with_the_replicas_profile() -> None:
    compose_cli = shutil.which("docker-compose")
    if compose_cli is None:
        pytest.skip("docker-compose is not installed")
    result = subprocess.run(
        [compose_cli, "--profile", "replicas", "config", "--services"],
        cwd=REPO,
        env={**os.environ, "VS_API_KEYS": "k"},
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert {"postgres", "vsearch", "vsearch-replica", "lb"} <= set(result.stdout.split())
