#!/bin/sh
# Container entry point: `serve` waits for the database, migrates it, then serves;
# anything else is passed to the vsearch CLI (e.g. `ingest`, `reindex`, `duplicates scan`).
set -eu

# One log line on stderr, a JSON object when VS_LOG_FORMAT=json (as the service writes).
log() {
  level=$1
  shift
  if [ "${VS_LOG_FORMAT:-auto}" = "json" ]; then
    printf '{"ts": "%s", "level": "%s", "logger": "vsearch.entrypoint", "message": "%s"}\n' \
      "$(date -u +%Y-%m-%dT%H:%M:%S.000Z)" "$level" "$*" >&2
  else
    echo "$*" >&2
  fi
}

if [ "${1:-serve}" = "serve" ]; then
  attempts=0
  until vsearch db upgrade; do
    attempts=$((attempts + 1))
    if [ "$attempts" -ge "${VS_DB_WAIT_ATTEMPTS:-30}" ]; then
      log error "database not reachable after $attempts attempts"
      exit 1
    fi
    log warning "waiting for the database ($attempts)"
    sleep 2
  done
  exec vsearch serve --host 0.0.0.0 --port "${PORT:-8000}"
fi
exec vsearch "$@"
