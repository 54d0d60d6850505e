"""Change notifications on a real PostgreSQL: delivered on commit only, from other
processes only, and again after the listening connection is killed."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import psycopg
import pytest

from app.catalogue import repository as repo
from app.catalogue.notify import ChangeListener
from app.core.database import Database
from tests.conftest import new_postgres_database
from tests.postgres import PostgresServer

pytestmark = pytest.mark.postgres


class Wakes:
    def __init__(self) -> None:
        self.count = 0
        self.event = threading.Event()

    def __call__(self) -> None:
        self.count += 1
        self.event.set()

    def wait(self, timeout: float = 5) -> bool:
        heard = self.event.wait(timeout)
        self.event.clear()
        return heard


@pytest.fixture
def database_url(postgres_server: PostgresServer) -> str:
    return new_postgres_database(postgres_server)


@pytest.fixture
def listening(database_url: str) -> Iterator[tuple[Database, Wakes, ChangeListener]]:
    db = Database(database_url)
    wakes = Wakes()
    listener = ChangeListener(db, wakes, retry_s=0.2)
    listener.start()
    assert listener.wait_connected(10)
    assert wakes.wait()  # one wake on connecting: whatever committed before
    yield db, wakes, listener
    listener.stop()
    db.dispose()


def _log_change(db: Database, *, fail: bool = False) -> None:
    with db.write() as session:
        repo.log_changes(session, [1], repo.OP_UPSERT)
        if fail:
            raise RuntimeError("rolled back")


def test_another_process_commit_wakes_and_a_rollback_does_not(
    listening: tuple[Database, Wakes, ChangeListener], database_url: str
) -> None:
    _, wakes, _ = listening
    other = Database(database_url)  # another replica: its own application name
    try:
        with pytest.raises(RuntimeError):
            _log_change(other, fail=True)
        assert not wakes.wait(0.5)
        started = time.monotonic()
        _log_change(other)
        assert wakes.wait()
        assert time.monotonic() - started < 1
    finally:
        other.dispose()


def test_own_commits_are_not_announced(
    listening: tuple[Database, Wakes, ChangeListener],
) -> None:
    db, wakes, listener = listening
    _log_change(db)
    assert not wakes.wait(0.5)
    assert listener.received == 0


def test_the_listener_comes_back_after_its_connection_is_killed(
    listening: tuple[Database, Wakes, ChangeListener], database_url: str
) -> None:
    _, wakes, _ = listening
    with psycopg.connect(database_url.replace("+psycopg", ""), autocommit=True) as admin:
        killed = admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE query LIKE 'LISTEN%'"
        ).fetchall()
    assert killed == [(True,)]
    assert wakes.wait()  # reconnected: one wake for what it may have missed
    other = Database(database_url)
    try:
        _log_change(other)
        assert wakes.wait()
    finally:
        other.dispose()
