from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from app.core.errors import InvalidBox, NotReady, Overloaded
from app.inference.runtime import Embedder, load_model
from app.inference.worker import BatchWorker
from tests.images import pattern


@pytest.fixture(scope="module")
def embedder(tiny_model_dir: Path) -> Embedder:
    return load_model(tiny_model_dir, device="cpu", precision="fp32")


class _GatedEmbedder:
    """Wraps a real embedder; forward passes wait until the test opens the gate."""

    def __init__(self, inner: Embedder) -> None:
        self.inner = inner
        self.embedding_dim = inner.embedding_dim
        self.gate = threading.Event()
        self.calls: list[int] = []

    def preprocess(self, image, box=None):  # type: ignore[no-untyped-def]
        return self.inner.preprocess(image, box)

    def forward(self, batch: torch.Tensor) -> np.ndarray:
        self.gate.wait(10)
        self.calls.append(batch.shape[0])
        return self.inner.forward(batch)


class TestBatchWorker:
    async def test_concurrent_callers_share_batches_and_get_their_own_rows(
        self, embedder: Embedder
    ) -> None:
        images = [pattern(seed=i) for i in range(12)]
        expected = embedder.embed(images)
        worker = BatchWorker(embedder, max_size=8, max_wait_ms=50, queue_size=64)
        worker.start()
        try:
            rows = await asyncio.gather(*(worker.embed([img]) for img in images))
        finally:
            worker.shutdown()

        got = np.concatenate(rows)
        np.testing.assert_allclose(got, expected, atol=1e-5)
        assert max(worker.stats.batch_sizes) > 1
        assert max(worker.stats.batch_sizes) <= 8
        assert worker.stats.images == 12

    async def test_full_queue_answers_overloaded_at_once(self, embedder: Embedder) -> None:
        gated = _GatedEmbedder(embedder)
        # Capacity 3: one image in the forward pass plus two queued fill it.
        worker = BatchWorker(gated, max_size=1, max_wait_ms=0, queue_size=3)  # type: ignore[arg-type]
        worker.start()
        tensor = embedder.preprocess(pattern())
        try:
            first = worker.submit_tensor(tensor)  # taken by the worker, blocked at the gate
            time.sleep(0.05)
            queued = [worker.submit_tensor(tensor) for _ in range(2)]
            started = time.perf_counter()
            with pytest.raises(Overloaded) as info:
                await worker.embed([pattern()])
            assert time.perf_counter() - started < 0.5
            assert info.value.headers["Retry-After"] == "1"
            assert info.value.status_code == 503
            assert worker.admission.rejected_requests == 1
            assert worker.admission.in_flight == 3
        finally:
            gated.gate.set()
            worker.shutdown()
        assert first.result(5).shape == (512,)
        assert all(f.result(5).shape == (512,) for f in queued)
        assert worker.admission.in_flight == 0  # every slot came back with its result

    def test_a_failing_image_fails_only_its_own_future(self, embedder: Embedder) -> None:
        worker = BatchWorker(embedder, max_size=8, max_wait_ms=100, queue_size=64)
        worker.start()
        good = embedder.preprocess(pattern(seed=1))
        bad = torch.full_like(good, float("nan"))[:2]  # wrong shape: cannot be stacked
        try:
            futures = [worker.submit_tensor(good), worker.submit_tensor(bad)]
            futures.append(worker.submit_tensor(good))
            assert futures[0].result(10).shape == (512,)
            assert futures[2].result(10).shape == (512,)
            with pytest.raises(RuntimeError):
                futures[1].result(10)
        finally:
            worker.shutdown()
        assert worker.stats.failures == 1

    async def test_preprocessing_errors_reach_the_caller(self, embedder: Embedder) -> None:
        worker = BatchWorker(embedder, max_size=4, max_wait_ms=1)
        worker.start()
        try:
            with pytest.raises(InvalidBox):
                await worker.embed([pattern(50, 50)], [(40, 40, 20, 20)])
            ok = await worker.embed([pattern(50, 50)], [(10, 10, 20, 20)])
        finally:
            worker.shutdown()
        assert ok.shape == (1, 512)

    def test_shutdown_drains_queued_work(self, embedder: Embedder) -> None:
        gated = _GatedEmbedder(embedder)
        worker = BatchWorker(gated, max_size=2, max_wait_ms=0, queue_size=16)  # type: ignore[arg-type]
        worker.start()
        tensor = embedder.preprocess(pattern())
        futures = [worker.submit_tensor(tensor) for _ in range(6)]
        threading.Timer(0.1, gated.gate.set).start()

        worker.shutdown(drain=True)

        assert all(f.result(0).shape == (512,) for f in futures)
        with pytest.raises(NotReady):
            worker.submit_tensor(tensor)

    def test_sync_callers_from_threads(self, embedder: Embedder) -> None:
        images = [pattern(seed=i) for i in range(6)]
        worker = BatchWorker(embedder, max_size=4, max_wait_ms=20)
        worker.start()
        results: dict[int, np.ndarray] = {}

        def call(i: int) -> None:
            results[i] = worker.embed_sync([images[i]])[0]

        threads = [threading.Thread(target=call, args=(i,)) for i in range(6)]
        try:
            for t in threads:
                t.start()
            for t in threads:
                t.join(10)
        finally:
            worker.shutdown()
        expected = embedder.embed(images)
        for i in range(6):
            np.testing.assert_allclose(results[i], expected[i], atol=1e-5)
