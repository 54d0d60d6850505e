"""TypeScript types generated from the served OpenAPI document with openapi-typescript
type-check a program that calls every core operation through openapi-fetch, and that
program runs against a real server (tests/clients/ts: versions pinned in its
package-lock.json).

Needs node >= 20 and npm: the test skips without them, and fails instead with
VS_TEST_REQUIRE_NODE=1 (CI sets it)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from app.core.config import Settings
from app.main import create_app
from tests.clients.conftest import PHOTOS, READ_KEY, WRITE_KEY, Service

pytestmark = pytest.mark.slow

PROJECT = Path(__file__).parent / "ts"
REQUIRE_NODE = os.environ.get("VS_TEST_REQUIRE_NODE") == "1"


def _tools() -> tuple[str, str]:
    node, npm = shutil.which("node"), shutil.which("npm")
    if node and npm:
        version = subprocess.run([node, "--version"], capture_output=True, text=True).stdout
        if int(version.strip().lstrip("v").split(".")[0]) >= 20:
            return node, npm
    message = "node >= 20 and npm are needed for the TypeScript client check"
    if REQUIRE_NODE:
        pytest.fail(message)
    pytest.skip(message)


def _run(command: list[str], cwd: Path, timeout: float = 300, **env: str) -> str:
    run = subprocess.run(
        command,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **env},
    )
    output = run.stdout + run.stderr
    assert run.returncode == 0, f"{' '.join(command)} failed:\n{output[-6000:]}"
    return output


def _install(npm: str) -> None:
    """`npm ci` when node_modules is missing or older than the lock file (from the npm
    cache when it holds the packages)."""
    installed = PROJECT / "node_modules" / ".package-lock.json"
    lock = PROJECT / "package-lock.json"
    if installed.exists() and installed.stat().st_mtime >= lock.stat().st_mtime:
        return
    _run([npm, "ci", "--prefer-offline", "--no-audit", "--no-fund"], PROJECT, timeout=600)


def test_typescript_client_type_checks_and_runs_every_flow(
    keyed_service: Service, tmp_path: Path
) -> None:
    node, npm = _tools()
    _install(npm)
    for name in ("package.json", "tsconfig.json", "flows.ts"):
        shutil.copy(PROJECT / name, tmp_path / name)
    (tmp_path / "node_modules").symlink_to(PROJECT / "node_modules", target_is_directory=True)

    generated = _run(
        [node, str(PROJECT / "generate.mjs"), f"{keyed_service.url}/openapi.json", "schema.d.ts"],
        tmp_path,
    )
    assert "warn" not in generated.lower(), generated
    assert "paths" in (tmp_path / "schema.d.ts").read_text()

    # Type-check (nothing is written when a call does not match the document), then run.
    tsc = str(PROJECT / "node_modules" / "typescript" / "bin" / "tsc")
    _run([node, tsc, "-p", ".", "--noEmitOnError"], tmp_path)
    output = _run(
        [node, str(tmp_path / "out" / "flows.js")],
        tmp_path,
        VS_URL=keyed_service.url,
        VS_WRITE_KEY=WRITE_KEY,
        VS_READ_KEY=READ_KEY,
        VS_IMAGE_URL=keyed_service.images.url("/oatly-natural-oatghurt.jpg"),
        VS_PHOTOS=str(PHOTOS),
    )
    assert "typescript flows: ok" in output


def test_a_call_the_document_does_not_allow_fails_the_type_check(tmp_path: Path) -> None:
    """The check has teeth: a value the document does not allow is a compile error."""
    node, npm = _tools()
    _install(npm)
    for name in ("package.json", "tsconfig.json"):
        shutil.copy(PROJECT / name, tmp_path / name)
    (tmp_path / "node_modules").symlink_to(PROJECT / "node_modules", target_is_directory=True)
    spec = create_app(Settings(data_dir=tmp_path / "data")).openapi()
    (tmp_path / "openapi.json").write_text(json.dumps(spec))
    _run([node, str(PROJECT / "generate.mjs"), "openapi.json", "schema.d.ts"], tmp_path)
    source = (PROJECT / "flows.ts").read_text()
    wrong = source.replace('decision: "different" }', 'decision: "differnt" }', 1)
    assert wrong != source
    (tmp_path / "flows.ts").write_text(wrong)
    tsc = str(PROJECT / "node_modules" / "typescript" / "bin" / "tsc")
    run = subprocess.run(
        [node, tsc, "-p", ".", "--noEmit"], cwd=tmp_path, capture_output=True, text=True
    )
    assert run.returncode != 0
    assert "differnt" in run.stdout
