"""Change notifications between replicas (PostgreSQL LISTEN/NOTIFY).

Every transaction that writes change-log rows on Postgres also notifies a channel (see
`repository.log_changes`); Postgres delivers the notification when the transaction
commits. `ChangeListener` holds one dedicated connection subscribed to that channel and
calls `on_change` for each notification of another process, so a replica's index
catches up within milliseconds of another replica's commit instead of at its next poll.
A process's own notifications are ignored: it publishes its own changes to its index
directly after commit, and a catch-up woken in between would only do that work twice.

The notification only says "something changed": what changed is still read from the
change log, so a lost notification (the listener reconnecting, the server restarting)
costs latency, never correctness, and the periodic catch-up remains the safety net.
SQLite has no such channel; there the periodic catch-up is the only path.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import psycopg

from app.catalogue import repository as repo
from app.core.database import Database

LOG = logging.getLogger(__name__)


class ChangeListener:
    """A background thread that turns change-log notifications into `on_change()` calls.

    Args:
        db: the catalogue database (must be Postgres); its URL is reused for one extra
            connection outside the pool, held for the listener's lifetime.
        on_change: called on the listener thread once per notification sent by another
            process, and once after every (re)connection (notifications sent while
            disconnected are lost).
        retry_s: wait between reconnection attempts.
    """

    def __init__(
        self, db: Database, on_change: Callable[[], None], *, retry_s: float = 1.0
    ) -> None:
        if not db.is_postgres:
            raise ValueError("change notifications need PostgreSQL")
        url = db.engine.url.set(drivername="postgresql")
        self._conninfo = url.render_as_string(hide_password=False)
        self._on_change = on_change
        self._own = db.application_name
        self._retry_s = retry_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._connected = threading.Event()
        self.received = 0

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._run, name="vs-change-listener", daemon=True
            )
            self._thread.start()

    def wait_connected(self, timeout: float) -> bool:
        """Whether the listener is subscribed (tests and start-up logs)."""
        return self._connected.wait(timeout)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._listen()
            except psycopg.Error as exc:
                self._connected.clear()
                LOG.warning(
                    "change notifications lost (%s); reconnecting in %.0fs, polling meanwhile",
                    str(exc).strip() or type(exc).__name__,
                    self._retry_s,
                )
            except Exception:  # noqa: BLE001 - a broken callback must not end the thread
                self._connected.clear()
                LOG.exception("change listener failed; restarting it")
            self._stop.wait(self._retry_s)

    def _listen(self) -> None:
        with psycopg.connect(self._conninfo, autocommit=True, connect_timeout=5) as conn:
            repo.listen_for_changes(conn)
            self._connected.set()
            LOG.info("listening for catalogue changes (%s)", repo.CHANGE_CHANNEL)
            self._on_change()  # whatever committed before the subscription
            while not self._stop.is_set():
                # A short timeout bounds how long stop() waits for the thread.
                for notification in conn.notifies(timeout=0.5):
                    if notification.payload == self._own:
                        continue
                    self.received += 1
                    self._on_change()
