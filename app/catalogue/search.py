"""Visual search: an image (bytes or URL, optionally cropped) -> the k most similar products.

Hits are image ids; results are products (best image wins), so the index is searched
deeper until k distinct products are found or the index is exhausted. A category filter
is exact: small categories are scored exactly over their own images, large ones are
searched deeper (and with more IVF lists) until k matches are found or nothing is left,
never silently truncated.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, replace

import numpy as np

from app.catalogue import repository as repo
from app.catalogue.rerank import (
    SearchQuality,
    combine_views,
    expand_query,
    mirrored,
    product_scores,
)
from app.core.database import Database
from app.core.errors import ImageTooLarge, NotReady
from app.imaging.crop import Box
from app.imaging.decode import DecodeLimits, ImageDecoder
from app.imaging.fetch import ImageFetcher
from app.index.lifecycle import IndexService
from app.index.sharded import ShardedIndex
from app.inference.worker import BatchWorker

# Categories with at most this many images are searched exactly over their own images.
EXACT_FILTER_LIMIT = 50_000


@dataclass(frozen=True)
class SearchHit:
    id: str
    score: float
    title: str | None
    category: str | None
    image_id: int
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
        self.quality = quality or SearchQuality()
        self.db = db
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
        min_score: float | None = None,
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
            self.search_vector, vector, k, category=category, min_score=min_score, quality=quality
        )
        took = (time.perf_counter() - started) * 1000
        return SearchOutcome(hits, self.model_id, round(took, 2))

    def search_vector(
        self,
        vector: np.ndarray,
        k: int,
        *,
        category: str | None = None,
        min_score: float | None = None,
        exclude_product: int | None = None,
        quality: SearchQuality | None = None,
    ) -> list[SearchHit]:
        """The top-k products for an embedding (one entry per product), with the
        search-time features of `quality` (default: the settings')."""
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
        if not quality.product_scoring:
            return self._best_images(index, query, k, category, min_score, exclude_product)
        candidates = self._best_images(
            index, query, max(k, quality.product_candidates), category, min_score, exclude_product
        )
        return self._score_products(index, query, candidates, k, min_score, quality)

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

    def _best_images(
        self,
        index: ShardedIndex,
        query: np.ndarray,
        k: int,
        category: str | None,
        min_score: float | None,
        exclude_product: int | None,
    ) -> list[SearchHit]:
        """The top-k products by their best image, searching deeper until k are found."""
        if category is not None:
            with self.db.read() as session:
                ids = repo.category_image_ids(
                    session, category, self.model_id, EXACT_FILTER_LIMIT + 1
                )
            if not ids:
                return []
            if len(ids) <= EXACT_FILTER_LIMIT:
                scores, found = index.search_subset(query, np.asarray(ids), len(ids))
                return self._group(scores[0], found[0], k, category, min_score, exclude_product)

        total = index.ntotal
        depth = min(max(4 * k, 16), max(total, 1))
        nprobe = index.default_nprobe
        while True:
            scores, found = index.search(query, depth, nprobe=nprobe)
            hits = self._group(scores[0], found[0], k, category, min_score, exclude_product)
            valid = found[0] >= 0
            all_lists = index.kind == "flat" or nprobe >= index.nlist
            exhausted = all_lists and (depth >= total or not valid.all())
            below_floor = min_score is not None and valid.any() and scores[0][valid][-1] < min_score
            if len(hits) >= k or exhausted or below_floor or total == 0:
                return hits
            depth = min(depth * 4, total)
            if index.kind != "flat":
                nprobe = min(nprobe * 2, index.nlist)

    def _group(
        self,
        scores: np.ndarray,
        ids: np.ndarray,
        k: int,
        category: str | None,
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
            if category is not None and owner.category != category:
                continue
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
                )
            )
            if len(hits) >= k:
                break
        return hits
