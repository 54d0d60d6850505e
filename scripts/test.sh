#!/usr/bin/env bash
# Set up .venv and run the checks and the whole test suite. The Postgres tests start a
# throwaway server when PostgreSQL's binaries are installed (see README). Extra
# arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
.venv/bin/ruff check app tests
.venv/bin/ruff format --check app tests
.venv/bin/mypy
exec .venv/bin/python -m pytest "$@"
