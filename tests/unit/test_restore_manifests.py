"""Restore integrity, operator side (issue 13 item 5): the preflight's manifest checks (signature with the
namespace's key, policy, folder; the explicit opt-out for unsigned backups, never for drills), the pinned
manifest that later steps use instead of a re-read, the signing key the BackupPolicy reconcile ensures, and
the key every backup and restore pod gets. On an in-memory API."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest

from runbook_operator.builders.backup import agent_env
from runbook_operator.builders.restore import DRILL_LABEL, build_plan, build_verify_job, storage_env
from runbook_operator.clients import kube
from runbook_operator.errors import RunbookError
from runbook_operator.logs import REDACTOR
from runbook_operator.models.backup import BackupPolicySpec, BackupRestoreSpec, PinnedBackup
from runbook_operator.models.plans import (
    MANIFEST_KEY_ENV,
    MANIFEST_KEY_SECRET,
    MANIFEST_KEY_SECRET_KEY,
    sign_manifest,
)
from runbook_operator.reconcilers.backup import ensure_manifest_key
from runbook_operator.reconcilers.restore import RESTORE, RESTORES, Restore
from runbook_operator.reconcilers.runtime import Context
from tests.fake_api import FakeApi

NS = "shop"
KEY = "6d1f0c2b9e8a4d7c5b3a1f0e9d8c7b6a5f4e3d2c1b0a9f8e7d6c5b4a3f2e1d0c"
FOLDER = "shop/db/20260301T000000Z/"
POLICY_SPEC: dict[str, Any] = {
    "source": {"postgresql": {"host": "pg", "database": "shop", "credentialsSecretRef": {"name": "login"}}},
    "schedule": "0 */6 * * *",
    "destination": {"s3": {"bucket": "backups"}},
    "encryption": {"gpg": {"passphraseSecretRef": {"name": "pass", "key": "p"}}},
}


def unsigned(**changes: Any) -> dict[str, Any]:
    manifest: dict[str, Any] = {
        "policy": {"namespace": NS, "name": "db", "generation": 1},
        "endTime": "2026-03-01T00:10:00Z",
        "durationSeconds": 3.0,
        "source": {"kind": "postgresql", "tableRowCounts": {"public.t": 2}},
        "data": {"key": FOLDER + "postgresql.dump.gpg", "sha256": "ab" * 32, "sizeBytes": 10},
        "encryption": {"mode": "symmetric"},
    }
    return {**manifest, **changes}


def signed(key: str = KEY, **changes: Any) -> dict[str, Any]:
    manifest = unsigned(**changes)
    return {**manifest, "signature": sign_manifest(manifest, key)}


def restore_for(api: FakeApi, *, labels: dict[str, str] | None = None, **spec: Any) -> Restore:
    body = {
        "apiVersion": "runbook.dev/v1alpha1",
        "kind": "BackupRestore",
        "metadata": {"name": "r1", "namespace": NS, "uid": "u1", "generation": 1, "labels": labels or {}},
        "spec": {"policyRef": "db", **spec},
    }
    api.put(RESTORES, NS, body)
    ctx = Context.of(RESTORE, body, api)
    restore = Restore(ctx)
    restore.__dict__["spec"] = ctx.spec  # the spec as written: these checks are not the tenancy rules'
    return restore


@pytest.fixture
def api() -> FakeApi:
    fake = FakeApi()
    data = {MANIFEST_KEY_SECRET_KEY: base64.b64encode(KEY.encode()).decode()}
    fake.put(kube.SECRETS, NS, {"metadata": {"name": MANIFEST_KEY_SECRET}, "data": data})
    return fake


def condition(restore: Restore, type_: str) -> tuple[str, str]:
    found = next(c for c in restore.status.conditions if c.type == type_)
    return str(found.status), str(found.reason)


def refusal(restore: Restore, manifest: dict[str, Any]) -> RunbookError:
    with pytest.raises(RunbookError) as raised:
        restore.authentic(FOLDER, manifest)
    assert f"{FOLDER}manifest.json" in raised.value.message
    assert KEY not in raised.value.message
    return raised.value


def test_a_manifest_signed_with_the_namespaces_key_is_authentic(api: FakeApi) -> None:
    restore = restore_for(api)
    manifest = signed()
    restore.authentic(FOLDER, manifest)
    assert condition(restore, "ManifestVerified") == ("True", "Signed")


@pytest.mark.parametrize(
    ("manifest", "reason"),
    [
        (unsigned(), "ManifestUnsigned"),
        # The original signature kept over a changed digest (a swapped object's).
        ({**signed(), "data": {**unsigned()["data"], "sha256": "cd" * 32}}, "ManifestForged"),
        (signed("a key of the bucket writer's own"), "ManifestForged"),
        # Signed with the namespace's key, but for another policy or namespace, or naming another folder.
        (signed(policy={"namespace": NS, "name": "other"}), "ManifestForged"),
        (signed(policy={"namespace": "team-b", "name": "db"}), "ManifestForged"),
        (signed(data={**unsigned()["data"], "key": "shop/db/20250101T000000Z/postgresql.dump.gpg"}), "ManifestForged"),
        (signed(data={**unsigned()["data"], "key": FOLDER + "sub/postgresql.dump.gpg"}), "ManifestForged"),
        (signed(data={**unsigned()["data"], "key": FOLDER}), "ManifestForged"),
    ],
)
def test_unsigned_and_forged_manifests_are_refused(api: FakeApi, manifest: dict[str, Any], reason: str) -> None:
    assert refusal(restore_for(api), manifest).reason == reason


def test_a_signed_manifest_needs_the_key_secret(api: FakeApi) -> None:
    api.delete(kube.SECRETS, NS, MANIFEST_KEY_SECRET)
    with pytest.raises(RunbookError) as raised:
        restore_for(api).authentic(FOLDER, signed())
    assert raised.value.reason == "SecretNotFound"
    assert MANIFEST_KEY_SECRET in raised.value.message


def test_the_opt_out_accepts_an_unsigned_manifest_visibly_and_still_checks_the_rest(api: FakeApi) -> None:
    restore = restore_for(api, allowUnsignedBackup=True)
    restore.authentic(FOLDER, unsigned())
    assert condition(restore, "ManifestVerified") == ("False", "UnsignedBackupAllowed")
    assert [(c.verb, c.body["type"], c.body["reason"]) for c in api.writes() if c.plural == "events"] == [
        ("create", "Warning", "UnsignedBackupAllowed")
    ]
    # A signed manifest is verified all the same, and the folder and policy are checked either way.
    assert refusal(restore, signed("another key")).reason == "ManifestForged"
    assert refusal(restore, unsigned(policy={"namespace": NS, "name": "other"})).reason == "ManifestForged"


def test_a_drill_never_accepts_an_unsigned_manifest(api: FakeApi) -> None:
    restore = restore_for(api, labels={DRILL_LABEL: "db"}, allowUnsignedBackup=True)
    error = refusal(restore, unsigned())
    assert error.reason == "ManifestUnsigned" and "drill" in error.message


def test_later_steps_use_the_pinned_manifest_and_etag_never_a_second_read(api: FakeApi) -> None:
    restore = restore_for(api)
    manifest = signed()
    restore.folder = FOLDER
    restore.pin(manifest, {"sha256": "ab" * 32, "etag": '"etag-1"'})
    pinned = restore.status.pinned
    assert pinned is not None and (pinned.folder, pinned.etag) == (FOLDER, '"etag-1"')
    reads = len(api.calls)
    # Without the pin this reads the bucket (the FakeApi has no S3 credentials Secret for it); with it, nothing.
    later = restore_for(api)
    later.status.pinned = PinnedBackup.model_validate(pinned.model_dump())
    assert later.manifest() == manifest and later.etag == '"etag-1"' and later.folder == FOLDER
    assert [c for c in api.calls[reads:] if c.plural != "backuppolicies" and c.plural != "backuprestores"] == []
    # The manifest survives the status round trip exactly (floats included), so its signature still verifies.
    assert json.loads(pinned.manifest)["durationSeconds"] == 3.0


def test_the_plan_carries_the_manifest_as_read_and_the_etag() -> None:
    policy = BackupPolicySpec.model_validate(POLICY_SPEC)
    target = policy.source.postgresql
    assert target is not None
    plan = build_plan(policy, signed(), target, etag='"etag-1"')
    assert (plan.manifest, plan.etag) == (signed(), '"etag-1"')
    assert json.loads(json.dumps(plan.to_api()))["manifest"] == signed()


def key_refs(env: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e["valueFrom"]["secretKeyRef"] for e in env if e["name"] == MANIFEST_KEY_ENV]


def test_every_backup_and_restore_pod_gets_the_key_by_reference() -> None:
    policy = BackupPolicySpec.model_validate(POLICY_SPEC)
    ref = {"name": MANIFEST_KEY_SECRET, "key": MANIFEST_KEY_SECRET_KEY}
    assert key_refs(agent_env(policy)) == [ref]
    spec = BackupRestoreSpec.model_validate({"policyRef": "db"})
    assert key_refs(storage_env(policy=policy, spec=spec, symmetric=True, manifest=signed())) == [ref]
    assert key_refs(storage_env(policy=policy, spec=spec, symmetric=True, manifest=unsigned())) == [ref]
    allowing = BackupRestoreSpec.model_validate({"policyRef": "db", "allowUnsignedBackup": True})
    assert key_refs(storage_env(policy=policy, spec=allowing, symmetric=True, manifest=signed())) == [ref]
    # Only the opt-out's unsigned manifest goes without (the agent would refuse it with the key).
    assert key_refs(storage_env(policy=policy, spec=allowing, symmetric=True, manifest=unsigned())) == []


def test_the_verify_job_reads_the_backup_with_the_storage_keys_and_nothing_of_the_target() -> None:
    """The preflight's Job: the plan and what reading the backup takes, by reference; no login of the target,
    no Kubernetes API token, the agent's hardened pod, owned by the BackupRestore, run once."""
    policy = BackupPolicySpec.model_validate(POLICY_SPEC)
    spec = BackupRestoreSpec.model_validate({"policyRef": "db", "decryptionSecretRef": {"name": "gpg", "key": "k"}})
    target = policy.source.postgresql
    assert target is not None
    plan = build_plan(policy, signed(), target)
    body = {"apiVersion": "runbook.dev/v1alpha1", "kind": "BackupRestore"}
    body["metadata"] = {"name": "r1", "namespace": NS, "uid": "u1"}
    job = build_verify_job(body, plan, source="postgresql", policy=policy, spec=spec, image="agent:1")
    assert job["metadata"]["name"] == "verify-r1" and job["metadata"]["ownerReferences"][0]["uid"] == "u1"
    assert job["spec"]["backoffLimit"] == 0
    pod = job["spec"]["template"]["spec"]
    assert pod["automountServiceAccountToken"] is False and "serviceAccountName" not in pod
    (container,) = pod["containers"]
    assert container["args"] == ["verify", "--source", "postgresql", "--namespace", NS, "--name", "r1"]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["terminationMessagePolicy"] == "FallbackToLogsOnError"
    env = {e["name"]: e for e in container["env"]}
    assert json.loads(env["RUNBOOK_RESTORE_PLAN"]["value"]) == json.loads(json.dumps(plan.to_api()))
    refs = {name: e["valueFrom"]["secretKeyRef"] for name, e in env.items() if "valueFrom" in e}
    # symmetric: the passphrase, not the private key; and the manifest key: the agent checks the signature
    assert refs == {
        MANIFEST_KEY_ENV: {"name": MANIFEST_KEY_SECRET, "key": MANIFEST_KEY_SECRET_KEY},
        "RUNBOOK_GPG_PASSPHRASE": {"name": "pass", "key": "p"},
    }
    assert not any(name.startswith("PG") for name in env)  # nothing of the target
    assert {v["name"] for v in pod["volumes"]} == {"tmp"}  # no Secret volume (no TLS files of the target)


def test_the_policy_reconcile_creates_the_key_once_and_never_overwrites_it() -> None:
    api = FakeApi()
    ensure_manifest_key(api, NS)
    created = api.stored(kube.SECRETS, NS, MANIFEST_KEY_SECRET)
    assert created is not None and "ownerReferences" not in created["metadata"]
    value = base64.b64decode(created["data"][MANIFEST_KEY_SECRET_KEY]).decode()
    assert len(value) == 64 and int(value, 16) >= 0
    assert value not in REDACTOR.scrub(f"the key is {value}")
    writes = len(api.writes())
    ensure_manifest_key(api, NS)  # present: read, never written again
    assert len(api.writes()) == writes
    stored = api.stored(kube.SECRETS, NS, MANIFEST_KEY_SECRET)
    assert stored is not None and stored["data"] == created["data"]
