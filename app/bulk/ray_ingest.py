"""`vsearch ingest --engine ray`: bulk embedding on Ray Data, stored by the catalogue's code.

The same input files and the same outcome as `vsearch ingest`, with the work spread over
a Ray cluster (or a local Ray instance the command starts itself):

1. The driver reads the products (`app.catalogue.ingest.read_products`: CSV, JSONL or
   Parquet) a window at a time and makes one row per image.
2. CPU tasks (`map_batches` over a function) read each image (local path, or URL through
   the SSRF-safe `ImageFetcher` with the service's limits), hash it, look its content up
   among the stored embeddings of the model (a re-run embeds nothing twice), decode it
   with the service's decode limits and preprocess it exactly as the service does.
3. An actor pool (`ActorPoolStrategy`) holds the model, one GPU per actor when
   `num_gpus > 0`, CPU threads otherwise, and embeds the rest in batches.
4. The driver groups the rows back into products and writes them with
   `store_products` (the bulk path of `vsearch embeddings import`: one transaction per
   batch of products, images matched by content as the service matches them, change-log
   rows for the replicas), publishes them to the local index and refreshes their
   duplicate pairs; a product with a failed image goes to the failures file instead.

Each finished window is recorded in a state file, so an interrupted run resumes at the
first unfinished window; re-running a finished file changes nothing.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np

from app.catalogue import repository as repo
from app.catalogue.ingest import CsvColumns, read_products
from app.catalogue.service import (
    PreparedImage,
    ProductInput,
    decode_base64_image,
    publish_outcomes,
    store_products,
)
from app.core.config import Settings
from app.core.database import Database
from app.core.errors import ImageTooLarge, ImageUndecodable, ServiceError
from app.imaging.crop import original_size
from app.imaging.decode import DecodeLimits, decode_image
from app.inference.loading import load_module, resolve_model_dir
from app.inference.preprocess import Preprocessor
from app.services import ModelMismatch, make_fetcher, open_storage

LOG = logging.getLogger(__name__)


@dataclass(frozen=True)
class RayOptions:
    """Where and how wide the pipeline runs.

    `address`: a running cluster (`ray://host:10001` or `auto`); None starts a local Ray
    instance for this command and stops it at the end. `num_cpus` is the local instance's
    logical CPU slots: more than the cores, so that the read tasks and the actor pool do
    not wait on each other for slots (the work itself is bounded by the cores).
    """

    address: str | None = None
    num_cpus: int = 8
    num_gpus: float = 0.0
    actors: int = 1
    actor_threads: int = 2  # torch threads (and CPU slots) per CPU actor
    batch_size: int = 32  # images per forward pass (and per read task)
    window: int = 20_000  # products per Ray dataset (the resume granularity)
    products_per_commit: int = 256


@dataclass
class RayIngestSummary:
    products: int = 0
    images: int = 0
    created: int = 0
    updated: int = 0
    unchanged: int = 0
    failed: int = 0
    images_embedded: int = 0
    images_reused: int = 0
    windows_skipped: int = 0
    seconds: float = 0.0
    # Until the first embedded rows reached the driver (Ray, workers and models starting):
    # the rest of `seconds` is the pipeline's steady state.
    startup_seconds: float | None = None
    steady_images: int = 0
    started_at: float = field(default_factory=time.perf_counter)
    ray: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        steady = self.seconds - (self.startup_seconds or 0.0)
        return {
            "engine": "ray",
            "products": self.products,
            "images": self.images,
            "created": self.created,
            "updated": self.updated,
            "unchanged": self.unchanged,
            "failed": self.failed,
            "images_embedded": self.images_embedded,
            "images_reused": self.images_reused,
            "windows_skipped_on_resume": self.windows_skipped,
            "seconds": round(self.seconds, 2),
            "images_per_s": round(self.images / self.seconds, 2) if self.seconds else 0.0,
            "startup_seconds": round(self.startup_seconds or 0.0, 2),
            "steady_images_per_s": round(self.steady_images / steady, 2) if steady > 0 else 0.0,
            "ray": self.ray,
        }


# the CPU stage: read, hash, look up, decode, preprocess ----------------------------------
@dataclass(frozen=True)
class _ReadContext:
    """What a read task needs; plain values, so Ray ships it to any node."""

    settings: Settings
    database_url: str
    model_id: str
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


def _read(image: dict[str, Any], fetch: Callable[[str], bytes], max_bytes: int) -> bytes:
    if image["data"] is not None and len(image["data"]):
        data = decode_base64_image(image["data"])
    elif image["url"]:
        data = fetch(image["url"])
    else:
        path = Path(image["path"])
        try:
            if path.stat().st_size > max_bytes:
                raise ImageTooLarge(f"{path} is larger than {max_bytes} bytes.")
            data = path.read_bytes()
        except OSError as exc:
            raise ImageUndecodable(f"Cannot read {path}: {exc.strerror}") from None
    if len(data) > max_bytes:
        raise ImageTooLarge(f"The image is larger than {max_bytes} bytes.")
    return data


def read_and_preprocess(batch: dict[str, np.ndarray], ctx: _ReadContext) -> dict[str, Any]:
    """A Ray Data batch of image rows -> hashed, looked-up, decoded, preprocessed rows."""
    import torch

    # The preprocessing's tensor ops are small: one thread, so that read tasks beside the
    # model actors do not each start a thread per core.
    torch.set_num_threads(1)
    settings = ctx.settings
    n = len(batch["p"])
    rows = [{k: batch[k][i] for k in batch} for i in range(n)]
    fetcher = make_fetcher(settings)
    loop = asyncio.new_event_loop()
    try:
        payloads: list[bytes | None] = []
        errors = [""] * n
        for i, row in enumerate(rows):
            try:
                payloads.append(
                    _read(
                        row,
                        lambda url: loop.run_until_complete(fetcher.fetch(url)),
                        settings.image.max_bytes,
                    )
                )
            except ServiceError as exc:
                payloads.append(None)
                errors[i] = json.dumps({"code": exc.code, "message": exc.message})
    finally:
        loop.run_until_complete(fetcher.aclose())
        loop.close()
    shas = [hashlib.sha256(p).hexdigest() if p is not None else "" for p in payloads]
    boxes = [_box(row["box"]) for row in rows]
    db = Database(ctx.database_url, pool_size=1)
    try:
        with db.read() as session:
            known = repo.known_embeddings(
                session,
                [(s, b) for s, b in zip(shas, boxes, strict=True) if s],
                ctx.model_id,
            )
    finally:
        db.dispose()
    limits = DecodeLimits.from_settings(settings.image)
    preprocessor = Preprocessor(ctx.input_size, ctx.mean, ctx.std)
    size = ctx.input_size
    pixels = np.zeros((n, 3, size, size), dtype=np.float32)
    embeddings: list[bytes] = [b""] * n
    widths, heights = np.zeros(n, dtype=np.int64), np.zeros(n, dtype=np.int64)
    for i, data in enumerate(payloads):
        if data is None:
            continue
        box = boxes[i]
        hit = known.get((shas[i], tuple(box) if box is not None else None))
        if hit is not None:
            embeddings[i], widths[i], heights[i] = hit.embedding, hit.width, hit.height
            continue
        try:
            image = decode_image(
                data,
                max_pixels=limits.max_pixels,
                max_scans=limits.max_scans,
                decode_size=limits.decode_size,
            )
            crop_box = (box[0], box[1], box[2], box[3]) if box is not None else None
            pixels[i] = preprocessor(image, crop_box).numpy()
            widths[i], heights[i] = original_size(image)
        except ServiceError as exc:
            errors[i] = json.dumps({"code": exc.code, "message": exc.message})
    return {
        "p": batch["p"],
        "pos": batch["pos"],
        "source": np.asarray([_source(r) for r in rows], dtype=object),
        "box": batch["box"],
        "sha256": np.asarray(shas, dtype=object),
        "width": widths,
        "height": heights,
        "error": np.asarray(errors, dtype=object),
        "embedding": np.asarray(embeddings, dtype=object),
        "pixels": pixels,
    }


def _box(value: Any) -> list[float] | None:
    if value is None:
        return None
    box = [float(v) for v in value]
    return box or None


def _source(row: dict[str, Any]) -> str:
    return str(row["url"] or row["path"] or "")


# the model stage: an actor pool ---------------------------------------------------------
class EmbedActor:
    """Holds the model; embeds the rows that were neither found stored nor failed."""

    def __init__(self, model_dir: str, device: str, precision: str, threads: int) -> None:
        import torch

        from app.inference.runtime import load_model

        if threads > 0:
            torch.set_num_threads(threads)
        self.embedder = load_model(model_dir, device=device, precision=precision)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        import torch

        todo = [
            i
            for i in range(len(batch["p"]))
            if not batch["error"][i] and not len(batch["embedding"][i])
        ]
        embeddings = list(batch["embedding"])
        if todo:
            pixels = np.ascontiguousarray(batch["pixels"][todo])
            vectors = self.embedder.forward(torch.from_numpy(pixels))
            for j, i in enumerate(todo):
                embeddings[i] = vectors[j].astype(np.float32).tobytes()
        out = {k: v for k, v in batch.items() if k != "pixels"}
        out["embedding"] = np.asarray(embeddings, dtype=object)
        out["embedded"] = np.isin(np.arange(len(batch["p"])), todo)
        return out


# the driver -----------------------------------------------------------------------------
def _image_rows(products: list[ProductInput]) -> list[dict[str, Any]]:
    rows = []
    for p, product in enumerate(products):
        for pos, image in enumerate(product.images):
            data = image.data_b64
            if image.data is not None:
                data = base64.b64encode(image.data).decode()
            rows.append(
                {
                    "p": p,
                    "pos": pos,
                    "url": image.url or "",
                    "path": str(image.path) if image.path is not None else "",
                    "data": data or "",
                    "box": list(image.box) if image.box is not None else [],
                }
            )
    return rows


def _windows(products: Iterator[ProductInput], size: int) -> Iterator[list[ProductInput]]:
    window: list[ProductInput] = []
    for product in products:
        window.append(product)
        if len(window) >= size:
            yield window
            window = []
    if window:
        yield window


def run_ray_ingest(
    settings: Settings,
    file: Path,
    *,
    images_root: Path | None = None,
    columns: CsvColumns | None = None,
    options: RayOptions | None = None,
    failures: IO[str] | None = None,
    state_path: Path | None = None,
    on_products: Callable[[int, int], None] | None = None,
) -> RayIngestSummary:
    """Ingest `file` with Ray Data; see the module docstring.

    Args:
        on_products: called with (products done, images done) after each commit.
    """
    import ray

    options = options or RayOptions()
    summary = RayIngestSummary()
    model_dir, _ = resolve_model_dir(settings.model)
    loaded = load_module(model_dir)
    config, model_id = loaded.config, loaded.model_id
    del loaded
    state = _read_state(state_path, file, options.window)
    with open_storage(settings) as storage:
        if storage.model_id != model_id:
            raise ModelMismatch(
                f"The catalogue holds embeddings of {storage.model_id}, not of {model_id} "
                "(VS_MODEL): run `vsearch reembed` first, or ingest with that model."
            )
        ctx = _ReadContext(
            settings=settings,
            database_url=settings.resolved_database_url,
            model_id=model_id,
            input_size=config.input_size,
            mean=tuple(config.mean),  # type: ignore[arg-type]
            std=tuple(config.std),  # type: ignore[arg-type]
        )
        started_here = _start_ray(ray, options)
        try:
            summary.ray = {
                "address": options.address or "local",
                "resources": {k: v for k, v in ray.cluster_resources().items() if "node" not in k},
                "actors": options.actors,
                "batch_size": options.batch_size,
            }
            products = read_products(file, images_root=images_root, columns=columns)
            for number, window in enumerate(_windows(products, options.window)):
                if number < state["windows_done"]:
                    summary.windows_skipped += 1
                    continue
                _run_window(
                    ray, window, ctx, options, model_dir, storage, summary, failures, on_products
                )
                state["windows_done"] = number + 1
                _write_state(state_path, state)
        finally:
            if started_here:
                ray.shutdown()
    if state_path is not None:
        state_path.unlink(missing_ok=True)
    summary.seconds = time.perf_counter() - summary.started_at
    return summary


def _start_ray(ray: Any, options: RayOptions) -> bool:
    """Connect to the cluster, or start a local instance; returns whether one was started."""
    if ray.is_initialized():
        return False
    if options.address:
        ray.init(address=options.address, log_to_driver=False)
    else:
        ray.init(
            num_cpus=options.num_cpus,
            num_gpus=options.num_gpus,
            include_dashboard=False,
            log_to_driver=False,
        )
    return True


def _pipeline(
    ray: Any, rows: list[dict[str, Any]], ctx: _ReadContext, options: RayOptions, model_dir: Path
) -> Any:
    """The window's image rows -> read tasks -> model actor pool (a lazy Ray Dataset)."""
    import ray.data

    parallelism = max(1, len(rows) // options.batch_size)
    ds = ray.data.from_items(rows, override_num_blocks=min(parallelism, 200))
    ds = ds.map_batches(
        read_and_preprocess,
        fn_kwargs={"ctx": ctx},
        batch_size=options.batch_size,
        batch_format="numpy",
        num_cpus=1,
    )
    # A CPU actor reserves a slot per thread (at least two). Its resources differing from
    # the read tasks' also keeps Ray from fusing the two stages into the actor, where
    # reading would stop overlapping the forward passes.
    gpu = options.num_gpus > 0
    ds = ds.map_batches(
        EmbedActor,
        fn_constructor_kwargs={
            "model_dir": str(model_dir),
            "device": "cuda" if gpu else "cpu",
            "precision": ctx.settings.precision,
            "threads": 0 if gpu else options.actor_threads,
        },
        compute=ray.data.ActorPoolStrategy(size=options.actors),
        batch_size=options.batch_size,
        batch_format="numpy",
        num_gpus=1 if gpu else 0,
        num_cpus=0 if gpu else max(2, options.actor_threads),
    )
    return ds


def _run_window(
    ray: Any,
    window: list[ProductInput],
    ctx: _ReadContext,
    options: RayOptions,
    model_dir: Path,
    storage: Any,
    summary: RayIngestSummary,
    failures: IO[str] | None,
    on_products: Callable[[int, int], None] | None,
) -> None:
    rows = _image_rows(window)
    batches = (
        _pipeline(ray, rows, ctx, options, model_dir).iter_batches(
            batch_size=options.batch_size, batch_format="numpy"
        )
        if rows
        else iter(())
    )
    parts: dict[int, dict[int, dict[str, Any]]] = {}
    # A product without images is stored as it is (as POST /products stores it).
    pending: list[tuple[ProductInput, list[PreparedImage]]] = [
        (product, []) for product in window if not product.images
    ]

    def commit() -> None:
        outcomes = store_products(storage.db, storage.model_id, pending, match_vectors=False)
        publish_outcomes(outcomes, storage.index, storage.duplicates.on_commit)
        for outcome in outcomes:
            summary.products += 1
            setattr(summary, outcome.status, getattr(summary, outcome.status) + 1)
        summary.images += sum(len(images) for _, images in pending)
        pending.clear()
        if on_products is not None:
            on_products(summary.products, summary.images)

    for batch in batches:
        if summary.startup_seconds is None:
            summary.startup_seconds = time.perf_counter() - summary.started_at
        else:
            summary.steady_images += len(batch["p"])
        for i in range(len(batch["p"])):
            p = int(batch["p"][i])
            parts.setdefault(p, {})[int(batch["pos"][i])] = {k: batch[k][i] for k in batch}
            product = window[p]
            if len(parts[p]) < len(product.images):
                continue
            images = [parts[p][pos] for pos in range(len(product.images))]
            del parts[p]
            broken = [img for img in images if img["error"]]
            if broken:
                summary.products += 1
                summary.failed += 1
                if failures is not None:
                    error = json.loads(broken[0]["error"])
                    sources = [img["source"] for img in images]
                    line = {"id": product.id, "error": error, "images": sources}
                    failures.write(json.dumps(line) + "\n")
                continue
            summary.images_embedded += sum(bool(img["embedded"]) for img in images)
            summary.images_reused += sum(not img["embedded"] for img in images)
            if any(other.id == product.id for other, _ in pending):
                commit()  # a product listed twice: stored in order, as two upserts
            pending.append((product, [_prepared(img) for img in images]))
            if len(pending) >= options.products_per_commit:
                commit()
    if pending:
        commit()


def _prepared(row: dict[str, Any]) -> PreparedImage:
    return PreparedImage(
        sha256=str(row["sha256"]),
        box=_box(row["box"]),
        source_url=str(row["source"]) or None,
        width=int(row["width"]),
        height=int(row["height"]),
        embedding=bytes(row["embedding"]),
        reused=not bool(row["embedded"]),
    )


def _read_state(path: Path | None, file: Path, window: int) -> dict[str, Any]:
    """The windows already done of this very file (same path, size, mtime, window)."""
    stat = file.stat()
    identity = {
        "file": str(file.resolve()),
        "size": stat.st_size,
        "mtime_ns": stat.st_mtime_ns,
        "window": window,
    }
    if path is not None and path.is_file():
        try:
            state: dict[str, Any] = json.loads(path.read_text())
        except ValueError:
            state = {}
        if {k: state.get(k) for k in identity} == identity:
            return state
    return {**identity, "windows_done": 0}


def _write_state(path: Path | None, state: dict[str, Any]) -> None:
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(state))
