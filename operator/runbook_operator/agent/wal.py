"""``runbook-operator wal-receive`` and ``runbook-operator base-backup``: continuous WAL archiving (spec.wal).

``wal-receive`` (the policy's ``<policy>-wal`` Deployment) supervises ``pg_receivewal`` streaming through the
policy's physical replication slot into the memory-backed scratch directory (``RUNBOOK_WAL_SCRATCH``) and ships
every file it completes, encrypted, to ``wal/`` in the bucket with a signed manifest
(``reconcilers/wal_catalog.py`` says what a manifest holds and how the catalog reads it):

* a complete segment as soon as ``pg_receivewal`` renamed it from ``.partial`` (then it is deleted locally and
  the bucket's ``.partial`` of it removed, manifest first);
* the segment being written every ``shipIntervalSeconds`` when it grew: its bytes through the last one
  received (the partial object holds only those; a restore pads it to the segment size);
* timeline history files.

Shipping is idempotent: a complete segment whose manifest in the bucket has the same plain SHA-256 is not sent
again (one with another digest is never overwritten: the first copy stays, and the conflict is logged), and a
partial is only re-shipped when it reaches further than the bucket's. The scratch directory is bounded: with
``MAX_UNSHIPPED`` complete segments waiting, ``pg_receivewal`` is paused (SIGSTOP) until they are shipped; the
slot keeps the rest on the server. SIGTERM stops ``pg_receivewal``, ships what it left and exits 0. After a
SIGKILL, the next start ships what the scratch directory holds first; ``pg_receivewal`` then re-streams the
unfinished segment from its start (the same bytes) or, with an empty directory, from the slot's restart point.
What the server still keeps for the slot is what ``pg_receivewal`` has not written to the scratch directory:
the scratch directory is an emptyDir, which survives a container's restart but not the pod's deletion.

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
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Iterator, Mapping
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
    WAL_SPEC_ENV,
    BaseBackupManifest,
    WALSegmentManifest,
    format_lsn,
    format_timestamp,
    parse_lsn,
    policy_folder,
    segment_start,
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
MAX_UNSHIPPED = 4  # complete segments waiting in the scratch directory before pg_receivewal is paused
POLL_SECONDS = 0.2
BACKOFF_SECONDS = (1, 2, 5, 10, 30)
_SEGMENT_FILE = re.compile(r"^[0-9A-F]{24}$")
_PARTIAL_FILE = re.compile(r"^([0-9A-F]{24})\.partial$")
_HISTORY_FILE = re.compile(r"^([0-9A-F]{8})\.history$")


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
    """The environment of pg_receivewal / pg_basebackup: the server, the replication login, SCRAM only, verified
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


def identify(config: WALConfig, env: Mapping[str, str]) -> Server:
    """A replication connection as the receiver's login: IDENTIFY_SYSTEM, the version, the segment size and
    wal_level, and the slot (it must exist and be physical). Raises the RunbookErrors of ``explain``."""
    import psycopg

    from ..clients.postgres import CONNECT_TIMEOUT, NETWORK_OPTIONS

    source = config.spec.source.postgresql
    assert source is not None
    user = require_env(env, PG_USER_ENV, field=CREDENTIALS_FIELD)
    password = require_env(env, PG_PASSWORD_ENV, field=CREDENTIALS_FIELD)
    options: dict[str, Any] = {
        **NETWORK_OPTIONS,
        "host": source.host,
        "port": source.port,
        "dbname": "replication",
        "replication": "true",
        "user": user,
        "password": password,
        "connect_timeout": CONNECT_TIMEOUT,
        "require_auth": "scram-sha-256",
        "gssencmode": "disable",
        "sslmode": "prefer",
    }
    if source.tls is not None:
        options |= {
            "sslmode": "verify-full",
            "sslrootcert": require_env(env, PG_CA_FILE_ENV, field="spec.source.postgresql.tls.caSecretRef"),
        }
    try:
        conn = psycopg.connect(**options, autocommit=True)
    except psycopg.OperationalError as error:
        from ..clients.postgres import tls_problem

        problem = tls_problem(error)
        if problem is not None:
            raise RunbookError("TLSFailed", f"spec.source.postgresql.{problem}") from None
        raise explain(str(error), config, env) or RunbookError(
            "SourceUnavailable", f"postgresql: {one_line(error)}", retry_after=30
        ) from None

    def row(command: str) -> list[str | None]:
        result = conn.pgconn.exec_(command.encode())
        if result.status != 2:  # TUPLES_OK
            message = (result.error_message or b"").decode(errors="replace")
            raise explain(message, config, env) or RunbookError("SourceFailed", f"{command}: {one_line(message)}")
        return [None if v is None else v.decode() for v in (result.get_value(0, i) for i in range(result.nfields))]

    with conn:
        _, timeline, position, _ = row("IDENTIFY_SYSTEM")
        version = int(row("SHOW server_version_num")[0] or 0)
        size = str(row("SHOW wal_segment_size")[0])
        level = str(row("SHOW wal_level")[0])
        if level == "minimal":
            raise explain("wal_level minimal", config, env) or RunbookError("WALLevelMinimal", "spec.wal")
        if version >= 150000:
            kind, _, _ = row(f'READ_REPLICATION_SLOT "{config.slot}"')
            if kind is None:
                raise RunbookError(
                    "SlotMissing",
                    f"{SLOT_FIELD}: the replication slot {config.slot} does not exist (the operator creates it)",
                )
            if kind != "physical":
                raise RunbookError("SlotTaken", f"{SLOT_FIELD}: {config.slot} is a {kind} slot, not this policy's")
    units = {"kB": 1024, "MB": 1024**2, "GB": 1024**3}
    number, unit = re.fullmatch(r"(\d+)\s*([kMG]B)", size).groups()  # type: ignore[union-attr]
    return Server(int(timeline or 1), parse_lsn(position or "0/0"), version, int(number) * units[unit], level)


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

    def _upload(self, data_key: str, source: IO[bytes] | io.RawIOBase) -> tuple[MultipartUpload, _HashingReader]:
        reader = _HashingReader(source)
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
        return upload, reader

    def _manifest(self, manifest_key: str, document: WALSegmentManifest) -> dict[str, Any]:
        manifest = {
            "formatVersion": MANIFEST_FORMAT,
            "policy": {"namespace": self.config.namespace, "name": self.config.policy},
            "job": self.config.job,
            **document.to_api(),
        }
        manifest[SIGNATURE] = sign_manifest(manifest, self.signing_key)
        put_json(self.client, self.location, manifest_key, manifest)
        return manifest

    def ship_segment(self, path: Path) -> bool:
        """A complete segment (then the bucket's partial of it goes); False when it was there already."""
        name = path.name
        timeline = int(name[:8], 16)
        size = path.stat().st_size
        data_key, manifest_key = wal_catalog.segment_keys(self.base, timeline, name)
        plain = hashlib.sha256()
        with path.open("rb") as handle:
            while chunk := handle.read(1024 * 1024):
                plain.update(chunk)
        digest = plain.hexdigest()
        known = self.shipped.get(manifest_key)
        if known is None:
            existing = self._bucket_manifest(manifest_key)
            known = None if existing is None else str(existing.get("plainSha256"))
        if known is not None and known != digest:
            LOG.error("segment %s: the bucket holds another copy (plain sha256 %s); it is kept", name, known[:12])
            self._drop_partial(timeline, name)
            return False
        if known == digest:
            LOG.info("segment %s: already in the bucket", name)
            self.shipped[manifest_key] = digest
            self._drop_partial(timeline, name)
            return False
        shipped = _now()
        start = segment_start(name, size)
        with path.open("rb") as handle:
            upload, reader = self._upload(data_key, handle)
        if reader.sha256.hexdigest() != digest:  # a complete segment never changes; this one did
            raise RunbookError("WALChanged", f"segment {name} changed while it was shipped")
        self._manifest(
            manifest_key,
            WALSegmentManifest(
                name=name,
                timeline=timeline,
                partial=False,
                start_lsn=format_lsn(start),
                end_lsn=format_lsn(start + size),
                segment_bytes=size,
                sha256=upload.sha256,
                plain_sha256=digest,
                size_bytes=upload.size,
                shipped_time=shipped,
                symmetric=self.keys.passphrase is not None,
            ),
        )
        self.shipped[manifest_key] = digest
        self._drop_partial(timeline, name)
        self.count += 1
        LOG.info("shipped segment %s", name)
        return True

    def _drop_partial(self, timeline: int, name: str) -> None:
        data_key, manifest_key = wal_catalog.segment_keys(self.base, timeline, name, partial=True)
        self.client.delete_object(Bucket=self.location.bucket, Key=manifest_key)  # manifest first
        self.client.delete_object(Bucket=self.location.bucket, Key=data_key)
        self.partial_ends.pop(name, None)

    def ship_partial(self, path: Path) -> bool:
        """The segment being written, through its last non-zero byte (rounded up to 8, PostgreSQL's record
        alignment), when that reaches further than the bucket's copy; False otherwise."""
        name = path.name.removesuffix(".partial")
        timeline = int(name[:8], 16)
        shipped = _now()  # before reading: every byte read was received by now
        with path.open("rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            used = _used_bytes(handle, size)
            if used == 0:
                return False
            data_key, manifest_key = wal_catalog.segment_keys(self.base, timeline, name, partial=True)
            if name not in self.partial_ends:
                existing = self._bucket_manifest(manifest_key)
                self.partial_ends[name] = parse_lsn(existing["endLsn"]) - segment_start(name, size) if existing else 0
            if used <= self.partial_ends[name]:
                return False
            start = segment_start(name, size)
            handle.seek(0)
            upload, reader = self._upload(data_key, _Limited(handle, used))
        if reader.size != used:
            raise RunbookError("WALChanged", f"segment {name}.partial shrank while it was shipped")
        self._manifest(
            manifest_key,
            WALSegmentManifest(
                name=name,
                timeline=timeline,
                partial=True,
                start_lsn=format_lsn(start),
                end_lsn=format_lsn(start + used),
                segment_bytes=size,
                sha256=upload.sha256,
                plain_sha256=reader.sha256.hexdigest(),
                size_bytes=upload.size,
                shipped_time=shipped,
                symmetric=self.keys.passphrase is not None,
            ),
        )
        self.partial_ends[name] = used
        return True

    def ship_history(self, path: Path) -> bool:
        timeline = int(path.name[:8], 16)
        data_key, manifest_key = wal_catalog.history_keys(self.base, timeline)
        content = path.read_bytes()
        digest = hashlib.sha256(content).hexdigest()
        known = self.shipped.get(manifest_key)
        if known is None:
            existing = self._bucket_manifest(manifest_key)
            known = None if existing is None else str(existing.get("plainSha256"))
        if known is not None:
            self.shipped[manifest_key] = known
            return False
        begin = _history_begin(content)
        shipped = _now()
        upload, _ = self._upload(data_key, io.BytesIO(content))
        self._manifest(
            manifest_key,
            WALSegmentManifest(
                name=path.name,
                timeline=timeline,
                partial=False,
                start_lsn=format_lsn(begin),
                end_lsn=format_lsn(begin),
                sha256=upload.sha256,
                plain_sha256=digest,
                size_bytes=upload.size,
                shipped_time=shipped,
                symmetric=self.keys.passphrase is not None,
            ),
        )
        self.shipped[manifest_key] = digest
        return True


class _Limited(io.RawIOBase):
    """The first ``limit`` bytes of a file."""

    def __init__(self, source: IO[bytes], limit: int) -> None:
        self._source = source
        self._left = limit

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        want = self._left if size < 0 else min(size, self._left)
        chunk = self._source.read(want) if want else b""
        self._left -= len(chunk)
        return chunk


def _used_bytes(handle: IO[bytes], size: int, step: int = 256 * 1024) -> int:
    """Where a pg_receivewal ``.partial`` file's data ends: after its last non-zero byte, rounded up to 8
    (PostgreSQL's record alignment); pg_receivewal pads the file with zeros to the segment size. Read backwards
    in ``step`` chunks (memory: one chunk)."""
    end = size
    while end > 0:
        begin = max(0, end - step)
        handle.seek(begin)
        chunk = handle.read(end - begin).rstrip(b"\0")
        if chunk:
            return min(size, (begin + len(chunk) + 7) // 8 * 8)
        end = begin
    return 0


def _history_begin(content: bytes) -> int:
    """Where the history file's timeline begins: the switch point of its last line (``<parent> <lsn> <why>``)."""
    begin = 0
    for line in content.decode(errors="replace").splitlines():
        parts = line.split()
        if len(parts) >= 2 and not line.lstrip().startswith("#") and "/" in parts[1]:
            with contextlib.suppress(ValueError):
                begin = parse_lsn(parts[1])
    return begin


# --- the receiver -------------------------------------------------------------------------------------------------


@dataclass
class Receiver:
    """``pg_receivewal`` supervised, and the scratch directory shipped."""

    config: WALConfig
    env: Mapping[str, str]
    shipper: Shipper
    process: subprocess.Popen[bytes] | None = None
    paused: bool = False
    stopping: bool = False
    _stderr: deque[str] = field(default_factory=lambda: deque(maxlen=20))
    _last_partial: float = 0.0

    @property
    def scratch(self) -> Path:
        assert self.config.scratch is not None
        return self.config.scratch

    def start(self) -> None:
        args = [
            tool("pg_receivewal"),
            "--directory",
            str(self.scratch),
            "--slot",
            self.config.slot,
            "--no-loop",
            "--no-password",
            "--synchronous",
            "--status-interval",
            "1",
            "--verbose",
        ]
        self._stderr.clear()
        self.process = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=libpq_env(self.config, self.env),
        )
        threading.Thread(target=self._drain, args=(self.process,), daemon=True).start()
        self.paused = False
        LOG.info("pg_receivewal started (slot %s, pid %d)", self.config.slot, self.process.pid)

    def _drain(self, process: subprocess.Popen[bytes]) -> None:
        assert process.stderr is not None
        for raw in process.stderr:
            line = raw.decode(errors="replace").rstrip()
            self._stderr.append(line)
            LOG.info("pg_receivewal: %s", REDACTOR.scrub(line))

    def pause(self, pause: bool) -> None:
        if self.process is None or self.process.poll() is not None or pause == self.paused:
            return
        self.process.send_signal(signal.SIGSTOP if pause else signal.SIGCONT)
        self.paused = pause
        LOG.info("pg_receivewal %s", "paused: the scratch directory is full" if pause else "resumed")

    def stop(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            if self.paused:
                self.process.send_signal(signal.SIGCONT)
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.process.stderr is not None:
            self.process.stderr.close()

    def files(self) -> tuple[list[Path], list[Path], list[Path]]:
        """(history files, complete segments, partial segments) in the scratch directory, in order."""
        histories, segments, partials = [], [], []
        for path in sorted(self.scratch.iterdir()):
            if _HISTORY_FILE.match(path.name):
                histories.append(path)
            elif _SEGMENT_FILE.match(path.name):
                segments.append(path)
            elif _PARTIAL_FILE.match(path.name):
                partials.append(path)
        return histories, segments, partials

    def ship(self, *, force_partial: bool = False) -> None:
        """One pass over the scratch directory: histories, complete segments (deleted once shipped), then the
        newest partial when its interval passed."""
        histories, segments, partials = self.files()
        for path in histories:
            self.shipper.ship_history(path)
        if len(segments) >= MAX_UNSHIPPED:
            self.pause(True)
        for path in segments:
            self.shipper.ship_segment(path)
            path.unlink()
        self.pause(False)
        # A partial older than a complete segment is a leftover (pg_receivewal already wrote past it).
        done = {p.name for p in segments}
        partials = [p for p in partials if p.name.removesuffix(".partial") not in done]
        if not partials:
            return
        due = time.monotonic() - self._last_partial >= self.config.wal.ship_interval_seconds
        if due or force_partial:
            self._last_partial = time.monotonic()
            with contextlib.suppress(FileNotFoundError):  # completed (renamed) while we looked
                self.shipper.ship_partial(partials[-1])

    def run(self) -> None:
        """Until SIGTERM: ship what the scratch directory holds, keep pg_receivewal running (restarts with
        backoff), ship every poll."""
        self.ship(force_partial=True)  # what a killed run left
        failures = 0
        started = time.monotonic()
        while not self.stopping:
            if self.process is None or self.process.poll() is not None:
                if self.process is not None:
                    code = self.process.returncode
                    self.process.wait()
                    text = "\n".join(self._stderr)
                    problem = explain(text, self.config, self.env)
                    if problem is not None:
                        raise problem
                    delay = BACKOFF_SECONDS[min(failures, len(BACKOFF_SECONDS) - 1)]
                    failures += 1
                    LOG.warning("pg_receivewal exited with %s; restarting in %d s", code, delay)
                    self._sleep(delay)
                    if self.stopping:
                        break
                self.start()
                started = time.monotonic()
            self._sleep(POLL_SECONDS)
            try:
                self.ship()
            except (RunbookError, botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as error:
                # S3 away, a file changed under us: kept in the scratch directory, tried again (the slot and
                # MAX_UNSHIPPED bound what waits meanwhile).
                problem = _as_runbook_error(error)
                LOG.warning("shipping failed (%s: %s); trying again", problem.reason, REDACTOR.scrub(problem.message))
                self._sleep(2)
            if failures and time.monotonic() - started > 60:
                failures = 0
        self.stop()
        self.ship(force_partial=True)

    def _sleep(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while not self.stopping and time.monotonic() < deadline:
            time.sleep(min(0.05, seconds))


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
        try:
            receiver.run()
        except BaseException:
            receiver.stop()
            with contextlib.suppress(Exception):
                receiver.ship(force_partial=True)
            raise
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
