"""A SecretRotation changes hipaa_app_user's password in the PostgreSQL pod and in db-credentials, and its restart
really replaces the api and backend pods. A pod that reads db-credentials logs in with the new password; the
same login with the old password (kept in a Secret of the test's) is refused by the server.
"""

from __future__ import annotations

import base64

import pytest

from tests.e2e.support import E2E, NAMESPACE, image_tool, pod_log

pytestmark = pytest.mark.integration

POSTGRES_IMAGE = "runbook-e2e/postgres:bookworm"


def password(e2e: E2E, secret: str = "db-credentials") -> str:
    return base64.b64decode(e2e.core.read_namespaced_secret(secret, NAMESPACE).data["POSTGRES_PASSWORD"]).decode()


def pod_names(e2e: E2E, app: str) -> set[str]:
    return {p.metadata.name for p in e2e.core.list_namespaced_pod(NAMESPACE, label_selector=f"app={app}").items}


def login(e2e: E2E, name: str, secret: str) -> tuple[str, str]:
    """A pod of the PostgreSQL image that logs in as the Secret's user with its password (psql); its phase, log."""
    e2e.core.create_namespaced_pod(
        NAMESPACE,
        {
            "metadata": {"name": name},
            "spec": {
                "restartPolicy": "Never",
                "terminationGracePeriodSeconds": 1,
                "securityContext": {"runAsNonRoot": True, "runAsUser": 999},
                "containers": [
                    {
                        "name": "psql",
                        "image": POSTGRES_IMAGE,
                        "imagePullPolicy": "IfNotPresent",
                        "command": ["psql", "-h", "postgresql", "-d", "hungryhippaahneties_db", "-tAc"],
                        "args": ["SELECT current_user"],
                        "env": [
                            {"name": "PGUSER", "valueFrom": {"secretKeyRef": {"name": secret, "key": "POSTGRES_USER"}}},
                            {
                                "name": "PGPASSWORD",
                                "valueFrom": {"secretKeyRef": {"name": secret, "key": "POSTGRES_PASSWORD"}},
                            },
                            {"name": "PGCONNECT_TIMEOUT", "value": "10"},
                        ],
                    }
                ],
            },
        },
    )
    phase = e2e.wait(
        lambda: (p := e2e.core.read_namespaced_pod(name, NAMESPACE).status.phase) in ("Succeeded", "Failed") and p,
        timeout=120,
        what=f"pod {name} to finish",
    )
    return str(phase), pod_log(e2e, name)


def test_a_rotation_replaces_the_pods_and_only_the_new_password_logs_in(e2e: E2E) -> None:
    old = password(e2e)
    e2e.core.create_namespaced_secret(
        NAMESPACE,
        {
            "metadata": {"name": "old-db-credentials"},
            "stringData": {"POSTGRES_USER": "hipaa_app_user", "POSTGRES_PASSWORD": old},
        },
    )
    assert login(e2e, "login-before", "db-credentials") == ("Succeeded", "hipaa_app_user\n")
    before = {app: pod_names(e2e, app) for app in ("api", "backend")}
    assert [len(before["api"]), len(before["backend"])] == [2, 1], before

    e2e.create_custom(
        "secretrotations",
        {
            "kind": "SecretRotation",
            "metadata": {"name": "hipaa-app-user"},
            "spec": {
                "secretRef": {"name": "db-credentials", "key": "POSTGRES_PASSWORD"},
                "interval": "30d",
                "rotateNow": "e2e-1",
                "generator": {"length": 32, "alphabet": "alphanumeric"},
                "target": {
                    "postgresql": {
                        "host": f"postgresql.{NAMESPACE}.svc",
                        "database": "hungryhippaahneties_db",
                        "insecurePlaintext": True,
                        "user": "hipaa_app_user",
                        "adminSecretRef": {
                            "name": "postgres-admin",
                            "usernameKey": "POSTGRES_USER",
                            "passwordKey": "POSTGRES_PASSWORD",
                        },
                    }
                },
                "restartTargets": [{"kind": "Deployment", "name": "api"}, {"kind": "Deployment", "name": "backend"}],
                "rolloutTimeout": "5m",
            },
        },
    )
    status = e2e.wait(
        lambda: (
            (s := e2e.custom_object("secretrotations", "hipaa-app-user").get("status") or {}).get("rotateNow")
            == "e2e-1"
            and s.get("phase") in ("Ready", "Degraded", "Failed")
            and s
        ),
        timeout=400,
        what="the rotation to finish",
    )
    assert status["phase"] == "Ready", status
    new = password(e2e)
    assert new != old and len(new) == 32

    # The restart replaced every pod: none of the old ones is left, and the new ones are all Ready.
    e2e.wait(
        lambda: (
            len(e2e.ready_pods("app=api")) == 2
            and len(e2e.ready_pods("app=backend")) == 1
            and not (pod_names(e2e, "api") | pod_names(e2e, "backend")) & (before["api"] | before["backend"])
        ),
        timeout=180,
        what="api and backend replaced by Ready pods",
    )
    for pod in e2e.ready_pods("app=api"):
        assert pod.spec.containers[0].image == "localcluster.local/nettool:1"  # the app's own, not the operator's
    assert image_tool.operator_image() not in {p.spec.containers[0].image for p in e2e.ready_pods("app=backend")}

    assert login(e2e, "login-new", "db-credentials") == ("Succeeded", "hipaa_app_user\n")
    phase, log = login(e2e, "login-old", "old-db-credentials")
    assert phase == "Failed" and 'password authentication failed for user "hipaa_app_user"' in log, log
    assert new not in log and old not in log
