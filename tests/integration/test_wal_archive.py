"""The WAL receiver and the base-backup agent run as processes (as their pods run them) against a real
PostgreSQL 15, the S3 API server and gpg: what reaches the bucket decrypts to the server's own WAL bytes, a
SIGKILL mid-segment loses nothing and duplicates nothing, base backups record pg_basebackup's LSNs, and bad
inputs fail naming the field."""

from __future__ import annotations

import hashlib
import io
import json
import signal
import subprocess
import tarfile
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from tests.backup_support import new_bucket
from tests.services import Postgres, S3Server
from tests.wal_support import (
    NAMESPACE,
    POLICY,
    REPLICATION_PASSWORD,
    create_slot,
    fetch_plain,
    read,
    replication_role,
    run_base_backup,
    start_receiver,
    stop_receiver,
    wait_shipped,
    wal_env,
    wal_location,
    wal_policy_spec,
)

from runbook_operator.models.plans import WAL_SEGMENT_BYTES as SEGMENT
from runbook_operator.models.plans import format_lsn, parse_lsn, segment_start, slot_name
from runbook_operator.models.sources import S3Location
from runbook_operator.reconcilers import wal_catalog

SLOT = slot_name(NAMESPACE, POLICY)


@pytest.fixture(autouse=True)
def _in_process_operator() -> None:
    """No operator and no control plane here: the agents talk only to PostgreSQL and S3."""


@pytest.fixture(scope="module")
def server() -> Iterator[Postgres]:
    with Postgres() as pg:
        replication_role(pg)
        with pg.connect() as conn:
            conn.execute("CREATE TABLE ledger (id bigserial PRIMARY KEY, note text)")
        yield pg


@pytest.fixture
def archive(server: Postgres, s3_server: S3Server) -> Iterator[dict[str, Any]]:
    """A fresh bucket, scratch directory and slot (dropped after)."""
    bucket = new_bucket(s3_server)
    scratch = Path(tempfile.mkdtemp(prefix="runbook-wal-scratch-"))
    create_slot(server, SLOT)
    spec = wal_policy_spec(server, s3_server, bucket)
    yield {
        "location": wal_location(s3_server, bucket),
        "env": wal_env(spec, s3_server, scratch),
        "scratch": scratch,
        "log": scratch.parent / f"{scratch.name}.log",
        "spec": spec,
    }
    with server.connect() as conn:
        conn.execute(
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = %s AND NOT active",
            (SLOT,),
        )


def write(server: Postgres, rows: int = 2000, size: int = 400) -> int:
    """Rows committed; the server's WAL position after them."""
    with server.connect() as conn:
        conn.execute("INSERT INTO ledger (note) SELECT repeat('n', %s) FROM generate_series(1, %s)", (size, rows))
        return parse_lsn(str(conn.execute("SELECT pg_current_wal_insert_lsn()").fetchone()[0]))  # type: ignore[index]


def server_bytes(server: Postgres, name: str, length: int | None = None) -> bytes:
    with server.connect() as conn:
        if length is None:
            row = conn.execute("SELECT pg_read_binary_file(%s)", (f"pg_wal/{name}",)).fetchone()
        else:
            row = conn.execute("SELECT pg_read_binary_file(%s, 0, %s)", (f"pg_wal/{name}", length)).fetchone()
    assert row is not None
    data: bytes = row[0]
    return data


def switch(server: Postgres) -> tuple[str, int]:
    """Complete the current segment; (its name, the position after the switch)."""
    with server.connect() as conn:
        name = str(conn.execute("SELECT pg_walfile_name(pg_current_wal_lsn())").fetchone()[0])  # type: ignore[index]
        conn.execute("SELECT pg_switch_wal()")
        conn.execute("INSERT INTO ledger (note) VALUES ('after switch')")
        after = parse_lsn(str(conn.execute("SELECT pg_current_wal_insert_lsn()").fetchone()[0]))  # type: ignore[index]
    return name, after


def check_object(s3: S3Server, location: S3Location, item: wal_catalog.WALObject) -> bytes:
    """The stored object matches its manifest; its plaintext (decrypted with stock gpg) too."""
    body = s3.client().get_object(Bucket=location.bucket, Key=item.key)["Body"].read()
    assert hashlib.sha256(body).hexdigest() == item.manifest["sha256"] and len(body) == item.manifest["sizeBytes"]
    plain = fetch_plain(s3, location, item.key)
    assert hashlib.sha256(plain).hexdigest() == item.manifest["plainSha256"]
    return plain


def test_segments_and_the_partial_arrive_signed_and_decrypt_to_the_servers_wal(
    server: Postgres, s3_server: S3Server, archive: dict[str, Any]
) -> None:
    location = archive["location"]
    receiver = start_receiver(archive["env"], archive["log"])
    try:
        write(server)
        name, _ = switch(server)
        position = write(server, rows=300)
        catalog = wait_shipped(s3_server, location, position, timeout=60)
        assert catalog.rejected == [], catalog.rejected
        complete = catalog.segments[(1, segment_start(name) // SEGMENT)]
        assert not complete.partial and complete.end - complete.start == 16 * 1024 * 1024
        assert check_object(s3_server, location, complete) == server_bytes(server, name)
        partial = catalog.segments[max(catalog.segments)]
        assert partial.partial and partial.end >= position
        plain = check_object(s3_server, location, partial)
        assert len(plain) == partial.end - partial.start
        assert plain == server_bytes(server, partial.name, len(plain))
        assert len(wal_catalog.padded(plain, partial.manifest)) == 16 * 1024 * 1024
    finally:
        code = stop_receiver(receiver)
    assert code == 0, archive["log"].read_text()[-2000:]
    # No WAL on any disk: the scratch directory stays empty.
    assert list(archive["scratch"].iterdir()) == []
    assert REPLICATION_PASSWORD not in archive["log"].read_text()


def test_sigkill_mid_segment_and_restart_lose_and_duplicate_nothing(
    server: Postgres, s3_server: S3Server, archive: dict[str, Any]
) -> None:
    location = archive["location"]
    first = start_receiver(archive["env"], archive["log"])
    stop = threading.Event()

    def load() -> None:
        while not stop.is_set():
            write(server, rows=200)

    writer = threading.Thread(target=load)
    writer.start()
    try:
        time.sleep(4)
        with server.connect() as conn:
            offset = int(str(conn.execute("SELECT pg_current_wal_lsn()").fetchone()[0]).split("/")[1], 16)  # type: ignore[index]
        stop_receiver(first, kill=True)  # mid-segment: the load keeps writing
        killed_at = offset % (16 * 1024 * 1024)
        assert 0 < killed_at < 16 * 1024 * 1024
        time.sleep(3)  # WAL written while nothing receives it: the slot keeps it
        second = start_receiver(archive["env"], archive["log"])
        time.sleep(3)
    finally:
        stop.set()
        writer.join()
    try:
        _, position = switch(server)
        catalog = wait_shipped(s3_server, location, position, timeout=240)
    finally:
        assert stop_receiver(second) == 0, archive["log"].read_text()[-2000:]
    assert catalog.rejected == [] and catalog.gaps() == [], (catalog.rejected, catalog.gaps())
    numbers = sorted(segno for _, segno in catalog.segments)
    assert numbers == list(range(numbers[0], numbers[-1] + 1))
    assert all(not catalog.segments[(1, n)].partial for n in numbers[:-1])
    with server.connect() as conn:
        on_server = {str(r[0]) for r in conn.execute("SELECT name FROM pg_ls_waldir()").fetchall()}
    compared = 0
    for segno in numbers[:-1]:
        item = catalog.segments[(1, segno)]
        if item.name in on_server:  # still on the server (not yet recycled): byte for byte the same
            assert check_object(s3_server, location, item) == server_bytes(server, item.name), item.name
            compared += 1
    assert compared >= 1
    assert "shipped segment" in archive["log"].read_text()


def test_base_backup_manifest_records_pg_basebackups_lsns(
    server: Postgres, s3_server: S3Server, archive: dict[str, Any]
) -> None:
    location = archive["location"]
    write(server, rows=500)
    done = run_base_backup(archive["env"])
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads(done.stdout)
    catalog = read(s3_server, location)
    assert len(catalog.base_backups) == 1 and catalog.rejected == []
    backup = catalog.base_backups[0]
    assert (format_lsn(backup.start), format_lsn(backup.stop)) == (summary["startLsn"], summary["stopLsn"])
    # pg_basebackup's own record of it: backup_label and backup_manifest inside the tar (decrypted by hand),
    # and the server's backup history file in pg_wal.
    body = s3_server.client().get_object(Bucket=location.bucket, Key=backup.key)["Body"].read()
    assert hashlib.sha256(body).hexdigest() == backup.manifest["sha256"]
    with tarfile.open(fileobj=io.BytesIO(fetch_plain(s3_server, location, backup.key))) as tar:
        label = tar.extractfile("backup_label").read().decode()  # type: ignore[union-attr]
        ranges = json.loads(tar.extractfile("backup_manifest").read())["WAL-Ranges"]  # type: ignore[union-attr]
    assert f"START WAL LOCATION: {format_lsn(backup.start)} " in label
    assert ranges == [{"Timeline": 1, "Start-LSN": format_lsn(backup.start), "End-LSN": format_lsn(backup.stop)}]
    # The server's WAL: the BACKUP_END record that pg_backup_stop wrote for this start point ends at the stop LSN.
    waldump = [str(server.bin / "pg_waldump"), "--path", str(server.data / "pg_wal"), "--rmgr", "XLOG"]
    dump = subprocess.run(
        [*waldump, "--start", format_lsn(backup.start), "--end", format_lsn(backup.stop)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    ends = [line for line in dump.splitlines() if f"BACKUP_END {format_lsn(backup.start)}" in line]
    assert len(ends) == 1, dump
    record = parse_lsn(ends[0].split("lsn: ")[1].split(",")[0])
    length = int(ends[0].split("len (rec/tot):")[1].split("/")[1].split(",")[0])
    assert record < backup.stop and backup.stop == record + (length + 7) // 8 * 8, (ends[0], format_lsn(backup.stop))
    with server.connect() as conn:
        version = conn.execute("SHOW server_version_num").fetchone()[0]  # type: ignore[index]
    assert backup.manifest["serverVersion"] == int(version)
    assert backup.stop_time >= backup.start_time


def fails(process: subprocess.Popen[bytes], log: Path, timeout: float = 60) -> str:
    code = process.wait(timeout)
    text = log.read_text()
    assert code == 1, text[-2000:]
    return text


def test_a_login_without_replication_is_named(server: Postgres, s3_server: S3Server, archive: dict[str, Any]) -> None:
    with server.connect() as conn:
        conn.execute("DROP ROLE IF EXISTS reader")
        conn.execute("CREATE ROLE reader LOGIN PASSWORD 'reader-secret-pw'")
    env = {**archive["env"], "PGUSER": "reader", "PGPASSWORD": "reader-secret-pw"}
    text = fails(start_receiver(env, archive["log"]), archive["log"])
    assert "wal-receive failed: ReplicationNotPermitted: spec.wal.replicationCredentialsSecretRef:" in text
    assert "reader-secret-pw" not in text
    done = run_base_backup(env)
    assert done.returncode == 1
    assert "ReplicationNotPermitted: spec.wal.replicationCredentialsSecretRef" in done.stderr


def test_a_server_with_wal_level_minimal_is_named(s3_server: S3Server, tmp_path: Path) -> None:
    with Postgres(settings={"wal_level": "minimal", "max_wal_senders": "0"}) as minimal:
        replication_role(minimal)
        spec = wal_policy_spec(minimal, s3_server, new_bucket(s3_server))
        scratch = Path(tempfile.mkdtemp(prefix="runbook-wal-scratch-"))
        log = tmp_path / "receiver.log"
        text = fails(start_receiver(wal_env(spec, s3_server, scratch), log), log)
    assert "wal-receive failed: WALLevelMinimal: spec.source.postgresql:" in text and "wal_level" in text


def test_a_slot_in_use_by_someone_else_is_named(
    server: Postgres, s3_server: S3Server, archive: dict[str, Any], tmp_path: Path
) -> None:
    other = tmp_path / "other"
    other.mkdir()
    stranger = subprocess.Popen(
        [
            str(server.bin / "pg_receivewal"),
            "-D",
            str(other),
            "--slot",
            SLOT,
            "-h",
            server.host,
            "-p",
            str(server.port),
        ],
        env={"PGUSER": "archiver", "PGPASSWORD": REPLICATION_PASSWORD, "PATH": "/usr/bin:/bin"},
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            with server.connect() as conn:
                row = conn.execute("SELECT active FROM pg_replication_slots WHERE slot_name = %s", (SLOT,)).fetchone()
            if row and row[0]:
                break
            assert time.monotonic() < deadline
            time.sleep(0.1)
        text = fails(start_receiver(archive["env"], archive["log"]), archive["log"])
    finally:
        stranger.terminate()
        stranger.wait(10)
    assert f"wal-receive failed: SlotTaken: spec.wal.slotName: the replication slot {SLOT} is in use" in text


def slot_restart(server: Postgres) -> int:
    with server.connect() as conn:
        row = conn.execute("SELECT restart_lsn FROM pg_replication_slots WHERE slot_name = %s", (SLOT,)).fetchone()
    assert row is not None and row[0] is not None
    return parse_lsn(str(row[0]))


def newest_shipped(s3: S3Server, location: S3Location) -> int:
    newest = read(s3, location).latest()
    return 0 if newest is None else newest[0]


def on_server(server: Postgres) -> set[str]:
    with server.connect() as conn:
        return {str(r[0]) for r in conn.execute("SELECT name FROM pg_ls_waldir()").fetchall()}


class Load:
    """Rows written in a loop (a segment switch every ``switch_every`` batches) until stopped."""

    def __init__(self, server: Postgres, switch_every: int = 0, pause: float = 0) -> None:
        self.server, self.switch_every, self.stop = server, switch_every, threading.Event()
        self.pause = pause
        self.thread = threading.Thread(target=self._run)

    def _run(self) -> None:
        batches = 0
        while not self.stop.is_set():
            write(self.server, rows=200)
            self.stop.wait(self.pause)
            batches += 1
            if self.switch_every and batches % self.switch_every == 0:
                switch(self.server)

    def __enter__(self) -> Load:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()


def test_the_slot_never_passes_what_is_in_the_bucket(
    server: Postgres, s3_server: S3Server, archive: dict[str, Any]
) -> None:
    """The receiver's feedback says flushed = shipped: polled while the load runs, the slot's restart_lsn is
    never past the newest endLsn in the bucket (read after it), and it does move."""
    location = archive["location"]
    initial = slot_restart(server)
    receiver = start_receiver(archive["env"], archive["log"])
    samples: list[tuple[int, int]] = []
    try:
        with Load(server, switch_every=40):
            deadline = time.monotonic() + 60
            # Until the slot moved at least twice (and for 10 s at least).
            while time.monotonic() < deadline and (
                len({r for r, _ in samples}) < 3 or time.monotonic() < deadline - 50
            ):
                restart = slot_restart(server)
                shipped = newest_shipped(s3_server, location)  # read after: only ever further
                samples.append((restart, shipped))
                assert restart <= max(shipped, initial), (format_lsn(restart), format_lsn(shipped))
                time.sleep(0.1)
    finally:
        assert stop_receiver(receiver) == 0, archive["log"].read_text()[-2000:]
    final = slot_restart(server)
    assert final <= newest_shipped(s3_server, location)
    assert final > initial and len({r for r, _ in samples}) > 2, samples[-5:]


def segment_start_of(lsn: int) -> int:
    return lsn - lsn % SEGMENT


def test_the_pod_is_lost_and_a_new_receiver_loses_nothing(
    server: Postgres, s3_server: S3Server, archive: dict[str, Any]
) -> None:
    """SIGKILL of the receiver and its scratch wiped (the pod deleted) while writes go on, with segment switches
    and checkpoints (the server removes what no slot keeps): the server still has the slot's WAL, a new receiver
    on a new scratch directory catches up, the catalog has no gap, and every object in the bucket decrypts to
    the server's bytes where the server still has them."""
    location = archive["location"]
    initial = slot_restart(server)
    first = start_receiver(archive["env"], archive["log"])
    with Load(server, pause=0.2):  # a light load: the catch-up must fit a loaded CI machine
        wait_shipped(s3_server, location, initial + 1, timeout=60)  # archiving past the slot's start
        time.sleep(2)
        stop_receiver(first, kill=True)
        for path in archive["scratch"].iterdir():
            path.unlink()
        archive["scratch"].rmdir()
        lost_at = slot_restart(server)
        shipped_at_loss = newest_shipped(s3_server, location)
        assert initial < lost_at <= shipped_at_loss, (format_lsn(lost_at), format_lsn(shipped_at_loss))
        time.sleep(2)  # written while nothing receives, segments completed, a checkpoint (removes what no slot keeps)
        switch(server)
        switch(server)
        with server.connect() as conn:
            conn.execute("CHECKPOINT")
        kept = on_server(server)
        with server.connect() as conn:
            current = str(conn.execute("SELECT pg_walfile_name(pg_current_wal_lsn())").fetchone()[0])  # type: ignore[index]
        needed = range(segment_start_of(lsn_of(current)) // SEGMENT + 1)
        missing = [
            f"{1:08X}{n // 256:08X}{n % 256:08X}"
            for n in needed
            if n >= lost_at // SEGMENT and f"{1:08X}{n // 256:08X}{n % 256:08X}" not in kept
        ]
        assert missing == [], missing  # the server kept every segment from the slot's restart point on
        scratch = Path(tempfile.mkdtemp(prefix="runbook-wal-scratch-"))  # the new pod's empty scratch
        second = start_receiver({**archive["env"], "RUNBOOK_WAL_SCRATCH": str(scratch)}, archive["log"])
        time.sleep(3)
    try:
        _, position = switch(server)
        catalog = wait_shipped(s3_server, location, position, timeout=240)
    finally:
        assert stop_receiver(second) == 0, archive["log"].read_text()[-2000:]
    catalog = read(s3_server, location)  # after the last partial (SIGTERM ships it)
    assert catalog.rejected == [] and catalog.gaps() == [], (catalog.rejected, catalog.gaps())
    numbers = sorted(segno for _, segno in catalog.segments)
    assert numbers == list(range(numbers[0], numbers[-1] + 1))
    assert numbers[0] <= shipped_at_loss // SEGMENT  # the chain runs through the loss
    assert all(not catalog.segments[(1, n)].partial for n in numbers[:-1])
    # No partial object left beside a complete one (a restore would have two candidates).
    keys = [o["Key"] for o in s3_server.client().list_objects_v2(Bucket=location.bucket)["Contents"]]
    partial_names = {k.rsplit("/", 1)[1].split(".")[0] for k in keys if ".partial" in k}
    assert partial_names <= {catalog.segments[(1, numbers[-1])].name}, partial_names
    present = on_server(server)
    compared = 0
    for segno in numbers:
        item = catalog.segments[(1, segno)]
        if item.name not in present:
            continue
        plain = check_object(s3_server, location, item)
        if item.partial:
            assert plain == server_bytes(server, item.name, len(plain)), item.name
        else:
            assert plain == server_bytes(server, item.name), item.name
        compared += 1
    assert compared >= 2, compared
    log = archive["log"].read_text()
    assert log.count("streaming timeline 1 from") >= 2 and REPLICATION_PASSWORD not in log


def lsn_of(name: str) -> int:
    return (int(name[8:16], 16) * 0x100000000) + int(name[16:24], 16) * SEGMENT


def receiver_positions(server: Postgres) -> tuple[int, int]:
    """(write_lsn, flush_lsn) the receiver last reported: what it received, what is in the bucket."""
    with server.connect() as conn:
        row = conn.execute(
            "SELECT r.write_lsn, r.flush_lsn FROM pg_stat_replication r JOIN pg_replication_slots s"
            " ON s.active_pid = r.pid WHERE s.slot_name = %s",
            (SLOT,),
        ).fetchone()
    assert row is not None and row[0] is not None, "the receiver is not streaming"
    return parse_lsn(str(row[0])), parse_lsn(str(row[1]))


def test_reading_goes_on_while_a_segment_is_shipped_and_stops_at_the_next_one(
    server: Postgres, archive: dict[str, Any]
) -> None:
    """The S3 API server frozen (SIGSTOP) while segments complete: the receiver keeps reading past the segment
    it cannot ship into the next one (shipping runs beside the reading), and no further (memory: two segments;
    the slot keeps the rest); its feedback never says more is flushed than the bucket has. Thawed, everything
    arrives without a gap."""
    with S3Server() as own:
        assert own.process is not None
        bucket = new_bucket(own)
        location = wal_location(own, bucket)
        env = wal_env(wal_policy_spec(server, own, bucket), own, archive["scratch"])
        receiver = start_receiver(env, archive["log"])
        try:
            _, position = switch(server)
            wait_shipped(own, location, position, timeout=60)
            shipped_before = newest_shipped(own, location)
            own.process.send_signal(signal.SIGSTOP)
            try:
                for _ in range(4):  # four segments complete on the server
                    write(server, rows=500)
                    switch(server)
                with server.connect() as conn:
                    end = parse_lsn(str(conn.execute("SELECT pg_current_wal_insert_lsn()").fetchone()[0]))  # type: ignore[index]
                time.sleep(6)  # the receiver reads what it may and reports it (status updates every second)
                written, flushed = receiver_positions(server)
                stuck = segment_start_of(flushed)  # the segment the shipping thread cannot get into the bucket
                assert flushed <= shipped_before + SEGMENT, (format_lsn(flushed), format_lsn(shipped_before))
                assert stuck + SEGMENT < written <= stuck + 2 * SEGMENT < end, (
                    format_lsn(written),
                    format_lsn(flushed),
                    format_lsn(end),
                )
                assert receiver.poll() is None
            finally:
                own.process.send_signal(signal.SIGCONT)
            catalog = wait_shipped(own, location, end, timeout=180)
        finally:
            code = stop_receiver(receiver)
        assert code == 0, archive["log"].read_text()[-2000:]
        assert catalog.rejected == [] and catalog.gaps() == [], (catalog.rejected, catalog.gaps())
        numbers = sorted(segno for _, segno in catalog.segments)
        assert numbers == list(range(numbers[0], numbers[-1] + 1)) and numbers[-1] >= end // SEGMENT - 1
