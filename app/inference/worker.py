"""BatchWorker: concurrent callers share micro-batched forward passes.

Work is split in three stages, as in infinity's batch handler:

- pre: decode/crop/resize/normalise on a thread pool (never on the event loop);
- core: one dedicated thread takes up to `max_size` queued items, waiting at most
  `max_wait_ms` for the batch to fill after its first item, and runs one forward pass;
- post: the (already L2-normalised) rows are handed back through one future per image.

How much work is taken is decided in one place, `Admission` (app.inference.admission):
callers that fetch and decode first (the services) admit their images before any of that
and pass the ticket in; direct callers are admitted here. Either way a refusal is an
immediate `Overloaded` (503 with Retry-After), never a blocked caller, and the queue itself
never refuses an admitted image. A batch whose forward pass fails is retried item by item,
so one bad input fails only its own future.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from app.core.errors import NotReady
from app.imaging.crop import Box
from app.inference.admission import Admission, Ticket
from app.inference.runtime import Embedder

LOG = logging.getLogger(__name__)


@dataclass
class _Item:
    tensor: torch.Tensor
    future: Future[np.ndarray]


@dataclass
class WorkerStats:
    """Counters read by /metrics and the benchmark."""

    batches: int = 0
    images: int = 0
    failures: int = 0
    forward_seconds: float = 0.0
    batch_sizes: list[int] = field(default_factory=list)

    def record_batch(self, size: int, seconds: float) -> None:
        self.batches += 1
        self.images += size
        self.forward_seconds += seconds
        if len(self.batch_sizes) < 100_000:
            self.batch_sizes.append(size)


BatchObserver = Callable[[int, float], None]


class BatchWorker:
    """Micro-batching front of an `Embedder`."""

    def __init__(
        self,
        embedder: Embedder,
        *,
        max_size: int = 32,
        max_wait_ms: float = 5.0,
        queue_size: int = 256,
        preprocess_threads: int = 2,
        on_batch: BatchObserver | None = None,
        admission: Admission | None = None,
    ) -> None:
        self.embedder = embedder
        self.max_size = max_size
        self.max_wait = max_wait_ms / 1000.0
        self.admission = admission or Admission(queue_size)
        # Unbounded on purpose: admission bounds what can be in it.
        self._queue: queue.Queue[_Item | None] = queue.Queue()
        self._pre = ThreadPoolExecutor(preprocess_threads, thread_name_prefix="vs-preprocess")
        self._thread = threading.Thread(target=self._run, name="vs-batch-worker", daemon=True)
        self._accepting = False
        self._stopped = threading.Event()
        self._on_batch = on_batch
        self.stats = WorkerStats()

    # lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        if not self._thread.is_alive():
            self._accepting = True
            self._thread.start()

    def shutdown(self, *, drain: bool = True, timeout: float | None = 30.0) -> None:
        """Stop accepting work; finish what is queued (drain) or fail it, then stop."""
        self._accepting = False
        if not drain:
            self._fail_queued(NotReady("The service is shutting down."))
        if self._thread.is_alive():
            self._queue.put_nowait(None)  # behind everything queued: drained first
            self._thread.join(timeout)
            if self._thread.is_alive():
                LOG.warning("inference queue did not drain in %ss; failing the rest", timeout)
        self._stopped.set()
        self._fail_queued(NotReady("The service is shutting down."))
        self._pre.shutdown(wait=True, cancel_futures=True)

    @property
    def running(self) -> bool:
        return self._accepting and self._thread.is_alive()

    @property
    def queue_depth(self) -> int:
        return self._queue.qsize()

    # submission ------------------------------------------------------------------------
    def submit_tensor(self, tensor: torch.Tensor) -> Future[np.ndarray]:
        """Queue one preprocessed image; the future resolves to its embedding row."""
        return self.submit_many([tensor])[0]

    def submit_many(
        self, tensors: Sequence[torch.Tensor], ticket: Ticket | None = None
    ) -> list[Future[np.ndarray]]:
        """Queue several images, all or none, under `ticket` (the caller releases it) or
        under one admitted here and released as their results arrive."""
        self._check_running()
        if ticket is not None:
            return self._enqueue(tensors)
        own = self.admission.admit(len(tensors))
        futures = self._enqueue(tensors)
        _release_when_done(own, futures)
        return futures

    def preprocess(self, image: Image.Image, box: Box | None = None) -> Future[torch.Tensor]:
        """Run the embedder's preprocessing on the thread pool."""
        return self._pre.submit(self.embedder.preprocess, image, box)

    async def embed(
        self,
        images: Sequence[Image.Image],
        boxes: Sequence[Box | None] | None = None,
        *,
        ticket: Ticket | None = None,
    ) -> np.ndarray:
        """Embed images from async code: preprocess off the loop, then batch.

        Without a `ticket` the images are admitted here (and may be refused at once)."""
        self._check_running()
        held = ticket if ticket is not None else self.admission.admit(len(images))
        try:
            pre = [
                asyncio.wrap_future(self.preprocess(img, boxes[i] if boxes else None))
                for i, img in enumerate(images)
            ]
            tensors = await asyncio.gather(*pre)
            futures = self._enqueue(tensors)
            rows = await asyncio.gather(*(asyncio.wrap_future(f) for f in futures))
        finally:
            if ticket is None:
                held.release()
        return _stack(rows, self.embedder.embedding_dim)

    def embed_sync(
        self, images: Sequence[Image.Image], boxes: Sequence[Box | None] | None = None
    ) -> np.ndarray:
        """Embed images from a plain thread (CLI): same admission, queue and batching."""
        self._check_running()
        with self.admission.admit(len(images)):
            tensors = [
                f.result()
                for f in [
                    self.preprocess(img, boxes[i] if boxes else None)
                    for i, img in enumerate(images)
                ]
            ]
            futures = self._enqueue(tensors)
            return _stack([f.result() for f in futures], self.embedder.embedding_dim)

    def _check_running(self) -> None:
        if not self.running:
            raise NotReady("The inference worker is not running.")

    def _enqueue(self, tensors: Sequence[torch.Tensor]) -> list[Future[np.ndarray]]:
        self._check_running()
        items = [_Item(tensor=t, future=Future()) for t in tensors]
        for item in items:
            self._queue.put_nowait(item)
        return [item.future for item in items]

    # the worker thread -----------------------------------------------------------------
    def _collect(self, first: _Item) -> tuple[list[_Item], bool]:
        batch = [first]
        deadline = time.perf_counter() + self.max_wait
        stop = False
        while len(batch) < self.max_size:
            remaining = deadline - time.perf_counter()
            try:
                item = (
                    self._queue.get(timeout=remaining)
                    if remaining > 0
                    else self._queue.get_nowait()
                )
            except queue.Empty:
                break
            if item is None:
                stop = True
                break
            batch.append(item)
        return batch, stop

    def _run(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch, stop = self._collect(first)
            live = [it for it in batch if it.future.set_running_or_notify_cancel()]
            if live:
                self._process(live)
            if stop:
                return

    def _process(self, batch: list[_Item]) -> None:
        started = time.perf_counter()
        try:
            rows = self.embedder.forward(torch.stack([it.tensor for it in batch]))
        except Exception:  # noqa: BLE001 - isolate the failing item below
            LOG.exception("batch of %d failed; retrying its images one by one", len(batch))
            for it in batch:
                try:
                    it.future.set_result(self.embedder.forward(it.tensor.unsqueeze(0))[0])
                except Exception as exc:  # noqa: BLE001
                    self.stats.failures += 1
                    it.future.set_exception(exc)
            return
        elapsed = time.perf_counter() - started
        self.stats.record_batch(len(batch), elapsed)
        if self._on_batch is not None:
            self._on_batch(len(batch), elapsed)
        for it, row in zip(batch, rows, strict=True):
            it.future.set_result(row)

    def _fail_queued(self, exc: Exception) -> None:
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return
            if item is not None and item.future.set_running_or_notify_cancel():
                item.future.set_exception(exc)


def _release_when_done(ticket: Ticket, futures: Sequence[Future[np.ndarray]]) -> None:
    """Release `ticket` once every future has a result (or an error)."""
    remaining = [len(futures)]
    lock = threading.Lock()

    def one_done(_: Future[np.ndarray]) -> None:
        with lock:
            remaining[0] -= 1
            last = remaining[0] == 0
        if last:
            ticket.release()

    if not futures:
        ticket.release()
    for future in futures:
        future.add_done_callback(one_done)


def _stack(rows: Sequence[np.ndarray], dim: int) -> np.ndarray:
    if not rows:
        return np.zeros((0, dim), dtype=np.float32)
    return np.stack(rows).astype(np.float32, copy=False)
