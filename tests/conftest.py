"""Fixtures for the real services every tier may use: PostgreSQL, Redis, the S3 API server, GnuPG."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.services import GpgKeyring, Postgres, Redis, RunbookRedis, S3Server

# The session's shared servers started so far (session fixtures are set up before a test's function-scoped
# ones): tests/integration/conftest.py's grant_test_services lets a test namespace reach them.
SHARED_SERVERS: list[Postgres | Redis | RunbookRedis | S3Server] = []


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--kubeconfig",
        default=None,
        help="run the integration tests against this cluster instead of a local control plane",
    )


@pytest.fixture(scope="session")
def postgres() -> Iterator[Postgres]:
    with Postgres() as server:
        SHARED_SERVERS.append(server)
        yield server


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Redis]:
    with Redis(tmp_path_factory.mktemp("redis")) as server:
        SHARED_SERVERS.append(server)
        yield server


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    with S3Server() as server:
        SHARED_SERVERS.append(server)
        yield server


@pytest.fixture(scope="session")
def gpg_keyring(tmp_path_factory: pytest.TempPathFactory) -> GpgKeyring:
    return GpgKeyring(tmp_path_factory.mktemp("gpg")).start()


@pytest.fixture(scope="session")
def runbook_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunbookRedis]:
    """A Redis as the runbook deploys it: TLS only, client certificates required, BGSAVE renamed."""
    with RunbookRedis(tmp_path_factory.mktemp("runbook-redis")) as server:
        SHARED_SERVERS.append(server)
        yield server
