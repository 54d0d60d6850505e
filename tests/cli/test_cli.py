from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from typer.testing import CliRunner

from app.cli import cli
from app.core.config import DEFAULT_MODEL, Settings
from app.inference.runtime import load_model
from app.services import load_embedder
from tests.conftest import REPO

runner = CliRunner()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class TestModelInitRandom:
    def test_writes_a_loadable_model(self, tmp_path: Path) -> None:
        out = tmp_path / "m"
        result = runner.invoke(
            cli,
            [
                "model",
                "init-random",
                str(out),
                "--backbone",
                "convnext_atto",
                "--input-size",
                "64",
                "--embedding-dim",
                "128",
                "--seed",
                "3",
            ],
        )
        assert result.exit_code == 0, result.output
        config = json.loads((out / "config.json").read_text())
        assert config["embedding_dim"] == 128
        assert config["head"] == "flatten"
        assert load_model(out, device="cpu", precision="fp32").embedding_dim == 128


class TestModelInitPretrained:
    @pytest.mark.slow
    def test_imagenet_features_retrieve_the_same_product(
        self, tmp_path: Path, dataset: Path
    ) -> None:
        out = tmp_path / "lite0"
        result = runner.invoke(cli, ["model", "init-pretrained", str(out)])
        assert result.exit_code == 0, result.output
        embedder = load_model(out, device="cpu", precision="fp32")
        from PIL import Image

        products = ["Fruit/Banana", "Fruit/Lemon", "Vegetables/Cucumber", "Fruit/Pineapple"]
        images, labels = [], []
        for label, product in enumerate(products):
            for path in sorted((dataset / "dataset" / "train" / product).rglob("*.jpg"))[:5]:
                images.append(Image.open(path))
                labels.append(label)
        vectors = embedder.embed(images)
        sims = vectors @ vectors.T
        np.fill_diagonal(sims, -1)
        nearest = np.asarray(labels)[sims.argmax(axis=1)]

        assert embedder.config.head == "avgpool"
        assert embedder.embedding_dim == 1280
        # 4 products, chance is ~25%; ImageNet features put most photos next to their own.
        assert (nearest == np.asarray(labels)).mean() >= 0.75


class TestFallbackModel:
    @pytest.mark.slow
    def test_unreachable_default_hub_model_falls_back_loudly(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
    ) -> None:
        from huggingface_hub import constants

        monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
        settings = Settings(model=DEFAULT_MODEL, data_dir=tmp_path, device="cpu", precision="fp32")

        embedder, fallback = load_embedder(settings)

        assert fallback is True
        assert embedder.model_id.startswith("efficientnet-lite0-imagenet@")
        assert any("FALLING BACK" in r.getMessage() for r in caplog.records)

    def test_a_custom_model_that_is_missing_is_an_error(self, tmp_path: Path) -> None:
        settings = Settings(model=str(tmp_path / "missing"), data_dir=tmp_path)
        with pytest.raises(Exception, match="is not a model directory"):
            load_embedder(settings)


class TestServe:
    def test_real_server_on_loopback(self, tiny_model_dir: Path, tmp_path: Path) -> None:
        port = _free_port()
        env = {
            **os.environ,
            "VS_MODEL": str(tiny_model_dir),
            "VS_DATA_DIR": str(tmp_path / "data"),
            "VS_PRECISION": "fp32",
            "VS_LOG_FORMAT": "json",
        }
        log = tmp_path / "serve.log"  # a file, not a pipe nobody drains while it polls
        proc = subprocess.Popen(
            [sys.executable, "-m", "app.cli", "serve", "--host", "127.0.0.1", "--port", str(port)],
            cwd=REPO,
            env=env,
            stdout=log.open("wb"),
            stderr=subprocess.STDOUT,
        )
        try:
            deadline = time.monotonic() + 120
            body = None
            while time.monotonic() < deadline:
                try:
                    response = httpx.get(f"http://127.0.0.1:{port}/ready", timeout=2)
                    if response.status_code == 200:
                        body = response.json()
                        break
                except httpx.TransportError:
                    pass
                assert proc.poll() is None, log.read_text()
                time.sleep(0.3)
            assert body is not None, "service did not become ready in 120 s"
            assert body["model"]["model_id"].startswith("tiny@")
        finally:
            proc.terminate()
            proc.wait(timeout=30)
        output = log.read_text()
        # uvicorn re-raises SIGTERM after its graceful shutdown, so -15 is a clean exit.
        assert proc.returncode in (0, -15)
        messages = [json.loads(x)["message"] for x in output.splitlines() if x.startswith("{")]
        assert any(m.startswith("ready:") for m in messages)
        assert any(m.startswith("shutting down: draining") for m in messages)
