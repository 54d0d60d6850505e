"""`vsearch` re-executes itself under tcmalloc where installed (`VS_ALLOCATOR`)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from app.core.allocator import (
    MARK,
    current_allocator,
    find_tcmalloc,
    preload_command,
    settle,
)

SCRIPT = Path(sys.executable).with_name("vsearch")


def test_auto_preloads_the_library_once_and_keeps_the_callers_preload() -> None:
    planned = preload_command(
        [str(SCRIPT), "train", "--help"], {"LD_PRELOAD": "libother.so"}, "libtcmalloc.so.4"
    )
    assert planned is not None
    command, env = planned
    assert command == [str(SCRIPT), "train", "--help"]
    assert env["LD_PRELOAD"] == "libtcmalloc.so.4 libother.so"
    # The re-executed process does not re-execute again, and its children get the
    # caller's environment back.
    assert preload_command(command, env, "libtcmalloc.so.4") is None
    settle(env)
    assert env["LD_PRELOAD"] == "libother.so"
    assert MARK not in env


def test_system_an_allocator_already_chosen_or_none_installed_go_on_as_is() -> None:
    argv = [str(SCRIPT), "serve"]
    assert preload_command(argv, {"VS_ALLOCATOR": "system"}, "libtcmalloc.so.4") is None
    assert preload_command(argv, {"LD_PRELOAD": "/x/libjemalloc.so.2"}, "libtcmalloc.so.4") is None
    assert preload_command(argv, {}, None) is None
    with pytest.raises(SystemExit, match="no libtcmalloc"):
        preload_command(argv, {"VS_ALLOCATOR": "tcmalloc"}, None)
    with pytest.raises(SystemExit, match="must be one of"):
        preload_command(argv, {"VS_ALLOCATOR": "mimalloc"}, None)


def test_a_script_that_is_not_executable_runs_as_a_module() -> None:
    planned = preload_command(["vsearch-not-here", "eval"], {}, "libtcmalloc.so.4")
    assert planned is not None
    assert planned[0] == [sys.executable, "-m", "app.cli", "eval"]


def test_the_allocator_is_read_from_the_process_maps(tmp_path: Path) -> None:
    maps = tmp_path / "maps"
    maps.write_text("7f00-7f01 r-xp 0 08:01 1 /usr/lib/libtcmalloc_minimal.so.4.5.10\n")
    assert current_allocator(str(maps)) == "tcmalloc"
    maps.write_text("7f00-7f01 r-xp 0 08:01 1 /usr/lib/libc.so.6\n")
    assert current_allocator(str(maps)) == "system"
    assert current_allocator(str(tmp_path / "absent")) == "system"


@pytest.mark.skipif(find_tcmalloc() is None, reason="libtcmalloc is not installed")
def test_a_script_re_executes_under_tcmalloc_and_its_children_do_not(tmp_path: Path) -> None:
    # A script of its own that starts as `vsearch` does (app/launcher.py).
    probe = (
        "import os, sys;"
        "from app.core.allocator import reexec_with_tcmalloc, current_allocator;"
        "sys.argv = [sys.argv[0]];"
        "reexec_with_tcmalloc();"
        "print(current_allocator(), os.environ.get('LD_PRELOAD', ''), flush=True)"
    )
    base = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", MARK)}
    script = tmp_path / "probe"
    script.write_text(f"#!{sys.executable}\n{probe.replace(';', chr(10))}\n")
    script.chmod(0o755)
    started = time.perf_counter()
    out = subprocess.run([str(script)], env=base, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    allocator, preload = (out.stdout.split() + [""])[:2]
    assert allocator == "tcmalloc"
    assert preload == ""  # not handed on to what the process starts
    out = subprocess.run(
        [str(script)], env={**base, "VS_ALLOCATOR": "system"}, capture_output=True, text=True
    )
    assert out.stdout.split()[0] == "system"
    assert time.perf_counter() - started < 60


def test_the_console_script_starts_with_the_allocator() -> None:
    import tomllib

    pyproject = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())
    assert pyproject["project"]["scripts"]["vsearch"] == "app.launcher:main"


def test_openvino_runtime_keeps_the_system_allocator() -> None:
    """OpenVINO aborts under a preloaded tcmalloc, so `auto` leaves it out for it."""
    argv = ["vsearch", "serve"]
    assert preload_command(argv, {"VS_RUNTIME": "openvino"}, "libtcmalloc.so.4") is None
    assert preload_command(argv, {"VS_RUNTIME": "torch"}, "libtcmalloc.so.4") is not None
    forced = {"VS_RUNTIME": "openvino", "VS_ALLOCATOR": "tcmalloc"}
    assert preload_command(argv, forced, "libtcmalloc.so.4") is not None
