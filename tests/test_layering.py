"""The package graph stays a DAG with one-way layers (docs/architecture.md)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_packages_import_only_lower_layers() -> None:
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "import_graph.py"), "--check"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout
    assert "cycles: 0" in result.stdout
    assert "layering violations: 0" in result.stdout
    assert "index       -> core\n" in result.stdout  # the index knows no database


def test_the_check_fails_on_an_upward_import(tmp_path: Path) -> None:
    app = tmp_path / "app"
    for package, body in {
        "core": "",
        "index": "from app.catalogue import repository\n",
        "catalogue": "from app.index import lifecycle\n",
    }.items():
        (app / package).mkdir(parents=True)
        (app / package / "__init__.py").write_text(body)
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "import_graph.py"), "--check", "--root", str(app)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 1
    assert "catalogue -> index -> catalogue" in result.stdout
    assert "index -> catalogue (layer 3 -> 4)" in result.stdout
