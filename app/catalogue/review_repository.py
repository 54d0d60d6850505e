"""SQL of the review workbench: image thumbnails, calibration fits and the score
statistics the review pages show. Functions take a Session inside a unit of work and
never commit, like `repository.py`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from app.catalogue.models import ImageThumbnail, ProductImage, utcnow
from app.imaging.thumbnail import Thumbnail


def _insert(session: Session, model: Any) -> Any:
    dialect = session.get_bind().dialect.name
    return postgresql.insert(model) if dialect == "postgresql" else sqlite.insert(model)


# thumbnails -----------------------------------------------------------------------------
def add_thumbnails(session: Session, thumbnails: Sequence[tuple[str, Thumbnail]]) -> None:
    """Store thumbnails by content hash; one already stored for the same bytes stays."""
    rows = {
        sha: {
            "sha256": sha,
            "webp": t.webp,
            "width": t.width,
            "height": t.height,
            "created_at": utcnow(),
        }
        for sha, t in thumbnails
    }
    if not rows:
        return
    stmt = _insert(session, ImageThumbnail).on_conflict_do_nothing(
        index_elements=[ImageThumbnail.sha256]
    )
    session.execute(stmt, list(rows.values()))


def image_thumbnail(session: Session, image_id: int) -> tuple[str, bytes | None] | None:
    """(sha256, WebP bytes or None when not made yet) of an image; None: no such image."""
    stmt = (
        select(ProductImage.sha256, ImageThumbnail.webp)
        .outerjoin(ImageThumbnail, ImageThumbnail.sha256 == ProductImage.sha256)
        .where(ProductImage.id == image_id)
    )
    row = session.execute(stmt).first()
    return None if row is None else (row[0], row[1])


def image_shas(session: Session, image_ids: Sequence[int]) -> dict[int, str]:
    if not image_ids:
        return {}
    stmt = select(ProductImage.id, ProductImage.sha256).where(
        ProductImage.id.in_(sorted(set(image_ids)))
    )
    return {int(i): s for i, s in session.execute(stmt)}


def images_without_thumbnail(
    session: Session, after_id: int, limit: int
) -> list[tuple[int, str, str | None]]:
    """(image id, sha256, source) of images whose content has no thumbnail, in id order."""
    stmt = (
        select(ProductImage.id, ProductImage.sha256, ProductImage.source_url)
        .outerjoin(ImageThumbnail, ImageThumbnail.sha256 == ProductImage.sha256)
        .where(ImageThumbnail.sha256.is_(None), ProductImage.id > after_id)
        .order_by(ProductImage.id)
        .limit(limit)
    )
    return [(int(i), s, u) for i, s, u in session.execute(stmt)]


def count_images_without_thumbnail(session: Session) -> int:
    stmt = (
        select(func.count())
        .select_from(ProductImage)
        .outerjoin(ImageThumbnail, ImageThumbnail.sha256 == ProductImage.sha256)
        .where(ImageThumbnail.sha256.is_(None))
    )
    return int(session.scalar(stmt) or 0)
