"""All SQL of the catalogue. Functions take a Session inside a unit of work and never
commit; the caller's `Database.write()` / `read()` does."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any, cast

import numpy as np
from sqlalchemy import (
    Column,
    ColumnElement,
    Index,
    MetaData,
    Select,
    Table,
    and_,
    case,
    delete,
    exists,
    false,
    func,
    insert,
    literal,
    or_,
    select,
    text,
    true,
    union_all,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, aliased, selectinload

from app.catalogue.filters import CATEGORY_KEY, SET_KEY, LabelFilter
from app.catalogue.models import (
    ChangeLog,
    DuplicateDecision,
    DuplicatePair,
    Product,
    ProductImage,
    ProductLabel,
    ProductSetMember,
    UtcDateTime,
    duplicate_scan_pairs,
    utcnow,
)

LOG = logging.getLogger(__name__)

# Core tables, for bulk statements that skip the ORM's per-row bookkeeping.
_PRODUCTS = cast(Table, Product.__table__)
_PAIRS = cast(Table, DuplicatePair.__table__)
_IMAGES = cast(Table, ProductImage.__table__)
_CHANGES = cast(Table, ChangeLog.__table__)
_LABELS = cast(Table, ProductLabel.__table__)
_MEMBERS = cast(Table, ProductSetMember.__table__)

OP_UPSERT = "upsert"
OP_DELETE = "delete"


# products -------------------------------------------------------------------------------
def get_product(
    session: Session, external_id: str, *, with_images: bool = False, for_update: bool = False
) -> Product | None:
    stmt: Select[Product] = select(Product).where(Product.external_id == external_id)
    if with_images:
        stmt = stmt.options(
            selectinload(Product.images), selectinload(Product.labels), selectinload(Product.sets)
        )
    if for_update:
        stmt = stmt.with_for_update()
    return session.scalars(stmt).one_or_none()


def lock_or_create_product(session: Session, external_id: str) -> tuple[Product, bool]:
    """The product row for `external_id`, locked for this transaction, created if absent.

    Concurrent calls for the same id serialise on the row (Postgres: INSERT ... ON CONFLICT
    DO NOTHING, then SELECT ... FOR UPDATE; SQLite: writers are serialised already), so
    they end with one product.
    """
    now = utcnow()
    values = {
        "external_id": external_id,
        "attributes": {},
        "created_at": now,
        "updated_at": now,
    }
    dialect = session.get_bind().dialect.name
    stmt: Any
    if dialect == "postgresql":
        stmt = postgresql.insert(Product).values(values).on_conflict_do_nothing()
    elif dialect == "sqlite":
        stmt = sqlite.insert(Product).values(values).on_conflict_do_nothing()
    else:  # pragma: no cover - only the two supported databases
        raise RuntimeError(f"unsupported database {dialect}")
    created = session.execute(stmt.returning(Product.pk)).first() is not None
    product = get_product(session, external_id, for_update=True)
    assert product is not None
    return product, created


def list_products(
    session: Session,
    *,
    after_pk: int | None,
    limit: int,
    category: str | None = None,
    where: LabelFilter | None = None,
) -> list[Product]:
    stmt = (
        select(Product)
        .options(
            selectinload(Product.images), selectinload(Product.labels), selectinload(Product.sets)
        )
        .order_by(Product.pk)
        .limit(limit)
    )
    if after_pk is not None:
        stmt = stmt.where(Product.pk > after_pk)
    if category is not None:
        stmt = stmt.where(Product.category == category)
    if where is not None:
        stmt = stmt.where(filter_clause(where, Product.pk, Product.category))
    return list(session.scalars(stmt))


def count_products(session: Session, *, where: LabelFilter | None = None) -> int:
    """How many products pass `where` (all of them without one)."""
    stmt = select(func.count()).select_from(Product)
    if where is not None:
        stmt = stmt.where(filter_clause(where, Product.pk, Product.category))
    return int(session.scalar(stmt) or 0)


# labels and filters ---------------------------------------------------------------------
def filter_clause(where: LabelFilter, product_pk: Any, category: Any) -> ColumnElement[bool]:
    """The SQL condition of a filter on a product given by its key and category columns.

    Each label key is an EXISTS over the (key, value, product) index: a semi-join for
    `must`, an anti-join for `must_not`, on both databases; `category` compares the
    column itself.
    """
    if where.impossible:
        return false()
    clauses: list[ColumnElement[bool]] = []
    for negate, part in ((False, where.must), (True, where.must_not)):
        for key, values in sorted(part.items()):
            wanted = sorted(values)
            if key == CATEGORY_KEY:
                clause: ColumnElement[bool] = category.in_(wanted)
                if negate:
                    clause = or_(category.is_(None), category.not_in(wanted))
            elif key == SET_KEY:
                member = aliased(ProductSetMember)
                found = exists().where(member.product_pk == product_pk, member.set_id.in_(wanted))
                clause = ~found if negate else found
            else:
                label = aliased(ProductLabel)
                found = exists().where(
                    label.product_pk == product_pk, label.key == key, label.value.in_(wanted)
                )
                clause = ~found if negate else found
            clauses.append(clause)
    return and_(true(), *clauses)


def labels_of(session: Session, product_pks: Sequence[int]) -> dict[int, dict[str, list[str]]]:
    """Each product's labels (key -> sorted values); products without any map to {}."""
    found: dict[int, dict[str, list[str]]] = {int(pk): {} for pk in product_pks}
    if not product_pks:
        return found
    stmt = (
        select(ProductLabel.product_pk, ProductLabel.key, ProductLabel.value)
        .where(ProductLabel.product_pk.in_(list(set(product_pks))))
        .order_by(ProductLabel.product_pk, ProductLabel.key, ProductLabel.value)
    )
    for pk, key, value in session.execute(stmt):
        found[int(pk)].setdefault(key, []).append(value)
    return found


def replace_labels(session: Session, labels: Mapping[int, Mapping[str, Sequence[str]]]) -> None:
    """Make each product's labels exactly the ones given (normalised already)."""
    if not labels:
        return
    session.execute(delete(ProductLabel).where(ProductLabel.product_pk.in_(list(labels))))
    rows = [
        {"product_id": pk, "key": key, "value": value}
        for pk, by_key in labels.items()
        for key, values in by_key.items()
        for value in values
    ]
    if rows:
        session.execute(insert(_LABELS), rows)


def sets_of(session: Session, product_pks: Sequence[int]) -> dict[int, list[str]]:
    """Each product's sets, sorted."""
    found: dict[int, list[str]] = {int(pk): [] for pk in product_pks}
    if not product_pks:
        return found
    stmt = (
        select(ProductSetMember.product_pk, ProductSetMember.set_id)
        .where(ProductSetMember.product_pk.in_(list(set(product_pks))))
        .order_by(ProductSetMember.product_pk, ProductSetMember.set_id)
    )
    for pk, set_id in session.execute(stmt):
        found[int(pk)].append(set_id)
    return found


def replace_sets(session: Session, sets: Mapping[int, Sequence[str]]) -> None:
    """Make each product's set memberships exactly the ones given."""
    if not sets:
        return
    session.execute(delete(ProductSetMember).where(ProductSetMember.product_pk.in_(list(sets))))
    rows = [{"set_id": s, "product_id": pk} for pk, ids in sets.items() for s in ids]
    if rows:
        session.execute(insert(_MEMBERS), rows)


def filtered_image_ids(
    session: Session, where: LabelFilter, model_id: str, limit: int
) -> list[int]:
    """Image ids of the products passing `where`, at most `limit` (the caller checks
    whether it got all of them)."""
    stmt = (
        select(ProductImage.id)
        .join(Product, Product.pk == ProductImage.product_pk)
        .where(filter_clause(where, Product.pk, Product.category))
        .where(ProductImage.model_id == model_id)
        .limit(limit)
    )
    return [int(i) for i in session.scalars(stmt)]


def images_passing(session: Session, where: LabelFilter, image_ids: Sequence[int]) -> set[int]:
    """Which of `image_ids` belong to a product passing `where` (broad-filter checks)."""
    if not image_ids:
        return set()
    stmt = (
        select(ProductImage.id)
        .join(Product, Product.pk == ProductImage.product_pk)
        .where(ProductImage.id.in_(list(set(image_ids))))
        .where(filter_clause(where, Product.pk, Product.category))
    )
    return {int(i) for i in session.scalars(stmt)}


def matching_products(session: Session, where: LabelFilter, product_pks: Sequence[int]) -> set[int]:
    """Which of `product_pks` pass `where`."""
    if not product_pks:
        return set()
    stmt = select(Product.pk).where(
        Product.pk.in_(list(set(product_pks))), filter_clause(where, Product.pk, Product.category)
    )
    return {int(pk) for pk in session.scalars(stmt)}


def delete_product(session: Session, product: Product) -> list[int]:
    """Delete a product and its images; logs a `delete` change per image."""
    image_ids = list(
        session.scalars(select(ProductImage.id).where(ProductImage.product_pk == product.pk))
    )
    session.execute(delete(ProductImage).where(ProductImage.product_pk == product.pk))
    log_changes(session, image_ids, OP_DELETE)
    session.execute(delete(Product).where(Product.pk == product.pk))
    return image_ids


def lock_or_create_products(
    session: Session, products: Sequence[dict[str, Any]]
) -> tuple[dict[str, Product], dict[str, int]]:
    """Many products at once (bulk imports): absent rows are created with their fields,
    present ones are locked for this transaction, as `lock_or_create_product` does.

    Args:
        products: `external_id`, `title`, `category` and `attributes` of each product.

    Returns:
        The locked rows of the products that existed, by external id, and the primary
        keys of those created here.
    """
    if not products:
        return {}, {}
    ids = [p["external_id"] for p in products]
    table = _PRODUCTS
    now = utcnow()
    if session.get_bind().dialect.name == "postgresql":
        # Another writer may create one of them meanwhile: ON CONFLICT leaves it to them,
        # and the row is then locked below like any existing one.
        rows = [{**p, "created_at": now, "updated_at": now} for p in products]
        stmt = (
            postgresql.insert(table)
            .on_conflict_do_nothing()
            .returning(table.c.external_id, table.c.id)
        )
        created = {str(e): int(pk) for e, pk in session.execute(stmt, rows) if e is not None}
    else:
        # SQLite serialises writers (BEGIN IMMEDIATE): what is absent now stays absent.
        present = set(
            session.scalars(select(Product.external_id).where(Product.external_id.in_(ids)))
        )
        rows = [
            {**p, "created_at": now, "updated_at": now}
            for p in products
            if p["external_id"] not in present
        ]
        if rows:
            session.execute(insert(table), rows)
        fresh = [r["external_id"] for r in rows]
        created = (
            {
                str(e): int(pk)
                for e, pk in session.execute(
                    select(Product.external_id, Product.pk).where(Product.external_id.in_(fresh))
                )
            }
            if fresh
            else {}
        )
    others = [i for i in ids if i not in created]
    locked: dict[str, Product] = {}
    if others:
        query = select(Product).where(Product.external_id.in_(others)).with_for_update()
        locked = {p.external_id: p for p in session.scalars(query)}
    return locked, created


def images_of_products(
    session: Session, product_pks: Sequence[int]
) -> dict[int, list[ProductImage]]:
    """`images_of` for many products in one query."""
    found: dict[int, list[ProductImage]] = {pk: [] for pk in product_pks}
    if not product_pks:
        return found
    stmt = (
        select(ProductImage)
        .where(ProductImage.product_pk.in_(list(product_pks)))
        .order_by(ProductImage.product_pk, ProductImage.position, ProductImage.id)
    )
    for image in session.scalars(stmt):
        found[image.product_pk].append(image)
    return found


# The columns a bulk image insert writes, in COPY order.
_IMAGE_COLUMNS = (
    "id",
    "product_id",
    "position",
    "source_url",
    "sha256",
    "box",
    "width",
    "height",
    "embedding",
    "model_id",
    "created_at",
    "updated_at",
)


def add_images(session: Session, images: Sequence[dict[str, Any]]) -> list[int]:
    """Insert many images (bulk imports); returns their ids in the order given.

    Postgres: ids are drawn from the table's sequence first, then the rows go in with
    `COPY` (an order of magnitude faster than INSERTs for rows carrying a 2 KB vector).
    SQLite: one multi-row INSERT ... RETURNING per batch.

    Args:
        images: `product_pk`, `position`, `source_url`, `sha256`, `box`, `width`,
            `height`, `embedding` and `model_id` of each image.
    """
    if not images:
        return []
    now = utcnow()
    if session.get_bind().dialect.name != "postgresql":
        # Writers are serialised, so the next ids are the ones SQLite would pick itself;
        # naming them lets one executemany insert them all without RETURNING.
        first = int(session.scalar(select(func.max(ProductImage.id))) or 0) + 1
        ids = list(range(first, first + len(images)))
        rows = [
            {**_image_row(image), "id": i, "created_at": now, "updated_at": now}
            for i, image in zip(ids, images, strict=True)
        ]
        session.execute(insert(_IMAGES), rows)
        return ids
    ids = [
        int(i)
        for i in session.scalars(
            text(
                "SELECT nextval(pg_get_serial_sequence('product_images', 'id')) "
                "FROM generate_series(1, :n)"
            ),
            {"n": len(images)},
        )
    ]
    columns = ", ".join(_IMAGE_COLUMNS)
    with _copy(session, f"COPY product_images ({columns}) FROM STDIN") as copy:
        for image_id, image in zip(ids, images, strict=True):
            box = image["box"]
            copy.write_row(
                (
                    image_id,
                    image["product_pk"],
                    image["position"],
                    image["source_url"],
                    image["sha256"],
                    None if box is None else json.dumps(box),
                    image["width"],
                    image["height"],
                    image["embedding"],
                    image["model_id"],
                    now,
                    now,
                )
            )
    return ids


def _image_row(image: dict[str, Any]) -> dict[str, Any]:
    """Column names (Core) for an image given by attribute names (`product_pk`)."""
    row = dict(image)
    row["product_id"] = row.pop("product_pk")
    return row


@contextmanager
def _copy(session: Session, statement: str) -> Iterator[Any]:
    """A psycopg 3 `COPY ... FROM STDIN` in the session's own transaction."""
    dbapi: Any = session.connection().connection.driver_connection
    with dbapi.cursor() as cursor, cursor.copy(statement) as copy:
        yield copy


# images ---------------------------------------------------------------------------------
def images_of(session: Session, product_pk: int) -> list[ProductImage]:
    stmt = (
        select(ProductImage)
        .where(ProductImage.product_pk == product_pk)
        .order_by(ProductImage.position, ProductImage.id)
    )
    return list(session.scalars(stmt))


@dataclass(frozen=True)
class KnownEmbedding:
    embedding: bytes
    width: int
    height: int


def known_embeddings(
    session: Session, keys: Sequence[tuple[str, list[float] | None]], model_id: str
) -> dict[tuple[str, tuple[float, ...] | None], KnownEmbedding]:
    """Stored embeddings for (sha256, box) pairs under `model_id`, from any product."""
    shas = sorted({sha for sha, _ in keys})
    if not shas:
        return {}
    stmt = select(
        ProductImage.sha256,
        ProductImage.box,
        ProductImage.embedding,
        ProductImage.width,
        ProductImage.height,
    ).where(ProductImage.sha256.in_(shas), ProductImage.model_id == model_id)
    found: dict[tuple[str, tuple[float, ...] | None], KnownEmbedding] = {}
    for sha, box, emb, width, height in session.execute(stmt):
        key = (sha, tuple(box) if box is not None else None)
        found.setdefault(key, KnownEmbedding(emb, width, height))
    return found


def add_image(session: Session, **values: Any) -> ProductImage:
    image = ProductImage(**values)
    session.add(image)
    session.flush()
    return image


def delete_images(session: Session, image_ids: Sequence[int]) -> None:
    if image_ids:
        session.execute(delete(ProductImage).where(ProductImage.id.in_(list(image_ids))))
        log_changes(session, image_ids, OP_DELETE)


def set_positions(session: Session, positions: dict[int, int]) -> None:
    for image_id, position in positions.items():
        session.execute(
            update(ProductImage).where(ProductImage.id == image_id).values(position=position)
        )


def model_id_counts(session: Session) -> dict[str, int]:
    stmt = select(ProductImage.model_id, func.count()).group_by(ProductImage.model_id)
    return {model_id: int(n) for model_id, n in session.execute(stmt)}


def count_images(session: Session) -> int:
    return int(session.scalar(select(func.count()).select_from(ProductImage)) or 0)


# change log -----------------------------------------------------------------------------
def log_changes(session: Session, image_ids: Sequence[int], op: str) -> None:
    """Record changes in the caller's transaction (with its transaction id on Postgres).

    On Postgres the transaction also notifies `CHANGE_CHANNEL` with the writer's
    application name: the notification is delivered when (and only if) it commits, so a
    replica listening there catches up at once instead of at its next poll.
    """
    if not image_ids:
        return
    now = utcnow()
    rows = [{"image_id": i, "op": op, "created_at": now} for i in image_ids]
    if session.get_bind().dialect.name == "postgresql":
        txid = session.execute(text("SELECT pg_current_xact_id()::text::bigint")).scalar_one()
        session.execute(
            text("SELECT pg_notify(:channel, current_setting('application_name'))"),
            {"channel": CHANGE_CHANNEL},
        )
        if len(rows) >= _COPY_FROM:
            with _copy(session, "COPY change_log (image_id, op, txid, created_at) FROM STDIN") as c:
                for i in image_ids:
                    c.write_row((i, op, txid, now))
            return
        for row in rows:
            row["txid"] = txid
    session.execute(insert(_CHANGES), rows)


# From this many change-log rows on, Postgres gets them by COPY (bulk imports).
_COPY_FROM = 256

# The channel a committed change-log write notifies on Postgres (one notification per
# transaction: Postgres folds identical ones).
CHANGE_CHANNEL = "vsearch_change_log"


def listen_for_changes(connection: Any) -> None:
    """Subscribe a dedicated autocommit psycopg connection to `CHANGE_CHANNEL`."""
    connection.execute(f"LISTEN {CHANGE_CHANNEL}")


# the index's change feed (app/catalogue/feed.py) ---------------------------------------
@dataclass(frozen=True)
class ChangeRow:
    """A change-log row: `txid` is the writing transaction's id on Postgres, else None."""

    seq: int
    image_id: int
    txid: int | None


def current_xmin(session: Session) -> int:
    """Oldest transaction still in flight (Postgres): every older one has ended."""
    value = session.execute(
        text("SELECT pg_snapshot_xmin(pg_current_snapshot())::text::bigint")
    ).scalar_one()
    return int(value)


def last_seq(session: Session) -> int:
    return int(session.scalar(select(func.max(ChangeLog.seq))) or 0)


def changes_after_seq(session: Session, seq: int, limit: int) -> list[ChangeRow]:
    stmt = (
        select(ChangeLog.seq, ChangeLog.image_id, ChangeLog.txid)
        .where(ChangeLog.seq > seq)
        .order_by(ChangeLog.seq)
        .limit(limit)
    )
    return [ChangeRow(*row) for row in session.execute(stmt)]


def changes_from_txid(session: Session, xmin: int, after_seq: int, limit: int) -> list[ChangeRow]:
    """Visible changes of transactions with id >= `xmin` (Postgres), in seq order."""
    stmt = (
        select(ChangeLog.seq, ChangeLog.image_id, ChangeLog.txid)
        .where(ChangeLog.txid >= xmin, ChangeLog.seq > after_seq)
        .order_by(ChangeLog.seq)
        .limit(limit)
    )
    return [ChangeRow(*row) for row in session.execute(stmt)]


def current_embeddings(
    session: Session, image_ids: Sequence[int], model_id: str
) -> dict[int, bytes]:
    """The stored embedding of each image that still exists (under `model_id`)."""
    if not image_ids:
        return {}
    stmt = select(ProductImage.id, ProductImage.embedding).where(
        ProductImage.id.in_(list(image_ids)), ProductImage.model_id == model_id
    )
    return {int(i): e for i, e in session.execute(stmt)}


def embeddings_page(
    session: Session, after_id: int, limit: int, model_id: str
) -> list[tuple[int, bytes]]:
    """Embeddings in image-id order, a page at a time (index rebuilds)."""
    stmt = (
        select(ProductImage.id, ProductImage.embedding)
        .where(ProductImage.id > after_id, ProductImage.model_id == model_id)
        .order_by(ProductImage.id)
        .limit(limit)
    )
    return [(int(i), e) for i, e in session.execute(stmt)]


def embedding_sample(session: Session, size: int, model_id: str) -> list[bytes]:
    """About `size` embeddings spread evenly over the id range (training samples)."""
    total = count_images(session)
    if total == 0:
        return []
    step = max(1, total // max(size, 1))
    stmt = (
        select(ProductImage.embedding)
        .where(ProductImage.model_id == model_id, (ProductImage.id % step) == 0)
        .limit(size)
    )
    return list(session.scalars(stmt))


# search ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class ImageOwner:
    image_id: int
    product_pk: int
    external_id: str
    title: str | None
    category: str | None
    source_url: str | None


def image_owners(session: Session, image_ids: Sequence[int]) -> dict[int, ImageOwner]:
    """Product details for each image id that still exists."""
    if not image_ids:
        return {}
    stmt = (
        select(
            ProductImage.id,
            Product.pk,
            Product.external_id,
            Product.title,
            Product.category,
            ProductImage.source_url,
        )
        .join(Product, Product.pk == ProductImage.product_pk)
        .where(ProductImage.id.in_(list(set(image_ids))))
    )
    return {
        int(row[0]): ImageOwner(int(row[0]), int(row[1]), *row[2:]) for row in session.execute(stmt)
    }


def sibling_image_ids(session: Session, image_ids: Sequence[int]) -> dict[int, list[int]]:
    """For each image id, the ids of every image of its product, itself included
    (product-level scoring). Looked up through the product key's index only: a filter on
    the model id here made SQLite scan the model id's index, i.e. every image."""
    if not image_ids:
        return {}
    owner = aliased(ProductImage)
    stmt = (
        select(owner.id, ProductImage.id)
        .join(ProductImage, ProductImage.product_pk == owner.product_pk)
        .where(owner.id.in_(list(set(image_ids))))
    )
    out: dict[int, list[int]] = {}
    for hit, sibling in session.execute(stmt):
        out.setdefault(int(hit), []).append(int(sibling))
    return out


def product_image_vectors(
    session: Session, product_pk: int, model_id: str | None = None
) -> list[tuple[int, bytes]]:
    stmt = select(ProductImage.id, ProductImage.embedding).where(
        ProductImage.product_pk == product_pk
    )
    if model_id is not None:
        stmt = stmt.where(ProductImage.model_id == model_id)
    return [(int(i), e) for i, e in session.execute(stmt)]


def image_vector(session: Session, image_id: int, model_id: str) -> tuple[int, bytes] | None:
    """(product pk, embedding) of an image embedded by `model_id`."""
    row = session.execute(
        select(ProductImage.product_pk, ProductImage.embedding).where(
            ProductImage.id == image_id, ProductImage.model_id == model_id
        )
    ).first()
    return None if row is None else (int(row[0]), row[1])


def images_with_vectors(
    session: Session, product_pks: Sequence[int], model_id: str
) -> dict[int, list[tuple[int, str | None, bytes]]]:
    """(image id, source, embedding) of each product's images, by product pk."""
    found: dict[int, list[tuple[int, str | None, bytes]]] = {}
    if not product_pks:
        return found
    stmt = select(
        ProductImage.product_pk, ProductImage.id, ProductImage.source_url, ProductImage.embedding
    ).where(ProductImage.product_pk.in_(list(set(product_pks))), ProductImage.model_id == model_id)
    for pk, image_id, source, embedding in session.execute(stmt):
        found.setdefault(int(pk), []).append((int(image_id), source, embedding))
    return found


# duplicates -----------------------------------------------------------------------------
@dataclass(frozen=True)
class PairRow:
    a_pk: int
    b_pk: int
    a: str
    b: str
    score: float
    a_image_id: int
    b_image_id: int
    found_at: datetime
    decision: str | None


def canonical(a_pk: int, b_pk: int) -> tuple[int, int]:
    return (a_pk, b_pk) if a_pk < b_pk else (b_pk, a_pk)


def delete_stale_pairs_of(session: Session, product_pk: int, image_ids: Sequence[int]) -> None:
    """Drop the product's pairs that rest on an image it no longer has."""
    current = list(image_ids) or [-1]
    session.execute(
        delete(DuplicatePair).where(
            or_(
                and_(DuplicatePair.a_pk == product_pk, DuplicatePair.a_image_id.not_in(current)),
                and_(DuplicatePair.b_pk == product_pk, DuplicatePair.b_image_id.not_in(current)),
            )
        )
    )


def upsert_pairs(session: Session, rows: Sequence[dict[str, Any]]) -> None:
    """Insert pairs; an existing pair keeps the higher score (and its image ids)."""
    if not rows:
        return
    # One statement compiled once and executed for many rows (SQLAlchemy batches them into
    # multi-row INSERTs); building `.values(rows)` instead compiles a bind parameter per
    # value, which cost most of a duplicates scan.
    session.execute(_keep_better(_pairs_insert(session)), list(rows))


def _pairs_insert(session: Session, target: Any = DuplicatePair) -> Any:
    dialect = session.get_bind().dialect.name
    return postgresql.insert(target) if dialect == "postgresql" else sqlite.insert(target)


def _keep_better(ins: Any) -> Any:
    """`ins` as an upsert on the pair: an existing pair keeps the higher score (and its
    image ids); `found_at` is always refreshed."""
    excluded = ins.excluded
    better = excluded.score > DuplicatePair.score
    return ins.on_conflict_do_update(
        index_elements=[DuplicatePair.a_pk, DuplicatePair.b_pk],
        set_={
            "score": case((better, excluded.score), else_=DuplicatePair.score),
            "a_image_id": case((better, excluded.a_image_id), else_=DuplicatePair.a_image_id),
            "b_image_id": case((better, excluded.b_image_id), else_=DuplicatePair.b_image_id),
            "found_at": excluded.found_at,
        },
    )


# full-scan staging ----------------------------------------------------------------------
_SCAN = duplicate_scan_pairs
_SCAN_COLUMNS = ("a_product_id", "b_product_id", "score", "a_image_id", "b_image_id")
# PostgreSQL's binary COPY row: a field count, then (length, big-endian value) per field.
_COPY_ROW = np.dtype(
    [("fields", ">i2")]
    + [
        field
        for name, kind in zip(_SCAN_COLUMNS, (">i8", ">i8", ">f8", ">i8", ">i8"), strict=True)
        for field in ((f"{name}_len", ">i4"), (name, kind))
    ]
)
_COPY_SIGNATURE = b"PGCOPY\n\xff\r\n\x00" + b"\x00" * 8  # header, no flags, no extension
_COPY_TRAILER = b"\xff\xff"


def clear_scan_pairs(session: Session) -> None:
    """Empty the staging table (a scan that starts over)."""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("TRUNCATE duplicate_scan_pairs"))
    else:
        session.execute(delete(_SCAN))


def count_scan_pairs(session: Session) -> int:
    return int(session.scalar(select(func.count()).select_from(_SCAN)) or 0)


def stage_scan_pairs(
    session: Session,
    a_pk: np.ndarray,
    b_pk: np.ndarray,
    score: np.ndarray,
    a_image_id: np.ndarray,
    b_image_id: np.ndarray,
) -> None:
    """Append pair rows (equal-length arrays) to the staging table: binary `COPY` on
    PostgreSQL, one executemany of plain tuples on SQLite."""
    n = len(a_pk)
    if n == 0:
        return
    columns = dict(zip(_SCAN_COLUMNS, (a_pk, b_pk, score, a_image_id, b_image_id), strict=True))
    if session.get_bind().dialect.name == "postgresql":
        rows = np.zeros(n, dtype=_COPY_ROW)
        rows["fields"] = len(_SCAN_COLUMNS)
        for name, values in columns.items():
            rows[f"{name}_len"] = 8
            rows[name] = values
        with _copy(
            session,
            f"COPY duplicate_scan_pairs ({', '.join(_SCAN_COLUMNS)}) FROM STDIN (FORMAT BINARY)",
        ) as copy:
            copy.write(_COPY_SIGNATURE + rows.tobytes() + _COPY_TRAILER)
        return
    names = ", ".join(_SCAN_COLUMNS)
    session.connection().exec_driver_sql(
        f"INSERT INTO duplicate_scan_pairs ({names}) VALUES (?, ?, ?, ?, ?)",
        list(zip(*(np.asarray(v).tolist() for v in columns.values()), strict=True)),
    )


def merge_scan_pairs(session: Session, found_at: datetime) -> None:
    """Fold the staged pairs into duplicate_pairs and empty the staging table.

    The best staged row per pair goes in (a pair is often found from both products),
    unless a reviewer marked the pair `different` or a product was deleted meanwhile;
    an existing pair keeps the higher score.

    A small merge is one upsert. From `_REBUILD_INDEXES_FROM` staged rows on, the work
    that a row-by-row upsert repeats millions of times is done once per table instead:
    SQLite takes the rows sorted by pair (appends to the primary key) with the secondary
    indexes dropped and rebuilt inside the transaction (one sort each; readers keep their
    snapshot, indexes included). PostgreSQL writes the merged table anew and swaps it in
    (`_rebuild_pairs_table`): its per-row foreign-key checks and index inserts were most
    of a large upsert's time. A role that may not create tables there, or does not own
    the pairs table, gets the upsert (and a warning in the log).
    """
    large = count_scan_pairs(session) >= _REBUILD_INDEXES_FROM
    if session.get_bind().dialect.name == "postgresql":
        if large:
            try:
                with session.begin_nested():
                    _rebuild_pairs_table(session, found_at)
            except DBAPIError as exc:
                if getattr(exc.orig, "sqlstate", None) != _INSUFFICIENT_PRIVILEGE:
                    raise
                # e.g. no CREATE on the schema, or another role owns the table
                LOG.warning("cannot rebuild duplicate_pairs (%s); merging row by row", exc.orig)
                large = False
        if not large:  # the per-pair ranking sorts every staged row: in memory
            session.connection().exec_driver_sql(f"SET LOCAL work_mem = '{_MERGE_CACHE_KIB}kB'")
            ranked = select(
                *(_SCAN.c[name] for name in _SCAN_COLUMNS),
                func.row_number()
                .over(
                    partition_by=(_SCAN.c.a_product_id, _SCAN.c.b_product_id),
                    order_by=_SCAN.c.score.desc(),
                )
                .label("rank"),
            ).subquery("ranked")
            source = _live_pairs(ranked, found_at).where(ranked.c.rank == 1)
            session.execute(
                _keep_better(
                    _pairs_insert(session).from_select([*_SCAN_COLUMNS, "found_at"], source)
                )
            )
        clear_scan_pairs(session)
        return
    # SQLite's upsert takes a pair's second row as an update of its first: no ranking,
    # rows sorted by pair
    source = _live_pairs(_SCAN, found_at).order_by(_SCAN.c.a_product_id, _SCAN.c.b_product_id)
    stmt = _keep_better(_pairs_insert(session).from_select([*_SCAN_COLUMNS, "found_at"], source))
    secondary = sorted(_PAIRS.indexes, key=lambda ix: str(ix.name))
    connection = session.connection()
    connection.exec_driver_sql(f"PRAGMA cache_size=-{_MERGE_CACHE_KIB}")
    try:
        if large:
            for index in secondary:
                index.drop(connection)
        session.execute(stmt)
        if large:
            for index in secondary:
                index.create(connection)
    finally:
        connection.exec_driver_sql("PRAGMA cache_size=-2000")  # SQLite's default
    clear_scan_pairs(session)


def _live_pairs(rows: Any, found_at: datetime) -> Select[Any]:
    """The staged `rows` (a table or subquery with the staging columns) whose products
    both still exist and which no reviewer marked `different`, with `found_at`."""
    r = rows.c
    a_product, b_product = aliased(Product), aliased(Product)
    different = (
        select(DuplicateDecision.a_pk)
        .where(
            DuplicateDecision.a_pk == r.a_product_id,
            DuplicateDecision.b_pk == r.b_product_id,
            DuplicateDecision.decision == "different",
        )
        .exists()
    )
    return (
        select(*(r[name] for name in _SCAN_COLUMNS), literal(found_at, UtcDateTime()))
        .join(a_product, a_product.pk == r.a_product_id)
        .join(b_product, b_product.pk == r.b_product_id)
        # SQLite needs a WHERE in an upsert's SELECT anyway (ON CONFLICT vs a join's ON)
        .where(true(), ~different)
    )


def _rebuild_pairs_table(session: Session, found_at: datetime) -> None:
    """PostgreSQL's large merge: write the merged pairs into a new table, build its key,
    indexes and foreign keys once each, and swap it in under the old one's name.

    The result is the upsert's: per pair the best row of the staged ones and the stored
    one (the stored one wins a tie), with `found_at` moved on when the scan found it.
    Locks, taken first and in the order catalogue writes take them (products, then
    pairs): product writes wait for the merge (the new foreign keys need them to); pair
    writes wait too, so none is lost in the swap; reads go on against the old table and
    only wait for the swap itself, at the end.
    """
    pairs, columns = _PAIRS.name, [*_SCAN_COLUMNS, "found_at"]
    staging = f"{pairs}_next"
    connection = session.connection()
    for statement in (
        f"LOCK TABLE {_PRODUCTS.name} IN SHARE ROW EXCLUSIVE MODE",
        f"LOCK TABLE {pairs} IN EXCLUSIVE MODE",
        # the merge sorts every row once and builds three indexes
        f"SET LOCAL work_mem = '{_MERGE_CACHE_KIB}kB'",
        f"SET LOCAL maintenance_work_mem = '{_MERGE_CACHE_KIB}kB'",
        f"DROP TABLE IF EXISTS {staging}",
        f"CREATE TABLE {staging} (LIKE {pairs} INCLUDING DEFAULTS INCLUDING STORAGE)",
    ):
        connection.exec_driver_sql(statement)
    p = _PAIRS.c
    candidates = union_all(
        select(*(p[name] for name in columns), literal(0).label("found")),
        _live_pairs(_SCAN, found_at).add_columns(literal(1).label("found")),
    ).subquery("candidates")
    c = candidates.c
    pair = (c.a_product_id, c.b_product_id)
    best = (
        select(
            *(c[name] for name in _SCAN_COLUMNS),
            func.max(c.found_at).over(partition_by=pair),
        )
        .ext(postgresql.distinct_on(*pair))
        .order_by(*pair, c.score.desc(), c.found)
    )
    target = Table(staging, MetaData(), *(Column(name, _PAIRS.c[name].type) for name in columns))
    session.execute(insert(target).from_select(columns, best))
    # key, indexes and foreign keys under provisional names (index names are per schema),
    # then the swap and the final names
    renames: list[str] = []
    key = _PAIRS.primary_key
    connection.exec_driver_sql(
        f"ALTER TABLE {staging} ADD CONSTRAINT {key.name}_next "
        f"PRIMARY KEY ({', '.join(col.name for col in key.columns)})"
    )
    renames.append(f"ALTER TABLE {pairs} RENAME CONSTRAINT {key.name}_next TO {key.name}")
    for index in sorted(_PAIRS.indexes, key=lambda ix: str(ix.name)):
        Index(f"{index.name}_next", *(target.c[col.name] for col in index.columns)).create(
            connection
        )
        renames.append(f"ALTER INDEX {index.name}_next RENAME TO {index.name}")
    for fk in sorted(_PAIRS.foreign_key_constraints, key=lambda fk: str(fk.name)):
        (element,) = fk.elements
        connection.exec_driver_sql(
            f"ALTER TABLE {staging} ADD CONSTRAINT {fk.name}_next "
            f"FOREIGN KEY ({element.parent.name}) REFERENCES "
            f"{element.column.table.name} ({element.column.name}) ON DELETE {fk.ondelete}"
        )
        renames.append(f"ALTER TABLE {pairs} RENAME CONSTRAINT {fk.name}_next TO {fk.name}")
    for statement in (
        f"DROP TABLE {pairs}",
        f"ALTER TABLE {staging} RENAME TO {pairs}",
        *renames,
        f"ANALYZE {pairs}",
    ):
        connection.exec_driver_sql(statement)


# From this many staged rows on, a merge rebuilds the pairs table's indexes (SQLite) or
# the whole table (PostgreSQL) instead of updating them row by row.
_REBUILD_INDEXES_FROM = 100_000
_MERGE_CACHE_KIB = 256 * 1024  # SQLite page cache and sorter memory, PostgreSQL work_mem
_INSUFFICIENT_PRIVILEGE = "42501"  # PostgreSQL's SQLSTATE


def decided_pairs(session: Session, product_pk: int) -> dict[tuple[int, int], str]:
    stmt = select(DuplicateDecision.a_pk, DuplicateDecision.b_pk, DuplicateDecision.decision).where(
        or_(DuplicateDecision.a_pk == product_pk, DuplicateDecision.b_pk == product_pk)
    )
    return {(int(a), int(b)): d for a, b, d in session.execute(stmt)}


def different_pairs(session: Session) -> set[tuple[int, int]]:
    stmt = select(DuplicateDecision.a_pk, DuplicateDecision.b_pk).where(
        DuplicateDecision.decision == "different"
    )
    return {(int(a), int(b)) for a, b in session.execute(stmt)}


def _pairs_query(
    min_score: float,
    category: str | None,
    undecided: bool,
    where: LabelFilter | None = None,
    between: tuple[str, str] | None = None,
) -> Any:
    a_product = aliased(Product)
    b_product = aliased(Product)
    stmt = (
        select(
            DuplicatePair.a_pk,
            DuplicatePair.b_pk,
            a_product.external_id,
            b_product.external_id,
            DuplicatePair.score,
            DuplicatePair.a_image_id,
            DuplicatePair.b_image_id,
            DuplicatePair.found_at,
            DuplicateDecision.decision,
        )
        .join(a_product, a_product.pk == DuplicatePair.a_pk)
        .join(b_product, b_product.pk == DuplicatePair.b_pk)
        .outerjoin(
            DuplicateDecision,
            and_(
                DuplicateDecision.a_pk == DuplicatePair.a_pk,
                DuplicateDecision.b_pk == DuplicatePair.b_pk,
            ),
        )
        .where(DuplicatePair.score >= min_score)
        .where(or_(DuplicateDecision.decision.is_(None), DuplicateDecision.decision != "different"))
    )
    if category is not None:
        stmt = stmt.where(a_product.category == category, b_product.category == category)
    if undecided:
        stmt = stmt.where(DuplicateDecision.decision.is_(None))
    if where is not None:  # both products pass, as with `category`
        stmt = stmt.where(
            filter_clause(where, a_product.pk, a_product.category),
            filter_clause(where, b_product.pk, b_product.category),
        )
    if between is not None:  # one product in each set, whichever order the pair has

        def within(set_id: str, pk: Any) -> ColumnElement[bool]:
            in_set = LabelFilter.build({SET_KEY: [set_id]})
            return filter_clause(in_set, pk, None)

        first, second = between
        stmt = stmt.where(
            or_(
                and_(within(first, a_product.pk), within(second, b_product.pk)),
                and_(within(second, a_product.pk), within(first, b_product.pk)),
            )
        )
    return stmt


def count_listed_pairs(
    session: Session,
    *,
    min_score: float,
    category: str | None = None,
    undecided: bool = False,
    where: LabelFilter | None = None,
    between: tuple[str, str] | None = None,
) -> int:
    """How many pairs `list_pairs` pages through (all pages together)."""
    inner = _pairs_query(min_score, category, undecided, where, between).subquery()
    return int(session.scalar(select(func.count()).select_from(inner)) or 0)


def list_pairs(
    session: Session,
    *,
    min_score: float,
    limit: int,
    after: tuple[float, int, int] | None = None,
    category: str | None = None,
    undecided: bool = False,
    where: LabelFilter | None = None,
    between: tuple[str, str] | None = None,
) -> list[PairRow]:
    """Pairs by score (highest first), then by product pair: a stable order for paging."""
    stmt = _pairs_query(min_score, category, undecided, where, between)
    if after is not None:
        score, a_pk, b_pk = after
        # `score <= cursor` first: a bound the database seeks to in the score index, so
        # a page costs the same deep in the queue as at its top.
        stmt = stmt.where(DuplicatePair.score <= score).where(
            or_(
                DuplicatePair.score < score,
                and_(
                    DuplicatePair.score == score,
                    or_(
                        DuplicatePair.a_pk > a_pk,
                        and_(DuplicatePair.a_pk == a_pk, DuplicatePair.b_pk > b_pk),
                    ),
                ),
            )
        )
    stmt = stmt.order_by(DuplicatePair.score.desc(), DuplicatePair.a_pk, DuplicatePair.b_pk).limit(
        limit
    )
    return [PairRow(*row) for row in session.execute(stmt)]


def all_pairs(
    session: Session,
    *,
    min_score: float,
    category: str | None = None,
    limit: int,
    where: LabelFilter | None = None,
) -> list[PairRow]:
    stmt = _pairs_query(min_score, category, False, where).limit(limit)
    return [PairRow(*row) for row in session.execute(stmt)]


def count_pairs(session: Session) -> int:
    return int(session.scalar(select(func.count()).select_from(DuplicatePair)) or 0)


def delete_pairs_found_before(session: Session, moment: datetime) -> int:
    result: Any = session.execute(delete(DuplicatePair).where(DuplicatePair.found_at < moment))
    return int(result.rowcount or 0)


def set_decision(
    session: Session, a_pk: int, b_pk: int, decision: str, decided_by: str | None
) -> None:
    a_pk, b_pk = canonical(a_pk, b_pk)
    values = {
        "a_pk": a_pk,
        "b_pk": b_pk,
        "decision": decision,
        "decided_by": decided_by,
        "decided_at": utcnow(),
    }
    dialect = session.get_bind().dialect.name
    ins: Any = (
        postgresql.insert(DuplicateDecision)
        if dialect == "postgresql"
        else sqlite.insert(DuplicateDecision)
    )
    stmt = ins.values(values)
    stmt = stmt.on_conflict_do_update(
        index_elements=[DuplicateDecision.a_pk, DuplicateDecision.b_pk],
        set_={k: stmt.excluded[k] for k in ("decision", "decided_by", "decided_at")},
    )
    session.execute(stmt)


@dataclass(frozen=True)
class DecisionRow:
    a_pk: int
    b_pk: int
    a: str
    b: str
    decision: str
    decided_by: str | None
    decided_at: datetime


def list_decisions(
    session: Session,
    *,
    decision: str | None,
    after: tuple[int, int] | None,
    limit: int,
    where: LabelFilter | None = None,
) -> list[DecisionRow]:
    """Decisions in (a, b) product order, a page at a time; with `where`, on pairs whose
    products both pass it."""
    pa, pb = aliased(Product), aliased(Product)
    stmt = (
        select(
            DuplicateDecision.a_pk,
            DuplicateDecision.b_pk,
            pa.external_id,
            pb.external_id,
            DuplicateDecision.decision,
            DuplicateDecision.decided_by,
            DuplicateDecision.decided_at,
        )
        .join(pa, pa.pk == DuplicateDecision.a_pk)
        .join(pb, pb.pk == DuplicateDecision.b_pk)
        .order_by(DuplicateDecision.a_pk, DuplicateDecision.b_pk)
        .limit(limit)
    )
    if decision is not None:
        stmt = stmt.where(DuplicateDecision.decision == decision)
    if where is not None:
        stmt = stmt.where(
            filter_clause(where, pa.pk, pa.category), filter_clause(where, pb.pk, pb.category)
        )
    if after is not None:
        stmt = stmt.where(
            or_(
                DuplicateDecision.a_pk > after[0],
                and_(DuplicateDecision.a_pk == after[0], DuplicateDecision.b_pk > after[1]),
            )
        )
    return [
        DecisionRow(int(a), int(b), ea, eb, d, by, at)
        for a, b, ea, eb, d, by, at in session.execute(stmt)
    ]


def pair_known(session: Session, a_pk: int, b_pk: int) -> bool:
    """Whether the pair was found as duplicates (stored now) or decided on before (a
    pair decided `different` is no longer stored, and may be decided on again)."""
    a_pk, b_pk = canonical(a_pk, b_pk)
    found = select(DuplicatePair.a_pk).where(DuplicatePair.a_pk == a_pk, DuplicatePair.b_pk == b_pk)
    decided = select(DuplicateDecision.a_pk).where(
        DuplicateDecision.a_pk == a_pk, DuplicateDecision.b_pk == b_pk
    )
    return session.execute(found.union_all(decided).limit(1)).first() is not None


def delete_decision(session: Session, a_pk: int, b_pk: int) -> bool:
    a_pk, b_pk = canonical(a_pk, b_pk)
    result = session.execute(
        delete(DuplicateDecision).where(
            DuplicateDecision.a_pk == a_pk, DuplicateDecision.b_pk == b_pk
        )
    )
    return bool(result.rowcount)  # type: ignore[attr-defined]


def images_page(
    session: Session, after_id: int, limit: int, model_id: str
) -> list[tuple[int, int, bytes]]:
    """(image id, product pk, embedding) in image-id order (duplicate scans)."""
    stmt = (
        select(ProductImage.id, ProductImage.product_pk, ProductImage.embedding)
        .where(ProductImage.id > after_id, ProductImage.model_id == model_id)
        .order_by(ProductImage.id)
        .limit(limit)
    )
    return [(int(i), int(p), e) for i, p, e in session.execute(stmt)]


def image_product_arrays(session: Session, model_id: str) -> tuple[Any, Any]:
    """Every image of `model_id` and its product, as two int64 arrays in image-id order
    (a full duplicates scan maps millions of matches to products with one read)."""
    stmt = (
        select(ProductImage.id, ProductImage.product_pk)
        .where(ProductImage.model_id == model_id)
        .order_by(ProductImage.id)
    )
    rows = session.execute(stmt).all()
    pairs = np.array(rows, dtype=np.int64).reshape(-1, 2)
    return pairs[:, 0].copy(), pairs[:, 1].copy()


def image_products(session: Session, image_ids: Sequence[int]) -> dict[int, int]:
    if not image_ids:
        return {}
    stmt = select(ProductImage.id, ProductImage.product_pk).where(
        ProductImage.id.in_(list(set(image_ids)))
    )
    return {int(i): int(p) for i, p in session.execute(stmt)}


# re-embedding ---------------------------------------------------------------------------
def images_of_other_models(
    session: Session, model_id: str, after_id: int, limit: int
) -> list[tuple[int, str | None, list[float] | None]]:
    """(image id, source, box) of images embedded by another model, in id order."""
    stmt = (
        select(ProductImage.id, ProductImage.source_url, ProductImage.box)
        .where(ProductImage.model_id != model_id, ProductImage.id > after_id)
        .order_by(ProductImage.id)
        .limit(limit)
    )
    return [(int(i), s, b) for i, s, b in session.execute(stmt)]


def replace_embedding(session: Session, image_id: int, embedding: bytes, model_id: str) -> None:
    session.execute(
        update(ProductImage)
        .where(ProductImage.id == image_id)
        .values(embedding=embedding, model_id=model_id, updated_at=utcnow())
    )
    log_changes(session, [image_id], OP_UPSERT)
