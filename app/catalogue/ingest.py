"""Bulk ingest from a CSV or JSONL file through the same service as `POST /products`.

JSONL: one product per line with the API's fields; images are `{"url": ...}`,
`{"path": ...}` (relative to the images root) or `{"data": "<base64>"}`, each with an
optional `box`.

CSV: one row per image; rows of one product must be adjacent and are merged. Column
names are configurable so Products-10K style files (`seller_img_id`, `img_path`, ...) load
without conversion. Parquet (`.parquet`, needs pyarrow): the same columns as the CSV; the
image column may also be a list of strings. An image value that starts with http:// or
https:// is a URL, anything else a path relative to the images root (default: the file's
directory). Box columns `bbox_x, bbox_y, bbox_w, bbox_h` are used when present.

A record that cannot be read (a bad box, labels, attributes, JSON) fails alone, with its
line, as a product whose image cannot be fetched does; only a file without its id or image
column is refused as a whole. `POST /imports` reads files with the same reader.

Re-running the same file is a resume: products whose fields and image bytes did not
change come back `unchanged` and nothing is embedded again.
"""

from __future__ import annotations

import csv
import json
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from app.catalogue.service import CatalogueService, ImageInput, ProductInput, ProductResult
from app.core.errors import InvalidRequest, ServiceError, UrlNotAllowed
from app.imaging.crop import Box


@dataclass
class CsvColumns:
    id: str = "id"
    image: str = "image"
    title: str | None = "title"
    category: str | None = "category"
    attributes: str | None = "attributes"
    labels: str | None = "labels"  # `key=value,key=value` (Vision Product Search's form)
    sets: str | None = "sets"  # `set|set`
    box: tuple[str, str, str, str] = ("bbox_x", "bbox_y", "bbox_w", "bbox_h")


@dataclass
class IngestSummary:
    products: int = 0
    images: int = 0
    created: int = 0
    updated: int = 0
    unchanged: int = 0
    failed: int = 0
    seconds: float = 0.0
    stage_seconds: dict[str, float] = field(default_factory=dict)
    model_seconds: float = 0.0
    images_embedded: int = 0
    images_reused: int = 0

    def count(self, result: ProductResult) -> None:
        self.products += 1
        setattr(self, result.status, getattr(self, result.status) + 1)
        self.images += result.images

    def as_dict(self) -> dict[str, Any]:
        per_s = self.images / self.seconds if self.seconds else 0.0
        outside = 1 - self.model_seconds / self.seconds if self.seconds else 0.0
        return {
            "products": self.products,
            "images": self.images,
            "created": self.created,
            "updated": self.updated,
            "unchanged": self.unchanged,
            "failed": self.failed,
            "images_embedded": self.images_embedded,
            "images_reused": self.images_reused,
            "seconds": round(self.seconds, 2),
            "images_per_s": round(per_s, 2),
            "model_forward_seconds": round(self.model_seconds, 2),
            "share_outside_model": round(outside, 3),
            "stage_seconds_summed_over_products": {
                k: round(v, 2) for k, v in self.stage_seconds.items()
            },
        }


@dataclass(frozen=True)
class ProductRecord:
    """One product of a file: where it starts (`line`: the JSONL line, the CSV line of its
    first row, the Parquet row) and the product, or why that record cannot be one."""

    line: int
    product: ProductInput | None = None
    error: ServiceError | None = None

    @property
    def product_id(self) -> str | None:
        return self.product.id if self.product is not None else None


def _image(value: str, root: Path | None, box: Box | None) -> ImageInput:
    value = value.strip()
    if value.startswith(("http://", "https://")):
        return ImageInput(url=value, box=box)
    if root is None:
        raise UrlNotAllowed(
            f"image {value!r} is not an http(s) URL (file paths are read by `vsearch ingest` only)"
        )
    return ImageInput(path=(root / value), box=box)


def _labels(cell: str | None) -> dict[str, list[str]]:
    """`color=red,color=blue,brand=Acme` -> {"color": ["red", "blue"], "brand": ["Acme"]}."""
    labels: dict[str, list[str]] = {}
    for term in (cell or "").split(","):
        if not term.strip():
            continue
        key, sep, value = term.partition("=")
        if not sep:
            raise InvalidRequest(f"labels take `key=value` terms (got {term!r})")
        labels.setdefault(key.strip(), []).append(value.strip())
    return labels


def _sets(cell: str | None) -> list[str]:
    return [s.strip() for s in (cell or "").split("|") if s.strip()]


def _located(error: ServiceError, line: int) -> ServiceError:
    error.message = f"line {line}: {error.message}"
    error.args = (error.message,)
    return error


def _box(raw: Any) -> Box | None:
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise InvalidRequest(f"a box is an object {{x, y, w, h}} (got {raw!r})")
    return Box(float(raw["x"]), float(raw["y"]), float(raw["w"]), float(raw["h"]))


def read_jsonl(fh: TextIO, root: Path | None) -> Iterator[ProductRecord]:
    """Records of a JSONL file; `root` None refuses image paths (files sent over HTTP)."""
    for number, line in enumerate(fh, 1):
        if not line.strip():
            continue
        try:
            raw = json.loads(line)
            images = []
            for img in raw["images"]:
                box = _box(img.get("box"))
                if "data" in img:
                    images.append(ImageInput(data_b64=img["data"], box=box))
                else:
                    images.append(_image(img.get("url") or img["path"], root, box))
            product = ProductInput(
                id=str(raw["id"]),
                title=raw.get("title"),
                category=raw.get("category"),
                attributes=raw.get("attributes") or {},
                labels=raw.get("labels"),
                sets=raw.get("sets"),
                images=images,
            )
        except ServiceError as exc:
            yield ProductRecord(number, error=_located(exc, number))
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            error = InvalidRequest(f"line {number}: not a product record ({exc!r})")
            yield ProductRecord(number, error=error)
        else:
            yield ProductRecord(number, product=product)


def read_csv(fh: TextIO, root: Path | None, columns: CsvColumns) -> Iterator[ProductRecord]:
    reader = csv.DictReader(fh)
    fields = set(reader.fieldnames or ())
    check_columns(fields, columns, "CSV")

    def rows() -> Iterator[tuple[int, dict[str, Any]]]:
        line = reader.line_num + 1
        for row in reader:
            yield line, row
            line = reader.line_num + 1

    yield from _records_of_rows(rows(), fields, root, columns)


def read_parquet(path: Path, root: Path | None, columns: CsvColumns) -> Iterator[ProductRecord]:
    """Rows as in a CSV file, read a record batch at a time."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise InvalidRequest(
            "reading Parquet needs pyarrow: pip install 'vsearch[parquet]'"
        ) from None
    file = pq.ParquetFile(path)
    fields = set(file.schema_arrow.names)
    check_columns(fields, columns, "Parquet")

    def rows() -> Iterator[tuple[int, dict[str, Any]]]:
        number = 0
        for batch in file.iter_batches(batch_size=4096):
            for row in batch.to_pylist():
                number += 1
                yield number, {k: _text(v) for k, v in row.items()}

    yield from _records_of_rows(rows(), fields, root, columns)


def _text(value: Any) -> Any:
    """Parquet values as the CSV reader sees them (an image list joined by `|`)."""
    if value is None:
        return ""
    if isinstance(value, list):
        return "|".join(str(v) for v in value)
    return value if isinstance(value, str) else str(value)


def check_columns(fields: set[str], columns: CsvColumns, kind: str) -> None:
    """A file without the id or image column is refused as a whole, naming the column."""
    for required in (columns.id, columns.image):
        if required not in fields:
            raise InvalidRequest(
                f"the {kind} file has no {required!r} column (columns: {sorted(fields)})"
            )


def _records_of_rows(
    rows: Iterable[tuple[int, dict[str, Any]]],
    fields: set[str],
    root: Path | None,
    columns: CsvColumns,
) -> Iterator[ProductRecord]:
    """Adjacent rows of one id are one product; a row that cannot be read fails its
    product (the whole record), never the file."""
    has_box = all(c in fields for c in columns.box)
    current: dict[str, Any] | None = None
    first_line = 0
    error: ServiceError | None = None

    def record() -> ProductRecord:
        if error is not None:
            return ProductRecord(first_line, error=error)
        assert current is not None
        return ProductRecord(first_line, product=ProductInput(**current))

    for line, row in rows:
        pid = (row.get(columns.id) or "").strip()
        same = current is not None and current["id"] == pid
        if current is not None and not same:
            yield record()
        if not same:
            current, first_line, error = {"id": pid, "images": []}, line, None
        assert current is not None
        if error is not None:
            continue
        try:
            _read_row(row, fields, root, columns, has_box, current, first=not same)
        except ServiceError as exc:
            error = _located(exc, line)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            error = InvalidRequest(f"line {line}: not a product row ({exc!r})")
    if current is not None:
        yield record()


def _read_row(
    row: dict[str, Any],
    fields: set[str],
    root: Path | None,
    columns: CsvColumns,
    has_box: bool,
    current: dict[str, Any],
    *,
    first: bool,
) -> None:
    """Add one row to the product being read (its first row gives the fields)."""
    if not current["id"]:
        raise InvalidRequest(f"the {columns.id!r} column is empty")
    box = None
    if has_box and all((row.get(c) or "").strip() for c in columns.box):
        x, y, w, h = (float(row[c]) for c in columns.box)
        box = Box(x, y, w, h)
    current["images"].extend(
        _image(v, root, box) for v in (row.get(columns.image) or "").split("|") if v.strip()
    )
    if not first:
        return
    attributes: dict[str, Any] = {}
    if columns.attributes and row.get(columns.attributes):
        attributes = json.loads(row[columns.attributes])
        if not isinstance(attributes, dict):
            raise InvalidRequest("attributes must be a JSON object")
    current.update(
        title=row.get(columns.title) if columns.title else None,
        category=row.get(columns.category) if columns.category else None,
        attributes=attributes,
        labels=_labels(row[columns.labels]) if columns.labels in fields else None,
        sets=_sets(row[columns.sets]) if columns.sets in fields else None,
    )


def read_records(
    path: Path,
    *,
    images_root: Path | None = None,
    columns: CsvColumns | None = None,
    allow_paths: bool = True,
    kind: str | None = None,
) -> Iterator[ProductRecord]:
    """Every record of a CSV, JSONL or Parquet file (`kind`, else the file's suffix).

    Raises `InvalidRequest` only for the file as a whole (a missing column); a record
    that is not a product comes back with its error. Without `allow_paths` image values
    must be URLs or inline data (a file uploaded over HTTP names no server paths).
    """
    root = (images_root or path.parent) if allow_paths else None
    kind = kind or file_kind(path)
    if kind == "parquet":
        yield from read_parquet(path, root, columns or CsvColumns())
        return
    with path.open(newline="", encoding="utf-8-sig") as fh:
        if kind == "jsonl":
            yield from read_jsonl(fh, root)
        else:
            yield from read_csv(fh, root, columns or CsvColumns())


def file_kind(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return "parquet"
    return "jsonl" if suffix in (".jsonl", ".ndjson") else "csv"


def read_products(
    path: Path, *, images_root: Path | None = None, columns: CsvColumns | None = None
) -> Iterator[ProductInput]:
    """The products of a file; the first record that is not one raises its error."""
    for record in read_records(path, images_root=images_root, columns=columns):
        if record.error is not None:
            raise record.error
        assert record.product is not None
        yield record.product


async def ingest(
    service: CatalogueService,
    products: Iterable[ProductInput | ProductRecord],
    *,
    batch_size: int = 32,
    failures: TextIO | None = None,
    on_result: Callable[[ProductInput | None, ProductResult], None] | None = None,
) -> IngestSummary:
    """Send `products` through the service in batches; failures go to a JSONL file.

    `products` may be records (`read_records`): one that is not a product is a failure
    (with its line), and the others go on.
    """
    summary = IngestSummary()
    forward_before = service.worker.stats.forward_seconds
    started = time.perf_counter()
    batch: list[ProductInput] = []

    def fail(entry: dict[str, Any], error: ServiceError | None) -> None:
        if failures is None:
            return
        code = error.code if error else "unknown"
        message = error.message if error else ""
        failures.write(json.dumps({**entry, "error": {"code": code, "message": message}}) + "\n")

    async def flush() -> None:
        results = await service.upsert_products(batch)
        for product, result in zip(batch, results, strict=True):
            summary.count(result)
            if result.status == "failed":
                images = [img.source for img in product.images]
                fail({"id": product.id, "images": images}, result.error)
            if on_result is not None:
                on_result(product, result)
        batch.clear()

    for item in products:
        if isinstance(item, ProductRecord):
            if item.error is not None:
                result = ProductResult("", "failed", 0, item.error)
                summary.count(result)
                fail({"id": None, "line": item.line}, item.error)
                if on_result is not None:
                    on_result(None, result)
                continue
            assert item.product is not None
            item = item.product
        batch.append(item)
        if len(batch) >= batch_size:
            await flush()
    if batch:
        await flush()
    summary.seconds = time.perf_counter() - started
    summary.model_seconds = service.worker.stats.forward_seconds - forward_before
    timings = service.timings
    summary.stage_seconds = {
        "read": timings.read,
        "decode": timings.decode,
        "embed_wait": timings.embed,
        "store": timings.store,
    }
    summary.images_embedded = timings.images_embedded
    summary.images_reused = timings.images_reused
    return summary
