"""Settings that a newcomer meets first."""

from __future__ import annotations

from pathlib import Path

import pytest

from app.core.config import Settings


def test_the_data_directory_does_not_depend_on_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("VS_DATA_DIR", raising=False)
    monkeypatch.delenv("VS_DATABASE_URL", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    seen = set()
    for where in (tmp_path / "a", tmp_path / "b"):
        where.mkdir()
        monkeypatch.chdir(where)
        settings = Settings()
        seen.add((settings.data_dir, settings.resolved_database_url))
    assert seen == {
        (
            tmp_path / "home" / ".local/share/vsearch",
            f"sqlite:///{tmp_path / 'home' / '.local/share/vsearch/vsearch.db'}",
        )
    }


def test_a_relative_data_directory_is_made_absolute_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert Settings(data_dir=Path("store")).data_dir == tmp_path / "store"


def test_a_copied_settings_object_sees_its_new_database(tmp_path: Path) -> None:
    first = Settings(data_dir=tmp_path / "a")
    assert first.resolved_database_url.endswith("/a/vsearch.db")  # read before copying
    other = first.model_copy(update={"database_url": "sqlite:///elsewhere.db"})
    assert other.resolved_database_url == "sqlite:///elsewhere.db"
    moved = first.model_copy(update={"data_dir": tmp_path / "b"})
    assert moved.resolved_database_url.endswith("/b/vsearch.db")
