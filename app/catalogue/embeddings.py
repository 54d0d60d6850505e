"""Embeddings in and out of the catalogue as Parquet files.

Any engine (Spark, Ray, a GPU box) can embed images with the service's model and hand the
vectors over in one file; the import stores them through the catalogue's bulk store path
(`store_products`), so an imported product ends exactly as if it had been posted: its
images matched by content, the change log written in the same transaction, the index and
duplicates updated after commit.

One row per image; the rows of a product are contiguous (the export writes them so):

| column        | type                          |                                            |
|---------------|-------------------------------|--------------------------------------------|
| product_id    | string, required              | the product's external id                  |
| image_sha256  | string (64 hex)               | sha256 of the image bytes (the image key)  |
| model_id      | string, required              | must be the catalogue's model              |
| vector        | fixed_size_list<float32>[dim] | the embedding (L2-normalised on import)    |
| source        | string                        | URL or path the image came from            |
| box           | list<float64>[4]              | x, y, w, h of the crop, in pixels          |
| width, height | int32                         | image size (0 when unknown)                |
| title, category | string                      | product fields                             |
| attributes    | string (JSON object)          | product attributes                         |

The image key is `image_sha256`, the hash the service computes on the bytes it embeds:
the same image later posted through the API is then recognised. Where the producer has
only a URL or path, `image_sha256` may be null and the key becomes the sha256 of the
`source` string. A product's images are its rows in the file: importing a product again
replaces its images the way POST /products does.
"""

from __future__ import annotations

import gc
import hashlib
import json
import math
import re
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np

from app.catalogue import repository as repo
from app.catalogue.service import (
    IndexSink,
    PreparedImage,
    ProductInput,
    StoreOutcome,
    publish_outcomes,
    store_products,
)
from app.core.database import Database
from app.core.errors import EmbeddingsRefused, ParquetUnavailable

COLUMNS = (
    "product_id",
    "image_sha256",
    "model_id",
    "vector",
    "source",
    "box",
    "width",
    "height",
    "title",
    "category",
    "attributes",
)
REQUIRED = ("product_id", "model_id", "vector")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def load_pyarrow() -> tuple[Any, Any, Any]:
    """pyarrow, pyarrow.compute and pyarrow.parquet, or a clear error without them."""
    try:
        import pyarrow as pa
        import pyarrow.compute as pc
        import pyarrow.parquet as pq
    except ImportError:
        raise ParquetUnavailable(
            "Parquet import/export needs pyarrow: pip install 'vsearch[parquet]'."
        ) from None
    return pa, pc, pq


def parquet_schema(dim: int) -> Any:
    pa, _, _ = load_pyarrow()
    return pa.schema(
        [
            pa.field("product_id", pa.string(), nullable=False),
            pa.field("image_sha256", pa.string()),
            pa.field("model_id", pa.string(), nullable=False),
            pa.field("vector", pa.list_(pa.float32(), dim), nullable=False),
            pa.field("source", pa.string()),
            pa.field("box", pa.list_(pa.float64())),
            pa.field("width", pa.int32()),
            pa.field("height", pa.int32()),
            pa.field("title", pa.string()),
            pa.field("category", pa.string()),
            pa.field("attributes", pa.string()),
        ]
    )


# export ---------------------------------------------------------------------------------
def export_embeddings(
    db: Database,
    path: Path,
    *,
    model_id: str,
    dim: int,
    page: int = 2000,
    progress: Callable[[int], None] | None = None,
) -> int:
    """Write every product's images (of `model_id`) to `path`; returns the rows written.

    Products are read a page at a time in id order, so memory stays flat."""
    pa, _, pq = load_pyarrow()
    schema = parquet_schema(dim)
    written = 0
    after: int | None = None
    with pq.ParquetWriter(path, schema, compression="zstd") as writer:
        while True:
            with db.read() as session:
                products = repo.list_products(session, after_pk=after, limit=page)
            if not products:
                return written
            after = products[-1].pk
            columns: dict[str, list[Any]] = {name: [] for name in COLUMNS}
            for product in products:
                for image in product.images:
                    if image.model_id != model_id:
                        continue
                    columns["product_id"].append(product.external_id)
                    columns["image_sha256"].append(image.sha256)
                    columns["model_id"].append(image.model_id)
                    columns["vector"].append(np.frombuffer(image.embedding, dtype=np.float32))
                    columns["source"].append(image.source_url)
                    columns["box"].append(image.box)
                    columns["width"].append(image.width)
                    columns["height"].append(image.height)
                    columns["title"].append(product.title)
                    columns["category"].append(product.category)
                    columns["attributes"].append(
                        json.dumps(product.attributes) if product.attributes else None
                    )
            n = len(columns["product_id"])
            if n:
                flat = np.concatenate(columns.pop("vector"))
                vectors = pa.FixedSizeListArray.from_arrays(pa.array(flat, pa.float32()), dim)
                arrays = {k: pa.array(v, schema.field(k).type) for k, v in columns.items()}
                arrays["vector"] = vectors
                writer.write_table(pa.table(arrays, schema=schema))
                written += n
            if progress is not None:
                progress(written)


# import ---------------------------------------------------------------------------------
@dataclass
class ImportReport:
    rows: int = 0
    products: dict[str, int] = field(
        default_factory=lambda: {"created": 0, "updated": 0, "unchanged": 0, "failed": 0}
    )
    images_added: int = 0
    images_deleted: int = 0
    failed_rows: int = 0
    resumed_at_row: int = 0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class _Product:
    """The rows of one product, gathered while reading."""

    first_row: int
    input: ProductInput
    images: list[PreparedImage] = field(default_factory=list)
    errors: list[tuple[int, str]] = field(default_factory=list)
    rows: int = 0


def check_model(path: Path, model_id: str, dim: int) -> int:
    """Refuse a file whose model is not the catalogue's (or that mixes models), or whose
    vectors have another dimension; returns its number of rows. Reads no vectors."""
    _, pc, pq = load_pyarrow()
    parquet = pq.ParquetFile(path)
    names = set(parquet.schema_arrow.names)
    missing = [c for c in REQUIRED if c not in names]
    if missing:
        raise EmbeddingsRefused(f"{path} lacks the column(s) {', '.join(missing)}.")
    if "image_sha256" not in names and "source" not in names:
        raise EmbeddingsRefused(f"{path} has neither an image_sha256 nor a source column.")
    models = pc.unique(pq.read_table(path, columns=["model_id"]).column("model_id")).to_pylist()
    others = sorted(str(m) for m in models if m is not None and m != model_id)
    if others:
        raise EmbeddingsRefused(
            f"{path} holds embeddings of model(s) {', '.join(others)}; the catalogue's model "
            f"is {model_id}. Embeddings of two models must never be searched together: "
            "produce them with the catalogue's model (or switch the catalogue first with "
            "VS_MODEL and `vsearch reembed`)."
        )
    vector_type = parquet.schema_arrow.field("vector").type
    size = getattr(vector_type, "list_size", None)
    if size is not None and size != dim:
        raise EmbeddingsRefused(f"{path} holds {size}-d vectors; the catalogue's are {dim}-d.")
    return int(parquet.metadata.num_rows)


def import_embeddings(
    db: Database,
    path: Path,
    *,
    model_id: str,
    dim: int,
    index: IndexSink | None = None,
    after_commit: Callable[[StoreOutcome], Any] | None = None,
    batch_rows: int = 10_000,
    start_row: int = 0,
    failures: IO[str] | None = None,
    on_batch: Callable[[int, ImportReport], None] | None = None,
) -> ImportReport:
    """Import `path` into the catalogue, `batch_rows` rows per transaction.

    A product with a bad row is not imported at all (each bad row goes to `failures` as
    one JSON object), since importing the rest would drop the bad image from it.
    Re-importing the same file changes nothing, so a resumed import may start again at
    any product boundary: `start_row` (the `rows_done` that `on_batch` last saw).

    Args:
        on_batch: Called after each committed batch with the rows done so far.
    """
    check_model(path, model_id, dim)
    report = ImportReport(resumed_at_row=start_row)
    seen: set[str] = set()
    pending: list[_Product] = []

    def flush(products: list[_Product]) -> None:
        good = [p for p in products if not p.errors]
        for product in products:
            if product.errors:
                report.products["failed"] += 1
                report.failed_rows += product.rows
                if failures is not None:
                    for row, error in product.errors:
                        line = {"row": row, "product_id": product.input.id, "error": error}
                        failures.write(json.dumps(line) + "\n")
        if good:
            outcomes = store_products(db, model_id, [(p.input, p.images) for p in good])
            publish_outcomes(outcomes, index, after_commit)
            for outcome in outcomes:
                report.products[outcome.status] += 1
                report.images_added += len(outcome.upserted)
                report.images_deleted += len(outcome.deleted)

    def commit(products: list[_Product]) -> None:
        flush(products)
        rows_done = products[-1].first_row + products[-1].rows
        report.rows = rows_done - start_row
        if on_batch is not None:
            on_batch(rows_done, report)

    pending_rows = 0
    # The import allocates millions of short-lived, acyclic objects; the cyclic collector
    # would rescan them all again and again (it took half the import's CPU time).
    collecting = gc.isenabled()
    gc.disable()
    try:
        for product in _read_products(path, dim, start_row, batch_rows):
            if product.input.id in seen:
                product.errors.append(
                    (product.first_row, "the rows of this product are not contiguous in the file")
                )
            seen.add(product.input.id)
            pending.append(product)
            pending_rows += product.rows
            if pending_rows >= batch_rows:
                commit(pending)
                pending, pending_rows = [], 0
        if pending:
            commit(pending)
    finally:
        if collecting:
            gc.enable()
    return report


def _read_products(path: Path, dim: int, start_row: int, batch_rows: int) -> Iterator[_Product]:
    """The file's products in order, each with its rows checked and converted."""
    pa, pc, pq = load_pyarrow()
    parquet = pq.ParquetFile(path)
    present = [c for c in COLUMNS if c in parquet.schema_arrow.names]
    current: _Product | None = None
    row = 0
    for batch in parquet.iter_batches(batch_size=batch_rows, columns=present):
        if row + batch.num_rows <= start_row:
            row += batch.num_rows
            continue
        if row < start_row:
            batch = batch.slice(start_row - row)
            row = start_row
        columns = {name: batch.column(name) for name in present}
        vectors, vector_ok = _vectors(pa, pc, columns["vector"], dim)
        values = {
            name: columns[name].to_pylist() if name in columns else [None] * batch.num_rows
            for name in COLUMNS
            if name != "vector"
        }
        for i in range(batch.num_rows):
            product_id = values["product_id"][i]
            if current is None or product_id != current.input.id:
                if current is not None:
                    yield current
                current = _new_product(row + i, product_id, values, i)
            current.rows += 1
            try:
                current.images.append(_image(values, i, vectors, vector_ok))
            except ValueError as exc:
                current.errors.append((row + i, str(exc)))
        row += batch.num_rows
    if current is not None:
        yield current


def _new_product(row: int, product_id: Any, values: dict[str, list[Any]], i: int) -> _Product:
    errors: list[tuple[int, str]] = []
    if not isinstance(product_id, str) or not product_id or len(product_id) > 256:
        errors.append((row, "product_id must be a non-empty string of at most 256 characters"))
        product_id = str(product_id)
    attributes: dict[str, Any] = {}
    raw = values["attributes"][i]
    if raw:
        try:
            attributes = json.loads(raw)
            if not isinstance(attributes, dict):
                raise ValueError
        except ValueError:
            errors.append((row, "attributes must be a JSON object"))
            attributes = {}
    product = ProductInput(
        id=product_id,
        images=[],
        title=values["title"][i],
        category=values["category"][i],
        attributes=attributes,
    )
    return _Product(row, product, errors=errors)


def _vectors(pa: Any, pc: Any, column: Any, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """The batch's vectors as float32 rows (zeros where bad) and which rows are good:
    of length `dim`, finite and non-zero. Good rows are L2-normalised unless already."""
    n = len(column)
    lengths = pc.fill_null(pc.list_value_length(column), -1).to_numpy(zero_copy_only=False)
    ok = lengths == dim
    out = np.zeros((n, dim), dtype=np.float32)
    if ok.any():
        flat = pc.list_flatten(column.filter(pa.array(ok)))
        out[ok] = flat.to_numpy(zero_copy_only=False).astype(np.float32).reshape(-1, dim)
    norms = np.linalg.norm(out, axis=1)
    ok &= np.isfinite(norms) & (norms > 0)
    # Already-normalised vectors are kept bit for bit, so a re-import matches them.
    scale = ok & (np.abs(norms - 1.0) > 1e-4)
    out[scale] /= norms[scale, None]
    return out, ok


def _image(
    values: dict[str, list[Any]], i: int, vectors: np.ndarray, vector_ok: np.ndarray
) -> PreparedImage:
    """One row's image, or ValueError saying what is wrong with it."""
    if values["model_id"][i] is None:
        raise ValueError("model_id is missing")
    if not vector_ok[i]:
        raise ValueError(f"vector must hold {vectors.shape[1]} finite numbers, not all zero")
    sha = values["image_sha256"][i]
    source = values["source"][i]
    if sha is not None:
        sha = str(sha).lower()
        if not _SHA256.match(sha):
            raise ValueError("image_sha256 must be 64 hexadecimal digits")
    elif source:
        sha = hashlib.sha256(str(source).encode()).hexdigest()
    else:
        raise ValueError("a row needs image_sha256 or source (the image key)")
    box = values["box"][i]
    if box is not None:
        box = [float(v) for v in box if v is not None]
        if len(box) != 4 or not all(math.isfinite(v) for v in box) or box[2] <= 0 or box[3] <= 0:
            raise ValueError("box must be [x, y, w, h] with a positive width and height")
    width, height = values["width"][i] or 0, values["height"][i] or 0
    return PreparedImage(
        sha256=sha,
        box=box,
        source_url=source,
        width=int(width),
        height=int(height),
        embedding=vectors[i].tobytes(),
        reused=False,
    )
