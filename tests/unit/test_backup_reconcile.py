"""BackupPolicy's decisions, one pass at a time: FakeApi for the API server, FakeS3 for the bucket."""

from __future__ import annotations

import asyncio
import base64
import copy
import io
import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from botocore.exceptions import ClientError

from runbook_operator.builders.backup import POLICY_LABEL, cronjob_name
from runbook_operator.clients import kube
from runbook_operator.models.backup import BACKUP_NOW
from runbook_operator.models.plans import format_timestamp
from runbook_operator.reconcilers import backup, catalog
from runbook_operator.reconcilers.runtime import Context, Result, run_pass
from tests.fake_api import Call, FakeApi
from tests.helpers import grants_for_test, load_samples
from tests.services import GpgKeyring

NS, NAME, BUCKET = "hungryhippaahneties", "db", "hungryhippaahneties-backups"
POLICIES = backup.POLICY.resource
SAMPLE = load_samples()["backuppolicy-postgresql"]["spec"]
# the sample's host and S3 endpoint as a cluster administrator's grant allows them (and its plaintext connection)
GRANTS = grants_for_test(
    NS,
    hosts=[(SAMPLE["source"]["postgresql"]["host"], 5432)],
    s3=[{"endpoint": SAMPLE["destination"]["s3"]["endpoint"], "buckets": [SAMPLE["destination"]["s3"]["bucket"]]}],
)


class FakeS3:
    """The calls the bucket catalog makes, over one bucket's keys in memory."""

    exceptions = type("Exceptions", (), {"ClientError": ClientError})

    def __init__(self) -> None:
        self.objects: dict[str, bytes] = {}
        self.rules: list[dict[str, Any]] | None = None
        self.writes: list[str] = []

    @staticmethod
    def _error(code: str, operation: str) -> ClientError:
        return ClientError({"Error": {"Code": code, "Message": code}}, operation)

    def _bucket(self, name: str, operation: str) -> None:
        if name != BUCKET:
            raise self._error("404", operation)

    def head_bucket(self, *, Bucket: str) -> dict[str, Any]:
        self._bucket(Bucket, "HeadBucket")
        return {}

    def get_bucket_lifecycle_configuration(self, *, Bucket: str) -> dict[str, Any]:
        if self.rules is None:
            raise self._error("NoSuchLifecycleConfiguration", "GetBucketLifecycleConfiguration")
        return {"Rules": copy.deepcopy(self.rules)}

    def put_bucket_lifecycle_configuration(self, *, Bucket: str, LifecycleConfiguration: dict[str, Any]) -> None:
        self.writes.append("lifecycle")
        self.rules = copy.deepcopy(LifecycleConfiguration["Rules"])

    def get_paginator(self, name: str) -> FakeS3:
        assert name == "list_objects_v2"
        return self

    def paginate(self, *, Bucket: str, Prefix: str, StartAfter: str = "") -> list[dict[str, Any]]:
        keys = [k for k in sorted(self.objects) if k.startswith(Prefix) and k > StartAfter]
        return [{"Contents": [{"Key": k} for k in keys]}]

    def get_object(self, *, Bucket: str, Key: str) -> dict[str, Any]:
        return {"Body": io.BytesIO(self.objects[Key])}

    def head_object(self, *, Bucket: str, Key: str) -> dict[str, Any]:
        if Key not in self.objects:
            raise self._error("404", "HeadObject")
        return {"ContentLength": len(self.objects[Key])}

    def delete_objects(self, *, Bucket: str, Delete: dict[str, Any]) -> None:
        self.writes.append("delete")
        for item in Delete["Objects"]:
            self.objects.pop(item["Key"], None)


@pytest.fixture
def s3(monkeypatch: pytest.MonkeyPatch) -> FakeS3:
    """Every S3 client the catalog makes is this one (the integration tests keep the real S3 API server)."""
    fake = FakeS3()
    monkeypatch.setattr(catalog.s3, "shared_client", lambda location, *keys, **options: fake)
    return fake


def secret(api: FakeApi, name: str, data: dict[str, str]) -> None:
    encoded = {k: base64.b64encode(v.encode()).decode() for k, v in data.items()}
    api.put(kube.SECRETS, NS, {"metadata": {"name": name}, "data": encoded})


@pytest.fixture(autouse=True)
def _fresh_caches(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test starts as a freshly started operator: nothing checked yet."""
    monkeypatch.setattr(backup, "MANIFEST_KEYS", backup.Checked())
    monkeypatch.setattr(backup, "RECIPIENTS_CHECKED", backup.Checked())


@pytest.fixture
def api() -> FakeApi:
    fake = FakeApi()
    secret(fake, "db-credentials", {"POSTGRES_USER": "reader", "POSTGRES_PASSWORD": "pw-1"})
    secret(fake, "backup-s3-credentials", {"AWS_ACCESS_KEY_ID": "id", "AWS_SECRET_ACCESS_KEY": "key-1"})
    secret(fake, "backup-gpg-passphrase", {"passphrase": "a-long-passphrase"})
    return fake


def policy(api: FakeApi, **changes: Any) -> dict[str, Any]:
    spec = copy.deepcopy(SAMPLE)
    spec["encryption"] = {"gpg": {"passphraseSecretRef": {"name": "backup-gpg-passphrase", "key": "passphrase"}}}
    spec.update(changes)
    return api.put(POLICIES, NS, {"metadata": {"name": NAME}, "spec": spec})


def run(api: FakeApi, step: backup.Step = backup.reconcile, body: dict[str, Any] | None = None) -> Result:
    current = body or api.stored(POLICIES, NS, NAME)
    assert current is not None
    return run_pass(Context.of(backup.POLICY, current, api, grants=GRANTS), step)


def status(api: FakeApi) -> dict[str, Any]:
    stored = api.stored(POLICIES, NS, NAME)
    assert stored is not None
    found: dict[str, Any] = stored.get("status") or {}
    return found


def condition(api: FakeApi, type_: str) -> dict[str, Any]:
    return next(c for c in status(api)["conditions"] if c["type"] == type_)


def writes(api: FakeApi, plural: str, verb: str | None = None) -> list[Call]:
    return [c for c in api.writes() if c.plural == plural and verb in (None, c.verb)]


def events(api: FakeApi) -> list[tuple[str, str]]:
    return [(c.body["type"], c.body["reason"]) for c in writes(api, "events", "create")]


def test_creation_applies_the_cronjob_and_writes_status_once(api: FakeApi, s3: FakeS3) -> None:
    policy(api)
    assert run(api) == Result.done()
    (applied,) = writes(api, "cronjobs")
    assert applied.verb == "apply" and applied.name == cronjob_name(NAME)
    (written,) = writes(api, "backuppolicies")
    assert written.subresource == "status"
    assert status(api)["phase"] == "Scheduled" and status(api)["cronJobName"] == cronjob_name(NAME)
    assert status(api)["sourceKind"] == "postgresql" and status(api)["observedGeneration"] == 1
    assert condition(api, "Ready")["status"] == "True" and condition(api, "Ready")["reason"] == "Scheduled"
    assert events(api) == []  # the creation is told by status (cronJobName)
    # the policy's two writes, and the namespace's manifest signing key (made by its first policy, once)
    assert [(c.verb, c.plural) for c in api.writes()] == [
        ("create", "secrets"),
        ("apply", "cronjobs"),
        ("patch", "backuppolicies"),
    ]
    cronjob = api.stored(kube.CRON_JOBS, NS, cronjob_name(NAME))
    assert cronjob is not None and cronjob["metadata"]["ownerReferences"][0]["kind"] == "BackupPolicy"
    assert s3.rules is not None and s3.rules[0]["Filter"] == {"Prefix": "postgresql/"}


def test_a_resync_with_nothing_changed_writes_nothing(api: FakeApi, s3: FakeS3) -> None:
    policy(api)
    run(api)
    api.calls.clear()
    s3.writes.clear()
    assert run(api) == Result.done()
    # the pass went all the way (it read the CronJob and listed the Jobs), and wrote nothing anywhere
    assert Call("get", "cronjobs", NS, cronjob_name(NAME)) in api.calls
    assert any(c.verb == "list" and c.plural == "jobs" for c in api.calls)
    assert api.writes() == [] and s3.writes == []


def test_a_missing_secret_key_is_ready_false_naming_the_field_with_one_event(api: FakeApi, s3: FakeS3) -> None:
    secret(api, "db-credentials", {"POSTGRES_USER": "reader"})  # no password key
    policy(api)
    result = run(api)
    assert result.error is not None and result.error.reason == "SecretKeyMissing"
    assert result.requeue_after == 30  # the Secret may appear: retried
    ready = condition(api, "Ready")
    assert (ready["status"], ready["reason"]) == ("False", "SecretKeyMissing")
    assert ready["message"].startswith("spec.source.postgresql.credentialsSecretRef: Secret db-credentials")
    assert status(api)["phase"] == "Blocked"
    assert events(api) == [("Warning", "SecretKeyMissing")]
    assert writes(api, "cronjobs") == [] and len(writes(api, "backuppolicies")) == 1
    assert "pw-1" not in json.dumps([c.body for c in api.writes()])


def test_an_invalid_spec_is_ready_false_naming_the_field_and_waits_for_a_change(api: FakeApi, s3: FakeS3) -> None:
    policy(api, schedule="never")
    result = run(api)
    assert result.error is not None and result.error.reason == "InvalidSpec" and result.requeue_after is None
    ready = condition(api, "Ready")
    assert ready["status"] == "False" and ready["message"].startswith("spec.schedule")
    assert status(api)["phase"] == "Invalid" and "cronJobName" not in status(api)
    assert events(api) == [("Warning", "InvalidSpec")]
    assert writes(api, "cronjobs") == []


def test_a_missing_bucket_names_the_bucket(api: FakeApi, s3: FakeS3) -> None:
    aws = {key: value for key, value in SAMPLE["destination"]["s3"].items() if key != "endpoint"}  # no grant needed
    policy(api, destination={"s3": {**aws, "bucket": "no-such-bucket"}})
    result = run(api)
    assert result.error is not None and result.error.reason == "BucketNotFound"
    assert condition(api, "Ready")["message"].startswith("spec.destination.s3.bucket: bucket no-such-bucket")
    assert writes(api, "cronjobs") == []


def test_backup_now_creates_one_job_once(api: FakeApi, s3: FakeS3) -> None:
    body = policy(api)
    run(api)
    body = api.patch(POLICIES, NS, NAME, {"metadata": {"annotations": {BACKUP_NOW: "2026-11-26T03:00"}}}) or body
    api.calls.clear()
    run(api, backup.backup_now)  # the backup-now event
    (created,) = writes(api, "jobs")
    assert created.verb == "create" and created.body["metadata"]["annotations"][BACKUP_NOW] == "2026-11-26T03:00"
    assert status(api)["backupNow"] == "2026-11-26T03:00"
    assert events(api) == [("Normal", "BackupRequested")]

    run(api)  # the next full pass sees the Job started
    assert status(api)["lastScheduleTime"]

    # the same value again, by the event (it reads the policy anew: the event's copy may predate the status
    # write) and by a full pass: nothing new
    api.calls.clear()
    assert backup.pass_named(api, NS, NAME, backup.backup_now, GRANTS) == Result.done()
    run(api)
    assert Call("get", "cronjobs", NS, cronjob_name(NAME)) in api.calls
    assert api.writes() == []
    assert len(api.list(kube.JOBS, NS)) == 1


def _job(
    api: FakeApi, name: str, *, state: str, when: datetime, message: str | None = None, created: datetime | None = None
) -> None:
    cronjob = api.stored(kube.CRON_JOBS, NS, cronjob_name(NAME))
    assert cronjob is not None
    owner = {"apiVersion": "batch/v1", "kind": "CronJob", "name": cronjob_name(NAME), "uid": "cj", "controller": True}
    stamp = (created or when - timedelta(minutes=5)).strftime("%Y-%m-%dT%H:%M:%SZ")
    condition = {"type": state, "status": "True", "lastTransitionTime": when.strftime("%Y-%m-%dT%H:%M:%SZ")}
    metadata = {"name": name, "labels": {POLICY_LABEL: NAME}, "ownerReferences": [owner], "creationTimestamp": stamp}
    api.put(kube.JOBS, NS, {"metadata": metadata, "status": {"conditions": [condition]}})
    if message is not None:
        terminated = {"state": {"terminated": {"message": message}}}
        pod = {"metadata": {"name": f"{name}-pod", "labels": {"batch.kubernetes.io/job-name": name}}}
        api.put(kube.PODS, NS, {**pod, "status": {"containerStatuses": [terminated]}})


def _manifest(s3: FakeS3, job: str, when: datetime, size: int = 42) -> str:
    folder = f"postgresql/{NS}/{NAME}/{format_timestamp(when)}/"
    s3.objects[f"{folder}postgresql.dump.gpg"] = b"x" * size
    manifest = {
        "job": job,
        "endTime": when.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "data": {"key": f"{folder}postgresql.dump.gpg", "sizeBytes": size, "sha256": "ab" * 32},
    }
    s3.objects[f"{folder}manifest.json"] = json.dumps(manifest).encode()
    return folder


def test_job_outcomes_update_last_successful_backup_and_last_failure(api: FakeApi, s3: FakeS3) -> None:
    policy(api)
    run(api)
    now = datetime.now(UTC).replace(microsecond=0)

    # a Job that completed and whose manifest is in the bucket counts
    _job(api, "backup-db-1", state="Complete", when=now - timedelta(minutes=30))
    folder = _manifest(s3, "backup-db-1", now - timedelta(minutes=31))
    api.calls.clear()
    backup.pass_named(api, NS, NAME, backup.observe, GRANTS)  # the Job watcher
    success = status(api)["lastSuccessfulBackup"]
    assert success == {
        "time": success["time"],
        "key": folder,
        "sizeBytes": 42,
        "sha256": "ab" * 32,
        "job": "backup-db-1",
    }
    assert condition(api, "LastBackupSucceeded")["status"] == "True"
    assert status(api)["lastScheduleTime"] == (now - timedelta(minutes=35)).strftime("%Y-%m-%dT%H:%M:%SZ")
    assert events(api) == [("Normal", "BackupStarted"), ("Normal", "BackupSucceeded")]
    assert len(writes(api, "backuppolicies")) == 1

    # a failed Job: the agent's one-line reason from its pod's termination message
    line = "INFO: dumping\nbackup failed: SourceUnavailable: password authentication failed"
    _job(api, "backup-db-2", state="Failed", when=now - timedelta(minutes=10), message=line)
    backup.pass_named(api, NS, NAME, backup.observe, GRANTS)
    failure = status(api)["lastFailure"]
    assert (failure["job"], failure["reason"]) == ("backup-db-2", "SourceUnavailable")
    assert failure["message"] == "password authentication failed"
    assert condition(api, "LastBackupSucceeded")["status"] == "False"
    assert status(api)["lastSuccessfulBackup"] == success

    # a Job that claims success without a manifest does not count
    _job(api, "backup-db-3", state="Complete", when=now - timedelta(minutes=5))
    backup.pass_named(api, NS, NAME, backup.observe, GRANTS)
    assert (status(api)["lastFailure"]["job"], status(api)["lastFailure"]["reason"]) == (
        "backup-db-3",
        "ManifestMissing",
    )
    assert status(api)["lastSuccessfulBackup"] == success

    # nothing new: nothing written
    api.calls.clear()
    backup.pass_named(api, NS, NAME, backup.observe, GRANTS)
    run(api)
    assert api.writes() == []


def test_deletion_with_deletion_policy_delete_removes_only_its_backups(api: FakeApi, s3: FakeS3) -> None:
    policy(api, deletionPolicy="Delete")
    run(api)
    ours = _manifest(s3, "backup-db-1", datetime(2026, 1, 1, tzinfo=UTC))
    other = "postgresql/hungryhippaahneties/other/20260101T000000Z/manifest.json"
    s3.objects[other] = b"{}"
    assert run(api, backup.finalize) == Result.done()
    assert sorted(s3.objects) == [other] and not any(k.startswith(ours) for k in s3.objects)
    assert ("Normal", "BackupsDeleted") in events(api)


def recipients(api: FakeApi, public_key: str, *pins: str) -> dict[str, Any]:
    """A policy encrypting to the public keys in ConfigMap backup-recipients, pinned to ``pins``."""
    api.put(kube.CONFIG_MAPS, NS, {"metadata": {"name": "backup-recipients"}, "data": {"keys.asc": public_key}})
    gpg: dict[str, Any] = {"recipientsConfigMapRef": {"name": "backup-recipients", "key": "keys.asc"}}
    if pins:
        gpg["fingerprints"] = list(pins)
    body = policy(api)
    return api.put(POLICIES, NS, {**body, "spec": {**body["spec"], "encryption": {"gpg": gpg}}})


def test_pinned_recipients_are_ready_and_say_so(api: FakeApi, s3: FakeS3, gpg_keyring: GpgKeyring) -> None:
    recipients(api, gpg_keyring.public_key, gpg_keyring.fingerprint)
    assert run(api) == Result.done()
    assert condition(api, "Ready")["status"] == "True"
    pinned = condition(api, "RecipientsPinned")
    assert (pinned["status"], pinned["reason"]) == ("True", "Pinned")


def test_unpinned_recipients_stay_ready_with_a_condition_that_says_how_to_pin(
    api: FakeApi, s3: FakeS3, gpg_keyring: GpgKeyring
) -> None:
    recipients(api, gpg_keyring.public_key)
    assert run(api) == Result.done()
    assert condition(api, "Ready")["status"] == "True"
    pinned = condition(api, "RecipientsPinned")
    assert (pinned["status"], pinned["reason"]) == ("False", "NotPinned")
    assert "spec.encryption.gpg.fingerprints" in pinned["message"] and "backup-recipients" in pinned["message"]


def test_a_key_swapped_into_the_config_map_is_ready_false_naming_the_field(
    api: FakeApi, s3: FakeS3, gpg_keyring: GpgKeyring
) -> None:
    recipients(api, gpg_keyring.public_key, "AB" * 20)  # pinned to another key than the ConfigMap holds
    result = run(api)
    assert result.error is not None and result.error.reason == "RecipientNotPinned"
    ready = condition(api, "Ready")
    assert (ready["status"], ready["reason"]) == ("False", "RecipientNotPinned")
    assert ready["message"].startswith("spec.encryption.gpg.recipientsConfigMapRef: key " + gpg_keyring.fingerprint)
    assert "spec.encryption.gpg.fingerprints" in ready["message"]
    assert writes(api, "cronjobs") == [] and status(api)["phase"] == "Blocked"


# --- when passes run (backup.PASSES): level-triggered, nothing at rest -------------------------------------


def reads(calls: list[Call]) -> list[tuple[str, str]]:
    return [(c.verb, c.plural) for c in calls if c.verb in ("get", "list")]


class Operator:
    """``backup.Passes`` over the FakeApi, fed the events kopf would hand over (bodies as the API has them)."""

    def __init__(self, api: FakeApi, recheck: float = backup.RECHECK) -> None:
        self.api = api
        self.passes = backup.Passes(api=lambda: api, recheck=recheck)

    async def policy(self, type: str | None = "MODIFIED") -> None:
        body = self.api.stored(POLICIES, NS, NAME)
        assert body is not None
        await self.passes.policy_event(type, body, GRANTS)

    async def cronjob(self, type: str | None = "MODIFIED", body: dict[str, Any] | None = None) -> None:
        live = body or self.api.stored(kube.CRON_JOBS, NS, cronjob_name(NAME))
        assert live is not None
        await self.passes.cronjob_event(type, live, GRANTS)

    async def job(self, name: str) -> None:
        body = self.api.stored(kube.JOBS, NS, name)
        assert body is not None
        await self.passes.job_event("MODIFIED", body, GRANTS)

    def timer(self) -> float | None:
        """Seconds until the policy's next timed pass (None: none is timed)."""
        handle = self.passes.known[(NS, NAME)].timer
        return None if handle is None else handle.when() - asyncio.get_running_loop().time()

    async def fire(self) -> None:
        """The timed pass, now."""
        self.passes._timed((NS, NAME))
        await asyncio.gather(*self.passes._tasks)


def test_creation_writes_the_cronjob_and_status_then_events_of_its_own_writes_cost_nothing(
    api: FakeApi, s3: FakeS3
) -> None:
    secret(api, "runbook-manifest-key", {"key": "k" * 64})  # the namespace's key, made by an earlier policy
    policy(api)

    async def scenario() -> None:
        operator = Operator(api)
        await operator.policy("ADDED")
        # exactly two writes, and these reads: the policy's three Secrets (each once, the S3 one for both of
        # its keys), the manifest key, the CronJob (absent), the Jobs
        assert [(c.verb, c.plural) for c in api.writes()] == [("apply", "cronjobs"), ("patch", "backuppolicies")]
        assert sorted(reads(api.calls)) == [
            ("get", "cronjobs"),
            ("get", "secrets"),
            ("get", "secrets"),
            ("get", "secrets"),
            ("get", "secrets"),
            ("list", "jobs"),
        ]
        assert status(api)["phase"] == "Scheduled"
        api.calls.clear()
        # the events that follow: our status write, our CronJob, a label someone adds, a re-listing
        await operator.policy("MODIFIED")
        await operator.cronjob("ADDED")
        api.patch(POLICIES, NS, NAME, {"metadata": {"labels": {"team": "db"}}})
        await operator.policy("MODIFIED")
        await operator.policy(None)
        await operator.cronjob(None)
        assert api.calls == [Call("patch", "backuppolicies", NS, NAME, None, {"metadata": {"labels": {"team": "db"}}})]
        # the next pass is the re-check, RECHECK (less up to 10 %, spread) away
        left = operator.timer()
        assert left is not None and 0.89 * backup.RECHECK < left <= backup.RECHECK

    asyncio.run(scenario())
    assert s3.writes == ["lifecycle"]


def test_the_recheck_pass_over_an_unchanged_policy_writes_nothing_and_reads_six_times(api: FakeApi, s3: FakeS3) -> None:
    policy(api)

    async def scenario() -> None:
        operator = Operator(api)
        await operator.policy("ADDED")
        api.calls.clear()
        await operator.fire()
        # the policy itself, its three Secrets, the CronJob, the Jobs; the manifest key is known (per namespace)
        assert api.writes() == []
        assert sorted(reads(api.calls)) == [
            ("get", "backuppolicies"),
            ("get", "cronjobs"),
            ("get", "secrets"),
            ("get", "secrets"),
            ("get", "secrets"),
            ("list", "jobs"),
        ]

    asyncio.run(scenario())


def test_a_cronjob_edited_or_deleted_by_hand_is_put_back(api: FakeApi, s3: FakeS3) -> None:
    policy(api)

    async def scenario() -> None:
        operator = Operator(api)
        await operator.policy("ADDED")
        name = cronjob_name(NAME)
        edited = api.patch(kube.CRON_JOBS, NS, name, {"spec": {"schedule": "* * * * *"}})
        api.calls.clear()
        await operator.cronjob("MODIFIED", edited)
        (applied,) = writes(api, "cronjobs")
        assert applied.verb == "apply" and applied.body["spec"]["schedule"] == SAMPLE["schedule"]
        assert events(api) == [("Normal", "CronJobApplied")]
        api.calls.clear()
        await operator.cronjob("MODIFIED")  # the event of our own repair: nothing
        assert api.calls == []

        gone = api.stored(kube.CRON_JOBS, NS, name)
        api.delete(kube.CRON_JOBS, NS, name)
        await operator.cronjob("DELETED", gone)
        assert api.stored(kube.CRON_JOBS, NS, name) is not None

    asyncio.run(scenario())


def test_a_job_event_runs_a_pass_only_until_status_shows_the_job(api: FakeApi, s3: FakeS3) -> None:
    policy(api)
    now = datetime.now(UTC).replace(microsecond=0)

    async def scenario() -> None:
        operator = Operator(api)
        await operator.policy("ADDED")
        _job(api, "backup-db-1", state="Complete", when=now - timedelta(minutes=1))
        _manifest(s3, "backup-db-1", now - timedelta(minutes=2))
        await operator.job("backup-db-1")
        assert status(api)["lastSuccessfulBackup"]["job"] == "backup-db-1"
        api.calls.clear()
        await operator.job("backup-db-1")  # again (a re-listing): status shows it
        await operator.policy("MODIFIED")
        assert api.calls == []

    asyncio.run(scenario())


def test_a_secret_deleted_since_shows_when_the_next_job_fails(api: FakeApi, s3: FakeS3) -> None:
    policy(api)
    now = datetime.now(UTC).replace(microsecond=0)

    async def scenario() -> None:
        operator = Operator(api)
        await operator.policy("ADDED")
        del api.objects[("secrets", NS, "db-credentials")]
        line = "backup failed: SourceUnavailable: password authentication failed"
        _job(api, "backup-db-1", state="Failed", when=now - timedelta(minutes=1), message=line)
        await operator.job("backup-db-1")
        assert status(api)["lastFailure"]["reason"] == "SourceUnavailable"  # the outcome, whatever else fails
        ready = condition(api, "Ready")
        assert (ready["status"], ready["reason"]) == ("False", "SecretNotFound")
        assert ready["message"].startswith("spec.source.postgresql.credentialsSecretRef: Secret db-credentials")
        left = operator.timer()
        assert left is not None and 29 < left <= 30  # retried, as the reason says

    asyncio.run(scenario())


def test_a_failed_pass_is_retried_with_backoff_and_recovers(api: FakeApi, s3: FakeS3) -> None:
    secret(api, "db-credentials", {"POSTGRES_USER": "reader"})  # no password key
    policy(api)

    async def scenario() -> None:
        operator = Operator(api)
        await operator.policy("ADDED")
        assert condition(api, "Ready")["reason"] == "SecretKeyMissing"
        first = operator.timer()
        await operator.policy("MODIFIED")  # the event of the failure's status write: no pass
        await operator.fire()
        second = operator.timer()
        assert first is not None and second is not None and 29 < first <= 30 and 59 < second <= 60
        secret(api, "db-credentials", {"POSTGRES_USER": "reader", "POSTGRES_PASSWORD": "pw-1"})
        await operator.fire()
        assert condition(api, "Ready")["status"] == "True" and api.stored(kube.CRON_JOBS, NS, cronjob_name(NAME))

    asyncio.run(scenario())


def test_an_invalid_spec_waits_for_a_change(api: FakeApi, s3: FakeS3) -> None:
    policy(api, schedule="never")

    async def scenario() -> None:
        operator = Operator(api)
        await operator.policy("ADDED")
        assert operator.timer() is None
        api.calls.clear()
        await operator.policy("MODIFIED")
        assert api.calls == []
        api.patch(POLICIES, NS, NAME, {"spec": {"schedule": SAMPLE["schedule"]}})  # generation 2
        await operator.policy("MODIFIED")
        assert condition(api, "Ready")["status"] == "True" and status(api)["observedGeneration"] == 2

    asyncio.run(scenario())


def test_backup_now_by_event_starts_one_job(api: FakeApi, s3: FakeS3) -> None:
    policy(api)

    async def scenario() -> None:
        operator = Operator(api)
        await operator.policy("ADDED")
        api.patch(POLICIES, NS, NAME, {"metadata": {"annotations": {BACKUP_NOW: "t-1"}}})
        await operator.policy("MODIFIED")
        assert len(api.list(kube.JOBS, NS)) == 1 and status(api)["backupNow"] == "t-1"
        api.calls.clear()
        await operator.policy("MODIFIED")  # the status write's event, and a re-listing
        await operator.policy(None)
        assert api.calls == []

    asyncio.run(scenario())


def test_the_recipients_keys_are_checked_by_gpg_once_per_content(
    api: FakeApi, s3: FakeS3, gpg_keyring: GpgKeyring, monkeypatch: pytest.MonkeyPatch
) -> None:
    started: list[object] = []

    class CountedGPG(backup.GPG):
        def __init__(self) -> None:
            started.append(self)
            super().__init__()

    monkeypatch.setattr(backup, "GPG", CountedGPG)
    recipients(api, gpg_keyring.public_key, gpg_keyring.fingerprint)
    run(api)
    run(api)
    assert len(started) == 1
    other = api.stored(kube.CONFIG_MAPS, NS, "backup-recipients")
    assert other is not None
    api.put(kube.CONFIG_MAPS, NS, {**other, "data": {"keys.asc": gpg_keyring.public_key + "\n"}})  # new content
    run(api)
    assert len(started) == 2 and condition(api, "Ready")["status"] == "True"


# --- passes fed by the watches (main.py's indexes of the policies' CronJobs and Jobs) ------------------------


class Indexes:
    """kopf's indexes ``backup_cronjobs`` / ``backup_jobs`` as kopf keeps them (key -> the values of every
    object that returned one), filled from the FakeApi's objects by the operator's own index functions."""

    def __init__(self, api: FakeApi) -> None:
        self.api = api
        self.cronjobs: dict[tuple[str, str], list[str]] = {}
        self.jobs: dict[tuple[str, str], list[dict[str, Any]]] = {}

    def refresh(self) -> None:
        """As after the watch events of every object now stored."""
        self.cronjobs.clear()
        self.jobs.clear()
        for cronjob in self.api.list(kube.CRON_JOBS, NS):
            for key, entry in backup.cronjob_index_entry(cronjob).items():
                self.cronjobs.setdefault(key, []).append(entry)
        for job in self.api.list(kube.JOBS, NS):
            for key, value in backup.job_index_entry(job).items():
                self.jobs.setdefault(key, []).append(value)
        self.api.calls.clear()


def watched(api: FakeApi) -> tuple[Operator, Indexes]:
    operator, indexes = Operator(api), Indexes(api)
    operator.passes.watching(indexes.cronjobs, indexes.jobs)
    indexes.refresh()
    return operator, indexes


def test_watched_creation_reads_no_cronjob_and_lists_no_jobs(api: FakeApi, s3: FakeS3) -> None:
    secret(api, "runbook-manifest-key", {"key": "k" * 64})
    policy(api)

    async def scenario() -> None:
        operator, indexes = watched(api)
        await operator.policy("ADDED")
        # the same two writes; of the reads only the three Secrets and the manifest key are left
        assert [(c.verb, c.plural) for c in api.writes()] == [("apply", "cronjobs"), ("patch", "backuppolicies")]
        assert sorted(reads(api.calls)) == [("get", "secrets")] * 4
        assert status(api)["phase"] == "Scheduled"
        indexes.refresh()  # the watch saw our CronJob
        await operator.cronjob("ADDED")
        await operator.policy("MODIFIED")
        assert api.calls == []
        # the re-check: the policy, its Secrets and its CronJob (it exists: compared whole); the Jobs from the
        # index; no write
        await operator.fire()
        assert api.writes() == []
        assert sorted(reads(api.calls)) == [("get", "backuppolicies"), ("get", "cronjobs")] + [("get", "secrets")] * 3

    asyncio.run(scenario())


def test_watched_a_cronjob_edited_while_the_operator_was_down_is_put_back(api: FakeApi, s3: FakeS3) -> None:
    policy(api)

    async def scenario() -> None:
        operator, indexes = watched(api)
        await operator.policy("ADDED")
        api.patch(kube.CRON_JOBS, NS, cronjob_name(NAME), {"spec": {"schedule": "* * * * *"}})
        restarted, indexes = watched(api)  # a new operator: its index has the edited CronJob
        await restarted.policy("ADDED")
        (applied,) = writes(api, "cronjobs")
        assert applied.body["spec"]["schedule"] == SAMPLE["schedule"]
        assert events(api) == [("Normal", "CronJobApplied")]
        indexes.refresh()
        api.calls.clear()
        again, _ = watched(api)  # and once more: the CronJob as applied, nothing to do
        await again.policy("ADDED")
        assert writes(api, "cronjobs") == []

    asyncio.run(scenario())


def test_watched_job_outcomes_come_from_the_index(api: FakeApi, s3: FakeS3) -> None:
    policy(api)
    now = datetime.now(UTC).replace(microsecond=0)

    async def scenario() -> None:
        operator, indexes = watched(api)
        await operator.policy("ADDED")
        _job(api, "backup-db-1", state="Complete", when=now - timedelta(minutes=1))
        _manifest(s3, "backup-db-1", now - timedelta(minutes=2))
        line = "backup failed: SourceUnavailable: password authentication failed"
        _job(api, "backup-db-2", state="Failed", when=now, message=line, created=now - timedelta(seconds=30))
        indexes.refresh()
        job = api.stored(kube.JOBS, NS, "backup-db-2")
        assert job is not None
        await operator.passes.job_event("MODIFIED", job, GRANTS)
        assert not any(c.verb == "list" and c.plural == "jobs" for c in api.calls)
        assert status(api)["lastSuccessfulBackup"]["job"] == "backup-db-1"
        failure = status(api)["lastFailure"]
        assert (failure["job"], failure["reason"]) == ("backup-db-2", "SourceUnavailable")
        assert status(api)["lastScheduleTime"] == (now - timedelta(seconds=30)).strftime("%Y-%m-%dT%H:%M:%SZ")

    asyncio.run(scenario())


def test_job_index_entries_are_only_the_policys_cronjobs_jobs() -> None:
    owner = {"kind": "CronJob", "name": cronjob_name(NAME)}
    mine = {"metadata": {"name": "j", "namespace": NS, "labels": {POLICY_LABEL: NAME}, "ownerReferences": [owner]}}
    assert list(backup.job_index_entry(mine)) == [(NS, NAME)]
    by_hand = {"metadata": {"name": "j", "namespace": NS, "labels": {POLICY_LABEL: NAME}}}
    assert backup.job_index_entry(by_hand) == {}
    other = {"metadata": {"name": "c", "namespace": NS, "labels": {POLICY_LABEL: NAME}}}
    assert backup.cronjob_index_entry(other) == {}  # not named as the policy's CronJob


def test_shared_reads_serve_only_passes_that_began_before_the_request() -> None:
    api = FakeApi()
    secret(api, "s", {"k": "v1"})
    shared = backup.SharedReads()
    began = backup.time.monotonic()
    first = shared.get(api, kube.SECRETS, NS, "s", began)
    second = shared.get(api, kube.SECRETS, NS, "s", began)  # began before the first request: its answer
    assert first is second and len(api.calls) == 1
    secret(api, "s", {"k": "v2"})
    later = shared.get(api, kube.SECRETS, NS, "s", backup.time.monotonic())  # began after it: its own read
    assert len(api.calls) == 2 and base64.b64decode(later["data"]["k"]) == b"v2"


def test_s3_client_reads_its_secret_once(api: FakeApi, monkeypatch: pytest.MonkeyPatch) -> None:
    made: list[tuple[str, ...]] = []
    monkeypatch.setattr(catalog.s3, "shared_client", lambda location, *keys, **options: made.append(keys))
    location = backup.BackupPolicySpec.model_validate(SAMPLE).destination.s3
    catalog.s3_client(api, NS, location, field=catalog.S3_CREDENTIALS_FIELD)
    assert made == [("id", "key-1")] and reads(api.calls) == [("get", "secrets")]


def test_watched_backup_now_starts_one_job_from_the_indexed_cronjob(api: FakeApi, s3: FakeS3) -> None:
    policy(api)

    async def scenario() -> None:
        operator, indexes = watched(api)
        await operator.policy("ADDED")
        indexes.refresh()
        api.patch(POLICIES, NS, NAME, {"metadata": {"annotations": {BACKUP_NOW: "t-1"}}})
        await operator.policy("MODIFIED")
        (job,) = api.list(kube.JOBS, NS)
        cronjob = api.stored(kube.CRON_JOBS, NS, cronjob_name(NAME))
        assert cronjob is not None and job["metadata"]["ownerReferences"][0]["uid"] == cronjob["metadata"]["uid"]
        assert status(api)["backupNow"] == "t-1"

    asyncio.run(scenario())


def test_watched_backup_now_at_creation_uses_the_cronjob_just_applied(api: FakeApi, s3: FakeS3) -> None:
    body = policy(api)
    api.patch(POLICIES, NS, NAME, {"metadata": {"annotations": {BACKUP_NOW: "t-0"}}})

    async def scenario() -> None:
        operator, _ = watched(api)
        await operator.policy("ADDED")  # the index has no CronJob yet: the pass uses the one it applied
        assert len(api.list(kube.JOBS, NS)) == 1 and status(api)["backupNow"] == "t-0"
        assert not any(c.verb == "get" and c.plural == "cronjobs" for c in api.calls)

    asyncio.run(scenario())
    assert body["metadata"]["name"] == NAME
