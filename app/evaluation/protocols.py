"""Retrieval protocols in the Products-10K development-set format.

`gallery.csv`: `seller_img_id, img_path, ...`; `queries.csv`: `user_img_id, img_path,
bbox_x, bbox_y, bbox_w, bbox_h, ...`. The ground truth is a `product_id` column in both;
an optional `group` column gives a per-group breakdown. Image paths are relative to an
images root.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from app.core.errors import InvalidRequest
from app.imaging.crop import Box


@dataclass(frozen=True)
class Item:
    id: str
    path: Path
    label: str
    group: str | None = None
    box: Box | None = None


@dataclass(frozen=True)
class Protocol:
    gallery: list[Item]
    queries: list[Item]


def _read(path: Path, id_column: str, images_root: Path, with_box: bool) -> list[Item]:
    with path.open(newline="") as fh:
        reader = csv.DictReader(fh)
        columns = set(reader.fieldnames or ())
        for needed in (id_column, "img_path", "product_id"):
            if needed not in columns:
                raise InvalidRequest(f"{path} has no {needed!r} column")
        box_columns = ("bbox_x", "bbox_y", "bbox_w", "bbox_h")
        has_box = with_box and all(c in columns for c in box_columns)
        items = []
        for row in reader:
            box = None
            if has_box and all(row[c].strip() for c in box_columns):
                x, y, w, h = (float(row[c]) for c in box_columns)
                box = Box(x, y, w, h)
            items.append(
                Item(
                    id=row[id_column],
                    path=images_root / row["img_path"],
                    label=row["product_id"],
                    group=row.get("group") or None,
                    box=box,
                )
            )
    return items


def load_protocol(gallery_csv: Path, queries_csv: Path, images_root: Path) -> Protocol:
    return Protocol(
        gallery=_read(gallery_csv, "seller_img_id", images_root, with_box=False),
        queries=_read(queries_csv, "user_img_id", images_root, with_box=True),
    )
