"""``kubectl runbook`` (the installed ``kubectl-runbook`` entry point) run as a process against the real API
server, with the operator running in-process where a command needs it to act: every subcommand, its human
and JSON output, and bad input with its message and exit code."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import kopf.testing
import kubernetes
import pytest
import yaml
from tests.restore_support import (
    MANIFEST_KEY,
    OWNER,
    OWNER_PASSWORD,
    SIGNED,
    Backup,
    Kubelet,
    create_shop,
    make_backup,
    private_key,
)
from tests.services import GpgKeyring, Postgres, S3Server, free_port

from runbook_operator.models.plans import MANIFEST_KEY_SECRET, MANIFEST_KEY_SECRET_KEY

pytestmark = pytest.mark.integration

GROUP, VERSION = "runbook.dev", "v1alpha1"
PLUGIN = Path(sys.executable).parent / "kubectl-runbook"
POLICY = "db"
OK, API_ERROR, USAGE, NOT_FOUND, FAILED, CONFLICT = 0, 1, 2, 3, 4, 5


class Plugin:
    """Runs ``kubectl runbook`` as a user would: the admin's kubeconfig in $KUBECONFIG, ``-n`` the test's."""

    def __init__(self, kubeconfig: Path, namespace: str) -> None:
        self.kubeconfig, self.namespace = kubeconfig, namespace

    def __call__(self, *args: str, namespaced: bool = True, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG")}
        env["KUBECONFIG"] = str(self.kubeconfig)  # the user's, not the operator's ServiceAccount
        result = subprocess.run(
            [str(PLUGIN), *(["-n", self.namespace] if namespaced else []), *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        print(f"$ kubectl runbook {' '.join(args)}  -> {result.returncode}\n{result.stdout}{result.stderr}")
        return result

    def json(self, *args: str) -> Any:
        result = self(*args, "-o", "json")
        assert result.returncode == OK, result.stderr
        return json.loads(result.stdout)


@pytest.fixture
def plugin(kubeconfig: Path, namespace: str, crds_installed: list[str]) -> Plugin:
    assert PLUGIN.is_file(), f"{PLUGIN} missing: reinstall the package (.venv/bin/pip install -e .)"
    return Plugin(kubeconfig, namespace)


@pytest.fixture
def custom(api: kubernetes.client.ApiClient) -> Any:
    return kubernetes.client.CustomObjectsApi(api)


def get(custom: Any, namespace: str, plural: str, name: str) -> dict[str, Any]:
    return dict(custom.get_namespaced_custom_object(GROUP, VERSION, namespace, plural, name))


def listed(custom: Any, namespace: str, plural: str) -> list[str]:
    items = custom.list_namespaced_custom_object(GROUP, VERSION, namespace, plural)["items"]
    return [i["metadata"]["name"] for i in items]


def test_usage_errors_and_an_unreachable_cluster(plugin: Plugin, kubeconfig: Path, tmp_path: Path) -> None:
    assert plugin(namespaced=False).returncode == USAGE
    result = plugin("isolate", "--severity", "P1", "--reason", "x", "--no-evidence")
    assert result.returncode == USAGE and "--incident" in result.stderr
    result = plugin("isolate", "--incident", "INC-1", "--severity", "P9", "--reason", "x", "--no-evidence")
    assert result.returncode == USAGE and "P9" in result.stderr
    result = plugin("restore", POLICY, "--decryption-secret", "no-slash")
    assert result.returncode == USAGE and "SECRET/KEY" in result.stderr
    assert plugin("backup").returncode == USAGE

    config = yaml.safe_load(kubeconfig.read_text())
    for cluster in config["clusters"]:
        cluster["cluster"]["server"] = f"https://127.0.0.1:{free_port()}"
    unreachable = tmp_path / "kubeconfig"
    unreachable.write_text(yaml.safe_dump(config))
    result = plugin("--kubeconfig", str(unreachable), "status")
    assert result.returncode == API_ERROR and "cannot reach the API server" in result.stderr
    result = plugin("status", "--kubeconfig", str(tmp_path / "missing"))
    assert result.returncode == API_ERROR and "kubeconfig" in result.stderr


def test_status_of_an_empty_namespace_and_the_context_namespace(
    plugin: Plugin, kubeconfig: Path, namespace: str, tmp_path: Path
) -> None:
    result = plugin("status")
    assert result.returncode == OK, result.stderr
    assert f"Namespace {namespace}: not isolated" in result.stdout and "everything is Ready" in result.stdout
    data = plugin.json("status")
    assert data["namespace"] == namespace and data["isolated"] is False and data["notReady"] == []
    # Without -n, the namespace is the kubeconfig context's, as for kubectl.
    config = yaml.safe_load(kubeconfig.read_text())
    for context in config["contexts"]:
        context["context"]["namespace"] = namespace
    (tmp_path / "kubeconfig").write_text(yaml.safe_dump(config))
    result = plugin("--kubeconfig", str(tmp_path / "kubeconfig"), "status", "-o", "yaml", namespaced=False)
    assert result.returncode == OK and yaml.safe_load(result.stdout)["namespace"] == namespace


def test_isolate_status_and_release(
    plugin: Plugin, custom: Any, namespace: str, operator_runner: kopf.testing.KopfRunner
) -> None:
    base = ["isolate", "--severity", "P1", "--reason", "Suspected exfiltration through the api"]
    result = plugin(*base, "--incident", "INC-2026-0042")
    assert result.returncode == USAGE and "--no-evidence" in result.stderr and "--evidence-from" in result.stderr
    result = plugin(*base, "--incident", "bad id!", "--no-evidence")
    assert result.returncode == USAGE and "spec.incidentId" in result.stderr
    result = plugin(*base, "--incident", "INC-2026-0042", "--evidence-from", "no-such-policy")
    assert result.returncode == NOT_FOUND and "BackupPolicy 'no-such-policy' not found" in result.stderr
    assert listed(custom, namespace, "emergencyisolations") == []

    result = plugin(*base, "--incident", "INC-2026-0042", "--no-evidence", "--wait", "-o", "json")
    assert result.returncode == OK, result.stderr
    created = json.loads(result.stdout)
    assert created["name"] == "incident-inc-2026-0042" and created["phase"] == "Isolated"
    assert "Isolated" in result.stderr  # progress
    isolation = get(custom, namespace, "emergencyisolations", "incident-inc-2026-0042")
    assert isolation["spec"]["evidence"] == {"capture": False, "required": True}
    assert (isolation["spec"]["incidentId"], isolation["spec"]["severity"]) == ("INC-2026-0042", "P1")

    # A second isolation is refused before anything is created, naming the one that holds the namespace.
    result = plugin(*base, "--incident", "INC-2026-0043", "--no-evidence")
    assert result.returncode == CONFLICT
    assert f"namespace {namespace} is already isolated by EmergencyIsolation 'incident-inc-2026-0042'" in result.stderr
    assert "INC-2026-0042" in result.stderr and "kubectl runbook release" in result.stderr
    assert listed(custom, namespace, "emergencyisolations") == ["incident-inc-2026-0042"]

    result = plugin("status")
    assert result.returncode == OK and f"Namespace {namespace}: ISOLATED" in result.stdout
    assert "incident-inc-2026-0042 *" in result.stdout and "Isolated" in result.stdout
    data = plugin.json("status")
    assert data["isolated"] is True
    assert (
        data["isolations"][0] | {"holdsNamespace": True, "phase": "Isolated", "severity": "P1"} == data["isolations"][0]
    )

    assert plugin("release", "nope").returncode == NOT_FOUND
    result = plugin("release", "--wait")
    assert result.returncode == OK, result.stderr
    assert "incident-inc-2026-0042 released" in result.stdout and "Released" in result.stdout
    assert get(custom, namespace, "emergencyisolations", "incident-inc-2026-0042")["status"]["phase"] == "Released"
    result = plugin("release")
    assert result.returncode == NOT_FOUND and f"no active EmergencyIsolation in namespace {namespace}" in result.stderr
    assert plugin.json("status")["isolated"] is False

    # The same incident again: the name is taken (by the released one).
    result = plugin(*base, "--incident", "INC-2026-0042", "--no-evidence")
    assert result.returncode == CONFLICT and "already exists" in result.stderr


def test_rotate_now(
    plugin: Plugin, api: kubernetes.client.ApiClient, custom: Any, namespace: str, operator_runner: Any
) -> None:
    core = kubernetes.client.CoreV1Api(api)
    core.create_namespaced_secret(namespace, {"metadata": {"name": "app-token"}, "stringData": {"token": "initial"}})
    body = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "SecretRotation",
        "metadata": {"name": "token"},
        "spec": {"secretRef": {"name": "app-token", "key": "token"}, "generator": {"length": 24, "alphabet": "hex"}},
    }
    custom.create_namespaced_custom_object(GROUP, VERSION, namespace, "secretrotations", body)

    result = plugin("rotate", "now", "nope")
    assert (
        result.returncode == NOT_FOUND and f"SecretRotation 'nope' not found in namespace {namespace}" in result.stderr
    )
    result = plugin("rotate", "now", "token", "--wait", "-o", "json")
    assert result.returncode == OK, result.stderr
    data = json.loads(result.stdout)
    assert data["step"] == "Done" and data["rotateNow"].startswith("kubectl-runbook-")
    assert get(custom, namespace, "secretrotations", "token")["spec"]["rotateNow"] == data["rotateNow"]
    value = base64.b64decode(core.read_namespaced_secret("app-token", namespace).data["token"]).decode()
    assert value != "initial" and len(value) == 24
    assert value not in result.stdout + result.stderr

    result = plugin("rotate", "now", "token")  # human output, no wait: the token changes again
    assert result.returncode == OK and "spec.rotateNow=kubectl-runbook-" in result.stdout
    assert get(custom, namespace, "secretrotations", "token")["spec"]["rotateNow"] != data["rotateNow"]
    assert "token" in plugin("status").stdout


@pytest.fixture
def backup(
    api: kubernetes.client.ApiClient,
    custom: Any,
    namespace: str,
    crds_installed: list[str],
    postgres: Postgres,
    s3_server: S3Server,
    gpg_keyring: GpgKeyring,
) -> Backup:
    """One backup by the agent, and its BackupPolicy with the Secrets and ConfigMap it names."""
    made = make_backup(
        postgres, create_shop(postgres), s3_server, gpg_keyring, namespace=namespace, policy=POLICY, **SIGNED
    )
    core = kubernetes.client.CoreV1Api(api)
    for name, data in (
        (MANIFEST_KEY_SECRET, {MANIFEST_KEY_SECRET_KEY: MANIFEST_KEY}),  # the namespace's key, that signed it
        ("db-credentials", {"username": OWNER, "password": OWNER_PASSWORD}),
        (
            "backup-s3-credentials",
            {"AWS_ACCESS_KEY_ID": s3_server.access_key, "AWS_SECRET_ACCESS_KEY": s3_server.secret_key},
        ),
        ("restore-gpg-private", {"private.asc": private_key(gpg_keyring)}),
    ):
        core.create_namespaced_secret(namespace, {"metadata": {"name": name}, "stringData": data})
    core.create_namespaced_config_map(
        namespace, {"metadata": {"name": "backup-gpg-recipients"}, "data": {"team.asc": gpg_keyring.public_key}}
    )
    body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "BackupPolicy", "metadata": {"name": POLICY}, "spec": made.spec}
    custom.create_namespaced_custom_object(GROUP, VERSION, namespace, "backuppolicies", body)
    return made


def test_backup_list_now_and_restore(
    plugin: Plugin,
    api: kubernetes.client.ApiClient,
    custom: Any,
    namespace: str,
    backup: Backup,
    s3_server: S3Server,
    operator_runner: kopf.testing.KopfRunner,
    wait_for: Callable[..., Any],
) -> None:
    folder = backup.manifest["data"]["key"].rsplit("/", 1)[0] + "/"
    stamp = folder.rstrip("/").rsplit("/", 1)[1]

    # backup list: the bucket's backups from their manifests; "verified" from the policy's status.
    result = plugin("backup", "list", POLICY)
    assert result.returncode == OK, result.stderr
    assert f"s3://{backup.bucket}/backups/{namespace}/{POLICY}/: 1 backup(s)" in result.stdout
    assert stamp in result.stdout and "complete" in result.stdout
    listing = plugin.json("backup", "list", POLICY)
    [entry] = listing["backups"]
    assert (entry["backup"], entry["key"], entry["complete"], entry["verified"]) == (stamp, folder, True, False)
    assert (
        entry["sizeBytes"] == backup.manifest["data"]["sizeBytes"]
        and entry["sha256"] == backup.manifest["data"]["sha256"]
    )
    assert s3_server.secret_key not in result.stdout + result.stderr
    custom.patch_namespaced_custom_object_status(
        GROUP,
        VERSION,
        namespace,
        "backuppolicies",
        POLICY,
        {
            "status": {
                "lastVerifiedBackup": {"key": backup.manifest["data"]["key"], "verifiedTime": "2026-01-01T00:00:00Z"}
            }
        },
    )
    assert plugin.json("backup", "list", POLICY)["backups"][0]["verified"] is True
    result = plugin("backup", "list", "nope")
    assert result.returncode == NOT_FOUND and f"BackupPolicy 'nope' not found in namespace {namespace}" in result.stderr

    # backup now: a new annotation value, which the operator acts on.
    result = plugin("backup", "now", POLICY, "--wait", "-o", "json")
    assert result.returncode == OK, result.stderr
    now = json.loads(result.stdout)
    policy = get(custom, namespace, "backuppolicies", POLICY)
    assert policy["metadata"]["annotations"]["runbook.dev/backup-now"] == now["value"]
    assert policy["status"]["backupNow"] == now["value"] and now["started"] is True
    assert plugin("backup", "now", "nope").returncode == NOT_FOUND

    # restore: bad input is refused before anything is created.
    result = plugin("restore", POLICY, "--backup", "20200101T000000Z")
    assert result.returncode == NOT_FOUND
    assert (
        "backup '20200101T000000Z' not found: no manifest.json at" in result.stderr and "backup list" in result.stderr
    )
    result = plugin("restore", POLICY, "--backup", "yesterday")
    assert result.returncode == NOT_FOUND and "neither 'latest', a backup's timestamp" in result.stderr
    result = plugin("restore", "nope")
    assert result.returncode == NOT_FOUND and "BackupPolicy 'nope' not found" in result.stderr
    assert listed(custom, namespace, "backuprestores") == []

    # A dry run by key, followed to its end with progress on stderr (its preflight's verify Job pod run as the
    # kubelet would).
    key = "restore-gpg-private/private.asc"
    with Kubelet(kubernetes.client.CoreV1Api(api), namespace, wait_for).verify_pods() as verified:
        result = plugin(
            "restore",
            POLICY,
            "--backup",
            stamp,
            "--dry-run",
            "--decryption-secret",
            key,
            "--name",
            "check",
            "--wait",
            "-o",
            "json",
        )
    assert result.returncode == OK, result.stderr
    assert [run.returncode for run in verified] == [0], [run.stderr[-2000:] for run in verified]
    done = json.loads(result.stdout)
    assert done["phase"] == "DryRunSucceeded" and done["status"]["backupKey"] == backup.manifest["data"]["key"]
    assert "Preflight: Succeeded" in result.stderr and "DryRunSucceeded" in result.stderr
    assert get(custom, namespace, "backuprestores", "check")["spec"] == {
        "policyRef": POLICY,
        "backup": stamp,
        "dryRun": True,
        "decryptionSecretRef": {"name": "restore-gpg-private", "key": "private.asc"},
        "scaleTimeoutSeconds": 300,
        "allowUnsignedBackup": False,
    }
    result = plugin("restore", POLICY, "--name", "check")
    assert result.returncode == CONFLICT and "BackupRestore 'check' already exists" in result.stderr

    # A restore that fails in preflight (no private key for a public-key policy): exit 4 with the reason.
    result = plugin("restore", POLICY, "--name", "no-key", "--wait")
    assert result.returncode == FAILED
    assert (
        "Failed: DecryptionKeyMissing" in result.stdout
        and "restore no-key failed: DecryptionKeyMissing" in result.stderr
    )

    # Without --wait: created, with how to follow it.
    result = plugin("restore", POLICY, "--dry-run", "--decryption-secret", key)
    assert result.returncode == OK and "(dry run)" in result.stdout and "kubectl get br" in result.stdout

    status = plugin.json("status")
    assert [b["name"] for b in status["backups"]] == [POLICY]
    assert {r["name"] for r in status["restores"]} >= {"check", "no-key"}
    assert any(a["name"] == "no-key" and a["reason"] == "DecryptionKeyMissing" for a in status["notReady"])
    text = plugin("status").stdout
    assert "Backups" in text and POLICY in text and "DecryptionKeyMissing" in text
