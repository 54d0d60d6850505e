#!/bin/sh
# TEST FIXTURE, not a deployment path. Builds local stand-ins for the two base images
# the stack uses, `python:3.11-slim-bookworm` and `postgres:16`, on machines where the
# registry cannot be reached. It is called by scripts/docker-smoke.sh only when an image
# is neither present nor pullable; machines that can pull the real images never run it.
#
# Both stand-ins are Debian bookworm made with debootstrap from this machine's configured
# Debian mirror (or VS_DEBIAN_MIRROR):
#   python:3.11-slim-bookworm  Debian's python3.11 + venv + pip, `python` on PATH;
#   postgres:16                Debian's PostgreSQL (15 on bookworm) behind a small
#                              entrypoint that honours POSTGRES_USER, POSTGRES_PASSWORD
#                              and POSTGRES_DB, with `pg_isready` on PATH.
# Usage: scripts/docker-standins.sh python|postgres   (needs root, debootstrap, docker)
set -eu

DOCKER=${DOCKER:-docker}
kind=${1:?usage: docker-standins.sh python|postgres}

# The first Debian mirror apt is configured with (deb822 .sources or one-line .list).
debian_mirror() {
  if [ -n "${VS_DEBIAN_MIRROR:-}" ]; then
    echo "$VS_DEBIAN_MIRROR"
    return
  fi
  for f in /etc/apt/sources.list.d/*.sources; do
    [ -f "$f" ] || continue
    uri=$(awk '/^URIs:/ { print $2; exit }' "$f")
    case "$uri" in */debian) echo "$uri"; return ;; esac
  done
  for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
    [ -f "$f" ] || continue
    uri=$(awk '$1 == "deb" && $2 ~ /\/debian\/?$/ { print $2; exit }' "$f")
    if [ -n "$uri" ]; then
      echo "$uri"
      return
    fi
  done
  echo "http://deb.debian.org/debian"
}

rootfs=$(mktemp -d "${TMPDIR:-/tmp}/vs-standin-$kind.XXXXXX")
trap 'rm -rf "$rootfs"' EXIT
mirror=$(debian_mirror)

case "$kind" in
  python)
    tag=python:3.11-slim-bookworm
    packages=python3.11,python3.11-venv,python3-pip,passwd,ca-certificates
    ;;
  postgres)
    tag=postgres:16
    packages=postgresql,passwd,util-linux
    ;;
  *)
    echo "unknown stand-in: $kind (python|postgres)" >&2
    exit 2
    ;;
esac

echo "building stand-in $tag with debootstrap from $mirror" >&2
debootstrap --variant=minbase --include="$packages" bookworm "$rootfs" "$mirror" >&2
rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/archives/*.deb

case "$kind" in
  python)
    ln -sf /usr/bin/python3.11 "$rootfs/usr/local/bin/python"
    ln -sf /usr/bin/python3.11 "$rootfs/usr/local/bin/python3"
    tar -C "$rootfs" -c . | "$DOCKER" import \
      -c 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
      -c 'ENV LANG=C.UTF-8' \
      -c 'CMD ["python3"]' \
      - "$tag" >&2
    ;;
  postgres)
    bindir=$(find "$rootfs/usr/lib/postgresql" -mindepth 2 -maxdepth 2 -name bin | head -n 1)
    for tool in "$bindir"/*; do
      ln -sf "${tool#"$rootfs"}" "$rootfs/usr/local/bin/$(basename "$tool")"
    done
    cat >"$rootfs/usr/local/bin/docker-entrypoint.sh" <<'EOF'
#!/bin/sh
# Stand-in for the postgres image's entrypoint (test fixture): initialise PGDATA once
# with POSTGRES_USER/POSTGRES_PASSWORD/POSTGRES_DB, then run the server as `postgres`.
set -eu
PGDATA=${PGDATA:-/var/lib/postgresql/data}
user=${POSTGRES_USER:-postgres}
db=${POSTGRES_DB:-$user}
mkdir -p "$PGDATA" /var/run/postgresql
chown -R postgres:postgres "$PGDATA" /var/run/postgresql
chmod 700 "$PGDATA"
if [ ! -s "$PGDATA/PG_VERSION" ]; then
  pwfile=$(mktemp)
  printf '%s\n' "${POSTGRES_PASSWORD:?POSTGRES_PASSWORD is required}" >"$pwfile"
  chown postgres "$pwfile"
  setpriv --reuid=postgres --regid=postgres --init-groups \
    initdb -D "$PGDATA" -U "$user" --pwfile="$pwfile" --auth-local=trust \
      --auth-host=scram-sha-256 >/dev/null
  rm -f "$pwfile"
  echo "listen_addresses = '*'" >>"$PGDATA/postgresql.conf"
  echo "host all all all scram-sha-256" >>"$PGDATA/pg_hba.conf"
  # The set-up server listens on a private socket only: pg_isready stays false until the
  # database exists and the real server is up.
  setpriv --reuid=postgres --regid=postgres --init-groups \
    pg_ctl -D "$PGDATA" -o "-c listen_addresses='' -c unix_socket_directories=/tmp" -w start >/dev/null
  if [ "$db" != "postgres" ]; then
    setpriv --reuid=postgres --regid=postgres --init-groups \
      psql -h /tmp -U "$user" -d postgres -v ON_ERROR_STOP=1 -c "CREATE DATABASE \"$db\"" >/dev/null
  fi
  setpriv --reuid=postgres --regid=postgres --init-groups \
    pg_ctl -D "$PGDATA" -m fast -w stop >/dev/null
fi
exec setpriv --reuid=postgres --regid=postgres --init-groups postgres -D "$PGDATA" "$@"
EOF
    chmod 755 "$rootfs/usr/local/bin/docker-entrypoint.sh"
    tar -C "$rootfs" -c . | "$DOCKER" import \
      -c 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
      -c 'ENV LANG=C.UTF-8 PGDATA=/var/lib/postgresql/data' \
      -c 'EXPOSE 5432' \
      -c 'ENTRYPOINT ["docker-entrypoint.sh"]' \
      - "$tag" >&2
    # `docker import` cannot set the stop signal; SIGINT is PostgreSQL's fast shutdown
    # (SIGTERM would wait for every client to disconnect), as in the real image.
    printf 'FROM %s\nSTOPSIGNAL SIGINT\n' "$tag" | "$DOCKER" build -q -t "$tag" - >&2
    ;;
esac
echo "stand-in $tag ready" >&2
