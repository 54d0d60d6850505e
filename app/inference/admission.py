"""Admission: the one place that decides whether the service takes more images now.

A request is admitted for all of its images at once, before anything is fetched or
decoded, and holds a `Ticket` for them until its embeddings are back. The worker only
queues images under a ticket, so an admitted request is never turned away halfway (after
it was fetched and decoded), and a refused one costs nothing but this check. The capacity
counts images in flight end to end (fetching, decoding, queued, in the forward pass),
which also bounds the memory that decoded images can take.
"""

from __future__ import annotations

import threading
from types import TracebackType

from app.core.errors import Overloaded


class Ticket:
    """Slots for `images` images, held from admission until released (use `with`)."""

    __slots__ = ("_admission", "images", "_released")

    def __init__(self, admission: Admission, images: int) -> None:
        self._admission = admission
        self.images = images
        self._released = False

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._admission._release(self.images)

    def __enter__(self) -> Ticket:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()


class Admission:
    """Bounded image slots shared by every caller (HTTP requests and CLI alike)."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError("capacity must be >= 1")
        self.capacity = capacity
        self._lock = threading.Lock()
        self._in_flight = 0
        self.rejected_images = 0
        self.rejected_requests = 0

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def admit(self, images: int) -> Ticket:
        """Reserve `images` slots, or raise `Overloaded` (503 with Retry-After) at once.

        A request larger than the whole capacity can never be admitted: it is refused with
        a message that says so rather than told to retry.
        """
        with self._lock:
            if images > self.capacity:
                self.rejected_images += images
                self.rejected_requests += 1
                raise Overloaded(
                    f"{images} images in one request exceed the service's capacity of "
                    f"{self.capacity} images in flight; send fewer images per request."
                )
            if self._in_flight + images > self.capacity:
                self.rejected_images += images
                self.rejected_requests += 1
                raise Overloaded(
                    f"The service has {self._in_flight} of {self.capacity} images in flight "
                    f"and cannot take {images} more now; retry shortly."
                )
            self._in_flight += images
        return Ticket(self, images)

    def _release(self, images: int) -> None:
        with self._lock:
            self._in_flight -= images
