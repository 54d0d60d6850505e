"""`vsearch bench duplicates`: time a full duplicates scan over N synthetic images.

A throwaway catalogue (SQLite by default, or `--database-url`) gets N products of one
image each, drawn from the clustered synthetic mixture, with 1% of them near-duplicate
copies of another product (the pairs a scan must find; their recall is reported). The
index is built as the service builds it (exact or IVF-PQ by size), then
`DuplicatesService.scan` runs and is timed.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import insert, select

from app.benchmarks.embeddings_import import throwaway_postgres
from app.benchmarks.synthetic import EmbeddingMixture
from app.catalogue import repository as repo
from app.catalogue.duplicates import SCAN_NPROBE, SCAN_REFINE, DuplicatesService
from app.catalogue.feed import CatalogueEmbeddings, change_feed
from app.catalogue.models import DuplicatePair, Product, ProductImage, utcnow
from app.core.config import IndexSettings
from app.core.database import Database
from app.core.files import scratch_directory
from app.core.migrations import upgrade
from app.index.lifecycle import IndexService

MODEL_ID = "synthetic@0"
Say = Callable[[str], None]


def _fill(db: Database, n: int, dim: int, chunk: int, say: Say) -> set[tuple[int, int]]:
    """Fill the catalogue; return the planted near-duplicate pairs as (lower pk, higher pk)."""
    mixture = EmbeddingMixture(dim)
    rng = np.random.default_rng(1)
    planted: set[tuple[int, int]] = set()
    now = utcnow()
    for c, start in enumerate(range(0, n, chunk)):
        size = min(chunk, n - start)
        block = mixture.chunk(c, chunk)[:size]
        # 1% of rows become near-duplicates of another (unmodified) row of the same chunk.
        dup = rng.choice(size, size=max(1, size // 100), replace=False)
        originals = np.setdiff1d(np.arange(size), dup)
        src = rng.choice(originals, size=len(dup))
        block[dup] = mixture.near_duplicates(block[src], seed=c)
        for d, o in zip(dup.tolist(), src.tolist(), strict=True):
            a, b = start + d + 1, start + o + 1
            planted.add((min(a, b), max(a, b)))
        with db.write() as session:
            session.execute(
                insert(Product),
                [
                    {
                        "pk": start + i + 1,
                        "external_id": f"p{start + i}",
                        "attributes": {},
                        "created_at": now,
                        "updated_at": now,
                    }
                    for i in range(size)
                ],
            )
            session.execute(
                insert(ProductImage),
                [
                    {
                        "id": start + i + 1,
                        "product_pk": start + i + 1,
                        "position": 0,
                        "sha256": f"{start + i}",
                        "width": 1,
                        "height": 1,
                        "embedding": block[i].tobytes(),
                        "model_id": MODEL_ID,
                        "created_at": now,
                        "updated_at": now,
                    }
                    for i in range(size)
                ],
            )
        say(f"catalogue: {start + size}/{n}")
    return planted


def run_duplicates_benchmark(
    *,
    n: int,
    dim: int = 512,
    floor: float = 0.9,
    batch: int = 4096,
    neighbours: int = 20,
    nprobe: int = SCAN_NPROBE,
    refine: int = SCAN_REFINE,
    index_settings: IndexSettings | None = None,
    database_url: str | None = None,
    target: str = "sqlite",
    workdir: Path | None = None,
    progress: Say | None = None,
) -> dict[str, Any]:
    """Fill, index and scan; `target` "postgres" starts a throwaway PostgreSQL server
    (durable defaults) unless `database_url` names a database."""
    if target not in ("sqlite", "postgres"):
        raise ValueError(f"unknown target {target!r} (sqlite or postgres)")
    say = progress or (lambda _m: None)
    settings = index_settings or IndexSettings()
    if workdir is not None:
        workdir.mkdir(parents=True, exist_ok=True)
    with scratch_directory(workdir) as tmp, ExitStack() as stack:
        if database_url is None and target == "postgres":
            database_url = stack.enter_context(throwaway_postgres(workdir))
        db = Database(database_url or f"sqlite:///{tmp}/catalogue.db")
        upgrade(db)
        t0 = time.perf_counter()
        planted = _fill(db, n, dim, 50_000, say)
        fill_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        index = IndexService(
            feed=change_feed(db),
            source=CatalogueEmbeddings(db),
            directory=Path(tmp) / "index",
            model_id=MODEL_ID,
            dim=dim,
            settings=settings,
        )
        index.open()
        index.wait_for_retraining()
        index.wait_for_tuning()
        index_s = time.perf_counter() - t0
        service = DuplicatesService(db, index, floor=floor, neighbours=neighbours)
        say("scanning")
        t0 = time.perf_counter()
        report = service.scan(
            state_path=Path(tmp) / "scan.json",
            batch=batch,
            nprobe=nprobe,
            refine=refine,
            resume=False,
            progress=lambda done, total: (
                say(f"scan: {done}/{total}") if done % (batch * 20) == 0 else None
            ),
        )
        scan_s = time.perf_counter() - t0
        with db.read() as session:
            pairs = repo.count_pairs(session)
            found = {
                (min(a, b), max(a, b))
                for a, b in session.execute(select(DuplicatePair.a_pk, DuplicatePair.b_pk))
            }
        result = {
            "n": n,
            "database": db.dialect,
            "dim": dim,
            "floor": floor,
            "neighbours": neighbours,
            "index": index.describe()["kind"],
            "index_params": index.describe()["params"],
            "search": index.describe()["search"],
            "tuning": index.describe()["tuning"],
            "scan_nprobe": nprobe or None,
            "scan_refine": refine or None,
            "planted_near_duplicates": len(planted),
            "planted_found": len(planted & found),
            "planted_recall": round(len(planted & found) / max(1, len(planted)), 4),
            "pairs_found": pairs,
            "catalogue_fill_s": round(fill_s, 1),
            "index_build_s": round(index_s, 1),
            "scan_s": round(scan_s, 1),
            "scan_images_per_s": round(n / scan_s, 1),
            "scan_report": report,
        }
        index.close(save=False)
        db.dispose()
    return result
