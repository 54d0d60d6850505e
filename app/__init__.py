"""Visual product search service."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

__version__ = "0.1.0"

# The AVX-512 subsets OpenBLAS's SkylakeX kernels use.
_SKYLAKEX_FLAGS = frozenset({"avx512f", "avx512dq", "avx512cd", "avx512bw", "avx512vl"})


def openblas_core(cpuinfo: str, environ: Mapping[str, str]) -> str | None:
    """The OpenBLAS kernel set to ask for, or None to leave OpenBLAS's own choice.

    faiss-cpu's wheel bundles OpenBLAS 0.3.15, which takes Intel CPUs newer than itself
    (e.g. a Xeon of family 6, model 207) for a Prescott and runs its SSE3 kernels: FAISS's
    matrix products (k-means training, exact and IVF-flat search, ground truth) ran at
    27.6 GFLOP/s there against 103.9 with `OPENBLAS_CORETYPE=SkylakeX`, side by side. On an
    Intel CPU with the AVX-512 subsets those kernels need, they are what OpenBLAS would
    pick if it knew the model. An operator's own `OPENBLAS_CORETYPE` wins; other vendors
    are left alone.
    """
    if "OPENBLAS_CORETYPE" in environ:
        return None
    vendor, flags = "", set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "vendor_id":
            vendor = value.strip()
        elif key.strip() == "flags":
            flags = set(value.split())
            break
    return "SkylakeX" if vendor == "GenuineIntel" and _SKYLAKEX_FLAGS <= flags else None


def _choose_openblas_core() -> None:
    """Set `OPENBLAS_CORETYPE` before any library loads OpenBLAS (it reads it once)."""
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux
        return
    core = openblas_core(cpuinfo, os.environ)
    if core is not None:
        os.environ["OPENBLAS_CORETYPE"] = core


_choose_openblas_core()
