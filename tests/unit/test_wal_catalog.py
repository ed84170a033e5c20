"""The WAL catalog against the real S3 API server: manifests written as the agents write them, then read back."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from runbook_operator.clients.s3 import make_client
from runbook_operator.errors import RunbookError
from runbook_operator.models.plans import WAL_SEGMENT_BYTES, parse_lsn
from runbook_operator.models.sources import S3Location
from runbook_operator.reconcilers import wal_catalog
from tests.backup_support import new_bucket
from tests.services import S3Server
from tests.wal_support import (
    NAMESPACE,
    POLICY,
    SIGNING_KEY,
    put_base_backup,
    put_history,
    put_segment,
    wal_location,
)

SEG = WAL_SEGMENT_BYTES
T0 = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
NOW = T0 + timedelta(hours=1)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def read(s3: S3Server, location: S3Location) -> wal_catalog.WALCatalog:
    client = make_client(location, s3.access_key, s3.secret_key)
    return wal_catalog.read_catalog(client, location, namespace=NAMESPACE, policy=POLICY, signing_key=SIGNING_KEY)


@pytest.fixture
def bucket(s3_server: S3Server) -> tuple[S3Location, Any]:
    location = wal_location(s3_server, new_bucket(s3_server))
    return location, s3_server.client()


def chain(client: Any, location: S3Location, *, partial_end: int | None = 5 * SEG + 4096) -> str:
    """A base backup in segment 2 (t 0..10 s), segments 2-4 complete (shipped at 20, 30, 40 s), 5 partial (50 s)."""
    folder = put_base_backup(
        client, location, start=2 * SEG + 0x28, stop=2 * SEG + 0x900, started=at(0), stopped=at(10)
    )
    for number, shipped in ((2, 20), (3, 30), (4, 40)):
        put_segment(client, location, segno=number, shipped=at(shipped))
    if partial_end is not None:
        put_segment(client, location, segno=5, partial=True, end=partial_end, shipped=at(50))
    return folder


def names(choice: wal_catalog.Choice) -> list[str]:
    return [f.name + (".partial" if f.partial else "") for f in choice.files]


def test_window_latest_and_a_time_between(bucket: tuple[S3Location, Any], s3_server: S3Server) -> None:
    location, client = bucket
    folder = chain(client, location)
    catalog = read(s3_server, location)
    window = catalog.window()
    assert window is not None
    assert (window.earliest_time, window.latest_time, window.base_backup) == (at(10), at(50), folder)
    assert window.latest_lsn == 5 * SEG + 4096 and window.seconds == 40
    assert catalog.gaps() == [] and catalog.rejected == []
    latest = catalog.choose(latest=True, now=NOW)
    assert names(latest) == [
        "000000010000000000000002",
        "000000010000000000000003",
        "000000010000000000000004",
        "000000010000000000000005.partial",
    ]
    assert latest.base.folder == folder and latest.timeline == 1
    assert latest.files[-1].key.endswith("/wal/00000001/000000010000000000000005.partial.gpg")
    assert latest.files[-1].manifest["signature"]
    assert latest.wal_range(namespace=NAMESPACE, policy=POLICY).model_dump() == {
        "namespace": NAMESPACE,
        "policy": POLICY,
        "first_segment": "000000010000000000000002",
        "last_segment": "000000010000000000000005",
        "segment_bytes": SEG,
        "timelines": [1],
        "histories": [],
        "segments": 4,
    }
    # 25 s: segment 3 (shipped at 30 s) holds it; the minute after is also fetched (there is no more WAL here)
    between = catalog.choose(target_time=at(25), now=NOW)
    assert names(between)[0] == "000000010000000000000002" and len(between.files) == 4
    by_lsn = catalog.choose(target_lsn=3 * SEG + 100, now=NOW)
    assert names(by_lsn) == ["000000010000000000000002", "000000010000000000000003", "000000010000000000000004"]


def test_refusals_name_the_field_and_the_range(bucket: tuple[S3Location, Any], s3_server: S3Server) -> None:
    location, client = bucket
    chain(client, location)
    catalog = read(s3_server, location)
    with pytest.raises(RunbookError) as before:
        catalog.choose(target_time=at(5), now=NOW)
    assert before.value.reason == "TargetBeforeWindow" and before.value.message.startswith(wal_catalog.TIME_FIELD)
    with pytest.raises(RunbookError) as future:
        catalog.choose(target_time=NOW + timedelta(minutes=1), now=NOW)
    assert future.value.reason == "TargetInFuture" and wal_catalog.TIME_FIELD in future.value.message
    with pytest.raises(RunbookError) as later:
        catalog.choose(target_time=at(55), now=NOW)
    assert later.value.reason == "TargetAfterWindow" and "0/5001000" in later.value.message
    with pytest.raises(RunbookError) as lsn:
        catalog.choose(target_lsn=6 * SEG, now=NOW)
    assert lsn.value.reason == "TargetAfterWindow" and lsn.value.message.startswith(wal_catalog.LSN_FIELD)
    assert "0/5001000-0/6000000" in lsn.value.message
    with pytest.raises(RunbookError) as early_lsn:
        catalog.choose(target_lsn=2 * SEG + 0x100, now=NOW)
    assert early_lsn.value.reason == "TargetBeforeWindow"


def test_a_gap_is_named_and_time_targets_need_the_wal_after_them(
    bucket: tuple[S3Location, Any], s3_server: S3Server
) -> None:
    location, client = bucket
    chain(client, location)
    client.delete_object(Bucket=location.bucket, Key=wal_catalog.segment_keys(
        wal_catalog_base(location), 1, "000000010000000000000003")[1])  # fmt: skip
    catalog = read(s3_server, location)
    assert [g.describe() for g in catalog.gaps()] == ["WAL 0/3000000-0/4000000 (segment 000000010000000000000003)"]
    assert catalog.window() is None  # no base backup has WAL contiguous to the newest
    with pytest.raises(RunbookError) as latest:
        catalog.choose(latest=True, now=NOW)
    assert latest.value.reason == "WALGap" and latest.value.message.startswith(wal_catalog.LATEST_FIELD)
    assert "000000010000000000000003" in latest.value.message
    with pytest.raises(RunbookError) as after:
        catalog.choose(target_time=at(35), now=NOW)
    assert after.value.reason == "WALGap" and "WAL 0/3000000-0/4000000" in after.value.message
    # A time before the hole is refused too: recovery to a time ends at the first commit after it, which may be
    # in the missing WAL (PostgreSQL would stop with a FATAL); a WAL location before the hole needs none after it.
    with pytest.raises(RunbookError) as before:
        catalog.choose(target_time=at(15), now=NOW)
    assert before.value.reason == "WALGap" and "WAL 0/3000000-0/4000000" in before.value.message
    assert names(catalog.choose(target_lsn=parse_lsn("0/2800000"), now=NOW)) == ["000000010000000000000002"]


def wal_catalog_base(location: S3Location) -> str:
    from tests.wal_support import base_of

    return base_of(location)


def test_unsigned_forged_foreign_and_dataless_manifests_are_not_the_archive(
    bucket: tuple[S3Location, Any], s3_server: S3Server
) -> None:
    location, client = bucket
    chain(client, location, partial_end=None)
    put_segment(client, location, segno=5, shipped=at(50), key=None)  # unsigned
    put_segment(client, location, segno=6, shipped=at(60), key="another-namespace-key")  # forged
    put_segment(client, location, segno=7, shipped=at(70), policy=("elsewhere", "db"))  # another policy's
    put_segment(client, location, segno=8, shipped=at(80), data=False)  # no data object
    catalog = read(s3_server, location)
    reasons = {r.key.rsplit("/", 1)[-1]: r.reason for r in catalog.rejected}
    assert set(reasons) == {f"00000001000000000000000{n}.json" for n in (5, 6, 7, 8)}
    assert "signature" in reasons["000000010000000000000005.json"]
    assert "elsewhere/db" in reasons["000000010000000000000007.json"]
    assert "missing" in reasons["000000010000000000000008.json"]
    assert sorted(catalog.segments) == [(1, 2), (1, 3), (1, 4)]
    window = catalog.window()
    assert window is not None and window.latest_lsn == 5 * SEG


def test_a_complete_segment_replaces_its_partial(bucket: tuple[S3Location, Any], s3_server: S3Server) -> None:
    location, client = bucket
    chain(client, location)
    put_segment(client, location, segno=5, shipped=at(55))
    catalog = read(s3_server, location)
    assert not catalog.segments[(1, 5)].partial
    assert [p.name for p in catalog.superseded] == ["000000010000000000000005"]
    expired = catalog.expired(now=NOW, retention=timedelta(days=7))
    assert [k.rsplit("/", 1)[-1] for k in expired] == [
        "000000010000000000000005.partial.json",
        "000000010000000000000005.partial.gpg",
    ]


def test_retention_keeps_what_reaches_every_point_of_the_window(
    bucket: tuple[S3Location, Any], s3_server: S3Server
) -> None:
    location, client = bucket
    old = put_base_backup(
        client, location, start=1 * SEG + 0x28, stop=1 * SEG + 0x900, started=at(-100), stopped=at(-90)
    )
    chain(client, location)  # a newer base backup in segment 2 (stop 10 s), WAL 2-5
    put_segment(client, location, segno=1, shipped=at(-80))
    put_segment(client, location, segno=0, shipped=at(-200))
    unmanifested = wal_catalog.segment_keys(wal_catalog_base(location), 1, "000000010000000000000000")[0]
    client.put_object(Bucket=location.bucket, Key=unmanifested.replace("0000000000.gpg", "0000000000X.gpg"), Body=b"")
    catalog = read(s3_server, location)
    assert catalog.window() is not None and catalog.window().base_backup == old  # type: ignore[union-attr]
    # Window 7 days, everything younger: nothing goes.
    assert catalog.expired(now=NOW, retention=timedelta(days=7)) == []
    # Cut-off at 15 s: the newest base backup that ended before it is the one at 10 s; the older one and WAL
    # before segment 2 go, manifests first.
    cutoff_now = at(15) + timedelta(hours=1)
    expired = catalog.expired(now=cutoff_now, retention=timedelta(hours=1))
    leaves = [k.rsplit("/", 2)[-2] + "/" + k.rsplit("/", 1)[-1] for k in expired]
    assert leaves[:3] == [
        f"{old.rstrip('/').rsplit('/', 1)[-1]}/manifest.json",
        "00000001/000000010000000000000000.json",
        "00000001/000000010000000000000001.json",
    ] or sorted(leaves[:3]) == sorted(
        [
            f"{old.rstrip('/').rsplit('/', 1)[-1]}/manifest.json",
            "00000001/000000010000000000000000.json",
            "00000001/000000010000000000000001.json",
        ]
    )
    assert all(k.endswith(".json") for k in expired[:3]) and not any(k.endswith(".json") for k in expired[3:])
    client_ = make_client(location, s3_server.access_key, s3_server.secret_key)
    wal_catalog.prune(client_, location, catalog, now=cutoff_now, retention=timedelta(hours=1))
    after = read(s3_server, location)
    assert sorted(after.segments) == [(1, 2), (1, 3), (1, 4), (1, 5)] and len(after.base_backups) == 1
    assert after.choose(target_time=at(15), now=cutoff_now).base.stop_time == at(10)


def test_a_new_timeline_is_followed_from_its_switch_point(bucket: tuple[S3Location, Any], s3_server: S3Server) -> None:
    location, client = bucket
    chain(client, location)  # timeline 1: 2-4, 5 partial through 0/5001000
    switch = 5 * SEG + 2048
    put_history(client, location, timeline=2, begin=switch, shipped=at(60))
    put_segment(client, location, timeline=2, segno=5, shipped=at(70))
    put_segment(client, location, timeline=2, segno=6, partial=True, end=6 * SEG + 512, shipped=at(80))
    catalog = read(s3_server, location)
    assert catalog.timeline == 2 and catalog.gaps() == []
    latest = catalog.choose(latest=True, now=NOW)
    assert latest.timeline == 2
    assert names(latest) == [
        "00000002.history",
        "000000010000000000000002",
        "000000010000000000000003",
        "000000010000000000000004",
        "000000020000000000000005",
        "000000020000000000000006.partial",
    ]
    window = catalog.window()
    assert window is not None and window.latest_lsn == parse_lsn("0/6000200") and window.latest_time == at(80)
    # The restore Job reads the same files back from the plan's range alone.
    assert read_range(s3_server, location, latest) == names(latest)


def test_a_timeline_without_its_history_file_is_refused_before_anything_is_touched(
    bucket: tuple[S3Location, Any], s3_server: S3Server
) -> None:
    """PostgreSQL cannot recover along timeline 2 without 00000002.history (the restored server refuses to start):
    the preflight's choice and the Job's replay both name it."""
    location, client = bucket
    chain(client, location)
    put_segment(client, location, timeline=2, segno=5, shipped=at(70))
    put_segment(client, location, timeline=2, segno=6, partial=True, end=6 * SEG + 512, shipped=at(80))
    catalog = read(s3_server, location)
    assert catalog.timeline == 2
    for target in ({"latest": True}, {"target_lsn": parse_lsn("0/5000100")}):
        with pytest.raises(RunbookError) as refused:
            catalog.choose(now=NOW, **target)  # type: ignore[arg-type]
        assert refused.value.reason == "WALGap"
        assert "the history file of timeline 2 (00000002.history) is missing" in refused.value.message
    with pytest.raises(RunbookError) as refused:
        catalog.replay(first=2, last=6, path=2)
    assert refused.value.reason == "WALGap" and "nothing was restored" in refused.value.message


# --- the restore Job's side: the plan's range read back from the bucket ----------------------------------------


def read_range(s3: S3Server, location: S3Location, choice: wal_catalog.Choice) -> list[str]:
    client = make_client(location, s3.access_key, s3.secret_key)
    wal = choice.wal_range(namespace=NAMESPACE, policy=POLICY)
    files = wal_catalog.read_range(client, location, wal, path=choice.timeline, signing_key=SIGNING_KEY)
    return [f.name + (".partial" if f.partial else "") for f in files]


def test_a_long_chain_is_a_range_of_constant_size_read_back_whole(
    bucket: tuple[S3Location, Any], s3_server: S3Server
) -> None:
    """300 segments after the base backup: the plan's range is the same few hundred bytes as for 3 (the old plan
    listed every manifest: ~700 bytes each, over 128 KiB here), and the Job's reading gets all 300 in order."""
    location, client = bucket
    put_base_backup(client, location, start=2 * SEG + 0x28, stop=2 * SEG + 0x900, started=at(0), stopped=at(1))
    for number in range(2, 302):
        put_segment(client, location, segno=number, shipped=at(number))
    put_segment(client, location, segno=302, partial=True, end=302 * SEG + 4096, shipped=at(303))
    catalog = read(s3_server, location)
    latest = catalog.choose(latest=True, now=NOW)
    assert len(latest.files) == 301
    assert len(json.dumps([f.manifest for f in latest.files])) > 128 * 1024  # what the old plan carried
    wal = latest.wal_range(namespace=NAMESPACE, policy=POLICY)
    assert len(json.dumps(wal.to_api())) < 400
    assert read_range(s3_server, location, latest) == names(latest)
    between = catalog.choose(target_lsn=150 * SEG + 10, now=NOW)
    assert read_range(s3_server, location, between) == names(between)
    assert names(between)[-1] == "000000010000000000000097"  # segment 151: the record at the target may cross


def test_the_jobs_reading_refuses_a_changed_manifest_a_gap_and_a_missing_history(
    bucket: tuple[S3Location, Any], s3_server: S3Server
) -> None:
    location, client = bucket
    chain(client, location)
    switch = 5 * SEG + 2048
    put_history(client, location, timeline=2, begin=switch, shipped=at(60))
    put_segment(client, location, timeline=2, segno=5, shipped=at(70))
    put_segment(client, location, timeline=2, segno=6, partial=True, end=6 * SEG + 512, shipped=at(80))
    latest = read(s3_server, location).choose(latest=True, now=NOW)
    base = wal_catalog_base(location)
    # a manifest past the range, or on timeline 1 after the switch (not on the path), is not read or not used
    put_segment(client, location, segno=9, shipped=at(90), key="another-namespace-key")
    put_segment(client, location, segno=6, shipped=at(90), key="another-namespace-key")
    assert read_range(s3_server, location, latest)[-1] == "000000020000000000000006.partial"

    def refused() -> RunbookError:
        with pytest.raises(RunbookError) as error:
            read_range(s3_server, location, latest)
        return error.value

    _, manifest_key = wal_catalog.segment_keys(base, 1, "000000010000000000000003")
    original = client.get_object(Bucket=location.bucket, Key=manifest_key)["Body"].read()
    changed = json.loads(original)
    changed["sha256"] = "0" * 64  # the signature no longer covers it
    client.put_object(Bucket=location.bucket, Key=manifest_key, Body=json.dumps(changed).encode())
    error = refused()
    assert error.reason == "ManifestForged" and error.message.startswith(manifest_key), error.message
    client.delete_object(Bucket=location.bucket, Key=manifest_key)
    wal_catalog.forget_cached([manifest_key], location)
    error = refused()
    assert error.reason == "WALGap", error.message
    assert error.message.startswith("WAL 0/3000000-0/4000000 (segment 000000010000000000000003) is missing")
    client.put_object(Bucket=location.bucket, Key=manifest_key, Body=original)
    assert read_range(s3_server, location, latest)[0] == "00000002.history"
    history_data, _ = wal_catalog.history_keys(base, 2)
    client.delete_object(Bucket=location.bucket, Key=history_data)
    error = refused()
    assert error.reason == "WALGap" and error.message.startswith("the history file of timeline 2 "), error.message
