"""A plain `pip install .` works outside the checkout: the migrations travel with the
package, and nothing depends on the working directory."""

from __future__ import annotations

import os
import site
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_installed_package_migrates_from_any_directory(tmp_path: Path) -> None:
    wheels = tmp_path / "wheels"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(wheels),
            str(REPO),
        ],
        check=True,
        timeout=600,
    )
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    wheel = next(wheels.glob("vsearch-*.whl"))
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
    # What the service reads from its own package at run time travels with it.
    for data in (
        "sample.jpg",
        "sample.LICENSE",
        "ui/templates/review.html",
        "ui/static/workbench.js",
    ):
        assert f"app/api/{data}" in names, data
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(venv / "bin" / "python"),
            "install",
            "-q",
            "--no-deps",
            str(wheel),
        ],
        check=True,
        timeout=600,
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("VS_")},
        # the dependencies come from the test environment; `app` from the new install
        "PYTHONPATH": os.pathsep.join(site.getsitepackages()),
        "VS_DATABASE_URL": f"sqlite:///{tmp_path / 'catalogue.db'}",
        "VS_DATA_DIR": str(tmp_path / "data"),
    }
    probe = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import app; print(app.__file__)"],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert probe.stdout.startswith(str(venv)), probe.stdout  # not the checkout
    result = subprocess.run(
        [str(venv / "bin" / "vsearch"), "db", "upgrade"],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "database schema at" in result.stderr
    assert not (elsewhere / "migrations").exists()
