"""Crash-safe file replacement, the one way the service writes a file atomically.

A reader (or a restart after SIGKILL or power loss) sees either the old file or the complete
new one, never a torn one: the data is written to a temporary file in the same directory
(so the rename never crosses a filesystem), flushed and fsynced, renamed over the target,
and the directory fsynced so the rename itself is durable.
"""

from __future__ import annotations

import os
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path


def fsync_dir(path: Path) -> None:
    """Make a rename (or creation) of an entry in `path` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, write: Callable[[Path], object], *, mode: int | None = None) -> None:
    """Replace `path` with what `write(tmp)` writes to a temporary path next to it.

    `write` receives the temporary path (so libraries that write by file name, such as
    FAISS, torch or safetensors, can be used as they are). `mode`, when given, is set on
    the file before it replaces `path`, whatever the umask or the writing library chose.
    The temporary file is removed when `write` fails; the target is then left as it was.
    """
    # pid and thread in the name: two writers of the same file never share a temporary.
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    try:
        write(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_text(path: Path, text: str, *, mode: int | None = None) -> None:
    """`atomic_write` of a text file (UTF-8)."""
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"), mode=mode)


def scratch_directory(parent: Path | None) -> tempfile.TemporaryDirectory[str]:
    """A temporary directory inside `parent` (created first if missing), removed on exit;
    the system's temporary directory when `parent` is None."""
    if parent is not None:
        parent.mkdir(parents=True, exist_ok=True)
    return tempfile.TemporaryDirectory(dir=parent)
