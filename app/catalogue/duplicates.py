"""Duplicate detection for catalogue unification.

Pairs are maintained incrementally: whenever a product's images change, its pairs are
recomputed by searching its images against the index; every other product whose best
image pair scores at least the floor is stored (score, the two image ids, when found).
Reviewers' decisions live in their own table: "different" pairs never come back, and no
scan overwrites a decision. A full scan (`vsearch duplicates scan`) recomputes all pairs
with batched kNN, resumably.

Groups bound transitive chaining: a group grows around a centre product (the one with
the most strong matches); a candidate joins only if it matches the centre and at least
half of the members already in the group. A~B and B~C therefore do not put A and C
together unless A~C as well (for groups of three: C must match both B and A).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections import defaultdict
from collections.abc import Callable, Container, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy.orm import Session

from app.catalogue import repository as repo
from app.catalogue.filters import LabelFilter
from app.catalogue.models import utcnow
from app.catalogue.service import StoreOutcome
from app.core.cursor import decode_cursor, encode_cursor
from app.core.database import Database
from app.core.errors import DecisionNotFound, InvalidRequest, ProductNotFound
from app.core.files import atomic_write_text
from app.index.lifecycle import IndexService

LOG = logging.getLogger(__name__)

DECISIONS = ("same", "different")


@dataclass(frozen=True)
class DuplicateGroup:
    centre: str
    members: list[str]
    min_score: float


def key_fingerprint(api_key: str | None) -> str | None:
    """Who decided: a short hash of the API key (the key itself is never stored)."""
    if not api_key:
        return None
    return "key:" + hashlib.sha256(api_key.encode()).hexdigest()[:12]


class DuplicatesService:
    def __init__(
        self, db: Database, index: IndexService, *, floor: float, neighbours: int = 20
    ) -> None:
        self.db = db
        self.index = index
        self.floor = floor
        self.neighbours = neighbours

    # incremental maintenance ------------------------------------------------------------
    def on_commit(self, outcome: StoreOutcome) -> None:
        """Recompute the pairs of a product whose images changed (after its commit)."""
        if outcome.product_pk >= 0 and (outcome.upserted or outcome.deleted):
            self.refresh_product(outcome.product_pk)

    def refresh_product(self, product_pk: int) -> int:
        """Drop the product's pairs that rest on images it no longer has, and add those
        its current images find now; returns how many were found.

        Pairs are never deleted wholesale: another product committed at the same moment
        may just have found this one, and its pair must survive this refresh.
        """
        with self.db.read() as session:
            vectors = repo.product_image_vectors(session, product_pk)
            decided = repo.decided_pairs(session, product_pk)
        different = {pair for pair, decision in decided.items() if decision == "different"}
        queries = [(image_id, product_pk, vector) for image_id, vector in vectors]
        rows = self._find_pairs(queries, self.floor, different) if queries else []
        with self.db.write() as session:
            repo.delete_stale_pairs_of(session, product_pk, [i for i, _ in vectors])
            repo.upsert_pairs(session, rows)
        return len(rows)

    # reads ------------------------------------------------------------------------------
    def count_pairs(self) -> int:
        with self.db.read() as session:
            return repo.count_pairs(session)

    def check_min_score(self, min_score: float) -> None:
        if min_score < self.floor:
            raise InvalidRequest(
                f"min_score {min_score:g} is below the duplicates floor {self.floor:g}: pairs "
                "under the floor are not stored. Lower VS_DUPLICATES__FLOOR and run "
                "`vsearch duplicates scan` to see them."
            )

    def list_pairs(
        self,
        *,
        min_score: float,
        limit: int,
        cursor: str | None,
        category: str | None,
        undecided: bool,
        where: LabelFilter | None = None,
        between: tuple[str, str] | None = None,
    ) -> tuple[list[repo.PairRow], str | None]:
        self.check_min_score(min_score)
        after = None
        if cursor:
            score, a_pk, b_pk = decode_cursor(cursor, "pairs", (float, int, int))
            after = (float(score), int(a_pk), int(b_pk))
        with self.db.read() as session:
            rows = repo.list_pairs(
                session,
                min_score=min_score,
                limit=limit,
                after=after,
                category=category,
                undecided=undecided,
                where=where,
                between=between,
            )
        next_cursor = (
            encode_cursor("pairs", (rows[-1].score, rows[-1].a_pk, rows[-1].b_pk))
            if len(rows) == limit
            else None
        )
        return rows, next_cursor

    def count_listed_pairs(
        self,
        *,
        min_score: float,
        category: str | None,
        undecided: bool,
        where: LabelFilter | None = None,
        between: tuple[str, str] | None = None,
    ) -> int:
        """The exact number of pairs `list_pairs` pages through (its `total`)."""
        self.check_min_score(min_score)
        with self.db.read() as session:
            return repo.count_listed_pairs(
                session,
                min_score=min_score,
                category=category,
                undecided=undecided,
                where=where,
                between=between,
            )

    def groups(
        self,
        *,
        min_score: float,
        category: str | None,
        max_pairs: int = 1_000_000,
        where: LabelFilter | None = None,
    ) -> list[DuplicateGroup]:
        self.check_min_score(min_score)
        with self.db.read() as session:
            pairs = repo.all_pairs(
                session, min_score=min_score, category=category, limit=max_pairs + 1, where=where
            )
        if len(pairs) > max_pairs:
            raise InvalidRequest(
                f"More than {max_pairs} pairs at min_score {min_score:g}: raise min_score or "
                "filter by category."
            )
        return bounded_groups(pairs)

    # decisions --------------------------------------------------------------------------
    def decide(self, a: str, b: str, decision: str, api_key: str | None) -> tuple[str, str]:
        if decision not in DECISIONS:
            raise InvalidRequest("decision must be 'same' or 'different'.")
        if a == b:
            raise InvalidRequest("A decision needs two different products.")
        with self.db.write() as session:
            a_pk, b_pk = _pair_pks(session, a, b)
            repo.set_decision(session, a_pk, b_pk, decision, key_fingerprint(api_key))
        return a, b

    def list_decisions(
        self, *, decision: str | None, cursor: str | None, limit: int
    ) -> tuple[list[repo.DecisionRow], str | None]:
        if decision is not None and decision not in DECISIONS:
            raise InvalidRequest("decision must be 'same' or 'different'.")
        after = None
        if cursor:
            a_pk, b_pk = decode_cursor(cursor, "decisions", (int, int))
            after = (int(a_pk), int(b_pk))
        with self.db.read() as session:
            rows = repo.list_decisions(session, decision=decision, after=after, limit=limit)
        next_cursor = (
            encode_cursor("decisions", (rows[-1].a_pk, rows[-1].b_pk))
            if len(rows) == limit
            else None
        )
        return rows, next_cursor

    def undo(self, a: str, b: str) -> None:
        """Forget the decision on a pair; a pair hidden as `different` is looked for again
        at once, so it is back in the queue when the images still match."""
        with self.db.write() as session:
            a_pk, b_pk = _pair_pks(session, a, b)
            if not repo.delete_decision(session, a_pk, b_pk):
                raise DecisionNotFound(f"No decision on the pair {a!r}, {b!r}.")
        self.refresh_product(a_pk)

    # full scans -------------------------------------------------------------------------
    def scan(
        self,
        *,
        state_path: Path,
        floor: float | None = None,
        batch: int = 512,
        resume: bool = True,
        progress: Callable[[int, int], None] | None = None,
    ) -> dict[str, Any]:
        """Recompute every pair with batched kNN; resumable from `state_path`.

        Pairs found are upserted as the scan goes (GET /duplicates keeps serving the old
        ones meanwhile); when it finishes, pairs the scan did not find again are removed.
        """
        floor = self.floor if floor is None else floor
        state = _read_state(state_path) if resume else None
        if state is None or state.get("floor") != floor:
            state = {"floor": floor, "started": utcnow().isoformat(), "after_id": 0, "done": 0}
        started_at = datetime.fromisoformat(state["started"])
        with self.db.read() as session:
            total = repo.count_images(session)
            different = repo.different_pairs(session)
        t0 = time.perf_counter()
        model_id = self.index.model_id
        while True:
            with self.db.read() as session:
                page = repo.images_page(session, int(state["after_id"]), batch, model_id)
            if not page:
                break
            rows = self._find_pairs(page, floor, different)
            with self.db.write() as session:
                repo.upsert_pairs(session, rows)
            state["after_id"], state["done"] = page[-1][0], int(state["done"]) + len(page)
            _write_state(state_path, state)
            if progress is not None:
                progress(int(state["done"]), total)
        with self.db.write() as session:
            removed = repo.delete_pairs_found_before(session, started_at)
            pairs = repo.count_pairs(session)
        state_path.unlink(missing_ok=True)
        return {
            "images": int(state["done"]),
            "pairs": pairs,
            "stale_pairs_removed": removed,
            "floor": floor,
            "seconds": round(time.perf_counter() - t0, 2),
        }

    def _find_pairs(
        self,
        page: Sequence[tuple[int, int, bytes]],
        floor: float,
        different: Container[tuple[int, int]],
    ) -> list[dict[str, Any]]:
        """Pair rows for images `(image_id, product_pk, embedding)`: each other product
        whose image scores >= `floor`, best pair of images per product pair, skipping pairs
        a reviewer marked `different` (one code path for ingest refreshes and full scans)."""
        queries = np.stack([np.frombuffer(e, dtype=np.float32) for _, _, e in page])
        scores, found = self.index.index.search(queries, self.neighbours)
        strong = (scores >= floor) & (found >= 0)
        with self.db.read() as session:
            owners = repo.image_products(session, found[strong].tolist())
        best: dict[tuple[int, int], dict[str, Any]] = {}
        now = utcnow()
        for q, (image_id, product_pk, _) in enumerate(page):
            for score, theirs in zip(scores[q][strong[q]], found[q][strong[q]], strict=True):
                other = owners.get(int(theirs))
                if other is None or other == product_pk:
                    continue
                a, b = repo.canonical(product_pk, other)
                if (a, b) in different:
                    continue
                a_img, b_img = (
                    (image_id, int(theirs)) if a == product_pk else (int(theirs), image_id)
                )
                row = best.get((a, b))
                if row is None or score > row["score"]:
                    best[(a, b)] = {
                        "a_pk": a,
                        "b_pk": b,
                        "score": min(float(score), 1.0),
                        "a_image_id": a_img,
                        "b_image_id": b_img,
                        "found_at": now,
                    }
        return list(best.values())


def _pair_pks(session: Session, a: str, b: str) -> tuple[int, int]:
    """The row ids of products `a` and `b`; 404 naming the first one that does not exist."""
    found = {x: repo.get_product(session, x) for x in (a, b)}
    for external_id, product in found.items():
        if product is None:
            raise ProductNotFound(f"No product with id {external_id!r}.")
    return found[a].pk, found[b].pk  # type: ignore[union-attr]


def bounded_groups(pairs: list[repo.PairRow]) -> list[DuplicateGroup]:
    """Group products without plain transitive chaining (see the module docstring)."""
    neighbours: dict[str, dict[str, float]] = defaultdict(dict)
    for p in pairs:
        neighbours[p.a][p.b] = p.score
        neighbours[p.b][p.a] = p.score
    order = sorted(
        neighbours,
        key=lambda n: (-len(neighbours[n]), -sum(neighbours[n].values()), n),
    )
    assigned: set[str] = set()
    groups: list[DuplicateGroup] = []
    for centre in order:
        if centre in assigned:
            continue
        members: list[str] = []
        weakest = 1.0
        candidates = sorted(
            (n for n in neighbours[centre] if n not in assigned),
            key=lambda n: (-neighbours[centre][n], n),
        )
        for candidate in candidates:
            links = sum(1 for m in members if m in neighbours[candidate])
            if links * 2 >= len(members):  # matches at least half of the members so far
                members.append(candidate)
                weakest = min(weakest, neighbours[centre][candidate])
        if not members:
            continue
        assigned.add(centre)
        assigned.update(members)
        groups.append(DuplicateGroup(centre, [centre, *members], weakest))
    groups.sort(key=lambda g: (-len(g.members), -g.min_score, g.centre))
    return groups


def _read_state(path: Path) -> dict[str, Any] | None:
    try:
        state: dict[str, Any] = json.loads(path.read_text())
        return state
    except (OSError, ValueError):
        return None


def _write_state(path: Path, state: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(state))
