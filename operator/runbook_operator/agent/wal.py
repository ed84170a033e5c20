"""``runbook-operator wal-receive`` and ``runbook-operator base-backup``: continuous WAL archiving (spec.wal).

``wal-receive`` (the policy's ``<policy>-wal`` Deployment) speaks the physical replication protocol itself
(``START_REPLICATION SLOT <slot> PHYSICAL``, over psycopg's libpq connection) and ships what it receives,
encrypted, to ``wal/`` in the bucket with a signed manifest (``reconcilers/wal_catalog.py`` says what a manifest
holds and how the catalog reads it):

* a complete segment as soon as its last byte arrived (then the bucket's ``.partial`` of it is removed,
  manifest first);
* the segment being received every ``shipIntervalSeconds`` when it grew, unless the server is already past its
  end (its complete copy follows at once): its bytes through the last one received (the partial object holds
  only those; a restore pads it to the segment size);
* a timeline's history file when the server ends the timeline (then streaming goes on on the next one), and
  at the start of a session on a timeline above 1 whose history file the bucket lacks (a receiver started after
  a failover or an in-place restore promoted the server: it never saw the timeline begin), with those of the
  timelines it branched from (``TIMELINE_HISTORY``; a restore along the timeline needs them).

Shipping runs in a thread beside the reading, so WAL keeps arriving while a segment is encrypted and
uploaded. The segment being received and the complete one being shipped are held in the receiver's memory (two
buffers of the server's wal_segment_size at most): no WAL is written to any disk. The standby status updates it
sends say flushed = applied = the end of what is in the bucket with its manifest written, so the slot's
restart_lsn never passes WAL that is not archived, and the server keeps it whatever happens to the pod. A new
receiver (its memory empty) starts streaming from the slot's restart_lsn rounded down to its segment's start
and ships that segment again: shipping is idempotent (a complete segment whose manifest in the bucket has the
same plain SHA-256 is not sent again, one with another digest is never overwritten: the first copy stays and
the conflict is logged; a partial is only re-shipped when it reaches further than the bucket's, and never
beside its complete segment). What gpg read of a complete segment must have the SHA-256 of what was received
into it (else WALChanged, and it is shipped again). While a complete segment cannot be shipped (S3 away),
nothing more is read from the server once the next one fills: memory stays two segments, the slot keeps the
rest. SIGTERM ships what was handed over and the partial, sends the last status update and exits 0.
``RUNBOOK_WAL_SCRATCH`` must still name a directory (the pod's memory-backed scratch); nothing is written there.

``base-backup`` (the ``<policy>-base`` CronJob) streams ``pg_basebackup -Ft -D - -X none --checkpoint=fast``
through gpg to ``base/<UTC timestamp>/base.tar.gpg``; the start and stop LSN and the timeline come from the
``backup_manifest`` pg_basebackup puts at the end of the tar; ``manifest.json`` (``BaseBackupManifest``, signed) is
written last.

Both get the policy's spec as JSON in ``RUNBOOK_WAL_SPEC``, the replication login in ``PGUSER`` /
``PGPASSWORD`` (from spec.wal.replicationCredentialsSecretRef), S3 keys, gpg recipients or passphrase and the
namespace's manifest key as ``agent/backup.py`` does.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import re
import signal
import struct
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import IO, TYPE_CHECKING, Any

import botocore.exceptions

from ..clients.gpg import GPG
from ..clients.s3 import MultipartUpload, get_json, make_client, put_json
from ..errors import RunbookError, parse_spec
from ..logs import REDACTOR
from ..models.backup import BackupPolicySpec, WALArchiving
from ..models.plans import (
    JOB_NAME_ENV,
    MANIFEST_KEY_ENV,
    MANIFEST_KEY_SECRET,
    PG_CA_FILE_ENV,
    PG_PASSWORD_ENV,
    PG_USER_ENV,
    S3_ACCESS_KEY_ENV,
    S3_SECRET_KEY_ENV,
    SIGNATURE,
    WAL_SCRATCH_ENV,
    WAL_SEGMENT_BYTES,
    WAL_SPEC_ENV,
    BaseBackupManifest,
    WALSegmentManifest,
    format_lsn,
    format_timestamp,
    parse_lsn,
    policy_folder,
    segment_name,
    sign_manifest,
    slot_name,
)
from ..reconcilers import wal_catalog
from .backup import (
    SECRET_ENVS,
    EncryptionKeys,
    ProcessSource,
    _abort,
    _as_runbook_error,
    _fixed_mmap_threshold,
    encryption_keys,
    one_line,
    require_env,
)

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

LOG = logging.getLogger(__name__)
MANIFEST_FORMAT = 1
CREDENTIALS_FIELD = "spec.wal.replicationCredentialsSecretRef"
SLOT_FIELD = "spec.wal.slotName"
POLL_SECONDS = 0.2  # the longest wait for the server's next message
STATUS_SECONDS = 1.0  # standby status updates at least this often
BACKOFF_SECONDS = (1, 2, 5, 10, 30)


def _now() -> str:
    return wal_catalog.rfc3339(datetime.now(UTC))


# --- configuration --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WALConfig:
    """One agent run: the policy, its spec and spec.wal, the slot and the scratch directory."""

    namespace: str
    policy: str
    spec: BackupPolicySpec
    wal: WALArchiving
    slot: str
    scratch: Path | None
    job: str | None

    @classmethod
    def from_env(cls, env: Mapping[str, str], *, namespace: str, policy: str, scratch: bool) -> WALConfig:
        raw = require_env(env, WAL_SPEC_ENV, field="spec")
        try:
            document = json.loads(raw)
        except json.JSONDecodeError as error:
            raise RunbookError("InvalidSpec", f"spec: {WAL_SPEC_ENV} is not JSON ({error.msg})") from None
        spec = parse_spec(BackupPolicySpec, document)
        if spec.wal is None or spec.source.postgresql is None:
            raise RunbookError("InvalidSpec", "spec.wal: the policy does not archive WAL")
        directory = None
        if scratch:
            directory = Path(require_env(env, WAL_SCRATCH_ENV, field="the receiver's scratch volume"))
            if not directory.is_dir():
                raise RunbookError("ScratchMissing", f"{WAL_SCRATCH_ENV}: {directory} is not a directory")
        slot = spec.wal.slot_name or slot_name(namespace, policy)
        return cls(namespace, policy, spec, spec.wal, slot, directory, env.get(JOB_NAME_ENV))


def tool(name: str) -> str:
    """A PostgreSQL client program: on PATH, else the newest /usr/lib/postgresql/<major>/bin (Debian's layout)."""
    for directory in [*os.environ.get("PATH", "").split(os.pathsep)]:
        if directory and os.access(os.path.join(directory, name), os.X_OK):
            return os.path.join(directory, name)
    found = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"), key=lambda p: int(p.parts[-3]))
    return str(found[-1]) if found else name


def libpq_env(config: WALConfig, env: Mapping[str, str]) -> dict[str, str]:
    """The environment of pg_basebackup: the server, the replication login, SCRAM only, verified
    TLS when the source has it."""
    source = config.spec.source.postgresql
    assert source is not None
    require_env(env, PG_USER_ENV, field=CREDENTIALS_FIELD)
    require_env(env, PG_PASSWORD_ENV, field=CREDENTIALS_FIELD)
    child = {**env, "PGHOST": source.host, "PGPORT": str(source.port), "PGCONNECT_TIMEOUT": "15"}
    child.setdefault("PGREQUIREAUTH", "scram-sha-256")
    child["PGGSSENCMODE"] = "disable"
    if source.tls is not None:
        child["PGSSLMODE"] = "verify-full"
        child["PGSSLROOTCERT"] = require_env(env, PG_CA_FILE_ENV, field="spec.source.postgresql.tls.caSecretRef")
    else:
        child.setdefault("PGSSLMODE", "prefer")
    for name in (WAL_SPEC_ENV, MANIFEST_KEY_ENV, S3_SECRET_KEY_ENV, "RUNBOOK_GPG_PASSPHRASE"):
        child.pop(name, None)  # the tools need none of these
    return child


def explain(text: str, config: WALConfig, env: Mapping[str, str]) -> RunbookError | None:
    """A configuration problem in a tool's or the server's message, as a RunbookError naming the field; None
    for anything else (a restart may cure it)."""
    user = env.get(PG_USER_ENV, "")
    lowered = text.lower()
    if "must be superuser or replication role" in lowered or "permission denied to start wal sender" in lowered:
        return RunbookError(
            "ReplicationNotPermitted",
            f"{CREDENTIALS_FIELD}: the login {user} lacks the REPLICATION attribute (ALTER ROLE {user} REPLICATION)",
        )
    if "password authentication failed" in lowered or "server did not complete authentication" in lowered:
        return RunbookError("CredentialsRejected", f"{CREDENTIALS_FIELD}: the server rejected the login {user}")
    if "no pg_hba.conf entry for replication" in lowered:
        return RunbookError(
            "ReplicationNotAllowed",
            f"{CREDENTIALS_FIELD}: the server's pg_hba.conf has no replication line for the login {user}",
        )
    if "exceeds max_wal_senders (currently 0)" in lowered or ("wal_level" in lowered and "minimal" in lowered):
        return RunbookError(
            "WALLevelMinimal",
            "spec.source.postgresql: the server streams no WAL (wal_level=minimal, max_wal_senders=0): it needs "
            "wal_level=replica and max_wal_senders > 0",
        )
    if "replication slot" in lowered and "is active for pid" in lowered:
        return RunbookError(
            "SlotTaken", f"{SLOT_FIELD}: the replication slot {config.slot} is in use by another connection"
        )
    if "replication slot" in lowered and "does not exist" in lowered:
        return RunbookError("SlotMissing", f"{SLOT_FIELD}: the replication slot {config.slot} does not exist")
    if "is not a physical replication slot" in lowered or "cannot use a logical replication slot" in lowered:
        return RunbookError("SlotTaken", f"{SLOT_FIELD}: {config.slot} is a logical slot, not this policy's")
    return None


@dataclass(frozen=True)
class Server:
    """What the replication connection says about the server."""

    timeline: int
    position: int
    version: int
    segment_bytes: int
    wal_level: str


def replication_connection(config: WALConfig, env: Mapping[str, str]) -> Any:
    """A physical replication connection as the receiver's login (psycopg, autocommit). Raises the
    RunbookErrors of ``explain``, else SourceUnavailable."""
    import psycopg

    from ..clients.postgres import connection_options, tls_problem

    source = config.spec.source.postgresql
    assert source is not None
    options = connection_options(
        host=source.host,
        port=source.port,
        database="replication",
        user=require_env(env, PG_USER_ENV, field=CREDENTIALS_FIELD),
        password=require_env(env, PG_PASSWORD_ENV, field=CREDENTIALS_FIELD),
        root_cert=None
        if source.tls is None
        else require_env(env, PG_CA_FILE_ENV, field="spec.source.postgresql.tls.caSecretRef"),
        replication=True,
        application_name="runbook-wal-receive",
    )
    try:
        return psycopg.connect(**options, autocommit=True)
    except psycopg.OperationalError as error:
        problem = tls_problem(error)
        if problem is not None:
            raise RunbookError("TLSFailed", f"spec.source.postgresql.{problem}") from None
        raise explain(str(error), config, env) or RunbookError(
            "SourceUnavailable", f"postgresql: {one_line(error)}", retry_after=30
        ) from None


def command_row(conn: Any, command: str, config: WALConfig, env: Mapping[str, str]) -> list[str | None]:
    """The first row of a replication command's result (strings)."""
    result = conn.pgconn.exec_(command.encode())
    if result.status != 2:  # TUPLES_OK
        message = (result.error_message or b"").decode(errors="replace")
        raise explain(message, config, env) or RunbookError("SourceFailed", f"{command}: {one_line(message)}")
    if result.ntuples == 0:
        return [None] * result.nfields
    return [None if v is None else v.decode() for v in (result.get_value(0, i) for i in range(result.nfields))]


@dataclass(frozen=True)
class Slot:
    """READ_REPLICATION_SLOT: where the server keeps WAL from for this slot (None: no WAL reserved)."""

    restart_lsn: int | None
    restart_timeline: int | None


def identify_on(conn: Any, config: WALConfig, env: Mapping[str, str]) -> tuple[Server, Slot]:
    """IDENTIFY_SYSTEM, the version, the segment size, wal_level and the slot (it must exist and be physical)."""

    def row(command: str) -> list[str | None]:
        return command_row(conn, command, config, env)

    _, timeline, position, _ = row("IDENTIFY_SYSTEM")
    version = int(row("SHOW server_version_num")[0] or 0)
    size = str(row("SHOW wal_segment_size")[0])
    level = str(row("SHOW wal_level")[0])
    if level == "minimal":
        raise explain("wal_level minimal", config, env) or RunbookError("WALLevelMinimal", "spec.wal")
    slot = Slot(None, None)
    if version >= 150000:
        kind, restart, restart_tli = row(f'READ_REPLICATION_SLOT "{config.slot}"')
        if kind is None:
            raise RunbookError(
                "SlotMissing",
                f"{SLOT_FIELD}: the replication slot {config.slot} does not exist (the operator creates it)",
            )
        if kind != "physical":
            raise RunbookError("SlotTaken", f"{SLOT_FIELD}: {config.slot} is a {kind} slot, not this policy's")
        if restart is not None:
            slot = Slot(parse_lsn(restart), int(restart_tli or timeline or 1))
    units = {"kB": 1024, "MB": 1024**2, "GB": 1024**3}
    number, unit = re.fullmatch(r"(\d+)\s*([kMG]B)", size).groups()  # type: ignore[union-attr]
    server = Server(int(timeline or 1), parse_lsn(position or "0/0"), version, int(number) * units[unit], level)
    return server, slot


def identify(config: WALConfig, env: Mapping[str, str]) -> Server:
    """A replication connection as the receiver's login: IDENTIFY_SYSTEM, the version, the segment size and
    wal_level, and the slot (it must exist and be physical). Raises the RunbookErrors of ``explain``."""
    with replication_connection(config, env) as conn:
        server, _ = identify_on(conn, config, env)
    return server


# --- shipping ---------------------------------------------------------------------------------------------------


class _HashingReader(io.RawIOBase):
    """A file read by gpg, hashed on the way (SHA-256 and size of the plaintext)."""

    def __init__(self, source: IO[bytes] | io.RawIOBase) -> None:
        self._source = source
        self.sha256 = hashlib.sha256()
        self.size = 0

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        chunk = self._source.read(size) or b""
        self.sha256.update(chunk)
        self.size += len(chunk)
        return chunk


@dataclass
class Shipper:
    """Encrypts WAL files to the bucket with signed manifests (one S3 client and one gpg keyring for the run)."""

    config: WALConfig
    env: Mapping[str, str]
    gpg: GPG
    keys: EncryptionKeys
    client: S3Client
    signing_key: str
    base: str = ""
    partial_ends: dict[str, int] = field(default_factory=dict)  # segment name -> end shipped as its partial
    shipped: dict[str, str] = field(default_factory=dict)  # manifest key -> plain sha256 in the bucket
    count: int = 0

    def __post_init__(self) -> None:
        self.base = policy_folder(self.config.spec.destination.s3, self.config.namespace, self.config.policy)

    @property
    def location(self) -> Any:
        return self.config.spec.destination.s3

    def _bucket_manifest(self, key: str) -> dict[str, Any] | None:
        try:
            return get_json(self.client, self.location, key)
        except botocore.exceptions.ClientError as error:
            if error.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                return None
            raise

    def _ship(
        self,
        keys: tuple[str, str],
        data: memoryview,
        *,
        name: str,
        timeline: int,
        partial: bool,
        start: int,
        end: int,
        segment_bytes: int = WAL_SEGMENT_BYTES,
        digest: str | None = None,
    ) -> str:
        """``data`` through gpg to the data key, then its signed manifest (written last: an object without one is
        not in the catalog). ``digest``: the plain SHA-256 ``data`` must have (WALChanged if what gpg read was
        not that). Returns the plain SHA-256."""
        data_key, manifest_key = keys
        shipped = _now()  # every byte in data was received by now
        reader = _HashingReader(_MemoryReader(data))
        upload = MultipartUpload(self.client, self.location, data_key, overlap=False)
        try:
            self.gpg.encrypt_stream(
                reader,  # type: ignore[arg-type]
                upload.write,
                recipients=self.keys.recipients,
                passphrase=self.keys.passphrase,
            )
            upload.complete()
        except BaseException as error:
            raise _abort(upload, _as_runbook_error(error)) from None
        plain = reader.sha256.hexdigest()
        if digest is not None and plain != digest:
            raise RunbookError("WALChanged", f"{name} changed while it was shipped")
        document = WALSegmentManifest(
            name=name,
            timeline=timeline,
            partial=partial,
            start_lsn=format_lsn(start),
            end_lsn=format_lsn(end),
            segment_bytes=segment_bytes,
            sha256=upload.sha256,
            plain_sha256=plain,
            size_bytes=upload.size,
            shipped_time=shipped,
            symmetric=self.keys.passphrase is not None,
        )
        manifest = {
            "formatVersion": MANIFEST_FORMAT,
            "policy": {"namespace": self.config.namespace, "name": self.config.policy},
            "job": self.config.job,
            **document.to_api(),
        }
        manifest[SIGNATURE] = sign_manifest(manifest, self.signing_key)
        put_json(self.client, self.location, manifest_key, manifest)
        return plain

    def _known(self, manifest_key: str) -> str | None:
        known = self.shipped.get(manifest_key)
        if known is None:
            existing = self._bucket_manifest(manifest_key)
            known = None if existing is None else str(existing.get("plainSha256"))
        return known

    def ship_segment(self, timeline: int, start: int, data: memoryview, digest: str) -> bool:
        """A complete segment held in memory whose plain SHA-256 is ``digest`` (then the bucket's partial of it
        goes); False when it was there already."""
        size = len(data)
        name = segment_name(timeline, start, size)
        keys = wal_catalog.segment_keys(self.base, timeline, name)
        known = self._known(keys[1])
        if known is not None and known != digest:
            LOG.error("segment %s: the bucket holds another copy (plain sha256 %s); it is kept", name, known[:12])
        elif known == digest:
            LOG.info("segment %s: already in the bucket", name)
            self.shipped[keys[1]] = digest
        else:
            self._ship(
                keys,
                data,
                name=name,
                timeline=timeline,
                partial=False,
                start=start,
                end=start + size,
                segment_bytes=size,
                digest=digest,
            )
            self.shipped[keys[1]] = digest
            self.count += 1
            LOG.info("shipped segment %s", name)
        self._drop_partial(timeline, name)
        return known is None

    def _drop_partial(self, timeline: int, name: str) -> None:
        data_key, manifest_key = wal_catalog.segment_keys(self.base, timeline, name, partial=True)
        self.client.delete_object(Bucket=self.location.bucket, Key=manifest_key)  # manifest first
        self.client.delete_object(Bucket=self.location.bucket, Key=data_key)
        self.partial_ends.pop(name, None)

    def ship_partial(self, timeline: int, start: int, data: memoryview, segment_bytes: int) -> bool:
        """The segment being received, from its start through the last byte received (``data``), when that
        reaches further than the bucket's copy; False otherwise."""
        used = len(data)
        if used == 0:
            return False
        name = segment_name(timeline, start, segment_bytes)
        keys = wal_catalog.segment_keys(self.base, timeline, name, partial=True)
        if name not in self.partial_ends:
            _, complete_key = wal_catalog.segment_keys(self.base, timeline, name)
            if self._known(complete_key) is not None:  # shipped whole before a restart: no partial beside it
                self.partial_ends[name] = segment_bytes
            else:
                existing = self._bucket_manifest(keys[1])
                self.partial_ends[name] = parse_lsn(existing["endLsn"]) - start if existing else 0
        if used <= self.partial_ends[name]:
            return False
        self._ship(
            keys,
            data,
            name=name,
            timeline=timeline,
            partial=True,
            start=start,
            end=start + used,
            segment_bytes=segment_bytes,
        )
        self.partial_ends[name] = used
        return True

    def has_history(self, timeline: int) -> bool:
        return self._known(wal_catalog.history_keys(self.base, timeline)[1]) is not None

    def ship_history(self, name: str, content: bytes) -> bool:
        timeline = int(name[:8], 16)
        keys = wal_catalog.history_keys(self.base, timeline)
        known = self._known(keys[1])
        if known is not None:
            self.shipped[keys[1]] = known
            return False
        begin = _history_begin(content)
        self.shipped[keys[1]] = self._ship(
            keys, memoryview(content), name=name, timeline=timeline, partial=False, start=begin, end=begin
        )
        LOG.info("shipped history %s", name)
        return True


class _MemoryReader(io.RawIOBase):
    """Bytes held in memory, read in chunks (each chunk a copy, the whole never)."""

    def __init__(self, data: memoryview) -> None:
        self._data = data
        self._at = 0

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        end = len(self._data) if size < 0 else min(len(self._data), self._at + size)
        chunk = bytes(self._data[self._at : end])
        self._at = end
        return chunk


def _history_lines(content: bytes) -> list[tuple[int, int]]:
    """A history file's lines (``<parent> <switch lsn> <why>``) as (parent timeline, switch point), oldest first."""
    found = []
    for line in content.decode(errors="replace").splitlines():
        parts = line.split()
        if len(parts) >= 2 and not line.lstrip().startswith("#") and "/" in parts[1]:
            with contextlib.suppress(ValueError):
                found.append((int(parts[0]), parse_lsn(parts[1])))
    return found


def _history_begin(content: bytes) -> int:
    """Where the history file's timeline begins: the switch point of its last line."""
    lines = _history_lines(content)
    return lines[-1][1] if lines else 0


# --- the receiver -------------------------------------------------------------------------------------------------

_EPOCH_2000 = datetime(2000, 1, 1, tzinfo=UTC).timestamp()
_FATAL = frozenset(
    {
        "ReplicationNotPermitted",
        "CredentialsRejected",
        "ReplicationNotAllowed",
        "WALLevelMinimal",
        "SlotTaken",
        "SlotMissing",
        "TLSFailed",
    }
)


class _TimelineEnded(Exception):
    """The server ended the stream: the timeline being streamed ended at ``switch``; ``next`` follows it."""

    def __init__(self, next_timeline: int, switch: int) -> None:
        super().__init__(next_timeline, switch)
        self.next_timeline = next_timeline
        self.switch = switch


@dataclass
class _Complete:
    """A complete segment handed to the shipping thread: its buffer is the thread's until it is in the bucket."""

    timeline: int
    start: int
    buffer: bytearray
    digest: str  # plain SHA-256 of what was received into it


@dataclass
class Receiver:
    """The physical replication protocol spoken over the slot (psycopg's libpq connection, COPY BOTH), and a
    shipping thread beside it, so reading goes on while a segment is encrypted and uploaded.

    Memory: two buffers of ``segment_bytes`` at most, the segment being received and the complete one being
    shipped (a segment that fills while the previous one is not yet in the bucket waits, and nothing more is
    read), and the chunks gpg reads. The thread ships a handed-over complete segment first, else the partial of
    the segment being received when asked (``shipIntervalSeconds``), from the same buffer: bytes received are
    never changed until the segment is shipped whole. The feedback the server gets says flushed = applied =
    ``shipped``, the end of what is in the bucket with its manifest written (the thread advances it), so the
    slot's restart_lsn never passes WAL that is not archived: a receiver lost with its memory resumes from the
    slot's restart_lsn rounded down to its segment's start and re-ships that segment (a partial reaching no
    further is skipped, a complete one with the same digest too)."""

    config: WALConfig
    env: Mapping[str, str]
    shipper: Shipper
    stopping: bool = False
    timeline: int = 0
    segment_bytes: int = 0
    start: int = 0  # the first position of the segment in the buffer
    filled: int = 0  # bytes of it received
    shipped: int = 0  # end of the WAL in the bucket, contiguous from where this run started
    buffer: bytearray = field(default_factory=bytearray)
    _digest: Any = field(default_factory=hashlib.sha256)  # of the buffer's bytes received so far
    _server_end: int = 0  # the end of the server's WAL, as its last message said
    _conn: Any = None
    _last_partial: float = 0.0
    _last_feedback: float = 0.0
    # Shared with the shipping thread, under _lock (_ready: the thread has something to do or was told to end).
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _ready: threading.Condition = field(init=False)
    _complete: _Complete | None = None  # handed over, not yet in the bucket
    _spare: bytearray | None = None  # the buffer of the last complete segment shipped
    _partial_wanted: bool = False
    _partial_end: int = 0  # bytes of the buffer's segment shipped as its partial
    _busy: bool = False
    _closing: bool = False
    _gave_up: bool = False  # the shipping thread ended with a complete segment not in the bucket
    _failure: BaseException | None = None
    _thread: threading.Thread | None = None

    def __post_init__(self) -> None:
        self._ready = threading.Condition(self._lock)

    @property
    def received(self) -> int:
        return self.start + self.filled

    # -- the connection -----------------------------------------------------------------------------------------

    def _feedback(self, *, reply: bool = False) -> None:
        """Standby status update: written = received, flushed = applied = shipped (the slot's restart_lsn)."""
        now = int((time.time() - _EPOCH_2000) * 1_000_000)
        flushed = self.shipped
        message = struct.pack(">cQQQQB", b"r", self.received, flushed, flushed, now, 1 if reply else 0)
        pg = self._conn.pgconn
        pg.put_copy_data(message)
        pg.flush()
        self._last_feedback = time.monotonic()

    def _start_replication(self, timeline: int, start: int) -> None:
        pg = self._conn.pgconn
        command = f'START_REPLICATION SLOT "{self.config.slot}" PHYSICAL {format_lsn(start)} TIMELINE {timeline}'
        result = pg.exec_(command.encode())
        if result.status != 8:  # COPY_BOTH
            message = (result.error_message or pg.error_message or b"").decode(errors="replace")
            raise explain(message, self.config, self.env) or RunbookError(
                "SourceFailed", f"START_REPLICATION: {one_line(message)}"
            )
        with self._lock:  # the shipping thread is idle (_settle): nothing of the buffer is being read
            self.timeline, self.start, self.filled, self._partial_end = timeline, start, 0, 0
            self._digest = hashlib.sha256()
        LOG.info("streaming timeline %d from %s (slot %s)", timeline, format_lsn(start), self.config.slot)

    def _end_of_stream(self) -> _TimelineEnded:
        """The server's CopyDone: answer it, read the next timeline and where it starts."""
        pg = self._conn.pgconn
        pg.put_copy_end()
        pg.flush()
        next_timeline, switch = 0, 0
        while (result := pg.get_result()) is not None:
            if result.status == 2 and result.ntuples and result.nfields >= 2:  # TUPLES_OK
                next_timeline = int(result.get_value(0, 0) or b"0")
                switch = parse_lsn((result.get_value(0, 1) or b"0/0").decode())
            elif result.status not in (1, 2):  # COMMAND_OK, TUPLES_OK
                message = (result.error_message or b"").decode(errors="replace")
                raise explain(message, self.config, self.env) or RunbookError(
                    "SourceFailed", f"replication stream: {one_line(message)}"
                )
        if not next_timeline:
            raise RunbookError("SourceFailed", "replication stream ended without a next timeline")
        return _TimelineEnded(next_timeline, switch)

    # -- shipping (the thread) ----------------------------------------------------------------------------------

    def _ship_loop(self) -> None:
        """The shipping thread: a handed-over complete segment (retried until it is in the bucket or SIGTERM),
        else the partial asked for, until told to end. An unexpected error ends it; the reader raises it."""
        try:
            while True:
                with self._ready:
                    while not (self._closing or self._complete is not None or self._partial_wanted):
                        self._ready.wait()
                    if self._complete is None and not self._partial_wanted:
                        return
                    complete = self._complete
                    self._partial_wanted = complete is not None and self._partial_wanted
                    partial = (self.timeline, self.start, self.buffer, self.filled)
                    self._busy = True
                try:
                    if complete is not None and not self._ship_complete(complete):
                        with self._ready:
                            self._gave_up = True  # SIGTERM or the end while S3 refused it: the reader stops
                        return
                    if complete is None and partial[3] < self.segment_bytes:  # full: its complete copy is next
                        self._ship_partial(*partial)
                finally:
                    with self._ready:
                        self._busy = False
                        self._ready.notify_all()
        except BaseException as error:
            with self._ready:
                self._failure = error
                self._ready.notify_all()

    def _ship_complete(self, segment: _Complete) -> bool:
        """The segment, retried until it is in the bucket (True) or SIGTERM or the end of the run (False: still
        handed over, never reported flushed; the slot keeps it on the server)."""
        while True:
            try:
                self.shipper.ship_segment(segment.timeline, segment.start, memoryview(segment.buffer), segment.digest)
                break
            except (RunbookError, botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as error:
                problem = _as_runbook_error(error)
                LOG.warning("shipping failed (%s: %s); trying again", problem.reason, REDACTOR.scrub(problem.message))
                deadline = time.monotonic() + 2
                while time.monotonic() < deadline:
                    if self.stopping or self._closing:
                        return False
                    time.sleep(0.1)
        with self._ready:
            self.shipped = max(self.shipped, segment.start + len(segment.buffer))
            self._complete, self._spare = None, segment.buffer
        return True

    def _ship_partial(self, timeline: int, start: int, buffer: bytearray, end: int) -> None:
        try:
            self.shipper.ship_partial(timeline, start, memoryview(buffer)[:end], self.segment_bytes)
        except (RunbookError, botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as error:
            problem = _as_runbook_error(error)
            LOG.warning("shipping failed (%s: %s); trying again", problem.reason, REDACTOR.scrub(problem.message))
            return  # asked again at the next interval
        with self._ready:
            self.shipped = max(self.shipped, start + end)
            if start == self.start:
                self._partial_end = max(self._partial_end, end)

    # -- shipping (the reader's side) ---------------------------------------------------------------------------

    def _check_thread(self) -> None:
        if self._failure is not None:
            raise RuntimeError("the shipping thread failed") from self._failure

    def _ask_partial(self, *, force: bool = False) -> None:
        """Every shipIntervalSeconds (or ``force``): ask for the partial when the buffer's segment grew past what
        was shipped of it, unless the server is already past the segment's end (its complete copy follows:
        shipping its partial would only encrypt it again)."""
        due = time.monotonic() - self._last_partial >= self.config.wal.ship_interval_seconds
        if not (due or force) or self.filled <= self._partial_end:
            return
        if not force and self._server_end >= self.start + self.segment_bytes:
            return
        self._last_partial = time.monotonic()
        with self._ready:
            self._partial_wanted = True
            self._ready.notify_all()

    def _wait_thread(self, done: Callable[[], bool]) -> None:
        """Until ``done()`` (checked under the lock), sending status updates meanwhile; SIGTERM stops the wait
        when a complete segment is still not in the bucket (_Stopped: the slot keeps it on the server)."""
        while True:
            with self._ready:
                self._check_thread()
                if done():
                    return
                if self._gave_up:
                    raise _Stopped()
                self._ready.wait(0.1)
            if self._conn is not None and time.monotonic() - self._last_feedback >= STATUS_SECONDS:
                self._feedback()

    def _settle(self, *, partial: bool) -> None:
        """Everything handed over is in the bucket, and with ``partial`` the buffer's bytes too: the shipping
        thread is idle after this."""
        if partial:
            self._ask_partial(force=True)
        self._wait_thread(lambda: self._complete is None and not self._partial_wanted and not self._busy)

    def _hand_over(self) -> None:
        """The buffer holds a whole segment: it goes to the shipping thread once the previous one is in the
        bucket (until then nothing more is read: the server keeps the rest), and the next segment is received
        into the previous one's buffer."""
        digest = self._digest.hexdigest()
        self._wait_thread(lambda: self._complete is None)
        with self._ready:
            self._complete = _Complete(self.timeline, self.start, self.buffer, digest)
            self.buffer = self._spare if self._spare is not None else bytearray(self.segment_bytes)
            self._spare = None
            self._partial_wanted = False  # the segment's partial is not needed now
            self.start += self.segment_bytes
            self.filled = self._partial_end = 0
            self._digest = hashlib.sha256()
            self._ready.notify_all()

    def _take(self, begin: int, payload: memoryview) -> None:
        """XLogData at ``begin``: into the buffer (a new segment is started when it fills)."""
        if begin != self.received:
            if begin > self.received and self.filled == 0 and begin % self.segment_bytes == 0:
                self.start = begin  # the server starts where we asked, or at the next segment
            else:
                raise RunbookError(
                    "SourceFailed",
                    f"replication stream: WAL at {format_lsn(begin)}, expected {format_lsn(self.received)}",
                )
        while len(payload):
            take = min(len(payload), self.segment_bytes - self.filled)
            self.buffer[self.filled : self.filled + take] = payload[:take]
            self._digest.update(payload[:take])
            self.filled += take  # after the bytes: the shipping thread reads the buffer through filled
            payload = payload[take:]
            if self.filled == self.segment_bytes:
                self._hand_over()

    def _stream(self) -> None:
        """Messages until the timeline ends (raises _TimelineEnded) or SIGTERM (returns)."""
        import select

        pg = self._conn.pgconn
        socket = pg.socket
        while not self.stopping:
            self._check_thread()
            if time.monotonic() - self._last_feedback >= STATUS_SECONDS:
                self._feedback()
            self._ask_partial()
            nbytes, data = pg.get_copy_data(1)
            if nbytes == 0:
                select.select([socket], [], [], POLL_SECONDS)
                pg.consume_input()
                continue
            if nbytes == -1:
                raise self._end_of_stream()
            kind = data[:1].tobytes()
            if kind == b"w":
                begin, end, _ = struct.unpack_from(">QQQ", data, 1)
                self._server_end = max(self._server_end, end)
                self._take(begin, data[25:])
            elif kind == b"k":
                end, _, reply = struct.unpack_from(">QQB", data, 1)
                self._server_end = max(self._server_end, end)
                if reply:
                    self._feedback()

    def session(self) -> None:
        """One replication connection: from the slot's restart point (its segment's start) until SIGTERM,
        following timeline switches."""
        self._settle(partial=False)  # what an earlier session handed over is in the bucket first
        self._conn = replication_connection(self.config, self.env)
        try:
            server, slot = identify_on(self._conn, self.config, self.env)
            self.segment_bytes = server.segment_bytes
            if len(self.buffer) != server.segment_bytes:
                self.buffer, self._spare = bytearray(server.segment_bytes), None
            if slot.restart_lsn is not None:
                timeline, resume = slot.restart_timeline or server.timeline, slot.restart_lsn
            else:
                timeline, resume = server.timeline, server.position
            # Everything before the slot's restart point is in the bucket (this receiver only ever reports
            # flushed = shipped); from it on, the segment is received again from its start and re-shipped.
            self.shipped = max(self.shipped, resume)
            self._ship_histories(server.timeline)
            self._server_end = 0
            start = resume - resume % server.segment_bytes
            self._start_replication(timeline, start)
            self._feedback()
            while True:
                try:
                    self._stream()
                    break
                except _TimelineEnded as ended:
                    LOG.info(
                        "timeline %d ended at %s; timeline %d follows",
                        self.timeline,
                        format_lsn(ended.switch),
                        ended.next_timeline,
                    )
                    self._settle(partial=True)
                    self._ship_histories(ended.next_timeline)
                    self._server_end = 0
                    self._start_replication(ended.next_timeline, ended.switch - ended.switch % self.segment_bytes)
                    self._feedback()
            self._settle(partial=True)
            self._feedback()
        finally:
            with contextlib.suppress(Exception):
                self._conn.close()
            self._conn = None

    def _ship_histories(self, timeline: int) -> None:
        """The history file of ``timeline`` when the bucket lacks it (timeline 1 has none), after those of the
        timelines it branched from that the bucket lacks too (one the server no longer has is logged: the
        catalog then takes that timeline's begin from its segments). The shipping thread is idle, the connection
        out of COPY mode; shipping is idempotent."""
        if timeline == 1 or self.shipper.has_history(timeline):
            return
        name, content = self._history(timeline)
        for parent in sorted({p for p, _ in _history_lines(content)} - {1}):
            if self.shipper.has_history(parent):
                continue
            try:
                self.shipper.ship_history(*self._history(parent))
            except RunbookError as error:
                LOG.warning("history of timeline %d not shipped (%s)", parent, REDACTOR.scrub(error.message))
        self.shipper.ship_history(name, content)  # last: once it is in the bucket, the earlier ones were tried

    def _history(self, timeline: int) -> tuple[str, bytes]:
        result = self._conn.pgconn.exec_(f"TIMELINE_HISTORY {timeline}".encode())
        if result.status != 2 or not result.ntuples:
            message = (result.error_message or b"").decode(errors="replace")
            raise RunbookError("SourceFailed", f"TIMELINE_HISTORY {timeline}: {one_line(message)}")
        return (result.get_value(0, 0) or b"").decode(), bytes(result.get_value(0, 1) or b"")

    def run(self) -> None:
        """Until SIGTERM: replication sessions, restarted with backoff after a lost connection or a failure that
        a restart may cure; a configuration problem is raised. The shipping thread runs meanwhile."""
        self._thread = threading.Thread(target=self._ship_loop, name="wal-ship", daemon=True)
        self._thread.start()
        try:
            self._sessions()
        finally:
            with self._ready:
                self._closing = True
                self._ready.notify_all()
            self._thread.join()

    def _sessions(self) -> None:
        import psycopg

        failures = 0
        while not self.stopping:
            began = time.monotonic()
            try:
                self.session()
                return
            except _Stopped:
                return
            except RunbookError as error:
                if error.reason in _FATAL:
                    raise
                problem = error
            except (psycopg.Error, OSError, botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as e:
                problem = explain(str(e), self.config, self.env) or _as_runbook_error(e)
                if problem.reason in _FATAL:
                    raise problem from None
            if time.monotonic() - began > 60:
                failures = 0
            delay = BACKOFF_SECONDS[min(failures, len(BACKOFF_SECONDS) - 1)]
            failures += 1
            LOG.warning(
                "replication stopped (%s: %s); again in %d s", problem.reason, REDACTOR.scrub(problem.message), delay
            )
            self._sleep(delay)

    def _sleep(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while not self.stopping and time.monotonic() < deadline:
            time.sleep(min(0.05, seconds))


class _Stopped(Exception):
    """SIGTERM while a complete segment could not be shipped: the slot keeps it on the server."""


@contextlib.contextmanager
def _shipper(config: WALConfig, env: Mapping[str, str]) -> Iterator[Shipper]:
    for name in SECRET_ENVS:
        REDACTOR.register(env.get(name))
    signing_key = env.get(MANIFEST_KEY_ENV)
    if not signing_key:
        raise RunbookError(
            "CredentialsMissing",
            f"{MANIFEST_KEY_ENV} (Secret {MANIFEST_KEY_SECRET}) is not set: WAL manifests must be signed",
        )
    location = config.spec.destination.s3
    if location.credentials_secret_ref is not None:
        for name in (S3_ACCESS_KEY_ENV, S3_SECRET_KEY_ENV):
            require_env(env, name, field="spec.destination.s3.credentialsSecretRef")
    client = make_client(location, env.get(S3_ACCESS_KEY_ENV), env.get(S3_SECRET_KEY_ENV))
    with GPG() as gpg:
        keys = encryption_keys(gpg, config.spec.encryption.gpg, env)
        yield Shipper(config, env, gpg, keys, client, signing_key)


def receive(config: WALConfig, env: Mapping[str, str]) -> Shipper:
    """The receiver until SIGTERM (or a configuration error, raised after what was received is shipped)."""
    with _shipper(config, env) as shipper:
        receiver = Receiver(config, env, shipper)

        def on_term(signum: int, frame: FrameType | None) -> None:
            receiver.stopping = True

        signal.signal(signal.SIGTERM, on_term)
        signal.signal(signal.SIGINT, on_term)
        server = identify(config, env)
        LOG.info(
            "server %d on timeline %d at %s, slot %s",
            server.version,
            server.timeline,
            format_lsn(server.position),
            config.slot,
        )
        receiver.run()
        return shipper


def _exit_error(what: str, error: RunbookError) -> int:
    print(f"{what} failed: {error.reason}: {REDACTOR.scrub(error.message)}", file=sys.stderr, flush=True)
    return 1


def receive_main(*, namespace: str, policy: str, env: Mapping[str, str] | None = None) -> int:
    _fixed_mmap_threshold()  # 8 MiB parts and 1 MiB reads in threads: returned to the system once freed
    environment = os.environ if env is None else env
    try:
        config = WALConfig.from_env(environment, namespace=namespace, policy=policy, scratch=True)
        shipper = receive(config, environment)
    except RunbookError as error:
        return _exit_error("wal-receive", error)
    except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as error:
        return _exit_error("wal-receive", _as_runbook_error(error))
    print(json.dumps({"walReceive": "stopped", "segmentsShipped": shipper.count}), flush=True)
    return 0


# --- base backups ---------------------------------------------------------------------------------------------


class TarWatch(io.RawIOBase):
    """pg_basebackup's tar read by gpg, its member headers followed on the way: ``backup_label`` and
    ``backup_manifest`` (small files) are kept. Memory: one header and those two files."""

    WANTED = ("backup_label", "backup_manifest")
    LIMIT = 64 * 1024 * 1024

    def __init__(self, source: IO[bytes]) -> None:
        self._source = source
        self._pending = bytearray()  # bytes of the current header, or of a wanted member
        self._skip = 0  # bytes to pass before the next header
        self._member: str | None = None
        self._left = 0
        self.files: dict[str, bytes] = {}

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        chunk = self._source.read(size)
        self._feed(memoryview(chunk))
        return chunk

    def _feed(self, data: memoryview) -> None:
        while len(data):
            if self._skip:
                step = min(self._skip, len(data))
                if self._member is not None:
                    take = min(step, self._left)
                    self._pending += data[:take]
                    self._left -= take
                    if self._left == 0:
                        self.files[self._member] = bytes(self._pending)
                        self._member = None
                        self._pending.clear()
                self._skip -= step
                data = data[step:]
                continue
            need = 512 - len(self._pending)
            self._pending += data[:need]
            data = data[need:]
            if len(self._pending) < 512:
                return
            header = bytes(self._pending)
            self._pending.clear()
            if header == bytes(512):
                continue  # the end-of-archive blocks
            name = header[:100].split(b"\0", 1)[0].decode(errors="replace")
            size_field = header[124:136].split(b"\0", 1)[0].strip() or b"0"
            size = int(size_field, 8) if size_field[:1] != b"\x80" else int.from_bytes(header[125:136], "big")
            self._skip = (size + 511) // 512 * 512
            if name in self.WANTED and header[156:157] in (b"0", b"\0") and size <= self.LIMIT:
                self._member, self._left = name, size
                if size == 0:
                    self.files[name] = b""
                    self._member = None


def base_backup(config: WALConfig, env: Mapping[str, str]) -> dict[str, Any]:
    """One base backup; returns its manifest. Raises RunbookError (and leaves no manifest) on failure."""
    with _shipper(config, env) as shipper:
        server = identify(config, env)
        started = datetime.now(UTC)
        stamp = format_timestamp(started)
        data_key, manifest_key = wal_catalog.base_backup_keys(shipper.base, stamp)
        source = ProcessSource(
            tool("pg_basebackup"),
            ["--format=tar", "--pgdata=-", "--wal-method=none", "--checkpoint=fast", "--no-password", "--verbose"],
            libpq_env(config, env),
        )
        upload = MultipartUpload(shipper.client, shipper.location, data_key)
        LOG.info("base backup to %s", data_key)
        try:
            source.start()
            try:
                watch = TarWatch(source.stream)

                def sink(chunk: bytes) -> None:
                    try:
                        upload.write(chunk)
                    except BaseException:
                        source.cancel()
                        raise

                shipper.gpg.encrypt_stream(
                    watch,  # type: ignore[arg-type]
                    sink,
                    recipients=shipper.keys.recipients,
                    passphrase=shipper.keys.passphrase,
                )
                try:
                    source.finish()
                except RunbookError as error:
                    raise explain(error.message, config, env) or error from None
            finally:
                source.close()
            ranges = _wal_range(watch.files)
            upload.complete()
        except BaseException as error:
            raise _abort(upload, _as_runbook_error(error)) from None
        stopped = datetime.now(UTC)
        timeline, start, stop = ranges
        manifest = {
            "formatVersion": MANIFEST_FORMAT,
            "policy": {"namespace": config.namespace, "name": config.policy},
            "job": config.job,
            **BaseBackupManifest(
                timeline=timeline,
                start_lsn=format_lsn(start),
                stop_lsn=format_lsn(stop),
                start_time=wal_catalog.rfc3339(started),
                stop_time=wal_catalog.rfc3339(stopped),
                server_version=server.version,
                segment_bytes=server.segment_bytes,
                sha256=upload.sha256,
                size_bytes=upload.size,
                symmetric=shipper.keys.passphrase is not None,
            ).to_api(),
            "encryption": shipper.keys.manifest,
        }
        manifest[SIGNATURE] = sign_manifest(manifest, shipper.signing_key)
        put_json(shipper.client, shipper.location, manifest_key, manifest)
        return manifest


def _wal_range(files: Mapping[str, bytes]) -> tuple[int, int, int]:
    """(timeline, start, stop) from the tar's backup_manifest (PostgreSQL 13+), else backup_label's start."""
    if "backup_manifest" in files:
        document = json.loads(files["backup_manifest"])
        ranges = document.get("WAL-Ranges") or []
        if ranges:
            first, last = ranges[0], ranges[-1]
            return int(first["Timeline"]), parse_lsn(first["Start-LSN"]), parse_lsn(last["End-LSN"])
    raise RunbookError(
        "SourceFailed", "pg_basebackup: its tar has no backup_manifest with the WAL range (PostgreSQL 13 or newer)"
    )


def base_backup_main(*, namespace: str, policy: str, env: Mapping[str, str] | None = None) -> int:
    environment = os.environ if env is None else env
    try:
        config = WALConfig.from_env(environment, namespace=namespace, policy=policy, scratch=False)
        manifest = base_backup(config, environment)
    except RunbookError as error:
        return _exit_error("base-backup", error)
    except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as error:
        return _exit_error("base-backup", _as_runbook_error(error))
    summary = {k: manifest[k] for k in ("startLsn", "stopLsn", "timeline", "sizeBytes", "sha256")}
    print(json.dumps({"baseBackup": "complete", **summary}), flush=True)
    return 0
