"""Every network client of the operator is bounded, and S3 work is shared: the S3 client cache, the bucket check
cache, the lifecycle rule under concurrent writers (the real S3 API server), and the timeouts of S3, the
Kubernetes client, PostgreSQL and Redis against an endpoint that accepts connections and never answers."""

from __future__ import annotations

import threading
import time
import uuid
from pathlib import Path
from typing import Any

import botocore.exceptions
import psycopg
import pytest
import redis
import yaml
from kubernetes.client import Configuration

from runbook_operator import settings
from runbook_operator.clients import kube, s3
from runbook_operator.clients import postgres as pg
from runbook_operator.clients import redis as redis_client
from runbook_operator.errors import RunbookError
from runbook_operator.models.sources import S3Location
from runbook_operator.reconcilers import catalog
from tests.services import Postgres, S3Server
from tests.silent import SilentEndpoint

THREADS = 10


def location(s3_server: S3Server | SilentEndpoint, bucket: str = "bucket", prefix: str = "backups") -> S3Location:
    return S3Location(bucket=bucket, prefix=prefix, endpoint=s3_server.endpoint, server_side_encryption="None")


def new_bucket(s3_server: S3Server) -> str:
    name = f"bounds-{uuid.uuid4().hex[:10]}"
    s3_server.client().create_bucket(Bucket=name)
    return name


def rules_of(s3_server: S3Server, bucket: str) -> list[dict[str, Any]]:
    rules: list[dict[str, Any]] = s3_server.client().get_bucket_lifecycle_configuration(Bucket=bucket)["Rules"]
    return rules


class Counting:
    """A client that counts the calls made through it (and can run a hook after one)."""

    def __init__(self, client: Any) -> None:
        self.client, self.calls = client, []
        self.after: dict[str, Any] = {}

    def __getattr__(self, name: str) -> Any:
        method = getattr(self.client, name)
        if not callable(method) or name.startswith("_") or name == "exceptions":
            return method

        def call(*args: Any, **kwargs: Any) -> Any:
            self.calls.append(name)
            result = method(*args, **kwargs)
            hook = self.after.pop(name, None)
            if hook is not None:
                hook()
            return result

        return call


# --- the client cache -------------------------------------------------------------------------------------------


def test_one_client_per_endpoint_region_and_keys_never_keyed_by_the_secret(s3_server: S3Server) -> None:
    where = location(s3_server)
    first = s3.shared_client(where, "id", "secret-one")
    assert s3.shared_client(where, "id", "secret-one") is first
    assert s3.shared_client(where, "id", "secret-two") is not first
    assert s3.shared_client(where.model_copy(update={"region": "eu-west-1"}), "id", "secret-one") is not first
    assert (
        s3.shared_client(where.model_copy(update={"prefix": "other", "bucket": "other"}), "id", "secret-one") is first
    )
    for key in list(s3._clients):
        assert "secret-one" not in repr(key) and "secret-two" not in repr(key)
    assert s3.credentials_digest("id", "secret-one") != s3.credentials_digest("id", "secret-two")
    config = first.meta.config
    timeouts = s3.OPERATOR_TIMEOUTS
    assert (config.connect_timeout, config.read_timeout) == (timeouts.connect, timeouts.read)
    assert config.retries == {"total_max_attempts": timeouts.attempts, "mode": "standard"}


def test_the_cache_is_bounded_least_recently_used_first(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(s3, "CLIENT_CACHE_SIZE", 3)
    where = location(s3_server)
    kept = s3.shared_client(where, "id", "kept")
    for n in range(5):
        s3.shared_client(where, "id", f"key-{n}")
        assert s3.shared_client(where, "id", "kept") is kept  # used: stays
    assert len(s3._clients) == 3
    assert s3.shared_client(where, "id", "key-0") is not None and len(s3._clients) == 3


def test_threads_share_one_client(s3_server: S3Server) -> None:
    where = location(s3_server)
    made: list[Any] = []
    threads = [
        threading.Thread(target=lambda: made.append(s3.shared_client(where, "id", "shared-by-threads")))
        for _ in range(THREADS)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len({id(client) for client in made}) == 1


def test_operator_clients_pool_a_connection_per_worker(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RUNBOOK_MAX_WORKERS", "33")
    assert settings.connection_pool_size() == 33 + settings.POOL_HEADROOM
    client = catalog.s3_client(None, "ns", S3Location(bucket="pool-size", endpoint="http://127.0.0.1:1"), field="f")  # type: ignore[arg-type]
    assert client.meta.config.max_pool_connections == 33 + settings.POOL_HEADROOM


# --- the bucket check: cached, invalidated on failure ---------------------------------------------------------


def test_check_bucket_is_cached_for_its_ttl_and_forgotten_on_a_failure(
    s3_server: S3Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    bucket = new_bucket(s3_server)
    where = location(s3_server, bucket)
    client = Counting(s3.make_client(where, s3_server.access_key, s3_server.secret_key))
    catalog.check_bucket(client, where)  # type: ignore[arg-type]
    assert client.calls == [
        "head_bucket",
        "get_bucket_lifecycle_configuration",
        "put_bucket_lifecycle_configuration",
        "get_bucket_lifecycle_configuration",
    ]
    client.calls.clear()
    for _ in range(100):
        catalog.check_bucket(client, where)  # type: ignore[arg-type]
    assert client.calls == []
    catalog.check_bucket(client, location(s3_server, bucket, "other"))  # type: ignore[arg-type]
    assert client.calls.count("head_bucket") == 1  # another prefix: its own check

    client.calls.clear()
    catalog.s3_error(botocore.exceptions.EndpointConnectionError(endpoint_url=s3_server.endpoint), where)
    catalog.check_bucket(client, where)  # type: ignore[arg-type]
    assert client.calls == ["head_bucket", "get_bucket_lifecycle_configuration"]  # rechecked, the rule is there

    client.calls.clear()
    monkeypatch.setattr(catalog, "CHECK_TTL", 0.0)
    catalog.forget_bucket(where)
    catalog.check_bucket(client, where)  # type: ignore[arg-type]
    catalog.check_bucket(client, where)  # type: ignore[arg-type]
    assert client.calls.count("head_bucket") == 2  # a TTL of 0: expired at once

    s3_server.client().delete_bucket_lifecycle(Bucket=bucket)
    s3_server.client().delete_bucket(Bucket=bucket)
    with pytest.raises(RunbookError) as failed:
        catalog.check_bucket(client, where)  # type: ignore[arg-type]
    assert failed.value.reason == "BucketNotFound"


# --- the lifecycle rule under concurrency ---------------------------------------------------------------------


def test_ten_threads_ensuring_ten_prefixes_keep_ten_rules(s3_server: S3Server) -> None:
    bucket = new_bucket(s3_server)
    foreign = {"ID": "keep-me", "Filter": {"Prefix": "logs/"}, "Status": "Enabled", "Expiration": {"Days": 30}}
    s3_server.client().put_bucket_lifecycle_configuration(Bucket=bucket, LifecycleConfiguration={"Rules": [foreign]})
    clients = [s3.make_client(location(s3_server, bucket), f"id-{n}", "key") for n in range(THREADS)]  # 10 clients
    start = threading.Barrier(THREADS)
    errors: list[BaseException] = []

    def ensure(n: int) -> None:
        start.wait()
        try:
            s3.ensure_abort_incomplete_uploads(clients[n], location(s3_server, bucket, f"tenant-{n}"))
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=ensure, args=(n,)) for n in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    rules = rules_of(s3_server, bucket)
    assert sorted(r["Filter"]["Prefix"] for r in rules) == sorted(["logs/", *(f"tenant-{n}/" for n in range(THREADS))])
    assert foreign in rules


def test_without_the_bucket_lock_the_same_threads_lose_rules(
    s3_server: S3Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The test above can fail: with a lock per call instead of per bucket (the read-modify-write unguarded),
    the same ten threads lose rules."""
    bucket = new_bucket(s3_server)
    monkeypatch.setattr(s3, "_BUCKET_LOCKS", tuple(_FreshLock() for _ in range(1)))
    monkeypatch.setattr(s3, "LIFECYCLE_ATTEMPTS", 1)  # no repair: the race itself
    start = threading.Barrier(THREADS)
    client = s3.make_client(location(s3_server, bucket), "id", "key", pool_size=THREADS)
    original = client.get_bucket_lifecycle_configuration

    def slow_read(**kwargs: Any) -> Any:
        answer = original(**kwargs)
        time.sleep(0.2)  # every writer reads before any writes, as ten reconciles at once do
        return answer

    monkeypatch.setattr(client, "get_bucket_lifecycle_configuration", slow_read)

    def ensure(n: int) -> None:
        start.wait()
        s3.ensure_abort_incomplete_uploads(client, location(s3_server, bucket, f"tenant-{n}"))

    threads = [threading.Thread(target=ensure, args=(n,)) for n in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(rules_of(s3_server, bucket)) < THREADS


class _FreshLock:
    """A lock nobody else shares: no mutual exclusion at all."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def test_a_concurrent_writer_outside_the_process_is_detected_and_repaired(s3_server: S3Server) -> None:
    """Another process (a second operator sharding the cluster, a person) replaces the configuration between our
    PUT and the read that verifies it: the rule is written again, merged with what the other writer wrote."""
    bucket = new_bucket(s3_server)
    theirs = {"ID": "theirs", "Filter": {"Prefix": "theirs/"}, "Status": "Enabled", "Expiration": {"Days": 7}}
    client = Counting(s3.make_client(location(s3_server, bucket), s3_server.access_key, s3_server.secret_key))
    client.after["put_bucket_lifecycle_configuration"] = lambda: s3_server.client().put_bucket_lifecycle_configuration(
        Bucket=bucket, LifecycleConfiguration={"Rules": [theirs]}
    )
    assert s3.ensure_abort_incomplete_uploads(client, location(s3_server, bucket))  # type: ignore[arg-type]
    assert client.calls.count("put_bucket_lifecycle_configuration") == 2
    rules = rules_of(s3_server, bucket)
    assert theirs in rules and s3.abort_incomplete_uploads_rule(location(s3_server, bucket)) in rules
    client.calls.clear()
    assert not s3.ensure_abort_incomplete_uploads(client, location(s3_server, bucket))  # type: ignore[arg-type]
    assert client.calls == ["get_bucket_lifecycle_configuration"]  # in place: read only


# --- timeouts against an endpoint that never answers ------------------------------------------------------------

FAST = s3.Timeouts(connect=1.0, read=1.0, attempts=2)


def test_s3_timeout_is_a_runbook_error_naming_the_endpoint(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(s3, "OPERATOR_TIMEOUTS", FAST)
    with SilentEndpoint() as silent:
        where = location(silent, "stuck")
        client = s3.shared_client(where, "id", f"key-{uuid.uuid4().hex}")
        began = time.monotonic()
        with pytest.raises(RunbookError) as failed:
            catalog.check_bucket(client, where)
        took = time.monotonic() - began
    assert failed.value.reason == "S3Timeout"
    assert failed.value.message == (
        f"spec.destination.s3.endpoint: no answer from {silent.endpoint} within 1 s (2 attempts)"
    )
    assert silent.connections == FAST.attempts  # retried, and only that often
    assert FAST.attempts * FAST.read <= took < FAST.worst_case + 2


def test_worst_cases_as_documented() -> None:
    assert s3.OPERATOR_TIMEOUTS.worst_case == 2 * (5 + 10) + 1
    assert s3.TRANSFER_TIMEOUTS.worst_case == 4 * (10 + 60) + 1 + 2 + 4


def test_kubernetes_requests_without_a_timeout_get_one_and_a_read_is_not_retried(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(kube, "REQUEST_TIMEOUT", (1.0, 1.0))
    monkeypatch.setenv("RUNBOOK_MAX_WORKERS", "20")
    with SilentEndpoint() as silent:
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "c", "cluster": {"server": silent.endpoint}}],
            "users": [{"name": "u", "user": {"token": "t"}}],
            "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u"}}],
            "current-context": "x",
        }
        (tmp_path / "kubeconfig").write_text(yaml.safe_dump(config))
        monkeypatch.setenv("KUBECONFIG", str(tmp_path / "kubeconfig"))
        monkeypatch.setattr("kubernetes.config.kube_config.KUBE_CONFIG_DEFAULT_LOCATION", str(tmp_path / "kubeconfig"))
        kube.api_client.cache_clear()
        try:
            client = kube.api_client()
            assert client.rest_client.pool_manager.connection_pool_kw["maxsize"] == 20 + settings.POOL_HEADROOM
            began = time.monotonic()
            with pytest.raises(Exception) as failed:  # the library's own call, no _request_timeout given
                client.call_api("/api/v1/namespaces", "GET", auth_settings=["BearerToken"], _preload_content=False)
            took = time.monotonic() - began
        finally:
            kube.api_client.cache_clear()
    assert "timed out" in str(failed.value).lower()
    assert took < 5 and silent.connections == 1  # one read timeout, not retried


def test_kubernetes_retries_only_connections_never_made() -> None:
    retries = kube.RETRIES
    assert (retries.total, retries.connect, retries.read) == (2, 2, 0)
    assert Configuration().retries is None  # the library's default: urllib3's, 3 retries of every kind


def test_redis_command_to_a_silent_server_is_tried_twice_then_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(redis_client, "TIMEOUT", 1)
    with SilentEndpoint() as silent:
        client = redis_client.connect(
            host="127.0.0.1", port=silent.port, tls=None, material=None, user="default", password="x"
        )
        began = time.monotonic()
        with pytest.raises(redis.TimeoutError):
            client.ping()
        took = time.monotonic() - began
        client.close()
    assert silent.connections == 2 and took < 2 * (1 + 1) + 1 + 2


def test_postgres_connect_to_a_silent_server_gives_up(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pg, "CONNECT_TIMEOUT", 2)
    with SilentEndpoint() as silent:
        began = time.monotonic()
        with pytest.raises(psycopg.OperationalError):
            pg.connect(host="127.0.0.1", port=silent.port, database="d", user="u", password="p")
        took = time.monotonic() - began
    assert took < 2 + 2


def test_postgres_operator_sessions_have_statement_and_lock_timeouts(postgres: Postgres) -> None:
    def connect(limits: pg.SessionLimits | None) -> psycopg.Connection[Any]:
        return pg.connect(
            host=postgres.host,
            port=postgres.port,
            database="postgres",
            user=postgres.superuser,
            password=postgres.password,
            limits=limits,
        )

    with connect(None) as agent:  # the agents' sessions: no limit
        assert agent.execute("SHOW statement_timeout").fetchone() == ("0",)
        assert agent.info.get_parameters().get("tcp_user_timeout") == "30000"
    with connect(pg.OPERATOR_LIMITS) as operator:
        shown = [
            row[0]
            for name in ("statement_timeout", "lock_timeout", "idle_in_transaction_session_timeout")
            if (row := operator.execute(f"SHOW {name}").fetchone())
        ]
        assert shown == ["30s", "10s", "1min"]
    table = f"locked_{uuid.uuid4().hex[:6]}"
    quick = pg.SessionLimits(statement=30, lock=0.5, idle_in_transaction=60)
    with connect(None) as holder:
        holder.execute(f"CREATE TABLE {table} (id int)")
        with holder.transaction():
            holder.execute(f"LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE")
            with connect(quick) as waiter:
                began = time.monotonic()
                with pytest.raises(psycopg.errors.LockNotAvailable):
                    waiter.execute(f"ALTER TABLE {table} ADD COLUMN x int")
                assert time.monotonic() - began < 5
        holder.execute(f"DROP TABLE {table}")
