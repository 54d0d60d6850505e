"""SQL of the review workbench: image thumbnails, calibration fits and the score
statistics the review pages show. Functions take a Session inside a unit of work and
never commit, like `repository.py`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import and_, delete, func, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session, aliased

from app.catalogue import repository as repo
from app.catalogue.filters import LabelFilter
from app.catalogue.models import (
    DuplicateCalibration,
    DuplicateDecision,
    DuplicatePair,
    ImageThumbnail,
    Product,
    ProductImage,
    utcnow,
)
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


# calibration ----------------------------------------------------------------------------
def product_vectors(session: Session, product_pks: Sequence[int]) -> dict[int, list[bytes]]:
    """Every stored embedding of the given products, by product."""
    found: dict[int, list[bytes]] = {pk: [] for pk in product_pks}
    if not product_pks:
        return found
    stmt = select(ProductImage.product_pk, ProductImage.embedding).where(
        ProductImage.product_pk.in_(sorted(set(product_pks)))
    )
    for pk, embedding in session.execute(stmt):
        found[int(pk)].append(embedding)
    return found


def set_decision_score(
    session: Session, a_pk: int, b_pk: int, score: float | None, model_id: str
) -> None:
    a_pk, b_pk = repo.canonical(a_pk, b_pk)
    session.execute(
        update(DuplicateDecision)
        .where(DuplicateDecision.a_pk == a_pk, DuplicateDecision.b_pk == b_pk)
        .values(score=score, model_id=model_id)
    )


def labelled_decisions(
    session: Session,
) -> list[tuple[int, int, str, float | None, str | None, str | None, str | None]]:
    """(a pk, b pk, decision, score, model id, a's category, b's category) of every
    decision: the labels calibration is fitted on."""
    pa, pb = aliased(Product), aliased(Product)
    stmt = (
        select(
            DuplicateDecision.a_pk,
            DuplicateDecision.b_pk,
            DuplicateDecision.decision,
            DuplicateDecision.score,
            DuplicateDecision.model_id,
            pa.category,
            pb.category,
        )
        .join(pa, pa.pk == DuplicateDecision.a_pk)
        .join(pb, pb.pk == DuplicateDecision.b_pk)
        .order_by(DuplicateDecision.a_pk, DuplicateDecision.b_pk)
    )
    return [(int(a), int(b), d, s, m, ca, cb) for a, b, d, s, m, ca, cb in session.execute(stmt)]


def count_decisions(session: Session) -> int:
    return int(session.scalar(select(func.count()).select_from(DuplicateDecision)) or 0)


def replace_calibrations(session: Session, model_id: str, rows: Sequence[dict[str, Any]]) -> None:
    session.execute(delete(DuplicateCalibration).where(DuplicateCalibration.model_id == model_id))
    if rows:
        session.execute(
            _insert(session, DuplicateCalibration), [{**r, "model_id": model_id} for r in rows]
        )


def calibrations(session: Session, model_id: str) -> list[DuplicateCalibration]:
    stmt = select(DuplicateCalibration).where(DuplicateCalibration.model_id == model_id)
    return list(session.scalars(stmt))


def product_categories(session: Session, product_pks: Sequence[int]) -> dict[int, str | None]:
    if not product_pks:
        return {}
    stmt = select(Product.pk, Product.category).where(Product.pk.in_(sorted(set(product_pks))))
    return {int(pk): c for pk, c in session.execute(stmt)}


def open_pair_scores(session: Session, min_score: float) -> list[float]:
    """Scores of the pairs still to review (no decision) at or above `min_score`."""
    stmt = (
        select(DuplicatePair.score)
        .outerjoin(
            DuplicateDecision,
            and_(
                DuplicateDecision.a_pk == DuplicatePair.a_pk,
                DuplicateDecision.b_pk == DuplicatePair.b_pk,
            ),
        )
        .where(DuplicatePair.score >= min_score, DuplicateDecision.decision.is_(None))
    )
    return [float(s) for (s,) in session.execute(stmt)]


def random_open_pairs(
    session: Session, low: float, high: float, size: int, where: LabelFilter | None = None
) -> list[repo.PairRow]:
    """Up to `size` undecided pairs drawn at random with `low <= score < high` (both
    products passing `where`)."""
    stmt = repo._pairs_query(low, None, True, where)
    if high <= 1.0:
        stmt = stmt.where(DuplicatePair.score < high)
    stmt = stmt.order_by(func.random()).limit(size)
    return [repo.PairRow(*row) for row in session.execute(stmt)]
