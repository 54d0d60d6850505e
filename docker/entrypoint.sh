#!/bin/sh
# Container entry point: `serve` waits for the database, migrates it, then serves;
# anything else is passed to the vsearch CLI (e.g. `ingest`, `reindex`, `duplicates scan`).
set -eu

if [ "${1:-serve}" = "serve" ]; then
  attempts=0
  until vsearch db upgrade; do
    attempts=$((attempts + 1))
    if [ "$attempts" -ge "${VS_DB_WAIT_ATTEMPTS:-30}" ]; then
      echo "database not reachable after $attempts attempts" >&2
      exit 1
    fi
    echo "waiting for the database ($attempts)..." >&2
    sleep 2
  done
  exec vsearch serve --host 0.0.0.0 --port "${PORT:-8000}"
fi
exec vsearch "$@"
