"""The OpenBLAS kernel choice made at import (app/__init__.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from app import openblas_core

SKYLAKEX = "fpu sse2 avx2 avx512f avx512dq avx512cd avx512bw avx512vl avx512_bf16"


def cpuinfo(vendor: str, flags: str) -> str:
    return f"processor\t: 0\nvendor_id\t: {vendor}\ncpu family\t: 6\nflags\t\t: {flags}\n"


def test_an_intel_cpu_with_avx512_gets_the_skylakex_kernels() -> None:
    assert openblas_core(cpuinfo("GenuineIntel", SKYLAKEX), {}) == "SkylakeX"


@pytest.mark.parametrize(
    ("vendor", "flags", "environ"),
    [
        ("GenuineIntel", SKYLAKEX, {"OPENBLAS_CORETYPE": "Haswell"}),  # the operator's choice
        ("AuthenticAMD", SKYLAKEX, {}),  # other vendors: OpenBLAS's own choice
        ("GenuineIntel", "fpu sse2 avx2 avx512f", {}),  # not every subset the kernels use
    ],
    ids=["operator-choice", "amd", "partial-avx512"],
)
def test_otherwise_openblas_chooses(vendor: str, flags: str, environ: dict[str, str]) -> None:
    assert openblas_core(cpuinfo(vendor, flags), environ) is None


def test_faiss_runs_the_chosen_kernels_on_this_machine() -> None:
    """The real library: after `import app`, FAISS's bundled OpenBLAS reports the kernels
    chosen for this CPU (it reads the variable once, when it loads)."""
    chosen = openblas_core(Path("/proc/cpuinfo").read_text(), {})
    if chosen is None:
        pytest.skip("this CPU keeps OpenBLAS's own choice")
    probe = (
        "import app, faiss, ctypes, glob, os, sys\n"
        "libs = glob.glob(os.path.join(os.path.dirname(faiss.__file__), '..', "
        "'faiss_cpu.libs', 'libopenblas*'))\n"
        "if not libs: sys.exit(3)\n"
        "lib = ctypes.CDLL(libs[0])\n"
        "lib.openblas_get_corename.restype = ctypes.c_char_p\n"
        "print(lib.openblas_get_corename().decode())\n"
    )
    env = {"PATH": "/usr/bin:/bin"}
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, env=env, timeout=120
    )
    if result.returncode == 3:
        pytest.skip("this FAISS build does not bundle OpenBLAS")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == chosen
