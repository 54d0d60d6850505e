"""Visual search: an image (bytes or URL, optionally cropped) -> the k most similar products.

Hits are image ids; results are products (best image wins), so the index is searched
deeper until k distinct products are found or the index is exhausted. A label filter
(`category` is one of its keys) is exact: filters passing few images are scored exactly
over their own images, broad ones are searched deeper (and with more IVF lists) until k
matches are found or nothing is left, never silently truncated (app/index/filtered.py).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np
from sqlalchemy.orm import Session

from app.catalogue import repository as repo
from app.catalogue.filters import LabelFilter
from app.catalogue.rerank import (
    SearchQuality,
    combine_views,
    expand_query,
    mirrored,
    product_scores,
)
from app.catalogue.scope import Scope, in_scope, restrict
from app.core.database import Database
from app.core.errors import (
    ImageNotFound,
    ImageTooLarge,
    InvalidRequest,
    NotReady,
    ProductNotFound,
)
from app.imaging.crop import Box
from app.imaging.decode import DecodeLimits, ImageDecoder
from app.imaging.fetch import ImageFetcher
from app.index.filtered import (
    EXACT_FILTER_LIMIT,
    Accept,
    Candidates,
    search_accepting,
    search_allowed,
)
from app.index.lifecycle import IndexService
from app.index.sharded import ShardedIndex
from app.inference.worker import BatchWorker


@dataclass(frozen=True)
class SearchHit:
    id: str
    score: float
    title: str | None
    category: str | None
    image_id: int
    image_url: str | None
    labels: dict[str, list[str]] = field(default_factory=dict)
    sets: list[str] = field(default_factory=list)
    images: list[ImageMatch] = field(default_factory=list)
    product_pk: int = -1


@dataclass(frozen=True)
class ImageMatch:
    """One image of a hit's product and its score (`group_size` best per product)."""

    image_id: int
    score: float
    image_url: str | None


@dataclass(frozen=True)
class SearchOutcome:
    hits: list[SearchHit]
    model_id: str
    took_ms: float


class SearchService:
    def __init__(
        self,
        db: Database,
        worker: BatchWorker,
        fetcher: ImageFetcher,
        index: IndexService,
        *,
        max_pixels: int,
        max_bytes: int,
        decoder: ImageDecoder | None = None,
        quality: SearchQuality | None = None,
    ) -> None:
        self.db = db
        self.quality = quality or SearchQuality()
        self.decoder = decoder or ImageDecoder(DecodeLimits(max_pixels=max_pixels))
        self.worker = worker
        self.fetcher = fetcher
        self.index = index
        self.max_pixels = max_pixels
        self.max_bytes = max_bytes

    @property
    def model_id(self) -> str:
        return self.worker.embedder.model_id

    async def search_image(
        self,
        *,
        data: bytes | None = None,
        url: str | None = None,
        box: Box | None = None,
        k: int = 10,
        category: str | None = None,
        where: LabelFilter | None = None,
        min_score: float | None = None,
        group_size: int = 1,
        flip: bool | None = None,
        expand: bool | None = None,
    ) -> SearchOutcome:
        """Search with the image; `flip` and `expand` switch those features for this
        request (None: the settings' choice)."""
        started = time.perf_counter()
        quality = self.quality.with_request(flip=flip, expand=expand)
        views = 2 if quality.flip else 1
        with self.worker.admission.admit(views) as ticket:  # before any fetch or decode
            if data is None:
                if url is None:
                    raise ValueError("give data or url")
                data = await self.fetcher.fetch(url)
            if len(data) > self.max_bytes:
                raise ImageTooLarge(f"The image is larger than {self.max_bytes} bytes.")
            image = await self.decoder.decode(data)
            images, boxes = [image], [box]
            if quality.flip:
                flipped, flipped_box = mirrored(image, box)
                images.append(flipped)
                boxes.append(flipped_box)
            vector = combine_views(await self.worker.embed(images, boxes, ticket=ticket))
        hits = await asyncio.to_thread(
            self.search_vector,
            vector,
            k,
            category=category,
            where=where,
            min_score=min_score,
            group_size=group_size,
            quality=quality,
        )
        took = (time.perf_counter() - started) * 1000
        return SearchOutcome(hits, self.model_id, round(took, 2))

    async def search_similar(
        self,
        *,
        product_id: str | None = None,
        image_id: int | None = None,
        k: int = 10,
        where: LabelFilter | None = None,
        min_score: float | None = None,
        group_size: int = 1,
        scope: Scope = None,
    ) -> SearchOutcome:
        """More like a stored product (all its images) or one stored image, never
        returning that product itself; nothing is fetched or embedded. With a `scope`,
        the query product must be in it (else 404) and so must the results."""
        started = time.perf_counter()
        hits = await asyncio.to_thread(
            self._similar,
            product_id,
            image_id,
            k,
            restrict(where, scope),
            min_score,
            group_size,
            scope,
        )
        took = (time.perf_counter() - started) * 1000
        return SearchOutcome(hits, self.model_id, round(took, 2))

    def _similar(
        self,
        product_id: str | None,
        image_id: int | None,
        k: int,
        where: LabelFilter | None,
        min_score: float | None,
        group_size: int,
        scope: Scope = None,
    ) -> list[SearchHit]:
        with self.db.read() as session:
            if image_id is not None:
                found = repo.image_vector(session, image_id, self.model_id)
                if found is None or not _visible(session, found[0], scope):
                    raise ImageNotFound(f"No image {image_id} embedded by the loaded model.")
                product_pk, vectors = found[0], [found[1]]
            else:
                assert product_id is not None
                product = repo.get_product(session, product_id)
                if product is None or not _visible(session, product.pk, scope):
                    raise ProductNotFound(f"No product with id {product_id!r}.")
                product_pk = product.pk
                vectors = [
                    e for _, e in repo.product_image_vectors(session, product.pk, self.model_id)
                ]
                if not vectors:
                    raise InvalidRequest(
                        f"Product {product_id!r} has no image embedded by the loaded model."
                    )
        # A product's score is its best score over the query images; the top k of each
        # query image's own list contain the top k of that maximum, so merging is exact.
        best: dict[int, SearchHit] = {}
        for embedding in vectors:
            vector = np.frombuffer(embedding, dtype=np.float32)
            for hit in self.search_vector(
                vector,
                k,
                where=where,
                min_score=min_score,
                exclude_product=product_pk,
                group_size=group_size,
            ):
                if hit.product_pk not in best or hit.score > best[hit.product_pk].score:
                    best[hit.product_pk] = hit
        return sorted(best.values(), key=lambda h: -h.score)[:k]

    def search_vector(
        self,
        vector: np.ndarray,
        k: int,
        *,
        category: str | None = None,
        where: LabelFilter | None = None,
        min_score: float | None = None,
        exclude_product: int | None = None,
        group_size: int = 1,
        quality: SearchQuality | None = None,
    ) -> list[SearchHit]:
        """The top-k products for an embedding (one entry per product, best image wins)
        among those passing the filter (`category` narrows it further), with the
        search-time features of `quality` (default: the settings'); each hit lists up to
        `group_size` of its product's images, best first."""
        try:
            index = self.index.index
        except RuntimeError:
            raise NotReady("The index is not open yet.") from None
        quality = quality or self.quality
        query = np.asarray(vector, dtype=np.float32).reshape(1, -1)
        if quality.expansion > 0 and index.ntotal:
            scores, found = index.search(query, quality.expansion)
            query = expand_query(
                query,
                scores[0],
                found[0],
                index.vectors,
                neighbours=quality.expansion,
                alpha=quality.expansion_alpha,
            ).reshape(1, -1)
        if quality.product_scoring:
            candidates = self._search_vector(
                query,
                max(k, quality.product_candidates),
                category,
                where,
                min_score,
                exclude_product,
            )
            hits = self._score_products(index, query, candidates, k, min_score, quality)
        else:
            hits = self._search_vector(query, k, category, where, min_score, exclude_product)
        return self._attach_images(query.reshape(-1), hits, group_size, min_score)

    def _score_products(
        self,
        index: ShardedIndex,
        query: np.ndarray,
        candidates: list[SearchHit],
        k: int,
        min_score: float | None,
        quality: SearchQuality,
    ) -> list[SearchHit]:
        """Re-order candidate products by all of their images (app.catalogue.rerank)."""
        with self.db.read() as session:
            # Images of another model are not in this index: their vectors read as zeros
            # and product_scores leaves them out.
            siblings = repo.sibling_image_ids(session, [hit.image_id for hit in candidates])
        scores = product_scores(
            query,
            siblings,
            index.vectors,
            images=quality.product_images,
            weight=quality.product_weight,
        )
        rescored = [
            replace(hit, score=min(scores.get(hit.image_id, hit.score), 1.0)) for hit in candidates
        ]
        rescored.sort(key=lambda hit: -hit.score)
        if min_score is not None:
            rescored = [hit for hit in rescored if hit.score >= min_score]
        return rescored[:k]

    def _attach_images(
        self, vector: np.ndarray, hits: list[SearchHit], group_size: int, min_score: float | None
    ) -> list[SearchHit]:
        """Each hit's best `group_size` images, scored exactly over all of its images."""
        if not hits:
            return hits
        if group_size <= 1:
            return [replace(h, images=[ImageMatch(h.image_id, h.score, h.image_url)]) for h in hits]
        with self.db.read() as session:
            images = repo.images_with_vectors(session, [h.product_pk for h in hits], self.model_id)
        out = []
        for hit in hits:
            rows = images.get(hit.product_pk, [])
            if not rows:
                out.append(
                    replace(hit, images=[ImageMatch(hit.image_id, hit.score, hit.image_url)])
                )
                continue
            matrix = np.stack([np.frombuffer(e, dtype=np.float32) for _, _, e in rows])
            scores = matrix @ vector.reshape(-1)
            order = np.argsort(-scores, kind="stable")[:group_size]
            matches = [
                ImageMatch(
                    rows[i][0],
                    min(float(scores[i]), 1.0),
                    rows[i][1] if rows[i][1] and "://" in rows[i][1] else None,
                )
                for i in order
                if min_score is None or scores[i] >= min_score or rows[i][0] == hit.image_id
            ]
            out.append(replace(hit, images=matches))
        return out

    def _search_vector(
        self,
        vector: np.ndarray,
        k: int,
        category: str | None,
        where: LabelFilter | None,
        min_score: float | None,
        exclude_product: int | None,
    ) -> list[SearchHit]:
        try:
            index = self.index.index
        except RuntimeError:
            raise NotReady("The index is not open yet.") from None
        query = np.asarray(vector, dtype=np.float32).reshape(1, -1)
        if category is not None:
            where = LabelFilter.build(
                where.must if where else None, where.must_not if where else None, category=category
            )
        find: Callable[[int], Candidates]
        if where is not None and not where.empty:
            with self.db.read() as session:
                ids = repo.filtered_image_ids(session, where, self.model_id, EXACT_FILTER_LIMIT + 1)
            if not ids:
                return []
            if len(ids) <= EXACT_FILTER_LIMIT:
                allowed = np.asarray(ids, dtype=np.int64)

                def find(n: int) -> Candidates:
                    return search_allowed(index, query, allowed, n)
            else:
                accept = self._acceptor(where)

                def find(n: int) -> Candidates:
                    return search_accepting(index, query, n, accept, floor=min_score)
        else:

            def find(n: int) -> Candidates:
                return search_accepting(index, query, n, None, floor=min_score)

        wanted = max(4 * k, 16)
        while True:
            found = find(wanted)
            hits = self._group(found.scores, found.ids, k, min_score, exclude_product)
            below_floor = (
                min_score is not None and len(found.scores) > 0 and found.scores[-1] < min_score
            )
            if len(hits) >= k or found.exhausted or below_floor:
                return hits
            wanted *= 4  # several candidates were images of one product: go deeper

    def _acceptor(self, where: LabelFilter) -> Accept:
        def accept(ids: np.ndarray) -> np.ndarray:
            with self.db.read() as session:
                passing = repo.images_passing(session, where, ids.tolist())
            return np.fromiter((int(i) in passing for i in ids), dtype=bool, count=len(ids))

        return accept

    def _group(
        self,
        scores: np.ndarray,
        ids: np.ndarray,
        k: int,
        min_score: float | None,
        exclude_product: int | None,
    ) -> list[SearchHit]:
        keep = ids >= 0
        scores, ids = scores[keep], ids[keep]
        with self.db.read() as session:
            owners = repo.image_owners(session, ids.tolist())
        hits: list[SearchHit] = []
        seen: set[int] = set()
        for score, image_id in zip(scores.tolist(), ids.tolist(), strict=True):
            if min_score is not None and score < min_score:
                break
            owner = owners.get(int(image_id))
            if owner is None or owner.product_pk in seen or owner.product_pk == exclude_product:
                continue  # deleted meanwhile, or a weaker image of a product already listed
            seen.add(owner.product_pk)
            url = owner.source_url if owner.source_url and "://" in owner.source_url else None
            hits.append(
                SearchHit(
                    owner.external_id,
                    min(float(score), 1.0),  # float rounding can pass 1 a hair
                    owner.title,
                    owner.category,
                    owner.image_id,
                    url,
                    product_pk=owner.product_pk,
                )
            )
            if len(hits) >= k:
                break
        if hits:
            with self.db.read() as session:
                labels = repo.labels_of(session, list(seen))
                sets = repo.sets_of(session, list(seen))
            hits = [replace(h, labels=labels[h.product_pk], sets=sets[h.product_pk]) for h in hits]
        return hits


def _visible(session: Session, product_pk: int, scope: Scope) -> bool:
    return scope is None or in_scope(repo.sets_of(session, [product_pk])[product_pk], scope)
