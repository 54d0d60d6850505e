"""ORM models of the catalogue: the source of truth the index is derived from."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Column,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.types import TypeDecorator

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# SQLite only auto-increments INTEGER PRIMARY KEY; Postgres gets a real 64-bit identity.
BigId = BigInteger().with_variant(Integer(), "sqlite")


def utcnow() -> datetime:
    return datetime.now(UTC)


class UtcDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every database (SQLite drops the offset)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is not None and value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is not None and value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return value


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class Product(Base):
    """A catalogue product; `external_id` is the client's id (e.g. "sku-123")."""

    __tablename__ = "products"

    pk: Mapped[int] = mapped_column("id", BigId, primary_key=True, autoincrement=True)
    external_id: Mapped[str] = mapped_column(String(256), unique=True)
    title: Mapped[str | None] = mapped_column(Text)
    category: Mapped[str | None] = mapped_column(String(256), index=True)
    attributes: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime(), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime(), default=utcnow, onupdate=utcnow)

    images: Mapped[list[ProductImage]] = relationship(
        back_populates="product", lazy="raise", order_by="ProductImage.position"
    )
    sets: Mapped[list[ProductSetMember]] = relationship(
        lazy="raise",
        order_by="ProductSetMember.set_id",
        cascade="all, delete-orphan",
        passive_deletes=True,
    )
    labels: Mapped[list[ProductLabel]] = relationship(
        lazy="raise",
        order_by="(ProductLabel.key, ProductLabel.value)",
        cascade="all, delete-orphan",
        passive_deletes=True,
    )


class ProductLabel(Base):
    """One value of one label of a product (`color` = `red`): the filterable part of a
    product, one row per value so that filters are index lookups on both databases.

    The (key, value, product) index answers "which products have color red or blue";
    the primary key (product, key, value) reads one product's labels.
    """

    __tablename__ = "product_labels"

    product_pk: Mapped[int] = mapped_column(
        "product_id", BigId, ForeignKey("products.id", ondelete="CASCADE"), primary_key=True
    )
    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(String(256), primary_key=True)

    __table_args__ = (Index("ix_product_labels_key_value", "key", "value", "product_id"),)


class ProductSetMember(Base):
    """A product's membership of a product set (a catalogue partition: a feed, a tenant,
    a client's catalogue). A product may be in several sets."""

    __tablename__ = "product_set_members"

    set_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    product_pk: Mapped[int] = mapped_column(
        "product_id", BigId, ForeignKey("products.id", ondelete="CASCADE"), primary_key=True
    )

    __table_args__ = (Index("ix_product_set_members_product_id", "product_id"),)


class ProductImage(Base):
    """One image of a product. Its `id` is the id in the vector index."""

    __tablename__ = "product_images"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    product_pk: Mapped[int] = mapped_column(
        "product_id", BigId, ForeignKey("products.id", ondelete="CASCADE"), index=True
    )
    position: Mapped[int] = mapped_column(Integer, default=0)
    source_url: Mapped[str | None] = mapped_column(Text)
    sha256: Mapped[str] = mapped_column(String(64), index=True)
    box: Mapped[list[float] | None] = mapped_column(JSON)
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    embedding: Mapped[bytes] = mapped_column(LargeBinary)
    model_id: Mapped[str] = mapped_column(String(256), index=True)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime(), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime(), default=utcnow, onupdate=utcnow)

    product: Mapped[Product] = relationship(back_populates="images", lazy="raise")


class ChangeLog(Base):
    """One row per image change, written in the change's own transaction.

    `txid` is the writing transaction's id on Postgres (NULL on SQLite, whose writers are
    serialised): readers use it to never skip rows of transactions that commit late.
    """

    __tablename__ = "change_log"

    seq: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    image_id: Mapped[int] = mapped_column(BigInteger)
    op: Mapped[str] = mapped_column(String(8))
    txid: Mapped[int | None] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime(), default=utcnow)

    __table_args__ = (Index("ix_change_log_txid", "txid"),)


class DuplicatePair(Base):
    """Two products whose best image pair scores at least the duplicates floor."""

    __tablename__ = "duplicate_pairs"

    a_pk: Mapped[int] = mapped_column(
        "a_product_id", BigId, ForeignKey("products.id", ondelete="CASCADE"), primary_key=True
    )
    b_pk: Mapped[int] = mapped_column(
        "b_product_id", BigId, ForeignKey("products.id", ondelete="CASCADE"), primary_key=True
    )
    score: Mapped[float] = mapped_column(Float)
    a_image_id: Mapped[int] = mapped_column(BigInteger)
    b_image_id: Mapped[int] = mapped_column(BigInteger)
    found_at: Mapped[datetime] = mapped_column(UtcDateTime(), default=utcnow)

    __table_args__ = (
        # highest score first, then the pair: the order and cursor of GET /duplicates
        Index("ix_duplicate_pairs_score", "score", "a_product_id", "b_product_id"),
        Index("ix_duplicate_pairs_b", "b_product_id"),
    )


# Pairs a full duplicates scan has found so far, before they are merged into
# duplicate_pairs: no keys and no indexes, so a scan's millions of rows go in at the speed
# of an append (COPY on PostgreSQL). A pair found from both of its products appears twice;
# the merge keeps the better row.
duplicate_scan_pairs = Table(
    "duplicate_scan_pairs",
    Base.metadata,
    Column("a_product_id", BigInteger, nullable=False),
    Column("b_product_id", BigInteger, nullable=False),
    Column("score", Float, nullable=False),
    Column("a_image_id", BigInteger, nullable=False),
    Column("b_image_id", BigInteger, nullable=False),
)


class DuplicateDecision(Base):
    """A reviewer's verdict on a product pair; scans never overwrite it."""

    __tablename__ = "duplicate_decisions"

    a_pk: Mapped[int] = mapped_column(
        "a_product_id", BigId, ForeignKey("products.id", ondelete="CASCADE"), primary_key=True
    )
    b_pk: Mapped[int] = mapped_column(
        "b_product_id", BigId, ForeignKey("products.id", ondelete="CASCADE"), primary_key=True
    )
    decision: Mapped[str] = mapped_column(String(16))
    decided_by: Mapped[str | None] = mapped_column(String(256))
    decided_at: Mapped[datetime] = mapped_column(UtcDateTime(), default=utcnow)
    # The pair's score when it was decided, and the model that scored it: the labels the
    # calibration is fitted on (a pair marked `different` leaves the pairs table).
    score: Mapped[float | None] = mapped_column(Float)
    model_id: Mapped[str | None] = mapped_column(String(256))


class ImageThumbnail(Base):
    """A small WebP copy of an image, keyed by the original bytes' sha256: identical
    uploads share one thumbnail, and a re-post of known bytes needs no decode."""

    __tablename__ = "image_thumbnails"

    sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    webp: Mapped[bytes] = mapped_column(LargeBinary)
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime(), default=utcnow)


class DuplicateCalibration(Base):
    """P(same product | score) fitted on review decisions, per model (and per category
    with enough labels; `category` "" is the fit over all categories)."""

    __tablename__ = "duplicate_calibrations"

    model_id: Mapped[str] = mapped_column(String(256), primary_key=True)
    category: Mapped[str] = mapped_column(String(256), primary_key=True, default="")
    method: Mapped[str] = mapped_column(String(16))
    labels: Mapped[int] = mapped_column(Integer)
    positives: Mapped[int] = mapped_column(Integer)
    params: Mapped[dict[str, Any]] = mapped_column(JSON)
    fitted_at: Mapped[datetime] = mapped_column(UtcDateTime(), default=utcnow)


class ImportJob(Base):
    """A file of products uploaded over HTTP (`POST /imports`) and ingested in the
    background. `cursor` counts the records done; it advances with the counts and the
    failures of each batch in one transaction, so a restarted job resumes after the last
    committed batch."""

    __tablename__ = "import_jobs"

    pk: Mapped[int] = mapped_column("id", BigId, primary_key=True, autoincrement=True)
    public_id: Mapped[str] = mapped_column(String(32), unique=True)
    status: Mapped[str] = mapped_column(String(16), index=True)
    kind: Mapped[str] = mapped_column(String(8))
    filename: Mapped[str | None] = mapped_column(String(256))
    scope: Mapped[str | None] = mapped_column(String(4096), index=True)
    """The product sets of the key that uploaded it, sorted and comma-joined (None: an
    unscoped key). Its products must stay in them; only keys of that scope see it."""
    total: Mapped[int] = mapped_column(Integer)
    cursor: Mapped[int] = mapped_column(Integer, default=0)
    succeeded: Mapped[int] = mapped_column(Integer, default=0)
    skipped: Mapped[int] = mapped_column(Integer, default=0)
    failed: Mapped[int] = mapped_column(Integer, default=0)
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime(), default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(UtcDateTime())
    finished_at: Mapped[datetime | None] = mapped_column(UtcDateTime())


class ImportFailure(Base):
    """A record of an import that did not become a product, and why."""

    __tablename__ = "import_failures"

    job_pk: Mapped[int] = mapped_column(
        "job_id", BigId, ForeignKey("import_jobs.id", ondelete="CASCADE"), primary_key=True
    )
    line: Mapped[int] = mapped_column(Integer, primary_key=True)
    product_id: Mapped[str | None] = mapped_column(String(256))
    code: Mapped[str] = mapped_column(String(64))
    message: Mapped[str] = mapped_column(Text)
