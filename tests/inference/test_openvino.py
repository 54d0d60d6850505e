"""The forward pass on OpenVINO's CPU runtime (`VS_RUNTIME=openvino`)."""

from __future__ import annotations

import base64
import logging
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from app.core.config import Settings
from app.inference.openvino_runtime import openvino_gemm_gflops
from app.inference.runtime import load_model
from tests.conftest import app_client
from tests.images import encode, pattern

pytest.importorskip("openvino")


class TestOpenVinoForward:
    def test_embeddings_match_pytorch_at_every_batch_size(self, tiny_model_dir: Path) -> None:
        images = [pattern(80 + 9 * i, 60 + 7 * i, seed=i) for i in range(7)]
        embedder = load_model(tiny_model_dir, device="cpu", precision="fp32")
        torch_rows = embedder.embed(images)

        assert embedder.use_openvino()
        # the batch dimension is dynamic: 1, 3 and 7 images through the same graph
        rows = np.concatenate(
            [embedder.embed(images[:1]), embedder.embed(images[1:4]), embedder.embed(images[4:])]
        )

        assert embedder.describe()["runtime"] == "openvino"
        assert rows.shape == torch_rows.shape
        assert np.allclose(np.linalg.norm(rows, axis=1), 1.0, atol=1e-5)
        assert np.min(np.sum(rows * torch_rows, axis=1)) >= 0.99999
        # each call gets its own rows, not a view of a buffer the next call overwrites
        first = embedder.embed(images[:2])
        embedder.embed(images[2:4])
        assert np.array_equal(first, rows[:2])

    def test_without_openvino_pytorch_stays(
        self,
        tiny_model_dir: Path,
        monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture,
    ) -> None:
        images = [pattern(seed=3)]
        embedder = load_model(tiny_model_dir, device="cpu", precision="fp32")
        before = embedder.embed(images)
        monkeypatch.setitem(sys.modules, "openvino", None)  # import openvino -> ImportError

        with caplog.at_level(logging.WARNING):
            assert not embedder.use_openvino()

        assert "OpenVINO is not installed" in caplog.text
        assert embedder.describe()["runtime"] == "torch"
        assert np.array_equal(embedder.embed(images), before)

    @pytest.mark.parametrize(("low_s", "kept"), [(2.0, "fp32"), (0.5, "bf16")])
    def test_auto_precision_is_settled_on_openvinos_own_timings(
        self,
        tiny_model_dir: Path,
        monkeypatch: pytest.MonkeyPatch,
        low_s: float,
        kept: str,
    ) -> None:
        # PyTorch's bf16 timing says nothing about OpenVINO's bf16 kernels: the service
        # times OpenVINO's fp32 graph (1 s here) against its bf16 graph (low_s)
        times = iter([1.0, low_s])
        monkeypatch.setattr("app.inference.runtime.timed_pass", lambda _run: next(times))
        images = [pattern(90, 70, seed=i) for i in range(4)]
        exact = load_model(tiny_model_dir, device="cpu", precision="fp32").embed(images)

        embedder = load_model(tiny_model_dir, device="cpu", precision="fp32")
        assert embedder.use_openvino("bf16", auto=True)

        described = embedder.describe()
        assert (described["runtime"], described["precision"]) == ("openvino", kept)
        assert described["precision_speedup_vs_fp32"] == pytest.approx(1.0 / low_s)
        rows = embedder.embed(images)
        # fp32 from the exact fp32 weights; bf16 within the service's agreement bound
        bound = 0.99999 if kept == "fp32" else 0.999
        assert np.min(np.sum(rows * exact, axis=1)) >= bound

    def test_load_model_with_the_openvino_runtime_keeps_fp32_exact(
        self, tiny_model_dir: Path
    ) -> None:
        images = [pattern(90, 70, seed=i) for i in range(3)]
        exact = load_model(tiny_model_dir, device="cpu", precision="fp32").embed(images)
        embedder = load_model(tiny_model_dir, device="cpu", precision="auto", runtime="openvino")
        assert embedder.runtime == "openvino"
        described = embedder.describe()
        if described["precision"] == "fp32":
            assert np.min(np.sum(embedder.embed(images) * exact, axis=1)) >= 0.99999
        else:  # a CPU whose OpenVINO bf16 graph timed faster than its fp32 one
            assert described["precision_speedup_vs_fp32"] >= 1.0
            assert described["precision_min_cosine_vs_fp32"] >= 0.999

    def test_gemm_throughput_is_measured(self) -> None:
        assert openvino_gemm_gflops(seconds=0.3, threads=1) > 1.0


class TestServiceOnOpenVino:
    async def test_search_runs_on_openvino_and_ready_says_so(self, settings: Settings) -> None:
        async with app_client(settings.model_copy(update={"runtime": "openvino"})) as client:
            ready = (await client.get("/ready")).json()
            assert ready["model"]["runtime"] == "openvino"
            products = [
                {"id": f"sku-{n}", "images": [{"data": _b64(pattern(110, 90, seed=n))}]}
                for n in range(3)
            ]
            created = await client.post("/products", json={"products": products})
            assert created.status_code == 200, created.text
            query = encode(pattern(110, 90, seed=1), "PNG")
            found = await client.post("/search", files={"image": ("q.png", query, "image/png")})
            assert found.status_code == 200, found.text
            best = found.json()["results"][0]
            assert best["id"] == "sku-1"
            assert best["score"] == pytest.approx(1.0, abs=1e-4)


def _b64(image: Image.Image) -> str:
    return base64.b64encode(encode(image, "PNG")).decode()
