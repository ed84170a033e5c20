"""The WAL archive in the bucket: base backups and WAL files (signed manifests only), the recoverable window, the
gaps, retention, and the choice of what a point-in-time restore replays.

Layout (``models/plans.py``), under the policy's folder ``<prefix>/<namespace>/<policy>/``::

    wal/<TL>/<segment>.gpg + .json           a complete segment
    wal/<TL>/<segment>.partial.gpg + .json   the segment being written, valid through its endLSN (re-shipped)
    wal/<TL>.history.gpg + .json             a timeline history file
    base/<UTC timestamp>/base.tar.gpg + manifest.json

What the agents write and this module reads, beyond ``WALSegmentManifest`` / ``BaseBackupManifest``:

* every manifest also carries ``policy: {namespace, name}`` and is signed with the namespace's key
  (``plans.sign_manifest``); a manifest that is unsigned, forged, written for another policy, names another
  file than its key, or whose data object is absent is not part of the archive (``WALCatalog.rejected``);
* a partial object holds the segment's bytes from its start through ``endLsn`` only (``endLsn - startLsn``
  bytes); a restore pads it with zeros to ``segmentBytes`` (``padded``) before PostgreSQL reads it, as
  ``pg_receivewal`` pads its own ``.partial`` files; ``plainSha256`` is over the unpadded bytes;
* a history manifest's ``startLsn`` and ``endLsn`` are where its timeline begins (the switch point);
* ``shippedTime`` is when the file's content was read from the receiver's scratch, so every commit through
  ``endLsn`` happened before it.

Timelines are taken as a line (each one branched from the one before, as repeated in-place restores of one
server make them): a segment is read from the newest timeline that had begun by that segment, as PostgreSQL
does with ``recovery_target_timeline = latest``.

Entry points (the operator's reconcilers and restore preflight): ``read_catalog`` -> ``WALCatalog``;
``WALCatalog.window()``, ``.gaps()``, ``.choose(target_time=..., target_lsn=..., latest=...)`` -> ``Choice``
(``Choice.wal_range(...)`` for ``PointInTimePlan.wal``), ``.expired(now=..., retention=...)`` and ``prune``.
The point-in-time restore Job: ``read_range`` (that range's files, verified, or ``WALGap`` / ``ManifestForged``)
and ``current_file`` (a partial's manifest as the receiver re-shipped it).
"""

from __future__ import annotations

import itertools
import threading
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import botocore.exceptions
from pydantic import ValidationError

from ..clients.s3 import delete_keys, get_json, list_keys
from ..errors import RunbookError
from ..models.plans import (
    BASE_FOLDER,
    BASE_OBJECT,
    MANIFEST,
    WAL_FOLDER,
    WAL_SEGMENT_BYTES,
    BaseBackupManifest,
    WALRange,
    WALSegmentManifest,
    format_lsn,
    manifest_signed,
    parse_lsn,
    parse_timestamp,
    policy_folder,
    segment_name,
    segment_start,
)
from ..models.sources import S3Location

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

TIME_FIELD = "spec.pointInTime.targetTime"
LSN_FIELD = "spec.pointInTime.targetLSN"
LATEST_FIELD = "spec.pointInTime.latest"
# A time target gets all the contiguous WAL after it: recovery stops at the first commit after the target, and
# PostgreSQL refuses to promote when the WAL ends before that commit. A file's shippedTime says only that its WAL
# was committed before then, not where the WAL written at the target is: a receiver behind a burst of writes
# ships WAL of the target's moment minutes later (seen: 250 segments of 1 MiB written in 4 s, shipped over more
# than 60 s). Only where the WAL has a hole after the target are the files shipped this long after it taken as
# enough (else the target is refused, as the commit that ends recovery may be in the hole).
BEYOND_TARGET = timedelta(minutes=1)


# --- keys ----------------------------------------------------------------------------------------------------


def wal_folder(base: str) -> str:
    """``<policy folder>wal/`` (``base`` is ``plans.policy_folder``)."""
    return f"{base}{WAL_FOLDER}/"


def segment_keys(base: str, timeline: int, name: str, *, partial: bool = False) -> tuple[str, str]:
    """(data key, manifest key) of a segment."""
    stem = f"{wal_folder(base)}{timeline:08X}/{name}{'.partial' if partial else ''}"
    return f"{stem}.gpg", f"{stem}.json"


def history_keys(base: str, timeline: int) -> tuple[str, str]:
    """(data key, manifest key) of a timeline's history file."""
    stem = f"{wal_folder(base)}{timeline:08X}.history"
    return f"{stem}.gpg", f"{stem}.json"


def base_backup_keys(base: str, timestamp: str) -> tuple[str, str]:
    """(data key, manifest key) of a base backup in ``base/<timestamp>/``."""
    folder = f"{base}{BASE_FOLDER}/{timestamp}/"
    return f"{folder}{BASE_OBJECT}", f"{folder}{MANIFEST}"


def padded(plain: bytes, manifest: Mapping[str, Any]) -> bytes:
    """A decrypted WAL file as PostgreSQL reads it: a partial's bytes padded with zeros to its segment size."""
    if not manifest.get("partial"):
        return plain
    size = int(manifest.get("segmentBytes") or 0)
    return plain + bytes(max(0, size - len(plain)))


def parse_time(text: str) -> datetime:
    """RFC 3339 (``Z`` or an offset) -> an aware datetime."""
    moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def rfc3339(moment: datetime) -> str:
    """UTC, microseconds kept when there are some (recovery_target_time accepts them)."""
    text = moment.astimezone(UTC).isoformat()
    return text.replace("+00:00", "Z")


# --- what the bucket holds -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WALObject:
    """A shipped WAL file whose manifest verified: a complete segment, a partial one or a history file."""

    key: str
    manifest_key: str
    manifest: dict[str, Any] = field(repr=False)
    name: str
    timeline: int
    partial: bool
    history: bool
    start: int
    end: int
    segment_bytes: int
    shipped: datetime

    @property
    def segno(self) -> int:
        return self.start // self.segment_bytes


@dataclass(frozen=True)
class BaseBackup:
    """A base backup whose manifest verified."""

    folder: str
    key: str
    manifest_key: str
    manifest: dict[str, Any] = field(repr=False)
    timeline: int
    start: int
    stop: int
    start_time: datetime
    stop_time: datetime
    segment_bytes: int


@dataclass(frozen=True)
class Rejected:
    """A manifest (or data object) that is not part of the archive, and why."""

    key: str
    reason: str
    missing_data: bool = False  # a manifest whose data object is not (or not yet) in the bucket


@dataclass(frozen=True)
class Gap:
    """WAL missing from the bucket on a timeline: ``[start, end)``."""

    timeline: int
    start: int
    end: int
    segment_bytes: int

    @property
    def first_segment(self) -> str:
        return segment_name(self.timeline, self.start, self.segment_bytes)

    @property
    def last_segment(self) -> str:
        return segment_name(self.timeline, max(self.start, self.end - 1), self.segment_bytes)

    def describe(self) -> str:
        """``WAL 0/5000000-0/7000000 (segments 000000010000000000000005..000000010000000000000006)``."""
        first, last = self.first_segment, self.last_segment
        names = first if first == last else f"{first}..{last}"
        return f"WAL {format_lsn(self.start)}-{format_lsn(self.end)} (segment{'s' if first != last else ''} {names})"


@dataclass(frozen=True)
class Window:
    """The recoverable window: any point from ``earliest_time`` (the oldest usable base backup's end) through
    ``latest_time`` (when the newest contiguous WAL was shipped)."""

    earliest_time: datetime
    latest_time: datetime
    earliest_lsn: int
    latest_lsn: int
    timeline: int
    base_backup: str  # folder of the oldest base backup the window starts from

    @property
    def seconds(self) -> int:
        return max(0, int((self.latest_time - self.earliest_time).total_seconds()))


@dataclass(frozen=True)
class Choice:
    """What a point-in-time restore replays: the base backup, then ``files`` in order (history files first)."""

    base: BaseBackup
    files: list[WALObject]
    timeline: int
    target: str  # as PointInTimeStatus.target shows it

    @property
    def segments(self) -> list[WALObject]:
        return [f for f in self.files if not f.history]

    def wal_range(self, *, namespace: str, policy: str) -> WALRange:
        """``PointInTimePlan.wal``: the range the files cover (never empty: a choice reaches the base's stop)."""
        segments = self.segments
        return WALRange(
            namespace=namespace,
            policy=policy,
            first_segment=segments[0].name,
            last_segment=segments[-1].name,
            segment_bytes=segments[0].segment_bytes,
            timelines=sorted({f.timeline for f in segments}),
            histories=[f.timeline for f in self.files if f.history],
            segments=len(segments),
        )


@dataclass(frozen=True)
class _Walk:
    files: list[WALObject]
    end: int  # position after the last byte the walk has
    missing: Gap | None  # the first hole before more WAL of the path, if any


@dataclass
class WALCatalog:
    """The policy's archive as read from the bucket (``read_catalog``)."""

    base_backups: list[BaseBackup]  # oldest first
    segments: dict[tuple[int, int], WALObject]  # (timeline, segno) -> the complete one, else the partial
    history: dict[int, WALObject]
    rejected: list[Rejected] = field(default_factory=list)
    superseded: list[WALObject] = field(default_factory=list)  # partials whose complete segment is there
    unmanifested: list[str] = field(default_factory=list)  # data objects without a manifest (maybe in flight)
    _begins: dict[int, int] = field(default_factory=dict, repr=False)
    _known: list[int] | None = field(default=None, repr=False)

    @property
    def timeline(self) -> int | None:
        """The newest timeline with WAL or a base backup."""
        timelines = {t for t, _ in self.segments} | set(self.history) | {b.timeline for b in self.base_backups}
        return max(timelines) if timelines else None

    @property
    def segment_bytes(self) -> int:
        for segment in self.segments.values():
            return segment.segment_bytes
        for backup in self.base_backups:
            return backup.segment_bytes
        return WAL_SEGMENT_BYTES

    def _begin_segno(self, timeline: int) -> int:
        """The first segment read from ``timeline``: the one holding its switch point (0 for timeline 1)."""
        found = self._begins.get(timeline)
        if found is None:
            found = self._begins[timeline] = self._first_segno(timeline)
        return found

    def _first_segno(self, timeline: int) -> int:
        if timeline == 1:
            return 0
        history = self.history.get(timeline)
        if history is not None:
            return history.start // self.segment_bytes
        own = [segno for t, segno in self.segments if t == timeline]
        return min(own) if own else 0

    def _expected_timeline(self, segno: int, path: int) -> int:
        begun = [t for t in self._timelines(path) if self._begin_segno(t) <= segno]
        return max(begun) if begun else 1

    def _timelines(self, path: int) -> list[int]:
        if self._known is None:
            self._known = sorted({t for t, _ in self.segments} | set(self.history) | {1})
        return [t for t in self._known if t <= path]

    def _path_segments(self, path: int) -> list[WALObject]:
        """The files a recovery along ``path`` reads, in order (each segment from its expected timeline)."""
        found = [f for (t, segno), f in self.segments.items() if t == self._expected_timeline(segno, path)]
        return sorted(found, key=lambda f: f.segno)

    def _walk(self, segno: int, path: int) -> _Walk:
        """From ``segno`` forward along ``path`` while the segments are there (a partial one ends the walk)."""
        files: list[WALObject] = []
        end = segno * self.segment_bytes
        later = [f for f in self._path_segments(path) if f.segno >= segno]
        while True:
            found = self.segments.get((self._expected_timeline(segno, path), segno))
            if found is None:
                break
            files.append(found)
            end = found.end
            if found.partial:
                break
            segno += 1
        missing = None
        after = [f for f in later if f.start >= end]
        if after:
            timeline = self._expected_timeline(end // self.segment_bytes, path)
            missing = Gap(timeline, end, after[0].start, self.segment_bytes)
        return _Walk(files, end, missing)

    def _histories(self, path: int) -> list[WALObject]:
        return [self.history[t] for t in self._timelines(path) if t in self.history]

    def missing_history(self, path: int) -> str | None:
        """What is missing when a recovery along ``path`` cannot start: above timeline 1 PostgreSQL needs that
        timeline's history file (recovery_target_timeline), or the restored server refuses to start."""
        if path == 1 or path in self.history:
            return None
        return f"the history file of timeline {path} ({path:08X}.history) is missing from the bucket"

    def gaps(self) -> list[Gap]:
        """WAL missing between the oldest and the newest segment of the newest timeline's path."""
        path = self.timeline
        files = self._path_segments(path) if path is not None else []
        found: list[Gap] = []
        for before, after in itertools.pairwise(files):
            if before.end < after.start:
                found.append(
                    Gap(self._expected_timeline(before.segno, path or 1), before.end, after.start, before.segment_bytes)
                )
        return found

    def latest(self) -> tuple[int, datetime] | None:
        """The newest position in the bucket along the newest timeline and when it was shipped."""
        path = self.timeline
        files = self._path_segments(path) if path is not None else []
        if not files:
            return None
        return files[-1].end, max(f.shipped for f in files if f.segno == files[-1].segno)

    def window(self) -> Window | None:
        """From the oldest base backup whose WAL is contiguous (and reaches its stop point) to the newest WAL;
        None without one."""
        path = self.timeline
        newest = self.latest()
        if path is None or newest is None:
            return None
        for backup in self.base_backups:
            if backup.timeline > path:
                continue
            walk = self._walk(backup.start // backup.segment_bytes, path)
            if walk.missing is None and walk.end >= backup.stop and walk.files:
                shipped = max(f.shipped for f in walk.files if f.segno == walk.files[-1].segno)
                return Window(
                    backup.stop_time, max(shipped, backup.stop_time), backup.stop, walk.end, path, backup.folder
                )
        return None

    def choose(
        self,
        *,
        target_time: datetime | None = None,
        target_lsn: int | None = None,
        latest: bool = False,
        now: datetime | None = None,
    ) -> Choice:
        """The newest base backup consistent before the target and the contiguous WAL from its start segment
        through the target; a ``RunbookError`` naming the field and the missing range otherwise."""
        if [target_time is not None, target_lsn is not None, latest].count(True) != 1:
            raise ValueError("choose: exactly one of target_time, target_lsn and latest")
        path = self.timeline
        newest = self.latest()
        where = TIME_FIELD if target_time is not None else LSN_FIELD if target_lsn is not None else LATEST_FIELD
        shown = (
            rfc3339(target_time)
            if target_time is not None
            else format_lsn(target_lsn)
            if target_lsn is not None
            else "latest"
        )
        if path is None or newest is None or not self.base_backups:
            what = "no base backup" if not self.base_backups else "no WAL"
            raise RunbookError("NoArchive", f"{where}: the bucket has {what} of this policy yet (spec.wal)")
        missing = self.missing_history(path)
        if missing is not None:
            raise RunbookError("WALGap", f"{where}: {missing}")
        end, shipped = newest
        moment = now or datetime.now(UTC)
        if target_time is not None:
            if target_time > moment:
                raise RunbookError("TargetInFuture", f"{where}: {shown} is in the future")
            if target_time > shipped:
                raise RunbookError(
                    "TargetAfterWindow",
                    f"{where}: {shown} is after the newest archived WAL ({format_lsn(end)}, shipped "
                    f"{rfc3339(shipped)}); WAL {format_lsn(end)}- is not in the bucket yet",
                )
            candidates = [b for b in self.base_backups if b.stop_time <= target_time and b.timeline <= path]
        elif target_lsn is not None:
            if target_lsn >= end:
                raise RunbookError(
                    "TargetAfterWindow",
                    f"{where}: {shown} is not archived yet: the bucket's WAL ends at {format_lsn(end)}; "
                    f"WAL {format_lsn(end)}-{shown} is missing",
                )
            candidates = [b for b in self.base_backups if b.stop <= target_lsn and b.timeline <= path]
        else:
            candidates = [b for b in self.base_backups if b.timeline <= path]
        if not candidates:
            oldest = self.base_backups[0]
            first = rfc3339(oldest.stop_time) if target_time is not None else format_lsn(oldest.stop)
            raise RunbookError(
                "TargetBeforeWindow",
                f"{where}: {shown} is before the oldest base backup ({oldest.folder} ends at {first})",
            )
        problem: RunbookError | None = None
        for backup in reversed(candidates):  # the newest first
            walk = self._walk(backup.start // backup.segment_bytes, path)
            if walk.end < backup.stop:
                hole = walk.missing or Gap(
                    self._expected_timeline(walk.end // backup.segment_bytes, path),
                    walk.end,
                    backup.stop,
                    backup.segment_bytes,
                )
                problem = problem or RunbookError(
                    "WALGap", f"{where}: base backup {backup.folder} needs {hole.describe()}, missing from the bucket"
                )
                continue
            files = self._through(walk, target_time=target_time, target_lsn=target_lsn)
            if files is None:
                hole = walk.missing or Gap(path, walk.end, end, backup.segment_bytes)
                problem = problem or RunbookError(
                    "WALGap", f"{where}: {shown} needs {hole.describe()}, missing from the bucket"
                )
                continue
            return Choice(backup, [*self._histories(path), *files], path, shown)
        assert problem is not None
        raise problem

    @staticmethod
    def _through(walk: _Walk, *, target_time: datetime | None, target_lsn: int | None) -> list[WALObject] | None:
        """The walk's files needed for the target, or None when the walk ends before it."""
        if target_time is not None:
            covering = [i for i, f in enumerate(walk.files) if f.shipped >= target_time]
            if not covering:
                return None
            if walk.missing is None:
                return walk.files
            beyond = [i for i, f in enumerate(walk.files) if f.shipped >= target_time + BEYOND_TARGET]
            if not beyond:
                return None  # more WAL after a hole: the commit after the target that ends recovery may be in it
            return walk.files[: beyond[0] + 1]
        if target_lsn is not None:
            covering = [i for i, f in enumerate(walk.files) if f.end > target_lsn]
            if not covering:
                return None
            last = min(covering[0] + 1, len(walk.files) - 1)  # the record at the target may cross into the next
            return walk.files[: last + 1]
        if walk.missing is not None:
            return None  # latest: the newest WAL is beyond a hole
        return walk.files

    def replay(self, *, first: int, last: int, path: int) -> list[WALObject]:
        """The files a restore along ``path`` replays from segment ``first`` through segment ``last`` (history
        files first); ``WALGap`` naming the missing range when the walk ends before ``last``."""
        missing = self.missing_history(path)
        if missing is not None:
            raise RunbookError("WALGap", f"{missing}; nothing was restored")
        walk = self._walk(first, path)
        files = [f for f in walk.files if f.segno <= last]
        if not files or files[-1].segno < last:
            end = files[-1].end if files else first * self.segment_bytes
            upto = (last + 1) * self.segment_bytes
            if walk.missing is not None:
                upto = min(upto, walk.missing.end)
            hole = Gap(self._expected_timeline(end // self.segment_bytes, path), end, upto, self.segment_bytes)
            raise RunbookError("WALGap", f"{hole.describe()} is missing from the bucket; nothing was restored")
        return [*self._histories(path), *files]

    # --- retention -----------------------------------------------------------------------------------------

    def expired(self, *, now: datetime, retention: timedelta) -> list[str]:
        """Keys to delete so that every point of the last ``retention`` stays reachable: the base backups older
        than the newest one that ended before ``now - retention`` and the WAL before its start segment, the
        partials a complete segment replaced, data objects without a manifest that old; manifests first."""
        cutoff = now - retention
        keep_from = [b for b in self.base_backups if b.stop_time <= cutoff]
        doomed: list[tuple[str, str | None]] = [(p.manifest_key, p.key) for p in self.superseded]
        if keep_from:
            anchor = keep_from[-1]
            first = anchor.start // anchor.segment_bytes
            doomed += [(b.manifest_key, b.key) for b in self.base_backups if b.stop_time < anchor.stop_time]
            doomed += [(f.manifest_key, f.key) for f in self.segments.values() if f.segno < first]
            doomed += [(k, None) for k in self.unmanifested if _segno_of(k, anchor.segment_bytes) < first]
        manifests = [m for m, _ in doomed]
        return [*manifests, *[d for _, d in doomed if d is not None]]


def _segno_of(key: str, segment_bytes: int) -> int:
    leaf = key.rsplit("/", 1)[-1].split(".", maxsplit=1)[0]
    try:
        return segment_start(leaf, segment_bytes) // segment_bytes
    except ValueError:
        return 1 << 62  # not a segment: kept


# --- reading the bucket ----------------------------------------------------------------------------------------
# A complete segment's, a history file's and a base backup's manifest never change once written (the receiver
# skips a re-ship of the same file), so they are kept here after the first read, by bucket and key; the
# signature is checked again on every read of the catalog. Partials are read every time.
CACHE_SIZE = 20_000
_cache: OrderedDict[tuple[str | None, str, str], dict[str, Any]] = OrderedDict()
_cache_lock = threading.Lock()


def _manifest(client: S3Client, location: S3Location, key: str, *, cached: bool) -> dict[str, Any] | None:
    """The manifest, or None when it went between the listing and the read (the receiver replaced a partial)."""
    where = (location.endpoint, location.bucket, key)
    if cached:
        with _cache_lock:
            found = _cache.get(where)
            if found is not None:
                _cache.move_to_end(where)
                return found
    try:
        document = get_json(client, location, key)
    except botocore.exceptions.ClientError as error:
        if error.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
            return None
        raise
    if cached:
        with _cache_lock:
            _cache[where] = document
            while len(_cache) > CACHE_SIZE:
                _cache.popitem(last=False)
    return document


def foreign(manifest: Mapping[str, Any], *, signing_key: str, namespace: str, policy: str) -> str | None:
    """Why the manifest is not one of this policy's (unsigned, forged, another policy's), or None."""
    if not manifest_signed(manifest, signing_key):
        return "unsigned, or its signature does not verify with the namespace's key"
    recorded = manifest.get("policy") or {}
    if (recorded.get("namespace"), recorded.get("name")) != (namespace, policy):
        return f"written for BackupPolicy {recorded.get('namespace')}/{recorded.get('name')}"
    return None


def _wal_object(
    manifest: dict[str, Any], data_key: str, manifest_key: str, leaf: str, timeline_folder: str | None
) -> WALObject | str:
    try:
        parsed = WALSegmentManifest.model_validate(manifest)
        start, end = parse_lsn(parsed.start_lsn), parse_lsn(parsed.end_lsn)
        shipped = parse_time(parsed.shipped_time)
    except (ValidationError, ValueError) as error:
        return f"not a WAL manifest ({type(error).__name__})"
    history = leaf.endswith(".history")
    partial = leaf.endswith(".partial")
    name = leaf.removesuffix(".partial")
    if parsed.name != name or parsed.partial != partial:
        return f"names {parsed.name}{' (partial)' if parsed.partial else ''}, not {leaf}"
    if history:
        if name != f"{parsed.timeline:08X}.history":
            return f"its timeline {parsed.timeline} does not match {leaf}"
    else:
        if timeline_folder != f"{parsed.timeline:08X}" or name[:8] != timeline_folder:
            return f"timeline {parsed.timeline} filed under {timeline_folder}"
        try:
            first = segment_start(name, parsed.segment_bytes)
        except ValueError:
            return f"{name} is not a segment name"
        if (
            start != first
            or not first < end <= first + parsed.segment_bytes
            or (not partial and end != first + parsed.segment_bytes)
        ):
            return f"its range {parsed.start_lsn}-{parsed.end_lsn} is not segment {name}'s"
    return WALObject(
        key=data_key,
        manifest_key=manifest_key,
        manifest=manifest,
        name=name,
        timeline=parsed.timeline,
        partial=partial,
        history=history,
        start=start,
        end=end,
        segment_bytes=parsed.segment_bytes,
        shipped=shipped,
    )


def _base_backup(manifest: dict[str, Any], folder: str, data_key: str, manifest_key: str) -> BaseBackup | str:
    try:
        parsed = BaseBackupManifest.model_validate(manifest)
        backup = BaseBackup(
            folder=folder,
            key=data_key,
            manifest_key=manifest_key,
            manifest=manifest,
            timeline=parsed.timeline,
            start=parse_lsn(parsed.start_lsn),
            stop=parse_lsn(parsed.stop_lsn),
            start_time=parse_time(parsed.start_time),
            stop_time=parse_time(parsed.stop_time),
            segment_bytes=parsed.segment_bytes,
        )
    except (ValidationError, ValueError) as error:
        return f"not a base backup manifest ({type(error).__name__})"
    if backup.stop < backup.start:
        return "its stop LSN is before its start LSN"
    return backup


def read_catalog(
    client: S3Client, location: S3Location, *, namespace: str, policy: str, signing_key: str
) -> WALCatalog:
    """The policy's WAL archive: one listing of ``wal/`` and ``base/``, and each manifest (cached when it cannot
    change). S3 failures are ``catalog.s3_error``'s RunbookErrors."""
    from .catalog import s3_error  # the operator's: importing it here keeps the agents free of the kube client

    base = policy_folder(location, namespace, policy)
    try:
        return _read(client, location, base, namespace=namespace, policy=policy, signing_key=signing_key)
    except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as error:
        raise s3_error(error, location) from None


def _read(
    client: S3Client, location: S3Location, base: str, *, namespace: str, policy: str, signing_key: str
) -> WALCatalog:
    keys = set(list_keys(client, location, wal_folder(base))) | set(
        list_keys(client, location, f"{base}{BASE_FOLDER}/")
    )
    return _classify(
        client, location, base, keys, namespace=namespace, policy=policy, signing_key=signing_key, cache=True
    )


def _classify(
    client: S3Client,
    location: S3Location,
    base: str,
    keys: set[str],
    *,
    namespace: str,
    policy: str,
    signing_key: str,
    cache: bool,
) -> WALCatalog:
    """The catalog of ``keys`` (a listing under the policy's folder ``base``): each manifest read and checked
    (``cache``: the ones that cannot change kept in, and taken from, ``_cache``)."""
    catalog = WALCatalog([], {}, {})
    partials: dict[tuple[int, int], WALObject] = {}
    described: set[str] = set()
    for key in sorted(keys):
        relative = key[len(base) :]
        parts = relative.split("/")
        if parts[0] == BASE_FOLDER:
            if len(parts) != 3 or parts[2] != MANIFEST or parse_timestamp(parts[1]) is None:
                continue
            data_key, _ = base_backup_keys(base, parts[1])
            described.add(data_key)
            manifest = _manifest(client, location, key, cached=cache)
            if manifest is None:
                continue
            found: BaseBackup | WALObject | str | None = foreign(
                manifest, signing_key=signing_key, namespace=namespace, policy=policy
            ) or _base_backup(manifest, f"{base}{BASE_FOLDER}/{parts[1]}/", data_key, key)
            if isinstance(found, BaseBackup) and data_key not in keys:
                catalog.rejected.append(Rejected(key, f"its data object {data_key} is missing", missing_data=True))
            elif isinstance(found, str):
                catalog.rejected.append(Rejected(key, found))
            elif isinstance(found, BaseBackup):
                catalog.base_backups.append(found)
            continue
        if not key.endswith(".json") or len(parts) not in (2, 3):
            continue
        leaf = parts[-1].removesuffix(".json")
        data_key = key.removesuffix(".json") + ".gpg"
        described.add(data_key)
        manifest = _manifest(client, location, key, cached=cache and not leaf.endswith(".partial"))
        if manifest is None:
            continue
        folder = parts[1] if len(parts) == 3 else None
        if len(parts) == 2 and not leaf.endswith(".history"):
            continue
        found = foreign(manifest, signing_key=signing_key, namespace=namespace, policy=policy) or _wal_object(
            manifest, data_key, key, leaf, folder
        )
        if isinstance(found, WALObject) and data_key not in keys:
            catalog.rejected.append(Rejected(key, f"its data object {data_key} is missing", missing_data=True))
        elif isinstance(found, str):
            catalog.rejected.append(Rejected(key, found))
        elif isinstance(found, WALObject):
            if found.history:
                catalog.history[found.timeline] = found
            elif found.partial:
                partials[(found.timeline, found.segno)] = found
            else:
                catalog.segments[(found.timeline, found.segno)] = found
    for where, partial in partials.items():
        if where in catalog.segments:
            catalog.superseded.append(partial)
        else:
            catalog.segments[where] = partial
    catalog.base_backups.sort(key=lambda b: (b.stop_time, b.stop))
    catalog.unmanifested = sorted(k for k in keys if k.endswith(".gpg") and k not in described)
    return catalog


def read_range(
    client: S3Client, location: S3Location, wal: WALRange, *, path: int, signing_key: str
) -> list[WALObject]:
    """A point-in-time restore Job's WAL: the files of ``wal`` along timeline ``path`` (history files first), each
    manifest read from the bucket and checked as ``read_catalog`` checks it. Only the range is listed (from its
    first segment on, per timeline). A manifest on the path that does not verify is ``ManifestForged``; WAL
    missing from the range (or a history file) is ``WALGap`` naming it. S3 failures are raised as botocore's."""
    base = policy_folder(location, wal.namespace, wal.policy)
    size = wal.segment_bytes
    first = segment_start(wal.first_segment, size) // size
    last = segment_start(wal.last_segment, size) // size
    keys: set[str] = set()
    for timeline in wal.timelines:
        folder = f"{wal_folder(base)}{timeline:08X}/"
        ceiling = segment_name(timeline, (last + 1) * size, size)
        for key in list_keys(client, location, folder, start_after=folder + segment_name(timeline, first * size, size)):
            if key[len(folder) :] >= ceiling:
                break
            keys.add(key)
    for timeline in wal.histories:
        keys.update(list_keys(client, location, history_keys(base, timeline)[0].removesuffix(".gpg")))
    catalog = _classify(
        client, location, base, keys, namespace=wal.namespace, policy=wal.policy, signing_key=signing_key, cache=False
    )
    forged = [r for r in catalog.rejected if not r.missing_data and _on_path(catalog, r.key, size, path)]
    if forged:
        raise RunbookError(
            "ManifestForged", f"{forged[0].key}: {forged[0].reason}: changed since; nothing was restored"
        )
    missing = [t for t in wal.histories if t not in catalog.history]
    if missing:
        data_key, _ = history_keys(base, missing[0])
        raise RunbookError(
            "WALGap", f"the history file of timeline {missing[0]} ({data_key}) is missing from the bucket"
        )
    return catalog.replay(first=first, last=last, path=path)


def _on_path(catalog: WALCatalog, key: str, segment_bytes: int, path: int) -> bool:
    """Whether a history file or segment key is one a recovery along ``path`` reads."""
    leaf = key.rsplit("/", 1)[-1]
    if ".history." in leaf:
        return int(leaf[:8], 16) <= path
    segno = _segno_of(key, segment_bytes)
    return segno < 1 << 62 and catalog._expected_timeline(segno, path) == int(leaf[:8], 16)


def current_file(
    client: S3Client, location: S3Location, wal: WALRange, planned: WALObject, *, signing_key: str
) -> WALObject | None:
    """The segment of a partial ``planned`` as the bucket holds it now, complete or partial (the receiver
    re-ships a partial, then replaces it by its complete segment), when its manifest checks out as
    ``read_catalog`` checks it and it reaches at least as far; None otherwise."""
    base = policy_folder(location, wal.namespace, wal.policy)
    for partial in (False, True):
        data_key, manifest_key = segment_keys(base, planned.timeline, planned.name, partial=partial)
        try:
            manifest = _manifest(client, location, manifest_key, cached=False)
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError, ValueError):
            continue
        if manifest is None:
            continue
        found = foreign(manifest, signing_key=signing_key, namespace=wal.namespace, policy=wal.policy) or _wal_object(
            manifest, data_key, manifest_key, planned.name + (".partial" if partial else ""), f"{planned.timeline:08X}"
        )
        if isinstance(found, WALObject) and found.end >= planned.end:
            return found
    return None


def prune(
    client: S3Client, location: S3Location, catalog: WALCatalog, *, now: datetime, retention: timedelta
) -> list[str]:
    """Delete ``catalog.expired(...)`` (manifests first: a half-deleted file never looks shipped); return the
    keys deleted."""
    from .catalog import s3_error

    keys = catalog.expired(now=now, retention=retention)
    try:
        delete_keys(client, location, [k for k in keys if k.endswith(".json")])
        delete_keys(client, location, [k for k in keys if not k.endswith(".json")])
    except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as error:
        raise s3_error(error, location) from None
    return keys


def forget_cached(keys: Iterable[str], location: S3Location) -> None:
    """Drop cached manifests (after a deletion by someone else than ``prune``; tests)."""
    with _cache_lock:
        for key in keys:
            _cache.pop((location.endpoint, location.bucket, key), None)
