# One image for the operator and for the backup/restore agent that its CronJobs and Jobs run.
# Build: `make image` (tools/image/image.py), or docker build -t ghcr.io/runbook-dev/runbook-operator:0.1.0 . (BuildKit)

FROM python:3.11-slim-bookworm AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY operator ./operator
# HTTPS to the package index trusts the system's CAs, or a bundle given as the build secret `ca-bundle`
# (`--secret id=ca-bundle,src=FILE`, e.g. behind a TLS-inspecting proxy): mounted for this step only, never in a layer.
RUN --mount=type=secret,id=ca-bundle \
    if [ -f /run/secrets/ca-bundle ]; then export PIP_CERT=/run/secrets/ca-bundle; fi; \
    pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11-slim-bookworm
# pg_dump/pg_restore, redis-cli and gpg are what the agent streams through; redis-server is the Redis restore's
# scratch server (in the Job's memory-backed volume); tini is PID 1 (below); nothing else is added.
RUN apt-get update \
 && apt-get install -y --no-install-recommends postgresql-client redis-tools redis-server gnupg ca-certificates tini \
 && rm -rf /var/lib/apt/lists/*
# The wheels are mounted from the build stage, not copied: no layer keeps them.
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --no-cache-dir --no-index --find-links /wheels runbook-operator
RUN groupadd --gid 10001 runbook && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /tmp runbook
USER 10001:10001
ENV HOME=/tmp GNUPGHOME=/tmp/gnupg PYTHONUNBUFFERED=1
# glibc gives each thread that allocates its own malloc arena (up to 8 per core), each keeping the memory it freed:
# two arenas hold the operator's peak during an evidence capture at 159 MiB instead of 187 (issue 14, measured by
# tests/integration/test_evidence_memory.py, which runs its capture with this file's ENV lines).
ENV MALLOC_ARENA_MAX=2
# tini as PID 1 reaps every orphan (a daemonized gpg-agent, a tool's stray child), which the operator or agent would
# leave as zombies, and forwards SIGTERM so shutdown stays graceful. Pods set only args, so it is always there.
ENTRYPOINT ["/usr/bin/tini", "--", "runbook-operator"]
CMD ["run"]
