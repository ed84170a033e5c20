#!/bin/sh
# redis-server on every address with its data in /data; REDIS_PASSWORD, when set, becomes requirepass through
# the configuration read from stdin, so it never shows on a command line. Arguments are passed on.
set -eu
exec redis-server - --bind '0.0.0.0 ::' --protected-mode no --dir /data "$@" <<CONF
${REDIS_PASSWORD:+requirepass $REDIS_PASSWORD}
CONF
