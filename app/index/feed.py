"""What the index consumes: a change feed and a source of embeddings.

The index is a derived cache of whatever owns the embeddings. It knows nothing of tables,
transactions or SQL: it reads changes through a `ChangeFeed` (which image ids changed, in
order, after a position) and the current state through an `EmbeddingSource`, and persists
its position, a `Watermark`, in its manifest. The catalogue implements both over its
database (in the catalogue package); the index tests implement them in memory.

A change says only *which* image changed. The index then asks the source for that image's
current embedding (or learns it is gone), so applying a change twice, or out of order with
a direct apply, converges on the same state.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np


@dataclass(frozen=True)
class Watermark:
    """How far a feed has been applied; persisted in the index manifest.

    `seq`: the highest sequence number applied. For a feed whose writers commit in
    sequence order, every change at or below it is applied. `xmin`: for a feed whose
    transactions may commit out of sequence order (Postgres), every change written by a
    transaction older than `xmin` is applied; younger ones are read again until they are
    older than a later watermark's `xmin`.
    """

    seq: int = 0
    xmin: int = 0


@dataclass
class FeedCursor:
    """A reader's place in a change feed.

    `watermark` is what survives a restart. `pending` holds the changes already read
    above the watermark (sequence number -> the `xmin` past which the change is below
    every later watermark), so a feed that reads them again does not hand them out twice;
    losing it (a restart) only costs reapplying them, which is idempotent.
    """

    watermark: Watermark = field(default_factory=Watermark)
    pending: dict[int, int] = field(default_factory=dict)


@dataclass(frozen=True)
class Change:
    """One row of the feed: image `image_id` changed (added, re-embedded or deleted)."""

    seq: int
    image_id: int


class ChangeFeed(Protocol):
    """Changes to the embeddings, in order, from a position on."""

    def position(self) -> FeedCursor:
        """A cursor at the head of the feed, taken now.

        A reader that takes it and then reads the whole source (a rebuild) misses nothing
        by replaying from it afterwards: every change not yet visible when it was taken is
        after it.
        """
        ...

    def changes(self, cursor: FeedCursor, page_size: int) -> Iterator[list[Change]]:
        """The changes after `cursor`, in sequence order, a page at a time.

        Each page is handed out once the previous one was consumed (applied); `cursor`
        advances in place as pages are consumed and reaches its new watermark when the
        iterator is exhausted. A change written by a transaction that commits after
        younger ones have been read is still handed out once it is visible: it is never
        skipped. Stopping early (an exception while applying a page) leaves the cursor
        before the unapplied page.
        """
        ...

    def last_seq(self) -> int:
        """The sequence number of the newest change (the catch-up lag is measured to it)."""
        ...


class EmbeddingSource(Protocol):
    """The current embeddings, by image id, of one model's images (the source of truth)."""

    def current(self, image_ids: Sequence[int], model_id: str) -> dict[int, np.ndarray]:
        """The embedding of each of `image_ids` that exists under `model_id` now."""
        ...

    def pages(self, model_id: str, page_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """All embeddings of `model_id` as (ids int64, vectors float32) in image-id order."""
        ...

    def sample(self, size: int, model_id: str) -> np.ndarray:
        """About `size` embeddings of `model_id` spread over the catalogue (training)."""
        ...

    def count(self) -> int:
        """Images in the catalogue (an upper bound on those of any one model)."""
        ...
