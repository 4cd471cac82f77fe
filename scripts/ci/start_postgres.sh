#!/usr/bin/env bash
# Start a throwaway PostgreSQL server on 127.0.0.1 for megaloom's storage tests and print its
# SQLAlchemy URL on stdout (everything else goes to stderr).
#
# Installs PostgreSQL from Debian packages when it is missing (needs root and apt-get); reuses an
# installed one otherwise. The cluster lives in $MEGALOOM_PG_DIR (default /tmp/megaloom-postgres),
# listens on $MEGALOOM_PG_PORT (default 54329), trusts local connections, and is reused when
# already running, so the script is safe to run twice.
set -euo pipefail

PORT="${MEGALOOM_PG_PORT:-54329}"
DATA="${MEGALOOM_PG_DIR:-/tmp/megaloom-postgres}"
DB_USER=megaloom

log() { echo "start_postgres: $*" >&2; }

find_bin() {
  local dir
  dir="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)"
  if [[ -z "$dir" ]] && command -v initdb >/dev/null 2>&1; then
    dir="$(dirname "$(command -v initdb)")"
  fi
  echo "$dir"
}

BIN="$(find_bin)"
if [[ -z "$BIN" ]]; then
  if [[ $EUID -ne 0 ]] || ! command -v apt-get >/dev/null 2>&1; then
    log "PostgreSQL is not installed and cannot be installed here (needs root and apt-get)"
    exit 1
  fi
  log "installing PostgreSQL from Debian packages"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >&2
  apt-get install -y -qq --no-install-recommends postgresql >&2
  BIN="$(find_bin)"
  [[ -n "$BIN" ]] || { log "postgresql installed but initdb was not found"; exit 1; }
fi

# The server refuses to run as root: as root, run it as the 'postgres' system user.
as_owner() {
  if [[ $EUID -eq 0 ]]; then
    runuser -u postgres -- "$@"
  else
    "$@"
  fi
}

if as_owner "$BIN/pg_ctl" -D "$DATA" status >/dev/null 2>&1; then
  PORT="$(sed -n 4p "$DATA/postmaster.pid")"
  log "reusing the server already running in $DATA on port $PORT"
else
  if [[ ! -f "$DATA/PG_VERSION" ]]; then
    mkdir -p "$DATA"
    if [[ $EUID -eq 0 ]]; then chown postgres: "$DATA"; fi
    as_owner "$BIN/initdb" -D "$DATA" -U "$DB_USER" --auth=trust -E UTF8 >&2
  fi
  as_owner "$BIN/pg_ctl" -D "$DATA" -l "$DATA/server.log" -w -t 60 \
    -o "-c listen_addresses=127.0.0.1 -p $PORT -k $DATA" start >&2
  log "server started in $DATA on 127.0.0.1:$PORT"
fi

echo "postgresql+psycopg://$DB_USER@127.0.0.1:$PORT/postgres"
