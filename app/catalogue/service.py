"""Catalogue service: ingest (fetch -> decode -> embed -> store), read and delete products.

Each product is its own unit of work: its images are fetched, decoded and embedded first
(outside any transaction), then its rows and change-log entries are written in one
transaction. A failed product leaves nothing behind and never affects the others.
Identical image bytes (same sha256 and box) already embedded by the current model are
reused, not re-embedded.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
from sqlalchemy.orm import Session

from app.catalogue import repository as repo
from app.catalogue import review_repository as review_repo
from app.catalogue.filters import LabelFilter, normalise_labels, normalise_sets
from app.catalogue.models import Product, ProductImage, utcnow
from app.catalogue.scope import Scope, in_scope, merged_sets, sets_within
from app.core.database import Database
from app.core.errors import (
    ImageNotFound,
    ImageTooLarge,
    ImageUndecodable,
    InvalidRequest,
    ProductNotFound,
    ServiceError,
)
from app.imaging.crop import Box, original_size
from app.imaging.decode import DecodeLimits, ImageDecoder
from app.imaging.fetch import ImageFetcher
from app.imaging.thumbnail import Thumbnail, make_thumbnail
from app.inference.admission import Ticket
from app.inference.worker import BatchWorker

LOG = logging.getLogger(__name__)

Status = Literal["created", "updated", "unchanged", "failed"]


@dataclass(frozen=True)
class ImageInput:
    """Exactly one of `url`, `data` (bytes), `data_b64` (base64) or `path` (CLI only)."""

    url: str | None = None
    data: bytes | None = None
    data_b64: str | None = None
    path: Path | None = None
    box: Box | None = None

    @property
    def source(self) -> str | None:
        if self.url is not None:
            return self.url
        return str(self.path) if self.path is not None else None


@dataclass(frozen=True)
class ProductInput:
    id: str
    images: Sequence[ImageInput]
    title: str | None = None
    category: str | None = None
    attributes: dict[str, Any] = field(default_factory=dict)
    # None keeps the stored labels (a client or file that knows none); a mapping, even
    # empty, replaces them.
    labels: Mapping[str, Sequence[str]] | None = None
    # Likewise for the product sets it belongs to.
    sets: Sequence[str] | None = None


@dataclass(frozen=True)
class ProductPatch:
    """The fields a partial update sets (`fields` names them; the others are kept)."""

    fields: frozenset[str]
    title: str | None = None
    category: str | None = None
    attributes: dict[str, Any] | None = None
    labels: Mapping[str, Sequence[str]] | None = None
    sets: Sequence[str] | None = None


@dataclass(frozen=True)
class ProductResult:
    id: str
    status: Status
    images: int = 0
    error: ServiceError | None = None


@dataclass
class PreparedImage:
    sha256: str
    box: list[float] | None
    source_url: str | None
    width: int
    height: int
    embedding: bytes
    reused: bool
    thumbnail: Thumbnail | None = None  # made when the image was decoded for this product


@dataclass
class StoreOutcome:
    status: Status
    upserted: list[tuple[int, bytes]]
    deleted: list[int]
    product_pk: int


class IndexSink(Protocol):
    """Where committed image changes go right after commit (the vector index)."""

    def apply(self, upserts: Sequence[tuple[int, np.ndarray]], deletes: Sequence[int]) -> None: ...


@dataclass
class IngestTimings:
    """Seconds spent per stage, summed over products (for `vsearch ingest`'s summary)."""

    read: float = 0.0
    decode: float = 0.0
    embed: float = 0.0
    store: float = 0.0
    images_embedded: int = 0
    images_reused: int = 0

    def add(self, stage: str, seconds: float) -> None:
        setattr(self, stage, getattr(self, stage) + seconds)


class CatalogueService:
    def __init__(
        self,
        db: Database,
        worker: BatchWorker,
        fetcher: ImageFetcher,
        *,
        max_pixels: int,
        max_bytes: int,
        index: IndexSink | None = None,
        after_commit: Callable[[StoreOutcome], Any] | None = None,
        concurrency: int = 8,
        decoder: ImageDecoder | None = None,
    ) -> None:
        self.db = db
        self.decoder = decoder or ImageDecoder(DecodeLimits(max_pixels=max_pixels))
        self.worker = worker
        self.fetcher = fetcher
        self.max_pixels = max_pixels
        self.max_bytes = max_bytes
        self.index = index
        self.after_commit = after_commit
        self._limit = asyncio.Semaphore(concurrency)
        self.timings = IngestTimings()

    def set_concurrency(self, concurrency: int) -> None:
        """How many products are prepared and stored at once."""
        self._limit = asyncio.Semaphore(concurrency)

    @property
    def model_id(self) -> str:
        return self.worker.embedder.model_id

    # ingest -----------------------------------------------------------------------------
    async def upsert_products(
        self, products: Sequence[ProductInput], scope: Scope = None
    ) -> list[ProductResult]:
        """Index products; one result per product, in order. With a `scope`, a product
        whose id is held by a product outside it fails (`product_not_found`) untouched."""
        return list(await asyncio.gather(*(self._guarded_upsert(p, scope) for p in products)))

    async def _guarded_upsert(self, product: ProductInput, scope: Scope) -> ProductResult:
        async with self._limit:
            try:
                return await self.upsert_product(product, scope)
            except ServiceError as exc:
                LOG.info("product %r failed: %s (%s)", product.id, exc.message, exc.code)
                return ProductResult(product.id, "failed", 0, exc)
            except Exception as exc:  # noqa: BLE001 - one product must never sink the others
                LOG.exception("product %r failed unexpectedly", product.id)
                error = ServiceError(
                    f"Internal error while indexing this product ({type(exc).__name__})."
                )
                return ProductResult(product.id, "failed", 0, error)

    async def upsert_product(self, product: ProductInput, scope: Scope = None) -> ProductResult:
        sets_within(product.sets, scope, product.id)
        prepared = await self._prepare(product)
        started = time.perf_counter()
        outcome = await asyncio.to_thread(self._store, product, prepared, scope)
        self.timings.add("store", time.perf_counter() - started)
        await self._publish(outcome)
        return ProductResult(product.id, outcome.status, len(prepared))

    async def _prepare(self, product: ProductInput) -> list[PreparedImage]:
        """Read, decode and embed a product's images; admitted for all of them first,
        so an overloaded service refuses the product before fetching anything."""
        with self.worker.admission.admit(len(product.images)) as ticket:
            return await self._prepare_admitted(product, ticket)

    async def _prepare_admitted(self, product: ProductInput, ticket: Ticket) -> list[PreparedImage]:
        started = time.perf_counter()
        payloads = await asyncio.gather(*(self._read(img) for img in product.images))
        self.timings.add("read", time.perf_counter() - started)
        shas = [hashlib.sha256(p).hexdigest() for p in payloads]
        boxes = [list(img.box) if img.box is not None else None for img in product.images]
        known = await asyncio.to_thread(self._known, list(zip(shas, boxes, strict=True)))

        prepared: list[PreparedImage | None] = [None] * len(payloads)
        todo: list[int] = []
        for i, (sha, box) in enumerate(zip(shas, boxes, strict=True)):
            hit = known.get((sha, tuple(box) if box is not None else None))
            if hit is not None:
                prepared[i] = PreparedImage(
                    sha, box, product.images[i].source, hit.width, hit.height, hit.embedding, True
                )
            else:
                todo.append(i)
        if todo:
            started = time.perf_counter()
            decoded = await self.decoder.decode_all([payloads[i] for i in todo])
            thumbnails = await asyncio.to_thread(_thumbnails, decoded)
            self.timings.add("decode", time.perf_counter() - started)
            started = time.perf_counter()
            vectors = await self.worker.embed(
                decoded, [product.images[i].box for i in todo], ticket=ticket
            )
            self.timings.add("embed", time.perf_counter() - started)
            for j, i in enumerate(todo):
                prepared[i] = PreparedImage(
                    shas[i],
                    boxes[i],
                    product.images[i].source,
                    *original_size(decoded[j]),
                    vectors[j].astype(np.float32).tobytes(),
                    False,
                    thumbnails[j],
                )
        self.timings.images_embedded += len(todo)
        self.timings.images_reused += len(payloads) - len(todo)
        return [p for p in prepared if p is not None]

    async def _read(self, image: ImageInput) -> bytes:
        if image.data is not None:
            data = image.data
        elif image.data_b64 is not None:
            data = decode_base64_image(image.data_b64)
        elif image.url is not None:
            data = await self.fetcher.fetch(image.url)
        elif image.path is not None:
            data = await asyncio.to_thread(_read_file, image.path, self.max_bytes)
        else:
            raise ImageUndecodable("The image has neither data nor a URL.")
        if len(data) > self.max_bytes:
            raise ImageTooLarge(f"The image is larger than {self.max_bytes} bytes.")
        return data

    def _known(self, keys: list[tuple[str, list[float] | None]]) -> dict[Any, repo.KnownEmbedding]:
        with self.db.read() as session:
            return repo.known_embeddings(session, keys, self.model_id)

    def _store(
        self, product: ProductInput, images: list[PreparedImage], scope: Scope = None
    ) -> StoreOutcome:
        with self.db.write() as session:
            row, created = repo.lock_or_create_product(session, product.id)
            if scope is not None and not created:
                current = _require_in_scope(session, row, scope)
                assert product.sets is not None  # `sets_within` made sure
                product = replace(product, sets=merged_sets(product.sets, current, scope))
            existing = repo.images_of(session, row.pk)
            fields_changed = _set_fields(row, product, created)
            fields_changed |= _set_labels(session, {row.pk: product}, created)
            fields_changed |= _set_sets(session, {row.pk: product}, created)
            plan = plan_images(existing, images, self.model_id)
            upserted: list[tuple[int, bytes]] = []
            for position in plan.added:
                new = images[position]
                added = self._insert_image(session, row.pk, position, new)
                upserted.append((added.id, new.embedding))
            repo.delete_images(session, plan.deleted)
            repo.set_positions(session, plan.moved)
            repo.log_changes(session, [i for i, _ in upserted], repo.OP_UPSERT)
            review_repo.add_thumbnails(
                session, [(p.sha256, p.thumbnail) for p in images if p.thumbnail is not None]
            )
            status = _status(row, created, fields_changed or bool(upserted or plan.changed))
            return StoreOutcome(status, upserted, plan.deleted, row.pk)

    def _insert_image(
        self, session: Session, product_pk: int, position: int, new: PreparedImage
    ) -> ProductImage:
        """One prepared image of a product, stored at `position` (its embedding with it)."""
        return repo.add_image(
            session,
            product_pk=product_pk,
            position=position,
            source_url=new.source_url,
            sha256=new.sha256,
            box=new.box,
            width=new.width,
            height=new.height,
            embedding=new.embedding,
            model_id=self.model_id,
        )

    async def _publish(self, outcome: StoreOutcome) -> None:
        """Make committed changes searchable at once (read-your-writes)."""
        await asyncio.to_thread(publish_outcomes, [outcome], self.index, self.after_commit)

    # reads and deletes ------------------------------------------------------------------
    def get_product(self, external_id: str, scope: Scope = None) -> Product:
        with self.db.read() as session:
            product = repo.get_product(session, external_id, with_images=True)
        if product is None or not in_scope((m.set_id for m in product.sets), scope):
            raise ProductNotFound(f"No product with id {external_id!r}.")
        return product

    def list_products(
        self,
        *,
        after_pk: int | None,
        limit: int,
        category: str | None = None,
        where: LabelFilter | None = None,
    ) -> list[Product]:
        with self.db.read() as session:
            return repo.list_products(
                session, after_pk=after_pk, limit=limit, category=category, where=where
            )

    def count_products(self, *, where: LabelFilter | None = None) -> int:
        """Exact count of the products a list with this filter pages through."""
        with self.db.read() as session:
            return repo.count_products(session, where=where)

    async def delete_product(self, external_id: str, scope: Scope = None) -> list[int]:
        deleted = await asyncio.to_thread(self._delete, external_id, scope)
        await self._publish(StoreOutcome("updated", [], deleted, -1))
        return deleted

    def _delete(self, external_id: str, scope: Scope) -> list[int]:
        with self.db.write() as session:
            product = repo.get_product(session, external_id, for_update=True)
            if product is None:
                raise ProductNotFound(f"No product with id {external_id!r}.")
            _require_in_scope(session, product, scope)
            return repo.delete_product(session, product)

    # partial updates --------------------------------------------------------------------
    async def patch_product(
        self, external_id: str, changes: ProductPatch, scope: Scope = None
    ) -> tuple[Status, Product]:
        """Set the given fields (title, category, attributes, labels) of a product and keep
        its images. A change writes a change-log row per image of the product in the same
        transaction (replicas and the feed see the product changed; the index re-reads
        the same vectors, so replay is harmless); a patch that changes nothing writes
        nothing and reports `unchanged`."""
        status = await asyncio.to_thread(self._patch, external_id, changes, scope)
        return status, await asyncio.to_thread(self.get_product, external_id)

    def _patch(self, external_id: str, changes: ProductPatch, scope: Scope) -> Status:
        with self.db.write() as session:
            row = repo.get_product(session, external_id, for_update=True)
            if row is None:
                raise ProductNotFound(f"No product with id {external_id!r}.")
            current = _require_in_scope(session, row, scope)
            changed = False
            for name in ("title", "category", "attributes"):
                if name in changes.fields:
                    value = getattr(changes, name)
                    value = dict(value or {}) if name == "attributes" else value
                    if getattr(row, name) != value:
                        setattr(row, name, value)
                        changed = True
            if "labels" in changes.fields:
                patch = ProductInput(external_id, [], labels=changes.labels or {})
                changed |= _set_labels(session, {row.pk: patch}, False)
            if "sets" in changes.fields:
                sets_within(changes.sets, scope, external_id)
                sets = merged_sets(changes.sets or [], current, scope)
                patch = ProductInput(external_id, [], sets=sets)
                changed |= _set_sets(session, {row.pk: patch}, False)
            if not changed:
                return "unchanged"
            row.updated_at = utcnow()
            repo.log_changes(
                session, [i.id for i in repo.images_of(session, row.pk)], repo.OP_UPSERT
            )
            return "updated"

    async def add_image(
        self, external_id: str, image: ImageInput, scope: Scope = None
    ) -> tuple[Status, ProductImage]:
        """Add one image to an existing product (fetched, decoded and embedded first, out
        of any transaction). The same image (bytes and box) already on the product is
        not added twice: the call reports `unchanged` and returns the stored one."""
        await asyncio.to_thread(self.get_product, external_id, scope)  # 404 before any fetch
        prepared = (await self._prepare(ProductInput(external_id, [image])))[0]
        status, stored, outcome = await asyncio.to_thread(
            self._add_image, external_id, prepared, scope
        )
        await self._publish(outcome)
        return status, stored

    def _add_image(
        self, external_id: str, new: PreparedImage, scope: Scope = None
    ) -> tuple[Status, ProductImage, StoreOutcome]:
        with self.db.write() as session:
            row = repo.get_product(session, external_id, for_update=True)
            if row is None:
                raise ProductNotFound(f"No product with id {external_id!r}.")
            _require_in_scope(session, row, scope)
            existing = repo.images_of(session, row.pk)
            key = _image_key(new.sha256, new.box, self.model_id)
            for img in existing:
                if _image_key(img.sha256, img.box, img.model_id) == key:
                    return "unchanged", img, StoreOutcome("unchanged", [], [], row.pk)
            position = max((img.position for img in existing), default=-1) + 1
            added = self._insert_image(session, row.pk, position, new)
            repo.log_changes(session, [added.id], repo.OP_UPSERT)
            row.updated_at = utcnow()
            outcome = StoreOutcome("updated", [(added.id, new.embedding)], [], row.pk)
            return "updated", added, outcome

    async def remove_image(self, external_id: str, image_id: int, scope: Scope = None) -> None:
        """Remove one image of a product: gone from search at once, its duplicate pairs
        dropped (the product's other images keep theirs)."""
        outcome = await asyncio.to_thread(self._remove_image, external_id, image_id, scope)
        await self._publish(outcome)

    def _remove_image(self, external_id: str, image_id: int, scope: Scope) -> StoreOutcome:
        with self.db.write() as session:
            row = repo.get_product(session, external_id, for_update=True)
            if row is None:
                raise ProductNotFound(f"No product with id {external_id!r}.")
            _require_in_scope(session, row, scope)
            images = repo.images_of(session, row.pk)
            if image_id not in {img.id for img in images}:
                raise ImageNotFound(f"Product {external_id!r} has no image {image_id}.")
            repo.delete_images(session, [image_id])
            kept = [img.id for img in images if img.id != image_id]
            repo.delete_stale_pairs_of(session, row.pk, kept)
            row.updated_at = utcnow()
            return StoreOutcome("updated", [], [image_id], row.pk)


@dataclass
class ReembedReport:
    reembedded: int = 0
    unrecoverable: list[int] = field(default_factory=list)
    failed: dict[int, str] = field(default_factory=dict)


async def reembed_catalogue(
    service: CatalogueService,
    *,
    batch: int = 64,
    progress: Callable[[int], None] | None = None,
) -> ReembedReport:
    """Embed again, with the loaded model, every image stored by another model.

    The original bytes come back from where they came from (the URL, or the local path
    `vsearch ingest` read); uploaded bytes are not kept, so those images are reported as
    unrecoverable (post those products again).
    """
    report = ReembedReport()
    after = 0
    while True:
        with service.db.read() as session:
            page = repo.images_of_other_models(session, service.model_id, after, batch)
        if not page:
            return report
        after = page[-1][0]

        async def one(image_id: int, source: str | None, box: list[float] | None) -> None:
            if not source:
                report.unrecoverable.append(image_id)
                return
            is_url = source.startswith(("http://", "https://"))
            image_input = ImageInput(
                url=source if is_url else None,
                path=None if is_url else Path(source),
                box=Box(box[0], box[1], box[2], box[3]) if box else None,
            )
            try:
                data = await service._read(image_input)
                image = await service.decoder.decode(data)
                vector = (await service.worker.embed([image], [image_input.box]))[0]
            except ServiceError as exc:
                report.failed[image_id] = exc.message
                return
            await asyncio.to_thread(
                _replace, service, image_id, vector.astype(np.float32).tobytes()
            )
            report.reembedded += 1

        await asyncio.gather(*(one(*row) for row in page))
        if progress is not None:
            progress(report.reembedded + len(report.unrecoverable) + len(report.failed))


def _replace(service: CatalogueService, image_id: int, embedding: bytes) -> None:
    with service.db.write() as session:
        repo.replace_embedding(session, image_id, embedding, service.model_id)


@dataclass(frozen=True)
class ImagePlan:
    """How a product's stored images become the images it is given now."""

    added: list[int]  # positions (in the new list) of images to insert
    deleted: list[int]  # ids of stored images that go
    moved: dict[int, int]  # id of a kept image -> its new position, where it moves

    @property
    def changed(self) -> bool:
        return bool(self.added or self.deleted or self.moved)


def plan_images(
    existing: Sequence[ProductImage],
    images: Sequence[PreparedImage],
    model_id: str,
    *,
    match_vectors: bool = False,
) -> ImagePlan:
    """Match new images to stored ones by content (sha256 + box + model); unmatched
    stored images are deleted, unmatched new ones added, kept ones moved if needed.

    `match_vectors` also requires the same vector: imported vectors come from elsewhere,
    so the same image with another vector is a change (the service's own embeddings of
    the same content are reused, never recomputed, so for them the content decides).
    """
    pool: dict[tuple[Any, ...], list[ProductImage]] = {}
    for img in existing:
        key = _image_key(img.sha256, img.box, img.model_id)
        pool.setdefault(key + (img.embedding,) if match_vectors else key, []).append(img)
    keep: dict[int, int] = {}
    added: list[int] = []
    for position, new in enumerate(images):
        key = _image_key(new.sha256, new.box, model_id)
        matches = pool.get(key + (new.embedding,) if match_vectors else key)
        if matches:
            keep[matches.pop(0).id] = position
        else:
            added.append(position)
    deleted = [img.id for img in existing if img.id not in keep]
    moved = {i: p for i, p in keep.items() if p != _position_of(list(existing), i)}
    return ImagePlan(added, deleted, moved)


def _require_in_scope(session: Session, row: Product, scope: Scope) -> list[str]:
    """The locked product's sets; 404, as for a product that does not exist, when it is
    outside `scope` (its id is not the caller's to learn about)."""
    if scope is None:
        return []
    current = repo.sets_of(session, [row.pk])[row.pk]
    if not in_scope(current, scope):
        # Word for word the answer for a missing product.
        raise ProductNotFound(f"No product with id {row.external_id!r}.")
    return current


def _set_fields(row: Product, product: ProductInput, created: bool) -> bool:
    """Copy the product's fields onto its row; returns whether they changed."""
    changed = (
        row.title != product.title
        or row.category != product.category
        or (row.attributes or {}) != (product.attributes or {})
    )
    if changed or created:
        row.title = product.title
        row.category = product.category
        row.attributes = dict(product.attributes or {})
    return changed


def _set_labels(session: Session, products: Mapping[int, ProductInput], created: bool) -> bool:
    """Replace the labels of the products that give them (by row id); returns whether any
    stored label changed. New products have none to compare with."""
    given = {pk: _normalised(p) for pk, p in products.items() if p.labels is not None}
    if not given:
        return False
    current = {} if created else repo.labels_of(session, list(given))
    changed = {pk: labels for pk, labels in given.items() if current.get(pk, {}) != labels}
    repo.replace_labels(session, changed)
    return bool(changed)


def _set_sets(session: Session, products: Mapping[int, ProductInput], created: bool) -> bool:
    """`_set_labels` for set memberships."""
    given = {pk: _sets(p) for pk, p in products.items() if p.sets is not None}
    if not given:
        return False
    current = {} if created else repo.sets_of(session, list(given))
    changed = {pk: ids for pk, ids in given.items() if current.get(pk, []) != ids}
    repo.replace_sets(session, changed)
    return bool(changed)


def _sets_changed(
    session: Session, products: Mapping[int, ProductInput], locked: Mapping[str, Product]
) -> set[int]:
    """`_set_sets` for a bulk import: the row ids whose sets changed."""
    given = {pk: _sets(p) for pk, p in products.items() if p.sets is not None}
    existing = {row.pk for row in locked.values()}
    current = repo.sets_of(session, [pk for pk in given if pk in existing])
    changed = {pk: ids for pk, ids in given.items() if current.get(pk, []) != ids}
    repo.replace_sets(session, changed)
    return {pk for pk in changed if pk in existing}


def _sets(product: ProductInput) -> list[str]:
    assert product.sets is not None
    try:
        return normalise_sets(product.sets)
    except ValueError as exc:
        raise InvalidRequest(f"Sets of {product.id!r}: {exc}.") from None


def _normalised(product: ProductInput) -> dict[str, list[str]]:
    assert product.labels is not None
    try:
        return normalise_labels(product.labels)
    except ValueError as exc:
        raise InvalidRequest(f"Labels of {product.id!r}: {exc}.") from None


def _labels_changed(
    session: Session, products: Mapping[int, ProductInput], locked: Mapping[str, Product]
) -> set[int]:
    """`_set_labels` for a bulk import: the row ids whose labels changed."""
    given = {pk: _normalised(p) for pk, p in products.items() if p.labels is not None}
    existing = {row.pk for row in locked.values()}
    current = repo.labels_of(session, [pk for pk in given if pk in existing])
    changed = {pk: labels for pk, labels in given.items() if current.get(pk, {}) != labels}
    repo.replace_labels(session, changed)
    return {pk for pk in changed if pk in existing}


def _status(row: Product, created: bool, changed: bool) -> Status:
    if created:
        return "created"
    if changed:
        row.updated_at = utcnow()
        return "updated"
    return "unchanged"


def store_products(
    db: Database,
    model_id: str,
    items: Sequence[tuple[ProductInput, list[PreparedImage]]],
    *,
    match_vectors: bool = True,
) -> list[StoreOutcome]:
    """Store many products with precomputed embeddings in one transaction (bulk imports).

    The same outcome as `CatalogueService._store` per product (the same matching of
    images, positions, statuses and change-log rows), with bulk statements: one insert
    of the products, one of the images, one of the change-log rows. A product's pairs
    that rest on images it no longer has are dropped in the same transaction. Each
    product must appear once in `items`. `match_vectors` as in `plan_images`: on for
    vectors made elsewhere (imports), off for the service's own embeddings (bulk ingest),
    where the content decides, as in `_store`.
    """
    with db.write() as session:
        fields = [
            {
                "external_id": p.id,
                "title": p.title,
                "category": p.category,
                "attributes": dict(p.attributes or {}),
            }
            for p, _ in items
        ]
        locked, created_pks = repo.lock_or_create_products(session, fields)
        pks = {**{e: r.pk for e, r in locked.items()}, **created_pks}
        existing = repo.images_of_products(session, [r.pk for r in locked.values()])
        new_rows: list[dict[str, Any]] = []
        owners: list[int] = []  # index into `items` of each new row
        plans: list[tuple[ImagePlan, bool]] = []
        by_pk = {pks[p.id]: p for p, _ in items}
        label_changes = _labels_changed(session, by_pk, locked) | _sets_changed(
            session, by_pk, locked
        )
        for n, (product, images) in enumerate(items):
            pk = pks[product.id]
            row = locked.get(product.id)
            fields_changed = False if row is None else _set_fields(row, product, False)
            fields_changed |= pk in label_changes
            plan = plan_images(existing.get(pk, []), images, model_id, match_vectors=match_vectors)
            plans.append((plan, fields_changed))
            for position in plan.added:
                image = images[position]
                owners.append(n)
                new_rows.append(
                    {
                        "product_pk": pk,
                        "position": position,
                        "source_url": image.source_url,
                        "sha256": image.sha256,
                        "box": image.box,
                        "width": image.width,
                        "height": image.height,
                        "embedding": image.embedding,
                        "model_id": model_id,
                    }
                )
        # Positions first: a kept image may move to a position a new one needs next.
        repo.set_positions(session, {i: p for plan, _ in plans for i, p in plan.moved.items()})
        deleted = [i for plan, _ in plans for i in plan.deleted]
        repo.delete_images(session, deleted)
        new_ids = repo.add_images(session, new_rows)
        repo.log_changes(session, new_ids, repo.OP_UPSERT)

        upserted: list[list[tuple[int, bytes]]] = [[] for _ in items]
        for n, image_id, new_row in zip(owners, new_ids, new_rows, strict=True):
            upserted[n].append((image_id, new_row["embedding"]))
        outcomes = []
        for n, (product, _) in enumerate(items):
            pk = pks[product.id]
            plan, fields_changed = plans[n]
            if plan.deleted:
                kept = [img.id for img in existing[pk] if img.id not in plan.deleted]
                repo.delete_stale_pairs_of(session, pk, kept + [i for i, _ in upserted[n]])
            row = locked.get(product.id)
            if row is None:
                outcomes.append(StoreOutcome("created", upserted[n], plan.deleted, pk))
                continue
            status = _status(row, False, fields_changed or plan.changed)
            outcomes.append(StoreOutcome(status, upserted[n], plan.deleted, pk))
        return outcomes


def publish_outcomes(
    outcomes: Sequence[StoreOutcome],
    index: IndexSink | None,
    after_commit: Callable[[StoreOutcome], Any] | None,
) -> None:
    """Make committed changes searchable at once (read-your-writes), then let
    `after_commit` (the duplicates refresh) see each product that changed."""
    changed = [o for o in outcomes if o.upserted or o.deleted]
    if index is not None and changed:
        upserts = [(i, np.frombuffer(e, dtype=np.float32)) for o in changed for i, e in o.upserted]
        index.apply(upserts, [i for o in changed for i in o.deleted])
    if after_commit is not None:
        for outcome in outcomes:
            after_commit(outcome)


def _thumbnails(images: Sequence[Any]) -> list[Thumbnail]:
    return [make_thumbnail(image) for image in images]


def decode_base64_image(data: str) -> bytes:
    """Strict base64 (also accepts `data:image/...;base64,` prefixes)."""
    if data.startswith("data:") and "," in data:
        data = data.split(",", 1)[1]
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise ImageUndecodable("The image data is not valid base64.") from None


def _read_file(path: Path, max_bytes: int) -> bytes:
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise ImageUndecodable(f"Cannot read {path}: {exc.strerror}") from None
    if size > max_bytes:
        raise ImageTooLarge(f"{path} is larger than {max_bytes} bytes.")
    return path.read_bytes()


def _image_key(sha256: str, box: list[float] | None, model_id: str) -> tuple[str, str, str]:
    box_key = "" if box is None else ",".join(f"{float(v):g}" for v in box)
    return sha256, box_key, model_id


def _position_of(images: list[ProductImage], image_id: int) -> int:
    for img in images:
        if img.id == image_id:
            return img.position
    return -1
