"""Duplicate detection for catalogue unification.

Pairs are maintained incrementally: whenever a product's images change, its pairs are
recomputed by searching its images against the index; every other product whose best
image pair scores at least the floor is stored (score, the two image ids, when found).
Products written by other replicas are recomputed here as their changes arrive from the
change log (`on_replay`): of two products written at the same moment on two replicas,
each replica applies one of them second and finds the pair then, so no full scan is
needed for it.
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
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy.orm import Session

from app.catalogue import repository as repo
from app.catalogue import review_repository as review_repo
from app.catalogue.calibration import (
    MIN_PER_CLASS,
    Calibration,
    CalibrationPolicy,
    CalibrationService,
    Tier,
    pair_score,
)
from app.catalogue.filters import LabelFilter
from app.catalogue.models import utcnow
from app.catalogue.scope import Scope, in_scope, restrict
from app.catalogue.service import StoreOutcome
from app.core.cursor import decode_cursor, encode_cursor
from app.core.database import Database
from app.core.errors import (
    DecisionNotFound,
    InvalidRequest,
    NotCalibrated,
    PairNotFound,
    ProductNotFound,
)
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
        self,
        db: Database,
        index: IndexService,
        *,
        floor: float,
        neighbours: int = 20,
        replay_limit: int = 1_000,
        calibration: CalibrationPolicy | None = None,
    ) -> None:
        self.db = db
        self.index = index
        self.floor = floor
        self.neighbours = neighbours
        self.replay_limit = replay_limit
        self.replayed_products = 0
        self.calibration = CalibrationService(db, calibration or CalibrationPolicy())

    # incremental maintenance ------------------------------------------------------------
    def on_commit(self, outcome: StoreOutcome) -> None:
        """Recompute the pairs of a product whose images changed (after its commit)."""
        if outcome.product_pk >= 0 and (outcome.upserted or outcome.deleted):
            self.refresh_product(outcome.product_pk)

    def on_replay(self, image_ids: list[int]) -> None:
        """Recompute the pairs of products whose images arrived from the change log
        (written by another replica, or by a bulk import), once they are in the index.

        A catch-up that brings more than `replay_limit` images is a bulk load (an
        embeddings import, a replica back after a long stop): its pairs are left to
        `vsearch duplicates scan`, which finds them far faster than one refresh each.
        """
        if len(image_ids) > self.replay_limit:
            LOG.warning(
                "%d images arrived from the change log at once (more than %d): their duplicate "
                "pairs are left to `vsearch duplicates scan`",
                len(image_ids),
                self.replay_limit,
            )
            return
        with self.db.read() as session:
            products = sorted(set(repo.image_products(session, image_ids).values()))
        for product_pk in products:
            self.refresh_product(product_pk)
        self.replayed_products += len(products)

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
    def decide(
        self, a: str, b: str, decision: str, api_key: str | None, scope: Scope = None
    ) -> tuple[str, str]:
        if decision not in DECISIONS:
            raise InvalidRequest("decision must be 'same' or 'different'.")
        if a == b:
            raise InvalidRequest("A decision needs two different products.")
        with self.db.write() as session:
            a_pk, b_pk = _pair_pks(session, a, b, scope)
            if not repo.pair_known(session, a_pk, b_pk):
                raise PairNotFound(
                    f"{a!r} and {b!r} were never found as duplicates (pairs below the floor, "
                    f"{self.floor:.2f}, are not stored); decide on pairs from GET /duplicates."
                )
            repo.set_decision(session, a_pk, b_pk, decision, key_fingerprint(api_key))
            self._record_score(session, a_pk, b_pk)
        self.calibration.maybe_refit(self.index.model_id)
        return a, b

    def list_decisions(
        self, *, decision: str | None, cursor: str | None, limit: int, scope: Scope = None
    ) -> tuple[list[repo.DecisionRow], str | None]:
        if decision is not None and decision not in DECISIONS:
            raise InvalidRequest("decision must be 'same' or 'different'.")
        after = None
        if cursor:
            a_pk, b_pk = decode_cursor(cursor, "decisions", (int, int))
            after = (int(a_pk), int(b_pk))
        with self.db.read() as session:
            rows = repo.list_decisions(
                session, decision=decision, after=after, limit=limit, where=restrict(None, scope)
            )
        next_cursor = (
            encode_cursor("decisions", (rows[-1].a_pk, rows[-1].b_pk))
            if len(rows) == limit
            else None
        )
        return rows, next_cursor

    def undo(self, a: str, b: str, scope: Scope = None) -> None:
        """Forget the decision on a pair; a pair hidden as `different` is looked for again
        at once, so it is back in the queue when the images still match."""
        with self.db.write() as session:
            a_pk, b_pk = _pair_pks(session, a, b, scope)
            if not repo.delete_decision(session, a_pk, b_pk):
                raise DecisionNotFound(f"No decision on the pair {a!r}, {b!r}.")
        self.refresh_product(a_pk)
        self.calibration.maybe_refit(self.index.model_id)

    # calibrated probabilities -----------------------------------------------------------
    def _record_score(self, session: Session, a_pk: int, b_pk: int) -> None:
        """Keep the pair's score with its decision: the label calibration learns from."""
        vectors = review_repo.product_vectors(session, [a_pk, b_pk])
        score = pair_score(vectors[a_pk], vectors[b_pk])
        review_repo.set_decision_score(session, a_pk, b_pk, score, self.index.model_id)

    def current_calibration(self) -> Calibration:
        return self.calibration.current(self.index.model_id)

    def fit_calibration(self) -> Calibration:
        return self.calibration.fit(self.index.model_id)

    def assess_pairs(
        self, rows: Sequence[repo.PairRow]
    ) -> tuple[bool, list[tuple[float | None, Tier | None]]]:
        """Whether probabilities exist, and each pair's (probability, tier): the
        category's own fit when both products are in a category that has one."""
        calibration = self.current_calibration()
        with self.db.read() as session:
            shas = review_repo.image_shas(
                session, [i for r in rows for i in (r.a_image_id, r.b_image_id)]
            )
            categories = (
                review_repo.product_categories(session, [p for r in rows for p in (r.a_pk, r.b_pk)])
                if calibration.categories
                else {}
            )
        exact_score = self.calibration.policy.exact_score
        assessed: list[tuple[float | None, Tier | None]] = []
        for r in rows:
            fitted = calibration.for_pair(categories.get(r.a_pk), categories.get(r.b_pk))
            probability = float(fitted.probability(r.score)) if fitted is not None else None
            identical = shas.get(r.a_image_id) is not None and (
                shas.get(r.a_image_id) == shas.get(r.b_image_id)
            )
            exact = identical or r.score >= exact_score
            assessed.append((probability, self.calibration.tier(probability, exact)))
        return calibration.calibrated, assessed

    def assess_groups(
        self, groups: Sequence[DuplicateGroup]
    ) -> tuple[bool, list[tuple[float | None, Tier | None]]]:
        """(probability, tier) of each group's weakest member-to-centre pair, by the
        overall fit (a group may span categories)."""
        calibration = self.current_calibration()
        exact_score = self.calibration.policy.exact_score
        assessed: list[tuple[float | None, Tier | None]] = []
        for g in groups:
            fitted = calibration.overall
            probability = float(fitted.probability(g.min_score)) if fitted is not None else None
            assessed.append(
                (probability, self.calibration.tier(probability, g.min_score >= exact_score))
            )
        return calibration.calibrated, assessed

    def score_for_probability(self, min_probability: float) -> float | None:
        """The lowest score at which any of the model's fits reaches `min_probability`
        (pairs below it cannot qualify); None when none does. Raises NotCalibrated."""
        calibration = self.current_calibration()
        if not calibration.calibrated:
            raise NotCalibrated(
                f"No calibration yet for model {self.index.model_id}: "
                f"{calibration.labels} review decisions, "
                f"{self.calibration.policy.min_labels} needed (at least {MIN_PER_CLASS} "
                "of each kind). Review pairs, or filter by min_score."
            )
        found = [c.lowest_score_for(min_probability, self.floor) for c in calibration.all()]
        reachable = [s for s in found if s is not None]
        return min(reachable) if reachable else None

    def open_score_histogram(self, width: float = 0.005) -> list[tuple[float, float, int]]:
        """(from, to, undecided pairs) in score bins from the floor up: the review page's
        live count of what remains above any threshold."""
        with self.db.read() as session:
            scores = np.asarray(review_repo.open_pair_scores(session, self.floor))
        bins = max(1, int(np.ceil((1.0 - self.floor) / width - 1e-9)))
        edges = self.floor + width * np.arange(bins + 1)
        clipped = np.clip(scores, self.floor, 1.0)
        counts, _ = np.histogram(clipped, bins=bins, range=(edges[0], edges[-1]))
        return [
            (float(edges[i]), float(min(edges[i + 1], 1.0)), int(counts[i])) for i in range(bins)
        ]

    def audit_sample(
        self, size: int, strata: int = 10, where: LabelFilter | None = None
    ) -> list[repo.PairRow]:
        """Undecided pairs drawn at random from equal-width score strata between the floor
        and 1: decisions on them cover the whole score range, not only the queue's top,
        so the calibration is not fitted on the easiest pairs alone."""
        per = max(1, -(-size // strata))
        edges = np.linspace(self.floor, 1.0, strata + 1)
        found: list[repo.PairRow] = []
        with self.db.read() as session:
            for i in range(strata):
                high = float(edges[i + 1]) if i < strata - 1 else 1.1
                found.extend(
                    review_repo.random_open_pairs(session, float(edges[i]), high, per, where)
                )
        found.sort(key=lambda r: (-r.score, r.a_pk, r.b_pk))
        return found[:size] if len(found) > size else found

    # full scans -------------------------------------------------------------------------
    def scan(
        self,
        *,
        state_path: Path,
        floor: float | None = None,
        batch: int = 4096,
        resume: bool = True,
        progress: Callable[[int, int], None] | None = None,
        nprobe: int = 0,
        refine: int = 0,
    ) -> dict[str, Any]:
        """Recompute every pair with batched kNN over the index; resumable from `state_path`.

        A self-join in batches: each batch of the index's own vectors (read from its
        exact-vector file, in image-id order) is searched at once, and the strong matches
        are turned into pair rows with array operations against one image -> product map
        read at the start. `nprobe`/`refine` (0: the search's own, tuned values) trade
        speed for recall.

        The rows go into an unindexed staging table as the scan goes (binary COPY on
        PostgreSQL), written on a second thread while the next batch is searched. When the
        last batch is in, one transaction merges them into the pairs table, best row per
        pair, and removes the pairs the scan did not find again: GET /duplicates serves
        the previous scan's pairs until then, never a half-finished one.
        """
        floor = self.floor if floor is None else floor
        state = self._scan_state(state_path, floor) if resume else None
        if state is None:
            state = {
                "floor": floor,
                "started": utcnow().isoformat(),
                "after_id": 0,
                "done": 0,
                "staged": 0,
            }
            with self.db.write() as session:
                repo.clear_scan_pairs(session)
        started_at = datetime.fromisoformat(state["started"])
        t0 = time.perf_counter()
        index = self.index.index
        ids = np.sort(index.all_ids())
        with self.db.read() as session:
            owners = repo.image_product_arrays(session, self.index.model_id)
        total = len(ids)
        at = int(np.searchsorted(ids, int(state["after_id"]), side="right"))
        phases = dict.fromkeys(("read", "knn", "pairs", "write", "write_wait", "merge"), 0.0)

        def stage(rows: _PairArrays) -> None:
            t = time.perf_counter()
            with self.db.write() as session:
                repo.stage_scan_pairs(session, *rows)
            phases["write"] += time.perf_counter() - t  # with the commit

        def staged(future: Future[None], chunk: np.ndarray, rows: int) -> None:
            """Wait for a batch's rows to be committed, then record it as done."""
            t = time.perf_counter()
            future.result()
            phases["write_wait"] += time.perf_counter() - t
            state["after_id"], state["done"] = int(chunk[-1]), int(state["done"]) + len(chunk)
            state["staged"] = int(state["staged"]) + rows
            _write_state(state_path, state)
            if progress is not None:
                progress(int(state["done"]), total)

        # One writer thread: the database write of batch i overlaps the search of batch i+1.
        with ThreadPoolExecutor(1, thread_name_prefix="duplicates-scan-writer") as writer:
            pending: tuple[Future[None], np.ndarray, int] | None = None
            while at < total:
                chunk = ids[at : at + batch]
                t = time.perf_counter()
                queries = index.vectors.get(chunk)
                phases["read"] += time.perf_counter() - t
                t = time.perf_counter()
                scores, found = index.search(
                    queries, self.neighbours, nprobe=nprobe or None, refine=refine or None
                )
                phases["knn"] += time.perf_counter() - t
                t = time.perf_counter()
                rows = _pairs_of(chunk, scores, found, floor, owners)
                phases["pairs"] += time.perf_counter() - t
                if pending is not None:
                    staged(*pending)
                pending = (writer.submit(stage, rows), chunk, len(rows[0]))
                at += len(chunk)
            if pending is not None:
                staged(*pending)
        t = time.perf_counter()
        with self.db.write() as session:
            repo.merge_scan_pairs(session, utcnow())
            removed = repo.delete_pairs_found_before(session, started_at)
            pairs = repo.count_pairs(session)
        phases["merge"] = time.perf_counter() - t
        state_path.unlink(missing_ok=True)
        return {
            "images": int(state["done"]),
            "pairs": pairs,
            "pairs_staged": int(state["staged"]),
            "stale_pairs_removed": removed,
            "floor": floor,
            "seconds": round(time.perf_counter() - t0, 2),
            # where this run's time went: reading the batch's vectors, the kNN search
            # (re-ranking included), building the pair rows, staging them (on the writer
            # thread, overlapping the search), waiting for the writer, and the final merge
            "phases_s": {name: round(value, 1) for name, value in phases.items()},
        }

    def _scan_state(self, state_path: Path, floor: float) -> dict[str, Any] | None:
        """An interrupted scan's progress, if it can go on: same floor, and its staged
        rows are still there (a restored database starts the scan over)."""
        state = _read_state(state_path)
        if state is None or state.get("floor") != floor or "staged" not in state:
            return None
        with self.db.read() as session:
            if repo.count_scan_pairs(session) < int(state["staged"]):
                return None
        return state

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


SCAN_NPROBE = 16
SCAN_REFINE = 4
"""What `vsearch duplicates scan` probes and re-ranks by default: pairs sit far above
ordinary neighbours (floor 0.8-0.9), so far fewer lists and candidates than a search's
tuned ones find them. In dense clusters the PQ stage is what loses near-duplicates, not
the lists: at 1M, planted pairs found were 0.9906 with refine 2, 0.9947 with refine 4, and
0.9916 with nprobe 32 at refine 2 (docs/benchmarks.md)."""


_PairArrays = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]


def _pairs_of(
    image_ids: np.ndarray,
    scores: np.ndarray,
    found: np.ndarray,
    floor: float,
    owners: tuple[np.ndarray, np.ndarray],
) -> _PairArrays:
    """Pair rows `(a_pk, b_pk, score, a_image_id, b_image_id)` from a batch's kNN results,
    as arrays: other products only, the best image pair per product pair, `a_pk < b_pk`
    (the same rule as `_find_pairs`; pairs marked `different` are dropped at the merge)."""
    owner_ids, owner_pks = owners
    q, col = np.nonzero((scores >= floor) & (found >= 0))
    mine, theirs, score = image_ids[q], found[q, col], scores[q, col]

    def owner(image: np.ndarray) -> np.ndarray:
        pos = np.clip(np.searchsorted(owner_ids, image), 0, max(len(owner_ids) - 1, 0))
        known = (owner_ids[pos] == image) if len(owner_ids) else np.zeros(len(image), bool)
        return np.where(known, owner_pks[pos], -1)

    mine_pk, theirs_pk = owner(mine), owner(theirs)
    keep = (mine_pk >= 0) & (theirs_pk >= 0) & (mine_pk != theirs_pk)
    mine, theirs, score = mine[keep], theirs[keep], score[keep]
    mine_pk, theirs_pk = mine_pk[keep], theirs_pk[keep]
    a, b = np.minimum(mine_pk, theirs_pk), np.maximum(mine_pk, theirs_pk)
    a_img = np.where(a == mine_pk, mine, theirs)
    b_img = np.where(a == mine_pk, theirs, mine)
    order = np.lexsort((-score, b, a))  # by pair, best score first
    first = np.ones(len(order), bool)
    first[1:] = (a[order][1:] != a[order][:-1]) | (b[order][1:] != b[order][:-1])
    best = order[first]
    return (
        a[best].astype(np.int64),
        b[best].astype(np.int64),
        np.minimum(score[best], 1.0).astype(np.float64),
        a_img[best].astype(np.int64),
        b_img[best].astype(np.int64),
    )


def _pair_pks(session: Session, a: str, b: str, scope: Scope = None) -> tuple[int, int]:
    """The row ids of products `a` and `b`; 404 naming the first one that does not exist
    (or is outside `scope`)."""
    found = {x: repo.get_product(session, x) for x in (a, b)}
    if scope is not None:
        pks = [p.pk for p in found.values() if p is not None]
        sets = repo.sets_of(session, pks)
        found = {
            x: p if p is None or in_scope(sets[p.pk], scope) else None for x, p in found.items()
        }
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
