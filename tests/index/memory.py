"""A catalogue in memory: an `EmbeddingSource` and a `ChangeFeed` without a database.

Like a database with concurrent writers, a transaction takes the sequence numbers of its
changes when it writes them and makes them visible when it commits, so changes can commit
out of sequence order. The feed is a third implementation of the protocol (besides the
catalogue's SQLite and Postgres feeds): its watermark is the highest sequence number
below which every change has committed, and the changes above it that were already handed
out are remembered in the cursor.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence

import numpy as np

from app.index.feed import Change, FeedCursor, Watermark


class MemoryCatalogue:
    """Embeddings of one model by image id, and the log of their changes."""

    def __init__(self, model_id: str) -> None:
        self.model_id = model_id
        self._lock = threading.Lock()
        self._vectors: dict[int, np.ndarray] = {}
        self._log: dict[int, int] = {}  # committed changes: seq -> image id
        self._in_flight: set[int] = set()  # seqs taken by transactions not yet committed
        self._next_seq = 1
        self.reads = 0  # pages of changes handed out

    def transaction(self) -> Transaction:
        return Transaction(self)

    def write(
        self, upserts: dict[int, np.ndarray] | None = None, deletes: Sequence[int] = ()
    ) -> None:
        """One committed transaction."""
        tx = self.transaction()
        for image_id, vector in (upserts or {}).items():
            tx.upsert(image_id, vector)
        for image_id in deletes:
            tx.delete(image_id)
        tx.commit()

    def _take_seq(self) -> int:
        with self._lock:
            seq = self._next_seq
            self._next_seq += 1
            self._in_flight.add(seq)
            return seq

    def _commit(self, changes: list[tuple[int, int, np.ndarray | None]]) -> None:
        with self._lock:
            for seq, image_id, vector in changes:
                if vector is None:
                    self._vectors.pop(image_id, None)
                else:
                    self._vectors[image_id] = vector
                self._log[seq] = image_id
                self._in_flight.discard(seq)

    def _floor(self) -> int:
        """Every change at or below this sequence number has committed."""
        return min(self._in_flight) - 1 if self._in_flight else self._next_seq - 1

    # ChangeFeed ---------------------------------------------------------------------------
    def position(self) -> FeedCursor:
        with self._lock:
            return FeedCursor(Watermark(seq=self._floor()))

    def last_seq(self) -> int:
        with self._lock:
            return self._next_seq - 1

    def changes(self, cursor: FeedCursor, page_size: int) -> Iterator[list[Change]]:
        with self._lock:
            floor = self._floor()  # before reading, like a snapshot's xmin
        after = cursor.watermark.seq
        while True:
            with self._lock:
                visible = sorted(s for s in self._log if s > after)[:page_size]
                page = [Change(s, self._log[s]) for s in visible if s not in cursor.pending]
            if not visible:
                break
            if page:
                self.reads += 1
                yield page
                for change in page:
                    cursor.pending[change.seq] = change.seq
            after = visible[-1]
        watermark = max(cursor.watermark.seq, floor)
        for seq in [s for s in cursor.pending if s <= watermark]:
            del cursor.pending[seq]
        cursor.watermark = Watermark(seq=watermark)

    # EmbeddingSource ----------------------------------------------------------------------
    def current(self, image_ids: Sequence[int], model_id: str) -> dict[int, np.ndarray]:
        with self._lock:
            if model_id != self.model_id:
                return {}
            return {i: self._vectors[i] for i in image_ids if i in self._vectors}

    def pages(self, model_id: str, page_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        with self._lock:
            ids = sorted(self._vectors) if model_id == self.model_id else []
        for start in range(0, len(ids), page_size):
            with self._lock:
                chunk = [i for i in ids[start : start + page_size] if i in self._vectors]
                vectors = [self._vectors[i] for i in chunk]
            if chunk:
                yield np.asarray(chunk, dtype=np.int64), np.stack(vectors)

    def sample(self, size: int, model_id: str) -> np.ndarray:
        with self._lock:
            vectors = list(self._vectors.values())
        step = max(1, len(vectors) // max(size, 1))
        return np.stack(vectors[::step][:size])

    def count(self) -> int:
        with self._lock:
            return len(self._vectors)

    @property
    def image_ids(self) -> list[int]:
        with self._lock:
            return sorted(self._vectors)


class Transaction:
    """Changes that take their sequence numbers now and become visible on `commit`."""

    def __init__(self, catalogue: MemoryCatalogue) -> None:
        self.catalogue = catalogue
        self._changes: list[tuple[int, int, np.ndarray | None]] = []

    def upsert(self, image_id: int, vector: np.ndarray) -> None:
        vector = np.asarray(vector, dtype=np.float32)
        self._changes.append((self.catalogue._take_seq(), image_id, vector))

    def delete(self, image_id: int) -> None:
        self._changes.append((self.catalogue._take_seq(), image_id, None))

    def commit(self) -> None:
        self.catalogue._commit(self._changes)
