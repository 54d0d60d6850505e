"""Thumbnails of catalogue images: served to the review pages, backfilled for catalogues
ingested before thumbnails were made at ingest.

A thumbnail belongs to the image's content (its sha256), so its ETag is that hash: it
changes only when the bytes do, and browsers revalidate with a 304 and no body.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from app.catalogue import repository as repo
from app.catalogue import review_repository as review_repo
from app.catalogue.scope import Scope, in_scope
from app.catalogue.service import _read_file
from app.core.database import Database
from app.core.errors import ServiceError, ThumbnailNotFound
from app.imaging.decode import ImageDecoder
from app.imaging.fetch import ImageFetcher
from app.imaging.thumbnail import THUMBNAIL_SIZE, make_thumbnail


@dataclass(frozen=True)
class StoredThumbnail:
    etag: str
    webp: bytes


def thumbnail_etag(sha256: str) -> str:
    """A strong ETag: the content hash plus the thumbnail size (a new size, a new tag)."""
    return f'"{sha256[:32]}-{THUMBNAIL_SIZE}"'


def get_thumbnail(db: Database, image_id: int, scope: Scope = None) -> StoredThumbnail:
    """The stored thumbnail; 404 as well for an image of a product outside `scope`."""
    with db.read() as session:
        found = review_repo.image_thumbnail(session, image_id)
        if found is not None and scope is not None:
            owner = repo.image_products(session, [image_id]).get(image_id)
            sets = repo.sets_of(session, [owner])[owner] if owner is not None else []
            if not in_scope(sets, scope):
                found = None
    if found is None:
        raise ThumbnailNotFound(f"No image with id {image_id}.")
    sha, webp = found
    if webp is None:
        raise ThumbnailNotFound(
            f"Image {image_id} has no thumbnail yet; run `vsearch thumbnails backfill`."
        )
    return StoredThumbnail(thumbnail_etag(sha), webp)


@dataclass
class BackfillReport:
    made: int = 0
    unrecoverable: list[int] = field(default_factory=list)
    failed: dict[int, str] = field(default_factory=dict)

    def as_dict(self) -> dict[str, object]:
        return {
            "thumbnails_made": self.made,
            "unrecoverable_images": len(self.unrecoverable),
            "failed_images": len(self.failed),
            "failures": dict(list(self.failed.items())[:20]),
        }


async def backfill_thumbnails(
    db: Database,
    fetcher: ImageFetcher,
    decoder: ImageDecoder,
    *,
    max_bytes: int,
    batch: int = 32,
    progress: Callable[[int, int], None] | None = None,
) -> BackfillReport:
    """Make the missing thumbnails from where each image came from (its URL, or the local
    path `vsearch ingest` read). Uploaded bytes are not kept, so those images are
    reported as unrecoverable (post the product again to get its thumbnail)."""
    with db.read() as session:
        total = review_repo.count_images_without_thumbnail(session)
    report = BackfillReport()
    after = 0
    done = 0
    while True:
        with db.read() as session:
            page = review_repo.images_without_thumbnail(session, after, batch)
        if not page:
            return report
        after = page[-1][0]

        async def one(image_id: int, sha: str, source: str | None) -> None:
            if not source:
                report.unrecoverable.append(image_id)
                return
            is_url = source.startswith(("http://", "https://"))
            try:
                if is_url:
                    data = await fetcher.fetch(source)
                else:
                    data = await asyncio.to_thread(_read_file, Path(source), max_bytes)
                image = await decoder.decode(data)
                thumbnail = await asyncio.to_thread(make_thumbnail, image)
            except ServiceError as exc:
                report.failed[image_id] = exc.message
                return
            with db.write() as session:
                review_repo.add_thumbnails(session, [(sha, thumbnail)])
            report.made += 1

        await asyncio.gather(*(one(*row) for row in page))
        done += len(page)
        if progress is not None:
            progress(done, total)
