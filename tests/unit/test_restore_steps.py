"""BackupRestore's step table, pass by pass, on an in-memory API with a fake source (no server, no bucket):
every step (the preflight's verify Job read in a later pass), a crash after every write resuming from the
stored object, failures mid-way that always bring the workloads back at their exact counts, deletion mid-way,
and the drills' record on the policy."""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from runbook_operator.builders.restore import DRILL_LABEL, REPLICAS_ANNOTATION, job_name, verify_job_name
from runbook_operator.clients import kube
from runbook_operator.errors import RunbookError
from runbook_operator.models.backup import (
    BackupRestoreStatus,
    RestorePhase,
    RestoreStep,
    RestoreStepName,
    StepPhase,
)
from runbook_operator.models.common import Condition
from runbook_operator.models.plans import StoredObjectPlan
from runbook_operator.reconcilers import drills, restore
from runbook_operator.reconcilers.restore import RESTORE, RESTORES, Restore
from runbook_operator.reconcilers.runtime import Context, Result, run_pass
from tests.backup_support import new_bucket
from tests.fake_api import FakeApi
from tests.helpers import grants_for_test

NS = "shop"
T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
POLICY: dict[str, Any] = {
    "metadata": {"name": "db"},
    "spec": {
        "source": {"postgresql": {"host": "pg", "database": "shop", "credentialsSecretRef": {"name": "login"}}},
        "schedule": "0 */6 * * *",
        "destination": {"s3": {"bucket": "backups"}},
        "encryption": {"gpg": {"passphraseSecretRef": {"name": "pass", "key": "p"}}},
    },
}
# the policy's host and its bucket (with the operator's own credentials) as an administrator's grant allows them
GRANTS = grants_for_test(NS, hosts=[("pg", 5432)], s3=[{"buckets": ["backups"], "ambientCredentials": True}])
WORKLOADS = {("Deployment", "web"): 3, ("StatefulSet", "cache"): 2}
ALL_STEPS = ["Preflight", "ScaleDown", "Restore", "Check", "ScaleUp"]
KEY = "shop/db/20260301T000000Z/postgresql.dump.gpg"
MANIFEST: dict[str, Any] = {
    "endTime": "2026-03-01T00:10:00Z",
    "data": {"key": KEY, "sha256": "ab" * 32, "sizeBytes": 1 << 30},
}
# What the verify Job's agent reports in its termination message when the backup checked out.
VERIFIED = {"sha256": "ab" * 32, "sizeBytes": 1 << 30, "etag": '"e1"', "archiveEntries": 7}


class Crash(BaseException):
    """The operator stopped (not an error a pass reports): the test resumes with a fresh Context."""


@dataclass
class CrashingApi(FakeApi):
    """Stops the operator right after its ``crash_after``-th write (the write itself took effect)."""

    crash_after: int | None = None
    done: int = 0

    def _wrote(self) -> None:
        self.done += 1
        if self.crash_after is not None and self.done == self.crash_after:
            self.crash_after = None
            raise Crash

    def create(self, resource: kube.Resource, namespace: str, body: Any) -> bool:
        created = super().create(resource, namespace, body)
        self._wrote()
        return created

    def apply(self, resource: kube.Resource, namespace: str, body: Any) -> dict[str, Any]:
        applied = super().apply(resource, namespace, body)
        self._wrote()
        return applied

    def patch(self, resource: kube.Resource, namespace: str, name: str, patch: Any, **kw: Any) -> dict[str, Any] | None:
        patched = super().patch(resource, namespace, name, patch, **kw)
        self._wrote()
        return patched

    def delete(self, resource: kube.Resource, namespace: str, name: str) -> bool:
        deleted = super().delete(resource, namespace, name)
        self._wrote()
        return deleted


@dataclass
class FakeTarget:
    """A source without I/O: each hook can be told to fail."""

    restore: Restore
    fail: dict[str, RunbookError] = field(default_factory=dict)
    only: tuple[RestoreStepName, ...] | None = None
    ended: list[str] = field(default_factory=list)

    def _maybe_fail(self, hook: str) -> None:
        if hook in self.fail:
            raise self.fail[hook]

    def steps(self, dry_run: bool) -> tuple[RestoreStepName, ...]:
        if self.only is not None:
            return self.only
        return (RestoreStepName.PREFLIGHT,) if dry_run else tuple(RestoreStepName)

    source = "postgresql"

    def plan(self) -> tuple[StoredObjectPlan, dict[str, Any]]:
        data = MANIFEST["data"]
        plan = StoredObjectPlan.model_validate(
            {"location": {"bucket": "backups"}, "key": KEY, "sha256": data["sha256"], "sizeBytes": data["sizeBytes"]}
            | {"symmetric": True, "manifest": MANIFEST, "etag": self.restore.etag}
        )
        return plan, MANIFEST

    def preflight(self) -> tuple[StoredObjectPlan, dict[str, Any]]:
        self.restore.chosen(KEY, MANIFEST, "pg/x")
        self.restore.workloads_found()
        self._maybe_fail("preflight")
        return self.plan()

    def verified(self, plan: StoredObjectPlan, figures: Any) -> str:
        return f"verified: {figures['archiveEntries']} entries"

    def job(self) -> tuple[dict[str, Any], str]:
        self._maybe_fail("job")
        name = job_name(self.restore.name)
        return {"metadata": {"name": name}, "spec": {"backoffLimit": 0}}, f"Job {name}"

    def job_done(self, name: str, pods: list[dict[str, Any]]) -> str:
        self._maybe_fail("job_done")
        return f"Job {name} restored"

    def job_ended(self) -> None:
        self.ended.append("job")

    def check(self) -> str:
        self._maybe_fail("check")
        self.restore.add_checks({"tables": 2, "rows": 15})
        return "as recorded"

    def restored(self) -> str:
        return f"restored {self.restore.status.backup_key}"


@dataclass
class World:
    """The API, the clock, the fake source's settings, and the cluster's controllers (``settle``)."""

    api: CrashingApi = field(default_factory=CrashingApi)
    now: datetime = T0
    fail: dict[str, RunbookError] = field(default_factory=dict)
    only: tuple[RestoreStepName, ...] | None = None
    targets: list[FakeTarget] = field(default_factory=list)
    controllers: bool = True  # workloads follow their spec and Jobs complete
    job_fails: bool = False
    # the verify Job's pod's termination message (its agent's last line)
    verify_says: str = json.dumps({"verify": "complete", "postgresql": VERIFIED})

    def context(self) -> Context[Any, BackupRestoreStatus]:
        body = self.api.stored(RESTORES, NS, "r1")
        assert body is not None
        return Context.of(RESTORE, body, self.api, grants=GRANTS, now=lambda: self.now)

    def one_pass(self) -> Result:
        result = run_pass(self.context(), RESTORE.reconcile)
        self.settle()
        self.now += timedelta(seconds=result.requeue_after or 0)
        return result

    def run(self, *, passes: int = 30) -> list[Result]:
        """Passes until the restore has finished; a crash just means the next pass starts afresh."""
        results = []
        for _ in range(passes):
            try:
                result = self.one_pass()
            except Crash:
                self.settle()
                continue
            results.append(result)
            if result.finished:
                return results
        raise AssertionError(f"not finished after {passes} passes: {self.status().phase}")

    def settle(self) -> None:
        if not self.controllers:
            return
        for (kind, name), _ in WORKLOADS.items():
            workload = self.api.objects.get((kube.workload(kind).plural, NS, name))
            if workload is None:
                continue
            wanted = workload["spec"]["replicas"]
            workload["status"] = {
                "observedGeneration": workload["metadata"]["generation"],
                "replicas": wanted,
                "availableReplicas": wanted,
                "updatedReplicas": wanted,
            }
        verify = self.api.objects.get((kube.JOBS.plural, NS, verify_job_name("r1")))
        if verify is not None and not verify.get("status"):
            self.finish_job(verify, self.verify_says)
        job = self.api.objects.get((kube.JOBS.plural, NS, job_name("r1")))
        if job is not None and not job.get("status"):
            condition = "Failed" if self.job_fails else "Complete"
            job["status"] = {
                "conditions": [{"type": condition, "status": "True", "lastTransitionTime": "2026-03-01T12:00:00Z"}]
            }
            if self.job_fails:
                said = "restore failed: RestoreFailed: pg_restore: relation exists; rolled back"
                terminated = {"state": {"terminated": {"exitCode": 1, "message": said}}}
                pod = {
                    "metadata": {"name": "restore-r1-x", "labels": {"batch.kubernetes.io/job-name": job_name("r1")}},
                    "status": {"containerStatuses": [terminated]},
                }
                self.api.put(kube.PODS, NS, pod)

    def finish_job(self, job: dict[str, Any], said: str) -> None:
        """The Job's one pod ended as its agent said (``<command> failed: ...`` exits 1), and the Job with it."""
        failed = " failed: " in said
        transition = "2026-03-01T12:00:00Z"
        job["status"] = {
            "conditions": [
                {"type": "Failed" if failed else "Complete", "status": "True", "lastTransitionTime": transition}
            ]
        }
        name = job["metadata"]["name"]
        pod = {
            "metadata": {
                "name": f"{name}-x",
                "labels": {"batch.kubernetes.io/job-name": name},
                "ownerReferences": [{"kind": "Job", "name": name, "uid": job["metadata"]["uid"]}],
            },
            "status": {"containerStatuses": [{"state": {"terminated": {"exitCode": int(failed), "message": said}}}]},
        }
        self.api.put(kube.PODS, NS, pod)

    def status(self) -> BackupRestoreStatus:
        body = self.api.stored(RESTORES, NS, "r1")
        assert body is not None
        return BackupRestoreStatus.model_validate(body.get("status") or {})

    def steps(self) -> list[tuple[str, str]]:
        return [(str(s.name), str(s.phase)) for s in self.status().steps]

    def replicas(self) -> dict[str, tuple[int, bool]]:
        """Each workload's replicas and whether it still carries the restore's annotation."""
        found = {}
        for kind, name in WORKLOADS:
            workload = self.api.stored(kube.workload(kind), NS, name)
            assert workload is not None
            annotated = REPLICAS_ANNOTATION in (workload["metadata"].get("annotations") or {})
            found[name] = (workload["spec"]["replicas"], annotated)
        return found

    def ready(self) -> Condition:
        return next(c for c in self.status().conditions if c.type == "Ready")

    def events(self) -> list[str]:
        return [str(e["reason"]) for (plural, _, _), e in self.api.objects.items() if plural == "events"]


@pytest.fixture
def world(monkeypatch: pytest.MonkeyPatch) -> Iterator[World]:
    made = World()

    def target(restore_: Restore) -> FakeTarget:
        fake = FakeTarget(restore_, fail=made.fail, only=made.only)
        made.targets.append(fake)
        return fake

    monkeypatch.setattr(restore, "PostgresTarget", target)
    new(made)
    yield made


def new(world: World, **spec: Any) -> None:
    world.api.put(restore.POLICIES, NS, POLICY)
    for (kind, name), replicas in WORKLOADS.items():
        world.api.put(kube.workload(kind), NS, {"metadata": {"name": name}, "spec": {"replicas": replicas}})
    scale_down = [{"kind": kind, "name": name} for kind, name in WORKLOADS]
    body = {"metadata": {"name": "r1"}, "spec": {"policyRef": "db", "scaleDown": scale_down, **spec}}
    world.api.put(RESTORES, NS, body)
    world.api.done = 0


def test_every_step_in_order_to_succeeded(world: World) -> None:
    verifying = world.one_pass()
    # Checked what reads no backup byte, pinned the manifest and created the verify Job: nothing else yet.
    assert verifying == Result.after(restore.POLL_SECONDS)
    status = world.status()
    assert status.phase == RestorePhase.PREFLIGHT and status.scaled_down is None
    assert status.pinned is not None and json.loads(status.pinned.manifest) == MANIFEST and status.pinned.etag is None
    verify = world.api.stored(kube.JOBS, NS, verify_job_name("r1"))
    assert verify is not None and verify["spec"]["template"]["spec"]["containers"][0]["args"][:3] == [
        "verify",
        "--source",
        "postgresql",
    ]
    assert world.replicas() == {"web": (3, False), "cache": (2, False)}

    first = world.one_pass()
    # Preflight passed (the verify Job's figures in status, its ETag pinned), the counts were recorded and the
    # workloads told to stop: waiting for their pods.
    assert first == Result.after(restore.POLL_SECONDS)
    status = world.status()
    assert status.phase == RestorePhase.SCALING_DOWN
    assert [(r.kind, r.name, r.replicas) for r in status.scaled_down or []] == [
        ("Deployment", "web", 3),
        ("StatefulSet", "cache", 2),
    ]
    assert world.replicas() == {"web": (0, True), "cache": (0, True)}
    scales = [c for c in world.api.writes() if c.subresource == "scale"]
    assert {c.name for c in scales} == {"web", "cache"}  # replicas change through /scale only
    assert all(
        "replicas" not in (c.body.get("spec") or {})
        for c in world.api.writes()
        if c.plural in ("deployments", "statefulsets") and c.subresource is None
    )

    second = world.one_pass()  # stopped: the Job is created
    assert second == Result.after(restore.POLL_SECONDS)
    assert world.status().phase == RestorePhase.RESTORING and world.status().job_name == "restore-r1"

    third = world.one_pass()  # the Job completed: Check, then ScaleUp sets the counts back
    assert third == Result.after(restore.POLL_SECONDS)
    assert world.status().phase == RestorePhase.SCALING_UP
    assert world.replicas() == {"web": (3, False), "cache": (2, False)}

    last = world.one_pass()  # available again: the restore has ended and its clock stops
    assert last.finished
    status = world.status()
    assert status.phase == RestorePhase.SUCCEEDED and status.completion_time
    assert world.steps() == [(name, "Succeeded") for name in ALL_STEPS]
    assert (world.ready().status, world.ready().reason) == ("True", "Restored")
    assert status.checks is not None and (status.checks.tables, status.checks.archive_entries) == (2, 7)
    assert status.pinned is not None and status.pinned.etag == '"e1"'
    assert world.steps()[0] == ("Preflight", "Succeeded") and status.steps[0].message == "verified: 7 entries"
    for reason in ("RestoreStarted", "PreflightPassed", "ReplicasRecorded", "RestoreJobCreated", "RestoreSucceeded"):
        assert reason in world.events()
    assert sum(t.ended.count("job") for t in world.targets) == 1  # the Restore step's end, once

    # A finished restore does nothing, writes nothing.
    world.api.calls.clear()
    assert run_pass(world.context(), RESTORE.reconcile).finished
    assert world.api.writes() == []


def _end_state(world: World) -> tuple[Any, ...]:
    status = world.status()
    return (status.phase, world.steps(), world.replicas(), status.job_name, world.ready().reason, status.backup_key)


def test_a_crash_after_any_write_resumes_to_the_same_end() -> None:
    clean = World()
    new(clean)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(restore, "PostgresTarget", FakeTarget)
        clean.run()
        expected = _end_state(clean)
        writes = clean.api.done
        assert writes > 10
        for crash_after in range(1, writes + 1):
            crashed = World()
            new(crashed)
            crashed.api.crash_after = crash_after
            crashed.run()
            assert crashed.api.crash_after is None, crash_after  # it did crash
            assert _end_state(crashed) == expected, crash_after


def test_a_failure_midway_always_scales_back_up_to_the_exact_counts(world: World) -> None:
    world.fail["check"] = RunbookError("ContentMismatch", "public.orders: 3 rows, manifest 12")
    world.run()
    assert world.status().phase == RestorePhase.FAILED
    assert world.steps() == [
        ("Preflight", "Succeeded"),
        ("ScaleDown", "Succeeded"),
        ("Restore", "Succeeded"),
        ("Check", "Failed"),
        ("ScaleUp", "Succeeded"),
    ]
    assert world.replicas() == {"web": (3, False), "cache": (2, False)}
    assert (world.ready().status, world.ready().reason) == ("False", "ContentMismatch")
    assert "ContentMismatch" in world.events() and "RestoreFailed" in world.events()


def test_a_failed_job_is_reported_and_the_workloads_come_back(world: World) -> None:
    world.job_fails = True
    world.run()
    assert world.steps()[2:] == [("Restore", "Failed"), ("ScaleUp", "Succeeded")]
    assert (world.ready().status, world.ready().reason) == ("False", "RestoreFailed")
    assert "rolled back" in (world.ready().message or "")
    assert world.replicas() == {"web": (3, False), "cache": (2, False)}


def test_a_job_deleted_midway_fails_the_restore_and_scales_back(world: World) -> None:
    world.one_pass()  # the verify Job
    world.one_pass()
    world.controllers = False
    world.one_pass()  # the Job is created
    assert world.status().job_name
    world.api.delete(kube.JOBS, NS, job_name("r1"))
    world.controllers = True
    world.run()
    assert world.steps()[2] == ("Restore", "Failed") and world.ready().reason == "JobMissing"
    assert world.replicas() == {"web": (3, False), "cache": (2, False)}


def test_workloads_that_do_not_stop_time_out_and_are_brought_back(world: World) -> None:
    world.one_pass()  # the verify Job
    world.controllers = False
    for _ in range(3):
        world.one_pass()
        world.now += timedelta(seconds=200)
    world.controllers = True
    world.run()
    assert world.steps() == [("Preflight", "Succeeded"), ("ScaleDown", "Failed"), ("ScaleUp", "Succeeded")]
    assert world.ready().reason == "ScaleDownTimeout"
    assert world.replicas() == {"web": (3, False), "cache": (2, False)}


def test_workloads_not_available_after_scale_up_fail_a_restore_that_had_succeeded(world: World) -> None:
    for _ in range(4):
        world.one_pass()
    assert world.status().phase == RestorePhase.SCALING_UP
    world.controllers = False
    for kind, name in WORKLOADS:  # the counts are set back, the pods never become available
        world.api.objects[(kube.workload(kind).plural, NS, name)]["status"]["availableReplicas"] = 0
    world.now += timedelta(seconds=400)
    result = world.one_pass()
    assert result.finished
    assert world.steps()[-1] == ("ScaleUp", "Failed")
    assert world.status().phase == RestorePhase.FAILED
    assert world.ready().reason == "WorkloadsNotAvailable"
    assert world.replicas() == {"web": (3, False), "cache": (2, False)}


def test_a_preflight_check_failure_ends_the_restore_before_any_job(world: World) -> None:
    world.fail["preflight"] = RunbookError("ManifestForged", "manifest.json: its signature does not verify")
    results = world.run()
    assert len(results) == 1 and results[0].finished
    assert world.steps() == [("Preflight", "Failed")]
    assert world.status().scaled_down is None and world.status().pinned is None
    assert world.replicas() == {"web": (3, False), "cache": (2, False)}
    assert [c for c in world.api.writes() if c.plural in ("deployments", "statefulsets", "jobs")] == []
    assert world.ready().reason == "ManifestForged"
    assert world.events().count("ManifestForged") == 1 and "RestoreFailed" in world.events()


def test_the_verify_jobs_refusal_ends_the_restore_with_nothing_changed(world: World) -> None:
    said = "verify failed: ChecksumMismatch: k: SHA-256 0123… over 9 bytes does not match the manifest's abab…"
    world.verify_says = "gpg: decrypt failed\n" + said  # the agent's last line is its reason
    results = world.run()
    assert len(results) == 2 and results[-1].finished
    assert world.steps() == [("Preflight", "Failed")]
    assert world.status().scaled_down is None
    assert world.replicas() == {"web": (3, False), "cache": (2, False)}
    jobs = [c.name for c in world.api.writes() if c.plural in ("deployments", "statefulsets", "jobs")]
    assert jobs == [verify_job_name("r1")]  # only the verify Job: nothing scaled, no restore Job
    ready = world.ready()
    assert (ready.reason, ready.message) == ("ChecksumMismatch", said.split(": ", 2)[2])
    assert world.events().count("ChecksumMismatch") == 1 and "RestoreFailed" in world.events()


@pytest.mark.parametrize(
    "said",
    [
        "",  # completed without a line
        json.dumps({"verify": "complete", "postgresql": {**VERIFIED, "sha256": "cd" * 32}}),  # another object's
        json.dumps({"verify": "complete", "postgresql": {**VERIFIED, "sizeBytes": 1}}),
    ],
    ids=["no-summary", "other-digest", "other-size"],
)
def test_a_verify_job_without_the_pinned_objects_figures_fails_the_preflight(world: World, said: str) -> None:
    world.verify_says = said
    world.run()
    assert world.steps() == [("Preflight", "Failed")] and world.ready().reason == "SummaryMissing"
    assert world.replicas() == {"web": (3, False), "cache": (2, False)}


def test_a_verify_job_of_an_earlier_restore_of_the_same_name_is_never_read(world: World) -> None:
    world.controllers = False
    earlier = {"metadata": {"name": verify_job_name("r1"), "ownerReferences": [{"uid": "an-earlier-r1"}]}}
    world.api.put(kube.JOBS, NS, earlier)
    world.finish_job(world.api.objects[(kube.JOBS.plural, NS, verify_job_name("r1"))], world.verify_says)
    for _ in range(3):
        assert world.one_pass() == Result.after(restore.POLL_SECONDS)
    assert world.status().phase == RestorePhase.PREFLIGHT and world.status().checks is None
    world.api.delete(kube.JOBS, NS, verify_job_name("r1"))  # garbage-collected with its owner
    world.controllers = True
    world.run()
    assert world.status().phase == RestorePhase.SUCCEEDED


def test_a_verify_job_deleted_before_it_ended_is_made_again_from_the_pinned_manifest(world: World) -> None:
    world.controllers = False
    world.one_pass()
    world.api.delete(kube.JOBS, NS, verify_job_name("r1"))
    world.api.calls.clear()
    world.one_pass()
    reads = [c for c in world.api.calls if c.plural in ("secrets", "deployments", "statefulsets")]
    assert reads == []  # no check again: the plan comes from the pinned manifest
    assert world.api.stored(kube.JOBS, NS, verify_job_name("r1")) is not None
    world.controllers = True
    world.run()
    assert world.status().phase == RestorePhase.SUCCEEDED


def test_a_missing_workload_fails_the_preflight(world: World) -> None:
    world.api.delete(kube.STATEFUL_SETS, NS, "cache")
    world.run()
    assert world.steps() == [("Preflight", "Failed")] and world.ready().reason == "WorkloadNotFound"


def test_a_dry_run_ends_after_the_preflight(world: World) -> None:
    world.api.patch(RESTORES, NS, "r1", {"spec": {"dryRun": True}})
    world.run()
    assert world.status().phase == RestorePhase.DRY_RUN_SUCCEEDED
    assert world.steps() == [("Preflight", "Succeeded")]
    assert world.ready().reason == "DryRunSucceeded"
    assert world.status().checks is not None and world.status().checks.archive_entries == 7
    assert world.api.stored(kube.JOBS, NS, job_name("r1")) is None  # only the verify Job ran


def test_a_source_without_workloads_walks_its_own_table(world: World) -> None:
    world.only = (RestoreStepName.PREFLIGHT, RestoreStepName.RESTORE)
    world.fail["job_done"] = RunbookError("ApplyFailed", "refused: ConfigMap/x")
    world.run()
    assert world.steps() == [("Preflight", "Succeeded"), ("Restore", "Failed")]
    assert world.status().phase == RestorePhase.FAILED and world.ready().reason == "ApplyFailed"
    assert sum(t.ended.count("job") for t in world.targets) == 1  # the Restore step's end ran after a failure too


def test_an_unforeseen_refusal_keeps_the_step_and_retries(world: World) -> None:
    world.one_pass()  # the verify Job
    world.one_pass()
    world.api.fail_on("create", "jobs", status=403)
    refused = world.one_pass()
    assert refused.error is not None and refused.error.reason == "Forbidden" and not refused.finished
    assert world.status().phase == RestorePhase.RESTORING  # the step stays where it was
    assert world.ready().reason == "Forbidden"
    world.run()
    assert world.status().phase == RestorePhase.SUCCEEDED


def test_deletion_midway_brings_the_workloads_back(world: World) -> None:
    world.one_pass()  # the verify Job
    world.one_pass()
    world.one_pass()  # stopped, the Job created
    assert world.replicas() == {"web": (0, True), "cache": (0, True)}
    result = run_pass(world.context(), RESTORE.finalize)  # type: ignore[arg-type]
    assert result == Result.done()
    assert world.replicas() == {"web": (3, False), "cache": (2, False)}
    assert world.api.stored(kube.JOBS, NS, job_name("r1")) is None
    assert "RestoreAborted" in world.events()


def test_deletion_of_a_finished_restore_changes_nothing(world: World) -> None:
    world.run()
    world.api.calls.clear()
    run_pass(world.context(), RESTORE.finalize)  # type: ignore[arg-type]
    assert world.api.writes() == []


def test_timeline_steps(world: World) -> None:
    """A step's record as it is written: begun Running, ended with its phase, time and message."""
    ctx = world.context()
    restore_ = Restore(ctx)
    world.now = datetime(2026, 1, 1, tzinfo=UTC)
    restore_.begin(restore.STEPS[0])
    assert restore_.running() == RestoreStep(
        name=RestoreStepName.PREFLIGHT, phase=StepPhase.RUNNING, start_time="2026-01-01T00:00:00Z"
    )
    world.now += timedelta(minutes=1)
    assert restore_.running_for() == 60
    restore_.end(StepPhase.SUCCEEDED, "ok")
    assert [s.to_api() for s in ctx.status.steps] == [
        {
            "name": "Preflight",
            "phase": "Succeeded",
            "startTime": "2026-01-01T00:00:00Z",
            "endTime": "2026-01-01T00:01:00Z",
            "message": "ok",
        }
    ]
    assert restore_.running() is None


# --- drills -------------------------------------------------------------------------------------------------

VERIFIED_POLICY = copy.deepcopy(POLICY)
VERIFIED_POLICY["metadata"]["creationTimestamp"] = "2026-01-01T00:00:00Z"
VERIFIED_POLICY["spec"]["verification"] = {"schedule": "0 4 * * *", "target": {"database": "scratch"}}


def _drill_status(phase: RestorePhase) -> BackupRestoreStatus:
    return BackupRestoreStatus.model_validate(
        {
            "phase": phase,
            "backupKey": "ns/db/20260301T000000Z/postgresql.dump.gpg",
            "backupTime": "2026-03-01T00:10:00Z",
            "completionTime": "2026-03-01T04:05:00Z",
            "target": "pg:5432/scratch",
            "checks": {"tables": 2, "rows": 15},
        }
    )


def test_a_drill_records_its_outcome_on_the_policy_without_touching_its_generation() -> None:
    api = FakeApi()
    api.put(restore.POLICIES, NS, {**VERIFIED_POLICY, "status": {"observedGeneration": 1, "cronJobName": "c"}})
    api.patch(restore.POLICIES, NS, "db", {"spec": {"suspend": True}})  # generation 2, not yet observed
    ready = Condition(
        type="Ready", status="True", reason="Restored", message="ok", last_transition_time="2026-03-01T04:05:00Z"
    )
    drills.record_drill(api, NS, "db", restore="db-drill-1", status=_drill_status(RestorePhase.SUCCEEDED), ready=ready)
    stored = api.stored(restore.POLICIES, NS, "db")
    assert stored is not None
    status = stored["status"]
    assert status["observedGeneration"] == 1 and status["cronJobName"] == "c"
    assert status["lastVerifiedBackup"] == {
        "key": "ns/db/20260301T000000Z/",
        "backupTime": "2026-03-01T00:10:00Z",
        "verifiedTime": "2026-03-01T04:05:00Z",
        "restore": "db-drill-1",
        "tables": 2,
        "rows": 15,
    }
    (verified,) = [c for c in status["conditions"] if c["type"] == "Verified"]
    assert (verified["status"], verified["reason"]) == ("True", "DrillPassed")
    (write,) = [c for c in api.writes() if c.plural == "backuppolicies" and c.subresource == "status"]
    assert set(write.body["status"]) == {"lastVerifiedBackup", "conditions"}  # never observedGeneration

    failed = Condition(
        type="Ready",
        status="False",
        reason="ChecksumMismatch",
        message="bad",
        last_transition_time="2026-03-01T04:05:00Z",
    )
    drills.record_drill(api, NS, "db", restore="db-drill-2", status=_drill_status(RestorePhase.FAILED), ready=failed)
    stored = api.stored(restore.POLICIES, NS, "db")
    assert stored is not None
    (verified,) = [c for c in stored["status"]["conditions"] if c["type"] == "Verified"]
    assert (verified["status"], verified["reason"]) == ("False", "ChecksumMismatch")
    assert stored["status"]["lastVerifiedBackup"]["restore"] == "db-drill-1"  # the newest that passed stays
    reasons = [e["reason"] for (plural, _, _), e in api.objects.items() if plural == "events"]
    assert "Verified" in reasons and "DrillFailed" in reasons


def test_drills_are_created_once_per_slot_and_old_ones_pruned() -> None:
    api = FakeApi()
    body = api.put(restore.POLICIES, NS, VERIFIED_POLICY)
    for day in range(1, 6):
        api.put(
            RESTORES,
            NS,
            {
                "metadata": {
                    "name": f"old-{day}",
                    "labels": {DRILL_LABEL: "db"},
                    "creationTimestamp": f"2026-02-0{day}T04:00:00Z",
                },
                "status": {"phase": "Succeeded"},
            },
        )
    now = datetime(2026, 3, 1, 5, 0, tzinfo=UTC)

    def one() -> Result:
        return drills.schedule_drills(Context.of(drills.DRILLS, body, api, grants=GRANTS, now=lambda: now))

    result = one()
    assert result.requeue_after == 23 * 3600
    drill = api.stored(RESTORES, NS, "db-drill-202603010400")
    assert drill is not None and drill["spec"]["target"] == {"database": "scratch"}
    names = sorted(n for (p, _, n) in api.objects if p == "backuprestores")
    assert names == ["db-drill-202603010400", "old-3", "old-4", "old-5"]
    api.calls.clear()
    one()
    assert sorted(n for (p, _, n) in api.objects if p == "backuprestores") == names  # nothing new, none pruned
    assert [c.verb for c in api.writes()] == ["create"]  # the slot's drill exists: the create is refused
    assert [c for c in api.calls if c.plural == "backuppolicies" and c.subresource == "status"] == []


# --- point-in-time restores (spec.pointInTime): the real target over stand-in archives in the real S3 server ----

PITR_POLICY: dict[str, Any] = copy.deepcopy(POLICY)
PITR_POLICY["spec"]["wal"] = {"replicationCredentialsSecretRef": {"name": "wal-login"}}
PITR_POLICY["spec"]["source"]["postgresql"]["insecurePlaintext"] = True
SEGMENT = 16 * 1024 * 1024
STS = {
    "metadata": {"name": "postgresql"},
    "spec": {
        "replicas": 1,
        "template": {
            "spec": {"securityContext": {"runAsUser": 999, "fsGroup": 999}, "containers": [{"name": "postgres"}]}
        },
    },
}


@pytest.fixture
def pitr(monkeypatch: pytest.MonkeyPatch, s3_server: Any) -> Iterator[World]:
    """A policy with spec.wal whose bucket holds a base backup ending at T0-50min and segments 2-4 shipped through
    T0-20min (stand-in objects: the Job that reads them is the fake controllers' part); the StatefulSet
    postgresql (1 replica) and its claim data-postgresql-0."""
    from runbook_operator.reconcilers import restore_pitr
    from tests import wal_support

    location = wal_support.wal_location(s3_server, new_bucket(s3_server))
    client = s3_server.client()
    start = T0 - timedelta(hours=1)
    wal_support.put_base_backup(
        client,
        location,
        start=2 * SEGMENT + 0x28,
        stop=2 * SEGMENT + 0x900,
        started=start,
        stopped=start + timedelta(minutes=10),
    )
    for number, minutes in ((2, 20), (3, 30), (4, 40)):
        wal_support.put_segment(client, location, segno=number, shipped=start + timedelta(minutes=minutes))

    def catalog(self: Any) -> Any:
        return wal_support.read(s3_server, location)

    monkeypatch.setattr(restore_pitr.PointInTimeTarget, "catalog", catalog)
    made = World(controllers=False)  # the StatefulSet and the Job: settle_sts and run_pitr below
    made.api.put(restore.POLICIES, NS, PITR_POLICY)
    made.api.put(
        kube.SECRETS, NS, {"metadata": {"name": "runbook-manifest-key"}, "data": {"key": b64(wal_support.SIGNING_KEY)}}
    )
    made.api.put(kube.SECRETS, NS, {"metadata": {"name": "pass"}, "data": {"p": b64("pw")}})
    made.api.put(kube.STATEFUL_SETS, NS, copy.deepcopy(STS))
    made.api.put(restore_pitr.PVCS, NS, {"metadata": {"name": "data-postgresql-0"}, "spec": {}})
    made.api.done = 0
    yield made


def b64(text: str) -> str:
    import base64

    return base64.b64encode(text.encode()).decode()


def new_pitr(world: World, **point: Any) -> None:
    spec = {"policyRef": "db", "scaleTimeoutSeconds": 10, "pointInTime": {"statefulSet": "postgresql", **point}}
    world.api.put(RESTORES, NS, {"metadata": {"name": "r1"}, "spec": spec})


def sts_replicas(world: World) -> tuple[int, bool]:
    sts = world.api.stored(kube.STATEFUL_SETS, NS, "postgresql")
    assert sts is not None
    return sts["spec"]["replicas"], REPLICAS_ANNOTATION in (sts["metadata"].get("annotations") or {})


def settle_sts(world: World) -> None:
    sts = world.api.objects[(kube.STATEFUL_SETS.plural, NS, "postgresql")]
    wanted = sts["spec"]["replicas"]
    sts["status"] = {
        "observedGeneration": sts["metadata"].get("generation", 1),
        "replicas": wanted,
        "availableReplicas": wanted,
        "updatedReplicas": wanted,
    }


def run_pitr(world: World, *, job_says: str | None = None, passes: int = 40) -> None:
    """Passes until the restore ends; the StatefulSet follows its spec, the Job ends as its agent says."""
    for _ in range(passes):
        result = world.one_pass()
        settle_sts(world)
        job = world.api.objects.get((kube.JOBS.plural, NS, job_name("r1")))
        if job is not None and not job.get("status"):
            assert "uid" in job["metadata"]
            world.finish_job(
                job,
                job_says or json.dumps({"restore-pitr": {"segments": 3, "previousDataDirectory": "pgdata.before-r1"}}),
            )
        if result.finished:
            return
    raise AssertionError(f"not finished: {world.steps()}")


def test_pitr_in_place_scales_the_statefulset_around_the_job_and_checks_after_scale_up(pitr: World) -> None:
    new_pitr(pitr, targetTime=(T0 - timedelta(minutes=35)).isoformat())
    states = []
    jobs = 0
    for _ in range(40):
        result = pitr.one_pass()
        settle_sts(pitr)
        states.append((pitr.status().phase, sts_replicas(pitr)))
        job = pitr.api.objects.get((kube.JOBS.plural, NS, job_name("r1")))
        if job is not None and not job.get("status"):
            assert sts_replicas(pitr) == (0, True)  # the Job runs only while the server is stopped
            pod = job["spec"]["template"]["spec"]
            assert pod["volumes"][1:3] == [
                {"name": "data", "persistentVolumeClaim": {"claimName": "data-postgresql-0"}},
                {"name": "scratch", "emptyDir": {}},
            ]
            assert (pod["securityContext"]["runAsUser"], pod["securityContext"]["fsGroup"]) == (999, 999)
            env = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
            plan = json.loads(env["RUNBOOK_PITR_PLAN"])
            assert plan["wal"] == {
                "namespace": NS,
                "policy": "db",
                "firstSegment": "000000010000000000000002",
                "lastSegment": "000000010000000000000004",  # all the contiguous WAL after the target
                "segmentBytes": SEGMENT,
                "timelines": [1],
                "histories": [],
                "segments": 3,
            }  # the range: the Job reads each file's manifest itself
            assert plan["keepPreviousAs"] == "pgdata.before-r1" and plan["targetTime"].startswith("2026-03-01T11:25")
            assert pod["containers"][0]["args"][0] == "restore-pitr"
            jobs += 1
            pitr.finish_job(
                job, json.dumps({"restore-pitr": {"segments": 2, "previousDataDirectory": "pgdata.before-r1"}})
            )
        if result.finished:
            break
    status = pitr.status()
    assert jobs == 1, states
    assert status.phase == RestorePhase.SUCCEEDED, (pitr.steps(), status.steps[-1].message)
    assert pitr.steps() == [(n, "Succeeded") for n in ("Preflight", "ScaleDown", "Restore", "ScaleUp", "Check")]
    assert [(r.kind, r.name, r.replicas) for r in status.scaled_down or []] == [("StatefulSet", "postgresql", 1)]
    assert sts_replicas(pitr) == (1, False)
    point = status.point_in_time
    assert point is not None and point.base_backup and point.volume_claim == "data-postgresql-0"
    assert (point.segments, point.previous_data_directory) == (2, "pgdata.before-r1")
    # the server at the policy's address did not answer (no server in a unit test): reported, not failed
    assert "was not read" in (status.steps[-1].message or "")


@pytest.mark.parametrize(
    ("point", "reason", "named"),
    [
        ({"targetTime": (T0 + timedelta(minutes=5)).isoformat()}, "TargetInFuture", "spec.pointInTime.targetTime"),
        ({"targetTime": (T0 - timedelta(hours=2)).isoformat()}, "TargetBeforeWindow", "spec.pointInTime.targetTime"),
        ({"targetTime": (T0 - timedelta(minutes=5)).isoformat()}, "TargetAfterWindow", "spec.pointInTime.targetTime"),
        ({"targetLSN": "0/9000000"}, "TargetAfterWindow", "spec.pointInTime.targetLSN"),
        ({"latest": True, "statefulSet": "nope"}, "WorkloadNotFound", "spec.pointInTime.statefulSet"),
        ({"latest": True, "volumeClaim": "nope"}, "VolumeClaimNotFound", "spec.pointInTime.volumeClaim"),
        (
            {"latest": True, "mode": "NewVolume", "newVolume": {"name": "data-postgresql-0", "size": "1Gi"}},
            "VolumeClaimExists",
            "spec.pointInTime.newVolume.name",
        ),
    ],
)
def test_pitr_preflight_refuses_before_anything_is_touched(
    pitr: World, point: dict[str, Any], reason: str, named: str
) -> None:
    new_pitr(pitr, **point)
    run_pitr(pitr)
    assert pitr.status().phase == RestorePhase.FAILED
    assert pitr.steps() == [("Preflight", "Failed")]
    ready = pitr.ready()
    assert ready.reason == reason and (ready.message or "").startswith(f"{named}: "), ready.message
    if reason.startswith("Target"):
        assert "the recoverable window is " in (ready.message or "")
    assert sts_replicas(pitr) == (1, False)
    assert not [c for c in pitr.api.writes() if c.plural in ("statefulsets", "jobs", "persistentvolumeclaims")]


def test_pitr_gap_is_refused_naming_the_missing_segment(pitr: World) -> None:
    """Segment 3 missing from the archive as read (its manifest gone between two listings)."""
    from runbook_operator.reconcilers import restore_pitr

    new_pitr(pitr, latest=True)
    original = restore_pitr.PointInTimeTarget.catalog

    def with_gap(self: Any) -> Any:
        found = original(self)
        del found.segments[(1, 3)]
        return found

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(restore_pitr.PointInTimeTarget, "catalog", with_gap)
        run_pitr(pitr)
    ready = pitr.ready()
    assert ready.reason == "WALGap", ready.message
    assert "000000010000000000000003" in (ready.message or "") and "spec.pointInTime.latest" in (ready.message or "")
    assert sts_replicas(pitr) == (1, False)


def test_pitr_new_volume_creates_the_claim_and_scales_nothing(pitr: World) -> None:
    new_pitr(pitr, latest=True, mode="NewVolume", newVolume={"name": "recovered", "size": "20Gi"})
    run_pitr(pitr, job_says=json.dumps({"restore-pitr": {"segments": 3}}))
    assert pitr.status().phase == RestorePhase.SUCCEEDED, pitr.steps()
    assert pitr.steps() == [(n, "Succeeded") for n in ("Preflight", "Restore", "Check")]
    claim = pitr.api.stored(restore_pitr_pvcs(), NS, "recovered")
    assert claim is not None and "ownerReferences" not in claim["metadata"]  # kept when the restore goes
    assert claim["spec"]["resources"] == {"requests": {"storage": "20Gi"}}
    job = pitr.api.stored(kube.JOBS, NS, job_name("r1"))
    assert job is not None
    assert job["spec"]["template"]["spec"]["volumes"][1]["persistentVolumeClaim"] == {"claimName": "recovered"}
    assert not [c for c in pitr.api.writes() if c.plural == "statefulsets"]
    assert pitr.status().point_in_time is not None and pitr.status().point_in_time.previous_data_directory is None  # type: ignore[union-attr]


def restore_pitr_pvcs() -> kube.Resource:
    from runbook_operator.reconcilers import restore_pitr

    return restore_pitr.PVCS


def test_pitr_a_tampered_object_fails_the_job_and_the_statefulset_comes_back(pitr: World) -> None:
    new_pitr(pitr, targetTime=(T0 - timedelta(minutes=35)).isoformat())
    said = "restore failed: ChecksumMismatch: backups/x/wal/00000001/000000010000000000000003.gpg: SHA-256 ..."
    run_pitr(pitr, job_says=said)
    assert pitr.steps() == [
        ("Preflight", "Succeeded"),
        ("ScaleDown", "Succeeded"),
        ("Restore", "Failed"),
        ("ScaleUp", "Succeeded"),
    ]
    assert pitr.ready().reason == "ChecksumMismatch"
    assert sts_replicas(pitr) == (1, False)
