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
from app.core.errors import InvalidRequest
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


def _image(value: str, root: Path, box: Box | None) -> ImageInput:
    value = value.strip()
    if value.startswith(("http://", "https://")):
        return ImageInput(url=value, box=box)
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


def read_jsonl(fh: TextIO, root: Path) -> Iterator[ProductInput]:
    for number, line in enumerate(fh, 1):
        if not line.strip():
            continue
        try:
            raw = json.loads(line)
            images = []
            for img in raw["images"]:
                box = img.get("box")
                box_t = Box(box["x"], box["y"], box["w"], box["h"]) if box else None
                if "data" in img:
                    images.append(ImageInput(data_b64=img["data"], box=box_t))
                else:
                    images.append(_image(img.get("url") or img["path"], root, box_t))
            yield ProductInput(
                id=str(raw["id"]),
                title=raw.get("title"),
                category=raw.get("category"),
                attributes=raw.get("attributes") or {},
                labels=raw.get("labels"),
                sets=raw.get("sets"),
                images=images,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise InvalidRequest(f"line {number}: not a product record ({exc})") from exc


def read_csv(fh: TextIO, root: Path, columns: CsvColumns) -> Iterator[ProductInput]:
    reader = csv.DictReader(fh)
    yield from _products_of_rows(reader, set(reader.fieldnames or ()), root, columns, "CSV")


def read_parquet(path: Path, root: Path, columns: CsvColumns) -> Iterator[ProductInput]:
    """Rows as in a CSV file, read a record batch at a time."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise InvalidRequest(
            "reading Parquet needs pyarrow: pip install 'vsearch[parquet]'"
        ) from None
    file = pq.ParquetFile(path)

    def rows() -> Iterator[dict[str, Any]]:
        for batch in file.iter_batches(batch_size=4096):
            for row in batch.to_pylist():
                yield {k: _text(v) for k, v in row.items()}

    yield from _products_of_rows(rows(), set(file.schema_arrow.names), root, columns, "Parquet")


def _text(value: Any) -> Any:
    """Parquet values as the CSV reader sees them (an image list joined by `|`)."""
    if value is None:
        return ""
    if isinstance(value, list):
        return "|".join(str(v) for v in value)
    return value if isinstance(value, str) else str(value)


def _products_of_rows(
    rows: Iterable[dict[str, Any]], fields: set[str], root: Path, columns: CsvColumns, kind: str
) -> Iterator[ProductInput]:
    for required in (columns.id, columns.image):
        if required not in fields:
            raise InvalidRequest(
                f"the {kind} file has no {required!r} column (columns: {sorted(fields)})"
            )
    has_box = all(c in fields for c in columns.box)
    current: dict[str, Any] | None = None
    for row in rows:
        pid = row[columns.id].strip()
        box = None
        if has_box and all(row.get(c, "").strip() for c in columns.box):
            x, y, w, h = (float(row[c]) for c in columns.box)
            box = Box(x, y, w, h)
        images = [_image(v, root, box) for v in row[columns.image].split("|") if v.strip()]
        if current is not None and current["id"] == pid:
            current["images"].extend(images)
            continue
        if current is not None:
            yield ProductInput(**current)
        attributes: dict[str, Any] = {}
        if columns.attributes and row.get(columns.attributes):
            attributes = json.loads(row[columns.attributes])
        current = {
            "id": pid,
            "title": row.get(columns.title) if columns.title else None,
            "category": row.get(columns.category) if columns.category else None,
            "attributes": attributes,
            "labels": _labels(row[columns.labels]) if columns.labels in fields else None,
            "sets": _sets(row[columns.sets]) if columns.sets in fields else None,
            "images": images,
        }
    if current is not None:
        yield ProductInput(**current)


def read_products(
    path: Path, *, images_root: Path | None = None, columns: CsvColumns | None = None
) -> Iterator[ProductInput]:
    root = images_root or path.parent
    if path.suffix.lower() == ".parquet":
        yield from read_parquet(path, root, columns or CsvColumns())
        return
    with path.open(newline="") as fh:
        if path.suffix.lower() in (".jsonl", ".ndjson"):
            yield from read_jsonl(fh, root)
        else:
            yield from read_csv(fh, root, columns or CsvColumns())


async def ingest(
    service: CatalogueService,
    products: Iterator[ProductInput],
    *,
    batch_size: int = 32,
    failures: TextIO | None = None,
    on_result: Callable[[ProductInput, ProductResult], None] | None = None,
) -> IngestSummary:
    """Send `products` through the service in batches; failures go to a JSONL file."""
    summary = IngestSummary()
    forward_before = service.worker.stats.forward_seconds
    started = time.perf_counter()
    batch: list[ProductInput] = []

    async def flush() -> None:
        results = await service.upsert_products(batch)
        for product, result in zip(batch, results, strict=True):
            summary.count(result)
            if result.status == "failed" and failures is not None:
                failures.write(
                    json.dumps(
                        {
                            "id": product.id,
                            "error": {
                                "code": result.error.code if result.error else "unknown",
                                "message": result.error.message if result.error else "",
                            },
                            "images": [img.source for img in product.images],
                        }
                    )
                    + "\n"
                )
            if on_result is not None:
                on_result(product, result)
        batch.clear()

    for product in products:
        batch.append(product)
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
