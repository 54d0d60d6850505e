#!/usr/bin/env bash
# Set up .venv and start the service on the embedded defaults (SQLite and the index under
# ~/.local/share/vsearch, or VS_DATA_DIR).
# Extra arguments go to `vsearch serve` (e.g. --host 0.0.0.0 --port 8080).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
exec .venv/bin/vsearch serve "$@"
