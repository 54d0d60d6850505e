from __future__ import annotations

from pathlib import Path

import pytest

from app.core.files import atomic_write, atomic_write_text, scratch_directory


class TestAtomicWrite:
    def test_replaces_the_file_and_leaves_no_temporary(self, tmp_path: Path) -> None:
        target = tmp_path / "state.json"
        target.write_text("old")

        atomic_write_text(target, "new")

        assert target.read_text() == "new"
        assert [p.name for p in tmp_path.iterdir()] == ["state.json"]

    def test_a_failing_writer_leaves_the_old_file_whole(self, tmp_path: Path) -> None:
        target = tmp_path / "shard.faiss"
        target.write_bytes(b"complete old generation")

        def torn(tmp: Path) -> None:
            tmp.write_bytes(b"half")
            raise OSError("disk full")

        with pytest.raises(OSError, match="disk full"):
            atomic_write(target, torn)

        assert target.read_bytes() == b"complete old generation"
        assert [p.name for p in tmp_path.iterdir()] == ["shard.faiss"]

    def test_mode_is_set_whatever_the_writer_chose(self, tmp_path: Path) -> None:
        target = tmp_path / "model.safetensors"

        def private(tmp: Path) -> None:
            tmp.write_bytes(b"weights")
            tmp.chmod(0o600)

        atomic_write(target, private, mode=0o644)

        assert target.stat().st_mode & 0o777 == 0o644
        assert target.read_bytes() == b"weights"


def test_a_scratch_directory_goes_inside_a_parent_that_does_not_exist_yet(tmp_path: Path) -> None:
    parent = tmp_path / "bench" / "work"
    with scratch_directory(parent) as tmp:
        assert Path(tmp).parent == parent
        (Path(tmp) / "catalogue.db").write_text("x")
    assert parent.is_dir()
    assert list(parent.iterdir()) == []  # the scratch directory is removed on exit
