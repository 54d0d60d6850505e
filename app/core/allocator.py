"""Run `vsearch` under tcmalloc when the machine has it (`VS_ALLOCATOR`).

glibc's malloc hands the large, short-lived buffers of a CPU forward/backward pass back
to the kernel and faults them in again on the next step. Measured on the 2-core Xeon
machine of docs/benchmarks.md (EfficientNet-Lite0, fp32, a training step of 32 images at
224 px): 1.70-1.75 s per step with glibc (4.6-4.9 million page faults, 9-11 s of system
time in 19 steps) against 1.13-1.18 s under tcmalloc (0.8 million, 1.5 s). The allocator
has to be chosen before the process starts, so the console script re-executes itself
once with `LD_PRELOAD` set, as PyTorch's own CPU launcher (`torch.backends.xeon.run_cpu`)
does. `VS_ALLOCATOR=system` keeps glibc's; `auto` (the default) uses tcmalloc where
`libtcmalloc_minimal` (Debian: `libtcmalloc-minimal4`) or `libtcmalloc` is installed;
`tcmalloc` fails when it is not. The variable is taken out of the environment again
after the start, so programs the service starts (a PostgreSQL server in a benchmark,
for one) keep their own allocator.
"""

from __future__ import annotations

import ctypes.util
import os
import sys
from collections.abc import Mapping, MutableMapping, Sequence

ENV = "VS_ALLOCATOR"
MARK = "VS_ALLOCATOR_PRELOADED"
LIBRARIES = ("tcmalloc_minimal", "tcmalloc")
CHOICES = ("auto", "tcmalloc", "system")


def find_tcmalloc() -> str | None:
    """The shared library's name as the dynamic loader resolves it, if installed."""
    for name in LIBRARIES:
        found = ctypes.util.find_library(name)
        if found:
            return found
    return None


def preload_command(
    argv: Sequence[str], environ: Mapping[str, str], library: str | None
) -> tuple[list[str], dict[str, str]] | None:
    """The command and environment to re-execute with, or None to go on as is."""
    choice = environ.get(ENV, "auto").strip().lower() or "auto"
    if choice not in CHOICES:
        raise SystemExit(f"{ENV} must be one of {', '.join(CHOICES)}, not {choice!r}")
    if choice == "system" or environ.get(MARK) or not sys.platform.startswith("linux"):
        return None
    preloaded = environ.get("LD_PRELOAD", "")
    if "malloc" in preloaded:  # the caller chose an allocator (tcmalloc, jemalloc)
        return None
    if choice == "auto" and environ.get("VS_RUNTIME", "").strip().lower() == "openvino":
        return None  # OpenVINO aborts under a preloaded tcmalloc ("free(): invalid pointer")
    if library is None:
        if choice == "tcmalloc":
            raise SystemExit(f"{ENV}=tcmalloc, but no libtcmalloc is installed")
        return None
    env = dict(environ)
    env["LD_PRELOAD"] = f"{library} {preloaded}".strip()
    env[MARK] = library
    script = argv[0] if argv and os.access(argv[0], os.X_OK) else None
    command = [script, *argv[1:]] if script else [sys.executable, "-m", "app.cli", *argv[1:]]
    return command, env


def settle(environ: MutableMapping[str, str]) -> None:
    """After the re-execution: children of this process get the caller's environment back."""
    library = environ.pop(MARK, None)
    if not library:
        return
    rest = environ.get("LD_PRELOAD", "").replace(library, "", 1).strip()
    if rest:
        environ["LD_PRELOAD"] = rest
    else:
        environ.pop("LD_PRELOAD", None)


def current_allocator(maps: str = "/proc/self/maps") -> str:
    """`tcmalloc`, `jemalloc` or `system`: the malloc this process runs on."""
    try:
        with open(maps) as fh:
            text = fh.read()
    except OSError:
        return "system"
    for name in ("tcmalloc", "jemalloc"):
        if f"lib{name}" in text:
            return name
    return "system"


def reexec_with_tcmalloc() -> None:
    """Called first by the console script: re-executes it under tcmalloc where it applies."""
    planned = preload_command(sys.argv, os.environ, find_tcmalloc())
    if planned is None:
        settle(os.environ)
        return
    command, env = planned
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(command[0], command, env)
