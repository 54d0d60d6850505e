"""Graceful shutdown and crash restarts of a real server process."""

from __future__ import annotations

import base64
import json
import signal
import time
from pathlib import Path

import httpx

from tests.images import encode, pattern
from tests.server import launch_server, start_server


def _env(tiny_model_dir: Path, data_dir: Path) -> dict[str, str]:
    return {
        "VS_MODEL": str(tiny_model_dir),
        "VS_DATA_DIR": str(data_dir),
        "VS_PRECISION": "fp32",
        "VS_INDEX__SAVE_INTERVAL_S": "3600",  # only shutdown saves the index
    }


def _product(pid: str, seed: int) -> dict[str, object]:
    data = base64.b64encode(encode(pattern(seed=seed), "PNG")).decode()
    return {"id": pid, "images": [{"data": data}]}


def test_sigterm_drains_and_persists_the_index(tiny_model_dir: Path, tmp_path: Path) -> None:
    server = start_server(_env(tiny_model_dir, tmp_path / "data"), tmp_path / "log")
    response = httpx.post(
        f"{server.url}/products",
        json={"products": [_product("a", 1), _product("b", 2)]},
        timeout=30,
    )
    assert response.status_code == 200
    manifest = tmp_path / "data" / "index" / "manifest.json"
    before = json.loads(manifest.read_text())

    code = server.stop(signal.SIGTERM)

    after = json.loads(manifest.read_text())
    assert code in (0, -signal.SIGTERM)
    assert after["generation"] > before["generation"]
    assert after["ntotal"] == 2
    assert "saving the index" in server.output()


def test_restart_after_sigkill_loses_nothing(tiny_model_dir: Path, tmp_path: Path) -> None:
    env = _env(tiny_model_dir, tmp_path / "data")
    server = start_server(env, tmp_path / "log")
    posted = [_product(f"p{i}", i) for i in range(6)]
    assert (
        httpx.post(f"{server.url}/products", json={"products": posted}, timeout=30).status_code
        == 200
    )
    server.stop(signal.SIGKILL)  # the index manifest still describes the empty catalogue

    again = start_server(env, tmp_path / "log")
    try:
        for i in range(6):
            query = {"image": posted[i]["images"][0]["data"], "k": 1}  # type: ignore[index]
            hit = httpx.post(f"{again.url}/search", json=query, timeout=30).json()["results"][0]
            assert hit["id"] == f"p{i}"
        ready = httpx.get(f"{again.url}/ready").json()
        assert ready["index"]["ntotal"] == 6
    finally:
        again.stop()


def test_health_answers_starting_while_the_model_loads(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    server = launch_server(_env(tiny_model_dir, tmp_path / "data"), tmp_path / "log")
    seen: list[tuple[str, int]] = []
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and server.process.poll() is None:
            try:
                health = httpx.get(f"{server.url}/health", timeout=2)
                search = httpx.post(f"{server.url}/search", json={"image_url": "http://x"})
                ready = httpx.get(f"{server.url}/ready", timeout=2)
            except httpx.TransportError:
                time.sleep(0.02)
                continue
            seen.append((health.json()["status"], ready.status_code))
            if search.status_code == 503:  # refused while starting, with a retry hint
                assert search.json()["error"]["code"] == "not_ready"
                assert search.headers["retry-after"]
            else:  # only once started
                assert ready.status_code == 200
            if ready.status_code == 200:
                break
            time.sleep(0.02)
    finally:
        assert server.stop() in (0, -signal.SIGTERM)  # uvicorn re-raises the signal it handled
    assert seen[0] == ("starting", 503), seen  # listening before the model has loaded
    assert seen[-1] == ("ok", 200), seen


def test_a_failed_start_exits_non_zero_with_the_reason(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    env = {**_env(tiny_model_dir, tmp_path / "data"), "VS_MODEL": str(tmp_path / "missing")}
    server = launch_server(env, tmp_path / "log")
    try:
        code = server.process.wait(90)
    finally:
        server.stop(signal.SIGKILL)
    assert code == 3
    assert "start-up failed" in server.output()
