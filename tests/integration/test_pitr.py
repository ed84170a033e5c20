"""Point-in-time restore against a real PostgreSQL 15, the S3 API server and gpg: the archive is made by engineer
B's agents (``wal-receive`` and ``base-backup`` as processes), the plan is the operator's preflight choice
(``restore_pitr.choose`` over ``wal_catalog``, ``builders.pitr.build_pitr_plan``), and ``restore-pitr`` runs as
the Job's process with its pod's environment on a host directory standing for the claim (the kubelet's part,
as in ``tests/restore_support.Kubelet``). A PostgreSQL server is then started on the restored directory, as the
StatefulSet's pod would be, and its rows compared."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
from tests.backup_support import new_bucket
from tests.services import Postgres, S3Server, free_port
from tests.wal_support import (
    NAMESPACE,
    PASSPHRASE,
    POLICY,
    SIGNING_KEY,
    create_slot,
    replication_role,
    run_base_backup,
    start_receiver,
    stop_receiver,
    wal_env,
    wal_location,
    wal_policy_spec,
)

from runbook_operator.builders.pitr import build_pitr_plan
from runbook_operator.errors import RunbookError
from runbook_operator.models.backup import BackupPolicySpec, PointInTime
from runbook_operator.models.plans import (
    GPG_PASSPHRASE_ENV,
    MANIFEST_KEY_ENV,
    PGDATA_ROOT_ENV,
    PITR_PLAN_ENV,
    SCRATCH_DIR_ENV,
    PointInTimePlan,
    format_lsn,
    parse_lsn,
    slot_name,
)
from runbook_operator.reconcilers import restore_pitr, wal_catalog

CLI = [sys.executable, "-m", "runbook_operator.cli"]
SLOT = slot_name(NAMESPACE, POLICY)
RESTORE = "recover-db"


@pytest.fixture(autouse=True)
def _in_process_operator() -> None:
    """No operator and no control plane here: the agents talk only to PostgreSQL and S3."""


@dataclass
class Archive:
    server: Postgres
    s3: S3Server
    location: Any
    spec: dict[str, Any]
    moments: dict[str, datetime]  # T1, T2, target (between T2 and T3), T3 and the base backup's start
    after_t2: tuple[int, int]  # (filler rows, the server's WAL insert position) right after T2 committed
    receiver: subprocess.Popen[bytes]
    namespace: str = NAMESPACE
    policy_name: str = POLICY

    @property
    def policy(self) -> BackupPolicySpec:
        return BackupPolicySpec.model_validate(self.spec)

    def wait_shipped(self, position: int, timeout: float = 120) -> None:
        """Until the bucket's WAL reaches ``position`` (``wal_support.wait_shipped`` for any policy)."""
        deadline = time.monotonic() + timeout
        while (newest := self.catalog().latest()) is None or newest[0] < position:
            assert time.monotonic() < deadline, f"WAL through {format_lsn(position)} not shipped (have {newest})"
            time.sleep(0.25)

    def catalog(self) -> wal_catalog.WALCatalog:
        client = self.s3.client()
        return wal_catalog.read_catalog(
            client, self.location, namespace=self.namespace, policy=self.policy_name, signing_key=SIGNING_KEY
        )


def commit(server: Postgres, label: str) -> datetime:
    """One row committed; when it committed (after COMMIT returned, by the server's clock)."""
    with server.connect() as conn:
        conn.execute("INSERT INTO events (label) VALUES (%s)", (label,))
        row = conn.execute("SELECT clock_timestamp()").fetchone()
    assert row is not None
    moment: datetime = row[0]
    return moment.astimezone(UTC)


def other_writes(server: Postgres, rows: int = 3000, *, switches: int = 0) -> None:
    """Writes between the marks (several MB of WAL, a segment switch among them), then ``switches`` more
    segments: a row and ``pg_switch_wal()`` each."""
    with server.connect() as conn:
        conn.execute("INSERT INTO filler (note) SELECT repeat('f', 500) FROM generate_series(1, %s)", (rows,))
        conn.execute("SELECT pg_switch_wal()")
        conn.execute("INSERT INTO filler (note) SELECT repeat('g', 500) FROM generate_series(1, %s)", (rows // 3,))
        for _ in range(switches):
            conn.execute("INSERT INTO filler (note) VALUES ('s')")
            conn.execute("SELECT pg_switch_wal()")


def source_rows(server: Postgres, sql: str) -> list[tuple[Any, ...]]:
    with server.connect() as conn:
        return conn.execute(sql).fetchall()


def insert_position(server: Postgres) -> int:
    with server.connect() as conn:
        row = conn.execute("SELECT pg_current_wal_insert_lsn()").fetchone()
    assert row is not None
    return parse_lsn(str(row[0]))


@contextlib.contextmanager
def make_archive(
    server: Postgres, s3: S3Server, *, namespace: str = NAMESPACE, policy: str = POLICY, switches: int = 0
) -> Iterator[Archive]:
    """The server's WAL streaming to a new bucket (B's receiver, as its Deployment runs it) with a base backup
    (B's agent), then the marks: T1, other writes (and ``switches`` segment switches), T2, the target moment,
    other writes, T3, other writes; the receiver stopped on leaving."""
    replication_role(server)
    with server.connect() as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS events (id bigserial PRIMARY KEY, label text NOT NULL)")
        conn.execute("CREATE TABLE IF NOT EXISTS filler (id bigserial PRIMARY KEY, note text)")
    slot = slot_name(namespace, policy)
    create_slot(server, slot)
    bucket = new_bucket(s3)
    scratch = Path(tempfile.mkdtemp(prefix="runbook-pitr-wal-"))
    spec = wal_policy_spec(server, s3, bucket, slotName=slot)
    env = wal_env(spec, s3, scratch)
    receiver = start_receiver(env, scratch.parent / f"{scratch.name}.log", namespace=namespace, policy=policy)
    try:
        before = datetime.now(UTC)
        done = run_base_backup(env, namespace=namespace, policy=policy)
        assert done.returncode == 0, done.stderr[-2000:]
        moments = {"base": before, "T1": commit(server, "T1")}
        other_writes(server, switches=switches)
        moments["T2"] = commit(server, "T2")
        after_t2 = (source_rows(server, "SELECT count(*) FROM filler")[0][0], insert_position(server))
        time.sleep(1.5)
        moments["target"] = datetime.now(UTC)
        time.sleep(1.5)
        other_writes(server)
        moments["T3"] = commit(server, "T3")
        other_writes(server, 200)
        made = Archive(server, s3, wal_location(s3, bucket), spec, moments, after_t2, receiver, namespace, policy)
        made.wait_shipped(insert_position(server), timeout=120 + switches)
        yield made
    finally:
        stop_receiver(receiver)


@pytest.fixture(scope="module")
def archive(s3_server: S3Server) -> Iterator[Archive]:
    with Postgres() as server, make_archive(server, s3_server) as made:
        yield made


def point(**fields: Any) -> PointInTime:
    return PointInTime.model_validate({"statefulSet": "postgresql", **fields})


def choice_for(archive: Archive, spec: PointInTime) -> wal_catalog.Choice:
    """The operator's preflight choice from the archive as it is now."""
    return restore_pitr.choose(archive.catalog(), spec, now=datetime.now(UTC))


def plan_for(archive: Archive, spec: PointInTime) -> PointInTimePlan:
    """What the operator's preflight pins for the Job."""
    return build_pitr_plan(
        archive.policy,
        choice_for(archive, spec),
        spec,
        restore=RESTORE,
        namespace=archive.namespace,
        policy_name=archive.policy_name,
    )


def run_job(archive: Archive, plan: PointInTimePlan, claim: Path) -> subprocess.CompletedProcess[str]:
    """The Job's pod as a process: its environment only (the claim is ``claim``, a host directory)."""
    scratch = Path(tempfile.mkdtemp(prefix="runbook-pitr-scratch-"))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PG", "AWS_", "RUNBOOK_"))}
    env.update(
        {
            PITR_PLAN_ENV: json.dumps(plan.to_api()),
            PGDATA_ROOT_ENV: str(claim),
            SCRATCH_DIR_ENV: str(scratch),
            "AWS_ACCESS_KEY_ID": archive.s3.access_key,
            "AWS_SECRET_ACCESS_KEY": archive.s3.secret_key,
            GPG_PASSPHRASE_ENV: PASSPHRASE,
            MANIFEST_KEY_ENV: SIGNING_KEY,
        }
    )
    try:
        return subprocess.run(
            [*CLI, "restore-pitr", "--namespace", NAMESPACE, "--name", RESTORE],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
    finally:
        leftovers = list(scratch.iterdir())
        shutil.rmtree(scratch, ignore_errors=True)
        assert leftovers == [], f"the Job left {leftovers} in its scratch directory"


class Restored:
    """A PostgreSQL server on the restored data directory, as the StatefulSet's pod starts it (the volume owned
    by the pod's user: ``fsGroup`` / ``runAsUser``)."""

    def __init__(self, claim: Path, data_directory: str = "pgdata", *, port: int | None = None) -> None:
        self.claim, self.data = claim, claim / data_directory
        self.bin = Postgres().bin
        self.port = port or free_port()
        self.socket = Path(tempfile.mkdtemp(prefix="runbook-pitr-sock-"))
        self.log = claim.parent / f"{claim.name}.server.log"

    def _as_postgres(self, *args: str) -> list[str]:
        return ["runuser", "-u", "postgres", "--", *args] if os.geteuid() == 0 else list(args)

    def __enter__(self) -> Restored:
        if os.geteuid() == 0:
            owner = pwd.getpwnam("postgres")
            for path in [self.claim, self.socket, *self.claim.rglob("*")]:
                os.lchown(path, owner.pw_uid, owner.pw_gid)
        options = f"-p {self.port} -k {self.socket} -c listen_addresses=127.0.0.1"
        started = subprocess.run(
            self._as_postgres(
                str(self.bin / "pg_ctl"),
                "-D",
                str(self.data),
                "-l",
                str(self.log),
                "-o",
                options,
                "-t",
                "120",
                "-w",
                "start",
            ),
            capture_output=True,
            text=True,
            check=False,
        )
        assert started.returncode == 0, started.stdout + started.stderr + self.server_log()
        deadline = time.monotonic() + 120
        while self.query("SELECT pg_is_in_recovery()") != [(False,)]:
            assert time.monotonic() < deadline, f"still recovering: {self.server_log()[-3000:]}"
            time.sleep(0.3)
        return self

    def __exit__(self, *exc: object) -> None:
        subprocess.run(
            self._as_postgres(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "fast", "stop"),
            capture_output=True,
            check=False,
        )

    def query(self, sql: str) -> list[tuple[Any, ...]]:
        with psycopg.connect(
            host="127.0.0.1", port=self.port, dbname="postgres", user=Postgres.superuser, password=Postgres.password
        ) as conn:
            return conn.execute(sql).fetchall()

    def labels(self) -> list[str]:
        return [str(row[0]) for row in self.query("SELECT label FROM events ORDER BY id")]

    def server_log(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


def tree(root: Path) -> dict[str, str]:
    """Every path under ``root`` with its content's digest (directories: their mode)."""
    found = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        found[rel] = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else oct(path.stat().st_mode)
    return found


def new_claim() -> Path:
    claim = Path(tempfile.mkdtemp(prefix="runbook-pitr-claim-"))
    claim.chmod(0o755)
    return claim


def test_restore_between_t2_and_t3_has_exactly_the_rows_through_t2(archive: Archive) -> None:
    moments = archive.moments
    assert moments["T1"] < moments["T2"] < moments["target"] < moments["T3"]
    spec = point(targetTime=wal_catalog.rfc3339(moments["target"]), mode="InPlace")
    plan = plan_for(archive, spec)
    assert plan.target_time is not None and plan.keep_previous_as == f"pgdata.before-{RESTORE}"
    claim = new_claim()
    old = claim / "pgdata"
    old.mkdir()
    (old / "PG_VERSION").write_text("15\n")  # the data directory being replaced
    started = time.monotonic()
    done = run_job(archive, plan, claim)
    elapsed = time.monotonic() - started
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])["restore-pitr"]
    assert summary["previousDataDirectory"] == plan.keep_previous_as
    assert (claim / plan.keep_previous_as / "PG_VERSION").read_text() == "15\n"
    assert (claim / "pgdata" / "recovery.signal").exists()
    assert oct((claim / "pgdata").stat().st_mode & 0o777) == "0o700"
    auto = (claim / "pgdata" / "postgresql.auto.conf").read_text()
    assert 'restore_command = \'cp "../pgdata.wal/%f" "%p"\'' in auto
    assert "recovery_target_action = 'promote'" in auto and "recovery_target_time = '" in auto
    with Restored(claim) as server:  # T1, T2 and the writes between them; none after
        assert server.labels() == ["T1", "T2"], server.server_log()[-2000:]
        assert server.query("SELECT count(*) FROM filler") == [(archive.after_t2[0],)]
        replayed = server.query("SELECT pg_last_xact_replay_timestamp()")
        log = server.server_log()
    assert "recovery stopping before commit" in log
    print(f"\nPITR to a time: {summary['segments']} segments, Job {elapsed:.1f} s; {summary}; replay {replayed}")


def test_restore_to_latest_has_t3(archive: Archive) -> None:
    plan = plan_for(archive, point(latest=True, mode="NewVolume", newVolume={"name": "recovered", "size": "1Gi"}))
    assert plan.keep_previous_as is None and plan.target_time is None and plan.target_lsn is None
    claim = new_claim()
    done = run_job(archive, plan, claim)
    assert done.returncode == 0, done.stderr[-3000:]
    with Restored(claim) as server:
        assert server.labels() == ["T1", "T2", "T3"]
        assert server.query("SELECT count(*) FROM filler") == source_rows(archive.server, "SELECT count(*) FROM filler")


def test_a_partial_reshipped_after_the_preflight_is_read_as_shipped_now(archive: Archive) -> None:
    """The receiver re-ships the partial segment while a restore waits for its Job: the Job reads the segment's
    current signed manifest (it reaches further) instead of failing on the planned digest."""
    spec = point(latest=True, mode="NewVolume", newVolume={"name": "later", "size": "1Gi"})
    planned = choice_for(archive, spec).files[-1]
    plan = plan_for(archive, spec)
    assert planned.partial and plan.wal.last_segment == planned.name
    size = len(json.dumps(plan.to_api(), separators=(",", ":")))
    commit(archive.server, "T4")
    archive.wait_shipped(insert_position(archive.server))
    current = [f for f in archive.catalog().segments.values() if f.name == planned.name]
    assert current and current[0].manifest["sha256"] != planned.manifest["sha256"]  # re-shipped (or completed)
    claim = new_claim()
    done = run_job(archive, plan, claim)
    assert done.returncode == 0, done.stderr[-3000:]
    with Restored(claim) as server:
        assert server.labels() == ["T1", "T2", "T3", "T4"]
    print(f"\nplan: {size} bytes for {plan.wal.segments} segments")


def test_restore_to_an_lsn(archive: Archive) -> None:
    """targetLSN: the server's insert position right after T2 committed."""
    target = format_lsn(archive.after_t2[1])
    plan = plan_for(archive, point(targetLSN=target, mode="NewVolume", newVolume={"name": "at-lsn", "size": "1Gi"}))
    assert plan.target_lsn == target
    claim = new_claim()
    done = run_job(archive, plan, claim)
    assert done.returncode == 0, done.stderr[-3000:]
    with Restored(claim) as server:
        assert server.labels() == ["T1", "T2"]
        assert server.query("SELECT count(*) FROM filler") == [(archive.after_t2[0],)]


def test_a_tampered_segment_stops_the_restore_before_the_data_directory_is_touched(archive: Archive) -> None:
    spec = point(targetTime=wal_catalog.rfc3339(archive.moments["target"]))
    plan = plan_for(archive, spec)
    complete = [f for f in choice_for(archive, spec).segments if not f.partial]
    victim = complete[len(complete) // 2].key
    client = archive.s3.client()
    original = client.get_object(Bucket=archive.location.bucket, Key=victim)["Body"].read()
    tampered = bytearray(original)
    tampered[len(tampered) // 2] ^= 0x01  # one bit, same size
    claim = new_claim()
    data = claim / "pgdata"
    data.mkdir()
    (data / "PG_VERSION").write_text("15\n")
    (data / "base").mkdir()
    (data / "base" / "1").write_bytes(os.urandom(4096))
    before = tree(claim)
    client.put_object(Bucket=archive.location.bucket, Key=victim, Body=bytes(tampered))
    try:
        done = run_job(archive, plan, claim)
    finally:
        client.put_object(Bucket=archive.location.bucket, Key=victim, Body=original)
    assert done.returncode == 1
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"restore failed: ChecksumMismatch: {victim}: SHA-256 "), last
    assert PASSPHRASE not in done.stderr and SIGNING_KEY not in done.stderr
    assert tree(claim) == before  # nothing renamed, staged or written: the data directory as it was


def test_a_manifest_changed_in_the_plan_or_in_the_bucket_is_refused(archive: Archive) -> None:
    """The base backup's manifest travels in the plan; each WAL manifest the Job reads from the bucket itself: a
    changed one (its signature no longer covers it) stops the Job before anything is written."""
    spec = point(latest=True)
    plan = plan_for(archive, spec)
    plan.base_manifest["sha256"] = "0" * 64
    claim = new_claim()
    done = run_job(archive, plan, claim)
    assert done.returncode == 1
    assert f"restore failed: ManifestForged: {plan.base_key}: " in done.stderr
    assert list(claim.iterdir()) == []
    victim = choice_for(archive, spec).segments[1]
    manifest_key = victim.key.removesuffix(".gpg") + ".json"
    client = archive.s3.client()
    original = client.get_object(Bucket=archive.location.bucket, Key=manifest_key)["Body"].read()
    changed = {**json.loads(original), "sha256": "0" * 64}
    client.put_object(Bucket=archive.location.bucket, Key=manifest_key, Body=json.dumps(changed).encode())
    try:
        done = run_job(archive, plan_for(archive, spec), claim)
    finally:
        client.put_object(Bucket=archive.location.bucket, Key=manifest_key, Body=original)
        wal_catalog.forget_cached([manifest_key], archive.location)
    assert done.returncode == 1
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"restore failed: ManifestForged: {manifest_key}: unsigned, or its signature "), last
    assert list(claim.iterdir()) == []


def test_a_target_in_the_future_is_refused(archive: Archive) -> None:
    future = datetime.now(UTC) + timedelta(hours=1)
    with pytest.raises(RunbookError) as refused:
        plan_for(archive, point(targetTime=wal_catalog.rfc3339(future)))
    assert refused.value.reason == "TargetInFuture"
    assert refused.value.message.startswith("spec.pointInTime.targetTime: ")
    assert "the recoverable window is " in refused.value.message


def test_a_target_before_the_window_is_refused(archive: Archive) -> None:
    early = archive.moments["base"] - timedelta(minutes=5)
    with pytest.raises(RunbookError) as refused:
        plan_for(archive, point(targetTime=wal_catalog.rfc3339(early)))
    assert refused.value.reason == "TargetBeforeWindow"
    assert refused.value.message.startswith("spec.pointInTime.targetTime: ")
    window = archive.catalog().window()
    assert window is not None
    assert f"the recoverable window is {wal_catalog.rfc3339(window.earliest_time)}" in refused.value.message


def test_zz_a_gap_in_the_chain_is_refused_naming_the_missing_segment(archive: Archive) -> None:
    """Last: it removes a segment from the module's bucket."""
    spec = point(targetTime=wal_catalog.rfc3339(archive.moments["target"]))
    plan = plan_for(archive, spec)
    complete = [f for f in choice_for(archive, spec).segments if not f.partial]
    # a segment the target needs: the second one (after the base backup's) when it was shipped before the target
    # (a later one can be covered, by the catalog's rule, by files shipped after the target), else the first
    target = archive.moments["target"]
    early = [f for f in complete[1:] if f.shipped < target]
    gone = early[0] if early else complete[0]
    manifest_key = gone.key.removesuffix(".gpg") + ".json"
    client = archive.s3.client()
    client.delete_object(Bucket=archive.location.bucket, Key=manifest_key)
    client.delete_object(Bucket=archive.location.bucket, Key=gone.key)
    wal_catalog.forget_cached([manifest_key], archive.location)
    with pytest.raises(RunbookError) as refused:
        plan_for(archive, spec)
    assert refused.value.reason == "WALGap"
    assert refused.value.message.startswith("spec.pointInTime.targetTime: ")
    assert gone.name in refused.value.message
    # The Job of a plan made before the segment went refuses too, naming it, before anything is written.
    claim = new_claim()
    done = run_job(archive, plan, claim)
    assert done.returncode == 1
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("restore failed: WALGap: WAL ") and gone.name in last, last
    assert list(claim.iterdir()) == []


def test_a_chain_of_hundreds_of_segments_restores_by_content(s3_server: S3Server) -> None:
    """250 segments between T1 and T2 (1 MiB each): the old plan (every manifest in one environment variable) was
    over 128 KiB and refused as ChainTooLong; the range is a few hundred bytes and the Job reads every manifest
    itself. The restore to a time between T2 and T3 has exactly the rows through T2."""
    with Postgres(initdb_args=("--wal-segsize=1",)) as server, make_archive(server, s3_server, switches=250) as archive:
        assert source_rows(server, "SHOW wal_segment_size") == [("1MB",)]
        spec = point(targetTime=wal_catalog.rfc3339(archive.moments["target"]), mode="NewVolume",
                     newVolume={"name": "long", "size": "1Gi"})  # fmt: skip
        choice = choice_for(archive, spec)
        assert len(choice.segments) > 250
        assert len(json.dumps([f.manifest for f in choice.files])) > 128 * 1024  # what the old plan carried
        plan = plan_for(archive, spec)
        size = len(json.dumps(plan.to_api(), separators=(",", ":")))
        assert size < 2048 and plan.wal.segment_bytes == 1024 * 1024 and plan.wal.segments == len(choice.segments)
        claim = new_claim()
        started = time.monotonic()
        done = run_job(archive, plan, claim)
        elapsed = time.monotonic() - started
        assert done.returncode == 0, done.stderr[-3000:]
        summary = json.loads(done.stdout.strip().splitlines()[-1])["restore-pitr"]
        assert (summary["segments"], summary["firstSegment"], summary["lastSegment"]) == (
            len(choice.segments),
            choice.segments[0].name,
            choice.segments[-1].name,
        )
        assert len(list((claim / "pgdata.wal").iterdir())) == len(choice.segments)
        with Restored(claim) as restored:
            assert restored.labels() == ["T1", "T2"], restored.server_log()[-2000:]
            assert restored.query("SELECT count(*) FROM filler") == [(archive.after_t2[0],)]
    print(f"\nlong chain: {summary['segments']} segments, plan {size} bytes, Job {elapsed:.1f} s")


def wait_replayed(standby: Postgres, position: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while parse_lsn(str(source_rows(standby, "SELECT pg_last_wal_replay_lsn()")[0][0])) < position:
        assert time.monotonic() < deadline, f"the standby did not replay {format_lsn(position)}"
        time.sleep(0.2)


def test_a_restore_after_a_timeline_switch_follows_the_history_file(s3_server: S3Server) -> None:
    """The receiver streams from a standby that is promoted (timeline 2: its history file shipped, streaming goes
    on); the base backup is from timeline 1. A restore to a time on timeline 2 replays timeline 1 up to the switch
    and timeline 2 after it: it has T1 (before the promote) and T5 (after), not T6 (after the target) nor what
    the old primary committed after the promote."""
    policy = "timelines"
    with Postgres() as primary:
        replication_role(primary)
        with primary.connect() as conn:
            conn.execute("CREATE TABLE events (id bigserial PRIMARY KEY, label text NOT NULL)")
            conn.execute("CREATE TABLE filler (id bigserial PRIMARY KEY, note text)")
        with Postgres(standby_of=primary) as standby:
            slot = slot_name(NAMESPACE, policy)
            create_slot(standby, slot)
            bucket = new_bucket(s3_server)
            scratch = Path(tempfile.mkdtemp(prefix="runbook-pitr-tl-"))
            spec = wal_policy_spec(standby, s3_server, bucket, slotName=slot)
            log = scratch.parent / f"{scratch.name}.log"
            receiver = start_receiver(wal_env(spec, s3_server, scratch), log, policy=policy)
            try:
                create_slot(primary, slot)  # the base-backup agent checks its source has the policy's slot
                primary_env = wal_env(wal_policy_spec(primary, s3_server, bucket, slotName=slot), s3_server, scratch)
                done = run_base_backup(primary_env, policy=policy)
                assert done.returncode == 0, done.stderr[-2000:]
                moments = {"T1": commit(primary, "T1")}
                other_writes(primary)
                wait_replayed(standby, insert_position(primary))
                with standby.connect() as conn:
                    assert conn.execute("SELECT pg_promote(true, 60)").fetchone() == (True,)
                commit(primary, "old primary, after the promote")
                moments["T5"] = commit(standby, "T5")
                other_writes(standby)
                time.sleep(1.5)
                moments["target"] = datetime.now(UTC)
                time.sleep(1.5)
                moments["T6"] = commit(standby, "T6")
                other_writes(standby, 200)
                location = wal_location(s3_server, bucket)
                archive = Archive(standby, s3_server, location, spec, moments, (0, 0), receiver, NAMESPACE, policy)
                archive.wait_shipped(insert_position(standby))
                catalog = archive.catalog()
                assert catalog.timeline == 2 and sorted(catalog.history) == [2], log.read_text()[-2000:]
                assert catalog.base_backups[0].timeline == 1
                target = point(targetTime=wal_catalog.rfc3339(moments["target"]), mode="NewVolume",
                               newVolume={"name": "tl2", "size": "1Gi"})  # fmt: skip
                choice = choice_for(archive, target)
                plan = plan_for(archive, target)
            finally:
                stop_receiver(receiver)
    assert (plan.timeline, plan.wal.timelines, plan.wal.histories) == (2, [1, 2], [2])
    assert choice.files[0].name == "00000002.history"
    claim = new_claim()
    done = run_job(archive, plan, claim)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])["restore-pitr"]
    assert summary["historyFiles"] == 1 and summary["lastSegment"].startswith("00000002")
    with Restored(claim) as restored:
        assert restored.labels() == ["T1", "T5"], restored.server_log()[-3000:]
        recovered_log = restored.server_log()
    assert "selected new timeline ID: 3" in recovered_log  # recovered along timeline 2, promoted at the target
    print(f"\ntimeline switch: {summary}")


def test_a_receiver_started_after_a_promotion_ships_the_new_timelines_history(s3_server: S3Server) -> None:
    """A failover: the receiver of the primary (timeline 1) is gone, its standby is promoted (timeline 2), the
    operator makes the slot on it and a fresh receiver starts there, its slot's restart point already on timeline
    2: it never sees timeline 1 end, so it fetches 00000002.history (TIMELINE_HISTORY) at its start. A restore
    from the timeline 1 base backup to a time on timeline 2 follows it: T1 and T5, not T6 nor what the old
    primary committed after the promote. (Before: no history file in the bucket, the restore stayed on timeline
    1.)"""
    policy = "failover"
    slot = slot_name(NAMESPACE, policy)
    bucket = new_bucket(s3_server)
    scratch = Path(tempfile.mkdtemp(prefix="runbook-pitr-fo-"))
    log = scratch.parent / f"{scratch.name}.log"
    with Postgres() as primary:
        replication_role(primary)
        with primary.connect() as conn:
            conn.execute("CREATE TABLE events (id bigserial PRIMARY KEY, label text NOT NULL)")
            conn.execute("CREATE TABLE filler (id bigserial PRIMARY KEY, note text)")
        with Postgres(standby_of=primary) as standby:
            create_slot(primary, slot)
            primary_env = wal_env(wal_policy_spec(primary, s3_server, bucket, slotName=slot), s3_server, scratch)
            first = start_receiver(primary_env, log, policy=policy)
            try:
                done = run_base_backup(primary_env, policy=policy)
                assert done.returncode == 0, done.stderr[-2000:]
                moments = {"T1": commit(primary, "T1")}
                other_writes(primary)
                position = insert_position(primary)
                wait_replayed(standby, position)
                location = wal_location(s3_server, bucket)
                spec = wal_policy_spec(standby, s3_server, bucket, slotName=slot)
                Archive(primary, s3_server, location, spec, moments, (0, 0), first, NAMESPACE, policy).wait_shipped(
                    position
                )
            finally:
                assert stop_receiver(first) == 0, log.read_text()[-2000:]
            with standby.connect() as conn:
                assert conn.execute("SELECT pg_promote(true, 60)").fetchone() == (True,)
                switch = parse_lsn(str(conn.execute("SELECT pg_current_wal_lsn()").fetchone()[0]))  # type: ignore[index]
            commit(primary, "old primary, after the promote")
            moments["T5"] = commit(standby, "T5")
            with standby.connect() as conn:
                conn.execute("CHECKPOINT")  # the new slot reserves WAL from timeline 2's redo point
            create_slot(standby, slot)
            with standby.connect() as conn:
                restart = parse_lsn(str(conn.execute(
                    "SELECT restart_lsn FROM pg_replication_slots WHERE slot_name = %s", (slot,)
                ).fetchone()[0]))  # type: ignore[index]  # fmt: skip
            assert restart >= switch  # the receiver streams timeline 2 only: no timeline end to see
            second = start_receiver(wal_env(spec, s3_server, scratch), log, policy=policy)
            try:
                other_writes(standby)
                time.sleep(1.5)
                moments["target"] = datetime.now(UTC)
                time.sleep(1.5)
                moments["T6"] = commit(standby, "T6")
                other_writes(standby, 200)
                archive = Archive(standby, s3_server, location, spec, moments, (0, 0), second, NAMESPACE, policy)
                archive.wait_shipped(insert_position(standby))
                catalog = archive.catalog()
                assert catalog.timeline == 2 and sorted(catalog.history) == [2], log.read_text()[-3000:]
                assert catalog.history[2].start <= switch and catalog.base_backups[0].timeline == 1
                target = point(targetTime=wal_catalog.rfc3339(moments["target"]), mode="NewVolume",
                               newVolume={"name": "fo", "size": "1Gi"})  # fmt: skip
                plan = plan_for(archive, target)
            finally:
                assert stop_receiver(second) == 0, log.read_text()[-2000:]
    assert (plan.timeline, plan.wal.timelines, plan.wal.histories) == (2, [1, 2], [2])
    claim = new_claim()
    done = run_job(archive, plan, claim)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])["restore-pitr"]
    assert summary["historyFiles"] == 1 and summary["lastSegment"].startswith("00000002")
    with Restored(claim) as restored:
        assert restored.labels() == ["T1", "T5"], restored.server_log()[-3000:]
    print(f"\nfresh receiver after a promotion: {summary}")
