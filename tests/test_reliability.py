"""Short versions of the reliability runs (the full ones are scripts, see
docs/reliability.md): crash recovery, load and overload, API fuzzing, auth coverage."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from app.core.config import Settings
from app.core.database import Database
from app.core.migrations import upgrade
from tests.conftest import REPO, app_client
from tests.httpserver import body, serve
from tests.images import encode, pattern
from tests.reliability import crash_recovery, load
from tests.server import start_server

pytestmark = pytest.mark.slow


def test_crash_recovery_rounds(tiny_model_dir: Path, tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'catalogue.db'}"
    upgrade(Database(url))
    rounds = int(os.environ.get("VS_TEST_CRASH_ROUNDS", "3"))

    result = crash_recovery.run(rounds, tmp_path, tiny_model_dir, url, sample=10)

    assert result["products_acknowledged"] > 0
    assert result["products_lost"] == 0
    assert result["index_matches_catalogue"]
    assert result["acknowledged_not_found_by_search"] == 0
    saved = result["saved_index_after_graceful_stop"]
    assert saved["index_ids"] == result["images_in_catalogue"]
    assert saved["duplicate_ids"] == saved["missing_from_index"] == saved["not_in_catalogue"] == 0
    assert result["problems"] == []


def test_load_and_overload(tmp_path: Path) -> None:
    result = load.run([1, 8], seconds=2, overload=64, waves=2, work=tmp_path)

    for phase in result["load"]:
        assert phase["requests"] > 0
        assert set(phase["statuses"]) == {"200"}
    overload = result["overload"]
    assert overload["server_errors"] == 0
    assert overload["timeouts"] == 0
    assert overload["connection_errors"] == 0
    assert overload["rejected_503"] > 0
    assert overload["retry_after_values"] == ["1"]
    assert overload["rejected"]["p99_ms"] < 5000


def test_schemathesis_finds_no_server_errors_or_schema_violations(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    jpeg = encode(pattern(64, 64), "JPEG")
    examples = os.environ.get("VS_TEST_FUZZ_EXAMPLES", "15")
    with serve({"/img.jpg": body(jpeg)}):
        server = start_server(
            {
                "VS_MODEL": str(tiny_model_dir),
                "VS_DATA_DIR": str(tmp_path / "data"),
                "VS_PRECISION": "fp32",
                # URL fetching can only reach the local stub: nothing leaves the machine.
                "VS_ALLOW_PRIVATE_URLS": "true",
                "VS_IMAGE__FETCH_ALLOWED_HOSTS": "127.0.0.1",
                "VS_LOG_LEVEL": "WARNING",
                # As in production: keys for writes and for reads, so the auth checks apply.
                "VS_API_KEYS": "fuzz-writer",
                "VS_API_KEYS_READ": "fuzz-reader",
            },
            tmp_path / "server.log",
        )
        try:
            run = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "schemathesis.cli",
                    # Every check runs (schemathesis' default; the auth checks included)
                    # but where the config turns one off for an operation, saying why.
                    # `--checks all` would override those per-operation settings.
                    "--config-file",
                    str(REPO / "tests" / "schemathesis.toml"),
                    "run",
                    f"{server.url}/openapi.json",
                    "--max-examples",
                    examples,
                    "--seed",
                    "1",
                    "--request-timeout",
                    "30",
                    "--suppress-health-check",
                    "all",
                    "-H",
                    "X-API-Key: fuzz-writer",
                    "--report",
                    "junit",
                    "--report-dir",
                    str(tmp_path / "report"),
                ],
                cwd=REPO,
                capture_output=True,
                text=True,
                timeout=900,
            )
        finally:
            server.stop()
    print(run.stdout[-2500:])  # noqa: T201 - the summary (pytest -rP shows it when it passes)
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-3000:]
    assert "Traceback" not in server.output()
    # The run reached past authentication: requests were accepted, not all refused.
    assert "200" in (tmp_path / "server.log").read_text() or "passed" in run.stdout


async def test_every_write_route_needs_a_key(settings: Settings) -> None:
    async with app_client(settings.model_copy(update={"api_keys": "secret"})) as client:
        spec = (await client.get("/openapi.json")).json()
        writes = [
            (
                method.upper(),
                path.replace("{product_id}", "x")
                .replace("{product_id:path}", "x")
                .replace("{image_id}", "1"),
            )
            for path, item in spec["paths"].items()
            for method in item
            if method in ("post", "delete", "put", "patch") and not path.startswith("/search")
        ]
        assert {w[0] for w in writes} == {"POST", "DELETE", "PATCH"}
        assert len(writes) >= 3
        for method, path in writes:
            response = await client.request(method, path, json={})
            assert response.status_code == 401, (method, path, response.status_code)
