#!/usr/bin/env bash
# Smoke test of the Docker image and the compose stack, as a new user would run them:
# builds the image from this checkout, starts the stack (service + PostgreSQL) on 127.0.0.1
# and a free port with a model made by the CLI, waits for healthy, ingests two product
# photos, finds one by search, stops the stack (clean exit within the grace period, index
# saved), starts it again, finds the product again, and checks the service's numeric uid.
# Prints the build time, the image size and the time to healthy. Leaves no container or
# volume behind (`down -v`); keeps the images, so a second run reuses the build cache.
#
#   scripts/docker-smoke.sh
#
# Environment (all optional):
#   DOCKER            docker CLI (default: docker)
#   COMPOSE           compose command (default: `docker compose`, else `docker-compose`)
#   SMOKE_IMAGE       tag to build (default: vsearch:smoke)
#   WHEELHOUSE_DIR    wheelhouse sent to the build (default: docker/wheels); filled with
#                     `pip download` when it holds no wheels, and always used, so the image
#                     builds with no package index (the air-gapped path)
#   TORCH_VARIANT     cpu|cuda (default: read from the wheelhouse's torch wheel)
#   SMOKE_NO_CACHE=1  build with --no-cache (an honest build time on a warm machine)
#   SMOKE_TIMEOUT     seconds to wait for healthy (default: 600)
#   SMOKE_REPLICAS    replicas behind the load balancer in the last step, profile
#                     `replicas` (default: 2; 0 skips the step)
#
# Base images: when python:3.11-slim-bookworm or postgres:16 is neither present nor
# pullable (a machine without registry access), scripts/docker-standins.sh builds a local
# stand-in with debootstrap (a test fixture: root, debootstrap and a Debian mirror needed).
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"

DOCKER=${DOCKER:-docker}
IMAGE=${SMOKE_IMAGE:-vsearch:smoke}
WHEELHOUSE_DIR=${WHEELHOUSE_DIR:-docker/wheels}
TIMEOUT=${SMOKE_TIMEOUT:-600}
if [ -z "${COMPOSE:-}" ]; then
  if $DOCKER compose version >/dev/null 2>&1; then
    COMPOSE="$DOCKER compose"
  else
    COMPOSE=docker-compose
  fi
fi
# A docker CLI without buildx refuses BuildKit builds: use the classic builder then.
if [ -z "${DOCKER_BUILDKIT:-}" ] && ! $DOCKER buildx version >/dev/null 2>&1; then
  export DOCKER_BUILDKIT=0
fi

say() { printf '[smoke] %s\n' "$*"; }
fail() {
  printf '[smoke] FAIL: %s\n' "$*" >&2
  exit 1
}

work=$(mktemp -d "${TMPDIR:-/tmp}/vsearch-smoke.XXXXXX")
project="vsearchsmoke$$"
compose() {
  # shellcheck disable=SC2086  # COMPOSE may be two words (`docker compose`)
  $COMPOSE -p "$project" -f "$repo/docker-compose.yml" "$@"
}
cleanup() {
  status=$?
  if [ "$status" -ne 0 ] && [ -n "$(compose ps -q 2>/dev/null)" ]; then
    say "logs of the failed run:"
    compose logs --no-color --tail=60 >&2 || true
  fi
  compose down -v --remove-orphans >/dev/null 2>&1 || true
  rm -rf "$work"
  exit "$status"
}
trap cleanup EXIT

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# 1. Base images: present, pulled, or (no registry) a local stand-in.
for base in python:3.11-slim-bookworm postgres:16; do
  if $DOCKER image inspect "$base" >/dev/null 2>&1; then
    continue
  fi
  if timeout 120 "$DOCKER" pull -q "$base" >/dev/null 2>&1; then
    say "pulled $base"
    continue
  fi
  say "$base cannot be pulled: building a local stand-in (test fixture)"
  started=$SECONDS
  DOCKER=$DOCKER "$repo/scripts/docker-standins.sh" "${base%%:*}" >"$work/standin.log" 2>&1 || {
    tail -n 40 "$work/standin.log" >&2
    fail "stand-in $base"
  }
  say "stand-in $base built in $((SECONDS - started))s"
done

# 2. The wheelhouse: every wheel the image needs, so the build needs no index.
if ! compgen -G "$WHEELHOUSE_DIR/*.whl" >/dev/null; then
  say "filling $WHEELHOUSE_DIR with pip download"
  python3 -m pip download --timeout 20 --retries 1 -d "$WHEELHOUSE_DIR" \
    ".[pretrained]" "setuptools>=68" wheel \
    --extra-index-url "${TORCH_INDEX:-https://download.pytorch.org/whl/cpu}" \
    >"$work/pip-download.log" 2>&1 || {
    tail -n 40 "$work/pip-download.log" >&2
    fail "pip download"
  }
fi
if [ "$(cd "$WHEELHOUSE_DIR" && pwd)" != "$repo/docker/wheels" ]; then
  mkdir -p docker/wheels
  cp -lf "$WHEELHOUSE_DIR"/*.whl docker/wheels/ 2>/dev/null || cp -f "$WHEELHOUSE_DIR"/*.whl docker/wheels/
fi
torch_wheel=$(compgen -G "docker/wheels/torch-*.whl" | head -n 1 || true)
[ -n "$torch_wheel" ] || fail "no torch wheel in docker/wheels"
if [ -z "${TORCH_VARIANT:-}" ]; then
  case "$torch_wheel" in
    *+cpu*) TORCH_VARIANT=cpu ;;
    *) TORCH_VARIANT=cuda ;;
  esac
fi
say "torch wheel: $(basename "$torch_wheel") -> TORCH_VARIANT=$TORCH_VARIANT"

# 3. Build.
build_args=(-f docker/Dockerfile --build-arg WHEELHOUSE=/wheels
  --build-arg "TORCH_VARIANT=$TORCH_VARIANT" -t "$IMAGE")
if [ "${SMOKE_NO_CACHE:-0}" = 1 ]; then
  build_args+=(--no-cache)
fi
started=$SECONDS
$DOCKER build "${build_args[@]}" . >"$work/build.log" 2>&1 || {
  tail -n 40 "$work/build.log" >&2
  fail "docker build"
}
build_s=$((SECONDS - started))
size_mb=$(($($DOCKER image inspect -f '{{.Size}}' "$IMAGE") / 1000000))
say "build time: ${build_s}s"
say "image size: ${size_mb} MB ($IMAGE, torch $TORCH_VARIANT)"

# 4. A model directory made by the CLI (in the image itself: no local install needed).
mkdir -p "$work/models"
$DOCKER run --rm --user "$(id -u):$(id -g)" -v "$work/models:/out" "$IMAGE" \
  model init-pretrained /out/trendyol >"$work/model.log" 2>&1 || {
  cat "$work/model.log" >&2
  fail "vsearch model init-pretrained"
}
# Stopgap until `model init-*` writes world-readable files: the service's uid (10001)
# must be able to read a model directory made by another user.
chmod -R a+rX "$work/models"

# 5. The stack, on 127.0.0.1 and a free port.
port=$(free_port)
key="smoke-$RANDOM$RANDOM"
export VS_API_KEYS=$key VSEARCH_PORT=$port VSEARCH_BIND=127.0.0.1 \
  VSEARCH_MODELS=$work/models VSEARCH_IMAGE=$IMAGE POSTGRES_PASSWORD="pg-$RANDOM$RANDOM"
base_url="http://127.0.0.1:$port"

wait_healthy() {
  local id health deadline=$((SECONDS + TIMEOUT))
  id=$(compose ps -q vsearch)
  [ -n "$id" ] || fail "no vsearch container"
  while [ $SECONDS -lt $deadline ]; do
    health=$($DOCKER inspect -f '{{.State.Health.Status}}' "$id" 2>/dev/null || echo gone)
    case "$health" in
      healthy) return 0 ;;
      gone) fail "the vsearch container disappeared" ;;
    esac
    if [ "$($DOCKER inspect -f '{{.RestartCount}}' "$id")" -gt 0 ]; then
      fail "the vsearch container restarted (crash loop)"
    fi
    sleep 2
  done
  fail "not healthy after ${TIMEOUT}s"
}

api() { # METHOD PATH [JSON-BODY-FILE]
  local args=(-sS --max-time 120 -X "$1" -H "X-API-Key: $key" -H 'Content-Type: application/json')
  [ $# -lt 3 ] || args+=(--data-binary "@$3")
  curl "${args[@]}" -o "$work/response.json" -w '%{http_code}' "$base_url$2"
}

photos=tests/fixtures/grocery
python3 - "$photos" >"$work/products.json" <<'PY'
import base64, json, pathlib, sys

photos = pathlib.Path(sys.argv[1])
products = [
    {"id": path.stem, "title": path.stem.replace("-", " "), "images": [
        {"data": base64.b64encode(path.read_bytes()).decode()}]}
    for path in sorted(photos.glob("*.jpg"))
]
print(json.dumps({"products": products}))
PY
python3 -c 'import base64, json, sys; print(json.dumps({"image": base64.b64encode(open(sys.argv[1], "rb").read()).decode(), "k": 2}))' \
  "$photos/oatly-natural-oatghurt.jpg" >"$work/query.json"

search_finds_oatly() {
  local code
  code=$(api POST /search "$work/query.json")
  [ "$code" = 200 ] || fail "search: HTTP $code $(cat "$work/response.json")"
  python3 - "$work/response.json" <<'PY'
import json, sys

hits = json.load(open(sys.argv[1]))["results"]
assert hits and hits[0]["id"] == "oatly-natural-oatghurt", hits
assert hits[0]["score"] > 0.99, hits
print(f"[smoke] search: top hit {hits[0]['id']} score {hits[0]['score']:.4f} of {len(hits)}")
PY
}

say "compose: $COMPOSE, project $project, API on $base_url"
started=$SECONDS
compose up -d --no-build >"$work/up.log" 2>&1 || {
  cat "$work/up.log" >&2
  fail "compose up"
}
wait_healthy
say "time to healthy: $((SECONDS - started))s"

code=$(api POST /products "$work/products.json")
[ "$code" = 200 ] || fail "ingest: HTTP $code $(cat "$work/response.json")"
python3 -c 'import json, sys; r = json.load(open(sys.argv[1]))["results"]; assert all(p["status"] == "created" for p in r), r; print(f"[smoke] ingested {len(r)} products")' \
  "$work/response.json"
search_finds_oatly

# 6. Run as a non-root numeric uid.
id=$(compose ps -q vsearch)
uid=$($DOCKER exec "$id" id -u)
user=$($DOCKER inspect -f '{{.Config.User}}' "$id")
[ "$uid" != 0 ] || fail "the service runs as root"
case "$user" in [0-9]*:[0-9]* | [0-9]*) ;; *) fail "USER is not numeric: '$user'" ;; esac
say "service uid: $uid (image USER $user)"

# 7. Stop (the graceful shutdown saves the index), start again, find it again.
started=$SECONDS
compose stop vsearch >/dev/null 2>&1
stop_s=$((SECONDS - started))
exit_code=$($DOCKER inspect -f '{{.State.ExitCode}}' "$id")
[ "$exit_code" = 0 ] || fail "the service exited with $exit_code on stop (137: killed after the grace period)"
$DOCKER logs "$id" 2>&1 | grep -q "saving the index" || fail "no 'saving the index' on stop"
say "stop: clean exit (code 0) in ${stop_s}s (grace period 60s), index saved"

started=$SECONDS
compose up -d --no-build >"$work/up.log" 2>&1 || {
  cat "$work/up.log" >&2
  fail "compose up (restart)"
}
wait_healthy
say "restart: healthy again in $((SECONDS - started))s"
search_finds_oatly

# 8. Profile `replicas`: N more replicas on the same database behind the load balancer.
# Every replica answers through it, each finds the catalogue, and a product written
# through the balancer (so on one replica) is found by the next searches (so on all).
replicas=${SMOKE_REPLICAS:-2}
if [ "$replicas" -gt 0 ]; then
  lb_port=$(free_port)
  export VSEARCH_LB_PORT=$lb_port VSEARCH_REPLICAS=$replicas
  if [ -z "${VSEARCH_LB_BASE:-}" ] && ! $DOCKER image inspect debian:bookworm-slim >/dev/null 2>&1 \
    && ! $DOCKER pull -q debian:bookworm-slim >/dev/null 2>&1; then
    export VSEARCH_LB_BASE=python:3.11-slim-bookworm # any bookworm image will do
  fi
  compose --profile replicas build lb >"$work/lb-build.log" 2>&1 || {
    cat "$work/lb-build.log" >&2
    fail "build of the load balancer"
  }
  started=$SECONDS
  compose --profile replicas up -d --no-build --scale "vsearch-replica=$replicas" \
    >"$work/up.log" 2>&1 || {
    cat "$work/up.log" >&2
    fail "compose up (profile replicas)"
  }
  base_url="http://127.0.0.1:$lb_port"
  deadline=$((SECONDS + TIMEOUT))
  until [ "$(curl -s -o /dev/null -w '%{http_code}' "$base_url/ready")" = 200 ]; do
    [ $SECONDS -lt $deadline ] || fail "the load balancer's /ready never answered 200"
    sleep 2
  done
  say "replicas: $replicas behind the load balancer on $base_url, ready in $((SECONDS - started))s"

  # N searches through the balancer; each must find `expected` first with score ~1.
  # Writes who answered how often to $work/served-by.
  through_balancer() { # PHOTO EXPECTED-ID BOX(x,y,w,h or -) N
    python3 - "$base_url" "$key" "$@" "$work/served-by" <<'PY'
import base64, json, sys, time, urllib.request

base, key, photo, expected, box, n, out = sys.argv[1:8]
query = {"image": base64.b64encode(open(photo, "rb").read()).decode(), "k": 1}
if box != "-":
    query["bbox"] = dict(zip("xywh", map(int, box.split(","))))
body = json.dumps(query).encode()
seen, worst = {}, 0.0
for _ in range(int(n)):
    request = urllib.request.Request(
        base + "/search", body, {"Content-Type": "application/json", "X-API-Key": key})
    started = time.perf_counter()
    with urllib.request.urlopen(request, timeout=60) as response:
        hits = json.load(response)["results"]
        replica = response.headers["X-Served-By"]
    worst = max(worst, time.perf_counter() - started)
    assert hits and hits[0]["id"] == expected and hits[0]["score"] > 0.99, (replica, hits)
    seen[replica] = seen.get(replica, 0) + 1
print(f"[smoke] {n} searches through the balancer found {expected} first; "
      f"served by {seen}, slowest {worst * 1000:.0f} ms")
open(out, "w").write(str(len(seen)))
PY
  }
  served_by_all() {
    [ "$(cat "$work/served-by")" -ge "$replicas" ] ||
      fail "only $(cat "$work/served-by") of $replicas replicas answered"
  }
  through_balancer "$photos/oatly-natural-oatghurt.jpg" oatly-natural-oatghurt - $((4 * replicas))
  served_by_all

  # A new product written through the balancer: a crop of a catalogued photo, so its
  # own embedding, which only the replica that took the write has computed.
  box=20,20,140,140
  python3 - "$photos/tropicana-apple-juice.jpg" "$box" >"$work/crop.json" <<'PY'
import base64, json, sys

x, y, w, h = map(int, sys.argv[2].split(","))
data = base64.b64encode(open(sys.argv[1], "rb").read()).decode()
image = {"data": data, "box": {"x": x, "y": y, "w": w, "h": h}}
print(json.dumps({"products": [{"id": "tropicana-crop", "images": [image]}]}))
PY
  code=$(api POST /products "$work/crop.json")
  [ "$code" = 200 ] || fail "ingest through the balancer: HTTP $code $(cat "$work/response.json")"
  sleep 1 # the catch-up poll's interval: notification normally brings it within ~0.1 s
  through_balancer "$photos/tropicana-apple-juice.jpg" tropicana-crop "$box" $((4 * replicas))
  served_by_all
  say "replicas converge: a write through the balancer is found on all $replicas"
fi
say "PASS"
