"""The catalogue as the index's source: its change log as a `ChangeFeed` and its stored
embeddings as an `EmbeddingSource` (protocols of app/index/feed.py).

The change log gets a row per changed image in the same transaction as the change, with a
sequence number from the database. How far a reader may trust that order depends on the
database:

- SQLite serialises writers, so changes commit in sequence order: the watermark is the
  last sequence number applied (`SequenceFeed`).
- On Postgres a transaction can take a sequence number and commit after a later one. The
  watermark is therefore the snapshot xmin taken *before* reading: every transaction older
  than it has ended, and the rows of younger ones are read again on every catch-up (and
  handed out once, tracked in the cursor) until a later xmin passes them
  (`SnapshotFeed`). A row that commits late is thus read when it becomes visible, never
  skipped.

All SQL stays in app/catalogue/repository.py; this module only pages and converts.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np

from app.catalogue import repository as repo
from app.core.database import Database
from app.index.feed import Change, ChangeFeed, FeedCursor, Watermark


def _vector(blob: bytes) -> np.ndarray:
    return np.frombuffer(blob, dtype=np.float32)


class SequenceFeed:
    """The change log where writers commit in sequence order (SQLite)."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def position(self) -> FeedCursor:
        return FeedCursor(Watermark(seq=self.last_seq()))

    def last_seq(self) -> int:
        with self.db.read() as session:
            return repo.last_seq(session)

    def changes(self, cursor: FeedCursor, page_size: int) -> Iterator[list[Change]]:
        while True:
            with self.db.read() as session:
                rows = repo.changes_after_seq(session, cursor.watermark.seq, page_size)
            if not rows:
                return
            yield [Change(r.seq, r.image_id) for r in rows]
            cursor.watermark = Watermark(seq=rows[-1].seq)


class SnapshotFeed:
    """The change log where transactions commit out of sequence order (Postgres)."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def position(self) -> FeedCursor:
        with self.db.read() as session:
            return FeedCursor(
                Watermark(seq=repo.last_seq(session), xmin=repo.current_xmin(session))
            )

    def last_seq(self) -> int:
        with self.db.read() as session:
            return repo.last_seq(session)

    def changes(self, cursor: FeedCursor, page_size: int) -> Iterator[list[Change]]:
        start = cursor.watermark
        with self.db.read() as session:
            xmin = repo.current_xmin(session)  # before reading: see the module docstring
        after_seq, max_seq = 0, start.seq
        while True:
            with self.db.read() as session:
                rows = repo.changes_from_txid(session, start.xmin, after_seq, page_size)
            if not rows:
                break
            fresh = [r for r in rows if r.seq not in cursor.pending]
            if fresh:
                yield [Change(r.seq, r.image_id) for r in fresh]
                for r in fresh:
                    cursor.pending[r.seq] = r.txid or 0
            after_seq = rows[-1].seq
            max_seq = max(max_seq, after_seq)
        for seq in [s for s, txid in cursor.pending.items() if txid < xmin]:
            del cursor.pending[seq]
        cursor.watermark = Watermark(seq=max_seq, xmin=max(xmin, start.xmin))


def change_feed(db: Database) -> ChangeFeed:
    """The change log of `db` as the feed its database's commit order allows."""
    return SnapshotFeed(db) if db.is_postgres else SequenceFeed(db)


class CatalogueEmbeddings:
    """The embeddings stored with the catalogue's images."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def current(self, image_ids: Sequence[int], model_id: str) -> dict[int, np.ndarray]:
        with self.db.read() as session:
            found = repo.current_embeddings(session, image_ids, model_id)
        return {i: _vector(e) for i, e in found.items()}

    def pages(self, model_id: str, page_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        after_id = 0
        while True:
            with self.db.read() as session:
                page = repo.embeddings_page(session, after_id, page_size, model_id)
            if not page:
                return
            ids = np.asarray([i for i, _ in page], dtype=np.int64)
            yield ids, np.stack([_vector(e) for _, e in page])
            after_id = int(ids[-1])

    def sample(self, size: int, model_id: str) -> np.ndarray:
        with self.db.read() as session:
            rows = repo.embedding_sample(session, size, model_id)
        return np.stack([_vector(e) for e in rows])

    def count(self) -> int:
        with self.db.read() as session:
            return repo.count_images(session)
