"""What `vsearch eval` writes beside its averages: the result of every query, the product
pairs the model confuses most, and a picture of the hardest queries.

An average says how good a model is; it does not say which products it mixes up or
why. The per-query rows (JSON lines or CSV) can be sorted and filtered; the confusion
summary names the product pairs behind most top-1 errors; the sheet shows the hardest
queries next to what the model answered, for people who would rather look than read.
"""

from __future__ import annotations

import csv
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont, ImageOps

from app.core.errors import InvalidRequest
from app.evaluation.metrics import MAP_DEPTH, average_precision
from app.evaluation.protocols import Item
from app.imaging.crop import crop
from app.imaging.decode import decode_image

# How many results each per-query row lists.
LISTED_RESULTS = 5


@dataclass(frozen=True)
class QueryResult:
    """One query's outcome under one ranking."""

    query_id: str
    img_path: str
    product_id: str
    group: str | None
    correct: bool
    first_positive_rank: int | None
    average_precision: float
    best_positive_score: float | None
    best_positive_gallery_id: str | None
    best_negative_score: float
    predicted_product_id: str
    top_gallery_ids: list[str]
    top_product_ids: list[str]
    top_scores: list[float]

    @property
    def margin(self) -> float:
        """Best true-match score minus best wrong-match score: below 0, top-1 is wrong."""
        if self.best_positive_score is None:
            return float("-inf")
        return self.best_positive_score - self.best_negative_score

    def as_dict(self) -> dict[str, Any]:
        out = dict(self.__dict__)
        out["margin"] = round(self.margin, 6) if np.isfinite(self.margin) else None
        return out


def query_results(
    scores: np.ndarray, queries: list[Item], gallery: list[Item]
) -> list[QueryResult]:
    """Every query's rank of its first true match, AP@1000, scores and top results.

    Args:
        scores: Cosine similarities, one row per query, one column per gallery item.
        queries: The protocol's queries, in the order of the rows.
        gallery: The protocol's gallery, in the order of the columns.
    """
    labels = np.asarray([g.label for g in gallery])
    positives = Counter(labels.tolist())
    order = np.argsort(-scores, axis=1, kind="stable")
    out = []
    for n, query in enumerate(queries):
        row = order[n]
        relevant = labels[row] == query.label
        hits = np.flatnonzero(relevant)
        match = labels == query.label
        negatives = scores[n, ~match]
        top = row[:LISTED_RESULTS]
        out.append(
            QueryResult(
                query_id=query.id,
                img_path=str(query.path),
                product_id=query.label,
                group=query.group,
                correct=bool(relevant[0]) if len(relevant) else False,
                first_positive_rank=int(hits[0]) + 1 if len(hits) else None,
                average_precision=(
                    round(average_precision(relevant, positives[query.label], MAP_DEPTH), 6)
                    if positives[query.label]
                    else float("nan")
                ),
                best_positive_score=(
                    round(float(scores[n, match].max()), 6) if match.any() else None
                ),
                best_positive_gallery_id=gallery[int(row[hits[0]])].id if len(hits) else None,
                best_negative_score=(
                    round(float(negatives.max()), 6) if len(negatives) else float("-inf")
                ),
                predicted_product_id=str(labels[row[0]]),
                top_gallery_ids=[gallery[j].id for j in top],
                top_product_ids=[str(labels[j]) for j in top],
                top_scores=[round(float(scores[n, j]), 6) for j in top],
            )
        )
    return out


def write_query_results(results: list[QueryResult], path: Path) -> None:
    """JSON lines (`.jsonl`, `.json`) or CSV (`.csv`, lists joined by `|`), by suffix."""
    suffix = path.suffix.lower()
    rows = [r.as_dict() for r in results]
    if suffix in (".jsonl", ".json"):
        with path.open("w") as fh:
            for row in rows:
                fh.write(json.dumps(row, allow_nan=False, default=_finite) + "\n")
        return
    if suffix != ".csv":
        raise InvalidRequest(f"per-query results go to a .jsonl or .csv file, not {path.name}")
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]) if rows else ["query_id"])
        writer.writeheader()
        for row in rows:
            writer.writerow(
                {
                    k: "|".join(str(x) for x in v) if isinstance(v, list) else _finite(v)
                    for k, v in row.items()
                }
            )


def _finite(value: Any) -> Any:
    """NaN and infinities (no true match in the gallery) are written as null."""
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value


def confusion_summary(
    results: list[QueryResult], gallery: list[Item], *, top: int = 10
) -> list[dict[str, Any]]:
    """The product pairs behind most top-1 errors, most frequent first.

    Each entry: the true product, the product answered instead, how many queries of the
    true product went to it, that count as a share of the product's queries, and one
    gallery image of each (so a reader can see the two).
    """
    per_product = Counter(r.product_id for r in results)
    wrong = Counter(
        (r.product_id, r.predicted_product_id)
        for r in results
        if not r.correct and r.best_positive_score is not None
    )
    example: dict[str, str] = {}
    for item in gallery:
        example.setdefault(item.label, str(item.path))
    return [
        {
            "product_id": a,
            "confused_with": b,
            "queries": n,
            "share_of_product": round(n / per_product[a], 4),
            "product_image": example.get(a),
            "confused_with_image": example.get(b),
        }
        for (a, b), n in sorted(wrong.items(), key=lambda kv: (-kv[1], kv[0]))[:top]
    ]


def hardest(results: list[QueryResult], count: int) -> list[QueryResult]:
    """The queries whose true match is furthest behind the best wrong one."""
    answerable = [r for r in results if r.best_positive_score is not None]
    return sorted(answerable, key=lambda r: (r.margin, r.query_id))[:count]


def _thumbnail(path: str | Path, box: Any, side: int) -> Image.Image:
    image = decode_image(Path(path).read_bytes(), max_pixels=10**9)
    image = crop(image, box) if box is not None else image
    return ImageOps.pad(image.convert("RGB"), (side, side), color=(255, 255, 255))


def hardest_queries_sheet(
    results: list[QueryResult],
    queries: list[Item],
    gallery: list[Item],
    path: Path,
    *,
    count: int = 12,
    side: int = 128,
) -> int:
    """A PNG with one row per hard query: the query, its top results framed green (same
    product) or red (another product) and captioned with product and score, and last, in
    blue, the best image of the true product with its rank.

    Returns the number of rows drawn.
    """
    rows = hardest(results, count)
    by_query = {q.id: q for q in queries}
    by_gallery = {g.id: g for g in gallery}
    font = ImageFont.load_default(size=12)
    pad, caption, frame = 8, 30, 4
    cell_w, cell_h = side + pad, side + caption + pad
    columns = 2 + LISTED_RESULTS
    sheet = Image.new("RGB", (columns * cell_w + pad, max(1, len(rows)) * cell_h + pad), "white")
    draw = ImageDraw.Draw(sheet)
    for r, result in enumerate(rows):
        y = pad + r * cell_h
        query = by_query[result.query_id]
        cells: list[tuple[Item, str, tuple[int, int, int]]] = [
            (query, f"query {query.id}: product {query.label}", (40, 40, 40))
        ]
        for gid, product, score in zip(
            result.top_gallery_ids, result.top_product_ids, result.top_scores, strict=True
        ):
            colour = (30, 160, 60) if product == result.product_id else (210, 40, 40)
            cells.append((by_gallery[gid], f"product {product}  {score:.3f}", colour))
        if result.best_positive_gallery_id is not None:
            true_text = f"true: rank {result.first_positive_rank}  {result.best_positive_score:.3f}"
            cells.append((by_gallery[result.best_positive_gallery_id], true_text, (40, 90, 210)))
        for c, (item, text, colour) in enumerate(cells):
            x = pad + c * cell_w
            draw.rectangle(
                (x - frame // 2, y - frame // 2, x + side + frame // 2, y + side + frame // 2),
                fill=colour,
            )
            sheet.paste(_thumbnail(item.path, item.box, side - frame), (x + 2, y + 2))
            draw.text((x, y + side + 4), text, fill=(0, 0, 0), font=font)
            if c == 0:
                draw.text(
                    (x, y + side + 16), f"margin {result.margin:+.3f}", fill=(0, 0, 0), font=font
                )
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path, format="PNG")
    return len(rows)
