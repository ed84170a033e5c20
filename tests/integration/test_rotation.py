"""SecretRotation against a real API server (Deployments rolled by the controller onto kwok nodes), a real
PostgreSQL (log_statement = all) and a real Redis."""

from __future__ import annotations

import base64
import json
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import kopf.testing
import kubernetes
import psycopg
import pytest
import redis
from prometheus_client import REGISTRY
from tests.integration.conftest import grant
from tests.services import CertificateAuthority, Postgres, Redis, RunbookRedis, free_port

from runbook_operator.builders.rotation import ROTATION_ID, fingerprint, pending_secret_name
from runbook_operator.clients.postgres import set_password
from runbook_operator.models.rotation import RotationStep
from runbook_operator.reconcilers import rotation as rotation_reconciler
from runbook_operator.reconcilers.rotation import CRASH_AFTER_ENV

GROUP, VERSION, PLURAL = "runbook.dev", "v1alpha1", "secretrotations"
SECRET = "db-credentials"
ADMIN = "postgres-admin"
WaitFor = Callable[..., Any]
# The fake nodes' lease heartbeat is not under test: a control plane whose node lifecycle controller has
# tainted them not-ready (a lapsed kwok lease) still schedules these pods, which kwok then runs and readies.
NODE_NOT_READY = [{"key": "node.kubernetes.io/not-ready", "operator": "Exists", "effect": "NoSchedule"}]
STEPS = tuple(RotationStep)


def b64(value: str) -> str:
    return base64.b64encode(value.encode()).decode()


class Cluster:
    """API handles and helpers for one test namespace."""

    def __init__(self, api: kubernetes.client.ApiClient, namespace: str, wait_for: WaitFor) -> None:
        self.api, self.namespace, self.wait_for = api, namespace, wait_for
        self.core = kubernetes.client.CoreV1Api(api)
        self.apps = kubernetes.client.AppsV1Api(api)
        self.custom = kubernetes.client.CustomObjectsApi(api)

    def create_secret(self, name: str, data: dict[str, str]) -> None:
        body = {"metadata": {"name": name}, "data": {k: b64(v) for k, v in data.items()}}
        self.core.create_namespaced_secret(self.namespace, body)

    def secret(self, name: str = SECRET) -> dict[str, str] | None:
        try:
            secret = self.core.read_namespaced_secret(name, self.namespace)
        except kubernetes.client.ApiException as error:
            if error.status == 404:
                return None
            raise
        return {k: base64.b64decode(v).decode() for k, v in (secret.data or {}).items()}

    def pending(self, name: str) -> dict[str, str] | None:
        return self.secret(pending_secret_name(name))

    def create_deployment(self, name: str, replicas: int = 1, schedulable: bool = True) -> None:
        labels = {"app": name}
        pod_spec: dict[str, Any] = {
            "containers": [{"name": "app", "image": "registry.invalid/app:1"}],
            "tolerations": NODE_NOT_READY,
        }
        if not schedulable:
            pod_spec["nodeSelector"] = {"runbook.dev/no-such-node": "true"}
        self.apps.create_namespaced_deployment(
            self.namespace,
            {
                "metadata": {"name": name, "labels": labels},
                "spec": {
                    "replicas": replicas,
                    "selector": {"matchLabels": labels},
                    "template": {"metadata": {"labels": labels}, "spec": pod_spec},
                },
            },
        )

    def create_stateful_set(self, name: str) -> None:
        labels = {"app": name}
        self.apps.create_namespaced_stateful_set(
            self.namespace,
            {
                "metadata": {"name": name, "labels": labels},
                "spec": {
                    "replicas": 1,
                    "serviceName": name,
                    "selector": {"matchLabels": labels},
                    "template": {
                        "metadata": {"labels": labels},
                        "spec": {
                            "containers": [{"name": "db", "image": "registry.invalid/db:1"}],
                            "tolerations": NODE_NOT_READY,
                        },
                    },
                },
            },
        )

    def wait_available(self, name: str) -> None:
        def available() -> bool:
            d = self.apps.read_namespaced_deployment(name, self.namespace)
            return (d.status.available_replicas or 0) == d.spec.replicas

        self.wait_for(available, timeout=60, what=f"Deployment {name} to become available")

    def create_rotation(self, name: str, spec: dict[str, Any]) -> None:
        body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "SecretRotation", "metadata": {"name": name}, "spec": spec}
        self.custom.create_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, body)

    def rotation(self, name: str) -> dict[str, Any]:
        obj: dict[str, Any] = self.custom.get_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, name)
        return obj

    def patch_spec(self, name: str, spec: dict[str, Any]) -> None:
        self.custom.patch_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, name, {"spec": spec})

    def condition(self, name: str, type: str) -> dict[str, Any]:
        conditions = self.rotation(name).get("status", {}).get("conditions", [])
        return next((c for c in conditions if c["type"] == type), {})

    def wait_rotated(self, name: str, token: str, timeout: float = 90) -> dict[str, Any]:
        def done() -> dict[str, Any] | None:
            status: dict[str, Any] = self.rotation(name).get("status", {})
            finished = status.get("step") == "Done" and status.get("phase") != "Rotating"
            return status if finished and status.get("rotateNow") == token else None

        result: dict[str, Any] = self.wait_for(done, timeout=timeout, what=f"rotation {token} of {name} to finish")
        return result

    def wait_condition(self, name: str, type: str, status: str, reason: str, timeout: float = 60) -> dict[str, Any]:
        def matches() -> dict[str, Any] | None:
            c = self.condition(name, type)
            return c if c.get("status") == status and c.get("reason") == reason else None

        result: dict[str, Any] = self.wait_for(matches, timeout=timeout, what=f"{name}: {type}={status} {reason}")
        return result

    def events(self) -> list[Any]:
        return list(self.core.list_namespaced_event(self.namespace).items)

    def events_of(self, name: str) -> list[Any]:
        """The Events `kubectl describe` shows for one object (selected by involvedObject.name)."""
        selector = f"involvedObject.name={name}"
        return list(self.core.list_namespaced_event(self.namespace, field_selector=selector).items)

    def wait_event(self, name: str, type: str, reason: str, timeout: float = 20) -> Any:
        """kopf posts Events from a queue: wait for one rather than asserting at once."""

        def posted() -> Any:
            return next((e for e in self.events_of(name) if (e.type, e.reason) == (type, reason)), None)

        return self.wait_for(posted, timeout=timeout, what=f"a {type} {reason} Event of {name}")

    def delete_rotations(self) -> None:
        """Delete every SecretRotation while the operator runs (kopf's finalizer is on them)."""
        for item in self.custom.list_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL)["items"]:
            self.custom.delete_namespaced_custom_object(
                GROUP, VERSION, self.namespace, PLURAL, item["metadata"]["name"]
            )

        def gone() -> bool:
            return not self.custom.list_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL)["items"]

        self.wait_for(gone, timeout=30, what="the SecretRotations to be deleted")


@pytest.fixture
def cluster(api: kubernetes.client.ApiClient, crds_installed: list[str], namespace: str, wait_for: WaitFor) -> Cluster:
    return Cluster(api, namespace, wait_for)


@contextmanager
def operator(namespace: str, kubeconfig: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[kopf.testing.KopfRunner]:
    """The operator in-process; started again after a simulated crash."""
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    args = ["run", "--standalone", "-m", "runbook_operator.main", "--namespace", namespace]
    with kopf.testing.KopfRunner(args, timeout=120) as runner:
        yield runner


class PgRole:
    """A login role in the test PostgreSQL and its current password."""

    def __init__(self, server: Postgres, prefix: str = "app") -> None:
        self.server = server
        self.name = f"{prefix}_{uuid.uuid4().hex[:8]}"
        self.password = f"initial-{uuid.uuid4().hex}"
        with server.connect() as admin:  # the initial password as a verifier too: the leak scans read the log
            admin.execute(f"CREATE ROLE {self.name} LOGIN")
            set_password(admin, self.name, self.password)

    def login(self, password: str, user: str | None = None) -> bool:
        try:
            with psycopg.connect(self.server.dsn(user=user or self.name, password=password), connect_timeout=5):
                return True
        except psycopg.OperationalError:
            return False


def pg_target(server: Postgres, user: str, port: int | None = None) -> dict[str, Any]:
    return {
        "postgresql": {
            "host": "127.0.0.1",
            "port": port or server.port,
            "database": "postgres",
            "user": user,
            "adminSecretRef": {"name": ADMIN},
            "insecurePlaintext": True,
        }
    }


def admin_secret(cluster: Cluster, server: Postgres) -> None:
    cluster.create_secret(ADMIN, {"username": server.superuser, "password": server.password})


def reconcile_passes() -> float:
    """SecretRotation passes the in-process operator ran to their end (status written or found unchanged)."""
    return REGISTRY.get_sample_value("runbook_reconcile_passes_total", {"kind": "SecretRotation"}) or 0.0


def leaks(values: list[str], texts: list[str]) -> list[str]:
    return [value for value in values for text in texts if value in text]


def event_texts(cluster: Cluster) -> list[str]:
    return [f"{e.reason} {e.message}" for e in cluster.events()]


# ----------------------------------------------------------------------------------------- single, Postgres


def test_single_postgres_rotation_rolls_the_deployment_and_leaks_nothing(
    cluster: Cluster,
    postgres: Postgres,
    operator_runner: kopf.testing.KopfRunner,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    caplog.set_level(logging.INFO)
    monkeypatch.setattr(rotation_reconciler, "RESYNC", 1.0)  # resyncs every second instead of every 5 minutes
    role = PgRole(postgres)
    admin_secret(cluster, postgres)
    cluster.create_secret(SECRET, {"POSTGRES_PASSWORD": role.password, "POSTGRES_DB": "app"})
    cluster.create_deployment("api", replicas=2)
    cluster.wait_available("api")
    cluster.create_rotation(
        "app",
        {
            "secretRef": {"name": SECRET, "key": "POSTGRES_PASSWORD"},
            "target": pg_target(postgres, role.name),
            "restartTargets": [{"kind": "Deployment", "name": "api"}],
            "rotateNow": "1",
        },
    )
    status = cluster.wait_rotated("app", "1")

    secret = cluster.secret()
    assert secret is not None
    new = secret["POSTGRES_PASSWORD"]
    assert new != role.password and len(new) == 32 and new.isalnum()
    assert secret["POSTGRES_DB"] == "app"  # other keys are never touched
    assert role.login(new) and not role.login(role.password)
    assert cluster.pending("app") is None
    assert status["fingerprint"] == fingerprint(new)
    assert status["targetKind"] == "postgresql"
    assert status["targets"] == [{"kind": "Deployment", "name": "api", "ready": True}]
    conditions = {c["type"]: c["status"] for c in status["conditions"]}
    assert (conditions["Ready"], conditions["Rotated"], conditions["Degraded"]) == ("True", "True", "False")
    assert status["lastRotationTime"] and "nextRotationTime" not in status  # rotateNow only

    # The Deployment controller rolled a new ReplicaSet carrying the rotationID, whose pods are ready.
    rotation_id = status["rotationId"]
    replica_sets = cluster.apps.list_namespaced_replica_set(cluster.namespace, label_selector="app=api").items
    stamped = [
        rs for rs in replica_sets if (rs.spec.template.metadata.annotations or {}).get(ROTATION_ID) == rotation_id
    ]
    assert len(stamped) == 1 and len(replica_sets) == 2
    assert stamped[0].status.ready_replicas == 2
    hash_ = stamped[0].metadata.labels["pod-template-hash"]
    pods = cluster.core.list_namespaced_pod(cluster.namespace, label_selector=f"pod-template-hash={hash_}").items
    assert len(pods) == 2
    assert all(any(c.type == "Ready" and c.status == "True" for c in p.status.conditions) for p in pods)

    # Audit line, metric, Events.
    audits = [json.loads(r.getMessage()) for r in caplog.records if r.name == "runbook.audit"]
    rotated = [a for a in audits if a["event"] == "secret_rotated"]
    assert len(rotated) == 1
    assert rotated[0]["fingerprint"] == fingerprint(new) and rotated[0]["restarted"] == ["Deployment/api"]
    metric = REGISTRY.get_sample_value(
        "runbook_secret_last_rotation_timestamp_seconds", {"namespace": cluster.namespace, "name": "app"}
    )
    assert metric is not None and abs(metric - time.time()) < 120

    def messages() -> list[str]:
        return [e.message for e in cluster.events() if e.involved_object.name == "app"]

    finished = f"Rotation {rotation_id} finished"
    cluster.wait_for(lambda: any(m.startswith(finished) for m in messages()), timeout=20, what="the Event")
    assert "Restarting Deployment api" in messages()

    # A resync with nothing to do writes nothing: two passes end (so one began after the version was read).
    version = cluster.rotation("app")["metadata"]["resourceVersion"]
    passes = reconcile_passes()
    cluster.wait_for(lambda: reconcile_passes() >= passes + 2, timeout=20, what="two resync passes")
    assert cluster.rotation("app")["metadata"]["resourceVersion"] == version

    # Leak scan: operator logs, Events, the resource (status, annotations), the workloads, the server log.
    obj = cluster.rotation("app")
    deployment = cluster.apps.read_namespaced_deployment("api", cluster.namespace)
    texts = [
        caplog.text,
        *event_texts(cluster),
        json.dumps(obj),
        json.dumps(cluster.core.read_namespaced_secret(SECRET, cluster.namespace).metadata.annotations or {}),
        json.dumps(deployment.metadata.annotations or {}),
        json.dumps(deployment.spec.template.metadata.annotations or {}),
        postgres.server_log(),
    ]
    assert leaks([role.password, new], texts) == []
    assert "[REDACTED]" not in caplog.text  # nothing even tried to log a value
    cluster.delete_rotations()


# ------------------------------------------------------------------------------------------ dual, Postgres


def test_dual_strategy_never_fails_a_login(
    cluster: Cluster, postgres: Postgres, operator_runner: kopf.testing.KopfRunner
) -> None:
    group = f"grp_{uuid.uuid4().hex[:8]}"
    with postgres.connect() as admin:
        admin.execute(f"CREATE ROLE {group} NOLOGIN")
        admin.execute(f"CREATE TABLE {group}_data (x int)")
        admin.execute(f"GRANT SELECT ON {group}_data TO {group}")
    admin_secret(cluster, postgres)
    cluster.create_secret(SECRET, {"PASSWORD": "not-yet-set"})
    spec = {
        "secretRef": {"name": SECRET, "key": "PASSWORD", "usernameKey": "USERNAME"},
        "target": pg_target(postgres, group),
        "strategy": "dual",
        "rotateNow": "1",
    }
    cluster.create_rotation("dual", spec)
    first = cluster.wait_rotated("dual", "1")
    assert first["activeRole"] == f"{group}_a"

    attempts, failures = 0, []
    stop = threading.Event()

    def client_loop() -> None:
        """Records what it sees; the main thread asserts (an assert here would only end this thread)."""
        nonlocal attempts
        while not stop.is_set():
            attempts += 1
            try:
                creds = cluster.secret()
                if creds is None:
                    failures.append("the Secret is gone")
                else:
                    with psycopg.connect(
                        postgres.dsn(user=creds["USERNAME"], password=creds["PASSWORD"]), connect_timeout=5
                    ) as conn:
                        conn.execute(f"SELECT count(*) FROM {group}_data").fetchone()
            except psycopg.Error as error:
                failures.append(f"{creds['USERNAME']}: {type(error).__name__}")
            except Exception as error:  # anything else the client met (a KeyError, an API refusal)
                failures.append(f"client: {type(error).__name__}: {error}")
            time.sleep(0.02)

    client = threading.Thread(target=client_loop)
    client.start()
    try:
        roles = []
        previous = cluster.secret()
        for token in ("2", "3", "4"):
            cluster.patch_spec("dual", {"rotateNow": token})
            roles.append(cluster.wait_rotated("dual", token)["activeRole"])
            assert previous is not None
            # The role that was active before keeps its password until the next rotation.
            with psycopg.connect(
                postgres.dsn(user=previous["USERNAME"], password=previous["PASSWORD"]), connect_timeout=5
            ):
                pass
            previous = cluster.secret()
    finally:
        stop.set()
        client.join()
    assert roles == [f"{group}_b", f"{group}_a", f"{group}_b"]
    assert attempts > 20 and failures == []
    cluster.delete_rotations()


# ------------------------------------------------------------------------------------------------- Redis


def test_redis_keeps_the_old_password_until_retired(
    cluster: Cluster,
    redis_server: Redis,
    operator_kubeconfig: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    user = f"app-{uuid.uuid4().hex[:8]}"
    old = f"old-{uuid.uuid4().hex}"
    admin = redis_server.client()
    admin.execute_command("ACL", "SETUSER", user, "on", f">{old}", "~*", "+@all", "-@admin")

    def works(password: str) -> bool:
        client = redis.Redis(host=redis_server.host, port=redis_server.port, username=user, password=password)
        try:
            return bool(client.ping())
        except redis.AuthenticationError:
            return False
        finally:
            client.close()

    cluster.create_secret("redis-admin", {"username": "default", "password": redis_server.password})
    cluster.create_secret("redis-credentials", {"REDIS_PASSWORD": old})
    cluster.create_rotation(
        "cache",
        {
            "secretRef": {"name": "redis-credentials", "key": "REDIS_PASSWORD"},
            "target": {
                "redis": {
                    "host": "127.0.0.1",
                    "port": redis_server.port,
                    "user": user,
                    "adminSecretRef": {"name": "redis-admin"},
                    "insecurePlaintext": True,
                }
            },
            "rotateNow": "1",
        },
    )
    # Interrupted after publishing: both passwords work, the Secret already holds the new one.
    monkeypatch.setenv(CRASH_AFTER_ENV, "Restarted")
    with operator(cluster.namespace, operator_kubeconfig, monkeypatch):
        wait_crash(caplog, cluster.wait_for, "Restarted")
    secret = cluster.secret("redis-credentials")
    assert secret is not None
    new = secret["REDIS_PASSWORD"]
    assert new != old and works(new) and works(old)

    monkeypatch.delenv(CRASH_AFTER_ENV)
    with operator(cluster.namespace, operator_kubeconfig, monkeypatch):
        status = cluster.wait_rotated("cache", "1")
        assert status["targetKind"] == "redis" and status["fingerprint"] == fingerprint(new)
        assert works(new) and not works(old)
        assert cluster.pending("cache") is None
        acl = " ".join(str(rule) for rule in admin.execute_command("ACL", "LIST"))
        texts = [caplog.text, *event_texts(cluster), json.dumps(cluster.rotation("cache")), acl]
        assert leaks([old, new], texts) == []
        cluster.delete_rotations()


def tls_secret(cluster: Cluster, name: str, server: RunbookRedis, *, with_key: bool = True) -> None:
    """A kubernetes.io/tls Secret with the CA beside the pair, as tools/dev/prerequisites.sh creates redis-tls."""
    data = {"ca.crt": server.ca.pem, "tls.crt": server.client_cert.read_text()}
    if with_key:
        data["tls.key"] = server.client_key.read_text()
    body = {
        "metadata": {"name": name},
        "type": "kubernetes.io/tls" if with_key else "Opaque",  # the API server insists on tls.key for the type
        "data": {k: b64(v) for k, v in data.items()},
    }
    cluster.core.create_namespaced_secret(cluster.namespace, body)


def runbook_redis_target(server: RunbookRedis, user: str, **tls: Any) -> dict[str, Any]:
    return {
        "redis": {
            "host": server.host,
            "port": server.port,
            "user": user,
            "tls": {
                "caSecretRef": {"name": "redis-tls", "key": "ca.crt"},
                "clientCertificateSecretRef": {"name": "redis-tls"},
                "serverName": server.SERVER_NAME,
                **tls,
            },
            "adminSecretRef": {"name": "redis-admin"},
        }
    }


def test_redis_rotation_over_mutual_tls_leaks_nothing(
    cluster: Cluster,
    runbook_redis: RunbookRedis,
    operator_runner: kopf.testing.KopfRunner,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The runbook's Redis (TLS only, client certificates required): the rotation logs in with the client
    pair from a kubernetes.io/tls Secret, verifies the server by its Service name, and leaks no password and
    no private key; bad TLS inputs are Ready=False naming the field, with nothing changed."""
    caplog.set_level(logging.INFO)
    user = f"app-{uuid.uuid4().hex[:8]}"
    old = f"old-{uuid.uuid4().hex}"
    runbook_redis.client().execute_command("ACL", "SETUSER", user, "on", f">{old}", "~*", "+@all", "-@admin")

    def works(password: str) -> bool:
        client = runbook_redis.client(username=user, password=password)
        try:
            return bool(client.ping())
        except redis.AuthenticationError:
            return False
        finally:
            client.close()

    tls_secret(cluster, "redis-tls", runbook_redis)
    tls_secret(cluster, "redis-tls-no-key", runbook_redis, with_key=False)
    other_ca = CertificateAuthority(runbook_redis.directory / f"other-ca-{uuid.uuid4().hex[:6]}", name="other CA")
    cluster.create_secret("other-ca", {"ca.crt": other_ca.pem})
    cluster.create_secret("redis-admin", {"username": "default", "password": runbook_redis.password})
    cluster.create_secret("redis-credentials", {"REDIS_PASSWORD": old})
    secret_ref = {"name": "redis-credentials", "key": "REDIS_PASSWORD"}
    cluster.create_rotation(
        "cache", {"secretRef": secret_ref, "target": runbook_redis_target(runbook_redis, user), "rotateNow": "1"}
    )
    tls = "spec.target.redis.tls"
    cases = {
        "no-key": (
            {"clientCertificateSecretRef": {"name": "redis-tls-no-key"}},
            "SecretKeyMissing",
            f"{tls}.clientCertificateSecretRef: Secret redis-tls-no-key has no key 'tls.key'",
        ),
        "other-ca": (
            {"caSecretRef": {"name": "other-ca", "key": "ca.crt"}},
            "TLSFailed",
            f"{tls}.caSecretRef: the server's certificate is not signed by this CA",
        ),
        "no-cert": (
            {"clientCertificateSecretRef": None},
            "TLSFailed",
            f"{tls}.clientCertificateSecretRef: the server requires a client certificate",
        ),
    }
    for name, (override, _, _) in cases.items():
        target = runbook_redis_target(runbook_redis, user, **override)
        target["redis"]["tls"] = {k: v for k, v in target["redis"]["tls"].items() if v is not None}
        cluster.create_rotation(name, {"secretRef": secret_ref, "target": target, "rotateNow": "1"})

    status = cluster.wait_rotated("cache", "1")
    secret = cluster.secret("redis-credentials")
    assert secret is not None
    new = secret["REDIS_PASSWORD"]
    assert new != old and works(new) and not works(old)
    assert status["targetKind"] == "redis" and status["fingerprint"] == fingerprint(new)
    for name, (_, reason, message) in cases.items():
        condition = cluster.wait_condition(name, "Ready", "False", reason, timeout=30)
        assert condition["message"].startswith(message), (name, condition)
        assert "rotationId" not in cluster.rotation(name).get("status", {}), name
        cluster.wait_event(name, "Warning", reason)
    assert works(new)  # the failed ones changed nothing

    key_pem = runbook_redis.client_key.read_text()
    acl = " ".join(str(rule) for rule in runbook_redis.client().execute_command("ACL", "LIST"))
    texts = [
        caplog.text,
        *event_texts(cluster),
        *(json.dumps(cluster.rotation(name)) for name in ("cache", *cases)),
        acl,
        runbook_redis.log(),
    ]
    assert leaks([old, new, runbook_redis.password, key_pem, key_pem.splitlines()[1]], texts) == []
    cluster.delete_rotations()


# ----------------------------------------------------------------------------------------------- crashes


def wait_crash(caplog: pytest.LogCaptureFixture, wait_for: WaitFor, step: str) -> None:
    marker = f"{CRASH_AFTER_ENV}={step}:"
    wait_for(lambda: marker in caplog.text, timeout=60, what=f"the operator to be interrupted after {step}")


class LoginMonitor:
    """Checks, for as long as it runs, that the Secret's password or the pending one logs in."""

    def __init__(self, cluster: Cluster, role: PgRole, rotation: str) -> None:
        self.cluster, self.role, self.rotation = cluster, role, rotation
        self.checks = 0
        self.violations: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run)

    def _candidates(self) -> list[str]:
        secret = self.cluster.secret()
        pending = self.cluster.pending(self.rotation)
        return [v for v in ((secret or {}).get("POSTGRES_PASSWORD"), (pending or {}).get("password")) if v]

    def _run(self) -> None:
        while not self._stop.is_set():
            # Read, log in; a change between the two reads is told from a lockout by a second look.
            if not any(self.role.login(p) for p in self._candidates()) and not any(
                self.role.login(p) for p in self._candidates()
            ):
                self.violations.append(time.strftime("%H:%M:%S"))
            self.checks += 1
            time.sleep(0.05)

    def __enter__(self) -> LoginMonitor:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def test_interrupted_after_each_step_converges_and_never_locks_out(
    cluster: Cluster,
    postgres: Postgres,
    operator_kubeconfig: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    role = PgRole(postgres)
    admin_secret(cluster, postgres)
    cluster.create_secret(SECRET, {"POSTGRES_PASSWORD": role.password})
    cluster.create_deployment("api")
    cluster.wait_available("api")
    cluster.create_rotation(
        "app",
        {
            "secretRef": {"name": SECRET, "key": "POSTGRES_PASSWORD"},
            "target": pg_target(postgres, role.name),
            "restartTargets": [{"kind": "Deployment", "name": "api"}],
        },
    )
    seen = [role.password]
    with LoginMonitor(cluster, role, "app") as monitor:
        for step in STEPS[1:]:
            token = f"crash-{step}"
            monkeypatch.setenv(CRASH_AFTER_ENV, step)
            with operator(cluster.namespace, operator_kubeconfig, monkeypatch):
                cluster.patch_spec("app", {"rotateNow": token})
                wait_crash(caplog, cluster.wait_for, step)
            interrupted = cluster.rotation("app")["status"]
            assert interrupted["rotateNow"] == token and interrupted["step"] != "Done"

            monkeypatch.delenv(CRASH_AFTER_ENV)
            with operator(cluster.namespace, operator_kubeconfig, monkeypatch):
                status = cluster.wait_rotated("app", token)
                if step == STEPS[-1]:
                    cluster.delete_rotations()
            secret = cluster.secret()
            assert secret is not None
            current = secret["POSTGRES_PASSWORD"]
            assert current not in seen and role.login(current), step
            assert not any(role.login(p) for p in seen), step
            assert cluster.pending("app") is None, step
            assert status["fingerprint"] == fingerprint(current)
            template = cluster.apps.read_namespaced_deployment("api", cluster.namespace).spec.template
            assert template.metadata.annotations[ROTATION_ID] == status["rotationId"]
            seen.append(current)
    assert monitor.checks > 50 and monitor.violations == []
    audits = [json.loads(r.getMessage()) for r in caplog.records if r.name == "runbook.audit"]
    assert len([a for a in audits if a["event"] == "secret_rotated"]) == len(STEPS) - 1
    assert leaks(seen, [caplog.text, *event_texts(cluster), postgres.server_log()]) == []


# ------------------------------------------------------------------------------------------------ bad input


def test_bad_inputs_get_clear_conditions_and_nothing_half_done(
    cluster: Cluster, postgres: Postgres, operator_runner: kopf.testing.KopfRunner, wait_for: Callable[..., Any]
) -> None:
    role = PgRole(postgres)
    admin_secret(cluster, postgres)
    original = {"POSTGRES_PASSWORD": role.password, "OTHER": "kept"}
    cluster.create_secret(SECRET, original)
    good: dict[str, Any] = {
        "secretRef": {"name": SECRET, "key": "POSTGRES_PASSWORD"},
        "target": pg_target(postgres, role.name),
        "rotateNow": "1",
    }
    dead_port = free_port()
    grant(cluster.api, cluster.namespace, hosts=[("127.0.0.1", dead_port)])
    cases = {
        "no-admin": (
            {
                **good,
                "target": {
                    "postgresql": {**pg_target(postgres, role.name)["postgresql"], "adminSecretRef": {"name": "nope"}}
                },
            },
            "SecretNotFound",
            "spec.target.postgresql.adminSecretRef: Secret nope not found",
        ),
        "no-role": (
            {**good, "target": pg_target(postgres, "no_such_role")},
            "RoleNotFound",
            "spec.target.postgresql.user: role no_such_role does not exist",
        ),
        "db-down": (
            {**good, "target": pg_target(postgres, role.name, port=dead_port)},
            "DatabaseUnavailable",
            f"spec.target.postgresql: cannot reach PostgreSQL 127.0.0.1:{dead_port}",
        ),
        "bad-schedule": ({**good, "schedule": "61 * * * *"}, "InvalidSpec", "spec.schedule: invalid cron expression"),
        "no-workload": (
            {**good, "restartTargets": [{"kind": "Deployment", "name": "nope"}]},
            "RestartTargetNotFound",
            "spec.restartTargets[0]: Deployment nope not found",
        ),
        "no-key": (
            {**good, "secretRef": {"name": SECRET, "key": "MISSING"}},
            "SecretKeyMissing",
            f"spec.secretRef: Secret {SECRET} has no key 'MISSING'",
        ),
    }
    cases["taken"] = (good, "PendingSecretConflict", "Secret taken-rotation-pending exists and is not owned")
    cluster.create_secret(pending_secret_name("taken"), {"password": "someone-elses-value"})
    for name, (spec, _, _) in cases.items():
        cluster.create_rotation(name, spec)
    for name, (_, reason, message) in cases.items():
        condition = cluster.wait_condition(name, "Ready", "False", reason)
        assert condition["message"].startswith(message), (name, condition)
        status = cluster.rotation(name)["status"]
        assert "rotationId" not in status and "step" not in status, name
        assert status["phase"] == "Failed"
        assert cluster.pending(name) is None or name == "taken"
        wait_for(
            lambda name=name, reason=reason: any(
                e.reason == reason for e in cluster.events() if e.involved_object.name == name
            ),
            timeout=15,
            what=f"the {reason} Event of {name}",
        )
    assert cluster.secret() == original and role.login(role.password)
    assert cluster.pending("taken") == {"password": "someone-elses-value"}

    # The database that was down is retried with backoff (10 s, then 20 s: not a hot loop) ...
    def attempts() -> int:
        return sum(
            e.count or 1
            for e in cluster.events()
            if e.involved_object.name == "db-down" and e.reason == "DatabaseUnavailable"
        )

    cluster.wait_for(lambda: attempts() >= 2, timeout=30, what="a second attempt to reach the database")
    time.sleep(5)
    assert attempts() == 2
    # ... and once the spec points at a reachable server, the rotation runs.
    cluster.patch_spec("db-down", {"target": pg_target(postgres, role.name)})
    cluster.wait_rotated("db-down", "1")
    secret = cluster.secret()
    assert secret is not None and secret["OTHER"] == "kept" and role.login(secret["POSTGRES_PASSWORD"])
    cluster.delete_rotations()


def test_references_are_checked_long_before_a_rotation_is_due(
    cluster: Cluster, postgres: Postgres, redis_server: Redis, operator_runner: kopf.testing.KopfRunner
) -> None:
    """Every reference of a SecretRotation whose next rotation is 30 days away is resolved and checked when
    it is created (read-only): a broken one is Ready=False naming the field at once, not in 30 days."""
    role = PgRole(postgres)
    admin_secret(cluster, postgres)
    original = {"POSTGRES_PASSWORD": role.password, "OTHER": "kept"}
    cluster.create_secret(SECRET, original)
    wrong_password = f"wrong-{uuid.uuid4().hex}"
    cluster.create_secret("wrong-admin", {"username": postgres.superuser, "password": wrong_password})
    cluster.create_secret("redis-wrong-admin", {"username": "default", "password": wrong_password})
    redis_user = f"app-{uuid.uuid4().hex[:8]}"
    redis_password = f"old-{uuid.uuid4().hex}"
    redis_server.client().execute_command(
        "ACL", "SETUSER", redis_user, "on", f">{redis_password}", "~*", "+@all", "-@admin"
    )
    cluster.create_secret("redis-credentials", {"REDIS_PASSWORD": redis_password})
    missing = f"later-{uuid.uuid4().hex[:8]}"
    dead_port = free_port()
    grant(cluster.api, cluster.namespace, hosts=[("127.0.0.1", dead_port)])
    good: dict[str, Any] = {
        "secretRef": {"name": SECRET, "key": "POSTGRES_PASSWORD"},
        "target": pg_target(postgres, role.name),
        "interval": "720h",
    }
    with_admin = {
        "postgresql": {**pg_target(postgres, role.name)["postgresql"], "adminSecretRef": {"name": "wrong-admin"}}
    }
    cases: dict[str, tuple[dict[str, Any], str, str]] = {
        "no-secret": (
            {**good, "secretRef": {"name": missing, "key": "POSTGRES_PASSWORD"}},
            "SecretNotFound",
            f"spec.secretRef: Secret {missing} not found",
        ),
        "no-key": (
            {**good, "secretRef": {"name": SECRET, "key": "MISSING"}},
            "SecretKeyMissing",
            f"spec.secretRef: Secret {SECRET} has no key 'MISSING'",
        ),
        "db-down": (
            {**good, "target": pg_target(postgres, role.name, port=dead_port)},
            "DatabaseUnavailable",
            f"spec.target.postgresql: cannot reach PostgreSQL 127.0.0.1:{dead_port}",
        ),
        "bad-admin": (
            {**good, "target": with_admin},
            "LoginRefused",
            f"spec.target.postgresql.adminSecretRef: PostgreSQL 127.0.0.1:{postgres.port} refused the admin login",
        ),
        "redis-bad-admin": (
            {
                **good,
                "secretRef": {"name": "redis-credentials", "key": "REDIS_PASSWORD"},
                "target": {
                    "redis": {
                        "host": "127.0.0.1",
                        "port": redis_server.port,
                        "user": redis_user,
                        "adminSecretRef": {"name": "redis-wrong-admin"},
                        "insecurePlaintext": True,
                    }
                },
            },
            "LoginRefused",
            f"spec.target.redis.adminSecretRef: Redis 127.0.0.1:{redis_server.port} refused the admin login",
        ),
        "no-role": (
            {**good, "target": pg_target(postgres, "no_such_role")},
            "RoleNotFound",
            "spec.target.postgresql.user: role no_such_role does not exist",
        ),
        "no-workload": (
            {**good, "restartTargets": [{"kind": "Deployment", "name": "nope"}]},
            "RestartTargetNotFound",
            "spec.restartTargets[0]: Deployment nope not found",
        ),
    }
    started = time.monotonic()
    for name, (spec, _, _) in cases.items():
        cluster.create_rotation(name, spec)
    for name, (_, reason, message) in cases.items():
        condition = cluster.wait_condition(name, "Ready", "False", reason, timeout=20)
        assert condition["message"].startswith(message), (name, condition)
        status = cluster.rotation(name)["status"]
        assert "rotationId" not in status and "step" not in status and "lastRotationTime" not in status, name
        assert status["phase"] == "Failed", name
        warning = cluster.wait_event(name, "Warning", reason)
        assert warning.message.startswith(message), (name, warning.message)
    assert time.monotonic() - started < 30  # seconds, not the 30 days until the first rotation
    # Read-only: no value was changed, no pending value generated.
    assert cluster.secret() == original and role.login(role.password)
    assert cluster.secret("redis-credentials") == {"REDIS_PASSWORD": redis_password}
    assert redis_server.client().execute_command("AUTH", redis_user, redis_password)
    assert all(cluster.pending(name) is None for name in cases)
    texts = [*event_texts(cluster), *(json.dumps(cluster.rotation(name)) for name in cases)]
    assert leaks([role.password, wrong_password, postgres.password, redis_password], texts) == []

    # The missing Secret appears: Ready again (a retry with backoff finds it), and still no rotation.
    cluster.create_secret(missing, {"POSTGRES_PASSWORD": role.password})
    ready = cluster.wait_condition("no-secret", "Ready", "True", "Scheduled", timeout=90)
    assert ready["message"].startswith("next rotation at ")
    status = cluster.rotation("no-secret")["status"]
    assert "rotationId" not in status and status["phase"] == "Ready"
    assert cluster.secret(missing) == {"POSTGRES_PASSWORD": role.password} and role.login(role.password)
    cluster.wait_event("no-secret", "Normal", "Scheduled")
    cluster.delete_rotations()


def test_a_new_rotation_posts_an_event_and_a_quiet_resync_posts_none(
    cluster: Cluster, operator_runner: kopf.testing.KopfRunner, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`kubectl describe sr` of a fresh SecretRotation shows it was accepted and when it rotates; resyncs
    that find nothing changed write and post nothing; a reference that breaks later is found by a resync."""
    monkeypatch.setattr(rotation_reconciler, "RESYNC", 1.0)  # instead of minutes
    name = f"token-{uuid.uuid4().hex[:8]}"
    cluster.create_secret(SECRET, {"token": "initial-token-value"})
    cluster.create_deployment("api")
    spec = {
        "secretRef": {"name": SECRET, "key": "token"},
        "interval": "720h",
        "restartTargets": [{"kind": "Deployment", "name": "api"}],
    }
    cluster.create_rotation(name, spec)
    event = cluster.wait_event(name, "Normal", "Scheduled")
    status = cluster.rotation(name)["status"]
    assert event.message == f"next rotation at {status['nextRotationTime']}"
    assert "rotationId" not in status

    # Resyncs (every second here) with nothing changed: no status write, no further Event.
    version = cluster.rotation(name)["metadata"]["resourceVersion"]
    passes = reconcile_passes()
    cluster.wait_for(lambda: reconcile_passes() >= passes + 3, timeout=20, what="three resync passes")
    assert cluster.rotation(name)["metadata"]["resourceVersion"] == version
    assert [e.reason for e in cluster.events_of(name)] == ["Scheduled"]

    # A restart target deleted later is found by the next resync.
    cluster.apps.delete_namespaced_deployment("api", cluster.namespace)
    condition = cluster.wait_condition(name, "Ready", "False", "RestartTargetNotFound", timeout=15)
    assert condition["message"] == "spec.restartTargets[0]: Deployment api not found"
    cluster.wait_event(name, "Warning", "RestartTargetNotFound")
    assert cluster.secret() == {"token": "initial-token-value"}
    cluster.delete_rotations()


# --------------------------------------------------------------------------------------- restart timeouts


def test_a_workload_that_cannot_roll_out_ends_degraded_naming_it(
    cluster: Cluster, operator_runner: kopf.testing.KopfRunner
) -> None:
    cluster.create_secret(SECRET, {"token": "initial-token-value"})
    cluster.create_deployment("api")
    cluster.create_deployment("stuck", schedulable=False)  # no node matches its selector
    cluster.create_stateful_set("db")
    cluster.wait_available("api")
    cluster.create_rotation(
        "token",
        {
            "secretRef": {"name": SECRET, "key": "token"},
            "restartTargets": [
                {"kind": "Deployment", "name": "api"},
                {"kind": "Deployment", "name": "stuck"},
                {"kind": "StatefulSet", "name": "db"},
            ],
            "rolloutTimeout": "8s",
            "generator": {"length": 24, "alphabet": "hex"},
            "rotateNow": "1",
        },
    )
    status = cluster.wait_rotated("token", "1")
    assert status["targetKind"] == "secret-only"
    assert status["targets"][0] == {"kind": "Deployment", "name": "api", "ready": True}
    assert status["targets"][1]["ready"] is False and "within 8s" in status["targets"][1]["message"]
    assert status["targets"][2] == {"kind": "StatefulSet", "name": "db", "ready": True}
    stateful_set = cluster.apps.read_namespaced_stateful_set("db", cluster.namespace)
    assert stateful_set.spec.template.metadata.annotations[ROTATION_ID] == status["rotationId"]
    assert stateful_set.status.current_revision == stateful_set.status.update_revision
    degraded = cluster.condition("token", "Degraded")
    assert degraded["status"] == "True" and degraded["reason"] == "RolloutIncomplete"
    assert degraded["message"].startswith("Deployment stuck not rolled out within 8s")
    assert "api" not in degraded["message"] and "db" not in degraded["message"]
    ready = cluster.condition("token", "Ready")
    assert (ready["status"], ready["reason"]) == ("False", "RolloutIncomplete")
    secret = cluster.secret()
    assert secret is not None and len(secret["token"]) == 24 and secret["token"] != "initial-token-value"
    cluster.delete_rotations()


# -------------------------------------------------------------------------------------------- interlock


def test_no_rotation_starts_while_the_namespace_is_isolated(
    cluster: Cluster,
    operator_kubeconfig: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    cluster.create_secret(SECRET, {"token": "initial-token-value"})
    cluster.create_rotation("token", {"secretRef": {"name": SECRET, "key": "token"}, "rotateNow": "1"})
    # A rotation in flight when the isolation begins finishes ...
    monkeypatch.setenv(CRASH_AFTER_ENV, "Generated")
    with operator(cluster.namespace, operator_kubeconfig, monkeypatch):
        wait_crash(caplog, cluster.wait_for, "Generated")
    isolation = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "EmergencyIsolation",
        "metadata": {"name": "breach"},
        "spec": {
            "reason": "test",
            "incidentId": "INC-1",
            "network": {"isolate": False},
            "evidence": {"capture": False},
        },
    }
    cluster.custom.create_namespaced_custom_object(GROUP, VERSION, cluster.namespace, "emergencyisolations", isolation)
    monkeypatch.delenv(CRASH_AFTER_ENV)
    with operator(cluster.namespace, operator_kubeconfig, monkeypatch):
        cluster.wait_rotated("token", "1")
        first = cluster.secret()
        # ... but no new one starts.
        cluster.patch_spec("token", {"rotateNow": "2"})
        paused = cluster.wait_condition("token", "Paused", "True", "NamespaceIsolated")
        phase = (
            cluster.custom.get_namespaced_custom_object(
                GROUP, VERSION, cluster.namespace, "emergencyisolations", "breach"
            )
            .get("status", {})
            .get("phase")
        )
        assert phase not in ("Released", "Rejected", "Invalid")  # an isolation that holds the namespace
        assert "EmergencyIsolation breach" in paused["message"]
        time.sleep(2)
        assert cluster.secret() == first and cluster.rotation("token")["status"]["rotateNow"] == "1"
        # Released: the rotation runs.
        cluster.custom.patch_namespaced_custom_object(
            GROUP, VERSION, cluster.namespace, "emergencyisolations", "breach", {"spec": {"released": True}}
        )
        cluster.wait_rotated("token", "2")
        assert cluster.condition("token", "Paused")["status"] == "False"
        assert cluster.secret() != first
        cluster.delete_rotations()
        cluster.custom.delete_namespaced_custom_object(
            GROUP, VERSION, cluster.namespace, "emergencyisolations", "breach"
        )


# --------------------------------------------------------------------------------------------- schedule


def test_interval_rotates_when_due_and_shows_the_next_time(
    cluster: Cluster, operator_runner: kopf.testing.KopfRunner
) -> None:
    cluster.create_secret(SECRET, {"token": "initial-token-value"})
    cluster.create_rotation("token", {"secretRef": {"name": SECRET, "key": "token"}, "interval": "5s"})
    created = cluster.rotation("token")["metadata"]["creationTimestamp"]
    pending = cluster.wait_for(lambda: cluster.rotation("token").get("status", {}).get("nextRotationTime"), timeout=30)
    assert pending == (datetime.fromisoformat(created) + timedelta(seconds=5)).strftime("%Y-%m-%dT%H:%M:%SZ")
    assert cluster.secret() == {"token": "initial-token-value"}  # creation alone changes nothing

    def rotated(count: int) -> Callable[[], dict[str, Any] | None]:
        def check() -> dict[str, Any] | None:
            status: dict[str, Any] = cluster.rotation("token").get("status", {})
            return status if status.get("step") == "Done" and status["rotationId"] not in seen[:count] else None

        return check

    seen: list[str] = []
    for _ in range(2):
        status = cluster.wait_for(rotated(len(seen)), timeout=30, what="a scheduled rotation")
        seen.append(status["rotationId"])
        last = datetime.fromisoformat(status["lastRotationTime"])
        assert status["nextRotationTime"] == (last + timedelta(seconds=5)).strftime("%Y-%m-%dT%H:%M:%SZ")
    first, second = seen
    assert first != second
    assert cluster.secret() != {"token": "initial-token-value"}
    cluster.delete_rotations()


def test_deleted_mid_rotation_publishes_before_it_goes(
    cluster: Cluster,
    postgres: Postgres,
    operator_kubeconfig: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    role = PgRole(postgres)
    admin_secret(cluster, postgres)
    cluster.create_secret(SECRET, {"POSTGRES_PASSWORD": role.password})
    spec = {
        "secretRef": {"name": SECRET, "key": "POSTGRES_PASSWORD"},
        "target": pg_target(postgres, role.name),
        "rotateNow": "1",
    }
    cluster.create_rotation("app", spec)
    monkeypatch.setenv(CRASH_AFTER_ENV, "Applied")
    with operator(cluster.namespace, operator_kubeconfig, monkeypatch):
        wait_crash(caplog, cluster.wait_for, "Applied")
    assert not role.login(role.password)  # the role already has the pending value, the Secret not yet
    cluster.custom.delete_namespaced_custom_object(GROUP, VERSION, cluster.namespace, PLURAL, "app")
    monkeypatch.delenv(CRASH_AFTER_ENV)
    with operator(cluster.namespace, operator_kubeconfig, monkeypatch):

        def gone() -> bool:
            return not cluster.custom.list_namespaced_custom_object(GROUP, VERSION, cluster.namespace, PLURAL)["items"]

        cluster.wait_for(gone, timeout=30, what="the SecretRotation to be deleted")
    secret = cluster.secret()
    assert secret is not None and role.login(secret["POSTGRES_PASSWORD"])
    cluster.wait_for(lambda: cluster.pending("app") is None, timeout=60, what="the pending Secret to be collected")


# ------------------------------------------------------------------------------------------------- guards


def test_guards_refuse_before_any_password_changes(
    cluster: Cluster, postgres: Postgres, redis_server: Redis, operator_runner: kopf.testing.KopfRunner
) -> None:
    """The admin login, a CREATEROLE role, a member of one, a Redis administrator, a TLS Secret and a Secret
    another rotation manages: each refused with Ready=False naming the field before anything changed (no
    rotation started, no pending Secret, the old passwords still log in, the Secrets as they were)."""
    role = PgRole(postgres)
    admin_secret(cluster, postgres)
    with postgres.connect() as admin:
        creator = PgRole(postgres, prefix="creator")
        admin.execute(f"ALTER ROLE {creator.name} CREATEROLE")
        member = PgRole(postgres, prefix="member")
        admin.execute(f"GRANT {creator.name} TO {member.name}")
    original = {"POSTGRES_PASSWORD": role.password, "OTHER": "kept"}
    cluster.create_secret(SECRET, original)
    redis_user = f"app-{uuid.uuid4().hex[:8]}"
    redis_password = f"old-{uuid.uuid4().hex}"
    redis_server.client().execute_command("ACL", "SETUSER", redis_user, "on", f">{redis_password}", "~*", "+@all")
    cluster.create_secret("redis-admin", {"username": "default", "password": redis_server.password})
    tls = {"tls.crt": "-----BEGIN CERTIFICATE-----\nnot really\n", "tls.key": "-----BEGIN PRIVATE KEY-----\nx\n"}
    cluster.core.create_namespaced_secret(
        cluster.namespace,
        {"metadata": {"name": "web-tls"}, "type": "kubernetes.io/tls", "data": {k: b64(v) for k, v in tls.items()}},
    )
    managed = {"API_TOKEN": "managed-elsewhere"}
    cluster.core.create_namespaced_secret(
        cluster.namespace,
        {
            "metadata": {"name": "managed", "annotations": {"runbook.dev/rotated-by": "billing"}},
            "data": {k: b64(v) for k, v in managed.items()},
        },
    )

    def redis_target(user: str) -> dict[str, Any]:
        return {
            "redis": {
                "host": "127.0.0.1",
                "port": redis_server.port,
                "user": user,
                "adminSecretRef": {"name": "redis-admin"},
                "insecurePlaintext": True,
            }
        }

    pg_secret = {"secretRef": {"name": SECRET, "key": "POSTGRES_PASSWORD"}, "rotateNow": "1"}
    field = "spec.target.postgresql.user"
    cases: dict[str, tuple[dict[str, Any], str, str]] = {
        "admin-login": (
            {**pg_secret, "target": pg_target(postgres, postgres.superuser)},
            "RoleNotRotatable",
            f"{field}: role {postgres.superuser} is not rotated: it is the admin login (adminSecretRef) itself",
        ),
        "createrole": (
            {**pg_secret, "target": pg_target(postgres, creator.name)},
            "RoleNotRotatable",
            f"{field}: role {creator.name} is not rotated: it has CREATEROLE",
        ),
        "member": (
            {**pg_secret, "target": pg_target(postgres, member.name)},
            "RoleNotRotatable",
            f"{field}: role {member.name} is not rotated: it is a member of role {creator.name}, which has CREATEROLE",
        ),
        "redis-default": (
            {"secretRef": {"name": SECRET, "key": "OTHER"}, "target": redis_target("default"), "rotateNow": "1"},
            "RoleNotRotatable",
            "spec.target.redis.user: ACL user default is not rotated: it is the admin login (adminSecretRef) itself",
        ),
        "redis-admin-user": (
            {"secretRef": {"name": SECRET, "key": "OTHER"}, "target": redis_target(redis_user), "rotateNow": "1"},
            "RoleNotRotatable",
            f"spec.target.redis.user: ACL user {redis_user} is not rotated: it may run acl setuser",
        ),
        "tls-key": (
            {"secretRef": {"name": "web-tls", "key": "tls.key"}, "rotateNow": "1"},
            "SecretNotRotatable",
            "spec.secretRef.name: Secret web-tls is not rotated: its type is kubernetes.io/tls",
        ),
        "managed": (
            {"secretRef": {"name": "managed", "key": "API_TOKEN"}, "rotateNow": "1"},
            "SecretNotRotatable",
            "spec.secretRef.name: Secret managed is not rotated: SecretRotation billing rotates it already",
        ),
    }
    for name, (spec, _, _) in cases.items():
        cluster.create_rotation(name, spec)
    for name, (_, reason, message) in cases.items():
        condition = cluster.wait_condition(name, "Ready", "False", reason)
        assert condition["message"].startswith(message), (name, condition)
        status = cluster.rotation(name)["status"]
        assert "rotationId" not in status and "step" not in status, name
        assert cluster.pending(name) is None, name
    assert cluster.secret() == original
    assert cluster.secret("web-tls") == tls and cluster.secret("managed") == managed
    assert role.login(role.password) and creator.login(creator.password) and member.login(member.password)
    with postgres.connect() as admin:  # the admin login still works with its password
        assert admin.execute("SELECT current_user").fetchone() == (postgres.superuser,)
    for user, password in ((redis_user, redis_password), ("default", redis_server.password)):
        assert redis.Redis(host=redis_server.host, port=redis_server.port, username=user, password=password).ping()
    cluster.delete_rotations()
