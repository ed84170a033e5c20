"""BackupRestore without a cluster: the model's rules, the Job and plan builders, the workload patches and
readiness checks, drills, retention's protection of the verified backup, and the checksummed
reader that holds back the end of a stored object until it matched."""

from __future__ import annotations

import hashlib
import io
import json
import os
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from runbook_operator.agent.backup import record_sequences_after_dump
from runbook_operator.agent.restore import (
    ChecksummedReader,
    TransactionSink,
    missing_table_data,
    pg_restore_args,
    require_signed,
    sequence_mismatches,
)
from runbook_operator.builders.restore import (
    DRILL_LABEL,
    REPLICAS_ANNOTATION,
    build_drill,
    build_job,
    build_plan,
    drill_name,
    is_available,
    is_stopped,
    job_name,
    resolve_target,
    start_patch,
    stop_patch,
)
from runbook_operator.clients.postgres import parse_qualified_name, qualified_name
from runbook_operator.errors import RunbookError
from runbook_operator.models.backup import BackupPolicySpec, BackupRestoreSpec
from runbook_operator.models.plans import (
    GPG_PASSPHRASE_ENV,
    GPG_PRIVATE_KEY_ENV,
    MANIFEST_KEY_ENV,
    RESTORE_PLAN_ENV,
    KubernetesRestorePlan,
    RedisRestorePlan,
    RestorePlan,
    canonical_manifest,
    manifest_signed,
    sign_manifest,
)
from runbook_operator.reconcilers.catalog import StoredBackup, expired_backups

SOURCE = {"host": "postgresql.shop.svc", "database": "shop", "credentialsSecretRef": {"name": "db-backup"}}


def policy(**extra: Any) -> BackupPolicySpec:
    spec: dict[str, Any] = {
        "source": {"postgresql": SOURCE},
        "schedule": "0 */6 * * *",
        "destination": {"s3": {"bucket": "backups", "credentialsSecretRef": {"name": "s3"}}},
        "encryption": {"gpg": {"recipientsConfigMapRef": {"name": "keys", "key": "team.asc"}}},
        **extra,
    }
    return BackupPolicySpec.model_validate(spec)


MANIFEST = {
    "data": {"key": "ns/db/20260101T030000Z/postgresql.dump.gpg", "sha256": "ab" * 32, "sizeBytes": 1234},
    "encryption": {"mode": "publicKey"},
    "source": {"kind": "postgresql", "tableRowCounts": {"public.orders": 12, "public.customers": 3}},
}
BODY = {
    "apiVersion": "runbook.dev/v1alpha1",
    "kind": "BackupRestore",
    "metadata": {"name": "r1", "namespace": "ns", "uid": "u-1"},
}


def test_target_fields_override_the_source() -> None:
    spec = BackupRestoreSpec.model_validate(
        {"policyRef": "db", "target": {"database": "scratch", "credentialsSecretRef": {"name": "restorer"}}}
    )
    target = resolve_target(spec, policy().source.postgresql)  # type: ignore[arg-type]
    assert (target.host, target.port, target.database) == ("postgresql.shop.svc", 5432, "scratch")
    assert target.credentials_secret_ref.name == "restorer"
    untouched = resolve_target(BackupRestoreSpec.model_validate({"policyRef": "db"}), policy().source.postgresql)  # type: ignore[arg-type]
    assert untouched.database == "shop"


@pytest.mark.parametrize(
    ("verification", "source", "expected"),
    [
        (
            {"schedule": "0 4 * * 0", "target": {"database": "shop"}, "decryptionSecretRef": {"name": "k", "key": "k"}},
            None,
            "scratch database",
        ),
        ({"schedule": "0 4 * * 0", "target": {"database": "scratch"}}, None, "verification.decryptionSecretRef"),
        ({"schedule": "bad", "target": {"database": "scratch"}}, None, "schedule"),
        (
            {"schedule": "0 4 * * 0", "target": {"database": "scratch"}},
            {"redis": {"host": "redis"}},
            "must name a scratch Redis",
        ),
    ],
)
def test_verification_rules(verification: dict[str, Any], source: dict[str, Any] | None, expected: str) -> None:
    extra: dict[str, Any] = {"verification": verification}
    if source is not None:
        extra["source"] = source
    with pytest.raises(ValidationError) as info:
        policy(**extra)
    assert expected in str(info.value)


def test_verification_on_another_host_or_with_a_passphrase_is_fine() -> None:
    policy(
        verification={
            "schedule": "0 4 * * 0",
            "target": {"host": "scratch-db"},
            "decryptionSecretRef": {"name": "k", "key": "k"},
        }
    )
    policy(
        verification={"schedule": "0 4 * * 0", "target": {"database": "scratch"}},
        encryption={"gpg": {"passphraseSecretRef": {"name": "p", "key": "k"}}},
    )


def test_job_carries_references_only_and_runs_once() -> None:
    spec = BackupRestoreSpec.model_validate(
        {"policyRef": "db", "decryptionSecretRef": {"name": "private", "key": "key.asc"}}
    )
    target = resolve_target(spec, policy().source.postgresql)  # type: ignore[arg-type]
    plan = build_plan(policy(), MANIFEST, target)
    assert plan.tables == ["public.customers", "public.orders"] and not plan.symmetric
    job = build_job(BODY, plan, policy=policy(), spec=spec, target=target, image="agent:1")
    assert job["metadata"]["name"] == "restore-r1"
    assert job["metadata"]["ownerReferences"][0]["uid"] == "u-1"
    assert job["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "runbook-operator"
    assert job["spec"]["backoffLimit"] == 0
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert container["args"] == ["restore", "--namespace", "ns", "--name", "r1"]
    env = {e["name"]: e for e in container["env"]}
    assert RestorePlan.model_validate(json.loads(env[RESTORE_PLAN_ENV]["value"])) == plan
    assert env["PGPASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": "db-backup", "key": "password"}
    assert env[GPG_PRIVATE_KEY_ENV]["valueFrom"]["secretKeyRef"] == {"name": "private", "key": "key.asc"}
    assert GPG_PASSPHRASE_ENV not in env
    assert all("value" not in e for name, e in env.items() if name not in (RESTORE_PLAN_ENV, "HOME"))
    assert container["securityContext"]["readOnlyRootFilesystem"] is True


def test_symmetric_backups_use_the_policys_passphrase() -> None:
    symmetric = policy(encryption={"gpg": {"passphraseSecretRef": {"name": "backup-pass", "key": "p"}}})
    spec = BackupRestoreSpec.model_validate({"policyRef": "db"})
    target = resolve_target(spec, symmetric.source.postgresql)  # type: ignore[arg-type]
    plan = build_plan(symmetric, {**MANIFEST, "encryption": {"mode": "symmetric"}}, target)
    job = build_job(BODY, plan, policy=symmetric, spec=spec, target=target, image="agent:1")
    env = {e["name"]: e for e in job["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env[GPG_PASSPHRASE_ENV]["valueFrom"]["secretKeyRef"] == {"name": "backup-pass", "key": "p"}


def test_long_names_make_valid_job_names() -> None:
    name = job_name("r" * 250)
    assert len(name) <= 63 and name.startswith("restore-") and name != job_name("r" * 249)


def test_workload_patches_record_and_restore_the_count() -> None:
    stop = stop_patch("u-1", 5)
    assert stop["spec"] == {"replicas": 0}
    assert json.loads(stop["metadata"]["annotations"][REPLICAS_ANNOTATION]) == {"restore": "u-1", "replicas": 5}
    assert start_patch(5) == {"metadata": {"annotations": {REPLICAS_ANNOTATION: None}}, "spec": {"replicas": 5}}


def workload(wanted: int, generation: int = 2, **status: Any) -> dict[str, Any]:
    return {"metadata": {"generation": generation}, "spec": {"replicas": wanted}, "status": status}


def test_stopped_and_available() -> None:
    assert is_stopped(workload(0, observedGeneration=2))
    assert not is_stopped(workload(0, observedGeneration=1))  # the controller has not seen the change yet
    assert not is_stopped(workload(0, observedGeneration=2, replicas=1))
    assert is_available(workload(3, observedGeneration=2, availableReplicas=3, updatedReplicas=3), 3)
    assert not is_available(workload(3, observedGeneration=2, availableReplicas=2, updatedReplicas=3), 3)
    assert not is_available(workload(2, observedGeneration=2, availableReplicas=2, updatedReplicas=2), 3)
    assert is_available(workload(0, observedGeneration=2), 0)


def test_drill_is_owned_by_the_policy_and_named_by_its_slot() -> None:
    spec = policy(
        verification={
            "schedule": "0 4 * * 0",
            "target": {"database": "scratch"},
            "decryptionSecretRef": {"name": "k", "key": "a"},
        }
    )
    body = {"metadata": {"name": "db", "namespace": "ns", "uid": "p-1"}}
    slot = datetime(2026, 1, 4, 4, 0, tzinfo=UTC)
    assert spec.verification is not None
    drill = build_drill(body, spec.verification, slot)
    assert drill["metadata"]["name"] == drill_name("db", slot) == "db-drill-202601040400"
    assert drill["metadata"]["labels"][DRILL_LABEL] == "db"
    assert drill["metadata"]["ownerReferences"][0]["uid"] == "p-1"
    assert drill["spec"] == {
        "policyRef": "db",
        "backup": "latest",
        "target": {"database": "scratch"},
        "roles": {"owners": "Skip", "privileges": "Skip"},
        "decryptionSecretRef": {"name": "k", "key": "a"},
    }
    BackupRestoreSpec.model_validate(drill["spec"])


def test_retention_keeps_the_newest_verified_backup() -> None:
    now = datetime(2026, 6, 1, tzinfo=UTC)
    backups = [StoredBackup(f"ns/db/{i}/", now - timedelta(days=100 - i), True) for i in range(5)]
    expired = expired_backups(backups, now=now, max_age=timedelta(days=30), min_keep=1)
    assert [b.folder for b in expired] == [f"ns/db/{i}/" for i in range(4)]
    kept = expired_backups(backups, now=now, max_age=timedelta(days=30), min_keep=1, verified="ns/db/1/")
    assert "ns/db/1/" not in [b.folder for b in kept] and len(kept) == 3


class Body(io.BytesIO):
    pass


def reader(data: bytes, *, expected: bytes | None = None) -> ChecksummedReader:
    digest = hashlib.sha256(expected if expected is not None else data).hexdigest()
    size = len(expected if expected is not None else data)
    return ChecksummedReader(Body(data), sha256=digest, size=size)


def read_all(source: ChecksummedReader) -> bytes:
    out = b""
    while chunk := source.read(1000):
        out += chunk
    return out


def test_reader_passes_a_matching_object_through() -> None:
    data = bytes(range(256)) * 1000
    source = reader(data)
    assert read_all(source) == data and source.matches


def test_reader_tells_a_changed_object_once_all_was_read() -> None:
    """What a changed object released reaches only an uncommitted transaction (TransactionSink)."""
    data = bytes(range(256)) * 1000
    changed = data[:-1] + b"\x00"
    source = reader(changed, expected=data)
    assert read_all(source) == changed
    assert not source.matches and source.size == len(data)


def test_reader_drain_finishes_the_digest_after_an_early_stop() -> None:
    data = b"x" * 100_000
    source = reader(data)
    source.read(10)
    assert not source.matches  # not all read yet
    source.drain()
    assert source.matches


@pytest.mark.parametrize(
    ("schema", "name", "key"),
    [
        ("public", "orders", "public.orders"),
        ("Billing Dept", "Open Invoices", '"Billing Dept"."Open Invoices"'),
        ("odd.schema", 'we"ird.na me', '"odd.schema"."we""ird.na me"'),
        ("x", "a b", 'x."a b"'),
        ("x a", "b", '"x a".b'),
        ("public", "Überweisungen", 'public."Überweisungen"'),
        ("public", "Orders", 'public."Orders"'),
    ],
)
def test_table_keys_are_unambiguous(schema: str, name: str, key: str) -> None:
    assert qualified_name(schema, name) == key
    assert parse_qualified_name(key) == (schema, name)


def test_keys_of_older_manifests_still_read() -> None:
    """Before names were quoted, keys were "<schema>.<name>" as they are: split at the first dot."""
    assert parse_qualified_name("Billing Dept.Open Invoices") == ("Billing Dept", "Open Invoices")
    assert parse_qualified_name("public.Orders") == ("public", "Orders")
    assert parse_qualified_name('public.we"ird') == ("public", 'we"ird')


def plan_with(tables: dict[str, int | None]) -> RestorePlan:
    spec = BackupRestoreSpec.model_validate({"policyRef": "db"})
    source = {"tableRowCounts": dict.fromkeys(tables, 1), "tableOids": {k: v for k, v in tables.items() if v}}
    return build_plan(policy(), {**MANIFEST, "source": source}, resolve_target(spec, policy().source.postgresql))  # type: ignore[arg-type]


def test_table_data_is_found_by_oid_whatever_the_names_print_as() -> None:
    # pg_restore --list prints schema "x" table "a b" and schema "x a" table "b" alike: "x a b <owner>".
    entries = {16390: "x a b shop", 16400: "Billing Dept Open Invoices shop"}
    assert missing_table_data(plan_with({'x."a b"': 16390, '"x a".b': 16391}), entries) == ['"x a".b']
    assert missing_table_data(plan_with({'"Billing Dept"."Open Invoices"': 16400}), entries) == []
    # Without OIDs (older manifests) the name must begin the entry's text.
    assert missing_table_data(plan_with({"Billing Dept.Open Invoices": None, "public.gone": None}), entries) == [
        "public.gone"
    ]
    assert missing_table_data(plan_with({"x.a": None}), {1: "x ab shop"}) == ["x.a"]


def test_roles_choices_map_to_pg_restore_options() -> None:
    manifest = {**MANIFEST, "source": {**MANIFEST["source"], "roles": [{"name": "clinic_readonly", "privileged": []}]}}
    target = resolve_target(BackupRestoreSpec.model_validate({"policyRef": "db"}), policy().source.postgresql)  # type: ignore[arg-type]

    def plan(roles: dict[str, Any] | None) -> RestorePlan:
        spec = BackupRestoreSpec.model_validate({"policyRef": "db", **({"roles": roles} if roles is not None else {})})
        return build_plan(policy(), manifest, target, roles=spec.roles)

    default = plan(None)
    assert (default.roles.owners, default.roles.privileges, default.roles.create_missing) == ("Keep", "Keep", False)
    assert "--no-owner" not in pg_restore_args(default) and "--no-privileges" not in pg_restore_args(default)
    assert default.backup_roles == []  # the role records travel only when they are to be created
    skipped = plan({"owners": "Skip", "privileges": "Skip"})
    assert {"--no-owner", "--no-privileges", "--single-transaction", "--exit-on-error"} <= set(pg_restore_args(skipped))
    created = plan({"createMissing": True})
    assert [r.name for r in created.backup_roles] == ["clinic_readonly"]
    with pytest.raises(ValidationError):
        BackupRestoreSpec.model_validate({"policyRef": "db", "roles": {"owners": "Drop"}})


def test_sequences_match_exactly_or_within_what_moved_during_the_dump() -> None:
    recorded = {"public.ids": {"lastValue": 10, "isCalled": True}}
    record_sequences_after_dump(recorded, {"public.ids": {"lastValue": 10, "isCalled": True, "increment": 1}})
    assert "afterDump" not in recorded["public.ids"]

    def found(value: int, called: bool = True, increment: int = 1) -> dict[str, Any]:
        return {"public.ids": {"lastValue": value, "isCalled": called, "increment": increment}}

    assert sequence_mismatches(recorded, found(10)) == []
    assert sequence_mismatches(recorded, found(10, called=False)) == ["public.ids: 10 (not called), manifest 10"]
    assert sequence_mismatches(recorded, {}) == ["public.ids: missing"]
    record_sequences_after_dump(recorded, found(14))
    assert recorded["public.ids"]["afterDump"] == {"lastValue": 14, "isCalled": True}
    assert sequence_mismatches(recorded, found(12)) == []
    assert sequence_mismatches(recorded, found(15)) and sequence_mismatches(recorded, found(9))
    descending = {"public.ids": {"lastValue": -5, "isCalled": True, "afterDump": {"lastValue": -9, "isCalled": True}}}
    assert sequence_mismatches(descending, found(-7, increment=-1)) == []
    assert sequence_mismatches(descending, found(-3, increment=-1))


# --- signed manifests (issue 13, item 5) ------------------------------------------------------------------

KEY = "9c1d" * 16
SIGNED_MANIFEST: dict[str, Any] = {
    "formatVersion": 1,
    "policy": {"namespace": "ns", "name": "db", "generation": 3},
    "job": None,
    "durationSeconds": 12.345,
    **MANIFEST,
    "agent": {"version": "0.1.0"},
}


def _leaves(document: Any, path: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    if isinstance(document, dict) and document:
        return [leaf for key, value in document.items() for leaf in _leaves(value, (*path, key))]
    return [path]


def _changed(document: dict[str, Any], path: tuple[str, ...]) -> dict[str, Any]:
    copy = json.loads(json.dumps(document))
    holder = copy
    for key in path[:-1]:
        holder = holder[key]
    value = holder[path[-1]]
    holder[path[-1]] = value + 1 if isinstance(value, int | float) and not isinstance(value, bool) else f"{value}x"
    return copy


def test_a_signature_covers_every_field_and_only_the_key_makes_it() -> None:
    signed = {**SIGNED_MANIFEST, "signature": sign_manifest(SIGNED_MANIFEST, KEY)}
    assert manifest_signed(signed, KEY)
    # As stored (indented, other key order) and read back, it still verifies.
    assert manifest_signed(json.loads(json.dumps(dict(reversed(signed.items())), indent=2)), KEY)
    leaves = _leaves(SIGNED_MANIFEST)
    assert ("data", "sha256") in leaves and ("job",) in leaves
    for path in leaves:
        assert not manifest_signed(_changed(signed, path), KEY), path
    assert not manifest_signed({**signed, "extra": True}, KEY)
    assert not manifest_signed({k: v for k, v in signed.items() if k != "policy"}, KEY)
    assert not manifest_signed(signed, KEY[:-1] + "0")
    assert not manifest_signed(SIGNED_MANIFEST, KEY)  # no signature
    assert not manifest_signed({**SIGNED_MANIFEST, "signature": None}, KEY)
    assert not manifest_signed({**SIGNED_MANIFEST, "signature": {"value": signed["signature"]}}, KEY)
    assert not manifest_signed({**SIGNED_MANIFEST, "signature": ""}, KEY)
    assert not manifest_signed({**signed, "durationSeconds": float("nan")}, KEY)
    assert canonical_manifest(signed) == canonical_manifest(SIGNED_MANIFEST)  # the signature is not signed


def _plans(manifest: dict[str, Any] | None) -> list[Any]:
    data = MANIFEST["data"]
    common = {
        "location": {"bucket": "backups"},
        "key": data["key"],
        "sha256": data["sha256"],
        "sizeBytes": data["sizeBytes"],
        "symmetric": False,
        "manifest": manifest,
    }
    return [
        RestorePlan.model_validate({**common, "target": SOURCE}),
        RedisRestorePlan.model_validate({**common, "target": {"host": "redis", "port": 6379}}),
        KubernetesRestorePlan.model_validate({**common, "section": "ns", "namespace": "ns"}),
    ]


def test_every_kind_of_plan_is_refused_unless_its_manifest_is_signed_with_the_key() -> None:
    signed = {**SIGNED_MANIFEST, "signature": sign_manifest(SIGNED_MANIFEST, KEY)}
    env = {MANIFEST_KEY_ENV: KEY}
    for plan in _plans(signed):
        require_signed(plan, env)
        require_signed(plan, {})  # without a key (not wired yet) nothing is checked
        # The plan survives the Job's environment: JSON with sorted keys, parsed again.
        require_signed(type(plan).model_validate(json.loads(json.dumps(plan.to_api(), sort_keys=True))), env)
    cases = {
        "ManifestUnsigned": [_plans(None), _plans(SIGNED_MANIFEST)],
        "ManifestForged": [
            _plans(_changed(signed, ("data", "sha256"))),
            _plans({**SIGNED_MANIFEST, "signature": sign_manifest(SIGNED_MANIFEST, "another key")}),
        ],
    }
    for reason, groups in cases.items():
        for plans in groups:
            for plan in plans:
                with pytest.raises(RunbookError) as info:
                    require_signed(plan, env)
                assert info.value.reason == reason
                assert MANIFEST_KEY_ENV in info.value.message and KEY not in info.value.message
    # A genuine signed manifest does not vouch for a plan reading another object, digest or size.
    for field, value in (("key", "ns/db/other/postgresql.dump.gpg"), ("sha256", "cd" * 32), ("size_bytes", 1)):
        for plan in _plans(signed):
            with pytest.raises(RunbookError) as info:
                require_signed(plan.model_copy(update={field: value}), env)
            assert info.value.reason == "ManifestForged"


# --- the restore's transaction: what psql receives (fake pg_restore and psql on PATH) ---------------------

SCRIPT_HEAD = b"--\n-- PostgreSQL database dump\n--\n\n\\restrict K3y\n\nSET statement_timeout = 0;\n\nBEGIN;\n\n"
SCRIPT_BODY = b"".join(b"INSERT INTO t VALUES (%d);\n" % n for n in range(2000))
SCRIPT_END = b"\nCOMMIT;\n\n--\n-- PostgreSQL database dump complete\n--\n\n\\unrestrict K3y\n\n"


def fake_tools(tmp_path: Path, script: bytes) -> tuple[dict[str, str], Path]:
    """pg_restore reads its stdin and prints ``script``; psql writes what it receives to a file."""
    (tmp_path / "script.sql").write_bytes(script)
    received = tmp_path / "received.sql"
    tools = {
        "pg_restore": f"#!/bin/sh\ncat > /dev/null\ncat '{tmp_path}/script.sql'\n",
        "psql": f"#!/bin/sh\ncat > '{received}'\n",
    }
    for name, text in tools.items():
        (tmp_path / name).write_text(text)
        (tmp_path / name).chmod(0o755)
    return {"PATH": f"{tmp_path}:{os.environ['PATH']}"}, received


def test_the_scripts_commit_reaches_psql_only_through_commit(tmp_path: Path) -> None:
    env, received = fake_tools(tmp_path, SCRIPT_HEAD + SCRIPT_BODY + SCRIPT_END)
    rolled_back = TransactionSink(["--single-transaction"], env)
    rolled_back.write(b"the archive")
    assert rolled_back.finish() == 0
    assert rolled_back.close() == 0  # e.g. the digest did not match: psql's input ends without COMMIT
    assert received.read_bytes() == b"BEGIN;\n" + SCRIPT_HEAD + SCRIPT_BODY + b"\n"

    committed = TransactionSink(["--single-transaction"], env)
    committed.write(b"the archive")
    assert committed.finish() == 0
    assert committed.commit() == 0
    assert received.read_bytes() == b"BEGIN;\n" + SCRIPT_HEAD + SCRIPT_BODY + SCRIPT_END


def test_a_script_without_restricted_mode_never_reaches_psql(tmp_path: Path) -> None:
    """An older pg_restore: a crafted archive's psql meta-commands (\\!) would run in the agent's pod."""
    env, received = fake_tools(tmp_path, SCRIPT_HEAD.replace(b"\\restrict K3y\n", b"") + SCRIPT_BODY + SCRIPT_END)
    sink = TransactionSink(["--single-transaction"], env)
    sink.write(b"the archive")
    assert sink.finish() == 0
    with pytest.raises(RunbookError) as info:
        sink.commit()
    assert info.value.reason == "RestoreFailed" and "restricted mode" in info.value.message
    assert received.read_bytes() == b"BEGIN;\n"
