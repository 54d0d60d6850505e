"""The README is part of the product: its configuration table must match the code."""

from __future__ import annotations

from app.core.config import settings_markdown
from tests.conftest import REPO


def test_configuration_table_matches_the_settings_class() -> None:
    readme = (REPO / "README.md").read_text()
    block = readme.split("<!-- config-table:start -->", 1)[1].split("<!-- config-table:end -->")[0]
    assert block.strip() == settings_markdown().strip(), (
        "README configuration table is out of date: run `vsearch config --readme README.md`"
    )


def test_readme_commands_exist_and_are_executable() -> None:
    readme = (REPO / "README.md").read_text()
    for script in ("scripts/serve.sh", "scripts/test.sh"):
        assert f"./{script}" in readme
        path = REPO / script
        assert path.is_file()
        assert path.stat().st_mode & 0o111
    ci = (REPO / ".ci" / "run").read_text()
    assert "./scripts/test.sh" in ci
