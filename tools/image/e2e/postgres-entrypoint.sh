#!/bin/sh
# Initializes $PGDATA on first start (superuser $POSTGRES_USER with $POSTGRES_PASSWORD, scram-sha-256 from any
# address, optional database $POSTGRES_DB), then execs the server in the foreground. Only $PGDATA's parent
# (one volume, e.g. /var/lib/postgresql) needs to be writable: the data and the socket are there.
set -eu
user=${POSTGRES_USER:-postgres}
if [ ! -s "$PGDATA/PG_VERSION" ]; then
  : "${POSTGRES_PASSWORD:?POSTGRES_PASSWORD must be set to initialize $PGDATA}"
  printf '%s' "$POSTGRES_PASSWORD" | initdb -D "$PGDATA" -U "$user" --auth=scram-sha-256 --pwfile=/dev/stdin \
    --no-sync >/dev/null
  printf 'host all all 0.0.0.0/0 scram-sha-256\nhost all all ::/0 scram-sha-256\n' >>"$PGDATA/pg_hba.conf"
  printf 'host replication all 0.0.0.0/0 scram-sha-256\n' >>"$PGDATA/pg_hba.conf"
  if [ -n "${POSTGRES_DB:-}" ] && [ "$POSTGRES_DB" != postgres ]; then
    echo "CREATE DATABASE \"$POSTGRES_DB\" OWNER \"$user\"" | postgres --single -D "$PGDATA" -j postgres >/dev/null
  fi
  echo "postgres-entrypoint: initialized $PGDATA (superuser $user)"
fi
exec postgres -D "$PGDATA" -c listen_addresses='*' -c unix_socket_directories="${PGDATA%/*}" -c jit=off "$@"
