"""IndexService: the vector index as a derived cache of an embedding source.

It reads through the protocols of app/index/feed.py (a `ChangeFeed` and an
`EmbeddingSource`), never a database, so it runs and is tested without one:

- start: load the live generation from disk and catch up from the feed; a missing, torn
  or foreign (other model, other dimension) index is rebuilt from the source;
- apply: committed changes are applied at once by the writer (read-your-writes);
- tail: a background thread replays the feed every `catchup_interval_s`, or at once when
  woken (`wake()`: the source announced a change), so replicas sharing one source
  converge, and checkpoints the files now and then;
- replay hooks: `on_replay` callbacks learn which images arrived by the feed rather than
  through this process's own `apply()` (another replica's writes), e.g. to look for
  duplicate pairs among them;
- lifecycle: exact shards while small; past `train_threshold` one IVF-PQ template is
  trained on a sample and every shard rebuilt in the background while searches go on,
  then swapped in atomically; again whenever the catalogue grows by `retrain_growth`.

The feed's watermark is saved in each generation's manifest, so a restart replays only
what that generation has not seen.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from app.core.config import IndexSettings
from app.index.build import ivfpq_factory, train_template
from app.index.feed import ChangeFeed, EmbeddingSource, FeedCursor, Watermark
from app.index.sharded import DEFAULT_REFINE, SearchKnobs, ShardedIndex
from app.index.store import (
    Manifest,
    generation_dir,
    read_manifest,
    remove_other_generations,
    write_manifest,
)
from app.index.tuning import Tuning, tune
from app.index.vectors import ExactVectors

LOG = logging.getLogger(__name__)

PAGE = 5_000

# Image ids published through `apply()` remembered until their change-log row is replayed
# (so the replay hooks skip them); past this many, forgetting them only costs a hook call.
PUBLISHED_MEMORY = 100_000


@dataclass
class IndexStats:
    generation: int = 0
    applied_changes: int = 0
    last_catchup: float = 0.0
    last_save: float = 0.0
    rebuilds: int = 0
    retrain_running: bool = False
    last_error: str | None = None
    log_head_seq: int = 0
    applied_seq: int = 0
    timings: dict[str, float] = field(default_factory=dict)


class IndexService:
    """Owns the live ShardedIndex and keeps it in step with the embedding source.

    Args:
        feed: the changes to apply, in order, and the position to resume from.
        source: the current embeddings (applying a change reads the image's current state;
            rebuilds and training read them all).
        directory: where the generations and the manifest live.
        model_id: the model whose embeddings this index holds (a manifest of another
            model is rebuilt, never mixed in).
        dim: the embedding dimension.
        settings: shards, training thresholds, search knobs, checkpoint intervals.
    """

    def __init__(
        self,
        *,
        feed: ChangeFeed,
        source: EmbeddingSource,
        directory: Path,
        model_id: str,
        dim: int,
        settings: IndexSettings,
    ) -> None:
        self.feed = feed
        self.source = source
        self.root = directory
        self.model_id = model_id
        self.dim = dim
        self.settings = settings
        self.stats = IndexStats()
        self._index: ShardedIndex | None = None
        self._manifest: Manifest | None = None
        self._cursor = FeedCursor()
        self._apply_lock = threading.RLock()
        self._dirty = False
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._published: set[int] = set()
        self._thread: threading.Thread | None = None
        self._retrain: threading.Thread | None = None
        self._tuner: threading.Thread | None = None
        self._announcer: ThreadPoolExecutor | None = None
        self._tuned_index: ShardedIndex | None = None
        self.tuning: Tuning | None = None
        self._vectors: ExactVectors | None = None
        self.on_swap: list[Callable[[ShardedIndex], None]] = []
        self.on_replay: list[Callable[[list[int]], None]] = []

    # start and stop ---------------------------------------------------------------------
    @property
    def is_open(self) -> bool:
        """Whether a generation is live (searches can run)."""
        return self._index is not None

    @property
    def index(self) -> ShardedIndex:
        if self._index is None:
            raise RuntimeError("the index is not open")
        return self._index

    @property
    def watermark(self) -> Watermark:
        """How far the feed has been applied to the live generation."""
        return self._cursor.watermark

    def open(self) -> None:
        """Load the live generation (or rebuild it), then catch up from the change log."""
        self.root.mkdir(parents=True, exist_ok=True)
        manifest = read_manifest(self.root)
        loaded = manifest is not None and self._try_load(manifest)
        if not loaded:
            self.rebuild(reason="no usable index on disk" if manifest is None else "unusable")
        self.catch_up()
        self.maybe_retrain(background=True)
        self.maybe_tune()

    def _try_load(self, manifest: Manifest) -> bool:
        if manifest.model_id != self.model_id or manifest.dim != self.dim:
            LOG.warning(
                "index on disk was built for model %s (dim %d), not %s (dim %d); rebuilding",
                manifest.model_id,
                manifest.dim,
                self.model_id,
                self.dim,
            )
            return False
        try:
            vectors = self._open_vectors(manifest.dim)
            index = ShardedIndex.read_shards(
                generation_dir(self.root, manifest.generation),
                manifest.shards,
                kind=manifest.kind,
                dim=manifest.dim,
                vectors=vectors,
                knobs=self._knobs(),
                params=manifest.params,
            )
        except Exception as exc:  # noqa: BLE001 - a torn or missing file means: rebuild
            LOG.warning(
                "index generation %d could not be loaded (%s: %s); rebuilding from the source",
                manifest.generation,
                type(exc).__name__,
                exc,
            )
            return False
        if index.ntotal != manifest.ntotal:
            LOG.warning(
                "index generation %d holds %d vectors, its manifest says %d; rebuilding",
                manifest.generation,
                index.ntotal,
                manifest.ntotal,
            )
            index.close()
            return False
        self._index, self._manifest = index, manifest
        self._cursor = FeedCursor(manifest.watermark)
        self.stats.generation = manifest.generation
        LOG.info(
            "loaded index generation %d (%s, %d vectors, watermark %s)",
            manifest.generation,
            manifest.kind,
            manifest.ntotal,
            manifest.watermark,
        )
        return True

    def _open_vectors(self, dim: int) -> ExactVectors:
        # Rows are rewritten from the source for every live image on rebuild and replay,
        # so an existing file of the same dimension can always be reused.
        if self._vectors is None or self._vectors.dim != dim:
            self._vectors = ExactVectors(self.root / f"vectors-{dim}.f16", dim)
        return self._vectors

    def _knobs(self) -> SearchKnobs:
        tuned = self.tuning
        return SearchKnobs(
            nprobe=self.settings.nprobe or (tuned.nprobe if tuned else 0),
            refine=self.settings.refine or (tuned.refine if tuned else DEFAULT_REFINE),
        )

    # tuning -----------------------------------------------------------------------------
    def maybe_tune(self, *, background: bool = True) -> bool:
        """Measure recall and pick search parameters for the live index when it has none
        yet or has grown by `retune_growth` since (see app.index.tuning)."""
        index = self._index
        if (
            index is None
            or index.kind == "flat"
            or not self.settings.target_recall
            or (self.settings.nprobe and self.settings.refine)
            or (self._tuner is not None and self._tuner.is_alive())
        ):
            return False
        tuned = self.tuning
        if tuned is not None and tuned.ntotal > 0 and self._tuned_index is index:
            if index.ntotal < tuned.ntotal * self.settings.retune_growth:
                return False

        def run() -> None:
            try:
                result = tune(
                    index,
                    self.settings.target_recall,
                    fixed_nprobe=self.settings.nprobe,
                    fixed_refine=self.settings.refine,
                )
            except Exception:  # noqa: BLE001 - the current parameters keep serving
                LOG.exception("index search tuning failed")
                return
            if result is not None and self._index is index:
                self.tuning = result
                self._tuned_index = index
                index.knobs = self._knobs()

        if not background:
            run()
            return True
        self._tuner = threading.Thread(target=run, name="vs-index-tune", daemon=True)
        self._tuner.start()
        return True

    def start_tailing(self) -> None:
        """Tail the change feed (and checkpoint) on a background thread."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._tail, name="vs-index-tail", daemon=True)
            self._thread.start()

    def wake(self) -> None:
        """Catch up now instead of at the next interval (a change was announced).

        Cheap and safe from any thread; wakes arriving during a catch-up fold into one
        more catch-up right after it.
        """
        self._wake.set()

    def close(self, *, save: bool = True) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(30)
        if self._retrain is not None:
            self._retrain.join(600)
        if self._tuner is not None:
            self._tuner.join(600)
        if self._announcer is not None:
            self._announcer.shutdown(wait=True)  # the hooks search this index
        if save and self._index is not None and self._dirty:
            self.save()
        if self._index is not None:
            self._index.close()
        if self._vectors is not None:
            self._vectors.close()

    def _tail(self) -> None:
        while True:
            self._wake.wait(self.settings.catchup_interval_s)
            self._wake.clear()  # before reading: a change announced from now on wakes again
            if self._stop.is_set():
                return
            try:
                self.catch_up(announce_later=True)
                self.maybe_retrain(background=True)
                self.maybe_tune()
                if (
                    self._dirty
                    and time.time() - self.stats.last_save > self.settings.save_interval_s
                ):
                    self.save()
                self.stats.last_error = None
            except Exception as exc:  # noqa: BLE001 - keep tailing; the next round retries
                self.stats.last_error = f"{type(exc).__name__}: {exc}"
                LOG.exception("index catch-up failed")

    # applying changes -------------------------------------------------------------------
    def apply(self, upserts: Sequence[tuple[int, np.ndarray]], deletes: Sequence[int]) -> None:
        """Apply committed changes now (the writer's read-your-writes path)."""
        with self._apply_lock:
            index = self.index
            if deletes:
                index.remove(np.asarray(deletes, dtype=np.int64))
            if upserts:
                ids = np.asarray([i for i, _ in upserts], dtype=np.int64)
                vectors = np.stack([v for _, v in upserts]).astype(np.float32)
                index.upsert(ids, vectors)
                if len(self._published) > PUBLISHED_MEMORY:
                    self._published.clear()
                self._published.update(int(i) for i in ids)
            self._dirty = True

    def _apply_current_state(self, index: ShardedIndex, image_ids: Sequence[int]) -> list[int]:
        """Bring `image_ids` to their current state in the source (idempotent); returns
        the ids that exist (were upserted)."""
        if not image_ids:
            return []
        current = self.source.current(image_ids, self.model_id)
        gone = np.asarray([i for i in image_ids if i not in current], dtype=np.int64)
        if len(gone):
            index.remove(gone)
        if current:
            ids = np.fromiter(current.keys(), dtype=np.int64, count=len(current))
            vectors = np.stack([current[int(i)] for i in ids]).astype(np.float32, copy=False)
            index.upsert(ids, vectors)
        return [int(i) for i in current]

    def catch_up(self, *, announce_later: bool = False) -> int:
        """Apply the feed past the watermark; returns the number of changes applied.

        The replay hooks (duplicate pairs of products other replicas wrote) run before
        this returns, or, with `announce_later` (the tailing thread), on their own thread,
        so refreshing pairs never delays the next change becoming searchable."""
        with self._apply_lock:
            applied, arrived = self._replay(self.index, self._cursor)
            if applied:
                self._dirty = True
            self.stats.applied_changes += applied
            self.stats.last_catchup = time.time()
            self.stats.applied_seq = self._cursor.watermark.seq
            self.stats.log_head_seq = self.feed.last_seq()
        if announce_later and arrived and self.on_replay:
            if self._announcer is None:
                self._announcer = ThreadPoolExecutor(1, thread_name_prefix="vs-index-replay")
            self._announcer.submit(self._announce, arrived)
        else:
            self._announce(arrived)
        return applied

    def _replay(self, index: ShardedIndex, cursor: FeedCursor) -> tuple[int, list[int]]:
        """Apply the changes after `cursor` to `index`, advancing `cursor`; returns the
        number of changes and the ids of images that arrived by the feed alone (present
        now, not published through this process's `apply()`)."""
        applied, arrived = 0, []
        for page in self.feed.changes(cursor, PAGE):
            present = self._apply_current_state(index, sorted({c.image_id for c in page}))
            for image_id in present:
                if image_id in self._published:
                    self._published.discard(image_id)
                else:
                    arrived.append(image_id)
            applied += len(page)
        return applied, arrived

    def _announce(self, arrived: list[int]) -> None:
        """Tell the replay hooks which images arrived by the feed (outside the lock)."""
        if not arrived:
            return
        for hook in self.on_replay:
            try:
                hook(arrived)
            except Exception:  # noqa: BLE001 - a hook must not stop the index converging
                LOG.exception("replay hook failed for %d images", len(arrived))

    # rebuilds ---------------------------------------------------------------------------
    def rebuild(
        self,
        *,
        reason: str,
        train: bool | None = None,
        retrain: bool = False,
        progress: Callable[[int, int], None] | None = None,
    ) -> None:
        """Build a new generation from the source and swap it in atomically.

        Searches keep using the old generation meanwhile. `train=None` decides by size;
        an IVF-PQ rebuild reuses the live trained template unless `retrain` is set.
        """
        started = time.perf_counter()
        start = self.feed.position()  # before reading: what changes meanwhile is after it
        total = self.source.count()
        use_ivf = train if train is not None else total >= self.settings.train_threshold
        LOG.info(
            "rebuilding the index from the source (%s): %d images, %s",
            reason,
            total,
            "IVF-PQ" if use_ivf else "exact",
        )
        vectors = self._open_vectors(self.dim)
        params: dict[str, Any] = {}
        trained_now = False
        live = self._index
        if use_ivf and not retrain and live is not None and live.template is not None:
            new = ShardedIndex.from_template(
                live.template,
                self.settings.shards,
                vectors,
                knobs=self._knobs(),
                params=live.params,
            )
        elif use_ivf and total > 0:
            factory, params = ivfpq_factory(total, self.dim, self.settings)
            sample_size = min(total, max(params["nlist"] * 40, 20_000))
            sample = self.source.sample(sample_size, self.model_id)
            t0 = time.perf_counter()
            template = train_template(sample, factory)
            params.update(factory=factory, train_s=round(time.perf_counter() - t0, 2))
            params["train_sample"] = len(sample)
            trained_now = True
            new = ShardedIndex.from_template(
                template, self.settings.shards, vectors, knobs=self._knobs(), params=params
            )
        else:
            new = ShardedIndex.new_flat(self.dim, self.settings.shards, vectors)
        done = 0
        for ids, page in self.source.pages(self.model_id, PAGE * 4):
            new.upsert(ids, page)
            done += len(ids)
            if progress is not None:
                progress(done, total)
        with self._apply_lock:
            # Changes committed while we streamed: replay them onto the new generation
            # under the lock, so no direct apply can slip between this and the swap.
            _, arrived = self._replay(new, start)
            old, self._index = self._index, new
            self._cursor = start
            self._dirty = True
            self.stats.rebuilds += 1
            self.stats.timings["last_rebuild_s"] = round(time.perf_counter() - started, 2)
            trained = self._manifest.trained_at_n if self._manifest else 0
            self.save(trained_at_n=(total if trained_now else trained) if use_ivf else 0)
        for hook in self.on_swap:
            hook(new)
        self._announce(arrived)
        self.maybe_tune()
        if old is not None:
            old.close()
        LOG.info(
            "index generation %d live: %d vectors in %.1fs",
            self.stats.generation,
            new.ntotal,
            time.perf_counter() - started,
        )

    def maybe_retrain(self, *, background: bool) -> bool:
        """Start an IVF-PQ (re)training when the catalogue crossed its threshold."""
        if self._index is None or (self._retrain is not None and self._retrain.is_alive()):
            return False
        n = self._index.ntotal
        trained_at = self._manifest.trained_at_n if self._manifest else 0
        if self._index.kind == "flat":
            due = n >= self.settings.train_threshold
        else:
            due = trained_at > 0 and n >= trained_at * self.settings.retrain_growth
        if not due:
            return False
        stage = "training" if self._index.kind == "flat" else "retraining"
        reason = f"{n} images reached the {stage} threshold"
        if not background:
            self.rebuild(reason=reason, train=True, retrain=True)
            return True

        def run() -> None:
            self.stats.retrain_running = True
            try:
                self.rebuild(reason=reason, train=True, retrain=True)
            except Exception:  # noqa: BLE001 - the old generation keeps serving
                LOG.exception("background index retraining failed")
            finally:
                self.stats.retrain_running = False

        self._retrain = threading.Thread(target=run, name="vs-index-retrain", daemon=True)
        self._retrain.start()
        return True

    # checkpoints ------------------------------------------------------------------------
    def save(self, *, trained_at_n: int | None = None) -> Manifest:
        """Write a new generation's files, then the manifest, then drop older generations."""
        with self._apply_lock:
            watermark = self._cursor.watermark
            index = self.index
            self._dirty = False
        generation = (self._manifest.generation + 1) if self._manifest else 1
        directory = generation_dir(self.root, generation)
        LOG.debug("writing index generation %d", generation)
        names, written = index.write_shards(directory)
        index.vectors.flush()
        previous_trained = self._manifest.trained_at_n if self._manifest else 0
        manifest = Manifest(
            generation=generation,
            kind=index.kind,
            dim=index.dim,
            model_id=self.model_id,
            shards=names,
            watermark=watermark,
            ntotal=written,
            template="template.faiss" if index.template is not None else None,
            params=index.params,
            trained_at_n=trained_at_n if trained_at_n is not None else previous_trained,
        )
        write_manifest(self.root, manifest)
        remove_other_generations(self.root, generation)
        self._manifest = manifest
        self.stats.generation = generation
        self.stats.last_save = time.time()
        LOG.debug("saved index generation %d (%d vectors)", generation, written)
        return manifest

    def wait_for_tuning(self, timeout: float | None = None) -> None:
        """Block until a background tuning started by `maybe_tune` has finished."""
        tuner = self._tuner
        if tuner is not None:
            tuner.join(timeout)

    def wait_for_retraining(self, timeout: float | None = None) -> None:
        """Block until a background (re)training started by `maybe_retrain` has swapped in."""
        retrain = self._retrain
        if retrain is not None:
            retrain.join(timeout)

    def describe(self) -> dict[str, Any]:
        """The index at a glance, for readiness probes, metrics and the CLI.

        Cheap (no I/O): `shards` is the vector count per shard, `trained` whether the
        shards hold IVF-PQ codes (else exact vectors), `watermark` how far the feed is
        applied and `catchup_lag` how many changes the feed held beyond it at the last
        catch-up. `kind` is None until the index is open.
        """
        index = self._index
        watermark = self._cursor.watermark
        return {
            "kind": index.kind if index else None,
            "trained": index is not None and index.kind != "flat",
            "generation": self.stats.generation,
            "ntotal": index.ntotal if index else 0,
            "shards": [s.ntotal for s in index.shards] if index else [],
            "params": index.params if index else {},
            "watermark": {"seq": watermark.seq, "xmin": watermark.xmin},
            "catchup_lag": max(0, self.stats.log_head_seq - self.stats.applied_seq),
            "retrain_running": self.stats.retrain_running,
            "last_error": self.stats.last_error,
            "search": {"nprobe": index.default_nprobe, "refine": index.knobs.refine}
            if index is not None and index.kind != "flat"
            else None,
            "tuning": self.tuning.as_dict() if self.tuning is not None else None,
        }
