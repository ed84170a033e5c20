"""The attack tour of issue 13: a tenant of namespace team-a (the test's fresh namespace) that may only create and
read runbook.dev objects there (plus ConfigMaps where a path needs that) tries every path of "What is open
today", each as a real object applied with the tenant's own ServiceAccount token against the real API server,
the operator running in-process with the shipped RBAC (conftest's operator_kubeconfig). Each attempt must be
refused before any data or credential leaves, with a condition naming the field, and the attacker's side
(a PostgreSQL asking for cleartext, an S3 endpoint recording requests, the target database, the Secret, the
other namespace) is checked to have received nothing. The platform's own things (Secrets, Deployments, the
RunbookGrant a cluster administrator made) are created with the admin client, as a platform team would."""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import kopf.testing
import kubernetes
import pytest
from tests.helpers import token_kubeconfig
from tests.restore_support import (
    OWNER,
    OWNER_PASSWORD,
    Backup,
    Kubelet,
    create_empty_database,
    create_shop,
    database_text,
    make_backup,
    private_key,
    swap_object,
)
from tests.services import CleartextTrap, GpgKeyring, Postgres, S3Server

from runbook_operator.builders.restore import DRILL_LABEL
from runbook_operator.models.plans import MANIFEST_KEY_ENV, MANIFEST_KEY_SECRET, MANIFEST_KEY_SECRET_KEY

pytestmark = pytest.mark.integration

GROUP, VERSION = "runbook.dev", "v1alpha1"
OPERATOR = "system:serviceaccount:runbook-system:runbook-operator"
OPERATOR_ARGS = ["run", "--standalone", "-m", "runbook_operator.main"]
KINDS = {
    "backuppolicies": "BackupPolicy",
    "backuprestores": "BackupRestore",
    "secretrotations": "SecretRotation",
    "emergencyisolations": "EmergencyIsolation",
}
S3_SECRET = "backup-s3-credentials"
DB_SECRET = "db-credentials"
ADMIN_SECRET = "postgres-admin"
RECIPIENTS = "backup-gpg-recipients"
PRIVATE_KEY_SECRET = "restore-gpg-private"
MANIFEST_KEY = "team-a-manifest-signing-key-0123456789"
WaitFor = Callable[..., Any]


# --- the attacker's tools ------------------------------------------------------------------------------


class AttackerS3:
    """An S3 endpoint the attacker runs on 127.0.0.1: it answers every request (200, an empty XML body) and
    records each one's method, path and Authorization header (a signed request means an access key id and a
    signature left the operator; a PUT body would be the data)."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        lock = threading.Lock()
        requests = self.requests

        class Handler(BaseHTTPRequestHandler):
            def _answer(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                with lock:
                    requests.append(
                        {
                            "method": self.command,
                            "path": self.path,
                            "authorization": self.headers.get("Authorization"),
                            "bytes": len(body),
                        }
                    )
                payload = b'<?xml version="1.0" encoding="UTF-8"?><ListBucketResult></ListBucketResult>'
                self.send_response(200)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(payload)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _answer

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.endpoint = f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> AttackerS3:
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


class Tenant:
    """The attacker's own client: a ServiceAccount token of team-a, nothing else."""

    def __init__(self, client: kubernetes.client.ApiClient, namespace: str) -> None:
        self.client, self.namespace = client, namespace
        self.custom = kubernetes.client.CustomObjectsApi(client)
        self.core = kubernetes.client.CoreV1Api(client)

    def create(self, plural: str, name: str, spec: dict[str, Any]) -> None:
        body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": KINDS[plural], "metadata": {"name": name}, "spec": spec}
        self.custom.create_namespaced_custom_object(GROUP, VERSION, self.namespace, plural, body)

    def patch_spec(self, plural: str, name: str, spec: dict[str, Any]) -> None:
        self.custom.patch_namespaced_custom_object(GROUP, VERSION, self.namespace, plural, name, {"spec": spec})


class Platform(Kubelet):
    """The admin's view of team-a (and of the attacker's targets), for setup and for checking what happened;
    the kubelet's part for its Jobs' pods (``Kubelet``)."""

    def __init__(self, api: kubernetes.client.ApiClient, namespace: str, wait_for: WaitFor) -> None:
        self.api, self.namespace, self.wait_for = api, namespace, wait_for
        self.core = kubernetes.client.CoreV1Api(api)
        self.apps = kubernetes.client.AppsV1Api(api)
        self.batch = kubernetes.client.BatchV1Api(api)
        self.rbac = kubernetes.client.RbacAuthorizationV1Api(api)
        self.net = kubernetes.client.NetworkingV1Api(api)
        self.custom = kubernetes.client.CustomObjectsApi(api)

    def secret(self, name: str, data: dict[str, str], *, namespace: str | None = None, **extra: Any) -> None:
        body = {"metadata": {"name": name, **extra.pop("metadata", {})}, "stringData": data, **extra}
        self.core.create_namespaced_secret(namespace or self.namespace, body)

    def secret_data(self, name: str, namespace: str | None = None) -> dict[str, str]:
        secret = self.core.read_namespaced_secret(name, namespace or self.namespace)
        return dict(secret.data or {})

    def config_map(self, name: str, data: dict[str, str]) -> None:
        self.core.create_namespaced_config_map(self.namespace, {"metadata": {"name": name}, "data": data})

    def get(self, plural: str, name: str) -> dict[str, Any]:
        return dict(self.custom.get_namespaced_custom_object(GROUP, VERSION, self.namespace, plural, name))

    def conditions(self, plural: str, name: str) -> list[dict[str, Any]]:
        return list((self.get(plural, name).get("status") or {}).get("conditions") or [])

    def refusal(self, plural: str, name: str, field: str, *, timeout: float = 60) -> dict[str, Any]:
        """The condition (status False) whose message names ``field``: what the tenant is told."""

        def named() -> dict[str, Any] | None:
            for condition in self.conditions(plural, name):
                if condition.get("status") == "False" and field in (condition.get("message") or ""):
                    return condition
            return None

        try:
            found: dict[str, Any] = self.wait_for(named, timeout=timeout, what=f"{name}: a condition naming {field}")
        except BaseException:
            print(json.dumps(self.get(plural, name).get("status"), indent=1))
            raise
        return found

    def jobs(self) -> list[str]:
        return [j.metadata.name for j in self.batch.list_namespaced_job(self.namespace).items]

    def cron_jobs(self) -> list[str]:
        return [j.metadata.name for j in self.batch.list_namespaced_cron_job(self.namespace).items]

    def rbac_in(self, namespace: str) -> list[str]:
        """Roles, RoleBindings and ServiceAccounts the operator made in ``namespace`` (its managed-by label)."""
        selector = "app.kubernetes.io/managed-by=runbook-operator"
        roles = self.rbac.list_namespaced_role(namespace, label_selector=selector).items
        bindings = self.rbac.list_namespaced_role_binding(namespace, label_selector=selector).items
        accounts = self.core.list_namespaced_service_account(namespace, label_selector=selector).items
        return [f"{type(o).__name__}/{o.metadata.name}" for o in (*roles, *bindings, *accounts)]

    def events(self, name: str) -> list[str]:
        items = self.core.list_namespaced_event(self.namespace, field_selector=f"involvedObject.name={name}").items
        return [f"{e.reason}: {e.message}" for e in items]


def can(api: kubernetes.client.ApiClient, verb: str, resource: str, namespace: str, group: str = "") -> bool:
    """Whether the operator's ServiceAccount may ``verb`` ``resource`` in ``namespace`` ("" = cluster-wide)."""
    attributes = {"group": group, "resource": resource, "verb": verb}
    if namespace:
        attributes["namespace"] = namespace
    review = kubernetes.client.AuthorizationV1Api(api).create_subject_access_review(
        {
            "spec": {
                "user": OPERATOR,
                "groups": ["system:serviceaccounts", "system:serviceaccounts:runbook-system", "system:authenticated"],
                "resourceAttributes": attributes,
            }
        }
    )
    return bool(review.status.allowed)


# --- fixtures ------------------------------------------------------------------------------------------


@pytest.fixture
def platform(
    api: kubernetes.client.ApiClient, crds_installed: list[str], namespace: str, wait_for: WaitFor
) -> Platform:
    return Platform(api, namespace, wait_for)


@pytest.fixture
def make_tenant(
    api: kubernetes.client.ApiClient, kubeconfig: Path, namespace: str, tmp_path: Path
) -> Callable[..., Tenant]:
    """The tenant of team-a: a ServiceAccount whose Role allows runbook.dev objects (create, read, change,
    delete) in team-a only, and ConfigMaps when ``configmaps`` (the paths that need ConfigMap write); no
    Secrets, no workloads, nothing elsewhere. Its own token, through a kubeconfig of its own."""

    def make(*, configmaps: bool = False) -> Tenant:
        core = kubernetes.client.CoreV1Api(api)
        rbac = kubernetes.client.RbacAuthorizationV1Api(api)
        core.create_namespaced_service_account(namespace, {"metadata": {"name": "tenant"}})
        rules = [
            {
                "apiGroups": [GROUP],
                "resources": [*KINDS, "scalingprofiles"],
                "verbs": ["get", "list", "watch", "create", "update", "patch", "delete"],
            }
        ]
        if configmaps:
            rules.append(
                {"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get", "list", "create", "update", "patch"]}
            )
        rbac.create_namespaced_role(namespace, {"metadata": {"name": "tenant"}, "rules": rules})
        rbac.create_namespaced_role_binding(
            namespace,
            {
                "metadata": {"name": "tenant"},
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "tenant"},
                "subjects": [{"kind": "ServiceAccount", "name": "tenant", "namespace": namespace}],
            },
        )
        token = core.create_namespaced_service_account_token(
            "tenant", namespace, {"spec": {"expirationSeconds": 3600}}
        ).status.token
        config = token_kubeconfig(kubeconfig, token, tmp_path / "tenant-kubeconfig")
        tenant = Tenant(kubernetes.config.new_client_from_config(config_file=str(config)), namespace)
        with pytest.raises(kubernetes.client.ApiException) as denied:  # really only what the Role says
            tenant.core.read_namespaced_secret(S3_SECRET, namespace)
        assert denied.value.status == 403
        return tenant

    return make


@pytest.fixture
def tenant(make_tenant: Callable[..., Tenant]) -> Tenant:
    return make_tenant()


@pytest.fixture
def grant(api: kubernetes.client.ApiClient, crds_installed: list[str], namespace: str) -> Iterator[Callable[..., None]]:
    """A cluster administrator's RunbookGrant for team-a (create it before the operator starts)."""
    objects = kubernetes.client.CustomObjectsApi(api)
    created: list[str] = []

    def make(**spec: Any) -> None:
        name = f"{namespace}-{len(created)}"
        body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "RunbookGrant", "metadata": {"name": name}}
        objects.create_cluster_custom_object(
            GROUP, VERSION, "runbookgrants", {**body, "spec": {"namespaces": [namespace], **spec}}
        )
        created.append(name)

    yield make
    for name in created:
        try:
            objects.delete_cluster_custom_object(GROUP, VERSION, "runbookgrants", name)
        except kubernetes.client.ApiException as error:
            if error.status != 404:
                raise


@pytest.fixture
def attacker_s3() -> Iterator[AttackerS3]:
    with AttackerS3() as server:
        yield server


@pytest.fixture
def trap() -> Iterator[CleartextTrap]:
    with CleartextTrap() as server:
        yield server


@contextmanager
def operator(*namespaces: str) -> Iterator[kopf.testing.KopfRunner]:
    """The operator in-process (the shipped RBAC: conftest points it at its ServiceAccount's token)."""
    args = [arg for ns in namespaces for arg in ("--namespace", ns)]
    with kopf.testing.KopfRunner([*OPERATOR_ARGS, *args], timeout=60) as runner:
        yield runner


@pytest.fixture
def bucket(s3_server: S3Server) -> str:
    name = f"team-a-{uuid.uuid4().hex[:10]}"
    s3_server.client().create_bucket(Bucket=name)
    return name


@pytest.fixture
def team_a(platform: Platform, s3_server: S3Server, gpg_keyring: GpgKeyring) -> Platform:
    """What the platform team put into team-a: the S3 keys, the database login, the recipients' public key,
    the restore key, the namespace's manifest signing key."""
    platform.secret(
        S3_SECRET, {"AWS_ACCESS_KEY_ID": s3_server.access_key, "AWS_SECRET_ACCESS_KEY": s3_server.secret_key}
    )
    platform.secret(DB_SECRET, {"username": OWNER, "password": OWNER_PASSWORD})
    platform.secret(ADMIN_SECRET, {"username": Postgres.superuser, "password": Postgres.password})
    platform.secret(PRIVATE_KEY_SECRET, {"private.asc": private_key(gpg_keyring)})
    platform.secret(MANIFEST_KEY_SECRET, {MANIFEST_KEY_SECRET_KEY: MANIFEST_KEY})
    platform.config_map(RECIPIENTS, {"team.asc": gpg_keyring.public_key})
    return platform


def allow_database_and_bucket(grant: Callable[..., None], postgres: Postgres, s3_server: S3Server, bucket: str) -> None:
    """What the administrator allows team-a: the real PostgreSQL (by address, without TLS) and its bucket."""
    grant(
        hosts=[{"host": postgres.host, "port": postgres.port}],
        s3=[{"endpoint": s3_server.endpoint, "buckets": [bucket]}],
        plaintextConnections=True,
    )


def pg_source(postgres: Postgres, database: str) -> dict[str, Any]:
    return {
        "postgresql": {
            "host": postgres.host,
            "port": postgres.port,
            "database": database,
            "credentialsSecretRef": {"name": DB_SECRET},
            "insecurePlaintext": True,
        }
    }


def s3_destination(endpoint: str | None, bucket: str, *, credentials: bool = True) -> dict[str, Any]:
    s3: dict[str, Any] = {"bucket": bucket, "prefix": "backups", "serverSideEncryption": "None"}
    if endpoint is not None:
        s3["endpoint"] = endpoint
    if credentials:
        s3["credentialsSecretRef"] = {"name": S3_SECRET}
    return {"s3": s3}


def policy_spec(source: dict[str, Any], destination: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {
        "source": source,
        "schedule": "0 */6 * * *",
        "destination": destination,
        "encryption": {"gpg": {"recipientsConfigMapRef": {"name": RECIPIENTS, "key": "team.asc"}}},
        **extra,
    }


def assert_refused(condition: dict[str, Any], *reasons: str) -> None:
    assert condition["reason"] in reasons, condition


# --- 1. cross-namespace export -------------------------------------------------------------------------


@pytest.mark.parametrize("other", ["kube-system", "runbook-system", "team-b"])
def test_1_export_of_another_namespace_is_refused(
    team_a: Platform,
    tenant: Tenant,
    grant: Callable[..., None],
    s3_server: S3Server,
    bucket: str,
    other: str,
) -> None:
    if other == "team-b":  # another team's namespace, with a Secret worth stealing
        other = f"{team_a.namespace}-b"
        team_a.core.create_namespace({"metadata": {"name": other, "labels": {"runbook.dev/test": "true"}}})
        team_a.secret("payroll-db", {"password": "team-b-secret"}, namespace=other)
    grant(s3=[{"endpoint": s3_server.endpoint, "buckets": [bucket]}])
    try:
        with operator(team_a.namespace):
            spec = policy_spec(
                {"kubernetes": {"namespaces": [other], "resources": ["configmaps"], "includeSecrets": True}},
                s3_destination(s3_server.endpoint, bucket),
            )
            tenant.create("backuppolicies", "loot", spec)
            condition = team_a.refusal("backuppolicies", "loot", "spec.source.kubernetes.namespaces[0]")
        assert_refused(condition, "NotPermitted")
        assert team_a.rbac_in(other) == []  # no Role lets the policy's account read there
        assert team_a.cron_jobs() == [] and team_a.jobs() == []  # nothing would ship anything
        assert team_a.rbac_in(team_a.namespace) == []
        assert s3_server.client().list_objects_v2(Bucket=bucket).get("KeyCount") == 0
    finally:
        if other.endswith("-b"):
            team_a.core.delete_namespace(other)


# --- 2. Secrets used against hosts the user picks ------------------------------------------------------


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "2130706433"])
def test_2_restore_into_a_host_the_tenant_runs_is_refused(
    team_a: Platform,
    tenant: Tenant,
    grant: Callable[..., None],
    postgres: Postgres,
    s3_server: S3Server,
    bucket: str,
    trap: CleartextTrap,
    host: str,
) -> None:
    """The policy is the team's real one; the restore's target is the attacker's server: it would receive the
    decrypted dump and the policy's login."""
    shop = create_shop(postgres)
    allow_database_and_bucket(grant, postgres, s3_server, bucket)
    with operator(team_a.namespace):
        tenant.create(
            "backuppolicies", "db", policy_spec(pg_source(postgres, shop), s3_destination(s3_server.endpoint, bucket))
        )
        spec = {
            "policyRef": "db",
            "backup": "latest",
            "decryptionSecretRef": {"name": PRIVATE_KEY_SECRET, "key": "private.asc"},
            "target": {"host": host, "port": trap.port},
        }
        tenant.create("backuprestores", "exfiltrate", spec)
        condition = team_a.refusal("backuprestores", "exfiltrate", "spec.target.host")
    assert_refused(condition, "NotPermitted")
    assert team_a.jobs() == []  # no restore Job carries the dump and the login anywhere
    assert trap.startups == [] and trap.received == b""


def test_2_backup_to_an_endpoint_the_tenant_runs_is_refused(
    team_a: Platform,
    tenant: Tenant,
    grant: Callable[..., None],
    postgres: Postgres,
    s3_server: S3Server,
    bucket: str,
    attacker_s3: AttackerS3,
) -> None:
    shop = create_shop(postgres)
    allow_database_and_bucket(grant, postgres, s3_server, bucket)
    with operator(team_a.namespace):
        spec = policy_spec(pg_source(postgres, shop), s3_destination(attacker_s3.endpoint, bucket))
        tenant.create("backuppolicies", "upload", spec)
        condition = team_a.refusal("backuppolicies", "upload", "spec.destination.s3.endpoint")
    assert_refused(condition, "NotPermitted")
    assert attacker_s3.requests == []  # not even the bucket check, signed with the team's keys
    assert team_a.cron_jobs() == [] and team_a.jobs() == []


@pytest.mark.parametrize("where", ["aws", "granted-endpoint"])
def test_2_ambient_operator_credentials_are_never_used_for_a_tenant(
    team_a: Platform,
    tenant: Tenant,
    grant: Callable[..., None],
    postgres: Postgres,
    attacker_s3: AttackerS3,
    monkeypatch: pytest.MonkeyPatch,
    where: str,
) -> None:
    """No credentialsSecretRef: the operator's own identity would sign the calls. Its environment holds
    credentials here, and every AWS call of the process goes to the recorder (AWS_ENDPOINT_URL)."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAOPERATORAMBIENT")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "operator-ambient-secret")
    monkeypatch.setenv("AWS_ENDPOINT_URL", attacker_s3.endpoint)
    shop = create_shop(postgres)
    grant(hosts=[{"host": postgres.host, "port": postgres.port}], plaintextConnections=True)
    if where == "granted-endpoint":  # the administrator allowed the endpoint and bucket, not ambient credentials
        grant(s3=[{"endpoint": attacker_s3.endpoint, "buckets": ["team-a-loot"]}])
    endpoint = attacker_s3.endpoint if where == "granted-endpoint" else None
    with operator(team_a.namespace):
        spec = policy_spec(pg_source(postgres, shop), s3_destination(endpoint, "team-a-loot", credentials=False))
        tenant.create("backuppolicies", "ambient", spec)
        condition = team_a.refusal("backuppolicies", "ambient", "spec.destination.s3.credentialsSecretRef")
    assert_refused(condition, "NotPermitted")
    assert attacker_s3.requests == []
    assert team_a.cron_jobs() == []


def test_2_evidence_to_an_endpoint_the_tenant_runs_is_refused(
    team_a: Platform, tenant: Tenant, attacker_s3: AttackerS3
) -> None:
    with operator(team_a.namespace):
        spec = {
            "reason": "drill",
            "incidentId": "INC-1",
            "network": {"isolate": True},
            "scaleToZero": {"enabled": False},
            "evidence": {
                "capture": True,
                "required": True,
                "destination": {
                    "bucket": "loot",
                    "endpoint": attacker_s3.endpoint,
                    "credentialsSecretRef": {"name": S3_SECRET},
                },
                "encryption": {"gpg": {"recipientsConfigMapRef": {"name": RECIPIENTS, "key": "team.asc"}}},
            },
        }
        tenant.create("emergencyisolations", "grab", spec)
        condition = team_a.refusal("emergencyisolations", "grab", "spec.evidence.destination.endpoint")
    assert_refused(condition, "NotPermitted")
    assert attacker_s3.requests == []  # no pod specs, logs or Events uploaded, no signed request


def test_2_rotation_against_a_host_the_tenant_runs_is_refused(
    team_a: Platform, tenant: Tenant, trap: CleartextTrap
) -> None:
    """The admin login of the rotation's adminSecretRef would go to the trap."""
    before = team_a.secret_data(DB_SECRET)
    with operator(team_a.namespace):
        spec = {
            "secretRef": {"name": DB_SECRET, "key": "password"},
            "interval": "30d",
            "target": {
                "postgresql": {
                    "host": trap.host,
                    "port": trap.port,
                    "user": OWNER,
                    "adminSecretRef": {"name": ADMIN_SECRET},
                    "insecurePlaintext": True,
                }
            },
        }
        tenant.create("secretrotations", "phish", spec)
        condition = team_a.refusal("secretrotations", "phish", "spec.target.postgresql.host")
    assert_refused(condition, "NotPermitted")
    assert trap.startups == [] and trap.received == b""
    assert team_a.secret_data(DB_SECRET) == before


@pytest.mark.parametrize("kind", ["secretrotations", "backuppolicies"])
def test_2_a_granted_host_asking_for_cleartext_gets_no_password(
    team_a: Platform,
    tenant: Tenant,
    grant: Callable[..., None],
    s3_server: S3Server,
    bucket: str,
    trap: CleartextTrap,
    kind: str,
) -> None:
    """Even where the administrator allowed the host and plaintext, a server asking for the password in
    cleartext gets none: libpq is told require_auth=scram-sha-256."""
    grant(
        hosts=[{"host": trap.host, "port": trap.port}],
        s3=[{"endpoint": s3_server.endpoint, "buckets": [bucket]}],
        plaintextConnections=True,
    )
    with operator(team_a.namespace):
        if kind == "secretrotations":
            spec = {
                "secretRef": {"name": DB_SECRET, "key": "password"},
                "interval": "30d",
                "rotateNow": "now",
                "target": {
                    "postgresql": {
                        "host": trap.host,
                        "port": trap.port,
                        "user": OWNER,
                        "adminSecretRef": {"name": ADMIN_SECRET},
                        "insecurePlaintext": True,
                    }
                },
            }
        else:
            source = {
                "postgresql": {
                    "host": trap.host,
                    "port": trap.port,
                    "database": "shop",
                    "credentialsSecretRef": {"name": DB_SECRET},
                    "insecurePlaintext": True,
                }
            }
            spec = policy_spec(source, s3_destination(s3_server.endpoint, bucket))
        tenant.create(kind, "granted", spec)
        if kind == "backuppolicies":  # the login is the backup agent's: run the CronJob's pod as a process
            team_a.wait_for(team_a.cron_jobs, timeout=60, what="the backup CronJob")
            cron_job = team_a.batch.read_namespaced_cron_job(team_a.cron_jobs()[0], team_a.namespace)
            result = team_a.run_container(
                cron_job.spec.job_template.spec.template.spec.containers[0], "tenancy-test-run"
            )
            assert result.returncode != 0
        team_a.wait_for(lambda: trap.startups, timeout=60, what="a login attempt at the granted host")
    assert not trap.received_password(), trap.received
    assert Postgres.password.encode() not in trap.received and OWNER_PASSWORD.encode() not in trap.received


# --- 3. drills that hit production ---------------------------------------------------------------------


def signed_backup(
    postgres: Postgres, database: str, s3_server: S3Server, keyring: GpgKeyring, namespace: str
) -> Backup:
    """A real backup of the team's database by the backup agent, signed with team-a's manifest key."""
    return make_backup(
        postgres, database, s3_server, keyring, namespace=namespace, policy="db", **{MANIFEST_KEY_ENV: MANIFEST_KEY}
    )


def drill_of(platform: Platform, policy: str) -> str:
    def found() -> str | None:
        items = platform.custom.list_namespaced_custom_object(
            GROUP, VERSION, platform.namespace, "backuprestores", label_selector=f"{DRILL_LABEL}={policy}"
        )["items"]
        return items[0]["metadata"]["name"] if items else None

    name: str = platform.wait_for(found, timeout=120, what="a drill to be created")
    return name


@pytest.mark.parametrize(
    ("target", "field", "reason"),
    [
        ({"host": "localhost"}, "spec.verification.target", "TargetIsSource"),  # the same server, another name
        ({"host": "2130706433"}, "spec.verification.target.host", "NotPermitted"),  # 127.0.0.1 as a number
        ({"database": "dbname={shop}"}, "spec.verification.target.database", "InvalidDatabaseName"),
    ],
    ids=["alias", "ip-as-number", "dbname-connstring"],
)
def test_3_a_drill_never_restores_over_the_source(
    team_a: Platform,
    tenant: Tenant,
    grant: Callable[..., None],
    postgres: Postgres,
    s3_server: S3Server,
    gpg_keyring: GpgKeyring,
    target: dict[str, Any],
    field: str,
    reason: str,
) -> None:
    shop = create_shop(postgres)
    backup = signed_backup(postgres, shop, s3_server, gpg_keyring, team_a.namespace)
    # The administrator allows the database server under both of its names (a grant lists exact strings).
    grant(
        hosts=[{"host": postgres.host, "port": postgres.port}, {"host": "localhost", "port": postgres.port}],
        s3=[{"endpoint": s3_server.endpoint, "buckets": [backup.bucket]}],
        plaintextConnections=True,
    )
    scratch = {k: (v.format(shop=shop) if isinstance(v, str) else v) for k, v in target.items()}
    scratch.setdefault("database", shop)  # the source's own database, under another host name
    before = database_text(postgres, shop)
    with operator(team_a.namespace):
        spec = policy_spec(
            pg_source(postgres, shop),
            s3_destination(s3_server.endpoint, backup.bucket),
            verification={
                "schedule": "* * * * *",
                "target": scratch,
                "decryptionSecretRef": {"name": PRIVATE_KEY_SECRET, "key": "private.asc"},
            },
        )
        tenant.create("backuppolicies", "db", spec)

        def refused() -> dict[str, Any] | None:
            """A False condition naming the field: on the policy (Ready, Verified) or on a drill it made."""
            drills = team_a.custom.list_namespaced_custom_object(
                GROUP, VERSION, team_a.namespace, "backuprestores", label_selector=f"{DRILL_LABEL}=db"
            )["items"]
            objects = [("backuppolicies", "db"), *(("backuprestores", d["metadata"]["name"]) for d in drills)]
            for plural, name in objects:
                for condition in team_a.conditions(plural, name):
                    if condition.get("status") == "False" and field in (condition.get("message") or ""):
                        return {**condition, "object": f"{plural}/{name}"}
            return None

        condition = team_a.wait_for(refused, timeout=150, what=f"a condition naming {field}")
        print("drill refusal:", condition)
        assert_refused(condition, reason)
    assert team_a.jobs() == []  # no drill Job was ever made
    assert database_text(postgres, shop) == before


# --- 4. rotation of any role into any Secret -----------------------------------------------------------


def make_role(postgres: Postgres, attributes: str) -> tuple[str, str]:
    name, password = f"r_{uuid.uuid4().hex[:8]}", "role-pw-1a2b3c"
    with postgres.connect() as conn:
        conn.execute(f"CREATE ROLE {name} LOGIN {attributes} PASSWORD '{password}'")
    return name, password


def logs_in(postgres: Postgres, user: str, password: str) -> bool:
    import psycopg

    try:
        with postgres.connect(user=user, password=password):
            return True
    except psycopg.OperationalError:
        return False


@pytest.mark.parametrize(
    ("attributes", "strategy"),
    [
        ("ADMIN", "single"),  # the admin login itself (postgres)
        ("SUPERUSER", "single"),
        ("CREATEROLE", "single"),
        ("REPLICATION", "single"),
        ("BYPASSRLS", "single"),
        ("ADMIN", "dual"),  # postgres_a would become a superuser
    ],
)
def test_4_rotation_of_a_privileged_role_is_refused(
    team_a: Platform,
    tenant: Tenant,
    grant: Callable[..., None],
    postgres: Postgres,
    attributes: str,
    strategy: str,
) -> None:
    if attributes == "ADMIN":
        user, password = Postgres.superuser, Postgres.password
    else:
        user, password = make_role(postgres, attributes)
    grant(hosts=[{"host": postgres.host, "port": postgres.port}], plaintextConnections=True)
    team_a.secret("app-login", {"username": user, "password": password})
    before = team_a.secret_data("app-login")
    with operator(team_a.namespace):
        spec: dict[str, Any] = {
            "secretRef": {"name": "app-login", "key": "password", "usernameKey": "username"},
            "interval": "30d",
            "rotateNow": "now",
            "strategy": strategy,
            "target": {
                "postgresql": {
                    "host": postgres.host,
                    "port": postgres.port,
                    "user": user,
                    "adminSecretRef": {"name": ADMIN_SECRET},
                    "insecurePlaintext": True,
                }
            },
        }
        tenant.create("secretrotations", "takeover", spec)
        condition = team_a.refusal("secretrotations", "takeover", "spec.target.postgresql.user")
    assert_refused(condition, "RoleNotRotatable")
    assert logs_in(postgres, user, password)  # the password was not changed
    assert team_a.secret_data("app-login") == before
    with postgres.connect() as conn:
        made = conn.execute(
            "SELECT rolname FROM pg_roles WHERE rolname IN (%s, %s)", (f"{user}_a", f"{user}_b")
        ).fetchall()
    assert made == []


@pytest.mark.parametrize("victim", ["tls", "owned"])
def test_4_secret_only_rotation_never_overwrites_a_secret_it_does_not_own(
    team_a: Platform, tenant: Tenant, victim: str
) -> None:
    """A TLS Secret's key, or a Secret another controller owns (an ownerReference), named as secretRef."""
    if victim == "tls":
        team_a.secret("ingress-tls", {"tls.crt": "CERT", "tls.key": "KEY"}, type="kubernetes.io/tls")
        name, key = "ingress-tls", "tls.key"
    else:
        owner = team_a.core.create_namespaced_config_map(team_a.namespace, {"metadata": {"name": "cert-owner"}})
        reference = {"apiVersion": "v1", "kind": "ConfigMap", "name": "cert-owner", "uid": owner.metadata.uid}
        team_a.secret("issued", {"token": "ISSUED"}, metadata={"ownerReferences": [reference]})
        name, key = "issued", "token"
    before = team_a.secret_data(name)
    with operator(team_a.namespace):
        spec = {"secretRef": {"name": name, "key": key}, "interval": "30d", "rotateNow": "now"}
        tenant.create("secretrotations", "overwrite", spec)
        condition = team_a.refusal("secretrotations", "overwrite", "spec.secretRef.name")
    assert_refused(condition, "SecretNotRotatable")
    assert team_a.secret_data(name) == before


# --- 5. restore integrity ------------------------------------------------------------------------------


def forge(s3_server: S3Server, backup: Backup, how: str) -> None:
    """What a bucket writer without the signing key can do to the newest backup's manifest."""
    client = s3_server.client()
    keys = [
        o["Key"] for o in client.list_objects_v2(Bucket=backup.bucket)["Contents"] if o["Key"].endswith("manifest.json")
    ]
    manifest = dict(backup.manifest)
    manifest["data"] = {**manifest["data"], "sha256": "0" * 64}
    if how == "unsigned":
        manifest.pop("signature", None)
    else:
        manifest["signature"] = "f" * 64
    client.put_object(Bucket=backup.bucket, Key=keys[0], Body=json.dumps(manifest).encode())


@pytest.mark.parametrize("how", ["unsigned", "forged", "swapped"])
@pytest.mark.parametrize("by", ["restore", "drill"])
def test_5_a_backup_a_bucket_writer_forged_is_never_restored(
    team_a: Platform,
    tenant: Tenant,
    grant: Callable[..., None],
    postgres: Postgres,
    s3_server: S3Server,
    gpg_keyring: GpgKeyring,
    how: str,
    by: str,
) -> None:
    """unsigned/forged: the manifest rewritten without the key (refused before any Job); swapped: another valid
    archive (with padding) under the signed manifest's key: the preflight's verify Job refuses it
    (ChecksumMismatch), no restore Job is made, the target stays unchanged."""
    shop = create_shop(postgres)
    backup = signed_backup(postgres, shop, s3_server, gpg_keyring, team_a.namespace)
    target = create_empty_database(postgres, "target") if by == "drill" else shop
    if how == "swapped":
        attacker_db = create_shop(postgres)
        with postgres.connect(attacker_db, user=OWNER, password=OWNER_PASSWORD) as conn:
            conn.execute("INSERT INTO customers VALUES (999999, 'ATTACKER ROW')")
        other = make_backup(postgres, attacker_db, s3_server, gpg_keyring, namespace=team_a.namespace, policy="db")
        swap_object(s3_server, backup, other, padding=1 << 20)
    else:
        forge(s3_server, backup, how)
    grant(
        hosts=[{"host": postgres.host, "port": postgres.port}],
        s3=[{"endpoint": s3_server.endpoint, "buckets": [backup.bucket]}],
        plaintextConnections=True,
    )
    before = database_text(postgres, target)
    extra: dict[str, Any] = {}
    if by == "drill":
        extra["verification"] = {
            "schedule": "* * * * *",
            "target": {"database": target},
            "decryptionSecretRef": {"name": PRIVATE_KEY_SECRET, "key": "private.asc"},
        }
    with operator(team_a.namespace), team_a.verify_pods() as verified:
        tenant.create(
            "backuppolicies",
            "db",
            policy_spec(pg_source(postgres, shop), s3_destination(s3_server.endpoint, backup.bucket), **extra),
        )
        if by == "restore":
            name = "poisoned"
            tenant.create(
                "backuprestores",
                name,
                {
                    "policyRef": "db",
                    "backup": "latest",
                    "decryptionSecretRef": {"name": PRIVATE_KEY_SECRET, "key": "private.asc"},
                },
            )
        else:
            name = drill_of(team_a, "db")

        ran: list[str] = []

        def ended_once() -> dict[str, Any] | None:
            status = team_a.get("backuprestores", name).get("status") or {}
            if status.get("phase") in ("Failed", "Succeeded"):
                return status
            job = status.get("jobName")
            if job and job in team_a.jobs() and job not in ran:
                ran.append(job)
                result = team_a.run_job_pod(job)
                print("agent:", result.returncode, result.stderr[-2000:])
            return None

        status = team_a.wait_for(ended_once, timeout=180, what=f"{name} to end")
    assert status["phase"] == "Failed", status
    ready = next(c for c in status["conditions"] if c["type"] == "Ready")
    if how == "swapped":
        assert ready["reason"] == "ChecksumMismatch", ready
        assert verified and all(r.returncode == 1 and "ChecksumMismatch" in r.stderr for r in verified), verified
    else:
        assert ready["reason"] in ("ManifestUnsigned", "ManifestForged"), ready
        assert verified == []  # refused before any Job
    assert ran == []  # no restore Job
    assert database_text(postgres, target) == before


# --- 6. saved policies are trusted ---------------------------------------------------------------------


ALLOW_ALL = {
    "apiVersion": "networking.k8s.io/v1",
    "kind": "NetworkPolicy",
    "metadata": {"name": "attacker-allow-all"},
    "spec": {"podSelector": {}, "ingress": [{}], "egress": [{}], "policyTypes": ["Ingress", "Egress"]},
}


@pytest.mark.parametrize("when", ["before", "during"])
def test_6_saved_policies_written_by_a_configmap_writer_are_never_created(
    team_a: Platform, make_tenant: Callable[..., Tenant], when: str
) -> None:
    """The attacker pre-creates (or edits during the isolation) <name>-saved-policies with an allow-all
    policy and a malformed entry; release must not create the policy and must bring the workloads back."""
    tenant = make_tenant(configmaps=True)
    labels = {"app": "api"}
    team_a.apps.create_namespaced_deployment(
        team_a.namespace,
        {
            "metadata": {"name": "api", "labels": labels},
            "spec": {
                "replicas": 2,
                "selector": {"matchLabels": labels},
                "template": {
                    "metadata": {"labels": labels},
                    "spec": {"containers": [{"name": "api", "image": "registry.invalid/api:1"}]},
                },
            },
        },
    )
    team_a.net.create_namespaced_network_policy(
        team_a.namespace,
        {
            "metadata": {"name": "allow-web"},
            "spec": {"podSelector": labels, "ingress": [{}], "policyTypes": ["Ingress"]},
        },
    )
    poisoned = {"attacker-allow-all.json": json.dumps(ALLOW_ALL), "broken.json": "{not json"}
    saved = "incident-saved-policies"
    if when == "before":
        tenant.core.create_namespaced_config_map(team_a.namespace, {"metadata": {"name": saved}, "data": poisoned})
    spec = {
        "reason": "drill",
        "incidentId": "INC-6",
        "network": {"isolate": True, "overrideExistingPolicies": True},
        "scaleToZero": {"enabled": True},
        "evidence": {"capture": False},
    }

    def replicas() -> int:
        return int(team_a.apps.read_namespaced_deployment("api", team_a.namespace).spec.replicas)

    def phase() -> str:
        return str((team_a.get("emergencyisolations", "incident").get("status") or {}).get("phase"))

    with operator(team_a.namespace):
        tenant.create("emergencyisolations", "incident", spec)
        team_a.wait_for(lambda: phase() == "Isolated" and replicas() == 0, timeout=60, what="isolated")
        if when == "during":  # the legacy ConfigMap planted mid-isolation, and the status the operator keeps
            tenant.core.create_namespaced_config_map(team_a.namespace, {"metadata": {"name": saved}, "data": poisoned})
            with pytest.raises(kubernetes.client.ApiException) as denied:
                tenant.custom.patch_namespaced_custom_object_status(
                    GROUP,
                    VERSION,
                    team_a.namespace,
                    "emergencyisolations",
                    "incident",
                    {"status": {"savedPolicies": [ALLOW_ALL]}},
                )
            assert denied.value.status == 403
        tenant.patch_spec("emergencyisolations", "incident", {"released": True})
        team_a.wait_for(lambda: phase() == "Released", timeout=60, what="released")
    policies = [p.metadata.name for p in team_a.net.list_namespaced_network_policy(team_a.namespace).items]
    assert "attacker-allow-all" not in policies
    assert sorted(policies) == ["allow-web"]  # the removed policy came back, emergency-isolate is gone
    assert replicas() == 2  # the workloads came back


# --- 7. gpg recipients ---------------------------------------------------------------------------------


def other_key(tmp_path: Path, kind: str) -> tuple[str, str]:
    """An armored public key and its fingerprint: the attacker's encryption key, an expired one, or sign-only."""
    keyring = GpgKeyring(tmp_path / kind, email=f"{kind}@example.com")
    keyring.home.mkdir(mode=0o700)
    if kind == "sign-only":
        keyring.run("--quick-generate-key", f"K <{keyring.email}>", "ed25519", "sign", "never")
    elif kind == "expired":
        keyring.run(
            "--faked-system-time",
            "20200101T000000",
            "--quick-generate-key",
            f"K <{keyring.email}>",
            "rsa2048",
            "encrypt",
            "1d",
        )
    else:
        keyring.run("--quick-generate-key", f"K <{keyring.email}>", "rsa2048", "encrypt", "never")
    armored = keyring.run("--armor", "--export", keyring.email).stdout.decode()
    listing = keyring.run("--with-colons", "--list-keys", keyring.email).stdout.decode()
    fingerprint = listing.split("fpr:::::::::")[1].split(":")[0]
    return armored, fingerprint


REFUSED_KEYS = {"attacker": "RecipientNotPinned", "expired": "RecipientExpired", "sign-only": "RecipientCannotEncrypt"}


def test_7_recipients_swapped_after_the_reconcile_are_refused_at_backup_time(
    team_a: Platform,
    make_tenant: Callable[..., Tenant],
    grant: Callable[..., None],
    postgres: Postgres,
    s3_server: S3Server,
    bucket: str,
    gpg_keyring: GpgKeyring,
    tmp_path: Path,
) -> None:
    """The policy is Ready with the team's pinned key; then a ConfigMap writer swaps in its own key. The next
    backup (the CronJob's pod, run as a process with the ConfigMap as it is now) encrypts to nobody."""
    tenant = make_tenant(configmaps=True)
    shop = create_shop(postgres)
    allow_database_and_bucket(grant, postgres, s3_server, bucket)
    with operator(team_a.namespace):
        spec = policy_spec(pg_source(postgres, shop), s3_destination(s3_server.endpoint, bucket))
        spec["encryption"]["gpg"]["fingerprints"] = [gpg_keyring.fingerprint]
        tenant.create("backuppolicies", "pinned", spec)

        def ready() -> bool:
            return any(
                c["type"] == "Ready" and c["status"] == "True" for c in team_a.conditions("backuppolicies", "pinned")
            )

        team_a.wait_for(ready, timeout=60, what="the policy Ready with the pinned key")
    armored, _ = other_key(tmp_path, "attacker")
    tenant.core.patch_namespaced_config_map(RECIPIENTS, team_a.namespace, {"data": {"team.asc": armored}})
    cron_job = team_a.batch.read_namespaced_cron_job(team_a.cron_jobs()[0], team_a.namespace)
    result = team_a.run_container(cron_job.spec.job_template.spec.template.spec.containers[0], "tenancy-test-run")
    assert result.returncode != 0 and "RecipientNotPinned" in result.stderr, result.stderr[-2000:]
    assert s3_server.client().list_objects_v2(Bucket=bucket).get("KeyCount") == 0


@pytest.mark.parametrize("kind", list(REFUSED_KEYS))
def test_7_recipients_are_pinned_and_must_encrypt(
    team_a: Platform,
    make_tenant: Callable[..., Tenant],
    grant: Callable[..., None],
    postgres: Postgres,
    s3_server: S3Server,
    bucket: str,
    gpg_keyring: GpgKeyring,
    tmp_path: Path,
    kind: str,
) -> None:
    """attacker: a ConfigMap writer swaps the recipients for its own key while the policy pins the team's;
    expired / sign-only: keys that would give Ready=True and then fail every backup."""
    tenant = make_tenant(configmaps=True)
    armored, fingerprint = other_key(tmp_path, kind)
    pins = [gpg_keyring.fingerprint] if kind == "attacker" else [fingerprint]
    tenant.core.create_namespaced_config_map(
        team_a.namespace, {"metadata": {"name": "swapped"}, "data": {"team.asc": armored}}
    )
    shop = create_shop(postgres)
    allow_database_and_bucket(grant, postgres, s3_server, bucket)
    with operator(team_a.namespace):
        spec = policy_spec(pg_source(postgres, shop), s3_destination(s3_server.endpoint, bucket))
        spec["encryption"] = {
            "gpg": {"recipientsConfigMapRef": {"name": "swapped", "key": "team.asc"}, "fingerprints": pins}
        }
        tenant.create("backuppolicies", "pinned", spec)
        condition = team_a.refusal("backuppolicies", "pinned", "spec.encryption.gpg")
    assert condition["type"] == "Ready"
    assert_refused(condition, REFUSED_KEYS[kind])
    assert team_a.cron_jobs() == []  # no backup would ever be encrypted to it
    assert s3_server.client().list_objects_v2(Bucket=bucket).get("KeyCount") == 0


# --- 8. the operator's ServiceAccount outside enabled namespaces ---------------------------------------


def test_8_an_object_in_a_namespace_not_enabled_gets_nothing_done_there(
    api: kubernetes.client.ApiClient, team_a: Platform, tenant: Tenant, s3_server: S3Server, bucket: str
) -> None:
    """The operator watches team-a and team-x; the administrator enabled only team-a. Whoever may create
    runbook.dev objects in team-x (the admin client stands in for that tenant) gets no Secret read or
    written, no workload patched and no Job, Role or CronJob created there by the operator."""
    team_x = f"{team_a.namespace}-x"
    team_a.core.create_namespace({"metadata": {"name": team_x, "labels": {"runbook.dev/test": "true"}}})
    try:
        x = Platform(api, team_x, team_a.wait_for)
        x.secret(DB_SECRET, {"password": "team-x-secret"})
        x.secret(S3_SECRET, {"AWS_ACCESS_KEY_ID": s3_server.access_key, "AWS_SECRET_ACCESS_KEY": s3_server.secret_key})
        labels = {"app": "api"}
        x.apps.create_namespaced_deployment(
            team_x,
            {
                "metadata": {"name": "api", "labels": labels},
                "spec": {
                    "replicas": 1,
                    "selector": {"matchLabels": labels},
                    "template": {
                        "metadata": {"labels": labels},
                        "spec": {"containers": [{"name": "api", "image": "registry.invalid/api:1"}]},
                    },
                },
            },
        )
        secret_before = x.secret_data(DB_SECRET)
        template_before = x.apps.read_namespaced_deployment("api", team_x).spec.template.to_dict()
        for verb in ("list", "watch"):
            assert not can(api, verb, "secrets", ""), f"{verb} secrets cluster-wide"
            assert not can(api, verb, "secrets", team_a.namespace), f"{verb} secrets in team-a"
        for verb in ("get", "create", "update", "patch", "delete"):
            assert not can(api, verb, "secrets", team_x), f"{verb} secrets in {team_x}"
        for resource in ("deployments", "statefulsets", "deployments/scale"):
            assert not can(api, "patch", resource, team_x, "apps"), f"patch {resource} in {team_x}"
        assert not can(api, "create", "jobs", team_x, "batch")
        assert not can(api, "patch", "configmaps", "kube-system")
        for verb in ("create", "patch"):
            assert not can(api, verb, "roles", team_x, "rbac.authorization.k8s.io")
            assert not can(api, verb, "rolebindings", team_x, "rbac.authorization.k8s.io")
        with operator(team_a.namespace, team_x):
            x.custom.create_namespaced_custom_object(
                GROUP,
                VERSION,
                team_x,
                "secretrotations",
                {
                    "apiVersion": f"{GROUP}/{VERSION}",
                    "kind": "SecretRotation",
                    "metadata": {"name": "steal"},
                    "spec": {
                        "secretRef": {"name": DB_SECRET, "key": "password"},
                        "interval": "30d",
                        "rotateNow": "now",
                        "restartTargets": [{"kind": "Deployment", "name": "api"}],
                    },
                },
            )
            x.custom.create_namespaced_custom_object(
                GROUP,
                VERSION,
                team_x,
                "backuppolicies",
                {
                    "apiVersion": f"{GROUP}/{VERSION}",
                    "kind": "BackupPolicy",
                    "metadata": {"name": "export"},
                    "spec": policy_spec(
                        {"kubernetes": {"namespaces": [team_x], "resources": ["configmaps"], "includeSecrets": True}},
                        s3_destination(None, bucket),
                    ),
                },
            )
            # A positive marker: team-a's own object handled by the same operator.
            tenant.create("secretrotations", "marker", {"secretRef": {"name": "marker", "key": "k"}, "interval": "30d"})
            team_a.wait_for(lambda: team_a.conditions("secretrotations", "marker"), timeout=60, what="team-a served")
            # And team-x's objects looked at (a status, or a Forbidden the operator reported), when it can see them.
            with suppress(pytest.fail.Exception):
                team_a.wait_for(
                    lambda: x.conditions("secretrotations", "steal") or x.events("steal"),
                    timeout=30,
                    what="team-x seen",
                )
        assert x.secret_data(DB_SECRET) == secret_before
        assert x.apps.read_namespaced_deployment("api", team_x).spec.template.to_dict() == template_before
        assert x.jobs() == [] and x.cron_jobs() == [] and x.rbac_in(team_x) == []
        assert [
            s.metadata.name for s in x.core.list_namespaced_secret(team_x).items if s.metadata.name.startswith("steal")
        ] == []
    finally:
        team_a.core.delete_namespace(team_x)
