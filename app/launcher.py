"""The `vsearch` console script: choose the allocator first, then load the CLI.

Kept apart from `app.cli` so that a re-execution under tcmalloc (`app.core.allocator`)
happens before torch and the rest are imported, not after.
"""

from __future__ import annotations


def main() -> None:
    from app.core.allocator import reexec_with_tcmalloc

    reexec_with_tcmalloc()
    from app.cli import main as cli_main

    cli_main()
